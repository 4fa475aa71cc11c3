#!/usr/bin/env bash
# HTTP/2 in, HTTP/1.1 upstream, one worker each: h2load through Pilotfish,
# nginx and HAProxy in the same run, and the proxy's CPU per request
# (user+system ticks of the proxy process over the load). Then fairness:
# sequential h2 requests on Pilotfish's one worker while wrk saturates it
# with HTTP/1.1, their p99 beside wrk's.
#
#   bench/scripts/h2-compare.sh [ROUNDS] [REQUESTS]    (defaults: 3 rounds, 200000)
#
# The proxy runs on the last CPU, h2load/wrk and the nginx upstream on the
# others. Prints each round, then medians with their spread (min..max).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
rounds=${1:-3}
n=${2:-200000}
cpus=$(nproc)
proxy_cpu=$((cpus - 1))
load_cpus=0-$((cpus > 1 ? cpus - 2 : 0))
for tool in h2load wrk nginx haproxy; do
  command -v $tool >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done

up=$(port); nginx_upstream "$up" "$load_cpus"; wait_port "$up"

pf=$(port)
cat > "$dir/pf.toml" <<EOF
workers = 1
[[listeners]]
name = "in"
bind = "127.0.0.1:$pf"
protocol = "http"
cluster = "up"
[[clusters]]
name = "up"
endpoints = ["127.0.0.1:$up"]
EOF
taskset -c "$proxy_cpu" "$bin" run -c "$dir/pf.toml" 2>/dev/null & pids+=($!); pf_pid=$!

ng=$(port); mkdir -p "$dir/ng"
cat > "$dir/ng/nginx.conf" <<EOF
worker_processes 1; daemon off; user root; pid $dir/ng/nginx.pid; error_log $dir/ng/error.log crit;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; http2_max_concurrent_streams 128;
  client_body_temp_path $dir/ng/b; proxy_temp_path $dir/ng/p; fastcgi_temp_path $dir/ng/f; uwsgi_temp_path $dir/ng/u; scgi_temp_path $dir/ng/s;
  upstream u { server 127.0.0.1:$up; keepalive 256; }
  server { listen 127.0.0.1:$ng http2; location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
taskset -c "$proxy_cpu" nginx -p "$dir/ng" -c nginx.conf & pids+=($!); ng_pid=$!

hp=$(port)
cat > "$dir/haproxy.cfg" <<EOF
global
 nbthread 1
 maxconn 4096
defaults
 timeout connect 5s
 timeout client 60s
 timeout server 60s
frontend f
 mode http
 bind 127.0.0.1:$hp proto h2
 default_backend b
backend b
 mode http
 http-reuse always
 server s1 127.0.0.1:$up
EOF
taskset -c "$proxy_cpu" haproxy -f "$dir/haproxy.cfg" >/dev/null 2>&1 & pids+=($!); hp_pid=$!
wait_port "$pf"; wait_port "$ng"; wait_port "$hp"

# ticks PID: user+system ticks of PID and its children (nginx's worker).
ticks() {
  local t=0 p
  for p in "$1" $(pgrep -P "$1"); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}
# one NAME PORT PID: prints "req/s cpu_us_per_request" for one h2load run.
one() {
  local before after out
  before=$(ticks "$3")
  out=$(taskset -c "$load_cpus" h2load -n "$n" -c 16 -m 16 "http://127.0.0.1:$2/" 2>&1)
  after=$(ticks "$3")
  grep -q "succeeded, 0 failed" <<<"$(grep '^requests:' <<<"$out" | sed 's/.*done, //')" ||
    { echo "$1: failures: $(grep '^requests:' <<<"$out")" >&2; }
  local rps
  rps=$(awk '/^finished in/{gsub(",",""); print $4}' <<<"$out")
  awk -v r="$rps" -v t=$((after - before)) -v n="$n" 'BEGIN{printf "%.0f %.2f\n", r, t*1e6/100/n}'
}
# warm-up
for p in "$pf" "$ng" "$hp"; do taskset -c "$load_cpus" h2load -n 20000 -c 16 -m 16 "http://127.0.0.1:$p/" >/dev/null 2>&1; done

echo "h2load -n $n -c 16 -m 16 (h2c in, HTTP/1.1 upstream), proxy on CPU $proxy_cpu, load on $load_cpus"
: > "$dir/results"
for r in $(seq "$rounds"); do
  for who in pilotfish:$pf:$pf_pid nginx:$ng:$ng_pid haproxy:$hp:$hp_pid; do
    IFS=: read -r name p pid <<<"$who"
    res=$(one "$name" "$p" "$pid")
    echo "round $r  $name  $res"
    echo "$name $res" >> "$dir/results"
  done
done
python3 - "$dir/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for name, rps, cpu in rows:
    by.setdefault(name, []).append((float(rps), float(cpu)))
med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in by.items()}
print("\nmedians (min..max)          req/s                 CPU µs/request")
for k, v in by.items():
    rs = [r for r, _ in v]; cs = [c for _, c in v]
    print(f"  {k:10} {med[k][0]:>9.0f} ({min(rs):.0f}..{max(rs):.0f})   {med[k][1]:>6.2f} ({min(cs):.2f}..{max(cs):.2f})")
pf = med["pilotfish"][1]
print(f"CPU per request, pilotfish vs nginx: {pf / med['nginx'][1]:.2f}x, vs haproxy: {pf / med['haproxy'][1]:.2f}x")
PY

# Fairness: sequential h2 requests while HTTP/1.1 saturates the worker.
h2p99() {
  local log="$dir/h2.log"
  rm -f "$log"
  taskset -c "$load_cpus" h2load -n 3000 -c 1 -m 1 --log-file="$log" "http://127.0.0.1:$pf/" >/dev/null 2>&1
  # The log's third column is the request's time in µs.
  sort -n -k3 "$log" | awk '{v[NR]=$3} END{printf "%d", v[int(NR*0.99)]}'
}
alone=$(h2p99)
taskset -c "$load_cpus" wrk -t1 -c64 -d15s --latency "http://127.0.0.1:$pf/" > "$dir/wrk.out" 2>&1 &
wrk_pid=$!
sleep 2
loaded=$(h2p99)
wait "$wrk_pid"
wrk_p99=$(awk '$1=="99%"{print $2}' "$dir/wrk.out")
wrk_rps=$(awk '/^Requests\/sec/{print $2}' "$dir/wrk.out")
echo
echo "fairness on one worker: h2 p99 alone ${alone} µs; with HTTP/1.1 saturating it (wrk 64 conns, ${wrk_rps} req/s, HTTP/1.1 p99 ${wrk_p99}): h2 p99 ${loaded} µs"
