#!/usr/bin/env bash
# Proxy CPU per request of two pilotfish binaries, interleaved rounds, one
# worker each, against the bench upstream, closed loop. For A/B checks of
# one change (build the other binary from the commit before it).
#
#   bench/scripts/ab-cpu.sh OLD_BINARY NEW_BINARY [mode] [rounds]
#   mode: http (keep-alive) or http-close (a connection per request; default)
#   BODY_SIZE=16384 bench/scripts/ab-cpu.sh OLD NEW http   (response body bytes; default the upstream's)
#
# CPU: utime+stime of the proxy process over the measured window (clock
# ticks, 10 ms), divided by the requests the load counted.
set -euo pipefail
old=$1; new=$2; mode=${3:-http-close}; rounds=${4:-3}
source "$(dirname "$0")/lib.sh"
bench_bin="$root/target/release/pilotfish-bench"
[ -x "$bench_bin" ] || cargo build --release -q --manifest-path "$root/Cargo.toml" -p pilotfish-bench
up=$(port); px=$(port)
"$bench_bin" upstream --listen "127.0.0.1:$up" ${BODY_SIZE:+--body-size "$BODY_SIZE"} >/dev/null 2>&1 &
pids+=("$!")
wait_port "$up"
cat > "$dir/ab.toml" <<TOML
workers = 1
[[listeners]]
name = "web"
bind = "127.0.0.1:$px"
protocol = "http"
cluster = "up"
[[clusters]]
name = "up"
endpoints = ["127.0.0.1:$up"]
TOML
for round in $(seq "$rounds"); do
  for which in old new; do
    if [ "$which" = old ]; then b=$old; else b=$new; fi
    "$b" run -c "$dir/ab.toml" >/dev/null 2>&1 &
    p=$!
    wait_port "$px"
    t0=$(awk '{print $14+$15}' "/proc/$p/stat")
    out=$("$bench_bin" load "127.0.0.1:$px" --mode "$mode" --connections 8 --duration 5s --warmup 1ms 2>&1)
    t1=$(awk '{print $14+$15}' "/proc/$p/stat")
    n=$(echo "$out" | grep -oE "^requests [0-9]+" | grep -oE "[0-9]+")
    echo "round=$round $which cpu_us_per_request=$(( (t1 - t0) * 10000000 / n / 1000 )).$(( (t1 - t0) * 10000000 / n % 1000 / 100 )) requests=$n"
    kill "$p"; wait "$p" 2>/dev/null || true
  done
done
