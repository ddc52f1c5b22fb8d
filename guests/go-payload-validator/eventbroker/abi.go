package eventbroker

// Lifting and lowering of the contract's records at their canonical-ABI offsets on wasm32,
// where a pointer (and a string's or list's pointer and length) is 32 bits. Strings from the
// host are copied into Go strings at once, so no Go value points into host-written memory.
//
// Layouts (byte offsets; `string` = ptr u32 + len u32; `option<T>` = discriminant u8, then
// T at T's alignment):
//
//	event (size 144, align 8)           context (size 32, align 8)
//	  0 id            88 created-at       0 attempt u32
//	  8 source u8     96 processed-at     4 handler
//	 12 event-type   108 completed-at    12 version
//	 20 status u8    120 error           24 deadline-ms u64
//	 24 payload      132 metadata
//	 32 user-id      140 retry-count u32   handle's parameters: event at 0, context at 144
//	    (option<s64>: value at 40)
//	 48 session-id   56 instance-id   64 schema   72 entity   80 operation
//
//	event-draft (size 104, align 8)     result<string,string> and option<string> (size 12)
//	  0 event-type    40 session-id        0 discriminant u8
//	  8 source (option<u8>: value at 9)    4 string
//	 12 payload       52 schema
//	 24 user-id       64 entity          handle's result (size 16): 0 is-err u8,
//	    (value at 32) 76 operation         4 handler-error case u8, 8 message string
//	                  88 metadata
//
// Every pointer here is a linear-memory address; the host's allocations reach Go through
// cabi_realloc (wasm.go).

import "unsafe"

const (
	eventSize        = 144
	draftSize        = 104
	handleResultSize = 16
	stringResultSize = 12
)

func load8(addr uintptr) uint8   { return *(*uint8)(unsafe.Pointer(addr)) }
func load32(addr uintptr) uint32 { return *(*uint32)(unsafe.Pointer(addr)) }
func load64(addr uintptr) uint64 { return *(*uint64)(unsafe.Pointer(addr)) }

func store8(addr uintptr, v uint8)   { *(*uint8)(unsafe.Pointer(addr)) = v }
func store32(addr uintptr, v uint32) { *(*uint32)(unsafe.Pointer(addr)) = v }
func store64(addr uintptr, v uint64) { *(*uint64)(unsafe.Pointer(addr)) = v }

// loadString copies the string whose pointer and length are at addr.
func loadString(addr uintptr) string {
	ptr, n := load32(addr), load32(addr+4)
	if n == 0 {
		return ""
	}
	return string(unsafe.Slice((*byte)(unsafe.Pointer(uintptr(ptr))), n))
}

func loadOptionString(addr uintptr) *string {
	if load8(addr) == 0 {
		return nil
	}
	s := loadString(addr + 4)
	return &s
}

func loadOptionS64(addr uintptr) *int64 {
	if load8(addr) == 0 {
		return nil
	}
	v := int64(load64(addr + 8))
	return &v
}

// storeString writes s's pointer and length at addr; keep holds s until the host has read it.
func storeString(addr uintptr, s string, keep *[]any) {
	*keep = append(*keep, s)
	store32(addr, uint32(uintptr(unsafe.Pointer(unsafe.StringData(s)))))
	store32(addr+4, uint32(len(s)))
}

func storeOptionString(addr uintptr, s *string, keep *[]any) {
	if s == nil {
		store8(addr, 0)
		return
	}
	store8(addr, 1)
	storeString(addr+4, *s, keep)
}

// liftEvent reads an `event` record at addr.
func liftEvent(addr uintptr) Event {
	return Event{
		ID:          loadString(addr + 0),
		Source:      Source(load8(addr + 8)),
		EventType:   loadString(addr + 12),
		Status:      Status(load8(addr + 20)),
		Payload:     loadString(addr + 24),
		UserID:      loadOptionS64(addr + 32),
		SessionID:   loadString(addr + 48),
		InstanceID:  loadString(addr + 56),
		Schema:      loadString(addr + 64),
		Entity:      loadString(addr + 72),
		Operation:   loadString(addr + 80),
		CreatedAt:   loadString(addr + 88),
		ProcessedAt: loadOptionString(addr + 96),
		CompletedAt: loadOptionString(addr + 108),
		Error:       loadOptionString(addr + 120),
		Metadata:    loadString(addr + 132),
		RetryCount:  load32(addr + 140),
	}
}

// liftContext reads a `context` record at addr.
func liftContext(addr uintptr) Context {
	return Context{
		Attempt:    load32(addr + 0),
		Handler:    loadString(addr + 4),
		Version:    loadString(addr + 12),
		DeadlineMs: load64(addr + 24),
	}
}

// lowerDraft writes an `event-draft` record into a new 8-byte-aligned buffer and returns it
// with its address; keep holds the buffer and the strings until the host has read them.
func lowerDraft(d EventDraft, keep *[]any) uintptr {
	buffer := make([]uint64, draftSize/8)
	*keep = append(*keep, buffer)
	addr := uintptr(unsafe.Pointer(&buffer[0]))
	storeString(addr+0, d.EventType, keep)
	if d.Source != nil {
		store8(addr+8, 1)
		store8(addr+9, uint8(*d.Source))
	}
	storeOptionString(addr+12, d.Payload, keep)
	if d.UserID != nil {
		store8(addr+24, 1)
		store64(addr+32, uint64(*d.UserID))
	}
	storeOptionString(addr+40, d.SessionID, keep)
	storeOptionString(addr+52, d.Schema, keep)
	storeOptionString(addr+64, d.Entity, keep)
	storeOptionString(addr+76, d.Operation, keep)
	storeOptionString(addr+88, d.Metadata, keep)
	return addr
}

// liftResultString reads a `result<string, string>` at addr.
func liftResultString(addr uintptr) (ok string, err string, isErr bool) {
	if load8(addr) == 0 {
		return loadString(addr + 4), "", false
	}
	return "", loadString(addr + 4), true
}

// storeHandleResult writes handle's `result<_, handler-error>` at addr.
func storeHandleResult(addr uintptr, err error, keep *[]any) {
	if err == nil {
		store8(addr, 0)
		return
	}
	kind, message := asHandlerError(err)
	store8(addr, 1)
	store8(addr+4, uint8(kind))
	storeString(addr+8, message, keep)
}

// storePatterns writes a `list<string>` (pointer and length) at addr.
func storePatterns(addr uintptr, patterns []string, keep *[]any) {
	if len(patterns) == 0 {
		store32(addr, 0)
		store32(addr+4, 0)
		return
	}
	elements := make([]uint32, 2*len(patterns))
	*keep = append(*keep, elements)
	base := uintptr(unsafe.Pointer(&elements[0]))
	for i, pattern := range patterns {
		storeString(base+uintptr(8*i), pattern, keep)
	}
	store32(addr, uint32(base))
	store32(addr+4, uint32(len(patterns)))
}
