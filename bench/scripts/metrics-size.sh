#!/usr/bin/env bash
# The size and cost of one /metrics scrape for a config with 100 routes on
# 2 workers, after one request per route from each of 3 keep-alive
# connections (so every route has golden and exact-histogram series on
# both workers, typically). Cost: wall time of the scrape over the admin
# socket (curl), median of 20, and the proxy's CPU time per scrape (all its
# threads: the admin thread renders, the workers snapshot). Needs nginx.
#
#   bench/scripts/metrics-size.sh [routes]
set -euo pipefail
routes=${1:-100}
source "$(dirname "$0")/lib.sh"
up=$(port); px=$(port)
nginx_upstream "$up"
{
  cat <<TOML
workers = 2
[admin]
socket = "$dir/admin.sock"
[[listeners]]
name = "web"
bind = "127.0.0.1:$px"
protocol = "http"
cluster = "up"
TOML
  for i in $(seq "$routes"); do
    printf '[[listeners.routes]]\nname = "r%d"\npath_prefix = "/r%d/"\ncluster = "up"\n' "$i" "$i"
  done
  printf '[[clusters]]\nname = "up"\nendpoints = ["127.0.0.1:%s"]\n' "$up"
} > "$dir/pilotfish.toml"
"$bin" run -c "$dir/pilotfish.toml" 2>/dev/null &
pids+=($!)
pf=$!
wait_port "$px"
for c in 1 2 3; do
  urls=()
  for i in $(seq "$routes"); do urls+=("http://127.0.0.1:$px/r$i/x"); done
  curl -s -o /dev/null "${urls[@]}"
done
ticks() { awk '{print $14+$15}' "/proc/$pf/stat"; }
curl -s --unix-socket "$dir/admin.sock" http://pilotfish/metrics > "$dir/metrics.txt"
bytes=$(wc -c < "$dir/metrics.txt")
lines=$(grep -vc '^#' "$dir/metrics.txt")
before=$(ticks)
times=()
for _ in $(seq 20); do
  times+=("$(curl -s -o /dev/null -w '%{time_total}' --unix-socket "$dir/admin.sock" http://pilotfish/metrics)")
done
after=$(ticks)
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 10p)
cpu_ms=$(( (after - before) * 10 / 20 ))
echo "routes=$routes workers=2 bytes=$bytes samples=$lines scrape_median_s=$median proxy_cpu_ms_per_scrape=$cpu_ms"
