#!/usr/bin/env python3
"""A scripted xDS management server (ADS: state of the world and delta)
for tests.

Serves Envoy's AggregatedDiscoveryService with grpcio and the official
Envoy API protos from PyPI (xds-protos). Snapshots are scripted over stdin,
one JSON object a line:

    {"op": "set", "type": "clusters", "version": "1", "resources": [ ... ]}

where each resource is the proto3 JSON form of the type's message
(envoy.config.cluster.v3.Cluster for "clusters", ClusterLoadAssignment for
"endpoints", Listener for "listeners", RouteConfiguration for "routes",
envoy.extensions.transport_sockets.tls.v3.Secret for "secrets").
A set replaces the type's snapshot and pushes it to every stream
subscribed to it (EDS and RDS: only the names the stream asked for).
{"op": "put", ...} does the same but replaces only the resources given,
by name, keeping the rest of the snapshot (cheap churn for benchmarks).
With "node": ID, the snapshot is that node's alone (as control planes
keep one per proxy); a node without its own gets the shared one.

Events are printed to stdout, one JSON object a line: {"event": "port"},
"request" (every DiscoveryRequest: type, version, nonce, names, node),
"ack" and "nack" (with the error_detail message). The first line is the
port. `--port N` serves on a given port (a restart keeps the address).
`--tls-cert C --tls-key K --client-ca CA` serves over TLS and requires a
client certificate chaining to CA; each stream event then carries what
gRPC saw of the client's certificate (its auth context).
"""

import argparse
import hashlib
import json
import queue
import sys
import threading
from concurrent import futures

import grpc
from google.protobuf import any_pb2, json_format

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

# Imported for their descriptors: typed_config Anys inside listeners and
# clusters name these types, and json_format resolves them by name.
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401

PREFIX = "type.googleapis.com/"
TYPES = {
    "clusters": (PREFIX + "envoy.config.cluster.v3.Cluster", cluster_pb2.Cluster, "name"),
    "endpoints": (
        PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment",
        endpoint_pb2.ClusterLoadAssignment,
        "cluster_name",
    ),
    "listeners": (PREFIX + "envoy.config.listener.v3.Listener", listener_pb2.Listener, "name"),
    "routes": (
        PREFIX + "envoy.config.route.v3.RouteConfiguration",
        route_pb2.RouteConfiguration,
        "name",
    ),
    "secrets": (
        PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret",
        secret_pb2.Secret,
        "name",
    ),
}
KIND_OF_URL = {url: kind for kind, (url, _, _) in TYPES.items()}
# Wildcard types: a stream that names none (or "*") gets every resource of
# these; one that names some (gRPC's xDS client does) gets those.
WILDCARD = {"clusters", "listeners"}

out_lock = threading.Lock()


def emit(**event):
    with out_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


class Snapshots:
    def __init__(self):
        self.lock = threading.Lock()
        # kind -> (version, {name: Any})
        self.by_kind = {}
        self.streams = set()
        self.nonce = 0

    def next_nonce(self):
        with self.lock:
            self.nonce += 1
            return str(self.nonce)

    def get(self, node, kind):
        with self.lock:
            return self.by_kind.get((node, kind)) or self.by_kind.get(("", kind))

    def set(self, kind, version, resources, node="", merge=False):
        url, cls, key = TYPES[kind]
        packed = {}
        if merge:
            with self.lock:
                packed = dict((self.by_kind.get((node, kind)) or ("", {}))[1])
        for r in resources:
            msg = json_format.ParseDict(r, cls())
            a = any_pb2.Any()
            a.Pack(msg)
            packed[getattr(msg, key)] = a
        with self.lock:
            self.by_kind[(node, kind)] = (version, packed)
            streams = list(self.streams)
        for s in streams:
            if not node or s.node == node:
                s.push(kind)


class Stream:
    def __init__(self, snaps):
        self.snaps = snaps
        self.out = queue.Queue()
        self.names = {}  # kind -> set of names (EDS/RDS)
        self.subscribed = set()
        self.sent_nonce = {}
        self.closed = False
        self.node = ""

    def push(self, kind):
        if kind not in self.subscribed:
            return
        snap = self.snaps.get(self.node, kind)
        if snap is None:
            return
        version, packed = snap
        asked = self.names.get(kind, set()) - {"*"}
        if kind in WILDCARD and not asked:
            chosen = list(packed.values())
        else:
            chosen = [packed[n] for n in sorted(self.names.get(kind, ())) if n in packed]
        nonce = self.snaps.next_nonce()
        self.sent_nonce[kind] = nonce
        resp = discovery_pb2.DiscoveryResponse(
            version_info=version, resources=chosen, type_url=TYPES[kind][0], nonce=nonce
        )
        emit(event="response", type=kind, version=version, nonce=nonce, count=len(chosen))
        self.out.put(resp)

    def on_request(self, req):
        if req.HasField("node") and req.node.id:
            self.node = req.node.id
        kind = KIND_OF_URL.get(req.type_url)
        names = sorted(req.resource_names)
        emit(
            event="request",
            type=kind or req.type_url,
            version=req.version_info,
            nonce=req.response_nonce,
            names=names,
            node=req.node.id if req.HasField("node") else "",
            cluster=req.node.cluster if req.HasField("node") else "",
        )
        if kind is None:
            return
        if req.HasField("error_detail"):
            emit(
                event="nack",
                node=self.node,
                type=kind,
                version=req.version_info,
                nonce=req.response_nonce,
                detail=req.error_detail.message,
            )
        elif req.response_nonce and req.response_nonce == self.sent_nonce.get(kind):
            emit(event="ack", node=self.node, type=kind, version=req.version_info, nonce=req.response_nonce)
        first = kind not in self.subscribed
        changed = set(names) != self.names.get(kind, set())
        self.subscribed.add(kind)
        self.names[kind] = set(names)
        # A new subscription, or new names: send what there is. A
        # reconnecting client that already holds the version gets it again
        # only if the names say so (first is per stream).
        if first or changed:
            self.push(kind)


