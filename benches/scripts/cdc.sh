#!/usr/bin/env bash
# CDC figures on 127.0.0.1: commit→invalidated lag p50/p99 at 1000 tx/s (pgbench --rate,
# plus an independent probe) and the maximum sustained row changes/s the raftcache-cdc
# worker applies (unthrottled pgbench of 100-row UPDATEs), for R=1 (one node) and R=3
# (three nodes). A throwaway PostgreSQL 15 is started and removed by the benchmark.
# Builds the release binaries, then runs `cdc-bench`; the markdown table goes to
# stdout, progress to stderr.
#
#   benches/scripts/cdc.sh [SECS] [WAIT_QUIET]
#
# SECS: seconds per load (default 10). WAIT_QUIET: before each cluster, wait up to this
# many seconds for other processes (e.g. a build on the same cores) to go quiet (default
# 30); runs that share the CPU with them anyway are flagged in the table.
#
# Any other cdc-bench flag can be passed through CDC_BENCH_ARGS, e.g.
#   CDC_BENCH_ARGS="--replicas 1 --modes invalidate,update --log-dir /tmp/cdc-logs"
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
WAIT_QUIET=${2:-30}

cargo build --release --quiet -p raftcache-node --bin raftcache-node \
  -p raftcache-cdc --bin raftcache-cdc -p raftcache-benches --bin cdc-bench

# shellcheck disable=SC2086
./target/release/cdc-bench --secs "$SECS" --wait-quiet "$WAIT_QUIET" \
  --node-bin ./target/release/raftcache-node --cdc-bin ./target/release/raftcache-cdc \
  ${CDC_BENCH_ARGS:-}
echo "($(nproc) cores, $(date -u +%F))"
