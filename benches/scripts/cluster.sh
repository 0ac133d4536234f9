#!/usr/bin/env bash
# Replication figures on local 3-node clusters (127.0.0.1 only): write throughput
# R=1 vs R=3 at P=16 and 64, reads per consistency level, failover after SIGKILL of
# the busiest leader, and idle CPU. Builds the release binaries, then runs
# `cluster-bench all`; the markdown tables go to stdout, progress to stderr.
#
#   benches/scripts/cluster.sh [SECS] [TRIALS]     (defaults: 10 s windows, 20 trials)
#
# Any other cluster-bench flag can be passed through CLUSTER_BENCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
TRIALS=${2:-20}

cargo build --release --quiet -p raftcache-node --bin raftcache-node \
  -p raftcache-benches --bin cluster-bench

# shellcheck disable=SC2086
./target/release/cluster-bench all --secs "$SECS" --trials "$TRIALS" \
  --node-bin ./target/release/raftcache-node ${CLUSTER_BENCH_ARGS:-}
echo "($(nproc) cores, $(date -u +%F))"
