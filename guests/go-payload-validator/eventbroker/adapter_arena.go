//go:build wasip1

package eventbroker

// Memory for the WASI preview1 adapter.
//
// The adapter that turns this preview1 module into a WASI 0.2 component needs about 128 KiB
// of its own (a stack and its state) from the first WASI call on, which the Go runtime makes
// while it initializes. It cannot take that memory from Go's allocator (the runtime is not
// running yet), nor grow the memory itself (Go's heap assumes that it alone grows linear
// memory, so it would hand the same pages out again). So it takes it from this array, which
// Go never touches: ../build.sh finds the array in the compiled module by its marker and adds
// a small `cabi_realloc_adapter` function (a bump allocator over the array) that
// `wasm-tools component new` gives the adapter instead of Go's `cabi_realloc`.

import "unsafe"

const adapterArenaSize = 192 << 10

// adapterArena starts with the marker "eventbroker:wasi-adapter-arena:v1" (spelled out so that
// the linker writes the array into the module's data, where the build can find its address).
var adapterArena = [adapterArenaSize]byte{
	'e', 'v', 'e', 'n', 't', 'b', 'r', 'o', 'k', 'e', 'r', ':', 'w', 'a', 's', 'i', '-', 'a', 'd', 'a', 'p', 't', 'e', 'r', '-', 'a', 'r', 'e', 'n', 'a', ':', 'v', '1',
}

// adapterArenaUsed keeps the array in the module: the linker drops unreferenced data.
var adapterArenaUsed uintptr

func init() { adapterArenaUsed = uintptr(unsafe.Pointer(&adapterArena)) }
