#!/usr/bin/env bash
# User-space instructions per HTTP request of an inbound sidecar terminating
# mTLS, next to the same sidecar in plaintext: what TLS costs one hop, in
# instructions (repeatable where timings are not). wrk → sidecar A
# (outbound, originates mTLS; not profiled) → sidecar B (inbound, under
# callgrind) → nginx. Needs valgrind, nginx and wrk.
#
#   bench/scripts/callgrind-mtls.sh [seconds]
#
# Prints one line per path: requests, instructions, per_request. Set
# CALLGRIND_KEEP=PREFIX to keep PREFIX-plain.out and PREFIX-mtls.out.
set -euo pipefail
secs=${1:-8}
source "$(dirname "$0")/lib.sh"
up=$(port)
nginx_upstream "$up"
"$bin" ca init "$dir/ca" 2>/dev/null >/dev/null
for who in a b; do
  "$bin" ca issue --ca "$dir/ca" --spiffe-id "spiffe://bench.mesh/sa/$who" --out "$dir/$who" 2>/dev/null >/dev/null
done
tls() { printf '[tls]\ncert = "%s/cert.pem"\nkey = "%s/key.pem"\ntrust_bundle = "%s/ca.pem"\n' "$dir/$1" "$dir/$1" "$dir/$1"; }
for path in plain mtls; do
  bp=$(port); ap=$(port)
  if [ "$path" = mtls ]; then
    listener_tls='tls = { require_client_cert = true }
authorize = ["spiffe://bench.mesh/sa/a"]'
    cluster_tls='tls = { server_identity = "spiffe://bench.mesh/sa/b" }'
  else
    listener_tls=''; cluster_tls=''
  fi
  cat > "$dir/b.toml" <<TOML
workers = 1
$(tls b)
[[listeners]]
name = "inbound"
bind = "127.0.0.1:$bp"
protocol = "http"
cluster = "app"
$listener_tls
[[clusters]]
name = "app"
endpoints = ["127.0.0.1:$up"]
TOML
  cat > "$dir/a.toml" <<TOML
workers = 1
$(tls a)
[[listeners]]
name = "outbound"
bind = "127.0.0.1:$ap"
protocol = "http"
cluster = "b"
[[clusters]]
name = "b"
endpoints = ["127.0.0.1:$bp"]
$cluster_tls
TOML
  callgrind_start "$dir/cg-$path.out" "$dir/b.toml"
  wait_port "$bp"
  "$bin" run -c "$dir/a.toml" 2>/dev/null &
  a=$!
  pids+=("$a")
  wait_port "$ap"
  n=$(wrk -t1 -c8 -d"${secs}s" "http://127.0.0.1:$ap/" | awk '/requests in/{print $1}')
  kill -TERM "$a"; wait "$a" || true
  kill -TERM "$vg"; wait "$vg" || true
  total=$(callgrind_total "$dir/cg-$path.out")
  echo "$path: requests=$n instructions=$total per_request=$((total / n))"
  if [ -n "${CALLGRIND_KEEP:-}" ]; then cp "$dir/cg-$path.out" "$CALLGRIND_KEEP-$path.out"; fi
done
