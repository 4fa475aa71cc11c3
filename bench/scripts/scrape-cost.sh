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
root=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --release -q --manifest-path "$root/Cargo.toml" --bin pilotfish
bin="$root/target/release/pilotfish"
dir=$(mktemp -d)
pf=""
trap 'kill $pf 2>/dev/null; kill $(cat "$dir/nginx.pid" 2>/dev/null) 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port); px=$(port)
last=$(( $(nproc) - 1 ))
cat > "$dir/nginx.conf" <<NGINX
worker_processes 1; daemon on; user root; pid $dir/nginx.pid; error_log $dir/error.log crit;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $dir/b; proxy_temp_path $dir/p; fastcgi_temp_path $dir/f; uwsgi_temp_path $dir/u; scgi_temp_path $dir/s;
  server { listen 127.0.0.1:$up; location / { return 200 "hello world\n"; } } }
NGINX
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
taskset -c 0 nginx -p "$dir" -c nginx.conf
# The worker and the admin thread share the last CPU, as on a busy node.
taskset -c "$last" "$bin" run --config "$dir/pilotfish.toml" >/dev/null 2>"$dir/pilotfish.log" &
pf=$!
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
  busy=$(p99)
  kill $scraper; wait $scraper 2>/dev/null || true
  echo "$r      $quiet        $busy"
done
echo
"$bin" admin --socket "$dir/admin.sock" histograms --listener web
