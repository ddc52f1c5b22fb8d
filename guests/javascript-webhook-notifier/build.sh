#!/usr/bin/env bash
# Builds dist/javascript-webhook-notifier.wasm from handler.js with componentize-js (the
# version pinned in package.json and package-lock.json, installed by `npm ci` on first use).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../toolchains/lib.sh"
ensure_javascript

cd "$here"
# Reinstall when the lock file changed since the last install.
if ! cmp -s package-lock.json node_modules/.package-lock.json.installed 2>/dev/null; then
  "$NPM" ci --no-audit --no-fund --loglevel=error
  cp package-lock.json node_modules/.package-lock.json.installed
fi
"$NODE" build.mjs
