#!/usr/bin/env bash
# The whole test suite: unit and simulation tests of the core, then real-process field tests.
# Field tests start the real binaries, so they are built first; the interop test also needs
# Node.js 20+ and npm.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
cargo build --workspace --bins --locked
# The automerge-repo interop test runs the real npm packages, pinned by package-lock.json.
# Without npm the install is skipped and that test fails, saying what is missing.
interop=field-tests/interop
if [ ! -d "$interop/node_modules" ] || [ "$interop/package-lock.json" -nt "$interop/node_modules/.package-lock.json" ]; then
  if command -v npm >/dev/null; then
    (cd "$interop" && npm ci --no-audit --no-fund)
  else
    echo "npm not found: cannot install $interop; the automerge-repo interop test will fail" >&2
  fi
fi
cargo test --workspace --locked
