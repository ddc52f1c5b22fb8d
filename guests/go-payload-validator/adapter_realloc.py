"""Adds `cabi_realloc_adapter` to the Go core module: memory for the WASI preview1 adapter.

Usage: python3 adapter_realloc.py WASM_TOOLS IN.wasm OUT.wasm

The adapter needs a stack and its state from the first WASI call on, which the Go runtime makes
while it initializes, so neither Go's `cabi_realloc` (the runtime is not running yet) nor
`memory.grow` (Go's heap assumes it alone grows memory) can provide them. The Go side reserves
an array for it (eventbroker/adapter_arena.go); this script finds the array in the module's data
by its marker and adds a bump allocator over it, exported as `cabi_realloc_adapter`, which
`wasm-tools component new` gives the adapter in place of `cabi_realloc`.
"""

import subprocess
import sys

MARKER = b"eventbroker:wasi-adapter-arena:v1"
ARENA_SIZE = 192 << 10  # adapterArenaSize in eventbroker/adapter_arena.go


def leb_u32(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def leb_s32(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if byte & 0x40:
                result -= 1 << shift
            return result, pos


def arena_address(module: bytes) -> int:
    """The linear-memory address of the marker, from the active data segments of memory 0."""
    if module[:8] != b"\0asm\1\0\0\0":
        sys.exit("not a core WebAssembly module")
    found = []
    pos = 8
    while pos < len(module):
        section, pos = module[pos], pos + 1
        size, pos = leb_u32(module, pos)
        end = pos + size
        if section == 11:  # data
            count, p = leb_u32(module, pos)
            for _ in range(count):
                flags, p = leb_u32(module, p)
                if flags not in (0, 2):
                    sys.exit(f"unexpected passive data segment (flags {flags})")
                if flags == 2:
                    _, p = leb_u32(module, p)  # memory index
                if module[p] != 0x41:  # i32.const
                    sys.exit("unexpected data segment offset expression")
                offset, p = leb_s32(module, p + 1)
                if module[p] != 0x0B:
                    sys.exit("unexpected data segment offset expression")
                length, p = leb_u32(module, p + 1)
                data = module[p : p + length]
                start = data.find(MARKER)
                while start != -1:
                    found.append(offset + start)
                    start = data.find(MARKER, start + 1)
                p += length
        pos = end
    if len(found) != 1:
        sys.exit(f"expected the adapter arena marker once in the module's data, found it {len(found)} times")
    return found[0]


def main() -> None:
    wasm_tools, source, target = sys.argv[1:]
    module = open(source, "rb").read()
    start = arena_address(module)
    first, end = start + len(MARKER), start + ARENA_SIZE
    text = subprocess.run([wasm_tools, "print", source], check=True, capture_output=True, text=True).stdout
    close = text.rstrip().rfind(")")
    realloc = f"""
  (global $adapter_arena_next (mut i32) (i32.const {first}))
  (func $cabi_realloc_adapter (param $old i32) (param $old_size i32) (param $align i32) (param $new_size i32) (result i32)
    (local $ptr i32) (local $end i32)
    (if (i32.ne (local.get $old) (i32.const 0)) (then unreachable))
    (local.set $ptr (i32.and (i32.add (global.get $adapter_arena_next) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
    (local.set $end (i32.add (local.get $ptr) (local.get $new_size)))
    (if (i32.gt_u (local.get $end) (i32.const {end})) (then unreachable))
    (global.set $adapter_arena_next (local.get $end))
    (local.get $ptr))
  (export "cabi_realloc_adapter" (func $cabi_realloc_adapter))
"""
    subprocess.run([wasm_tools, "parse", "-o", target], input=text[:close] + realloc + text[close:], check=True, text=True)


if __name__ == "__main__":
    main()
