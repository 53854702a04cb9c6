#!/usr/bin/env python3
"""Connection benchmark: weightd under many concurrent clients, host backend.

One real weightd (host backend, a temporary socket, --max-clients 1024)
holds a small synthetic checkpoint written by weightd-mkckpt. Then, in two
scenarios of one run, side by side:
  (a) alone: CONNS client connections, each repeating list, info, attach,
      detach for SECONDS;
  (b) beside loads: the same, while another client loads and unloads a
      second checkpoint in a loop.

The clients: PROCS worker processes (this script, `worker`), each one epoll
loop over its share of the connections, non-blocking sockets, one request in
flight per connection (a closed loop, no think time). No threads: on a
2-core machine threads under one GIL would add switching and no
concurrency, and asyncio cannot receive SCM_RIGHTS. The loop is a raw
client: attach reads the stream (the "attach" events, then the reply) with
recvmsg, counts and closes the descriptors, checks the counts against the
reply, then detaches; it maps nothing. Replies to list and info are checked
(id, "ok": true, the model named) without being parsed.

Connections are opened all at once (a burst), before the timed part.
connect() is non-blocking: a refusal because the listen backlog is full
(EAGAIN; the backlog is the daemon's listen_backlog, read from its stats,
capped by net.core.somaxconn) is counted, and the
connection tries again every 10 ms for up to --connect-timeout seconds; a
connection that never gets in, or that is refused with EBUSY (max_clients),
is reported as a connect failure, apart from the requests' errors.

Measured per scenario and operation: requests, errors (by code), req/s,
p50/p99/max latency (request sent to reply read, the attach's whole stream
included), reply bytes; the daemon's RSS (VmRSS and its anon/file/shmem
parts, /proc/PID/status) and open descriptors (/proc/PID/fd), sampled
every 100 ms: the baseline before the clients connect, the maximum while
they run, and after they have left; the CPU of the daemon's event loop,
of the whole daemon and of the clients. Problems (errors, connect failures,
backlog refusals, stalls, descriptors or memory not back at the baseline)
are listed in the output, never hidden.

Writes OUT/DATE-MACHINE-conns.json and .md and prints the table.

Usage: bench/conn_bench.py [--build build] [--work /tmp/wdconns] [--out bench/results] [--conns 500]
                           [--procs 4] [--seconds 20] [--machine NAME]
"""
import argparse
import array
import errno
import json
import os
import re
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "client", "python"))
sys.path.insert(0, HERE)
from load_bench import Daemon  # noqa: E402

OPS = ("list", "info", "attach", "detach")
MODEL, SIDE = "bench", "side"  # the model the clients use, the one loaded and unloaded beside them
MAX_FDS = 253
REPLY_HEAD = re.compile(rb'^\{"id":(\d+|null),"ok":(true|false)')


# ---- the worker: one epoll loop over many connections --------------------------------

class Conn:
    __slots__ = ("sock", "fd", "buf", "out", "state", "rid", "op", "t0", "lease", "fds", "events", "retry_at",
                 "eagain", "t_connect", "done")


