#!/usr/bin/env python3
"""An OTLP/HTTP trace receiver for tests: decodes each POST /v1/traces body
with the official OpenTelemetry protobuf definitions (PyPI
`opentelemetry-proto`) and prints one JSON object per span on stdout.

    otlp_receiver.py [--delay SECONDS]

Prints `port N` first (it listens on 127.0.0.1, port 0). With --delay it
sleeps that long before answering each request (a slow collector).
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

LOCK = threading.Lock()
DELAY = float(sys.argv[sys.argv.index("--delay") + 1]) if "--delay" in sys.argv else 0.0


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def emit(span):
    # One line per span, whole: the server answers on several threads.
    with LOCK:
        sys.stdout.write(json.dumps(span) + "\n")
        sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        if DELAY:
            time.sleep(DELAY)
        ok = self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
        if ok:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        emit({
                            "service": resource.get("service.name"),
                            "scope": ss.scope.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "name": s.name,
                            "kind": s.kind,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                            "events": [
                                {"name": e.name, "time": e.time_unix_nano,
                                 "attributes": {kv.key: value(kv.value) for kv in e.attributes}}
                                for e in s.events
                            ],
                            "status": {"code": s.status.code, "message": s.status.message},
                        })
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if ok else 400)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that gave up on a --delay answer (the exporter's
        # timeout) resets the connection: expected, not worth a trace.
        pass


server = Server(("127.0.0.1", 0), Handler)
print(f"port {server.server_address[1]}", flush=True)
server.serve_forever()
