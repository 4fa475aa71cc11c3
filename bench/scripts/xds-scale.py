#!/usr/bin/env python3
"""xDS at scale: 1,000 clusters of 10 endpoints pushed to one sidecar, then
endpoint churn under load.

    PYTHONPATH=target/py-xds bench/scripts/xds-scale.py [--delta] [--clusters N] [--rate R] [--seconds S]

Runs the real binary (target/release/pilotfish) with an [xds] bootstrap
against the test management server (tests/peers/xds_server.py) and prints:

- push to ACK: the time from handing the server the clusters, their
  endpoints, a listener and its routes to the last of the four ACKs;
- the sidecar's RSS before the push and after it;
- churn: one cluster's endpoints changed R times a second for S seconds
  (the cluster the listener routes to: its 10 endpoints are real HTTP
  servers, and each update takes two of them out) while keep-alive
  clients send requests through the listener; how many updates were
  ACKed, how many requests were sent and how many failed.

Each update is a whole EDS snapshot (state of the world: every cluster's
assignment is resent) or one changed resource (--delta).
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SERVER = os.path.join(ROOT, "tests", "peers", "xds_server.py")
# PILOTFISH_BIN: another build to measure (a baseline kept aside).
BINARY = os.environ.get("PILOTFISH_BIN", os.path.join(ROOT, "target", "release", "pilotfish"))


class Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def sock(port, ip="127.0.0.1"):
    return {"socket_address": {"address": ip, "port_value": port}}


def admin_counter(work, series):
    """A counter's value from the sidecar's /metrics (admin Unix socket)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(work, "admin.sock"))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    for line in data.decode().splitlines():
        if line.startswith(series + " "):
            return int(float(line.split()[-1]))
    return 0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Mgmt:
    def __init__(self):
        env = dict(os.environ)
        self.p = subprocess.Popen(
            [sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.port = json.loads(self.p.stdout.readline())["port"]
        self.acks = {}
        self.nacks = []
        self.cv = threading.Condition()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.p.stdout:
            e = json.loads(line)
            with self.cv:
                if e["event"] == "ack":
                    self.acks[(e["type"], e["version"])] = time.monotonic()
                elif e["event"] == "nack":
                    self.nacks.append(e)
                self.cv.notify_all()

    def set(self, kind, version, resources, op="set"):
        self.p.stdin.write(json.dumps({"op": op, "type": kind, "version": version, "resources": resources}) + "\n")
        self.p.stdin.flush()

    def wait_ack(self, kind, version, timeout=120):
        deadline = time.monotonic() + timeout
        with self.cv:
            while (kind, version) not in self.acks:
                if self.nacks:
                    raise SystemExit(f"NACK: {self.nacks[-1]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"no ACK of {kind} {version}")
                self.cv.wait(left)
            return self.acks[(kind, version)]

    def close(self):
        self.p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--delta", action="store_true")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    if not os.path.exists(BINARY):
        raise SystemExit("build first: cargo build --release --bin pilotfish")

    upstreams = []
    for _ in range(10):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        upstreams.append(srv.server_address[1])

    mgmt = Mgmt()
    work = tempfile.mkdtemp(prefix="pilotfish-xds-scale-")
    listen = free_port()
    boot = os.path.join(work, "bootstrap.toml")
    with open(boot, "w") as f:
        f.write(
            f'workers = 1\n[admin]\nsocket = "{work}/admin.sock"\n'
            f'[xds]\nserver = "127.0.0.1:{mgmt.port}"\nnode_id = "scale"\ndelta = {str(args.delta).lower()}\n'
        )
    proxy = subprocess.Popen([BINARY, "run", "--config", boot], stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    rss_before = rss_kib(proxy.pid)

    n = args.clusters
    clusters = [
        {"name": f"c{i}", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}, "connect_timeout": "1s"}
        for i in range(n)
    ]

    def cla(i, skip=()):
        if i == 0:
            eps = [sock(p) for j, p in enumerate(upstreams) if j not in skip]
        else:
            # Never contacted: 10 addresses per cluster, as a mesh has.
            eps = [sock(10000 + j, f"10.{i // 250}.{i % 250}.{j + 1}") for j in range(10)]
        return {"cluster_name": f"c{i}", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": e}} for e in eps]}]}

    assignments = [cla(i) for i in range(n)]
    # Each update takes two of the routed cluster's ten endpoints out.
    listener = {
        "name": "in",
        "address": sock(listen),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "in",
                "rds": {"route_config_name": "r", "config_source": {"ads": {}}},
                "http_filters": [{"name": "envoy.filters.http.router"}],
            },
        }]}],
    }
    routes = {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "c0"}}]}]}

    t0 = time.monotonic()
    mgmt.set("clusters", "v1", clusters)
    mgmt.set("endpoints", "v1", assignments)
    mgmt.set("listeners", "v1", [listener])
    mgmt.set("routes", "v1", [routes])
    last = max(mgmt.wait_ack(k, "v1") for k in ["clusters", "endpoints", "listeners", "routes"])
    push_to_ack = last - t0
    time.sleep(0.5)
    rss_after = rss_kib(proxy.pid)

    # Churn under load.
    stop = threading.Event()
    sent = [0] * args.clients
    failed = [0] * args.clients

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/x")
                r = conn.getresponse()
                r.read()
                sent[k] += 1
                if r.status != 200:
                    failed[k] += 1
                if r.getheader("connection") == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
            except Exception:
                failed[k] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    updates = int(args.rate * args.seconds)
    started = time.monotonic()
    for u in range(updates):
        # Only the changed assignment is handed over; the server keeps the
        # rest (a state-of-the-world response still carries all of them).
        mgmt.set("endpoints", f"u{u}", [cla(0, skip=(u % 10, (u + 5) % 10))], op="put")
        target = started + (u + 1) / args.rate
        pause = target - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    offered = time.monotonic() - started
    # The last update is ACKed (earlier ones may be coalesced away).
    acked_at = mgmt.wait_ack("endpoints", f"u{updates - 1}")
    stop.set()
    for t in threads:
        t.join()
    rss_churn = rss_kib(proxy.pid)
    applied = admin_counter(work, 'pilotfish_xds_updates_total{type="endpoints",result="accepted"}') - 1
    proxy.terminate()
    proxy.wait(timeout=30)
    mgmt.close()

    mode = "delta" if args.delta else "state of the world"
    print(f"xds-scale ({mode}): {n} clusters x 10 endpoints")
    print(f"  push to ACK (CDS+EDS+LDS+RDS): {push_to_ack * 1000:.0f} ms")
    print(f"  RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after,"
          f" {rss_churn / 1024:.1f} MiB after the churn")
    print(f"  churn: {updates} endpoint updates offered over {offered:.1f} s ({updates / offered:.0f}/s);"
          f" {applied} of them accepted (state of the world: the newest of those that queued during"
          f" a swap, the rest superseded; delta: all, folded into shared swaps),"
          f" the last ACKed {1000 * (acked_at - started - offered):.0f} ms after the last offer")
    print(f"  load: {sum(sent)} requests, {sum(failed)} failed")
    print(json.dumps({
        "mode": mode, "clusters": n, "push_to_ack_ms": round(push_to_ack * 1000),
        "rss_before_kib": rss_before, "rss_after_kib": rss_after, "rss_after_churn_kib": rss_churn,
        "updates_offered": updates, "updates_accepted": applied,
        "last_ack_after_last_offer_ms": round(1000 * (acked_at - started - offered)), "requests": sum(sent), "failed": sum(failed),
    }))
    sys.exit(1 if sum(failed) else 0)


if __name__ == "__main__":
    main()
