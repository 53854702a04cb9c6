#!/usr/bin/env python3
"""A peer that shuts down its writing side gets its replies cut, the last one mid-line.

    python3 tests/fuzz/findings/daemon/half-close-cuts-replies.py [BUILD]   # BUILD: build (default)

Starts BUILD/weightd (host backend) on a temporary socket, loads the harness's
/tmp/weightd-fuzz/wide.safetensors (1200 tensors; run build/fuzz/fuzz_daemon
once to write it), then sends 12 `info` requests (213 KB of reply each) and
shuts down its writing side (shutdown(SHUT_WR), as `socat` or `nc -N` do at
the end of their input), waits a second and reads everything. Exit status 1
when replies are missing or the stream ends inside a line (the bug).

on_conn_event (daemon/server.c) takes the end of the peer's stream
(wp_reader_fill returning 0) for a closed connection and calls conn_close at
once; on_conn_closed frees the writer (wp_writer_free) with the replies the
socket had not taken, one of them partly sent.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

build = sys.argv[1] if len(sys.argv) > 1 else "build"
tmp = tempfile.mkdtemp(prefix="wd-halfclose-")
sock = os.path.join(tmp, "weightd.sock")
d = subprocess.Popen([os.path.join(build, "weightd"), "--backend", "host", "--socket", sock, "--log-level", "warning"])
for _ in range(100):
    if os.path.exists(sock):
        break
    time.sleep(0.05)
c = socket.socket(socket.AF_UNIX)
c.connect(sock)
f = c.makefile("rb")
c.sendall(b'{"id":1,"op":"hello","args":{"version":"1.0"}}\n'
          b'{"id":2,"op":"load","args":{"path":"/tmp/weightd-fuzz/wide.safetensors","name":"wide"}}\n')
while True:
    m = json.loads(f.readline())
    if m.get("id") == 2 and "ok" in m:
        assert m["ok"], m
        break
N = 12
c.sendall("".join(json.dumps({"id": 10 + i, "op": "info", "args": {"name": "wide"}}) + "\n"
                  for i in range(N)).encode())
c.shutdown(socket.SHUT_WR)  # no more requests; the replies are still wanted
time.sleep(1.0)
buf = b""
while True:
    chunk = c.recv(1 << 20)
    if not chunk:
        break
    buf += chunk
lines = buf.split(b"\n")
print("replies: %d of %d; the stream ends in %d bytes of a line" % (len(lines) - 1, N, len(lines[-1])))
d.terminate()
d.wait(timeout=10)
sys.exit(0 if len(lines) - 1 == N and not lines[-1] else 1)
