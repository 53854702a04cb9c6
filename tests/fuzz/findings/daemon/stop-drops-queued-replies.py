#!/usr/bin/env python3
"""A daemon that stops drops what it has queued for a client that reads slowly.

    python3 tests/fuzz/findings/daemon/stop-drops-queued-replies.py [BUILD]   # BUILD: build (default)

Starts BUILD/weightd (host backend) on a temporary socket, loads the harness's
/tmp/weightd-fuzz/moe (run build/fuzz/fuzz_daemon once to write it), then
sends 1000 `info` requests and a `shutdown` on one connection and reads the
replies slowly (64 KiB, then 0.2 s). Exit status 1 when replies are missing
(the bug), 0 when all 1001 came.

wd_server_stop (daemon/server.c) flushes each connection once, then calls
wd_server_maybe_finish, which (no job running) calls conn_close on every
connection at once; on_conn_closed frees the writer (wp_writer_free) with
whatever the socket did not take. So the client loses the end of its stream,
the shutdown's own reply included, although the comment in wd_server_stop
says that clients get what is already queued for them.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

build = sys.argv[1] if len(sys.argv) > 1 else "build"
tmp = tempfile.mkdtemp(prefix="wd-stopdrop-")
sock = os.path.join(tmp, "weightd.sock")
d = subprocess.Popen([os.path.join(build, "weightd"), "--backend", "host", "--host-devices", "2",
                      "--host-capacity", "256MiB", "--socket", sock, "--log-level", "warning"])
for _ in range(100):
    if os.path.exists(sock):
        break
    time.sleep(0.05)
c = socket.socket(socket.AF_UNIX)
c.connect(sock)


def send(i, op, args=None):
    m = {"id": i, "op": op}
    if args is not None:
        m["args"] = args
    c.sendall((json.dumps(m) + "\n").encode())


send(1, "hello", {"version": "1.0"})
send(2, "load", {"path": "/tmp/weightd-fuzz/moe", "name": "moe", "devices": [0, 1], "placement": "expert-parallel"})
f = c.makefile("rb")
while True:
    m = json.loads(f.readline())
    if m.get("id") == 2 and "ok" in m:
        assert m["ok"], m
        break
N = 1000
body = "".join(json.dumps({"id": 100 + i, "op": "info", "args": {"name": "moe"}}) + "\n" for i in range(N))
body += json.dumps({"id": 99999, "op": "shutdown"}) + "\n"
threading.Thread(target=lambda: c.sendall(body.encode()), daemon=True).start()
time.sleep(1.0)  # nothing read for a second
buf = b""
while True:
    chunk = c.recv(65536)
    if not chunk:
        break
    buf += chunk
    time.sleep(0.2)  # then slowly
lines = buf.split(b"\n")
ids = {json.loads(l).get("id") for l in lines[:-1]}
print("replies: %d of %d; the shutdown's reply: %s; a cut line at the end: %d bytes; daemon exit status %d"
      % (len(lines) - 1, N + 1, 99999 in ids, len(lines[-1]), d.wait(timeout=10)))
sys.exit(0 if len(lines) - 1 == N + 1 else 1)
