# Guest toolchains: the one home of their pinned versions and install steps.
#
# Sourced by ../install-toolchains.sh and by each guest's build.sh. Every `ensure_*` function
# is idempotent and returns at once when the pinned version is already in place. Tools go to
# $EVENTBROKER_TOOLCHAINS (default ~/.cache/eventbroker-toolchains), except the C compiler,
# which comes from Debian's packages (apt-get, as root).
#
# After `ensure_<language>`, these variables name the tools:
#   COMPONENTIZE_PY, WASM_TOOLS, GO, WIT_BINDGEN, ADAPTER_REACTOR, CLANG, NODE, NPM

# Pinned versions (Python packages are pinned in requirements.txt beside this file; npm
# packages in each JavaScript guest's package.json and package-lock.json).
WIT_BINDGEN_VERSION=0.63.0
# The preview1 -> WASI 0.2 adapter, from the wasmtime release the host is built with.
ADAPTER_VERSION=48.0.8
CLANG_VERSION=19
NODE_MIN_MAJOR=20

TOOLCHAINS_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLCHAINS=${EVENTBROKER_TOOLCHAINS:-$HOME/.cache/eventbroker-toolchains}

toolchain_note() { printf 'toolchains: %s\n' "$*" >&2; }

# A virtualenv with componentize-py, wasm-tools and Go, (re)installed when requirements.txt
# changed or the virtualenv no longer works (for instance after it was moved).
ensure_venv() {
  local venv=$TOOLCHAINS/venv
  local stamp=$venv/.requirements
  if ! cmp -s "$TOOLCHAINS_LIB_DIR/requirements.txt" "$stamp" 2>/dev/null ||
    ! "$venv/bin/componentize-py" --version >/dev/null 2>&1; then
    toolchain_note "installing $(grep -Eo '^[a-z-]+==[^ ]+' "$TOOLCHAINS_LIB_DIR/requirements.txt" | tr '\n' ' ')into $venv"
    mkdir -p "$TOOLCHAINS"
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$TOOLCHAINS_LIB_DIR/requirements.txt"
    cp "$TOOLCHAINS_LIB_DIR/requirements.txt" "$stamp"
  fi
  COMPONENTIZE_PY=$venv/bin/componentize-py
  WASM_TOOLS=$venv/bin/wasm-tools
  GO=$venv/bin/go
}

# wit-bindgen (its C generator only), built from crates.io into the toolchains directory.
ensure_wit_bindgen() {
  WIT_BINDGEN=$TOOLCHAINS/cargo/bin/wit-bindgen
  if [ "$("$WIT_BINDGEN" --version 2>/dev/null | awk '{print $2}')" != "$WIT_BINDGEN_VERSION" ]; then
    toolchain_note "installing wit-bindgen-cli $WIT_BINDGEN_VERSION (a few minutes)"
    # Outside guests/, whose .cargo/config.toml would make cargo build for wasm32-wasip2.
    mkdir -p "$TOOLCHAINS"
    (cd "$TOOLCHAINS" && cargo install --quiet --locked --force --root "$TOOLCHAINS/cargo" \
        --no-default-features --features c "wit-bindgen-cli@$WIT_BINDGEN_VERSION")
  fi
}