class Worker:
    def __init__(self, sock_path, n, timeout, connect_timeout, dirname, tag):
        self.path, self.n, self.timeout, self.connect_timeout = sock_path, n, timeout, connect_timeout
        self.dir, self.tag = dirname, tag
        self.ep = select.epoll()
        self.conns = {}
        self.lat = {op: array.array("d") for op in OPS + ("connect",)}
        self.count = {op: 0 for op in OPS}
        self.reply_bytes = {op: 0 for op in OPS}
        self.errors = {}           # "op CODE" -> count
        self.error_samples = []    # the first few, in words
        self.fds_received = 0
        self.connect = {"eagain": 0, "ebusy": 0, "failed": 0, "other": {}, "connected": 0}
        self.deadline = None
        self.active = 0

    def error(self, op, code, text):
        key = "%s %s" % (op, code)
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.error_samples) < 10:
            self.error_samples.append("%s: %s: %s" % (op, code, text[:300]))

    # -- connecting

    def start_connect(self, c):
        c.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        c.fd = c.sock.fileno()
        try:
            c.sock.connect(self.path)
        except BlockingIOError:  # EAGAIN: the listen backlog is full
            c.eagain += 1
            self.connect["eagain"] += 1
            c.sock.close()
            c.sock = None
            c.retry_at = time.monotonic() + 0.01
            return
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno))
            self.connect["other"][name] = self.connect["other"].get(name, 0) + 1
            c.sock.close()
            c.sock = None
            c.retry_at = time.monotonic() + 0.01
            return
        c.retry_at = None
        self.conns[c.fd] = c
        self.ep.register(c.fd, select.EPOLLIN)
        c.rid += 1
        self.send(c, "hello", b'{"id":%d,"op":"hello","args":{"version":"1.0","client":"conn_bench"}}\n' % c.rid)

    def send(self, c, op, line):
        c.op, c.t0 = op, time.monotonic()
        try:
            n = c.sock.send(line)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.fail(c, op, errno.errorcode.get(e.errno, "OSError"), "send: %s" % e)
            return
        if n < len(line):
            c.out = line[n:]
            self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def request(self, c, op):
        c.rid += 1
        if op == "detach":
            line = b'{"id":%d,"op":"detach","args":{"lease":%d}}\n' % (c.rid, c.lease)
        else:
            line = b'{"id":%d,"op":"%s","args":{"name":"%s"}}\n' % (c.rid, op.encode(), MODEL.encode())
        c.fds = c.events = 0
        self.send(c, op, line)

    def fail(self, c, op, code, text):
        """The connection is lost (closed by the daemon, a stall, a broken stream)."""
        if c.state == "connecting":
            self.connect["failed"] += 1
            self.connect["other"][code] = self.connect["other"].get(code, 0) + 1
        self.error(op, code, text)
        self.drop(c)

    def drop(self, c):
        if c.state == "running":  # lost in the timed part
            c.state = "lost"
            self.active -= 1
        if c.sock is not None:
            self.conns.pop(c.fd, None)
            try:
                self.ep.unregister(c.fd)
            except OSError:
                pass
            c.sock.close()
            c.sock = None
        c.done = True

    # -- replies

    def on_readable(self, c):
        fds = array.array("i")
        try:
            data, anc, flags, _ = c.sock.recvmsg(262144, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                                 socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(c, c.op, errno.errorcode.get(e.errno, "OSError"), "recvmsg: %s" % e)
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        for fd in fds:
            os.close(fd)
        c.fds += len(fds)
        self.fds_received += len(fds)
        if flags & socket.MSG_CTRUNC:
            self.error(c.op, "MSG_CTRUNC", "more descriptors than a message may carry")
        if not data:
            self.fail(c, c.op if c.state != "connecting" else "connect", "ECONNRESET",
                      "the daemon closed the connection" + (" (%r)" % bytes(c.buf[:200]) if c.buf else ""))
            return
        c.buf += data
        while c.sock is not None:
            i = c.buf.find(b"\n")
            if i < 0:
                break
            line = bytes(c.buf[:i])
            del c.buf[:i + 1]
            self.on_line(c, line)

    def on_line(self, c, line):
        if line.startswith(b'{"event"'):
            c.events += 1
            self.reply_bytes[c.op] += len(line) + 1
            return
        now = time.monotonic()
        m = REPLY_HEAD.match(line)
        ok = bool(m) and m.group(2) == b"true"
        if not m or not ok or c.op in ("hello", "attach"):
            try:
                msg = json.loads(line)
            except ValueError:
                self.fail(c, c.op, "EBADMSG", "not JSON: %r" % line[:200])
                return
            ok = msg.get("ok") is True
        else:
            msg = None
        if m and m.group(1) != b"null" and int(m.group(1)) != c.rid:
            self.fail(c, c.op, "EPROTO", "reply to request %s, expected %d" % (m.group(1), c.rid))
            return
        if c.state == "connecting":
            if ok:
                c.state = "ready"
                self.connect["connected"] += 1
                self.lat["connect"].append(now - c.t_connect)
            else:
                err = msg.get("error") or {}
                code = err.get("code", "EPROTO")
                self.error("connect", code, err.get("message", ""))
                if code == "EBUSY":
                    self.connect["ebusy"] += 1
                else:
                    self.connect["other"][code] = self.connect["other"].get(code, 0) + 1
                self.connect["failed"] += 1
                self.drop(c)
            return
        op = c.op
        self.lat[op].append(now - c.t0)
        self.count[op] += 1
        self.reply_bytes[op] += len(line) + 1
        if not ok:
            err = msg.get("error") or {}
            self.error(op, err.get("code", "EPROTO"), err.get("message", ""))
            if msg.get("id") is None:  # a reply to no request: the daemon refused the line itself
                self.drop(c)
                return
            nxt = "list" if op in ("attach", "detach") else OPS[OPS.index(op) + 1]
        elif op == "attach":
            res = msg.get("result") or {}
            c.lease = res.get("lease")
            if c.fds != res.get("descriptors") or c.events != res.get("messages"):
                self.error(op, "ECOUNT", "%d descriptors in %d messages, the reply says %s in %s" %
                           (c.fds, c.events, res.get("descriptors"), res.get("messages")))
            nxt = "detach"
        elif op in ("list", "info") and MODEL.encode() not in line:
            self.error(op, "EMISSING", "the reply does not name the model: %r" % line[:200])
            nxt = OPS[OPS.index(op) + 1]
        else:
            nxt = OPS[(OPS.index(op) + 1) % len(OPS)]
        if now >= self.deadline and nxt != "detach":
            c.state = "finished"  # its cycle ends here; a lease it holds is given back first
            c.op = None
            self.active -= 1
            return
        self.request(c, nxt)

    # -- the phases

    def run_connect(self):
        pending = []
        for _ in range(self.n):
            c = Conn()
            c.sock, c.buf, c.out, c.state, c.rid, c.op, c.lease = None, bytearray(), b"", "connecting", 0, None, None
            c.fds = c.events = c.eagain = 0
            c.done = False
            c.t_connect = time.monotonic()
            c.retry_at = c.t_connect
            pending.append(c)
        self.all = pending
        give_up = time.monotonic() + self.connect_timeout
        for c in pending:
            self.start_connect(c)
        self.deadline = float("inf")
        while time.monotonic() < give_up:
            waiting = [c for c in self.all if not c.done and c.state == "connecting"]
            if not waiting:
                break
            for c in waiting:
                if c.sock is None and c.retry_at is not None and time.monotonic() >= c.retry_at:
                    self.start_connect(c)
            self.poll(0.005)
        for c in self.all:
            if not c.done and c.state == "connecting":
                self.connect["failed"] += 1
                self.error("connect", "ETIMEDOUT", "not connected and greeted after %.0f s (%d refusals with "
                           "EAGAIN)" % (self.connect_timeout, c.eagain))
                self.drop(c)
        self.connect["connections"] = self.n

    def poll(self, timeout):
        for fd, ev in self.ep.poll(timeout, 256):
            c = self.conns.get(fd)
            if c is None:
                continue
            if ev & select.EPOLLOUT and c.out:
                try:
                    n = c.sock.send(c.out)
                    c.out = c.out[n:]
                except BlockingIOError:
                    pass
                except OSError as e:
                    self.fail(c, c.op, errno.errorcode.get(e.errno, "OSError"), "send: %s" % e)
                    continue
                if not c.out:
                    self.ep.modify(fd, select.EPOLLIN)
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self.on_readable(c)

    def run_ops(self, go, deadline):
        self.deadline = deadline
        while time.monotonic() < go:
            time.sleep(min(0.001, max(0.0, go - time.monotonic())))
        self.t_go = time.monotonic()
        for c in self.all:
            if c.state == "ready":
                c.state = "running"
                self.active += 1
        for c in self.all:
            if c.state == "running":
                self.request(c, "list")
        last_check = self.t_go
        while self.active > 0:
            self.poll(0.05)
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                for c in self.all:
                    if c.state == "running" and c.op and now - c.t0 > self.timeout:
                        self.fail(c, c.op, "ESTALL", "no reply after %.0f s" % self.timeout)
        self.t_end = time.monotonic()

    def results(self):
        for op, lat in self.lat.items():
            with open(os.path.join(self.dir, "%s-%s.lat" % (self.tag, op)), "wb") as f:
                lat.tofile(f)
        cpu = os.times()
        return {"count": self.count, "reply_bytes": self.reply_bytes, "errors": self.errors,
                "error_samples": self.error_samples, "connect": self.connect, "fds_received": self.fds_received,
                "t_go": self.t_go, "t_end": self.t_end, "cpu": cpu.user + cpu.system,
                "lost": sum(1 for c in self.all if c.state == "lost")}


def worker_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("sock")
    ap.add_argument("n", type=int)
    ap.add_argument("dir")
    ap.add_argument("tag")
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--connect-timeout", type=float, default=10)
    a = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    w = Worker(a.sock, a.n, a.timeout, a.connect_timeout, a.dir, a.tag)
    print("STARTED", flush=True)
    sys.stdin.readline()                      # CONNECT
    w.run_connect()
    print(json.dumps(w.connect), flush=True)
    go, deadline = map(float, sys.stdin.readline().split()[1:])  # GO t_go t_deadline
    w.run_ops(go, deadline)
    print(json.dumps(w.results()), flush=True)
    sys.stdin.readline()                      # CLOSE
    for c in w.all:
        w.drop(c)
    print("CLOSED", flush=True)


# ---- the driver ---------------------------------------------------------------------------

def proc_status(pid):
    """RSS (kB: total, anon, file, shmem), descriptors, threads of pid."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0])
            elif k == "Threads":
                out[k] = int(v)
    out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    return out


def heap_in_use(pid):
    """glibc's own figures in the daemon (mallinfo2, through gdb): bytes in
    use and the heap's size. RSS alone cannot tell a leak from freed memory
    that malloc keeps. None where gdb cannot do it."""
    if not shutil.which("gdb"):
        return None
    try:
        out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "print mallinfo2()"], capture_output=True,
                             text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return None
    f = dict(re.findall(r"(arena|uordblks|fordblks|hblkhd) = (\d+)", out))
    if "uordblks" not in f:
        return None
    return {"in_use": int(f["uordblks"]) + int(f.get("hblkhd", 0)), "heap": int(f["arena"]),
            "free_kept": int(f["fordblks"])}


def machine_busy_seconds():
    """CPU seconds the whole machine spent busy (every core; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid, tid=None):
    path = "/proc/%d/task/%d/stat" % (pid, tid) if tid else "/proc/%d/stat" % pid
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """The daemon's /proc figures every `every` seconds, with a phase label."""

    def __init__(self, pid, every=0.1):
        super().__init__(daemon=True)
        self.pid, self.every, self.phase, self.samples = pid, every, "idle", []
        self.stop_ev = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.stop_ev.is_set():
            try:
                s = proc_status(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            s["t"] = round(time.monotonic() - t0, 3)
            s["phase"] = self.phase
            self.samples.append(s)
            self.stop_ev.wait(self.every)

    def of(self, phase):
        return [s for s in self.samples if s["phase"] == phase]


class Loader(threading.Thread):
    """Another client: loads and unloads the second checkpoint in a loop."""

    def __init__(self, sock, path):
        super().__init__(daemon=True)
        self.sock, self.path = sock, path
        self.stop_ev = threading.Event()
        self.loads, self.unloads, self.errors, self.load_seconds, self.unload_seconds = 0, 0, [], [], []

    def run(self):
        import weightd
        try:
            with weightd.Client(self.sock, timeout=120) as c:
                while not self.stop_ev.is_set():
                    try:
                        t0 = time.monotonic()
                        c.load(self.path, name=SIDE)
                        self.load_seconds.append(time.monotonic() - t0)
                        self.loads += 1
                        t0 = time.monotonic()
                        c.unload(SIDE)
                        self.unload_seconds.append(time.monotonic() - t0)
                        self.unloads += 1
                    except weightd.WeightdError as e:
                        self.errors.append("%s: %s" % (e.code, e.message))
                        time.sleep(0.1)
        except Exception as e:  # noqa: BLE001 (reported, not hidden)
            self.errors.append("loader: %r" % e)


def pct(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def read_lat(dirname, tags, op):
    out = array.array("d")
    for tag in tags:
        path = os.path.join(dirname, "%s-%s.lat" % (tag, op))
        with open(path, "rb") as f:
            out.frombytes(f.read())
    return sorted(out)


def resources(samples_before, samples_during, samples_after):
    def fig(key):
        base = statistics.median(s[key] for s in samples_before) if samples_before else None
        peak = max(s[key] for s in samples_during) if samples_during else None
        after = samples_after[-1][key] if samples_after else None
        return {"baseline": base, "max": peak, "after": after}
    return {k: fig(k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "fds", "Threads")}


def probe(d, *args):
    """A weightctl command's result, or {"error": why}: a daemon at its
    max_clients refuses the probe too (EBUSY), and that is reported."""
    try:
        return d.run(*args)
    except RuntimeError as e:
        return {"error": " ".join(str(e).split())[:300]}


def stop_daemon(d):
    """load_bench's stop (weightctl shutdown); SIGTERM if the daemon does not
    take it (it refuses every connection at its max_clients)."""
    try:
        d.stop()
    except (subprocess.TimeoutExpired, OSError) as e:
        print("weightd did not stop on `weightctl shutdown` (%s): SIGTERM" % e, file=sys.stderr)
        d.p.terminate()
        try:
            d.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.p.kill()
            d.p.wait()


def scenario(name, a, d, sampler, ckpt2, dirname):
    """One scenario: the burst of connections, SECONDS of operations, the clients leaving."""
    pid = d.p.pid
    print("scenario %s: %d connections in %d processes, %g s%s" % (
        name, a.conns, a.procs, a.seconds, ", beside loads of a second checkpoint" if ckpt2 else ""), flush=True)
    log_at = os.path.getsize(d.log.name)
    heap_before = heap_in_use(pid) if a.gdb else None
    sampler.phase = name + ":before"
    time.sleep(1.0)
    shares = [a.conns // a.procs + (1 if i < a.conns % a.procs else 0) for i in range(a.procs)]
    tags = ["%s-%d" % (name, i) for i in range(a.procs)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", d.sock, str(n), dirname, tag,
                               "--timeout", str(a.timeout), "--connect-timeout", str(a.connect_timeout)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for n, tag in zip(shares, tags)]
    try:
        return run_scenario(name, a, d, sampler, ckpt2, dirname, pid, procs, tags, log_at, heap_before)
    finally:
        for p in procs:  # a scenario that failed leaves none of its clients behind
            if p.poll() is None:
                p.kill()
                p.wait()


def run_scenario(name, a, d, sampler, ckpt2, dirname, pid, procs, tags, log_at, heap_before):
    for p in procs:
        assert p.stdout.readline().strip() == "STARTED"
    sampler.phase = name + ":connect"
    t_connect = time.monotonic()
    for p in procs:  # every process starts its connections at once
        p.stdin.write("CONNECT\n")
        p.stdin.flush()
    connects = [json.loads(p.stdout.readline()) for p in procs]
    connect_wall = time.monotonic() - t_connect
    loader = None
    if ckpt2:
        loader = Loader(d.sock, ckpt2)
        loader.start()
        time.sleep(0.2)  # the first load under way
    loop0, all0, mach0, me0 = cpu_seconds(pid, pid), cpu_seconds(pid), machine_busy_seconds(), sum(os.times()[:2])
    go = time.monotonic() + 0.2
    sampler.phase = name + ":run"
    for p in procs:
        p.stdin.write("GO %f %f\n" % (go, go + a.seconds))
        p.stdin.flush()
    outs = []
    for p in procs:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("a worker died; see its stderr above")
        outs.append(json.loads(line))
    t_end = max(o["t_end"] for o in outs)
    loop_cpu, all_cpu = cpu_seconds(pid, pid) - loop0, cpu_seconds(pid) - all0
    mach_cpu, me_cpu = machine_busy_seconds() - mach0, sum(os.times()[:2]) - me0
    # the figures while every client is still connected but idle
    st, ls = probe(d, "stats"), probe(d, "leases")
    idle_conns = st.get("connections", st.get("error"))
    leases_idle = len(ls["leases"]) if "leases" in ls else ls.get("error")
    if loader:
        loader.stop_ev.set()
        loader.join(timeout=300)
    sampler.phase = name + ":closing"
    for p in procs:
        p.stdin.write("CLOSE\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdout.readline().strip() == "CLOSED"
        p.wait(timeout=60)
    t_closed = time.monotonic()
    # after: until the descriptors are back at the baseline (or SETTLE s), then one more second
    before = sampler.of(name + ":before")
    base_fds = statistics.median(s["fds"] for s in before)
    sampler.phase = name + ":after"
    settle = None
    while time.monotonic() - t_closed < a.settle:
        s = proc_status(pid)
        if s["fds"] <= base_fds + 1:  # +1: the probe's own connection may be counted
            settle = time.monotonic() - t_closed
            break
        time.sleep(0.05)
    time.sleep(1.0)
    sampler.phase = name + ":probe"  # the probes' own connections are not the daemon's figures after
    heap_after = heap_in_use(pid) if a.gdb else None
    st, ls, li = probe(d, "stats"), probe(d, "leases"), probe(d, "list")
    connections_after = st.get("connections", st.get("error"))
    leases_after = len(ls["leases"]) if "leases" in ls else ls.get("error")
    models_after = [m["name"] for m in li["models"]] if "models" in li else [li.get("error")]
    with open(d.log.name) as f:
        f.seek(log_at)
        log = f.read()
    log_lines = [l for l in log.splitlines() if re.search(r"\b(warning|error|refused|closed:)", l)]
    elapsed = t_end - go
    ops = {}
    for op in OPS:
        lat = read_lat(dirname, tags, op)
        n = sum(o["count"][op] for o in outs)
        errs = {}
        for o in outs:  # summed over the workers
            for k, v in o["errors"].items():
                if k.split(" ", 1)[0] == op:
                    errs[k.split(" ", 1)[1]] = errs.get(k.split(" ", 1)[1], 0) + v
        ops[op] = {"requests": n, "errors": sum(errs.values()), "error_codes": errs, "rps": n / elapsed,
                   "p50_ms": 1e3 * pct(lat, 50) if lat else None, "p99_ms": 1e3 * pct(lat, 99) if lat else None,
                   "max_ms": 1e3 * lat[-1] if lat else None,
                   "reply_bytes_mean": sum(o["reply_bytes"][op] for o in outs) / max(n, 1)}
    clat = read_lat(dirname, tags, "connect")
    con = {"connections": a.conns, "connected": sum(c["connected"] for c in connects),
           "backlog_refusals_eagain": sum(c["eagain"] for c in connects),
           "ebusy": sum(c["ebusy"] for c in connects), "failed": sum(c["failed"] for c in connects),
           "other": {}, "wall_s": connect_wall,
           "p50_ms": 1e3 * pct(clat, 50) if clat else None, "p99_ms": 1e3 * pct(clat, 99) if clat else None,
           "max_ms": 1e3 * clat[-1] if clat else None}
    for c in connects:
        for k, v in c["other"].items():
            con["other"][k] = con["other"].get(k, 0) + v
    other_errors = {}
    for o in outs:
        for k, v in o["errors"].items():
            if k.split(" ", 1)[0] not in OPS:
                other_errors[k] = other_errors.get(k, 0) + v
    res = {
        "name": name, "beside_loads": bool(ckpt2), "elapsed_s": elapsed, "ops": ops, "connect": con,
        "other_errors": other_errors,
        "error_samples": [e for o in outs for e in o["error_samples"]][:20],
        "connections_lost": sum(o["lost"] for o in outs),
        "fds_received_and_closed": sum(o["fds_received"] for o in outs),
        "cpu": {"daemon_loop_pct": 100 * loop_cpu / elapsed, "daemon_pct": 100 * all_cpu / elapsed,
                "clients_pct": 100 * sum(o["cpu"] for o in outs) / elapsed,
                "driver_pct": 100 * me_cpu / elapsed,  # this process: the sampler and the loader
                "machine_busy_pct": 100 * mach_cpu / elapsed,  # every core: 100 per core busy
                "others_pct": 100 * (mach_cpu - all_cpu - me_cpu - sum(o["cpu"] for o in outs)) / elapsed},
        "daemon": resources(before, sampler.of(name + ":connect") + sampler.of(name + ":run"),
                            sampler.of(name + ":after")),
        "heap_before": heap_before, "heap_after": heap_after, "settle_s": settle,
        "connections_idle": idle_conns, "leases_idle": leases_idle,
        "connections_after": connections_after, "leases_after": leases_after, "models_after": models_after,
        "daemon_log": log_lines[:50], "daemon_log_lines": len(log_lines),
    }
    if loader:
        res["loader"] = {"loads": loader.loads, "unloads": loader.unloads, "errors": loader.errors[:20],
                         "load_s_median": statistics.median(loader.load_seconds) if loader.load_seconds else None,
                         "unload_s_median": statistics.median(loader.unload_seconds) if loader.unload_seconds
                         else None}
    res["problems"] = problems(res, a)
    return res


def problems(r, a):
    """What went wrong, in words: nothing of it is left out of the output."""
    out = []
    c = r["connect"]
    if c["connected"] < c["connections"]:
        out.append("%d of %d connections never got in (EBUSY %d, other %s)" % (
            c["connections"] - c["connected"], c["connections"], c["ebusy"], c["other"] or "none"))
    if c["backlog_refusals_eagain"]:
        out.append("connect() refused %d times with EAGAIN (the listen backlog of %d was full); "
                   "each connection tried again until it got in" % (c["backlog_refusals_eagain"], a.backlog))
    for op, o in r["ops"].items():
        if o["errors"]:
            out.append("%s: %d errors %s" % (op, o["errors"], o["error_codes"]))
    if r["other_errors"]:
        out.append("other errors: %s" % r["other_errors"])
    if r["connections_lost"]:
        out.append("%d connections lost during the run" % r["connections_lost"])
    dm = r["daemon"]
    if r["settle_s"] is None:
        out.append("descriptors not back at the baseline %d within %g s after the clients left: %d" % (
            dm["fds"]["baseline"], a.settle, dm["fds"]["after"]))
    hb, ha = r["heap_before"], r["heap_after"]
    if hb and ha and ha["in_use"] > hb["in_use"] + 512 * 1024:
        out.append("heap in use after the clients left: %d bytes, against %d before (mallinfo2)" % (
            ha["in_use"], hb["in_use"]))
    if dm["VmRSS"]["after"] > dm["VmRSS"]["baseline"] * 1.05 + 16384:
        out.append("RSS after the clients left is %d kB, against %d kB before" % (
            dm["VmRSS"]["after"], dm["VmRSS"]["baseline"]))
    if r["connections_after"] != 1 or r["leases_after"] != 0:
        out.append("after: %s connections (1 is the probe's), %s leases" % (r["connections_after"],
                                                                            r["leases_after"]))
    if not isinstance(r["connections_idle"], int) or not isinstance(r["leases_idle"], int):
        out.append("a probe while the clients were connected failed: %s / %s" % (r["connections_idle"],
                                                                              r["leases_idle"]))
    if r["cpu"]["others_pct"] > 10:
        out.append("other processes used %.0f%% of a core during the run: the figures are not of a quiet machine"
                   % r["cpu"]["others_pct"])
    if r.get("loader", {}).get("errors"):
        out.append("loader errors: %s" % r["loader"]["errors"])
    if r.get("loader") and r["loader"]["loads"] == 0:
        out.append("the loader finished no load during the run")
    if r["models_after"] != [MODEL]:
        out.append("models after: %s" % r["models_after"])
    return out


def fmt(v, f="%.1f"):
    return "-" if v is None else f % v


def mib(kb):
    return "-" if kb is None else "%.1f" % (kb / 1024.0)


def markdown(res):
    sc = res["scenarios"]
    a, b = sc
    L = ["# Connections: %d clients on weightd, host backend (%s, %s)" % (res["settings"]["conns"], res["date"],
                                                                          res["machine"]), "",
         "- **Machine:** %s" % res["machine_description"],
         "- **Command:** `%s`" % res["command"],
         "- **Model:** `weightd-mkckpt %s`: %d tensors, %.1f MB, %d slab(s), %d descriptor(s) per attach; "
         "beside loads, a second checkpoint of the same shape (another seed)" % (
             res["checkpoint"]["mkckpt"], res["checkpoint"]["tensors"], res["checkpoint"]["bytes"] / 1e6,
             res["checkpoint"]["slabs"], res["checkpoint"]["descriptors"]),
         "- **Clients:** %d connections in %d processes, each process one epoll loop; a closed loop of "
         "list, info, attach (the stream read, its descriptors counted and closed), detach; %g s per scenario" % (
             res["settings"]["conns"], res["settings"]["procs"], res["settings"]["seconds"]),
         "- **Daemon:** `weightd %s` (its defaults otherwise: log level info, so two log lines a lease; "
         "listen_backlog %d, from its stats, which the kernel caps at somaxconn %d)" % (
             " ".join(res["settings"]["daemon_flags"]), res["settings"]["listen_backlog"],
             res["settings"]["somaxconn"]),
         "- **Raw data:** `%s` (every figure, the /proc samples every 100 ms, the daemon's log lines of warnings "
         "and closes)" % res["json_name"], "",
         "A closed loop: each connection has one request in flight and sends the next as soon as the reply is "
         "in, so the daemon is kept saturated and the latencies are mostly queueing (about connections / req/s). "
         "p50 and p99 are over every request of the scenario; req/s over the scenario's time, from the start "
         "signal until the last connection finished its cycle.", "",
         "| op | (a) alone: requests | errors | req/s | p50 ms | p99 ms | (b) beside loads: requests | errors "
         "| req/s | p50 ms | p99 ms |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for op in OPS:
        x, y = a["ops"][op], b["ops"][op]
        L.append("| %s | %d | %d | %.0f | %s | %s | %d | %d | %.0f | %s | %s |" % (
            op, x["requests"], x["errors"], x["rps"], fmt(x["p50_ms"], "%.2f"), fmt(x["p99_ms"], "%.2f"),
            y["requests"], y["errors"], y["rps"], fmt(y["p50_ms"], "%.2f"), fmt(y["p99_ms"], "%.2f")))
    tot = lambda s, k: sum(o[k] for o in s["ops"].values())  # noqa: E731
    L.append("| all | %d | %d | %.0f | | | %d | %d | %.0f | | |" % (
        tot(a, "requests"), tot(a, "errors"), tot(a, "rps"), tot(b, "requests"), tot(b, "errors"), tot(b, "rps")))
    L += ["", "| | (a) alone | (b) beside loads |", "| --- | ---: | ---: |"]
    row = lambda label, f: L.append("| %s | %s | %s |" % (label, f(a), f(b)))  # noqa: E731
    row("connections made / asked", lambda s: "%d / %d" % (s["connect"]["connected"], s["connect"]["connections"]))
    row("connect failures (EBUSY, other)", lambda s: "%d (%d, %s)" % (
        s["connect"]["failed"], s["connect"]["ebusy"], s["connect"]["other"] or "none"))
    row("connect() refused with EAGAIN (backlog full), retried",
        lambda s: "%d" % s["connect"]["backlog_refusals_eagain"])
    row("connect + hello, p50 / p99 / max ms", lambda s: "%s / %s / %s" % (
        fmt(s["connect"]["p50_ms"], "%.1f"), fmt(s["connect"]["p99_ms"], "%.1f"), fmt(s["connect"]["max_ms"], "%.1f")))
    row("the burst of connections, wall", lambda s: "%.2f s" % s["connect"]["wall_s"])
    row("connections lost during the run", lambda s: "%d" % s["connections_lost"])
    row("descriptors received and closed by the clients", lambda s: "%d" % s["fds_received_and_closed"])
    for key, label in (("VmRSS", "daemon RSS, MiB"), ("RssAnon", "- of which anonymous"),
                       ("RssShmem", "- of which shared (the models' memfds)"), ("fds", "daemon open descriptors"),
                       ("Threads", "daemon threads")):
        f = (lambda k: lambda s: "%s / %s / %s" % (mib(s["daemon"][k]["baseline"]), mib(s["daemon"][k]["max"]),
                                                   mib(s["daemon"][k]["after"])))(key) if key not in (
            "fds", "Threads") else (lambda k: lambda s: "%d / %d / %d" % (
                s["daemon"][k]["baseline"], s["daemon"][k]["max"], s["daemon"][k]["after"]))(key)
        row(label + ": baseline / max / after", f)
    row("daemon heap in use (mallinfo2), KiB: before / after", lambda s: "%.1f / %.1f" % (
        s["heap_before"]["in_use"] / 1024.0, s["heap_after"]["in_use"] / 1024.0)
        if s["heap_before"] and s["heap_after"] else "- (no gdb)")
    row("daemon malloc heap, MiB: before / after (free kept by malloc after)", lambda s: "%.1f / %.1f (%.1f)" % (
        s["heap_before"]["heap"] / 2**20, s["heap_after"]["heap"] / 2**20, s["heap_after"]["free_kept"] / 2**20)
        if s["heap_before"] and s["heap_after"] else "-")
    row("descriptors back at the baseline after the clients left", lambda s: "in %.2f s" % s["settle_s"]
        if s["settle_s"] is not None else "**no**")
    row("clients connected and idle: connections (with the probe's; in (b) the loader's too) / leases",
        lambda s: "%s / %s" % (s["connections_idle"], s["leases_idle"]))
    row("after: connections (the probe's) / leases / models", lambda s: "%s / %s / %s" % (
        s["connections_after"], s["leases_after"], ",".join(s["models_after"])))
    row("CPU, % of one core: daemon loop / whole daemon / clients / driver (sampler, loader)",
        lambda s: "%.0f / %.0f / %.0f / %.0f" % (s["cpu"]["daemon_loop_pct"], s["cpu"]["daemon_pct"],
                                                 s["cpu"]["clients_pct"], s["cpu"]["driver_pct"]))
    row("CPU, %% of one core: the machine busy (of %d00) / other processes" % os.cpu_count(),
        lambda s: "%.0f / %.0f" % (s["cpu"]["machine_busy_pct"], s["cpu"]["others_pct"]))
    row("bytes received per request, mean: list / info / attach (the whole stream)", lambda s: "%.0f / %.0f / %.0f" % (
        s["ops"]["list"]["reply_bytes_mean"], s["ops"]["info"]["reply_bytes_mean"],
        s["ops"]["attach"]["reply_bytes_mean"]))
    row("loads / unloads of the second checkpoint (median s)", lambda s: "-" if not s.get("loader") else
        "%d / %d (%s / %s)" % (s["loader"]["loads"], s["loader"]["unloads"], fmt(s["loader"]["load_s_median"], "%.2f"),
                               fmt(s["loader"]["unload_s_median"], "%.3f")))
    L += ["", "## Problems", ""]
    any_problem = False
    for s in sc:
        for p in s["problems"]:
            L.append("- (%s) %s" % (s["name"], p))
            any_problem = True
        for e in s["error_samples"][:5]:
            L.append("  - (%s) e.g. %s" % (s["name"], e))
        for l in s["daemon_log"][:5]:
            L.append("  - (%s) daemon log: `%s`" % (s["name"], l))
    if not any_problem:
        L.append("None: no errors, every connection got in at the first try, descriptors and memory back at "
                 "the baseline.")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/wdconns")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--machine", default="%s-%dcpu" % (socket.gethostname(), os.cpu_count()),
                    help="for the results' names (default HOST-NCPUcpu)")
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--procs", type=int, default=4, help="client processes, each one epoll loop")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--timeout", type=float, default=30, help="a request without its reply this long is a stall")
    ap.add_argument("--connect-timeout", type=float, default=10)
    ap.add_argument("--settle", type=float, default=10, help="seconds to wait for the descriptors to come back")
    ap.add_argument("--max-clients", type=int, default=1024)
    ap.add_argument("--preset", default="qwen3-moe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--only", choices=("alone", "loads"), help="one scenario only")
    ap.add_argument("--no-gdb", dest="gdb", action="store_false",
                    help="no mallinfo2 of the daemon through gdb before and after each scenario")
    a = ap.parse_args()
    build, work = os.path.abspath(a.build), os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    mk = "--preset %s --layers %d --experts %d --vocab %d" % (a.preset, a.layers, a.experts, a.vocab)
    ckpts = []
    for seed in (1, 2):
        path = os.path.join(work, "%s-%dx%d-s%d" % (a.preset, a.layers, a.experts, seed))
        if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            subprocess.run([os.path.join(build, "weightd-mkckpt")] + mk.split() + ["--seed", str(seed), "--out", path,
                                                                                   "--quiet"], check=True)
        ckpts.append(path)
    for p in ckpts:  # the page cache warm
        for f in os.listdir(p):
            with open(os.path.join(p, f), "rb") as fh:
                while fh.read(64 << 20):
                    pass
    lat_dir = os.path.join(work, "lat")
    shutil.rmtree(lat_dir, ignore_errors=True)
    os.makedirs(lat_dir)
    sock_dir = os.path.join(work, "run")
    os.makedirs(sock_dir, exist_ok=True)
    log = os.path.join(sock_dir, "weightd.log")
    if os.path.exists(log):
        os.unlink(log)
    flags = ["--backend", "host", "--max-clients", str(a.max_clients)]
    d = Daemon(build, sock_dir, flags)
    sampler = Sampler(d.p.pid)
    sampler.start()
    try:
        # the backlog in force: the daemon's option, which the kernel caps by somaxconn
        somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
        backlog = int(d.run("stats")["options"]["listen_backlog"])
        a.backlog = min(backlog, somaxconn)
        d.run("load", ckpts[0], "--name", MODEL)
        info = d.run("info", MODEL)
        probe = d.run("attach", MODEL)
        scenarios = []
        if a.only != "loads":
            scenarios.append(scenario("alone", a, d, sampler, None, lat_dir))
        if a.only != "alone":
            scenarios.append(scenario("loads", a, d, sampler, ckpts[1], lat_dir))
    finally:
        sampler.stop_ev.set()
        stop_daemon(d)
    with open(log) as f:
        tail = f.read()[-3000:]
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    res = {
        "date": time.strftime("%Y-%m-%d"), "machine": a.machine,
        "machine_description": "%s, %d CPUs (%s), %.0f GiB, Linux %s, Python %s" % (
            socket.gethostname(), os.cpu_count(), cpu, mem, os.uname().release, sys.version.split()[0]),
        "command": " ".join([os.path.basename(sys.executable), "bench/conn_bench.py"] + sys.argv[1:]),
        "settings": {"conns": a.conns, "procs": a.procs, "seconds": a.seconds, "timeout": a.timeout,
                     "connect_timeout": a.connect_timeout, "daemon_flags": flags + ["--socket", d.sock],
                     "listen_backlog": backlog, "somaxconn": somaxconn},
        "checkpoint": {"mkckpt": mk, "tensors": info["tensors"], "bytes": info["bytes"],
                       "slabs": len(info["slab_list"]), "descriptors": probe.get("descriptors"),
                       "attach_messages": probe.get("messages")},
        "scenarios": scenarios,
        "samples": {s["name"]: [x for x in sampler.samples if x["phase"].startswith(s["name"] + ":")]
                    for s in scenarios},
        "weightd_log_tail": tail,
    }
    res["json_name"] = "%s-%s-conns.json" % (res["date"], a.machine)
    if len(scenarios) == 2:
        text = markdown(res)
    else:
        text = json.dumps(scenarios, indent=1) + "\n"
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, "%s-%s-conns" % (res["date"], a.machine))
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    print("wrote %s.json and %s.md" % (base, base))
    return 1 if any(s["problems"] for s in scenarios) else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        sys.exit(main())
