#!/usr/bin/env bash
# User-space instructions per HTTP request of one Pilotfish worker, counted
# by callgrind: repeatable where timings are not (instructions, not time;
# the kernel's work is not counted). Needs valgrind, nginx and wrk.
#
#   bench/scripts/callgrind-per-request.sh [seconds]
#   CLIENT=h2 bench/scripts/callgrind-per-request.sh [seconds]   (h2load, h2c in; needs h2load)
#   TAP='route=web&rate=100' bench/scripts/callgrind-per-request.sh   (a live tap attached for the run)
#
# TAP attaches `pilotfish admin tap` with those filters (a query string)
# for the whole run, its output thrown away: the cost per request of a tap
# that matches (and, over its rate, drops) or of one that does not match.
#
# Runs the epoll driver: callgrind serialises threads, and a worker blocked
# in io_uring_enter starves the others (seen here), so io_uring is not
# usable under it. Includes start-up (tens of millions of instructions), so
# run long enough (default 8 s) for it to be small per request.
set -euo pipefail
secs=${1:-8}
source "$(dirname "$0")/lib.sh"
up=$(port); px=$(port)
nginx_upstream "$up"
cat > "$dir/pilotfish.toml" <<TOML
workers = 1
[admin]
socket = "$dir/admin.sock"
[[listeners]]
name = "web"
bind = "127.0.0.1:$px"
protocol = "http"
cluster = "up"
[[clusters]]
name = "up"
endpoints = ["127.0.0.1:$up"]
TOML
callgrind_start "$dir/cg.out" "$dir/pilotfish.toml"
wait_port "$px"
if [ -n "${TAP:-}" ]; then
  for _ in $(seq 100); do [ -S "$dir/admin.sock" ] && break; sleep 0.1; done
  curl -sN --unix-socket "$dir/admin.sock" "http://admin/tap?$TAP" >/dev/null &
  pids+=("$!")
  sleep 1
fi
if [ "${CLIENT:-http1}" = h2 ]; then
  # 8 connections, 1 stream each: the same concurrency as wrk's.
  n=$(h2load -c8 -m1 -D"$secs" "http://127.0.0.1:$px/" | awk '/^requests:/{print $8}')
else
  n=$(wrk -t1 -c8 -d"${secs}s" "http://127.0.0.1:$px/" | awk '/requests in/{print $1}')
fi
kill -TERM $vg; wait $vg || true
total=$(callgrind_total "$dir/cg.out")
echo "requests=$n instructions=$total per_request=$((total / n))"
# CALLGRIND_KEEP=FILE keeps the profile (for callgrind_annotate diffs).
if [ -n "${CALLGRIND_KEEP:-}" ]; then cp "$dir/cg.out" "$CALLGRIND_KEEP"; fi
