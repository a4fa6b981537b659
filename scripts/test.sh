#!/usr/bin/env bash
# The whole test suite: unit and simulation tests of the core, then real-process field tests.
# Field tests start the real binaries, so they are built first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
cargo build --workspace --bins --locked
cargo test --workspace --locked