# The WASI preview1 reactor adapter, taken from the wasi-preview1-component-adapter-provider
# crate (fetched by cargo).
ensure_adapter() {
  local dir=$TOOLCHAINS/adapter-$ADAPTER_VERSION
  ADAPTER_REACTOR=$dir/wasi_snapshot_preview1.reactor.wasm
  if [ ! -f "$ADAPTER_REACTOR" ]; then
    toolchain_note "fetching wasi-preview1-component-adapter-provider $ADAPTER_VERSION"
    local project
    project=$(mktemp -d)
    mkdir -p "$project/src"
    : > "$project/src/lib.rs"
    cat > "$project/Cargo.toml" <<TOML
[package]
name = "adapter-fetch"
version = "0.0.0"
edition = "2021"

[dependencies]
wasi-preview1-component-adapter-provider = "=$ADAPTER_VERSION"
TOML
    local crate
    crate=$(cd "$project" && cargo fetch --quiet && cargo metadata --format-version 1 --quiet |
      python3 -c 'import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "wasi-preview1-component-adapter-provider":
        print(p["manifest_path"].rsplit("/", 1)[0])')
    rm -rf "$project"
    mkdir -p "$dir"
    cp "$crate/artefacts/wasi_snapshot_preview1.reactor.wasm" "$ADAPTER_REACTOR.tmp"
    mv "$ADAPTER_REACTOR.tmp" "$ADAPTER_REACTOR"
  fi
}

# clang with the wasm32 backend, lld, wasi-libc and the wasm32 compiler runtime (Debian).
ensure_clang() {
  CLANG=clang-$CLANG_VERSION
  local packages=(clang-$CLANG_VERSION lld-$CLANG_VERSION wasi-libc libclang-rt-$CLANG_VERSION-dev-wasm32)
  local installed
  installed=$(dpkg-query -W -f='${db:Status-Status}\n' "${packages[@]}" 2>/dev/null | grep -cx installed || true)
  [ "$installed" -eq "${#packages[@]}" ] && return 0
  toolchain_note "installing ${packages[*]} with apt-get"
  local sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  # Without package lists (a fresh machine) the first install fails: update them and retry.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null &&
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null; }
}

# Node.js and npm for componentize-js (the machine's own).
ensure_node() {
  NODE=node
  NPM=npm
  local major
  major=$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/')
  if [ -z "$major" ] || [ "$major" -lt "$NODE_MIN_MAJOR" ] || ! command -v npm >/dev/null; then
    toolchain_note "Node.js $NODE_MIN_MAJOR or newer with npm is needed (found: $(node --version 2>/dev/null || echo none))"
    return 1
  fi
}

ensure_rust() {
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
  fi
}

ensure_python() { ensure_venv; }
ensure_javascript() { ensure_node; }
ensure_c() { ensure_clang; ensure_venv; ensure_wit_bindgen; ensure_adapter; }
ensure_go() { ensure_venv; ensure_adapter; }

# The API fuzzer the test suite runs against a live host's /openapi.json (not a guest
# toolchain; it lives here so that one script installs every tool the tests use).
SCHEMATHESIS_VERSION=4.32.5
ensure_api_fuzzer() {
  local venv=$TOOLCHAINS/api-fuzzer
  SCHEMATHESIS=$venv/bin/schemathesis
  if [ "$("$SCHEMATHESIS" --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -1)" != "$SCHEMATHESIS_VERSION" ]; then
    toolchain_note "installing schemathesis==$SCHEMATHESIS_VERSION into $venv"
    mkdir -p "$TOOLCHAINS"
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  fi
}

# The browser the console test drives: Debian's Chromium, through playwright-core from npm
# (no bundled browser download; the test points it at /usr/bin/chromium).
PLAYWRIGHT_CORE_VERSION=1.65.1
ensure_browser() {
  ensure_node
  CHROMIUM=/usr/bin/chromium
  if [ ! -x "$CHROMIUM" ]; then
    toolchain_note "installing chromium with apt-get"
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 ||
      { $sudo apt-get update -q >/dev/null &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  fi
  local dir=$TOOLCHAINS/browser
  local installed
  installed=$("$NODE" -p "require('$dir/node_modules/playwright-core/package.json').version" 2>/dev/null || true)
  if [ "$installed" != "$PLAYWRIGHT_CORE_VERSION" ]; then
    toolchain_note "installing playwright-core@$PLAYWRIGHT_CORE_VERSION into $dir"
    mkdir -p "$dir"
    (cd "$dir" && "$NPM" install --silent --no-save --no-audit --no-fund --ignore-scripts \
      "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null)
  fi
  PLAYWRIGHT_CORE=$dir/node_modules/playwright-core
}
