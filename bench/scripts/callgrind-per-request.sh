#!/usr/bin/env bash
# User-space instructions per HTTP request of one Pilotfish worker, counted
# by callgrind: repeatable where timings are not (instructions, not time;
# the kernel's work is not counted). Needs valgrind, nginx and wrk.
#
#   bench/scripts/callgrind-per-request.sh [seconds]
#   CLIENT=h2 bench/scripts/callgrind-per-request.sh [seconds]   (h2load, h2c in; needs h2load)
#   TAP='route=web&rate=100' bench/scripts/callgrind-per-request.sh   (a live tap attached for the run)
#   TRACE_RATE=1.0 bench/scripts/callgrind-per-request.sh   ([tracing] on, spans to an OTLP receiver)
#   CLOSE=1 bench/scripts/callgrind-per-request.sh   (wrk sends `connection: close`: a connection per request)
#
# TAP attaches `pilotfish admin tap` with those filters (a query string)
# for the whole run, its output thrown away: the cost per request of a tap
# that matches (and, over its rate, drops) or of one that does not match.
## TRACE_RATE turns [tracing] on with that sample rate (the requests carry
# no context, so every one starts a trace), exporting to the test suite's
# OTLP receiver (python3 with opentelemetry-proto); the exporter thread's
# encoding is counted too (callgrind counts every thread of the process).
#
# Runs the epoll driver: callgrind serialises threads, and a worker blocked
# in io_uring_enter starves the others (seen here), so io_uring is not
# usable under it. Start-up and a 1 s warm-up (first connections, pools,
# buffers) are not counted: the counters are zeroed (callgrind_control -z)
# just before the measured load.
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
if [ -n "${TRACE_RATE:-}" ]; then
  python3 "$root/tests/peers/otlp_receiver.py" > "$dir/otlp.out" &
  pids+=("$!")
  for _ in $(seq 100); do grep -q '^port' "$dir/otlp.out" 2>/dev/null && break; sleep 0.1; done
  otlp=$(awk '/^port/{print $2; exit}' "$dir/otlp.out")
  printf '[tracing]\ncollector = "127.0.0.1:%s"\nsample_rate = %s\n' "$otlp" "$TRACE_RATE" >> "$dir/pilotfish.toml"
fi
close=()
if [ -n "${CLOSE:-}" ]; then close=(-H "Connection: close"); fi
callgrind_start "$dir/cg.out" "$dir/pilotfish.toml"
wait_port "$px"
if [ -n "${TAP:-}" ]; then
  for _ in $(seq 100); do [ -S "$dir/admin.sock" ] && break; sleep 0.1; done
  curl -sN --unix-socket "$dir/admin.sock" "http://admin/tap?$TAP" >/dev/null &
  pids+=("$!")
  sleep 1
fi
if [ "${CLIENT:-http1}" = h2 ]; then
  h2load -c8 -m1 -D1 "http://127.0.0.1:$px/" >/dev/null
else
  wrk -t1 -c8 -d1s "${close[@]}" "http://127.0.0.1:$px/" >/dev/null
fi
callgrind_control -z "$vg" >/dev/null
if [ "${CLIENT:-http1}" = h2 ]; then
  # 8 connections, 1 stream each: the same concurrency as wrk's.
  n=$(h2load -c8 -m1 -D"$secs" "http://127.0.0.1:$px/" | awk '/^requests:/{print $8}')
else
  n=$(wrk -t1 -c8 -d"${secs}s" "${close[@]}" "http://127.0.0.1:$px/" | awk '/requests in/{print $1}')
fi
kill -TERM $vg; wait $vg || true
total=$(callgrind_total "$dir/cg.out")
echo "requests=$n instructions=$total per_request=$((total / n))"
if [ -n "${TRACE_RATE:-}" ]; then echo "spans received by the collector: $(grep -c trace_id "$dir/otlp.out" || true)"; fi
# CALLGRIND_KEEP=FILE keeps the profile (for callgrind_annotate diffs).
if [ -n "${CALLGRIND_KEEP:-}" ]; then cp "$dir/cg.out" "$CALLGRIND_KEEP"; fi
