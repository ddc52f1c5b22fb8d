#!/usr/bin/env bash
# Builds dist/go-payload-validator.wasm with standard Go (GOOS=wasip1, a reactor module with
# //go:wasmexport), then `wasm-tools component embed` + `component new` with the preview1
# reactor adapter. Versions: ../toolchains/lib.sh (installed on first use).
#
# First the canonical-ABI glue in eventbroker/ is tested (natively as GOARCH=386, whose
# 32-bit pointers match wasm32). Then adapter_realloc.py gives the WASI adapter memory of its
# own (see eventbroker/adapter_arena.go for why).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../toolchains/lib.sh"
ensure_go

cd "$here"
export GOFLAGS=-trimpath GOTOOLCHAIN=local
GOARCH=386 "$GO" test ./eventbroker/
mkdir -p dist
GOOS=wasip1 GOARCH=wasm "$GO" build -buildmode=c-shared -ldflags=-s -o dist/go-payload-validator.core.wasm .
python3 adapter_realloc.py "$WASM_TOOLS" dist/go-payload-validator.core.wasm dist/go-payload-validator.realloc.wasm
"$WASM_TOOLS" component embed ../../wit --world event-handler \
  dist/go-payload-validator.realloc.wasm -o dist/go-payload-validator.embedded.wasm
"$WASM_TOOLS" component new dist/go-payload-validator.embedded.wasm \
  --adapt "wasi_snapshot_preview1=$ADAPTER_REACTOR" -o dist/go-payload-validator.wasm
"$WASM_TOOLS" validate dist/go-payload-validator.wasm
rm dist/go-payload-validator.core.wasm dist/go-payload-validator.realloc.wasm dist/go-payload-validator.embedded.wasm
echo "wrote $here/dist/go-payload-validator.wasm"
