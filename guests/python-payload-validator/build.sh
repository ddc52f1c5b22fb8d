#!/usr/bin/env bash
# Builds dist/python-payload-validator.wasm from app.py with componentize-py (the version
# pinned in ../toolchains/requirements.txt, installed on first use).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../toolchains/lib.sh"
ensure_python

mkdir -p "$here/dist"
cd "$here"
"$COMPONENTIZE_PY" --wit-path ../../wit --world event-handler \
  componentize app --output dist/python-payload-validator.wasm
echo "wrote $here/dist/python-payload-validator.wasm"
