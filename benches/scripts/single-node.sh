#!/usr/bin/env bash
# Single-node figures, side by side in one run: raftcache over gRPC (`raftcache bench`)
# and redis-server over RESP (`redis-benchmark`), same concurrency, value size and key
# space, on 127.0.0.1 only. Prints one table with the ratio raftcache / redis.
#
#   benches/scripts/single-node.sh [DURATION_SECONDS] [CONCURRENCY]
#
# Installs redis-server / redis-tools from Debian when missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
CONC=${2:-64}
KEYS=100000
SIZE=100

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "installing redis-server and redis-tools from Debian..." >&2
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --quiet

work=$(mktemp -d)
cleanup() {
  [ -n "${NODE_PID:-}" ] && kill "$NODE_PID" 2>/dev/null || true
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

./target/release/raftcache-node --grpc-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --data-dir "$work/node" >"$work/ready" 2>"$work/node.log" &
NODE_PID=$!
for _ in $(seq 100); do grep -q ready "$work/ready" 2>/dev/null && break; sleep 0.1; done
GRPC=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$work/ready")
[ -n "$GRPC" ] || { echo "node did not start:"; cat "$work/node.log"; exit 1; }

REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

rc() { # ratio op
  ./target/release/raftcache --endpoints "$GRPC" bench --json --duration "${DUR}s" \
    --concurrency "$CONC" --keys "$KEYS" --value-size "$SIZE" --ratio "$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["ops_per_sec"]), r["p99_us"])'
}
rb() { # redis op: requests sized to last about DUR seconds at ~25k/s
  redis-benchmark -p "$REDIS_PORT" -t "$1" -d "$SIZE" -r "$KEYS" -c "$CONC" -n $((DUR * 25000)) -P 1 --csv |
    python3 -c 'import csv,sys; rows=list(csv.reader(sys.stdin)); print(round(float(rows[1][1])), round(float(rows[1][6])*1000))'
}

read -r rc_set rc_set_p99 < <(rc 1:0)
read -r rc_get rc_get_p99 < <(rc 0:1)
read -r rb_set rb_set_p99 < <(rb set)
read -r rb_get rb_get_p99 < <(rb get)

printf '%-6s %16s %16s %8s %18s %18s\n' op "raftcache ops/s" "redis ops/s" ratio "raftcache p99 µs" "redis p99 µs"
for op in set get; do
  a=rc_$op; b=rb_$op; ap=rc_${op}_p99; bp=rb_${op}_p99
  printf '%-6s %16s %16s %8s %18s %18s\n' "$op" "${!a}" "${!b}" \
    "$(python3 -c "print(f'{${!a}/${!b}:.2f}')")" "${!ap}" "${!bp}"
done
echo "($(nproc) cores, concurrency $CONC, $SIZE-byte values, $KEYS keys, ${DUR}s each; $(date -u +%F))"
