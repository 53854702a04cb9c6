"""Shared helpers for weightd's end-to-end tests.

Everything here drives REAL processes: weightd on a socket in a fresh temp
dir, the real weightctl, checkpoints written by the real weightd-mkckpt, and
raw Unix sockets for the protocol. Python 3 standard library only.

The programs come from $WEIGHTD_BUILD (default: <repo>/build); `make e2e`
sets it, `make e2e SANITIZE=address,undefined` points it at build-san.

Every daemon a test starts is torn down by E2ETestCase's cleanups, whatever
the test did: SIGTERM, then SIGKILL of its process group if it does not stop.
The teardown checks the exit code (0 unless the test said otherwise) and that
stderr has no sanitizer report, so leaks and undefined behaviour in the
sanitizer build fail the test that caused them.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(os.environ.get("WEIGHTD_BUILD") or os.path.join(REPO, "build"))
WEIGHTD = os.path.join(BUILD, "weightd")
WEIGHTCTL = os.path.join(BUILD, "weightctl")
MKCKPT = os.path.join(BUILD, "weightd-mkckpt")
# weightd's load policy (allocator/allocator.h, WA_WEIGHTD_POLICY), as given
# and as the allocator writes it back.
LOAD_POLICY = ("expandable_segments:True,expandable_page_mb:2,expandable_page_align:True,expandable_coalesce:True,"
               "max_split_size_mb:20")
LOAD_POLICY_CANONICAL = ("max_split_size_mb:20,expandable_segments:True,expandable_page_mb:2,expandable_page_align:True,"
                         "expandable_coalesce:True")

SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "runtime error:",
    "LeakSanitizer",
    "ERROR: UndefinedBehaviorSanitizer",
    "SUMMARY: AddressSanitizer",
)


def _is_sanitized(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return b"libasan.so" in data or b"__asan_init" in data or b"__ubsan_handle" in data


SANITIZED = _is_sanitized(WEIGHTD)
# Everything runs slower under the sanitizers; timeouts scale with this.
SLOW = 4.0 if SANITIZED else 1.0


def T(seconds):
    """A timeout in seconds, scaled for the sanitizer build."""
    return seconds * SLOW


# ---- environment ------------------------------------------------------------

# Variables of the runner's own environment that would change what the
# programs do (systemd hand-over, defaults the tests mean to control).
_SCRUB = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
          "JOURNAL_STREAM")


def child_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTD_") and k not in _SCRUB}
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env["LC_ALL"] = "C"
    if extra:
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
    return env


def sanitizer_report(text):
    """The first sanitizer marker found in text, or None."""
    for m in SANITIZER_MARKERS:
        if m in text:
            return m
    return None


def assert_no_sanitizer(text, what):
    m = sanitizer_report(text)
    if m:
        raise AssertionError("%s: sanitizer report (%r) in its stderr:\n%s" % (what, m, text[-6000:]))


# ---- small utilities --------------------------------------------------------

def wait_until(predicate, timeout, interval=0.02, what="condition"):
    """Polls predicate() until it returns a true value; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def new_tempdir(prefix="wde2e-"):
    """A fresh temp dir whose paths fit a Unix socket address (108 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > 40:
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def settled_fds(d):
    """The daemon's descriptor count once the connections of earlier
    commands have closed (only the one asking is left)."""
    wait_until(lambda: d.stats()["connections"] == 1, T(10), what="connections to settle")
    return fd_count(d.pid)


def can_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---- weightctl --------------------------------------------------------------

class CtlResult:
    def __init__(self, cmd, rc, out, err):
        self.cmd, self.rc, self.out, self.err = cmd, rc, out, err

    @property
    def json(self):
        try:
            return json.loads(self.out)
        except ValueError as e:
            raise AssertionError("%s: stdout is not JSON (%s):\n%s\nstderr:\n%s" %
                                 (" ".join(self.cmd), e, self.out, self.err))

    def __repr__(self):
        return "CtlResult(cmd=%r, rc=%r,\n stdout=%r,\n stderr=%r)" % (self.cmd, self.rc, self.out[-3000:],
                                                                     self.err[-3000:])


def _check_program(cmd, rc, err):
    assert_no_sanitizer(err, " ".join(cmd))
    if rc < 0:
        raise AssertionError("%s was killed by signal %d; stderr:\n%s" % (" ".join(cmd), -rc, err[-4000:]))
    if rc > 2 and "weightctl" in os.path.basename(cmd[0]):
        # weightctl's exits are 0, 1 and 2; anything else is a crash or a sanitizer abort.
        raise AssertionError("%s exited %d; stderr:\n%s" % (" ".join(cmd), rc, err[-4000:]))


def ctl_cmd(sock, args, json_mode=False):
    cmd = [WEIGHTCTL]
    if sock is not None:
        cmd += ["--socket", sock]
    if json_mode:
        cmd.append("--json")
    return cmd + [str(a) for a in args]


def run_ctl(sock, *args, json_mode=False, timeout=None, env=None, cwd=None, user=None):
    """Runs weightctl to the end; returns a CtlResult. Fails on a crash or a
    sanitizer report."""
    return run_program(ctl_cmd(sock, args, json_mode), timeout=timeout, env=env, cwd=cwd, user=user)


def client_lib_env():
    """The environment for a Python process that uses this build's
    libweightd-client (ctypes): the library, and in a sanitizer build the
    runtimes first (python is not instrumented; its own leaks at exit are
    not the library's)."""
    env = {"WEIGHTD_CLIENT_LIB": os.path.join(BUILD, "libweightd-client.so.0")}
    if SANITIZED:
        runtimes = [subprocess.run(["gcc", "-print-file-name=" + lib], capture_output=True, text=True).stdout.strip()
                    for lib in ("libasan.so", "libubsan.so")]
        env["LD_PRELOAD"] = " ".join(runtimes)
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:handle_segv=0"
    return env


# A Python other users can run (a pyenv one under /root is not theirs to run).
PEER_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

_PEER_SCRIPT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(float(sys.argv[2])); s.connect(sys.argv[1])
f = s.makefile("rwb")
out = []
for op, args in json.loads(sys.argv[3]):
    f.write((json.dumps({"id": len(out), "op": op, "args": args}) + "\n").encode()); f.flush()
    line = f.readline()
    out.append(json.loads(line) if line else None)
    if not line:
        break
print(json.dumps(out))
"""


def peer_requests(sock, requests, user, timeout=None):
    """Sends [(op, args), ...] one after another on one raw connection as
    user (as_user), hello first; returns the replies (None: closed)."""
    p = subprocess.run([PEER_PYTHON, "-c", _PEER_SCRIPT, sock, str(timeout or T(30)),
                        json.dumps([("hello", {"version": "1.0"})] + list(requests))],
                       capture_output=True, text=True, timeout=T(120), **user)
    if p.returncode != 0:
        raise AssertionError("peer as %r failed: %s" % (user, p.stderr))
    return json.loads(p.stdout)[1:]


_PEER_STEPS_SCRIPT = r"""
import json, socket, sys
conns, out = {}, []
def reply(f, i):
    while True:  # events (an attach's table) come first
        line = f.readline()
        m = json.loads(line) if line else None
        if m is None or ("event" not in m and m.get("id") in (i, None)):
            return m
for n, (c, op, args) in enumerate(json.loads(sys.argv[3])):
    if c not in conns:
        s = socket.socket(socket.AF_UNIX); s.settimeout(float(sys.argv[2])); s.connect(sys.argv[1])
        conns[c] = s.makefile("rwb")
        conns[c].write(b'{"id": "hello", "op": "hello", "args": {"version": "1.0"}}\n'); conns[c].flush()
        reply(conns[c], "hello")
    conns[c].write((json.dumps({"id": n, "op": op, "args": args}) + "\n").encode()); conns[c].flush()
    out.append(reply(conns[c], n))
print(json.dumps(out))
"""


def peer_steps(sock, steps, user, timeout=None):
    """Runs [(conn, op, args), ...] in order as user (as_user), each on the
    raw connection named conn (opened, with its hello, at its first step;
    all stay open to the end: leases held by one are held by the next
    steps); returns the replies (None: closed). Descriptors that come
    with replies are dropped."""
    p = subprocess.run([PEER_PYTHON, "-c", _PEER_STEPS_SCRIPT, sock, str(timeout or T(30)), json.dumps(list(steps))],
                       capture_output=True, text=True, timeout=T(120), **user)
    if p.returncode != 0:
        raise AssertionError("peer as %r failed: %s" % (user, p.stderr))
    return json.loads(p.stdout)


class CtlProcess:
    """A weightctl running in the background (concurrent loads and the like)."""

    def __init__(self, sock, *args, json_mode=False, env=None, stderr=None, user=None):
        self.cmd = ctl_cmd(sock, args, json_mode)
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=stderr if stderr is not None else subprocess.PIPE,
                                     env=child_env(env), start_new_session=True, **(user or {}))

    def finish(self, timeout=None):
        try:
            out, err = self.proc.communicate(timeout=timeout or T(60))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("%s did not finish" % " ".join(self.cmd))
        out = (out or b"").decode(errors="replace")
        err = (err or b"").decode(errors="replace")
        _check_program(self.cmd, self.proc.returncode, err)
        return CtlResult(self.cmd, self.proc.returncode, out, err)

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def as_user(uid, gid=None, groups=()):
    """Credentials for run_program and run_ctl (user=): a real other user,
    by number, for the authorisation tests; only root can take them."""
    return {"user": uid, "group": uid if gid is None else gid, "extra_groups": list(groups)}


def run_program(cmd, timeout=None, env=None, cwd=None, user=None):
    """Runs any of the programs to the end (weightctl, weightd that should
    refuse to start, mkckpt); returns a CtlResult. Fails on a crash or a
    sanitizer report. user: as_user(...) to run it as another user."""
    cmd = [str(c) for c in cmd]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout or T(60),
                           env=child_env(env), cwd=cwd, start_new_session=True, **(user or {}))
    except subprocess.TimeoutExpired as e:
        raise AssertionError("%s did not finish within %s s; stderr so far:\n%s" %
                             (" ".join(cmd), e.timeout, (e.stderr or b"").decode(errors="replace")))
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    _check_program(cmd, p.returncode, err)
    return CtlResult(cmd, p.returncode, out, err)


# ---- weightd ----------------------------------------------------------------

class Daemon:
    """One weightd process. start() waits until its socket accepts."""

    def __init__(self, workdir, args=(), env=None, sock=None, pass_socket=True, name="weightd"):
        self.dir = workdir
        self.sock = sock or os.path.join(workdir, "weightd.sock")
        self.args = [str(a) for a in args]
        self.env = env
        self.pass_socket = pass_socket
        self.log_path = os.path.join(workdir, name + ".stderr")
        self.out_path = os.path.join(workdir, name + ".stdout")
        self.proc = None
        self.expected_rc = 0
        self.closed = False

    @property
    def pid(self):
        return self.proc.pid

    def start(self, wait=True):
        cmd = [WEIGHTD]
        if self.pass_socket:
            cmd += ["--socket", self.sock]
        cmd += self.args
        self.cmd = cmd
        with open(self.log_path, "ab") as err, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=child_env(self.env), cwd=self.dir, start_new_session=True)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout=None):
        deadline = time.monotonic() + (timeout or T(20))
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError("weightd exited %d before it listened; stderr:\n%s" % (rc, self.log()))
            if can_connect(self.sock):
                return
            if time.monotonic() > deadline:
                raise AssertionError("weightd did not listen on %s in time; stderr:\n%s" % (self.sock, self.log()))
            time.sleep(0.02)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @staticmethod
    def _read(path):
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log(self):
        return self._read(self.log_path)

    def stdout(self):
        return self._read(self.out_path)

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=None):
        """Waits for the process to exit; returns its exit code."""
        try:
            return self.proc.wait(timeout=timeout or T(30))
        except subprocess.TimeoutExpired:
            self._kill()
            raise AssertionError("weightd did not exit in time; stderr:\n%s" % self.log()[-6000:])

    def stop(self, sig=signal.SIGTERM, timeout=None):
        if self.running():
            self.send_signal(sig)
        return self.wait(timeout)

    def kill9(self):
        """SIGKILL: the teardown then expects -9 (a stale socket is left)."""
        self._kill()
        self.expected_rc = -signal.SIGKILL

    def _kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def close(self):
        """The teardown: always kills, then checks the exit code and stderr."""
        if self.proc is None or self.closed:
            return
        self.closed = True
        problems = []
        if self.running():
            self.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=T(30))
            except subprocess.TimeoutExpired:
                self._kill()
                problems.append("did not stop within %s s of SIGTERM (killed)" % T(30))
        rc = self.proc.returncode
        if rc != self.expected_rc:
            problems.append("exit code %r, expected %r" % (rc, self.expected_rc))
        log = self.log()
        m = sanitizer_report(log)
        if m:
            problems.append("sanitizer report %r in stderr" % m)
        if problems:
            raise AssertionError("weightd (%s): %s\nstderr:\n%s" % (" ".join(self.cmd), "; ".join(problems),
                                                                     log[-8000:]))

    # conveniences
    def ctl(self, *args, **kw):
        return run_ctl(self.sock, *args, **kw)

    def ctl_json(self, *args, **kw):
        return run_ctl(self.sock, *args, json_mode=True, **kw)

    def stats(self):
        r = run_ctl(self.sock, "stats", json_mode=True)
        if r.rc != 0:
            raise AssertionError("stats failed: %r" % r)
        return r.json

    def device(self, index):
        return self.stats()["devices"][index]

    def models(self):
        r = run_ctl(self.sock, "list", json_mode=True)
        if r.rc != 0:
            raise AssertionError("list failed: %r" % r)
        return r.json["models"]


class ServiceDaemon(Daemon):
    """weightd started as systemd starts the service: by a FakeSystemd
    (fdstore.py), which holds its socket, takes its notify messages and its
    fd store, and hands them to each start."""

    def __init__(self, workdir, systemd, args=(), env=None, name="weightd"):
        super().__init__(workdir, args=args, env=dict(env or {}, **systemd.env()), sock=systemd.sock_path,
                         pass_socket=False, name=name)
        self.systemd = systemd

    def start(self, wait=True):
        self.closed = False
        self.expected_rc = 0
        cmd, fds = self.systemd.command([WEIGHTD] + self.args)
        self.cmd = cmd
        self.mark = len(self.systemd.messages)
        with open(self.log_path, "ab") as err, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=fds,
                                         env=child_env(self.env), cwd=self.dir, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=None):
        """Until the daemon said READY=1 (its socket is systemd's: it accepts
        before the daemon runs)."""
        deadline = time.monotonic() + (timeout or T(30))
        while not self.ready_since(self.mark):
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError("weightd exited %d before it was ready; stderr:\n%s" % (rc, self.log()))
            if time.monotonic() > deadline:
                raise AssertionError("weightd did not say READY=1 in time; stderr:\n%s" % self.log())
            time.sleep(0.02)

    def ready_since(self, n):
        return any(m.startswith("READY=1") for m in self.systemd.messages[n:])


def usage_of(dev):
    """The figures that a failed or cancelled load must put back."""
    return {k: dev[k]["current"] for k in ("reserved_bytes", "allocated_bytes", "active_bytes", "requested_bytes",
                                           "segment")}


# ---- the raw protocol -------------------------------------------------------

class RawClient:
    """Newline-delimited JSON over a Unix socket, by hand."""

    def __init__(self, path, timeout=None, hello=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout or T(10)
        self.sock.settimeout(self.timeout)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 1
        self.events = []
        self.eof = False
        if hello:
            r = self.hello()
            if not r.get("ok"):
                raise AssertionError("hello failed: %r" % r)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        """data: a dict (sent as one JSON line), str or bytes (sent as is)."""
        if isinstance(data, dict) or isinstance(data, list):
            data = json.dumps(data) + "\n"
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def send_fds(self, data, fds):
        if isinstance(data, str):
            data = data.encode()
        n = socket.send_fds(self.sock, [data], fds)
        if n < len(data):
            self.sock.sendall(data[n:])

    def recv_line(self, timeout=None):
        """The next line (bytes, without newline), or None at EOF."""
        self.sock.settimeout(timeout or self.timeout)
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def recv(self, timeout=None):
        """The next message as a dict, or None at EOF."""
        line = self.recv_line(timeout)
        if line is None:
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            raise AssertionError("weightd sent a line that is not JSON: %r" % line[:500])
        if not isinstance(msg, dict):
            raise AssertionError("weightd sent a message that is not an object: %r" % line[:500])
        return msg

    def request(self, op, args=None, id=None, events=False, timeout=None, on_event=None):
        """Sends one request and returns its reply (events are kept in
        self.events and passed to on_event). A reply to no request (id null,
        ok false) also ends the wait."""
        return self.reply_to(self.send_request(op, args, id, events), timeout=timeout, on_event=on_event)

    def reply_to(self, id, timeout=None, on_event=None):
        while True:
            m = self.recv(timeout)
            if m is None:
                raise AssertionError("weightd closed the connection instead of answering request %r" % (id,))
            if "event" in m:
                self.events.append(m)
                if on_event:
                    on_event(m)
                continue
            if m.get("id") == id or (m.get("id") is None and m.get("ok") is False):
                return m
            raise AssertionError("unexpected message while waiting for %r: %r" % (id, m))

    def hello(self, version="1.0"):
        return self.request("hello", {"version": version})

    def send_request(self, op, args=None, id=None, events=False):
        """Sends a request without waiting; returns its id."""
        if id is None:
            id = self.next_id
            self.next_id += 1
        msg = {"id": id, "op": op}
        if args is not None or events:
            msg["args"] = dict(args or {})
            if events:
                msg["args"]["events"] = True
        self.send(msg)
        return id


def assert_error_reply(tc, reply, code, id=None, check_id=True):
    """An error reply of the protocol's shape with the given code."""
    tc.assertIsInstance(reply, dict, "no reply")
    tc.assertIs(reply.get("ok"), False, reply)
    tc.assertIn("id", reply, reply)
    if check_id:
        tc.assertEqual(reply["id"], id, reply)
    err = reply.get("error")
    tc.assertIsInstance(err, dict, reply)
    tc.assertIsInstance(err.get("code"), str, reply)
    tc.assertIsInstance(err.get("message"), str, reply)
    tc.assertTrue(err["message"].strip(), reply)
    if code is not None:
        tc.assertEqual(err["code"], code, reply)
    return err


# ---- checkpoints ------------------------------------------------------------

# Named checkpoints, made once per test run by the real weightd-mkckpt.
CHECKPOINTS = {
    # 22 tensors in 6 shards, 87 MiB
    "small": dict(preset="gpt-oss-120b", layers=1, experts=2, vocab=1024, shard_size="20MB"),
    # 41 tensors in 4 shards, 292 MiB: progress lines show
    "medium": dict(preset="gpt-oss-120b", layers=2, experts=4, vocab=8192, shard_size="100MB"),
    # 155 tensors in 6 shards, 899 MiB: loads that last long enough to interrupt
    "big": dict(preset="gpt-oss-120b", layers=8, experts=4, vocab=8192, shard_size="200MB"),
    # 13 tensors in one shard, 420 MiB
    "mixtral": dict(preset="mixtral-8x7b", layers=1, experts=1, vocab=256, shard_size="5GB"),
    # a small qwen3-moe for tests that change it on disk (they copy it first)
    "qwen-tiny": dict(preset="qwen3-moe", layers=1, experts=2, vocab=512, shard_size="5MB"),
    # 24 tensors in 9 shards, 80 MiB
    "qwen": dict(preset="qwen3-moe", layers=1, experts=4, vocab=1024, shard_size="10MB"),
    # 5.4 GB, two full gpt-oss-120b layers: GPU loads that last long enough to watch
    "huge": dict(preset="gpt-oss-120b", layers=2),
    # 1032 tensors (more than one page of info), 3 GiB of holes on disk
    "qwen-many": dict(preset="qwen3-moe", layers=1, experts=340, vocab=1024, shard_size="5GB", sparse=True),
}

_cache_dir = None
_cache = {}


def make_checkpoint(out, preset, layers=None, experts=None, vocab=None, shard_size=None, sparse=False, seed=None):
    """Writes a checkpoint with weightd-mkckpt into out; returns out."""
    cmd = [MKCKPT, "--preset", preset, "--out", out, "--quiet"]
    if layers is not None:
        cmd += ["--layers", layers]
    if experts is not None:
        cmd += ["--experts", experts]
    if vocab is not None:
        cmd += ["--vocab", vocab]
    if shard_size is not None:
        cmd += ["--shard-size", shard_size]
    if seed is not None:
        cmd += ["--seed", seed]
    if sparse:
        cmd.append("--sparse")
    r = run_program(cmd, timeout=T(300))
    if r.rc != 0:
        raise AssertionError("weightd-mkckpt failed: %r" % r)
    return out


def checkpoint(kind):
    """The path of a named checkpoint (CHECKPOINTS), made on first use and
    shared by every test of this run. Tests must not modify it: copy it
    (copy_checkpoint) or make their own."""
    global _cache_dir
    if kind in _cache:
        return _cache[kind]
    if _cache_dir is None:
        _cache_dir = new_tempdir("wde2e-ckpt-")
        atexit.register(shutil.rmtree, _cache_dir, True)
    path = os.path.join(_cache_dir, kind)
    make_checkpoint(path, **CHECKPOINTS[kind])
    _cache[kind] = path
    return path


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def shard_files(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def read_header(shard):
    """A safetensors file's header: (header dict, offset where data starts)."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


def tensors_of(path):
    """{name: (dtype, shape, nbytes)} read from the shards themselves (a
    checkpoint folder or one file)."""
    out = {}
    for shard in shard_files(path) if os.path.isdir(path) else [path]:
        header, _ = read_header(shard)
        for name, t in header.items():
            if name != "__metadata__":
                out[name] = (t["dtype"], t["shape"], t["data_offsets"][1] - t["data_offsets"][0])
    return out


def checkpoint_bytes(path):
    return sum(nbytes for _, _, nbytes in tensors_of(path).values())


def st_image(header, data=b"", pad=True):
    """A safetensors file: header is a dict (dumped as JSON), a str or bytes
    (used as is); data follows it."""
    if isinstance(header, dict):
        raw = json.dumps(header, ensure_ascii=False).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    if pad and isinstance(header, dict):
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# ---- the base test case -----------------------------------------------------

_preflight_done = False


def preflight():
    """Fails loudly (rather than with a hundred confusing errors) when the
    programs are missing or cannot run on this machine."""
    global _preflight_done
    if _preflight_done:
        return
    for prog in (WEIGHTD, WEIGHTCTL, MKCKPT):
        if not os.access(prog, os.X_OK):
            raise AssertionError("%s is missing: build first (make, or set WEIGHTD_BUILD)" % prog)
        p = subprocess.run([prog, "--help"], capture_output=True, env=child_env(), timeout=60)
        if p.returncode != 0:
            raise AssertionError("%s --help exited %d; it cannot run here:\n%s" %
                                 (prog, p.returncode, p.stderr.decode(errors="replace")))
    _preflight_done = True


class E2ETestCase(unittest.TestCase):
    """A test with its own temp dir and daemons that are always torn down."""

    maxDiff = 4000

    @classmethod
    def setUpClass(cls):
        preflight()

    def setUp(self):
        self.tmp = new_tempdir()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self._n_daemons = 0

    def daemon(self, *args, devices=1, capacity="4GiB", start=True, env=None, sock=None, pass_socket=True,
               host_flags=True):
        """Starts weightd --backend host on a socket in this test's dir."""
        self._n_daemons += 1
        flags = []
        if host_flags:
            flags = ["--backend", "host", "--host-devices", devices, "--host-capacity", capacity]
        d = Daemon(self.tmp, flags + list(args), env=env, sock=sock, pass_socket=pass_socket,
                   name="weightd%d" % self._n_daemons)
        # Cleanups run last-in first-out: the daemon goes before the temp dir.
        self.addCleanup(d.close)
        if start:
            d.start()
        return d

    def raw(self, d, hello=True, timeout=None):
        c = RawClient(d.sock, timeout=timeout, hello=hello)
        self.addCleanup(c.close)
        return c

    def ctl_bg(self, *args, **kw):
        p = CtlProcess(*args, **kw)
        self.addCleanup(p.kill)
        return p

    def assertClean(self, d, rc):
        """A clean stop: exit code 0, socket gone, every segment released."""
        self.assertEqual(rc, 0, "weightd exit code; stderr:\n%s" % d.log())
        self.assertFalse(os.path.exists(d.sock), "the socket file is still there after a clean stop")
        self.assertIn("every segment released", d.log())
        assert_no_sanitizer(d.log(), "weightd")

    def assertJsonError(self, r, code=None, rc=1):
        """weightctl --json's error object: {"ok": false, "error": {code, message}}."""
        self.assertEqual(r.rc, rc, r)
        o = r.json
        self.assertIs(o.get("ok"), False, r)
        self.assertIsInstance(o.get("error"), dict, r)
        self.assertIsInstance(o["error"].get("code"), str, r)
        self.assertIsInstance(o["error"].get("message"), str, r)
        self.assertTrue(o["error"]["message"], r)
        if code is not None:
            self.assertEqual(o["error"]["code"], code, r)
        return o["error"]


def slab_bytes(info, device):
    """What a model's slabs (info's slab_list) ask of a device: its
    requested_bytes."""
    return sum(s["bytes"] for s in info["slab_list"] if s["device"] == device)


def load_ok(tc, d, path, *extra):
    r = d.ctl("load", path, *extra)
    tc.assertEqual(r.rc, 0, r)
    return r
