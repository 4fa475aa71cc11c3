# Shared by the scripts in this folder (sourced, not run): builds the
# release binary, makes a scratch directory removed on exit, finds free
# ports, and starts the nginx upstream they all measure against.
root=$(cd "$(dirname "$0")/../.." && pwd)
# PILOTFISH_BIN=PATH measures another build (e.g. an older commit's).
if [ -z "${PILOTFISH_BIN:-}" ]; then
  cargo build --release -q --manifest-path "$root/Cargo.toml" --bin pilotfish
fi
bin="${PILOTFISH_BIN:-$root/target/release/pilotfish}"
dir=$(mktemp -d)
# Background processes to stop on exit (append with pids+=($!)).
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  kill "$(cat "$dir/nginx.pid" 2>/dev/null)" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nginx_upstream PORT [CPUS]: nginx answering 200 "hello world\n" with
# keep-alive on 127.0.0.1:PORT (pinned to CPUS when given), daemonised.
nginx_upstream() {
  cat > "$dir/nginx.conf" <<NGINX
worker_processes 1; daemon on; user root; pid $dir/nginx.pid; error_log $dir/error.log crit;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $dir/b; proxy_temp_path $dir/p; fastcgi_temp_path $dir/f; uwsgi_temp_path $dir/u; scgi_temp_path $dir/s;
  server { listen 127.0.0.1:$1; location / { return 200 "hello world\n"; } } }
NGINX
  if [ -n "${2:-}" ]; then taskset -c "$2" nginx -p "$dir" -c nginx.conf; else nginx -p "$dir" -c nginx.conf; fi
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT (10 s at most).
wait_port() {
  for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1" >&2; return 1
}

# callgrind_start OUT CONFIG: pilotfish on CONFIG under callgrind (epoll:
# callgrind serialises threads, and a worker blocked in io_uring_enter
# starves the others), profile to OUT; sets $vg to its pid.
callgrind_start() {
  MONOIO_FORCE_LEGACY_DRIVER=1 valgrind --tool=callgrind --callgrind-out-file="$1" \
    "$bin" run -c "$2" 2>/dev/null &
  vg=$!
  pids+=("$vg")
}

# callgrind_total OUT: the instructions a finished profile counted.
callgrind_total() {
  callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}'
}
