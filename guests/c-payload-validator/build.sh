#!/usr/bin/env bash
# Builds dist/c-payload-validator.wasm: C bindings from `wit-bindgen c`, clang for
# wasm32-wasi (a preview1 reactor module), then `wasm-tools component new` with the preview1
# reactor adapter. Versions: ../toolchains/lib.sh (installed on first use).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../toolchains/lib.sh"
ensure_c

cd "$here"
rm -rf gen
mkdir -p gen dist
"$WIT_BINDGEN" c --world event-handler --out-dir gen ../../wit >/dev/null
"$CLANG" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror \
  -Wl,--strip-debug -Igen \
  -o dist/c-payload-validator.core.wasm \
  handler.c json.c gen/event_handler.c gen/event_handler_component_type.o
"$WASM_TOOLS" component new dist/c-payload-validator.core.wasm \
  --adapt "wasi_snapshot_preview1=$ADAPTER_REACTOR" -o dist/c-payload-validator.wasm
"$WASM_TOOLS" validate dist/c-payload-validator.wasm
echo "wrote $here/dist/c-payload-validator.wasm"
