package eventbroker

// Tests of the canonical-ABI layouts in abi.go. They need 32-bit pointers, as on wasm32, and
// run natively as GOARCH=386 (`GOARCH=386 go test ./eventbroker/`, which ../build.sh runs).

import (
	"errors"
	"reflect"
	"testing"
	"unsafe"
)

func init() {
	if unsafe.Sizeof(uintptr(0)) != 4 {
		panic("these tests need 32-bit pointers: run them with GOARCH=386")
	}
}

// memory is a test buffer standing in for linear memory, 8-byte aligned.
type memory struct {
	words []uint64
	keep  [][]byte
}

func newMemory(size int) *memory { return &memory{words: make([]uint64, (size+7)/8)} }

func (m *memory) base() uintptr { return uintptr(unsafe.Pointer(&m.words[0])) }

func (m *memory) putString(offset uintptr, s string) {
	bytes := []byte(s)
	m.keep = append(m.keep, bytes)
	var ptr uintptr
	if len(bytes) > 0 {
		ptr = uintptr(unsafe.Pointer(&bytes[0]))
	}
	store32(m.base()+offset, uint32(ptr))
	store32(m.base()+offset+4, uint32(len(bytes)))
}

func (m *memory) putOptionString(offset uintptr, s *string) {
	if s == nil {
		store8(m.base()+offset, 0)
		return
	}
	store8(m.base()+offset, 1)
	m.putString(offset+4, *s)
}

func ptr[T any](v T) *T { return &v }

func TestLiftEventAndContext(t *testing.T) {
	want := Event{
		ID: "0b6f", Source: SourceFrontend, EventType: "shop.orders.create", Status: StatusProcessing,
		Payload: `{"sku":"TASSE-☕"}`, UserID: ptr(int64(-42)), SessionID: "session", InstanceID: "host-1",
		Schema: "shop", Entity: "orders", Operation: "create", CreatedAt: "2026-11-27T03:00:00Z",
		ProcessedAt: ptr("2026-11-27T03:00:01Z"), CompletedAt: nil, Error: ptr("earlier failure"),
		Metadata: `{"k":"v"}`, RetryCount: 3,
	}
	wantContext := Context{Attempt: 4, Handler: "go-payload-validator", Version: "abcdef", DeadlineMs: 1 << 41}
	m := newMemory(eventSize + 32)
	m.putString(0, want.ID)
	store8(m.base()+8, uint8(want.Source))
	m.putString(12, want.EventType)
	store8(m.base()+20, uint8(want.Status))
	m.putString(24, want.Payload)
	store8(m.base()+32, 1)
	store64(m.base()+40, uint64(*want.UserID))
	m.putString(48, want.SessionID)
	m.putString(56, want.InstanceID)
	m.putString(64, want.Schema)
	m.putString(72, want.Entity)
	m.putString(80, want.Operation)
	m.putString(88, want.CreatedAt)
	m.putOptionString(96, want.ProcessedAt)
	m.putOptionString(108, want.CompletedAt)
	m.putOptionString(120, want.Error)
	m.putString(132, want.Metadata)
	store32(m.base()+140, want.RetryCount)
	store32(m.base()+eventSize, wantContext.Attempt)
	m.putString(eventSize+4, wantContext.Handler)
	m.putString(eventSize+12, wantContext.Version)
	store64(m.base()+eventSize+24, wantContext.DeadlineMs)

	if got := liftEvent(m.base()); !reflect.DeepEqual(got, want) {
		t.Errorf("liftEvent:\n got %+v\nwant %+v", got, want)
	}
	if got := liftContext(m.base() + eventSize); got != wantContext {
		t.Errorf("liftContext: got %+v, want %+v", got, wantContext)
	}
	store8(m.base()+32, 0)
	if got := liftEvent(m.base()).UserID; got != nil {
		t.Errorf("absent user-id lifted as %d", *got)
	}
}

func loadStringAt(addr uintptr) string { return loadString(addr) }

