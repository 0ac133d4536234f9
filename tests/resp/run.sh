#!/usr/bin/env bash
# Runs test_commands.py (redis-py against a RESP server) in a private venv.
#
#   RESP_ADDR=127.0.0.1:6379 [RESP_ADDR2=host:port] [RESP_TARGET=raftcache|redis] \
#     bash tests/resp/run.sh [extra pytest args]
#
# The venv lives at ${RAFTCACHE_VENV:-${CARGO_TARGET_TMPDIR:-/tmp}/raftcache-resp-venv}
# and is reused when it already has the pinned packages.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${RAFTCACHE_VENV:-${CARGO_TARGET_TMPDIR:-/tmp}/raftcache-resp-venv}"
# redis-py 5.x speaks RESP3 (protocol=3); pinned so the expectations do not drift.
pins=("redis==5.2.1" "pytest==8.3.5")

die() {
    echo "tests/resp/run.sh: $*" >&2
    exit 2
}

if [[ -z "${RESP_ADDR:-}" ]]; then
    die "RESP_ADDR is not set (host:port of the RESP listener under test)"
fi
command -v python3 >/dev/null 2>&1 ||
    die "python3 is not installed (Debian/Ubuntu: apt-get install python3 python3-venv)"

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$venv"
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 ||
        die "python3 has no venv/ensurepip module (Debian/Ubuntu: apt-get install python3-venv)"
    python3 -m venv "$venv" || die "python3 -m venv $venv failed (apt-get install python3-venv?)"
fi
"$venv/bin/python" -m pip --version >/dev/null 2>&1 ||
    die "the venv $venv has no pip (apt-get install python3-venv python3-pip, then delete $venv)"

# Install only when a pin is missing, so reruns need no network.
if ! "$venv/bin/python" - "${pins[@]}" <<'PY' >/dev/null 2>&1; then
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
PY
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" ||
        die "pip install ${pins[*]} failed (is PyPI reachable?)"
fi

cd "$here"
# No __pycache__ (nor pytest's rewritten-assert cache) in the source tree.
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -x -p no:cacheprovider test_commands.py "$@"
