#!/usr/bin/env bash
# raftcache next to redis-server, memcached and etcd: one run, one table.
#
#   benches/compare/run.sh [--quick] [--only LIST] [--out FILE] [--keep-going]
#                          [--requests N] [--secs S] [--no-build]
#
# Installs what is missing (Debian/Ubuntu, apt-get), builds the raftcache release
# binaries, starts every server on 127.0.0.1 (free ports, temporary data directories),
# drives each with a bounded load at concurrency 50, 100-byte values and a
# 100 000-key space, and prints one markdown table with GET/SET ops/s and the ratio
# to redis-server at the same pipelining depth, measured in the same run. The exact
# commands and the machine's facts follow the table. See benches/compare/README.md.
#
# Servers run on core 0 and load generators on core 1 (taskset), when the machine
# has two cores or more. Everything the script starts is stopped when it exits.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benches/compare/run.sh [options]

  --quick          smoke run: 20 000 requests per redis-benchmark test, 3 s loads
  --only LIST      rows to run, comma-separated, from:
                   redis,raftcache1,raftcache3,grpc,memcached,etcd (default: all)
  --out FILE       also write the table (markdown) to FILE
  --keep-going     a row that fails is reported as failed, the others still run
                   (the exit status is 1 all the same)
  --requests N     redis-benchmark -n for every RESP row (default: calibrated from a
                   pilot run so the slower test lasts ~8 s, at most 300 000 at -P 1
                   and 2 000 000 at -P 16; env COMPARE_REQUESTS)
  --secs S         length of the timed loads (raftcache bench, memcached, etcd)
                   (default 10, 3 with --quick; env COMPARE_SECS)
  --no-build       use the raftcache release binaries already built
  env COMPARE_NODE_BIN, COMPARE_CLI_BIN: raftcache-node and raftcache binaries to use
                   instead of building (both or neither)
  -h, --help       this text
EOF
}

die() {
    printf 'benches/compare/run.sh: %s\n' "$*" >&2
    exit 2
}
log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------- options
ALL_ROWS=redis,raftcache1,raftcache3,grpc,memcached,etcd
QUICK=0
ONLY=$ALL_ROWS
OUT=
KEEP_GOING=0
REQUESTS=${COMPARE_REQUESTS:-}
SECS=${COMPARE_SECS:-}
BUILD=1
while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --only) ONLY=${2:?--only needs a list} && shift ;;
    --only=*) ONLY=${1#*=} ;;
    --out) OUT=${2:?--out needs a file} && shift ;;
    --out=*) OUT=${1#*=} ;;
    --keep-going) KEEP_GOING=1 ;;
    --requests) REQUESTS=${2:?--requests needs a number} && shift ;;
    --requests=*) REQUESTS=${1#*=} ;;
    --secs) SECS=${2:?--secs needs a number} && shift ;;
    --secs=*) SECS=${1#*=} ;;
    --no-build) BUILD=0 ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && die "unknown argument: $1" ;;
    esac
    shift
