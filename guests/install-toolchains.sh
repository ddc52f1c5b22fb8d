#!/usr/bin/env bash
# Installs the pinned toolchains that build the example guests, for the languages named on
# the command line (rust, python, javascript, c, go; api-fuzzer, the test suite's OpenAPI
# fuzzer; browser, Chromium and playwright-core for the console test; default: all). Idempotent: a toolchain
# already at its pinned version is left alone, so a second run takes a second or two.
#
# Versions and install steps: toolchains/lib.sh and toolchains/requirements.txt.
# Tools go to $EVENTBROKER_TOOLCHAINS (default ~/.cache/eventbroker-toolchains); clang,
# lld and wasi-libc come from Debian's packages (apt-get, needs root or sudo).
set -euo pipefail
source "$(dirname "$0")/toolchains/lib.sh"

languages=("$@")
[ ${#languages[@]} -gt 0 ] || languages=(rust python javascript c go api-fuzzer browser)
for language in "${languages[@]}"; do
  case $language in
    rust | python | javascript | c | go) "ensure_$language" ;;
    api-fuzzer) ensure_api_fuzzer ;;
    browser) ensure_browser ;;
    *) echo "unknown language '$language' (expected rust, python, javascript, c, go, api-fuzzer or browser)" >&2; exit 2 ;;
  esac
done
echo "toolchains ready for: ${languages[*]} (in $TOOLCHAINS)"
