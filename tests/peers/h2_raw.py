"""A raw HTTP/2 client (the `h2` package from PyPI) for tests that need
frames a normal client never sends.

    h2_raw.py mux ADDR N          N streams at once on one connection; prints
                                  {"ok": count whose body is their own path}
    h2_raw.py flood ADDR KIND     sends one abuse pattern; prints how the
                                  connection ended: {"closed": bool,
                                  "goaway": error code name or null, "secs": float}
    h2_raw.py steps ADDR          one connection, driven from stdin, a line each:
                                  "GET /path" sends a request and prints
                                  {"status", "body", "goaway"} when it ends;
                                  "WAIT S" reads for S seconds and prints
                                  {"goaway": error code name or null, "closed"}
"""
import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.events
import h2.settings
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame, WindowUpdateFrame, DataFrame


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn, host + ":" + port


def req_headers(authority, path, method="GET"):
    return [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)]


def mux(addr, n):
    s, conn, auth = connect(addr)
    bodies, done = {}, set()
    paths = {}
    for i in range(n):
        sid = conn.get_next_available_stream_id()
        paths[sid] = "/uri/%d?q=%d" % (i, i)
        bodies[sid] = b""
        conn.send_headers(sid, req_headers(auth, paths[sid]), end_stream=True)
        s.sendall(conn.data_to_send())
        # Read what is there, so that the server's stream limit is respected.
        while len([x for x in paths if x not in done]) >= 90:
            pump(s, conn, bodies, done)
    deadline = time.time() + 30
    while len(done) < n and time.time() < deadline:
        pump(s, conn, bodies, done)
    ok = sum(1 for sid in paths if bodies[sid].decode(errors="replace") == paths[sid] + "\n")
    print(json.dumps({"ok": ok, "done": len(done)}))


def pump(s, conn, bodies, done):
    data = s.recv(65536)
    if not data:
        raise SystemExit("connection closed")
    for ev in conn.receive_data(data):
        if isinstance(ev, h2.events.DataReceived):
            bodies[ev.stream_id] += ev.data
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            done.add(ev.stream_id)
    s.sendall(conn.data_to_send())


def steps(addr):
    s, conn, auth = connect(addr)
    goaway = [None]
    closed = [False]
    # The server's bytes not yet scanned for frames; the client preface
    # is ours, so the server's stream starts at a frame boundary.
    raw = [b""]

    def read_events(timeout):
        s.settimeout(timeout)
        try:
            data = s.recv(65536)
        except socket.timeout:
            return []
        if not data:
            closed[0] = True
            return []
        # GOAWAY is read off the wire first: this library refuses frames
        # that may follow it in the same read (h2's graceful shutdown
        # sends a PING after it), losing the code with the exception.
        raw[0] += data
        while len(raw[0]) >= 9:
            length = int.from_bytes(raw[0][:3], "big")
            if len(raw[0]) < 9 + length:
                break
            if raw[0][3] == 0x7 and goaway[0] is None:
                code = int.from_bytes(raw[0][9 + 4:9 + 8], "big")
                goaway[0] = h2.errors.ErrorCodes(code).name
            raw[0] = raw[0][9 + length:]
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            if goaway[0] is None:
                raise
            return []
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                goaway[0] = h2.errors.ErrorCodes(ev.error_code).name
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        s.sendall(conn.data_to_send())
        return events

    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "GET":
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, req_headers(auth, cmd[1]), end_stream=True)
            s.sendall(conn.data_to_send())
            status, body, ended = None, b"", False
            deadline = time.time() + 20
            while not ended and not closed[0] and time.time() < deadline:
                for ev in read_events(1):
                    if getattr(ev, "stream_id", None) != sid:
                        continue
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = int(dict(ev.headers)[":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                    elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                        ended = True
            out = {"status": status, "body": body.decode(errors="replace"), "goaway": goaway[0]}
        elif cmd and cmd[0] == "WAIT":
            deadline = time.time() + float(cmd[1])
            while goaway[0] is None and not closed[0] and time.time() < deadline:
                read_events(max(0.01, deadline - time.time()))
            out = {"goaway": goaway[0], "closed": closed[0]}
        else:
            out = {"error": "unknown command %r" % line}
        print(json.dumps(out), flush=True)


def flood(addr, kind):
    s, conn, auth = connect(addr)
    parts = []
    if kind == "premature_reset":
        # Streams that reach the upstream and are then cancelled, round
        # after round (Envoy's premature-reset rule catches this).
        try:
            for _ in range(4):
                sids = []
                for _ in range(90):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, req_headers(auth, "/slow"), end_stream=True)
                    sids.append(sid)
                s.sendall(conn.data_to_send())
                time.sleep(0.2)
                for sid in sids:
                    conn.reset_stream(sid)
                s.sendall(conn.data_to_send())
                time.sleep(0.1)
        except OSError:
            pass
    elif kind == "rapid_reset":
        # Open and reset streams as fast as possible (CVE-2023-44487).
        for _ in range(2000):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, req_headers(auth, "/uri/rr"), end_stream=True)
            conn.reset_stream(sid)
        parts.append(conn.data_to_send())
    elif kind == "continuation":
        # One HEADERS without END_HEADERS, then endless CONTINUATION frames.
        f = HeadersFrame(1)
        f.data = conn.encoder.encode(req_headers(auth, "/uri/flood"))
        parts.append(f.serialize())
        junk = conn.encoder.encode([("x-junk", "a" * 1000)])
        for _ in range(20000):
            c = ContinuationFrame(1)
            c.data = junk
            parts.append(c.serialize())
    elif kind == "ping":
        for i in range(20000):
            p = PingFrame(0)
            p.opaque_data = i.to_bytes(8, "big")
            parts.append(p.serialize())
    elif kind == "settings":
        for _ in range(20000):
            parts.append(SettingsFrame(0, settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100}).serialize())
    elif kind == "hpack_bomb":
        # One large header, then many references to it from the dynamic table.
        big = [("x-bomb", "b" * 4000)]
        headers = req_headers(auth, "/uri/bomb") + big * 2000
        f = HeadersFrame(1)
        f.data = conn.encoder.encode(headers)
        f.flags.add("END_HEADERS")
        f.flags.add("END_STREAM")
        parts.append(f.serialize())
    elif kind == "empty_data":
        f = HeadersFrame(1)
        f.data = conn.encoder.encode(req_headers(auth, "/uri/post", "POST"))
        f.flags.add("END_HEADERS")
        parts.append(f.serialize())
        for _ in range(50000):
            parts.append(DataFrame(1, data=b"").serialize())
    elif kind == "window_update":
        for _ in range(20000):
            parts.append(WindowUpdateFrame(0, window_increment=1).serialize())
    else:
        raise SystemExit("unknown flood " + kind)
    raw = b"".join(parts)
    start = time.time()
    goaway = None
    closed = False
    try:
        s.settimeout(10)
        sent = 0
        while sent < len(raw):
            sent += s.send(raw[sent:sent + 65536])
        s.shutdown(socket.SHUT_WR)
    except OSError:
        closed = True
    s.settimeout(10)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                closed = True
                break
            try:
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ConnectionTerminated):
                        goaway = ev.error_code.name if hasattr(ev.error_code, "name") else str(ev.error_code)
            except Exception:
                pass
    except socket.timeout:
        pass
    except OSError:
        closed = True
    print(json.dumps({"closed": closed, "goaway": goaway, "secs": round(time.time() - start, 3)}))


if __name__ == "__main__":
    if sys.argv[1] == "mux":
        mux(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "steps":
        steps(sys.argv[2])
    else:
        flood(sys.argv[2], sys.argv[3])