done
[[ -z $REQUESTS || $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "--requests wants a positive integer, not '$REQUESTS'"
[[ -z $SECS || $SECS =~ ^[1-9][0-9]*$ ]] || die "--secs wants a positive integer, not '$SECS'"
if [[ -z $SECS ]]; then
    if ((QUICK)); then SECS=3; else SECS=10; fi
fi
declare -A WANT=()
IFS=, read -r -a only_list <<<"$ONLY"
for row in "${only_list[@]}"; do
    [[ ,$ALL_ROWS, == *",$row,"* ]] || die "--only: unknown row '$row' (known: $ALL_ROWS)"
    WANT[$row]=1
done
want() { [[ -n ${WANT[$1]:-} ]]; }

# The workload, the same for every row.
CONC=50          # connections / tasks in flight
VALUE_SIZE=100   # bytes per value
KEYS=100000      # key space
PIPELINES=(1 16) # redis-benchmark -P
QUICK_N=20000    # redis-benchmark -n with --quick, and the pilot run's -n
TARGET_SECS=8    # what a calibrated redis-benchmark test aims at
declare -A MAX_N=([1]=300000 [16]=2000000)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
# The raftcache binaries read RAFTCACHE_* (config file, endpoints, ...): keep the
# figures independent of the caller's environment.
for var in "${!RAFTCACHE_@}"; do unset "$var"; done

# ---------------------------------------------------------------------------- cleanup
WORK=$(mktemp -d "${TMPDIR:-/tmp}/raftcache-compare.XXXXXX")
touch "$WORK/pids" "$WORK/clients" "$WORK/results.tsv" "$WORK/notes.md" "$WORK/commands.sh" "$WORK/ports"

# Whether PID is a live (not zombie) process.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Stops process group PID (every server is started as its own group leader): TERM,
# up to 5 s, then KILL; reaps it when it is our child.
stop_group() {
    local pid=$1 i
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "pid $pid ignored SIGTERM for 5 s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    sed -i "/^$pid\$/d" "$WORK/pids" 2>/dev/null || true
}

# Stops every server this run started and still knows about, newest first.
stop_all() {
    local pid
    [[ -f $WORK/pids ]] || return 0
    for pid in $(tac "$WORK/pids"); do stop_group "$pid"; done
}

# The processes under PID that are copies of this shell (subshells), deepest first.
subshells() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        subshells "$child"
        [[ $(cat "/proc/$child/comm" 2>/dev/null) != bash ]] || echo "$child"
    done
}

ROW_PID= # the subshell running the current row
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    if [[ -n $ROW_PID ]] && alive "$ROW_PID"; then
        # The row's shell and its subshells (command substitutions) die first, so
        # that none of them goes on to start anything.
        for pid in $(subshells "$ROW_PID") "$ROW_PID"; do kill -KILL "$pid" 2>/dev/null || true; done
        wait "$ROW_PID" 2>/dev/null || true
    fi
    if [[ -f $WORK/clients ]]; then
        while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$WORK/clients"
    fi
    stop_all
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------- install
# apt package -> the commands it provides that we use.
declare -A PKG_CMDS=(
    [python3]="python3"
    [util-linux]="taskset setsid"
    [redis-server]="redis-server"
    [redis-tools]="redis-benchmark redis-cli"
    [memcached]="memcached"
    [libmemcached-tools]="memcaslap|memaslap"
    [etcd-server]="etcd"
    [etcd-client]="etcdctl"
    [wrk]="wrk"
)
declare -A UNAVAILABLE=() # package -> why it could not be installed

have_cmds() { # "a b|c": a, and b or c
    local spec=$1 word alt ok
    for word in $spec; do
        ok=0
        IFS='|' read -r -a alts <<<"$word"
        for alt in "${alts[@]}"; do
            if command -v "$alt" >/dev/null 2>&1; then ok=1 && break; fi
        done
        ((ok)) || return 1
    done
}

ensure_packages() {
    local pkg missing=() installable=()
    for pkg in "$@"; do
        have_cmds "${PKG_CMDS[$pkg]}" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "missing ${missing[*]} and there is no apt-get: install them by hand (this script knows Debian/Ubuntu only)"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || die "missing ${missing[*]}: run as root (or with sudo) so that apt-get can install them"
        sudo=(sudo)
    fi
    log "installing with apt-get: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
        die "apt-get update failed (are Debian's package mirrors reachable?)"
    for pkg in "${missing[@]}"; do
        if apt-cache show "$pkg" >/dev/null 2>&1; then
            installable+=("$pkg")
        else
            UNAVAILABLE[$pkg]="no package $pkg in this system's apt sources"
            log "not available: $pkg (${UNAVAILABLE[$pkg]})"
        fi
    done
    if ((${#installable[@]})); then
        log "apt-get -y install ${installable[*]}"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0 \
            install --no-install-recommends "${installable[@]}" >&2 ||
            die "apt-get install ${installable[*]} failed"
    fi
    for pkg in "${installable[@]}"; do
        have_cmds "${PKG_CMDS[$pkg]}" || UNAVAILABLE[$pkg]="installed $pkg but it does not provide ${PKG_CMDS[$pkg]}"
    done
    # Debian's packages may start their own service: ours run on other ports, and we
    # leave the system's services alone.
}

pkgs=(python3 util-linux)
if want redis || want raftcache1 || want raftcache3; then pkgs+=(redis-tools); fi
want redis && pkgs+=(redis-server)
want memcached && pkgs+=(memcached libmemcached-tools)
want etcd && pkgs+=(etcd-server etcd-client wrk)
ensure_packages "${pkgs[@]}"
for pkg in python3 redis-tools; do
    [[ -z ${UNAVAILABLE[$pkg]:-} ]] || die "${UNAVAILABLE[$pkg]} (needed: ${PKG_CMDS[$pkg]})"
done
MEMASLAP=$(command -v memcaslap || command -v memaslap || true)

CORES=$(nproc)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
if ((CORES >= 2)) && command -v taskset >/dev/null 2>&1; then
    SERVER_PIN=(taskset -c 0)
    CLIENT_PIN=(taskset -c 1)
    PINNED=1
else
    SERVER_PIN=()
    CLIENT_PIN=()
    PINNED=0
fi

# ---------------------------------------------------------------------------- build
NODE_BIN=
CLI_BIN=
RESP_SUPPORTED=0
if want raftcache1 || want raftcache3 || want grpc; then
    if [[ -n ${COMPARE_NODE_BIN:-} || -n ${COMPARE_CLI_BIN:-} ]]; then
        # Binaries given by the caller (e.g. a debug build while developing this script).
        NODE_BIN=${COMPARE_NODE_BIN:?COMPARE_CLI_BIN wants COMPARE_NODE_BIN too}
        CLI_BIN=${COMPARE_CLI_BIN:?COMPARE_NODE_BIN wants COMPARE_CLI_BIN too}
        log "using $NODE_BIN and $CLI_BIN (COMPARE_NODE_BIN, COMPARE_CLI_BIN): not building"
    else
        command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH (needed to build raftcache)"
        if ((BUILD)); then
            log "cargo build --release -p raftcache-node -p raftcache-client"
            cargo build --release -p raftcache-node -p raftcache-client >&2 ||
                die "cargo build --release failed"
        fi
        target_dir=$(cargo metadata --format-version 1 --no-deps |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') ||
            die "cargo metadata failed"
        NODE_BIN=$target_dir/release/raftcache-node
        CLI_BIN=$target_dir/release/raftcache
    fi
    [[ -x $NODE_BIN && -x $CLI_BIN ]] || die "no raftcache binaries at $NODE_BIN and $CLI_BIN (drop --no-build?)"
    if "$NODE_BIN" --help 2>/dev/null | grep -q -- '--resp-addr'; then RESP_SUPPORTED=1; fi
fi

# ---------------------------------------------------------------------------- helpers
# A free TCP port on 127.0.0.1, never one handed out before in this run.
free_port() {
    local port i
    for ((i = 0; i < 50; i++)); do
        port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')
        if ! grep -qx "$port" "$WORK/ports"; then
            echo "$port" >>"$WORK/ports"
            echo "$port"
            return 0
        fi
    done
    return 1
}

# Appends a command to the list printed under the table: label, then the command.
record_cmd() {
    local label=$1 arg line=
    shift
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            line+=" $arg"
        else
            line+=" $(printf '%q' "$arg")"
        fi
    done
    printf '# %s\n%s\n' "$label" "${line# }" >>"$WORK/commands.sh"
}
# A note under the table: ORDER (notes are sorted by it, stably), then the text.
note() {
    local order=$1
    shift
    printf '%s\t- %s\n' "$order" "$*" >>"$WORK/notes.md"
}

# A result row: SORT TARGET TOOL P GET SET STATUS (status: ok, na or failed; for na
# and failed, GET holds the reason).
emit() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/results.tsv"
}

# Inside a row's subshell: give up on the row.
fail() {
    printf '%s\n' "$*" >"$WORK/reason"
    log "FAILED: $*"
    exit 1
}

# Starts a server as its own process group on the server core. Sets SERVER_PID; its
# output goes to $WORK/NAME.out and NAME.err.
start_server() {
    local name=$1
    shift
    record_cmd "$name" "${SERVER_PIN[@]}" "$@"
    setsid "${SERVER_PIN[@]}" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" </dev/null &
    SERVER_PID=$!
    echo "$SERVER_PID" >>"$WORK/pids"
    ROW_PIDS+=("$SERVER_PID")
}

tail_logs() {
    local name=$1
    tail -n 15 "$WORK/$name.err" "$WORK/$name.out" 2>/dev/null | sed 's/^/    /' >&2 || true
}

# Runs a command on the client core in the background, bounded by a timeout, and
# waits for it (so that the run can stop it at once on exit). Returns its status.
run_bounded() {
    local limit=$1 pid rc=0
    shift
    timeout -k 5 "$limit" "${CLIENT_PIN[@]}" "$@" &
    pid=$!
    echo "$pid" >>"$WORK/clients"
    wait "$pid" || rc=$?
    sed -i "/^$pid\$/d" "$WORK/clients"
    return "$rc"
}

# run_bounded, and records the command for the list under the table.
run_client() {
    local label=$1 limit=$2
    shift 2
    record_cmd "$label" "${CLIENT_PIN[@]}" "$@"
    run_bounded "$limit" "$@"
}

# Waits until something answers on 127.0.0.1:PORT (bounded), or the process died.
wait_port() {
    local name=$1 pid=$2 port=$3 secs=${4:-30} i
    for ((i = 0; i < secs * 10; i++)); do
        alive "$pid" || {
            tail_logs "$name"
            fail "$name exited at start"
        }
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    tail_logs "$name"
    fail "$name did not listen on 127.0.0.1:$port within ${secs}s"
}

# Sets RPS_GET and RPS_SET from redis-benchmark --csv output in FILE.
parse_redis_csv() {
    local file=$1
    RPS_GET=$(awk -F'"' '$2 == "GET" { print $4 }' "$file" | tail -n 1)
    RPS_SET=$(awk -F'"' '$2 == "SET" { print $4 }' "$file" | tail -n 1)
    [[ -n $RPS_GET && -n $RPS_SET ]]
}

# redis-benchmark against 127.0.0.1:PORT at -P 1 and -P 16; emits one row for each.
resp_rows() {
    local sort=$1 target=$2 port=$3 p n out pilot
    local probe
    probe=$(timeout 10 redis-cli -h 127.0.0.1 -p "$port" SET compare:probe ok 2>&1 &&
        timeout 10 redis-cli -h 127.0.0.1 -p "$port" GET compare:probe 2>&1) || true
    [[ $probe == $'OK\nok' ]] || fail "$target: SET/GET probe with redis-cli failed: $(head -c 300 <<<"$probe")"
    for p in "${PIPELINES[@]}"; do
        if [[ -n $REQUESTS ]]; then
            n=$REQUESTS
        elif ((QUICK)); then
            n=$QUICK_N
        else
            # Pilot: the same test, short, to pick -n so the slower of GET and SET lasts
            # about TARGET_SECS (also writes most keys before the measured run).
            pilot=$WORK/pilot.csv
            run_bounded 300 redis-benchmark -h 127.0.0.1 -p "$port" -t get,set \
                -d "$VALUE_SIZE" -r "$KEYS" -c "$CONC" -n "$QUICK_N" -P "$p" -q --csv -e >"$pilot" 2>&1 ||
                fail "$target: pilot redis-benchmark -P $p failed: $(tail -n 3 "$pilot")"
            parse_redis_csv "$pilot" || fail "$target: no GET/SET figures in the pilot's output: $(tail -n 3 "$pilot")"
            n=$(awk -v g="$RPS_GET" -v s="$RPS_SET" -v t="$TARGET_SECS" -v lo="$QUICK_N" -v hi="${MAX_N[$p]}" 'BEGIN {
                r = (g < s ? g : s) * t; r = int(r / 10000 + 0.5) * 10000
                if (r < lo) r = lo; if (r > hi) r = hi; print r }')
        fi
        out=$WORK/redis-benchmark.csv
        log "$target: redis-benchmark -P $p -n $n"
        run_client "$target, -P $p" 900 redis-benchmark -h 127.0.0.1 -p "$port" -t get,set \
            -d "$VALUE_SIZE" -r "$KEYS" -c "$CONC" -n "$n" -P "$p" -q --csv -e >"$out" 2>&1 ||
            fail "$target: redis-benchmark -P $p failed or timed out: $(tail -n 3 "$out")"
        if grep -q '^Error from server' "$out"; then
            fail "$target: the server answered with errors: $(grep -m 3 '^Error from server' "$out" | tr '\n' ' ')"
        fi
        parse_redis_csv "$out" || fail "$target: no GET/SET figures in redis-benchmark's output: $(tail -n 3 "$out")"
        emit "$sort.$p" "$target" "redis-benchmark" "$p" "$RPS_GET" "$RPS_SET" ok
    done
}

# ---------------------------------------------------------------------------- rows
row_redis() {
    local port
    port=$(free_port)
    start_server redis-server redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --protected-mode no --daemonize no --logfile ''
    wait_port redis-server "$SERVER_PID" "$port"
    local version
    version=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
    resp_rows 10 "redis-server $version" "$port"
    note 20 "redis-server $version: \`--save '' --appendonly no\` (in memory only), one I/O thread (its default)."
}

# Starts a raftcache node. NAME, then extra flags. Sets NODE_GRPC, NODE_RESP.
start_node() {
    local name=$1
    shift
    local grpc metrics resp args
    grpc=$(free_port)
    metrics=$(free_port)
    args=(--grpc-addr "127.0.0.1:$grpc" --metrics-addr "127.0.0.1:$metrics" --data-dir "$WORK/$name-data")
    NODE_RESP=
    if ((RESP_SUPPORTED)); then
        resp=$(free_port)
        args+=(--resp-addr "127.0.0.1:$resp")
        NODE_RESP=127.0.0.1:$resp
    fi
    start_server "$name" "$NODE_BIN" "${args[@]}" "$@"
    local pid=$SERVER_PID i ready=
    for ((i = 0; i < 300; i++)); do
        ready=$(grep -m 1 '"event":"ready"' "$WORK/$name.out" 2>/dev/null || true)
        [[ -z $ready ]] || break
        alive "$pid" || {
            tail_logs "$name"
            fail "$name exited before its ready line"
        }
        sleep 0.1
    done
    [[ -n $ready ]] || {
        tail_logs "$name"
        fail "$name printed no ready line within 30 s"
    }
    # The ready line has the addresses actually bound.
    read -r NODE_GRPC ready_resp < <(python3 -c 'import json, sys
d = json.loads(sys.argv[1])
print(d.get("grpc", ""), d.get("resp", "-"))' "$ready")
    [[ -n $NODE_GRPC ]] || fail "$name: no grpc address in its ready line: $ready"
    if ((RESP_SUPPORTED)); then
        if [[ $ready_resp == - ]]; then
            log "$name: the ready line has no \"resp\"; using $NODE_RESP"
        else
            NODE_RESP=$ready_resp
        fi
    fi
}

# Waits (60 s at most) until the cluster behind ENDPOINT lists NODES active nodes and
# every partition has a leader, REPLICAS voters and no learners.
wait_cluster() {
    local endpoint=$1 nodes=$2 replicas=$3 i why=
    for ((i = 0; i < 120; i++)); do
        if "$CLI_BIN" --endpoints "$endpoint" --timeout 2s cluster --json >"$WORK/cluster.json" 2>"$WORK/cluster.err"; then
            why=$(python3 - "$WORK/cluster.json" "$nodes" "$replicas" <<'PY'
import json, sys
status = json.load(open(sys.argv[1]))
nodes, replicas = int(sys.argv[2]), int(sys.argv[3])
active = [n for n in status["nodes"] if n.get("state", "active") == "active"]
parts = status["partitions"]
if len(active) != nodes:
    print(f"{len(active)} of {nodes} nodes active")
elif not parts:
    print("no partitions yet")
else:
    bad = [p["id"] for p in parts
           if not p.get("leader") or len(p["replicas"]) != replicas or p.get("learners")]
    if bad:
        print(f"{len(bad)} of {len(parts)} partitions without a leader and {replicas} voters")
PY
            ) || why="could not read the cluster status"
            [[ -n $why ]] || return 0
        else
            why=$(tail -n 1 "$WORK/cluster.err")
        fi
        sleep 0.5
    done
    fail "the cluster did not settle within 60 s: $why"
}

# raftcache bench (gRPC) GET-only then SET-only against ENDPOINTS; emits one row.
grpc_row() {
    local sort=$1 target=$2 endpoints=$3 get set
    local base=("$CLI_BIN" --endpoints "$endpoints" bench --duration "${SECS}s" --concurrency "$CONC"
        --keys "$KEYS" --value-size "$VALUE_SIZE" --json)
    log "$target: raftcache bench --ratio 0:1 (GET only, after a preload) for ${SECS}s"
    run_client "$target, GET only (preloads the key space first)" $((SECS + 300)) \
        "${base[@]}" --ratio 0:1 >"$WORK/bench-get.json" 2>"$WORK/bench.err" ||
        fail "$target: raftcache bench --ratio 0:1 failed: $(tail -n 3 "$WORK/bench.err")"
    log "$target: raftcache bench --ratio 1:0 (SET only) for ${SECS}s"
    run_client "$target, SET only" $((SECS + 120)) \
        "${base[@]}" --ratio 1:0 --no-preload >"$WORK/bench-set.json" 2>"$WORK/bench.err" ||
        fail "$target: raftcache bench --ratio 1:0 failed: $(tail -n 3 "$WORK/bench.err")"
    local figures
    figures=$(python3 - "$WORK/bench-get.json" "$WORK/bench-set.json" 2>&1 <<'PY'
import json, sys
g = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
s = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
for r, kind in ((g, "GET"), (s, "SET")):
    if r["errors"]:
        sys.exit(f"{kind}: {r['errors']} errors, first: {r['first_error']}")
if g["hit_rate"] < 0.99:
    sys.exit(f"GET: hit rate {g['hit_rate']:.3f} after the preload")
print(g["gets_per_sec"], s["sets_per_sec"])
PY
    ) || fail "$target: raftcache bench: $figures"
    read -r get set <<<"$figures"
    emit "$sort" "$target" "raftcache bench (gRPC)" 1 "$get" "$set" ok
}

# One node, R=1: RESP and/or gRPC rows.
row_raftcache1() {
    start_node rc1-node1 --partitions 16 --replicas 1
    local grpc=$NODE_GRPC resp=$NODE_RESP
    wait_cluster "$grpc" 1 1
    if want raftcache1; then
        if ((RESP_SUPPORTED)); then
            resp_rows 20 "raftcache R=1 (1 node, RESP)" "${resp##*:}"
        else
            emit 20.1 "raftcache R=1 (1 node, RESP)" redis-benchmark 1 "$NO_RESP" "" na
        fi
    fi
    if want grpc; then grpc_row 40 "raftcache R=1 (1 node, gRPC)" "$grpc"; fi
}

# Three nodes, R=3, all on the server core: RESP against node 1 and/or gRPC rows.
row_raftcache3() {
    start_node rc3-node1 --partitions 16 --replicas 3
    local seed=$NODE_GRPC resp=$NODE_RESP endpoints=$NODE_GRPC
    start_node rc3-node2 --join "$seed"
    endpoints+=,$NODE_GRPC
    start_node rc3-node3 --join "$seed"
    endpoints+=,$NODE_GRPC
    wait_cluster "$seed" 3 3
    if want raftcache3; then
        if ((RESP_SUPPORTED)); then
            resp_rows 30 "raftcache R=3 (3 nodes, RESP to node 1)" "${resp##*:}"
        else
            emit 30.1 "raftcache R=3 (3 nodes, RESP to node 1)" redis-benchmark 1 "$NO_RESP" "" na
        fi
    fi
    if want grpc; then grpc_row 50 "raftcache R=3 (3 nodes, gRPC)" "$endpoints"; fi
}

# A memcached counter (STAT NAME) over a plain TCP connection.
mc_stat() {
    local port=$1 name=$2 fd line value=
    exec {fd}<>"/dev/tcp/127.0.0.1/$port"
    printf 'stats\r\nquit\r\n' >&"$fd"
    while IFS= read -r -t 2 line <&"$fd"; do
        line=${line%$'\r'}
        [[ $line == END ]] && break
        if [[ $line == "STAT $name "* ]]; then value=${line##* }; fi
    done
    exec {fd}>&-
    [[ -n $value ]] && echo "$value"
}

# memaslap has no duration-less GET mode: a GET-only run first writes its key window
# (concurrency x window keys) and counts those sets in its totals. So the rate is read
# from memcached's own counters over a window of SECS seconds after that warm-up.
MC_WINDOW=2k # keys per memaslap connection: 50 x 2048 = 102 400 keys
MC_KEYS=102400

memaslap_rate() { # PORT KIND(get|set) -> ops/s on stdout
    local port=$1 kind=$2 counter=cmd_$2 pid base c0 c1 t0 t1 i
    base=$(mc_stat "$port" cmd_set) || fail "memcached: no stats"
    record_cmd "memcached, ${kind^^} only (rate: memcached's $counter over ${SECS}s after warm-up)" \
        "${CLIENT_PIN[@]}" "$MEMASLAP" -s "127.0.0.1:$port" -T 1 -c "$CONC" -w "$MC_WINDOW" \
        -X "$VALUE_SIZE" -F "$HERE/memaslap-$kind.cnf" -t "$((SECS + 30))s"
    timeout -k 5 $((SECS + 60)) "${CLIENT_PIN[@]}" "$MEMASLAP" -s "127.0.0.1:$port" -T 1 -c "$CONC" \
        -w "$MC_WINDOW" -X "$VALUE_SIZE" -F "$HERE/memaslap-$kind.cnf" -t "$((SECS + 30))s" \
        >"$WORK/memaslap-$kind.log" 2>&1 &
    pid=$!
    echo "$pid" >>"$WORK/clients"
    if [[ $kind == get ]]; then
        # The warm-up: memaslap writes its key window before it reads.
        for ((i = 0; i < 600; i++)); do
            c0=$(mc_stat "$port" cmd_set) || c0=$base
            ((c0 - base >= MC_KEYS)) && break
            alive "$pid" || break
            sleep 0.1
        done
        ((c0 - base >= MC_KEYS)) || {
            kill "$pid" 2>/dev/null || true
            fail "memaslap's GET warm-up wrote $((c0 - base)) of $MC_KEYS keys: $(tail -n 3 "$WORK/memaslap-$kind.log")"
        }
    fi
    sleep 1
    t0=$(date +%s.%N)
    c0=$(mc_stat "$port" "$counter")
    sleep "$SECS"
    t1=$(date +%s.%N)
    c1=$(mc_stat "$port" "$counter")
    if ! alive "$pid"; then
        wait "$pid" || true
        fail "memaslap ($kind) ended before the measurement window closed: $(tail -n 3 "$WORK/memaslap-$kind.log")"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    sed -i "/^$pid\$/d" "$WORK/clients"
    awk -v a="$c0" -v b="$c1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.2f\n", (b - a) / (t1 - t0) }'
}

row_memcached() {
    [[ -n $MEMASLAP ]] || {
        emit 60 "memcached" "-" 1 "not available: no memaslap/memcaslap (libmemcached-tools): ${UNAVAILABLE[libmemcached-tools]:-not installed}" "" na
        return 0
    }
    local port version get set
    port=$(free_port)
    # memcached refuses to run as root without -u.
    local user=()
    ((EUID != 0)) || user=(-u root)
    start_server memcached memcached -l 127.0.0.1 -p "$port" -U 0 -t 1 -m 1024 -c 1024 "${user[@]}"
    wait_port memcached "$SERVER_PID" "$port"
    version=$(memcached -V 2>/dev/null | awk '{ print $2 }')
    log "memcached: memaslap SET only, ${SECS}s window"
    set=$(memaslap_rate "$port" set)
    log "memcached: memaslap GET only, ${SECS}s window after the warm-up"
    get=$(memaslap_rate "$port" get)
    emit 60 "memcached $version (-t 1)" "memaslap" 1 "$get" "$set" ok
    note 60 "memcached $version with \`-t 1\` (one worker thread: the server has one core, as redis-server uses one); driven by memaslap (Debian's libmemcached-tools calls it memcaslap), ASCII protocol, one request in flight per connection, 16-byte keys over $MC_KEYS keys. memaslap counts its GET warm-up writes in its own totals, so ops/s is memcached's cmd_get/cmd_set delta over ${SECS}s of steady load. No pipelined (-P 16) row: memaslap does not pipeline."
}

row_etcd() {
    local client peer version get set out
    client=$(free_port)
    peer=$(free_port)
    local args=(--name compare --data-dir "$WORK/etcd-data"
        --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client"
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer"
        --initial-cluster "compare=http://127.0.0.1:$peer" --logger zap --log-level warn)
    local fsync="with fsync (this etcd has no --unsafe-no-fsync)"
    if etcd --unsafe-no-fsync --version >/dev/null 2>&1; then
        args+=(--unsafe-no-fsync)
        fsync="\`--unsafe-no-fsync\`"
    fi
    start_server etcd etcd "${args[@]}"
    wait_port etcd "$SERVER_PID" "$client"
    local i
    for ((i = 0; i < 60; i++)); do
        ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$client" --command-timeout 2s endpoint health \
            >/dev/null 2>&1 && break
        sleep 0.5
    done
    ((i < 60)) || fail "etcd did not become healthy within 30 s"
    version=$(etcd --version | awk '/etcd Version/ { print $3 }')
    local url=http://127.0.0.1:$client
    # The preload: wrk writes the keys in order; it is stopped once etcd holds them all.
    log "etcd: wrk preload of $KEYS keys"
    record_cmd "etcd, preload (every key once, stopped when etcd holds $KEYS keys; not measured)" \
        "${CLIENT_PIN[@]}" wrk -t 1 -c "$CONC" -d 120s --timeout 10s -s "$HERE/etcd.lua" "$url" -- preload "$KEYS" "$VALUE_SIZE"
    timeout -k 5 180 "${CLIENT_PIN[@]}" wrk -t 1 -c "$CONC" -d 120s --timeout 10s -s "$HERE/etcd.lua" "$url" \
        -- preload "$KEYS" "$VALUE_SIZE" >"$WORK/wrk-preload.log" 2>&1 &
    local wrk_pid=$! count=0
    echo "$wrk_pid" >>"$WORK/clients"
    for ((i = 0; i < 1500; i++)); do
        count=$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$client" --command-timeout 5s \
            get key: --prefix --keys-only --limit 1 -w json 2>/dev/null | sed -n 's/.*"count":\([0-9]*\).*/\1/p')
        ((${count:-0} >= KEYS)) && break
        alive "$wrk_pid" || break
        sleep 0.2
    done
    kill -TERM "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" 2>/dev/null || true
    sed -i "/^$wrk_pid\$/d" "$WORK/clients"
    ((${count:-0} >= KEYS)) || fail "etcd: the preload wrote ${count:-0} of $KEYS keys: $(tail -n 3 "$WORK/wrk-preload.log")"
    for kind in put range; do
        out=$WORK/wrk-$kind.log
        log "etcd: wrk $kind for ${SECS}s"
        run_client "etcd, $([[ $kind == put ]] && echo SET || echo GET) only" $((SECS + 60)) \
            wrk -t 1 -c "$CONC" -d "${SECS}s" --timeout 10s -s "$HERE/etcd.lua" "$url" -- "$kind" "$KEYS" "$VALUE_SIZE" \
            >"$out" 2>&1 || fail "etcd: wrk $kind failed: $(tail -n 3 "$out")"
        if grep -q -E 'Non-2xx|Socket errors' "$out"; then
            fail "etcd: wrk $kind saw errors: $(grep -E 'Non-2xx|Socket errors' "$out" | tr '\n' ' ')"
        fi
        local rps
        rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
        [[ -n $rps ]] || fail "etcd: no Requests/sec in wrk's output: $(tail -n 3 "$out")"
        if [[ $kind == put ]]; then set=$rps; else get=$rps; fi
    done
    emit 70 "etcd $version (1 member)" "wrk, JSON gateway" 1 "$get" "$set" ok
    note 70 "etcd $version: one member, $fsync, driven by wrk (1 thread, $CONC connections, HTTP/1.1 keep-alive) through etcd's HTTP/JSON gateway (/v3/kv/put, /v3/kv/range with default linearizable reads, base64 keys and values; benches/compare/etcd.lua), because Debian packages no gRPC load generator for etcd (its \`benchmark\` tool is not packaged, and \`etcdctl check perf\` runs a fixed, rate-limited load). The gateway translates JSON to gRPC inside etcd, so these figures understate native gRPC clients. The key space is written once before measuring. No -P 16 row."
}

# ---------------------------------------------------------------------------- run
NO_RESP="not available: this raftcache-node has no --resp-addr (RESP front end not built yet)"
run_row() { # NAME: runs row_NAME in a subshell; handles failure
    local name=$1 rc=0
    log "---- $name"
    rm -f "$WORK/reason"
    # In the background so that a signal reaches this shell's traps at once (the
    # subshell then dies with SIGKILL and cleanup stops what it started).
    (
        set -e
        ROW_PIDS=()
        trap 'for pid in "${ROW_PIDS[@]}"; do stop_group "$pid"; done' EXIT
        "row_$name"
    ) &
    ROW_PID=$!
    wait "$ROW_PID" || rc=$?
    ROW_PID=
    if ((rc != 0)); then
        local reason
        reason=$(cat "$WORK/reason" 2>/dev/null || echo "exit status $rc")
        reason=${reason//|/\\|}
        emit 99 "$name" "-" "-" "failed: ${reason//$'\t'/ }" "" failed
        ANY_FAILED=1
        if ((!KEEP_GOING)); then
            ROW_FAILED=1
            return 1
        fi
    fi
    return 0
}

ROW_FAILED=0 # a row failed without --keep-going: run no more rows
ANY_FAILED=0 # a row failed: exit 1 after printing the table
pkg_reason() { # ROW PKG...: a row that cannot run for a missing package
    local row=$1 pkg
    shift
    for pkg in "$@"; do
        if ! have_cmds "${PKG_CMDS[$pkg]}"; then
            echo "not available: ${UNAVAILABLE[$pkg]:-$pkg is not installed}"
            return 0
        fi
    done
    return 1
}

# Whether the script should go on after a row (stops at the first failure without
# --keep-going, after still printing the table).
go_on() { ((KEEP_GOING || !ROW_FAILED)); }

if want redis; then
    if reason=$(pkg_reason redis redis-server); then
        emit 10.1 "redis-server" redis-benchmark 1 "$reason" "" na
    else
        run_row redis || true
    fi
fi
if go_on && { want raftcache1 || want grpc; }; then run_row raftcache1 || true; fi
if go_on && { want raftcache3 || want grpc; }; then run_row raftcache3 || true; fi
if go_on && want memcached; then
    if reason=$(pkg_reason memcached memcached); then
        emit 60 "memcached" memaslap 1 "$reason" "" na
    else
        run_row memcached || true
    fi
fi
if go_on && want etcd; then
    if reason=$(pkg_reason etcd etcd-server etcd-client wrk); then
        emit 70 "etcd" "wrk, JSON gateway" 1 "$reason" "" na
    else
        run_row etcd || true
    fi
fi

# ---------------------------------------------------------------------------- report
if want raftcache1 || want raftcache3 || want grpc; then
    build="release build"
    [[ -z ${COMPARE_NODE_BIN:-} ]] || build="binaries from COMPARE_NODE_BIN/COMPARE_CLI_BIN ($NODE_BIN)"
    note 30 "raftcache: \`$("$NODE_BIN" --version 2>/dev/null || echo raftcache-node)\`, $build, 16 partitions, persistence none (its default: in memory, like the redis row). The R=3 cluster is three processes on one machine: all three on core 0, sharing it, so it pays for replication without getting more CPU. Before measuring, every partition has a leader and all its replicas."
    ((RESP_SUPPORTED)) && { want raftcache1 || want raftcache3; } && note 30 "raftcache RESP rows: the same redis-benchmark command as the redis row, against node 1's --resp-addr; for R=3 node 1 forwards keys it does not lead to their leaders."
    want grpc && note 30 "raftcache bench (gRPC): \`raftcache bench --concurrency $CONC --keys $KEYS --value-size $VALUE_SIZE\`, GET only (\`--ratio 0:1\`, after writing every key) and SET only (\`--ratio 1:0\`), ${SECS}s each; $CONC requests in flight over HTTP/2, no pipelining (so compared with redis at -P 1); the client routes each key to its partition's leader itself (to all three nodes for R=3)."
fi
if ((PINNED)); then
    note 12 "Pinning: servers on core 0, load generators on core 1 (\`taskset\`). $CORES cores."
else
    note 12 "No pinning: $CORES core(s) or no taskset, servers and clients share the CPU."
fi
if [[ -n $REQUESTS ]]; then
    note 12 "redis-benchmark -n $REQUESTS (fixed by --requests)."
elif ((QUICK)); then
    note 12 "--quick: redis-benchmark -n $QUICK_N, ${SECS}s loads: a smoke run, not figures to quote."
else
    note 12 "redis-benchmark -n: chosen per target from a pilot run (-n $QUICK_N) so the slower of GET and SET lasts about ${TARGET_SECS}s, at most ${MAX_N[1]} at -P 1 and ${MAX_N[16]} at -P 16; GET runs after SET, on the keys it wrote."
fi
want redis || want raftcache1 || want raftcache3 &&
    note 15 "redis-benchmark runs with \`-e\` (show server errors): a RESP row whose server answered with an error fails instead of reporting a rate."
note 10 "Ratios are against the redis-server row with the same -P from this run. Workload everywhere: concurrency $CONC, $VALUE_SIZE-byte values, $KEYS keys, 127.0.0.1 only."

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
# shellcheck disable=SC1091
distro=$(if . /etc/os-release 2>/dev/null; then echo "${PRETTY_NAME:-}"; fi)

render() {
    printf '## raftcache vs redis-server, memcached, etcd (%s)\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    sort -t$'\t' -k1,1g "$WORK/results.tsv" | awk -F'\t' '
        function fmt(x,   s, r) {
            s = sprintf("%.0f", x); r = ""
            while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }
            return s r
        }
        function ratio(x, base) { return base > 0 ? sprintf("%.2fx", x / base) : "-" }
        { rows[NR] = $0 }
        $7 == "ok" && $2 ~ /^redis-server/ { rget[$4] = $5; rset[$4] = $6 }
        END {
            print "| target | tool | -P | GET ops/s | SET ops/s | GET vs redis | SET vs redis |"
            print "|---|---|---:|---:|---:|---:|---:|"
            for (i = 1; i <= NR; i++) {
                split(rows[i], f, "\t")
                if (f[7] == "ok")
                    printf "| %s | %s | %s | %s | %s | %s | %s |\n", f[2], f[3], f[4], fmt(f[5]), fmt(f[6]),
                        ratio(f[5], rget[f[4]]), ratio(f[6], rset[f[4]])
                else
                    printf "| %s | %s | %s | %s | | | |\n", f[2], f[3], f[4], f[5]
            }
        }'
    printf '\nNotes:\n'
    sort -s -t$'\t' -k1,1n "$WORK/notes.md" | cut -f2-
    printf '\nMachine: nproc %s, %s, kernel %s, %s; load average %s at the start, %s at the end.\n' \
        "$CORES" "${cpu:-unknown CPU}" "$(uname -r)" "${distro:-unknown distribution}" \
        "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
    printf '\nCommands (ports and temporary directories are those of this run):\n\n```sh\n'
    cat "$WORK/commands.sh"
    printf '```\n'
}

render >"$WORK/report.md"
cat "$WORK/report.md"
if [[ -n $OUT ]]; then
    mkdir -p "$(dirname "$OUT")"
    cp "$WORK/report.md" "$OUT"
    log "wrote $OUT"
fi
((!ANY_FAILED)) || exit 1
