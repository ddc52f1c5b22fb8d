#!/usr/bin/env bash
# Builds dist/{{name}}.wasm with cargo for the wasm32-wasip2 target (added with rustup when
# it is missing).
set -euo pipefail
cd "$(dirname "$0")"
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "adding the wasm32-wasip2 target (once): rustup target add wasm32-wasip2" >&2
  rustup target add wasm32-wasip2
fi
cargo build --release
mkdir -p dist
cp target/wasm32-wasip2/release/{{crate}}.wasm dist/{{name}}.wasm
echo "wrote dist/{{name}}.wasm"
