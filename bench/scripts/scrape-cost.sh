#!/usr/bin/env bash
# What a metrics scrape costs the data path: wrk's p99 through one pinned
# Pilotfish worker with no scraping, then while /metrics and /histograms
# are scraped every 100 ms, interleaved (none, scrape, none, scrape, ...).
# Needs nginx (the upstream) and wrk.
#
#   bench/scripts/scrape-cost.sh [rounds] [seconds]
set -euo pipefail
rounds=${1:-3}
secs=${2:-8}
source "$(dirname "$0")/lib.sh"
up=$(port); px=$(port)
last=$(( $(nproc) - 1 ))
nginx_upstream "$up" 0
cat > "$dir/pilotfish.toml" <<TOML
workers = 1
[admin]
socket = "$dir/admin.sock"
[[listeners]]
name = "web"
bind = "127.0.0.1:$px"
protocol = "http"
cluster = "up"
[[listeners.routes]]
name = "all"
path_prefix = "/"
cluster = "up"
[[clusters]]
name = "up"
endpoints = ["127.0.0.1:$up"]
TOML
# The worker and the admin thread share the last CPU, as on a busy node.
taskset -c "$last" "$bin" run --config "$dir/pilotfish.toml" >/dev/null 2>"$dir/pilotfish.log" &
pf=$!
pids+=("$pf")
for _ in $(seq 50); do [ -S "$dir/admin.sock" ] && break; sleep 0.1; done
p99() { taskset -c 0 wrk -t1 -c16 -d"${secs}s" --latency "http://127.0.0.1:$px/" | awk '$1=="99%"{print $2}'; }
scrape() {
  while true; do
    "$bin" admin --socket "$dir/admin.sock" metrics >/dev/null
    "$bin" admin --socket "$dir/admin.sock" histograms >/dev/null
    sleep 0.1
  done
}
p99 >/dev/null # warm-up
echo "round  p99-no-scrape  p99-scrape-every-100ms"
for r in $(seq "$rounds"); do
  quiet=$(p99)
  scrape & scraper=$!
  pids+=("$scraper")
  busy=$(p99)
  kill $scraper; wait $scraper 2>/dev/null || true
  echo "$r      $quiet        $busy"
done
echo
"$bin" admin --socket "$dir/admin.sock" histograms --listener web
