#!/usr/bin/env bash
# Builds dist/{{name}}.wasm: bindings from `wit-bindgen c`, clang for wasm32-wasi (a reactor
# module), then `wasm-tools component new` with the WASI preview1 reactor adapter. The tools
# are installed on first use by toolchains/lib.sh (a copy of eventbroker's).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/toolchains/lib.sh"
ensure_c
cd "$here"
rm -rf gen
mkdir -p gen dist
"$WIT_BINDGEN" c --world event-handler --out-dir gen wit >/dev/null
"$CLANG" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror \
  -Wl,--strip-debug -Igen -o dist/{{name}}.core.wasm \
  handler.c json.c gen/event_handler.c gen/event_handler_component_type.o
"$WASM_TOOLS" component new dist/{{name}}.core.wasm \
  --adapt "wasi_snapshot_preview1=$ADAPTER_REACTOR" -o dist/{{name}}.wasm
rm dist/{{name}}.core.wasm
echo "wrote dist/{{name}}.wasm"
