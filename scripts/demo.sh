#!/usr/bin/env bash
# Builds Cairn, starts a hub and two edge agents on localhost, writes on one agent and reads
# the document back from the other. Runs until Ctrl-C. No prior setup: development
# certificates are generated on first start under the demo directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
profile="${CAIRN_PROFILE:-release}"
demo_dir="${CAIRN_DEMO_DIR:-$PWD/cairn-data/demo}"
hub_port="${CAIRN_HUB_PORT:-7700}"

echo "building ($profile)..." >&2
if [ "$profile" = release ]; then cargo build --release --bins --quiet; else cargo build --bins --quiet; fi
bin="$CARGO_TARGET_DIR/$profile"
mkdir -p "$demo_dir"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

start() { # name, ready-line file, command...
  local name=$1 out="$demo_dir/$1.out"; shift
  "$@" >"$out" 2>"$demo_dir/$name.log" &
  pids+=($!)
  for _ in $(seq 1 200); do
    if grep -q ready "$out" 2>/dev/null; then sed -n 1p "$out"; return 0; fi
    sleep 0.05
  done
  echo "$name did not start; see $demo_dir/$name.log" >&2
  exit 1
}
field() { tr ' ' '\n' | sed -n "s/^$1=//p"; }

common=(--ca-dir "$demo_dir/ca")
hub_line=$(start hub "$bin/cloud-hub" "${common[@]}" --data-dir "$demo_dir/hub" \
  --listen "127.0.0.1:$hub_port" --http-listen 127.0.0.1:0)
a_line=$(start agent-a "$bin/edge-agent" "${common[@]}" --data-dir "$demo_dir/agent-a" \
  --hub "127.0.0.1:$hub_port" --api-listen 127.0.0.1:0)
b_line=$(start agent-b "$bin/edge-agent" "${common[@]}" --data-dir "$demo_dir/agent-b" \
  --hub "127.0.0.1:$hub_port" --api-listen 127.0.0.1:0)
a_api=$(echo "$a_line" | field api)
b_api=$(echo "$b_line" | field api)

echo
echo "hub:     $(echo "$hub_line" | field http) (metrics, health), QUIC on 127.0.0.1:$hub_port"
echo "agent A: $a_api"
echo "agent B: $b_api"
echo
echo "\$ curl -s -X POST $a_api/v1/collections/notes/docs -d '{\"title\":\"hello from A\",\"tags\":[\"demo\"]}'"
created=$(curl -s -X POST "$a_api/v1/collections/notes/docs" -d '{"title":"hello from A","tags":["demo"]}')
echo "$created"
id=$(echo "$created" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
echo
echo "\$ curl -s $b_api/v1/docs/$id"
for _ in $(seq 1 100); do
  answer=$(curl -s "$b_api/v1/docs/$id")
  case "$answer" in *'"doc"'*) break ;; esac
  sleep 0.1
done
echo "$answer"
echo
echo "edit on A:  curl -s -X POST $a_api/v1/docs/$id/ops -d '{\"ops\":[{\"op\":\"splice\",\"path\":[\"title\"],\"index\":0,\"text\":\"Hi, \"}]}'"
echo "running; Ctrl-C stops the hub and both agents (data stays in $demo_dir)"
wait