func TestLowerDraft(t *testing.T) {
	source := SourceInternal
	draft := EventDraft{
		EventType: "shop.orders.validated", Source: &source, Payload: ptr(`{"quantity":2}`),
		UserID: ptr(int64(1) << 40), Schema: ptr("shop"), Metadata: ptr(`{}`),
	}
	var keep []any
	addr := lowerDraft(draft, &keep)
	if addr%8 != 0 {
		t.Fatalf("draft at %#x is not 8-byte aligned", addr)
	}
	checks := []struct {
		name string
		got  any
		want any
	}{
		{"event-type", loadStringAt(addr + 0), draft.EventType},
		{"source is some", load8(addr + 8), uint8(1)},
		{"source", load8(addr + 9), uint8(SourceInternal)},
		{"payload is some", load8(addr + 12), uint8(1)},
		{"payload", loadStringAt(addr + 16), *draft.Payload},
		{"user-id is some", load8(addr + 24), uint8(1)},
		{"user-id", int64(load64(addr + 32)), *draft.UserID},
		{"session-id is none", load8(addr + 40), uint8(0)},
		{"schema is some", load8(addr + 52), uint8(1)},
		{"schema", loadStringAt(addr + 56), "shop"},
		{"entity is none", load8(addr + 64), uint8(0)},
		{"operation is none", load8(addr + 76), uint8(0)},
		{"metadata is some", load8(addr + 88), uint8(1)},
		{"metadata", loadStringAt(addr + 92), "{}"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}
	empty := lowerDraft(EventDraft{EventType: "x"}, &keep)
	for _, offset := range []uintptr{8, 12, 24, 40, 52, 64, 76, 88} {
		if load8(empty+offset) != 0 {
			t.Errorf("optional field at %d of an empty draft is not none", offset)
		}
	}
}

func TestResultsAndOptions(t *testing.T) {
	m := newMemory(stringResultSize)
	store8(m.base(), 0)
	m.putString(4, "0b6f-id")
	if ok, _, isErr := liftResultString(m.base()); isErr || ok != "0b6f-id" {
		t.Errorf("ok result: got %q (error %v)", ok, isErr)
	}
	store8(m.base(), 1)
	m.putString(4, "publish budget used up")
	if _, err, isErr := liftResultString(m.base()); !isErr || err != "publish budget used up" {
		t.Errorf("error result: got %q (error %v)", err, isErr)
	}
	if got := loadOptionString(m.base()); got == nil || *got != "publish budget used up" {
		t.Errorf("some option: got %v", got)
	}
	store8(m.base(), 0)
	if got := loadOptionString(m.base()); got != nil {
		t.Errorf("none option: got %q", *got)
	}
}

func TestStoreHandleResult(t *testing.T) {
	m := newMemory(handleResultSize)
	var keep []any
	cases := []struct {
		err     error
		isErr   uint8
		kind    uint8
		message string
	}{
		{nil, 0, 0, ""},
		{Retry("inventory service unavailable"), 1, 0, "inventory service unavailable"},
		{Fail(`"sku" is missing or empty`), 1, 1, `"sku" is missing or empty`},
		{errors.New("plain errors fail"), 1, 1, "plain errors fail"},
	}
	for _, c := range cases {
		storeHandleResult(m.base(), c.err, &keep)
		if got := load8(m.base()); got != c.isErr {
			t.Errorf("%v: is-err %d, want %d", c.err, got, c.isErr)
		}
		if c.isErr == 0 {
			continue
		}
		if got := load8(m.base() + 4); got != c.kind {
			t.Errorf("%v: case %d, want %d", c.err, got, c.kind)
		}
		if got := loadString(m.base() + 8); got != c.message {
			t.Errorf("%v: message %q, want %q", c.err, got, c.message)
		}
	}
}

func TestStorePatterns(t *testing.T) {
	m := newMemory(8)
	var keep []any
	patterns := []string{"shop.orders.*", "audit.>"}
	storePatterns(m.base(), patterns, &keep)
	list, n := uintptr(load32(m.base())), load32(m.base()+4)
	if n != 2 {
		t.Fatalf("length %d, want 2", n)
	}
	for i, want := range patterns {
		if got := loadString(list + uintptr(8*i)); got != want {
			t.Errorf("pattern %d: %q, want %q", i, got, want)
		}
	}
	storePatterns(m.base(), nil, &keep)
	if load32(m.base()+4) != 0 {
		t.Error("an empty list has a length")
	}
}
