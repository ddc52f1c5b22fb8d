#!/usr/bin/env bash
# Builds dist/{{name}}.wasm with standard Go (GOOS=wasip1, a reactor module with
# //go:wasmexport), then `wasm-tools component embed` + `component new` with the preview1
# reactor adapter. Versions: toolchains/lib.sh, a copy of eventbroker's (installed on first use).
#
# First the canonical-ABI glue in eventbroker/ is tested (natively as GOARCH=386, whose
# 32-bit pointers match wasm32). Then adapter_realloc.py gives the WASI adapter memory of its
# own (see eventbroker/adapter_arena.go for why).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/toolchains/lib.sh"
ensure_go

cd "$here"
export GOFLAGS=-trimpath GOTOOLCHAIN=local
GOARCH=386 "$GO" test ./eventbroker/
mkdir -p dist
GOOS=wasip1 GOARCH=wasm "$GO" build -buildmode=c-shared -ldflags=-s -o dist/{{name}}.core.wasm .
python3 adapter_realloc.py "$WASM_TOOLS" dist/{{name}}.core.wasm dist/{{name}}.realloc.wasm
"$WASM_TOOLS" component embed wit --world event-handler \
  dist/{{name}}.realloc.wasm -o dist/{{name}}.embedded.wasm
"$WASM_TOOLS" component new dist/{{name}}.embedded.wasm \
  --adapt "wasi_snapshot_preview1=$ADAPTER_REACTOR" -o dist/{{name}}.wasm
"$WASM_TOOLS" validate dist/{{name}}.wasm
rm dist/{{name}}.core.wasm dist/{{name}}.realloc.wasm dist/{{name}}.embedded.wasm
echo "wrote $here/dist/{{name}}.wasm"
