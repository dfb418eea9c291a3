#!/usr/bin/env bash
# Compare CPU cost and latency of Redis sidecars (rotaproxy, a floor forwarder, HAProxy, stunnel,
# twemproxy) in front of one Redis. See benches/README.md. All arguments go to benches/compare.py:
#   benches/compare.sh --quick          # smoke run, ~2 min
#   benches/compare.sh                  # default run: ~6 min + build on 2 cores
#   benches/compare.sh --only rotaproxy,rotaproxy-tls --json /tmp/r.json
# COMPARE_TIMEOUT (seconds) bounds the whole run (default 1500; 600 with --quick).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

limit="${COMPARE_TIMEOUT:-}"
if [[ -z "$limit" ]]; then
  limit=1500
  for a in "$@"; do [[ "$a" == "--quick" ]] && limit=600; done
fi

command -v python3 >/dev/null || { echo "compare.sh: python3 is required" >&2; exit 2; }
command -v taskset >/dev/null || { echo "compare.sh: taskset (util-linux) is required" >&2; exit 2; }

py_pid=""
cleanup() {
  # compare.py ends its own children by PID on SIGTERM; this only covers the wrapper being killed.
  if [[ -n "$py_pid" ]] && kill -0 "$py_pid" 2>/dev/null; then
    kill -TERM "$py_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$py_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$py_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# timeout sends SIGTERM at the limit (compare.py then stops its children), SIGKILL 20 s later.
timeout --kill-after=20 "$limit" python3 "$here/compare.py" "$@" &
py_pid=$!
wait "$py_pid"
