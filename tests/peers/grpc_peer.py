"""A real gRPC server and client (grpcio, generic handlers: no generated
code) for the gRPC end-to-end test.

    grpc_peer.py server            prints the port it listens on, serves until killed
    grpc_peer.py client ADDR       runs every case through ADDR, prints one JSON object
    grpc_peer.py xds-unary TARGET  one call to an xds:/// target, prints one JSON object
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc

MiB = 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", 16 * MiB),
    ("grpc.max_receive_message_length", 16 * MiB),
]
ident = lambda b: b  # noqa: E731  (messages are raw bytes)
cancelled = threading.Event()


def unary(req, ctx):
    return req


def server_stream(req, ctx):
    for i in range(int(req)):
        yield b"item-%d" % i


def client_stream(it, ctx):
    parts = [m for m in it]
    return b"%d:%d" % (len(parts), sum(len(p) for p in parts))


def bidi(it, ctx):
    for m in it:
        yield b"echo:" + m


def slow(req, ctx):
    time.sleep(2)
    return b"late"


def deadline(req, ctx):
    return str(ctx.time_remaining()).encode()


def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "nope")


def endless(req, ctx):
    # Ends only when the call does: the client's cancel reached this
    # server (its 30 s deadline is far past the 5 s the check waits).
    # grpcio may close the generator at a `yield` instead of letting
    # is_active() turn false, so the signal is set in `finally`.
    i = 0
    try:
        while ctx.is_active():
            yield b"tick-%d" % i
            i += 1
            time.sleep(0.05)
    finally:
        cancelled.set()


def was_cancelled(req, ctx):
    return b"yes" if cancelled.wait(5) else b"no"


def metadata(req, ctx):
    md = dict(ctx.invocation_metadata())
    return json.dumps({k: v for k, v in md.items() if isinstance(v, str)}).encode()


METHODS = {
    "/t.T/Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
    "/t.T/ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, ident, ident),
    "/t.T/ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, ident, ident),
    "/t.T/Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
    "/t.T/Slow": grpc.unary_unary_rpc_method_handler(slow, ident, ident),
    "/t.T/Deadline": grpc.unary_unary_rpc_method_handler(deadline, ident, ident),
    "/t.T/Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
    "/t.T/Endless": grpc.unary_stream_rpc_method_handler(endless, ident, ident),
    "/t.T/WasCancelled": grpc.unary_unary_rpc_method_handler(was_cancelled, ident, ident),
    "/t.T/Metadata": grpc.unary_unary_rpc_method_handler(metadata, ident, ident),
}


class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        return METHODS.get(details.method)


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def code_of(f):
    try:
        f()
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def client(addr):
    ch = grpc.insecure_channel(addr, options=OPTIONS)
    grpc.channel_ready_future(ch).result(timeout=10)
    u = lambda m: ch.unary_unary(m, ident, ident)  # noqa: E731
    out = {}
    out["unary"] = u("/t.T/Unary")(b"ping", timeout=10).decode()
    out["server_stream"] = [m.decode() for m in ch.unary_stream("/t.T/ServerStream", ident, ident)(b"5", timeout=10)]
    msgs = iter([b"x" * (i + 1) for i in range(10)])
    out["client_stream"] = ch.stream_unary("/t.T/ClientStream", ident, ident)(msgs, timeout=10).decode()
    out["bidi"] = [m.decode() for m in ch.stream_stream("/t.T/Bidi", ident, ident)(iter([b"a", b"b", b"c"]), timeout=10)]
    big = bytes(range(256)) * (4 * MiB // 256)
    back = u("/t.T/Unary")(big, timeout=30)
    out["big_ok"] = back == big
    out["big_len"] = len(back)
    out["deadline"] = code_of(lambda: u("/t.T/Slow")(b"", timeout=0.3))
    out["remaining"] = float(u("/t.T/Deadline")(b"", timeout=5).decode() or "-1")
    out["fail"] = code_of(lambda: u("/t.T/Fail")(b"", timeout=10))
    call = ch.unary_stream("/t.T/Endless", ident, ident)(b"", timeout=30)
    got = [next(call), next(call)]
    call.cancel()
    out["cancel_got"] = len(got)
    out["server_saw_cancel"] = u("/t.T/WasCancelled")(b"", timeout=10).decode()
    out["no_upstream"] = code_of(lambda: u("/t.Down/X")(b"", timeout=10))
    md = json.loads(u("/t.T/Metadata")(b"", timeout=10).decode())
    out["identity_header"] = md.get("x-pilotfish-peer-identity", "")
    # Many concurrent calls on one channel: each gets its own answer.
    def one(i):
        return u("/t.T/Unary")(b"n%d" % i, timeout=20) == b"n%d" % i
    with futures.ThreadPoolExecutor(max_workers=16) as pool:
        out["concurrent_ok"] = sum(pool.map(one, range(200)))
    print(json.dumps(out), flush=True)


def xds_unary(target):
    """One unary call through gRPC's own xDS client (GRPC_XDS_BOOTSTRAP
    names the management server): a client nobody here wrote, to check
    that the test management server's snapshots mean what Envoy's API says."""
    ch = grpc.insecure_channel(target, options=OPTIONS)
    out = {}
    try:
        out["unary"] = ch.unary_unary("/t.T/Unary", ident, ident)(b"via-xds", timeout=20).decode()
    except grpc.RpcError as e:
        out["error"] = [e.code().name, e.details() or ""]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    elif sys.argv[1] == "xds-unary":
        xds_unary(sys.argv[2])
    else:
        client(sys.argv[2])
