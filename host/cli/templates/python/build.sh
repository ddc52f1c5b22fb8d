#!/usr/bin/env bash
# Builds dist/{{name}}.wasm from app.py with componentize-py (installed on first use by
# toolchains/lib.sh, a copy of eventbroker's guests/toolchains/lib.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/toolchains/lib.sh"
ensure_python
cd "$here"
mkdir -p dist
"$COMPONENTIZE_PY" --wit-path wit --world event-handler componentize app --output dist/{{name}}.wasm
echo "wrote dist/{{name}}.wasm"
