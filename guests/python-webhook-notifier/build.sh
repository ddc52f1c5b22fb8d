#!/usr/bin/env bash
# Builds dist/python-webhook-notifier.wasm from app.py with componentize-py (the version pinned
# in ../toolchains/requirements.txt, installed on first use).
#
# The world (wit/world.wit) is the host's `handler-only` plus wasi:http/outgoing-handler: the
# standard WASI WIT is in wit/deps; the host's contract is copied in from ../../wit at each
# build, so it is never out of date.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../toolchains/lib.sh"
ensure_python

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -r "$here/wit" "$build/wit"
mkdir -p "$build/wit/deps/eventbroker" "$build/wit/deps/keyvalue"
cp "$here/../../wit/eventbroker.wit" "$build/wit/deps/eventbroker/"
cp "$here/../../wit/deps/keyvalue/"*.wit "$build/wit/deps/keyvalue/"

mkdir -p "$here/dist"
cd "$here"
"$COMPONENTIZE_PY" --wit-path "$build/wit" --world python-webhook-notifier \
  componentize app --output dist/python-webhook-notifier.wasm
echo "wrote $here/dist/python-webhook-notifier.wasm"
