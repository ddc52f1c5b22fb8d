#!/usr/bin/env bash
# Builds dist/{{name}}.wasm: installs the pinned componentize-js (package-lock.json) on first
# use, then runs build.mjs. Node.js comes from toolchains/lib.sh (a copy of eventbroker's).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/toolchains/lib.sh"
ensure_javascript
cd "$here"
if ! cmp -s package-lock.json node_modules/.package-lock.json.installed 2>/dev/null; then
  "$NPM" ci --no-audit --no-fund --loglevel=error
  cp package-lock.json node_modules/.package-lock.json.installed
fi
"$NODE" build.mjs
