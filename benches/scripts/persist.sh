#!/usr/bin/env bash
# Persistence figures on 127.0.0.1, side by side in one run: save (admin snapshot) and
# load (SIGTERM checkpoint + restart) of 1M keys of 100 B on one raftcache node vs Redis
# BGSAVE and restart, set latency while a snapshot runs, and write throughput of 3-node
# clusters (R=3) with --persistence none / snapshot / durable. Builds the release
# binaries, installs redis-server from Debian if it is missing, then runs
# `persist-bench`; the plain-text table goes to stdout, progress to stderr.
#
#   benches/scripts/persist.sh [KEYS] [SECS]     (defaults: 1000000 keys, 8 s windows)
#
# Any other persist-bench flag can be passed through PERSIST_BENCH_ARGS, e.g.
#   PERSIST_BENCH_ARGS="--json /tmp/persist.json --parts save,redis"
set -euo pipefail
cd "$(dirname "$0")/../.."
KEYS=${1:-1000000}
SECS=${2:-8}

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "installing redis-server (Debian package) ..." >&2
  SUDO=
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >&2
  # The package starts a system-wide instance on port 6379; the benchmark starts its
  # own servers on free ports and does not need it.
fi

cargo build --release --quiet -p raftcache-node --bin raftcache-node \
  -p raftcache-benches --bin persist-bench

# shellcheck disable=SC2086
./target/release/persist-bench --keys "$KEYS" --secs "$SECS" \
  --node-bin ./target/release/raftcache-node ${PERSIST_BENCH_ARGS:-}
echo "($(nproc) cores, $(date -u +%F))"