class DeltaStream(Stream):
    """A delta stream: per type, what the client holds (name -> version);
    each push sends what differs and the names gone."""

    def __init__(self, snaps):
        super().__init__(snaps)
        self.has = {}  # kind -> {name: version}
        self.wildcard = set()
        self.nonce_version = {}

    def push(self, kind, force=False):
        if kind not in self.subscribed:
            return
        snap = self.snaps.get(self.node, kind)
        if snap is None:
            return
        version, packed = snap
        if kind in self.wildcard:
            wanted = dict(packed)
        else:
            wanted = {n: a for n, a in packed.items() if n in self.names.get(kind, set())}
        has = self.has.setdefault(kind, {})
        changed = []
        for name, a in sorted(wanted.items()):
            v = hashlib.sha256(a.value).hexdigest()[:12]
            if has.get(name) != v:
                changed.append(discovery_pb2.Resource(name=name, version=v, resource=a))
                has[name] = v
        removed = sorted(n for n in has if n not in wanted)
        for n in removed:
            del has[n]
        if not changed and not removed and not force:
            return
        nonce = self.snaps.next_nonce()
        self.sent_nonce[kind] = nonce
        self.nonce_version[nonce] = version
        resp = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            resources=changed,
            removed_resources=removed,
            type_url=TYPES[kind][0],
            nonce=nonce,
        )
        emit(event="response", type=kind, version=version, nonce=nonce,
             count=len(changed), removed=removed)
        self.out.put(resp)

    def on_request(self, req):
        if req.HasField("node") and req.node.id:
            self.node = req.node.id
        kind = KIND_OF_URL.get(req.type_url)
        emit(
            event="request",
            delta=True,
            type=kind or req.type_url,
            nonce=req.response_nonce,
            names=sorted(req.resource_names_subscribe),
            unsubscribe=sorted(req.resource_names_unsubscribe),
            initial=dict(req.initial_resource_versions),
            node=self.node,
            cluster=req.node.cluster if req.HasField("node") else "",
        )
        if kind is None:
            return
        version = self.nonce_version.get(req.response_nonce, "")
        if req.HasField("error_detail"):
            emit(event="nack", node=self.node, type=kind, version=version,
                 nonce=req.response_nonce, detail=req.error_detail.message)
        elif req.response_nonce and req.response_nonce == self.sent_nonce.get(kind):
            emit(event="ack", node=self.node, type=kind, version=version, nonce=req.response_nonce)
        first = kind not in self.subscribed
        if first:
            self.subscribed.add(kind)
            self.has[kind] = dict(req.initial_resource_versions)
            if kind in WILDCARD and (not req.resource_names_subscribe or "*" in req.resource_names_subscribe):
                self.wildcard.add(kind)
        names = self.names.setdefault(kind, set())
        before = set(names)
        names |= set(req.resource_names_subscribe) - {"*"}
        names -= set(req.resource_names_unsubscribe)
        if first or names != before:
            self.push(kind)


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, snaps):
        self.snaps = snaps

    def DeltaAggregatedResources(self, request_iterator, context):
        return self.serve(DeltaStream(self.snaps), request_iterator, context)

    def StreamAggregatedResources(self, request_iterator, context):
        return self.serve(Stream(self.snaps), request_iterator, context)

    def serve(self, stream, request_iterator, context):
        with self.snaps.lock:
            self.snaps.streams.add(stream)
        peer = {k: [v.decode(errors="replace") for v in vs] for k, vs in context.auth_context().items()}
        emit(event="stream", open=True, peer=peer)

        def read():
            try:
                for req in request_iterator:
                    stream.on_request(req)
            except Exception as e:  # the client went away
                emit(event="stream_error", error=str(e))
            finally:
                stream.closed = True
                stream.out.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                resp = stream.out.get()
                if resp is None:
                    break
                yield resp
        finally:
            with self.snaps.lock:
                self.snaps.streams.discard(stream)
            emit(event="stream", open=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--client-ca")
    args = ap.parse_args()
    snaps = Snapshots()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(snaps), server)
    if args.tls_cert:
        read = lambda p: open(p, "rb").read()  # noqa: E731
        creds = grpc.ssl_server_credentials(
            [(read(args.tls_key), read(args.tls_cert))],
            root_certificates=read(args.client_ca),
            require_client_auth=True,
        )
        port = server.add_secure_port(f"127.0.0.1:{args.port}", creds)
    else:
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    emit(event="port", port=port)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            if cmd["op"] in ("set", "put"):
                snaps.set(cmd["type"], cmd["version"], cmd["resources"], cmd.get("node", ""),
                          merge=cmd["op"] == "put")
                emit(event="set", type=cmd["type"], version=cmd["version"])
        except Exception as e:
            emit(event="script_error", error=str(e), line=line)
    server.stop(0)


if __name__ == "__main__":
    main()
