//go:build wasip1

package eventbroker

// The component's imports and exports. The component is built as a WASI preview1 reactor
// (-buildmode=c-shared) and turned into a component by `wasm-tools component new` with the
// preview1 reactor adapter (see ../build.sh).

import (
	"runtime"
	"unsafe"
)

//go:wasmimport resolvespec:eventbroker/host@0.1.0 log
func hostLog(level uint32, ptr uintptr, length uint32)

//go:wasmimport resolvespec:eventbroker/host@0.1.0 publish
func hostPublish(draft uintptr, result uintptr)

//go:wasmimport resolvespec:eventbroker/host@0.1.0 config
func hostConfig(ptr uintptr, length uint32, result uintptr)

// Log writes a line to the host's log, tagged with the handler, its version and the event.
func Log(level LogLevel, message string) {
	hostLog(uint32(level), uintptr(unsafe.Pointer(unsafe.StringData(message))), uint32(len(message)))
	runtime.KeepAlive(message)
}

// Publish publishes a derived event (queued by the host, tagged with the causing event's id)
// and returns its id, or an error saying why the host refused it.
func Publish(draft EventDraft) (string, error) {
	var keep []any
	var result [2]uint64 // stringResultSize bytes, 8-byte aligned
	hostPublish(lowerDraft(draft, &keep), uintptr(unsafe.Pointer(&result)))
	runtime.KeepAlive(keep)
	id, refused, isErr := liftResultString(uintptr(unsafe.Pointer(&result)))
	releaseHostAllocations()
	if isErr {
		return "", publishError(refused)
	}
	return id, nil
}

// Config reads a value of the handler's [config] table in its manifest.
func Config(key string) (string, bool) {
	var result [2]uint64
	hostConfig(uintptr(unsafe.Pointer(unsafe.StringData(key))), uint32(len(key)), uintptr(unsafe.Pointer(&result)))
	runtime.KeepAlive(key)
	value := loadOptionString(uintptr(unsafe.Pointer(&result)))
	releaseHostAllocations()
	if value == nil {
		return "", false
	}
	return *value, true
}

// hostAllocations keeps the memory that the host obtained through cabi_realloc (the
// arguments of an export, the strings an import returns) reachable until it is lifted.
var hostAllocations [][]uint64

//go:wasmexport cabi_realloc
func cabiRealloc(old uintptr, oldSize, align, newSize uint32) uintptr {
	if newSize == 0 {
		return uintptr(align)
	}
	buffer := make([]uint64, (newSize+7)/8) // 8-byte aligned, the largest alignment in the contract
	addr := uintptr(unsafe.Pointer(&buffer[0]))
	if old != 0 {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(addr)), newSize),
			unsafe.Slice((*byte)(unsafe.Pointer(old)), min(oldSize, newSize)))
	}
	hostAllocations = append(hostAllocations, buffer)
	return addr
}

func releaseHostAllocations() { hostAllocations = nil }

// exportResult is the return area of the exports; exportKeep holds what it points to until
// the host has read it (the post-return functions release it).
var (
	exportResult [handleResultSize / 8]uint64
	exportKeep   []any
)

//go:wasmexport resolvespec:eventbroker/handler@0.1.0#handle
func exportHandle(params uintptr) uintptr {
	event := liftEvent(params)
	context := liftContext(params + eventSize)
	releaseHostAllocations()
	var err error
	if registered == nil {
		err = Fail("no handler registered: call eventbroker.Register in an init function")
	} else {
		err = registered.Handle(event, context)
	}
	result := uintptr(unsafe.Pointer(&exportResult))
	storeHandleResult(result, err, &exportKeep)
	return result
}

//go:wasmexport cabi_post_resolvespec:eventbroker/handler@0.1.0#handle
func postHandle(uintptr) { exportKeep = nil }

//go:wasmexport resolvespec:eventbroker/subscriptions@0.1.0#patterns
func exportPatterns() uintptr {
	var patterns []string
	if registered != nil {
		patterns = registered.Patterns()
	}
	result := uintptr(unsafe.Pointer(&exportResult))
	storePatterns(result, patterns, &exportKeep)
	return result
}

//go:wasmexport cabi_post_resolvespec:eventbroker/subscriptions@0.1.0#patterns
func postPatterns(uintptr) { exportKeep = nil }
