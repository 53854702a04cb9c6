#!/usr/bin/python3
"""A live protocol fuzz campaign against a running weightd.

    python3 tests/fuzz/live.py --build build --seconds 60 [--seed N]
    python3 tests/fuzz/live.py --build build-san --seconds 120 --seed 7
    python3 tests/fuzz/live.py --build build --replay FILE [FILE ...]

It starts a real weightd (host backend, two emulated devices of 2 GiB, a
socket in a fresh temp dir), writes a small synthetic checkpoint with
weightd-mkckpt and loads it split expert-parallel across both devices. Then,
for --seconds, hostile peers (threads, each with its own random.Random
derived from the seed) throw at the socket:

  random       random bytes, with and without newlines, before or after hello
  mutated      valid frames with bit flips, truncation, duplication, splicing,
               deletion, inserted JSON punctuation
  utf8         invalid UTF-8 (raw bytes, escaped lone surrogates, NULs, control
               bytes) inside string values and keys; long multibyte strings
               whose echo the daemon cuts
  nesting      100k '[' or '{"a":' (closed and unclosed), nesting just under
               cJSON's limit, in args and in the id
  numbers      1e308, -0, 1e400, 2**64, long digit strings, denormals, tokens
               that are not JSON, in the id and every integer field
  types        a wrong JSON type (and out-of-range values) for every field of
               every operation the hello reply lists, one field at a time;
               each must be refused
  overlong     lines of 1 MiB + k bytes (no newline, or JSON), a line of
               exactly 1 MiB with its newline (must be served), an id string
               near 1 MiB
  fds          SCM_RIGHTS descriptors (/dev/null, pipes, socketpairs, memfds,
               eventfds, epoll, directories, a socket to the daemon itself) on
               random frames: 1 to 253 per message, more than 253 (refused by
               the kernel in one message; sent as 253 + rest on one line)
  halfline     half a line (with descriptors or not), then close, reset
               (SO_LINGER 0) or shutdown(SHUT_WR) and wait for the EOF
  noread       requests with big replies (info, snapshot, attach) that are
               never read, the connection held open for a while
  burst        bursts of connect-and-close (some with hello, some reset)
  prehello     every operation before hello (must be EPROTO), bad versions
  flood        hello and up to 400 pipelined requests in one write; every
               reply must come, once, in order, and be right
  verify       a few pipelined verifies of the model, read or abandoned
  worker       `weightctl attach --hold` killed with SIGKILL at a random moment
  reattach     an attach's lease token in another connection's reattach: EBUSY
               while its connection holds it, ENOENT altered or once that
               connection closed (no fd store here); never shown by leases

Run as root, some peers (--reader-peers, default a third) are another user,
uid 61001 (--reader-uid): a reader. A helper process of that uid makes their
connections and hands each over (SCM_RIGHTS), so that the daemon's
SO_PEERCRED sees the reader; their workers run as that uid too. A reader's
frames pass no denylist (every administrator's op is refused it), its
wrong-type frames of administrators' ops and valid ones (shutdown, unload
and load included) must be refused with EPERM, and so must its floods'
verifies, snapshots and policy changes.

Frames that would stop the campaign are never sent: a denylist (a mirror of
the daemon's own argument checks, with cJSON's first-key and C-string
semantics) drops any line that would run `shutdown`, `unload` of the model
or a `load` of anything but a path under /nonexistent-weightd-fuzz/. Such
ops are sent with wrong types only.

Every line a hostile peer gets back is checked: at most 1 MiB, valid UTF-8,
a JSON object, an event or a reply with "ok", an error with a known code and
a one-line message; ids are echoed. Structured kinds also check the answer
itself (wrong types refused with EINVAL/ENODEV, EPROTO before hello, EMSGSIZE
then EOF for over-long lines, every pipelined request answered once in order).

Meanwhile a well-behaved checker loops over the raw protocol (hello, list,
info in pages, stats, leases, snapshot, now and then verify) and runs
`weightctl --json attach NAME --verify` (all devices, then each device)
every few seconds, comparing everything with what the first round saw. A
failure or a slow answer is a finding.

At the end: the daemon must still answer; once every hostile peer has gone,
its descriptor count (/proc/PID/fd) and VmRSS must come back near the
baseline taken after the load and a first checker round, `stats` must show
one connection (the checker) and `leases` none; SIGTERM must stop it with
exit code 0, "every segment released" and, for a sanitizer build, no
sanitizer report in its stderr.

Findings are grouped as crashes, hangs, leaks and wrong answers. A hostile
action that produced a finding is saved (every byte sent, per connection) as
a replay file in the work dir; `--replay FILE` sends it again to a fresh
daemon with the same model and prints what comes back. When the daemon dies,
each peer's last actions are saved the same way. The exit status is 1 when
anything was found, 2 on a usage or setup error.

Python 3 standard library only; the daemon and checkpoint helpers come from
tests/e2e/harness.py.
"""

import argparse
import array
import collections
import json
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
h = None  # tests/e2e/harness.py, imported once --build is known

MiB = 1 << 20
WP_MAX_LINE = 1 << 20
WP_MAX_FDS = 253
MODEL = "fuzzmodel"
SAFE_LOAD_PREFIX = "/nonexistent-weightd-fuzz/"
# The protocol's error codes: the one table, common/errors.h.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "common", "errors.h")) as _f:
    ERRNAMES = set(re.findall(r"^\s*X\((E[A-Z0-9]+),", _f.read(), re.M))
INT32_MAX = 2 ** 31 - 1
INT64_MAX = 2 ** 63 - 1

# Fields of each operation (daemon/ops.c, daemon/attach.c): type and bounds.
# "!" marks a required one.
FIELDS = {
    "hello": {"version": ("string", True)},
    "load": {"path": ("string", True), "name": ("string", False), "device": ("device", False),
             "devices": ("devices", False), "placement": ("placement", False)},
    "unload": {"name": ("string", True), "force": ("bool", False), "wait": ("int", False, 0, 3600),
               "keep_cached": ("bool", False)},
    "sleep": {"name": ("string", True), "mode": ("string", False), "force": ("bool", False)},
    "wake": {"name": ("string", True)},
    "slept": {"lease": ("int", True, 1, INT64_MAX // 2)},
    "verify": {"name": ("string", True), "quick": ("bool", False)},
    "list": {"offset": ("int", False, 0, INT32_MAX), "limit": ("int", False, 1, 1000)},
    "info": {"name": ("string", True), "offset": ("int", False, 0, INT32_MAX), "limit": ("int", False, 1, 100000)},
    "attach": {"name": ("string", True), "device": ("device", False), "writable": ("bool", False)},
    "detach": {"lease": ("int", True, 1, INT64_MAX // 2)},
    "reattach": {"token": ("string", True)},
    "leases": {"offset": ("int", False, 0, INT32_MAX)},
    "stats": {"jobs_offset": ("int", False, 0, INT32_MAX)},
    "policy": {"conf": ("string", False)},
    "snapshot": {"device": ("int", False, 0, INT32_MAX), "segment": ("int", False, 0, INT32_MAX),
                 "block": ("int", False, 0, INT32_MAX)},
    "shutdown": {},
}
DANGEROUS_OPS = ("shutdown", "unload", "load", "sleep")
# What a reader is refused (daemon/ops.c's table; policy set besides, checked by op_policy).
ADMIN_OPS = ("load", "unload", "verify", "snapshot", "shutdown", "sleep", "wake")
# A fixed mmap threshold: glibc's dynamic one grows after the first 1 MiB
# buffers are freed, and it then keeps tens of MiB of freed heap that would
# read as a leak in VmRSS. With it fixed, freed big buffers go back at once.
DEFAULT_TUNABLES = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"

KINDS = collections.OrderedDict([
    ("random", 8), ("mutated", 14), ("utf8", 10), ("nesting", 4), ("numbers", 8), ("types", 16),
    ("overlong", 3), ("fds", 8), ("halfline", 6), ("noread", 3), ("burst", 3), ("prehello", 5),
    ("flood", 7), ("verify", 2), ("worker", 2), ("reattach", 2),
])


class Raw:
    """A JSON text inserted as is into a frame (tokens that are not Python values)."""

    def __init__(self, text):
        self.text = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")

    def __repr__(self):
        return "Raw(%r)" % self.text[:60]


def enc(v):
    """JSON bytes for v; Raw parts go in verbatim; str may hold lone surrogates."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return b"{" + b",".join(enc(str(k) if not isinstance(k, (Raw, bytes)) else k) + b":" + enc(x)
                                for k, x in v.items()) + b"}"
    if isinstance(v, (list, tuple)):
        return b"[" + b",".join(enc(x) for x in v) + b"]"
    if isinstance(v, bytes):  # a string of raw bytes: quoted, nothing escaped but " and \
        return b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n") + b'"'
    if isinstance(v, float) and not math.isfinite(v):
        return b"1e400" if v > 0 else b"-1e400"
    return json.dumps(v).encode()


def frame(id, op, args=None, extra=None):
    msg = collections.OrderedDict()
    if id is not NOTHING:
        msg["id"] = id
    if op is not NOTHING:
        msg["op"] = op
    if args is not None and args is not NOTHING:
        msg["args"] = args
    if extra:
        msg.update(extra)
    return enc(msg) + b"\n"


class _Nothing:
    def __repr__(self):
        return "NOTHING"


NOTHING = _Nothing()


# ---- the denylist: what the daemon would run --------------------------------------

def _cstr(s):
    """What a cJSON valuestring is to the daemon's C code: up to the first NUL."""
    return s.split("\0", 1)[0]


def _pairs_first(pairs):
    d = {}
    for k, v in pairs:
        k = _cstr(k)
        if k not in d:  # cJSON_GetObjectItemCaseSensitive finds the first
            d[k] = v
    return d


def _bad_constant(name):
    raise ValueError("not JSON: %s" % name)


def has_nul_escape(line):
    """The JSON text holds \\u0000 (a backslash after an even run of them):
    wp_parse refuses such a message (a C string would be cut there)."""
    i = line.find(b"\\u0000")
    while i >= 0:
        k = i
        while k > 0 and line[k - 1:k] == b"\\":
            k -= 1
        if (i - k) % 2 == 0:
            return True
        i = line.find(b"\\u0000", i + 1)
    return False


def cjson_like(line):
    """line (bytes, no newline) parsed as the daemon would, or raises ValueError."""
    if b"\0" in line:
        raise ValueError("NUL")  # wp_parse refuses it
    if has_nul_escape(line):
        raise ValueError("NUL escape")  # and this
    text = line.decode("utf-8", "surrogateescape").lstrip("".join(chr(c) for c in range(33)))
    return json.loads(text, object_pairs_hook=_pairs_first, parse_constant=_bad_constant, strict=False)


def _num(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _absent(args, key):
    return key not in args or args[key] is None


def _int_ok(args, key, lo, hi, required=False):
    if _absent(args, key):
        return not required
    d = _num(args[key])
    return d is not None and math.isfinite(d) and d == math.floor(d) and lo <= d <= hi


def _bool_ok(args, key):
    return _absent(args, key) or isinstance(args[key], bool)


class Mirror:
    """The daemon's own checks, for the ops that must never run."""

    def __init__(self, n_devices, uuids):
        self.n_devices = n_devices
        self.uuids = uuids

    def device_index(self, v):
        """The device wd_device_arg makes of v, or None when it refuses it."""
        if isinstance(v, str):
            s = _cstr(v)
            if not s[:1].isdigit() or not s[:1].isascii():
                if not s:
                    return None
                exact = [i for i, u in enumerate(self.uuids) if u.lower() == s.lower()]
                m = [i for i, u in enumerate(self.uuids) if u.lower().startswith(s.lower())]
                return exact[0] if exact else m[0] if len(m) == 1 else None
            if not s.isdigit() or not s.isascii() or int(s) > INT32_MAX or int(s) >= self.n_devices:
                return None
            return int(s)
        d = _num(v)
        if d is not None and 0 <= d <= INT32_MAX and d == math.floor(d) and d < self.n_devices:
            return int(d)
        return None

    def device_ok(self, v):
        return self.device_index(v) is not None

    def would_run(self, msg):
        """The dangerous thing msg would do, or None when the daemon refuses it."""
        if not isinstance(msg, dict):
            return None
        if "id" in msg and not (msg["id"] is None or isinstance(msg["id"], str) or _num(msg["id"]) is not None):
            return None
        op = msg.get("op")
        if not isinstance(op, str):
            return None
        op = _cstr(op)
        if op not in DANGEROUS_OPS:
            return None
        args = msg.get("args", {})
        if not isinstance(args, dict):
            return None
        if not _bool_ok(args, "events"):
            return None
        if op == "shutdown":
            return "shutdown"
        if op == "unload":
            name = args.get("name")
            if not isinstance(name, str) or _cstr(name) != MODEL:
                return None
            if not _bool_ok(args, "force") or not _int_ok(args, "wait", 0, 3600) or not _bool_ok(args, "keep_cached"):
                return None
            return "unload of the model"
        if op == "sleep":
            # the model asleep, the checking client's attaches would be refused
            name, mode = args.get("name"), args.get("mode", "offload")
            if not isinstance(name, str) or _cstr(name) != MODEL or not _bool_ok(args, "force"):
                return None
            if not isinstance(mode, str) or _cstr(mode) not in ("offload", "discard"):
                return None
            return "sleep of the model"
        # load
        path = args.get("path")
        if not isinstance(path, str):
            return None
        p = _cstr(path)
        if not p.startswith("/") or len(p.encode("utf-8", "surrogateescape")) >= 4096:
            return None
        if not (_absent(args, "name") or isinstance(args["name"], str)):
            return None
        one, many = args.get("device"), args.get("devices")
        if one is not None and many is not None:
            return None
        if many is None:
            if one is not None and not self.device_ok(one):
                return None
        else:
            if not isinstance(many, list) or not many:
                return None
            idx = [self.device_index(x) for x in many]
            if None in idx or len(set(idx)) != len(idx):
                return None
        if not _absent(args, "placement"):
            pl = args["placement"]
            if not isinstance(pl, str) or _cstr(pl) not in ("replicate", "expert-parallel"):
                return None
        if p.startswith(SAFE_LOAD_PREFIX):
            return None  # fails with ENOENT: safe, and it exercises the load path
        return "load of %r" % p[:80]


DANGER_WORDS = (b"shutdown", b"unload", b"load")


def guard_line(mirror, line, reader=False):
    """None when the daemon may be sent line (bytes, no newline), else why not.
    Anything goes from a reader: every op that could stop the campaign needs
    the administrator's role."""
    if reader or len(line) + 1 > WP_MAX_LINE:
        return None  # never parsed: refused with EMSGSIZE and the connection closes
    if has_nul_escape(line) or b"\0" in line:
        return None  # refused by wp_parse, whatever it says
    try:
        msg = cjson_like(line)
    except (ValueError, RecursionError):
        # cJSON is more lenient than Python (control bytes as whitespace,
        # leading zeros, "1."): refuse what might spell a dangerous op.
        if b"\\u" in line or any(w in line for w in DANGER_WORDS):
            return "unparsed line that might name a dangerous op"
        return None
    return mirror.would_run(msg)


# ---- findings ---------------------------------------------------------------------

CLASSES = ("crash", "hang", "leak", "wrong")
# Bug classes already known on this branch (fixes are being made elsewhere):
# marked in the report, still findings.
KNOWN = {
    "request with an id string near 1 MiB": "known: a request id string near 1 MiB",
    "a pipelined verify flood stalls the loop": "known: huge pipelined verify floods stall the loop",
    "idle connections lock every other client out": "known: 256 idle connections lock clients out",
    "invalid UTF-8 in a reply": "known: non-UTF-8 bytes echoed into replies",
}


def known_note(key):
    for k, v in KNOWN.items():
        if key.startswith(k):
            return v
    return None
CLASS_TITLES = {"crash": "CRASHES", "hang": "HANGS / STALLS", "leak": "LEAKS", "wrong": "WRONG ANSWERS"}


class Finding:
    def __init__(self, cls, key, variant, text):
        self.cls, self.key, self.variant, self.text = cls, key, variant, text
        self.count = 1
        self.repro = None
        self.first = time.monotonic()


class Findings:
    """Findings by class and key; each key may have variants (the message
    template, the field...), each with its first example and a replay."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items = collections.OrderedDict()

    def add(self, cls, key, text, variant=""):
        """Records one; returns the Finding when it is new (the caller may attach a repro)."""
        with self.lock:
            k = (cls, key, variant)
            f = self.items.get(k)
            if f:
                f.count += 1
                return None
            f = self.items[k] = Finding(cls, key, variant, text)
            print("  FINDING [%s] %s%s" % (cls, key, (": " + variant[:100]) if variant else ""), flush=True)
            return f

    def groups(self):
        g = collections.OrderedDict()
        for f in self.items.values():
            g.setdefault((f.cls, f.key), []).append(f)
        return g

    def __len__(self):
        return len(self.groups())


def norm_message(msg):
    """An error message as a template: quoted parts and numbers elided."""
    msg = re.sub(r'"[^"]*("|$)', '"…"', msg)  # a message cut short may leave a quote open
    msg = re.sub(r"\d+", "N", msg)
    return msg[:120]


def short(b, n=160):
    r = repr(b[:n])
    return r + ("... (%d bytes)" % len(b) if len(b) > n else "")


# ---- a hostile connection -----------------------------------------------------------

class Stopped(Exception):
    pass


class ReaderConnector:
    """Connections made by a helper process of another uid and passed back:
    the daemon sees that uid (SO_PEERCRED is taken at connect). The helper
    lives to the end of the campaign: the daemon watches the process of a
    connection that holds a lease, and closes it when that process exits."""

    SCRIPT = r"""
import socket, sys
ctl = socket.socket(fileno=int(sys.argv[2]))
while ctl.recv(1):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(float(sys.argv[3]))  # a Unix connect waits for room in the backlog
    try:
        s.connect(sys.argv[1])
        socket.send_fds(ctl, [b"K"], [s.fileno()])
    except OSError as e:
        ctl.sendall(b"E")
    s.close()
"""

    def __init__(self, sock_path, uid, timeout=2.0):
        self.uid = uid
        self.lock = threading.Lock()
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen([h.PEER_PYTHON, "-c", self.SCRIPT, sock_path, str(theirs.fileno()), str(timeout)],
                                     pass_fds=[theirs.fileno()], user=uid, group=uid, extra_groups=[],
                                     stdin=subprocess.DEVNULL)
        theirs.close()
        self.connections = 0

    def connect(self):
        """A connected socket of the reader, or None."""
        with self.lock:
            try:
                self.ctl.sendall(b"c")
                msg, fds, _, _ = socket.recv_fds(self.ctl, 1, 1)
            except OSError:
                return None
            if msg != b"K" or not fds:
                for fd in fds:
                    os.close(fd)
                return None
            self.connections += 1
            return socket.socket(fileno=fds[0])

    def close(self):
        self.ctl.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Conn:
    """A non-blocking connection that checks every line it gets. Sends pump:
    they read while they write, so that a peer never deadlocks against a
    daemon that paused it."""

    def __init__(self, peer, read=True):
        self.peer = peer
        self.ctx = peer.ctx
        self.read_enabled = read
        self.sock = None
        self.buf = b""
        self.msgs = []          # every message parsed, in order
        self.replies = []       # replies only (no events)
        self.eof = False
        self.partial = b""      # what the daemon holds of an unfinished line
        self.idx = peer.conn_serial
        peer.conn_serial += 1
        self.held = False
        self.fds_received = 0
        self.as_reader = peer.reader

    def open(self, timeout=2.0):
        if not self.ctx.slots.acquire(timeout=timeout):
            self.peer.count("slot-wait-timeouts")
            return False
        self.held = True
        if self.as_reader:
            s = self.ctx.reader.connect()
            if s is None:
                self._release()
                self.peer.count("connect-failures")
                return False
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)  # a Unix connect waits for room in the backlog
            try:
                s.connect(self.ctx.sock)
            except OSError:
                s.close()
                self._release()
                self.peer.count("connect-failures")
                return False
        s.setblocking(False)
        self.sock = s
        self.peer.step(("connect", self.idx, self.as_reader))
        self.peer.count("connections")
        return True

    def _release(self):
        if self.held:
            self.held = False
            self.ctx.slots.release()

    def close(self, rst=False):
        if self.sock is None:
            self._release()
            return
        self.peer.step(("close", self.idx, rst))
        try:
            if rst:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass
        self.sock = None
        self._release()

    def shut_wr(self):
        self.peer.step(("shutwr", self.idx))
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- reading
    def _read_some(self):
        try:
            data, anc, flags, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(4 * WP_MAX_FDS))
        except (BlockingIOError, InterruptedError):
            return
        except (ConnectionResetError, OSError):
            data, anc = b"", []
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % 4])
                for fd in fds:
                    os.close(fd)
                self.fds_received += len(fds)
        if not data:
            self.eof = True
            if self.buf:
                self.peer.check_line(self.buf, self, unterminated=True)
                self.buf = b""
            return
        self.buf += data
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            msg = self.peer.check_line(line, self)
            if msg is not None:
                self.msgs.append(msg)
                if "event" not in msg:
                    self.replies.append(msg)
        if len(self.buf) > WP_MAX_LINE:
            self.peer.wrong("a line from the daemon longer than 1 MiB", "line longer than 1 MiB without its newline "
                            "(%d bytes so far): %s" % (len(self.buf), short(self.buf)))
            self.buf = b""

    def wait(self, cond, timeout):
        """Reads until cond() or EOF or timeout; True when cond() holds."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.eof or self.sock is None:
                return cond()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.ctx.stop_now.is_set():
                raise Stopped()
            r, _, _ = select.select([self.sock], [], [], min(left, 0.25))
            if r:
                self._read_some()
        return True

    def replies_at_least(self, n, timeout):
        return self.wait(lambda: len(self.replies) >= n, timeout)

    def drain(self, idle=0.15, most=2.0):
        """Reads until nothing comes for `idle` seconds (or EOF)."""
        deadline = time.monotonic() + most
        while not self.eof and self.sock is not None and time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [], idle)
            if not r:
                return
            self._read_some()

    def wait_eof(self, timeout):
        return self.wait(lambda: self.eof, timeout)

    # -- writing
    def send(self, data, fds=None, timeout=10.0, split_fds=False):
        """Sends data (fds on its first byte; more than 253 go as 253 on the
        first sendmsg and the rest on the next bytes when split_fds). Returns
        False when the daemon closed or stopped taking bytes in time."""
        if self.sock is None:
            return False
        lines = (self.partial + data).split(b"\n")
        for line in lines[:-1]:
            why = guard_line(self.ctx.mirror, line, self.as_reader)
            if why:
                self.peer.count("denied: " + why.split(" of ")[0])
                self.peer.denied(line, why)
                return False
        self.partial = lines[-1][-WP_MAX_LINE - 2:] if len(lines[-1]) <= WP_MAX_LINE + 2 else b"x" * (WP_MAX_LINE + 2)
        nfds = len(fds) if fds else 0
        self.peer.step(("send", self.idx, data, nfds, bool(split_fds)))
        self.peer.frames += 1
        self.peer.bytes += len(data)
        view = memoryview(data)
        pending_fds = list(fds or [])
        deadline = time.monotonic() + timeout
        while view or pending_fds:
            if self.ctx.stop_now.is_set():
                raise Stopped()
            left = deadline - time.monotonic()
            if left <= 0:
                self.peer.count("sends that stalled (daemon not reading)")
                return False
            rl = [self.sock] if self.read_enabled and not self.eof else []
            r, w, _ = select.select(rl, [self.sock], [], min(left, 0.25))
            if r:
                self._read_some()
            if not w:
                continue
            try:
                if pending_fds:
                    batch = pending_fds[:WP_MAX_FDS] if split_fds else pending_fds
                    more = len(pending_fds) > len(batch)
                    pad = not len(view)
                    if pad:
                        chunk = b" "  # descriptors need a byte to ride on
                    elif more and len(view) > 1:
                        chunk = view[:1]
                    else:
                        chunk = view
                    n = self.sock.sendmsg([chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     array.array("i", batch))])
                    pending_fds = pending_fds[len(batch):]
                    self.peer.fds_sent += len(batch)
                    if pad:
                        n = 0
                else:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            except (BrokenPipeError, ConnectionResetError):
                self.eof = True
                return False
            except OSError as e:
                if pending_fds:
                    # EINVAL: more than SCM_MAX_FD in one message; ETOOMANYREFS
                    self.peer.count("kernel refused %d fds (%s)" % (len(pending_fds) if not split_fds
                                                                   else min(len(pending_fds), WP_MAX_FDS),
                                                                   os.strerror(e.errno)))
                    pending_fds = []
                    continue
                self.eof = True
                return False
            view = view[n:]
        return True


# ---- frame material ---------------------------------------------------------------

INVALID_UTF8 = [
    b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
    b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80", b"\xf0\x9f\x98",
    b"\xe0\x80\xaf", b"\xc3\x28", b"a\xffb", b"\xf5\x80\x80\x80",
]
ESCAPED_BAD = [b"\\ud800", b"\\udfff", b"\\ud83d", b"\\ude00", b"\\ud800\\u0041", b"\\u0000", b"x\\u0000y",
               b"\\u001f", b"\\u007f", b"\\uFFFF", b"\\uFFFE", b"\\u", b"\\u12", b"\\x41", b"\\q", b"\\"]
CONTROL = [b"\x01", b"\x1b[31m", b"\x7f", b"\r", b"\t", b"\x08", b"\x0b\x0c"]
MULTIBYTE = ["é", "€", "😀", "\u200b", "\ufeff", "𝄞"]

NUMBER_TOKENS = [
    "1e308", "-1e308", "1e400", "-1e400", "-0", "-0.0", "0e0", "0.0", "18446744073709551616",
    "18446744073709551615", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
    "-9223372036854775809", "4611686018427387903", "4611686018427387904", "2147483647", "2147483648",
    "-2147483649", "4294967296", "1" + "0" * 400, "-" + "9" * 400, "0." + "0" * 400 + "1", "1e-400", "4.9e-324",
    "2.2250738585072014e-308", "9007199254740993", "1E+2", "1.5", "0.999999999999999999999", "1e9999999999",
    "123456789" * 60, "1.7976931348623157e308", "1.7976931348623159e308",
    # not JSON, but cJSON may take some
    "+1", "01", "00", "1.", ".5", "-", "--1", "1e", "1e+", "NaN", "Infinity", "-Infinity", "0x10", "1_000", "1e5e5",
]


# Policy changes (allowed to the daemon's own user): (conf, accepted?).
POLICY_CONFS = [
    ("max_split_size_mb:20", True), ("roundup_power2_divisions:4", True), ("garbage_collection_threshold:0.9", True),
    ("default", True), ("max_split_size_mb:-1", False), ("max_split_size_mb:1e400", False), ("x:y", False),
    (",,,,", False), (":", False), ("", True), ("max_split_size_mb:99999999999999999999", False),
    ("garbage_collection_threshold:1.5", False), ("roundup_power2_divisions:3", False),
    ("max_split_size_mb:20,max_split_size_mb:20", True), ("max_split_size_mb", False),
]


def valid_frames(rng, ctx, id):
    """One valid, harmless request (never a dangerous op)."""
    n = ctx.n_tensors
    choices = [
        lambda: frame(id, "hello", {"version": "1.0"}),
        lambda: frame(id, "list"),
        lambda: frame(id, "list", {}),
        lambda: frame(id, "stats"),
        lambda: frame(id, "leases", {"offset": rng.randrange(0, 4)}),
        lambda: frame(id, "info", {"name": MODEL, "offset": rng.randrange(0, n + 2), "limit": rng.randrange(1, n + 3)}),
        lambda: frame(id, "info", {"name": MODEL}),
        lambda: frame(id, "info", {"name": "nope-" + str(rng.randrange(100))}),
        lambda: frame(id, "snapshot", {"device": rng.randrange(0, ctx.n_devices), "segment": rng.randrange(0, 3),
                                       "block": rng.randrange(0, 3)}),
        lambda: frame(id, "policy"),
        lambda: frame(id, "detach", {"lease": rng.randrange(1, 1000)}),
        lambda: frame(id, "reattach", {"token": "%032x" % rng.getrandbits(128)}),
        lambda: frame(id, "verify", {"name": "nope"}),
        lambda: frame(id, "attach", {"name": "nope"}),
        lambda: frame(id, "nosuchop", {"x": 1}),
        lambda: frame(id, "list", {"events": True}),
    ]
    return rng.choice(choices)()


def rand_id(rng):
    r = rng.random()
    if r < 0.6:
        return rng.randrange(1, 1 << 31)
    if r < 0.8:
        return "s%d" % rng.randrange(1 << 20)
    if r < 0.9:
        return None
    return rng.choice([0, -1, 1.5, 2 ** 53, "", "😀"])


def mutate(rng, data, pool):
    data = bytearray(data.rstrip(b"\n"))
    for _ in range(rng.randint(1, 4)):
        m = rng.randrange(8)
        if not data:
            data = bytearray(rng.choice(pool).rstrip(b"\n"))
        if m == 0:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif m == 1:  # truncation
            del data[rng.randrange(len(data)):]
        elif m == 2:  # duplicate a slice
            i = rng.randrange(len(data))
            j = min(len(data), i + rng.randint(1, 40))
            data[j:j] = data[i:j] * rng.randint(1, 4)
        elif m == 3:  # splice with another frame
            other = rng.choice(pool).rstrip(b"\n")
            data = data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]
        elif m == 4:  # delete a slice
            i = rng.randrange(len(data))
            del data[i:i + rng.randint(1, 12)]
        elif m == 5:  # insert JSON punctuation or control bytes
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.choice([b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\x00", b"\r", b" ",
                                    b"\n", b'"\\u', b"null", b"1e400", b"-0", b'""', b"\xff", b"\t"])
        elif m == 6:  # a number replaced by a huge one
            digits = [mm.span() for mm in re.finditer(rb"-?\d+", bytes(data))]
            if digits:
                a, b = rng.choice(digits)
                data[a:b] = rng.choice(NUMBER_TOKENS).encode()
        else:  # the whole frame repeated without a newline
            data = data * rng.randint(2, 5)
    out = bytes(data)
    return out + (b"\n" if rng.random() < 0.9 else b"")


def wrong_values(kind, lo=None, hi=None, required=False):
    """(label, value, expected codes) a field of that kind must refuse."""
    out = []
    nonstr = [("0", 0), ("-1", -1), ("1.5", 1.5), ("true", True), ("false", False), ("[]", []), ("{}", {}),
              ('["x"]', ["x"]), ('{"k":"v"}', {"k": "v"}), ("1e400", Raw("1e400"))]
    if kind == "string":
        out = [(l, v, {"EINVAL"}) for l, v in nonstr]
        if required:
            out.append(("null", None, {"EINVAL"}))
    elif kind == "int":
        vals = [('"1"', "1"), ('""', ""), ("true", True), ("false", False), ("[]", []), ("{}", {}), ("[1]", [1]),
                ('{"a":1}', {"a": 1}), ("0.5", 0.5), ("1e-300", 1e-300), ("1.0000001", 1.0000001),
                ("min-1", lo - 1), ("max+1", hi + 1), ("1e308", 1e308), ("-1e308", -1e308), ("1e400", Raw("1e400")),
                ("-1e400", Raw("-1e400")), ("2**64", 2 ** 64), ("-2**64", -2 ** 64),
                ("10**400", Raw("1" + "0" * 400)), ("-9*400", Raw("-" + "9" * 400))]
        out = [(l, v, {"EINVAL"}) for l, v in vals]
        if required:
            out.append(("null", None, {"EINVAL"}))
    elif kind == "bool":
        vals = [("0", 0), ("1", 1), ('"true"', "true"), ('"false"', "false"), ('""', ""), ("[]", []), ("{}", {}),
                ("[true]", [True]), ("1e400", Raw("1e400")), ('"yes"', "yes")]
        out = [(l, v, {"EINVAL"}) for l, v in vals]
    elif kind == "device":
        vals = [("true", True), ("false", False), ("[]", []), ("{}", {}), ("[0]", [0]), ('{"d":0}', {"d": 0}),
                ("0.5", 0.5), ("-1", -1), ("1e308", 1e308), ("2**64", 2 ** 64), ("1e400", Raw("1e400")),
                ('"0.5"', "0.5"), ('"1x"', "1x"), ('"-1"', "-1"), ('"99"', "99"), ("99", 99), ('""', ""),
                ('"zzz"', "zzz"), ('"h"', "h"), ('"2147483648"', "2147483648"), ('"0\\u0000"', "0\0"),
                ('"' + "9" * 30 + '"', "9" * 30), ("-0.5", -0.5), ("2147483648", 2147483648)]
        out = [(l, v, {"EINVAL", "ENODEV"}) for l, v in vals]
    elif kind == "devices":
        vals = [("0", 0), ('"0"', "0"), ("true", True), ("{}", {}), ("[]", []), ("[0,0]", [0, 0]), ("[-1]", [-1]),
                ('["-1"]', ["-1"]), ("[true]", [True]), ("[[0]]", [[0]]), ("[0,99]", [0, 99]), ("[null]", [None]),
                ("[0.5]", [0.5]), ('["0","0"]', ["0", "0"]), ('[0,"0"]', [0, "0"])]
        out = [(l, v, {"EINVAL", "ENODEV"}) for l, v in vals]
    elif kind == "placement":
        vals = [(l, v) for l, v in nonstr] + [('""', ""), ('"REPLICATE"', "REPLICATE"),
                                              ('"expert_parallel"', "expert_parallel"),
                                              ('"replicate "', "replicate ")]
        out = [(l, v, {"EINVAL"}) for l, v in vals]
    return out


# ---- a hostile peer ---------------------------------------------------------------

class Peer(threading.Thread):
    def __init__(self, ctx, index, kinds):
        super().__init__(name="peer%d" % index, daemon=True)
        self.ctx = ctx
        self.index = index
        self.rng = random.Random("%d:peer%d" % (ctx.seed, index))
        self.kinds = kinds
        self.reader = index in getattr(ctx, "reader_peers", ())  # another uid's connections
        self.conn_serial = 0
        self.steps = []
        self.history = collections.deque(maxlen=4)
        self.action = 0
        self.kind = None
        self.frames = self.bytes = self.fds_sent = 0
        self.counts = collections.Counter()
        self.new_findings = []
        self.type_cases = None
        self.fd_pool = []
        self.seen_types = set()

    # -- bookkeeping
    def count(self, what, n=1):
        self.counts[what] += n

    def step(self, s):
        self.steps.append(s)

    def finding(self, cls, key, text, variant=""):
        f = self.ctx.findings.add(cls, key, "%s\n(peer %d, action %d, kind %s)" % (text, self.index, self.action,
                                                                                 self.kind), variant)
        if f:
            self.new_findings.append(f)

    def wrong(self, key, text, variant=""):
        self.finding("wrong", key, text, variant)

    def denied(self, line, why):
        self.ctx.denied_examples.setdefault(why.split(" of ")[0], short(line, 200))
        # A frame the denylist dropped because the daemon would run it: when
        # it is one that a correct daemon should refuse, say so.
        if getattr(self, "_expect_refusal", False):
            self.finding("wrong", "denylisted (not sent): the daemon would run a frame it should refuse",
                         "frame: %s" % short(line, 300), variant="%s: %s" % (self._case_label, why))

    # -- checking what comes back
    def check_line(self, line, conn, unterminated=False):
        ctx = self.ctx
        ctx.lines_checked += 1
        if unterminated:
            self.wrong("a last line without its newline", "bytes before EOF: %s" % short(line))
        if len(line) + 1 > WP_MAX_LINE:
            self.wrong("a reply longer than 1 MiB", "%d bytes: %s" % (len(line), short(line)))
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            where = "somewhere"
            try:
                m = json.loads(line.decode("utf-8", "replace"))
                if isinstance(m, dict):
                    if "\ufffd" in json.dumps(m.get("id"), ensure_ascii=False):
                        where = "the echoed id"
                    elif isinstance(m.get("error"), dict):
                        where = "%s: %s" % (m["error"].get("code"), norm_message(str(m["error"].get("message"))))
            except ValueError:
                pass
            self.wrong("invalid UTF-8 in a reply", "%s at byte %d of: %s" % (e.reason, e.start, short(line, 300)),
                       variant=where)
            text = line.decode("utf-8", "replace")
        try:
            msg = json.loads(text, parse_constant=_bad_constant)
        except (ValueError, RecursionError) as e:
            self.wrong("a reply that is not JSON", "%s: %s" % (e, short(line, 300)))
            return None
        if not isinstance(msg, dict):
            self.wrong("a reply that is not a JSON object", short(line, 300))
            return None
        if "event" in msg:
            if not isinstance(msg["event"], str):
                self.wrong("an event whose name is not a string", short(line, 300))
            return msg
        if not isinstance(msg.get("ok"), bool) or "id" not in msg:
            self.wrong("a reply without ok or id", short(line, 300))
            return msg
        if msg["ok"] is False:
            e = msg.get("error")
            if not isinstance(e, dict) or not isinstance(e.get("code"), str) or not isinstance(e.get("message"), str):
                self.wrong("an error reply without code and message", short(line, 300))
                return msg
            if e["code"] not in ERRNAMES:
                self.wrong("an error code not in common/errors.h: %s" % e["code"][:40], short(line, 300))
            if not e["message"].strip():
                self.wrong("an error with an empty message (%s)" % e["code"], short(line, 300))
            if any(ord(c) < 32 for c in e["message"]):
                self.wrong("control characters (newlines, escapes) of a request echoed into an error message",
                           short(line, 300), variant="%s: %s" % (e["code"], norm_message(e["message"])))
        elif not isinstance(msg.get("result"), dict):
            self.wrong("an ok reply without a result object", short(line, 300))
        return msg

    def expect_reply(self, conn, n, what, timeout=None):
        """Waits for n replies in all on conn; a finding when they do not come."""
        timeout = timeout or self.ctx.reply_timeout
        if conn.replies_at_least(n, timeout):
            return True
        if conn.eof:
            self.wrong("connection closed without a reply to %s" % what,
                       "got %d of %d replies before EOF" % (len(conn.replies), n))
        else:
            self.finding("hang", "no reply to %s within %.0f s" % (what, timeout),
                         "got %d of %d replies" % (len(conn.replies), n))
        return False

    # -- the loop
    def run(self):
        weights = [KINDS[k] for k in self.kinds]
        self.make_fd_pool()
        try:
            while not self.ctx.stop.is_set():
                kind = self.rng.choices(self.kinds, weights)[0]
                self.kind = kind
                self.action += 1
                self.steps = []
                self.new_findings = []
                f0, b0 = self.frames, self.bytes
                conns = []
                self._conns = conns
                self._expect_refusal = False
                try:
                    getattr(self, "do_" + kind)(conns)
                except Stopped:
                    pass
                except Exception:
                    self.ctx.tool_errors.append("peer %d action %d (%s):\n%s" % (self.index, self.action, kind,
                                                                                traceback.format_exc()))
                finally:
                    for c in conns:
                        c.close()
                with self.ctx.count_lock:
                    self.ctx.kind_counts[kind] += 1
                    self.ctx.kind_frames[kind] += self.frames - f0
                    self.ctx.kind_bytes[kind] += self.bytes - b0
                self.history.append((self.action, kind, self.steps))
                if self.new_findings:
                    path = self.ctx.save_replay("peer%d-action%d-%s" % (self.index, self.action, kind), self.steps,
                                                "peer %d action %d kind %s" % (self.index, self.action, kind))
                    for f in self.new_findings:
                        f.repro = path
                # CPU: a pause between actions keeps the Python side under a core.
                self.ctx.stop.wait(self.ctx.pause * (0.5 + self.rng.random()))
        finally:
            for fd in self.fd_pool:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def conn(self, read=True):
        c = Conn(self, read=read)
        self._conns.append(c)
        if not c.open():
            return None
        return c

    def hello(self, c, check=True):
        n = len(c.replies)
        if not c.send(frame(0, "hello", {"version": "1.0"})):
            return False
        if not self.expect_reply(c, n + 1, "hello"):
            return False
        r = c.replies[n]
        if check and r.get("ok") is not True:
            self.wrong("hello refused", json.dumps(r)[:300])
            return False
        return True

    # -- kinds
    def do_random(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if rng.random() < 0.5 and not self.hello(c):
            return
        for _ in range(rng.randint(1, 6)):
            n = rng.choice([1, 2, 7, 64, 512, 4096, 65536, 300000])
            data = rng.randbytes(n)
            if rng.random() < 0.5:  # lines: newlines sprinkled in
                data = bytearray(data)
                for _ in range(max(1, n // rng.choice([8, 64, 1024]))):
                    data[rng.randrange(n)] = 10
                data = bytes(data)
            if rng.random() < 0.3:  # printable garbage
                data = bytes(b % 95 + 32 for b in data[:4096]) + b"\n"
            if not c.send(data):
                return
            c.drain(idle=0.05, most=0.5)
        c.drain(idle=0.1, most=1.0)

    def do_mutated(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if rng.random() < 0.8 and not self.hello(c):
            return
        pool = [valid_frames(rng, self.ctx, rand_id(rng)) for _ in range(8)]
        for _ in range(rng.randint(4, 40)):
            data = mutate(rng, rng.choice(pool), pool)
            if not c.send(data):
                return
        c.drain(idle=0.1, most=2.0)
        if not c.eof:
            self.still_usable(c, "after mutated frames")

    def still_usable(self, c, when):
        """A valid request after bad input must still get its right answer.
        The bad input may have left an unfinished line: a newline ends it."""
        c.send(b"\n")
        c.drain(idle=0.05, most=0.5)
        if c.eof:
            return
        n = len(c.replies)
        rid = "probe-%d" % self.action
        if not c.send(frame(rid, "list")):
            return
        if not c.wait(lambda: any(r.get("id") == rid for r in c.replies[n:]), self.ctx.reply_timeout):
            if not c.eof:
                self.finding("hang", "no answer to list %s" % when, "replies since: %r" % c.replies[n:][:3])
            return
        r = [r for r in c.replies[n:] if r.get("id") == rid][0]
        if r.get("ok") is not True:
            # the bad input may have left hello undone (mutated hello): EPROTO is right then
            if not (isinstance(r.get("error"), dict) and r["error"].get("code") == "EPROTO"):
                self.wrong("list refused %s" % when, json.dumps(r)[:300])
        elif MODEL not in [m.get("name") for m in r["result"].get("models", [])]:
            self.wrong("list without the model %s" % when, json.dumps(r)[:300])

    def do_utf8(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if not self.hello(c):
            return
        count = rng.randint(3, 16)
        sent = 0
        for _ in range(count):
            op = rng.choice(["hello", "info", "verify", "attach", "unload", "load", "policy", "snapshot", "nosuch",
                             "list", "detach", "leases"])
            bad = rng.choice([rng.choice(INVALID_UTF8), rng.choice(ESCAPED_BAD), rng.choice(CONTROL),
                              (("a" * rng.choice([62, 63, 64, 127, 200])) + rng.choice(MULTIBYTE)).encode(),
                              (rng.choice(MULTIBYTE) * rng.choice([20, 200, 400, 800])).encode()])
            where = rng.choice(["value", "key", "op", "id", "idkey"])
            placeholder = b"\x00BAD\x00"
            field = rng.choice(list(FIELDS.get(op, {}).keys()) or ["name"])
            base = {"hello": {"version": "1.0"}, "info": {"name": MODEL}, "verify": {"name": MODEL},
                    "attach": {"name": MODEL}, "unload": {"name": MODEL, "force": "x"},
                    "load": {"path": SAFE_LOAD_PREFIX + "x"}, "policy": {"conf": "x"}}.get(op, {})
            args = collections.OrderedDict(base)
            opname = op
            rid = rng.randrange(1 << 30)
            if where == "value":
                args[field] = Raw(b'"' + placeholder + b'"')
            elif where == "key":
                args[Raw(b'"' + placeholder + b'"')] = 1
            elif where == "op":
                opname = Raw(b'"' + rng.choice([b"", op.encode()]) + placeholder + b'"')
            elif where == "id":
                rid = Raw(b'"' + placeholder + b'"')
            else:
                args = collections.OrderedDict(args)
            line = frame(rid, opname, args)
            if where == "idkey":
                line = line.replace(b'{"id"', b'{"i' + placeholder + b'd":1,"id"', 1)
            bad_in_string = bad.replace(b'"', b"'").replace(b"\n", b" ")
            line = line.replace(placeholder, bad_in_string)
            if not c.send(line):
                return
            sent += 1
        c.replies_at_least(1 + sent, self.ctx.reply_timeout)
        c.drain(idle=0.05, most=0.5)
        if not c.eof:
            self.still_usable(c, "after invalid UTF-8")

    def do_nesting(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if not self.hello(c):
            return
        depth = rng.choice([100000, 100000, 50000, 5000, 1001, 1000, 999, 998, 500])
        which = rng.randrange(7)
        if which == 0:
            body = b"[" * depth + b"]" * depth
        elif which == 1:
            body = b"[" * depth  # unclosed
        elif which == 2:
            body = b'{"a":' * depth + b"1" + b"}" * depth
        elif which == 3:
            body = b'{"a":' * depth
        elif which == 4:
            body = b"[{" * (depth // 2) + b"}]" * (depth // 2)
        elif which == 5:
            body = b'[' * depth + b'"' + b"x" * 10 + b'"' + b']' * depth
        else:
            body = b"[" * depth + b"1," * 3
        where = rng.choice(["args-field", "id", "args", "top", "name"])
        if where == "args-field":
            line = b'{"id":1,"op":"list","args":{"x":' + body + b"}}"
        elif where == "id":
            line = b'{"id":' + body + b',"op":"list"}'
        elif where == "args":
            line = b'{"id":1,"op":"list","args":' + body + b"}"
        elif where == "name":
            line = b'{"id":1,"op":"info","args":{"name":' + body + b"}}"
        else:
            line = body
        if len(line) + 1 > WP_MAX_LINE:
            line = line[:WP_MAX_LINE - 1]
        if not c.send(line + b"\n"):
            return
        self.expect_reply(c, 2, "a deeply nested line (%s, %s, depth %d)" % (where, which, depth))
        c.drain(idle=0.05, most=0.3)
        if not c.eof:
            self.still_usable(c, "after deep nesting")

    def do_numbers(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if not self.hello(c):
            return
        sent = []
        for _ in range(rng.randint(4, 24)):
            tok = rng.choice(NUMBER_TOKENS)
            where = rng.choice(["id", "field", "field", "args", "op"])
            if where == "id":
                line = b'{"id":' + tok.encode() + b',"op":"list"}\n'
                sent.append(("id", tok))
            elif where == "field":
                op = rng.choice(["info", "snapshot", "leases", "detach", "attach", "unload", "hello", "list"])
                fields = [k for k, v in FIELDS[op].items() if v[0] in ("int", "device", "bool")] or ["events"]
                field = rng.choice(fields)
                args = collections.OrderedDict()
                if op in ("info", "attach", "unload"):
                    args["name"] = MODEL
                if op == "hello":
                    args["version"] = "1.0"
                args[field] = Raw(tok)
                line = frame(rng.randrange(1 << 30), op, args)
                sent.append((op + "." + field, tok))
            elif where == "args":
                line = b'{"id":3,"op":"stats","args":' + tok.encode() + b"}\n"
                sent.append(("args", tok))
            else:
                line = b'{"id":4,"op":' + tok.encode() + b"}\n"
                sent.append(("op", tok))
            if not c.send(line):
                return
        before = 1
        if not self.expect_reply(c, before + len(sent), "huge-number frames"):
            return
        # Ids as numbers: echoed as the same double (or null for one that is infinite).
        for (where, tok), r in zip(sent, c.replies[before:]):
            if where != "id":
                if r.get("ok") is True and where.split(".")[-1] in ("offset", "limit", "device", "segment", "block",
                                                                    "lease", "wait", "force", "writable") \
                        and not _strict_int_like(tok, where):
                    self.wrong("a wrong type or value accepted", json.dumps(r)[:300],
                               variant="%s = %s" % (where, tok[:30]))
                continue
            try:
                want = json.loads(tok, parse_constant=_bad_constant)
            except ValueError:
                continue  # not JSON: cJSON may or may not take it
            got = r.get("id")
            if isinstance(want, (int, float)) and not isinstance(want, bool):
                fw = _num(want)
                if not (math.isfinite(fw) and abs(fw) < 1e15 and fw == math.floor(fw)):
                    # the protocol's ids: whole numbers below 10^15 (cJSON writes 15 digits); others refused
                    if got is not None or r.get("ok") is not False or r["error"].get("code") != "EINVAL":
                        self.wrong("a numeric id out of range not refused", "got %s" % json.dumps(r)[:200],
                                   variant=tok[:40])
                elif not isinstance(got, (int, float)) or _num(got) != fw:
                    self.wrong("a numeric id not echoed as sent",
                               "sent %s (%r as a double), the reply's id reads back as %r" % (tok[:40], fw, got),
                               variant=tok[:40])

    def do_types(self, conns):
        """Every field of every op, each wrong type, one at a time."""
        rng = self.rng
        if self.type_cases is None or not self.type_cases:
            self.type_cases = self.all_type_cases()
            rng.shuffle(self.type_cases)
        c = self.conn()
        if not c:
            return
        if not self.hello(c):
            return
        batch = [self.type_cases.pop() for _ in range(min(len(self.type_cases), rng.randint(10, 40)))]
        sent = []
        for op, field, label, args, codes, top in batch:
            rid = rng.randrange(1, 1 << 30)
            if top == "id":
                line = frame(args, op, {})
                rid = None
            elif top == "op":
                line = frame(rid, args, {})
            elif top == "args":
                line = frame(rid, op, args)
            else:
                line = frame(rid, op, args)
            self._expect_refusal = True
            self._case_label = "%s.%s = %s" % (op, field, label)
            ok = c.send(line)
            self._expect_refusal = False
            if not ok:
                if c.eof:
                    return
                continue  # denied
            sent.append((op, field, label, rid, codes, line))
            if field == "(a reader)":
                self.count("reader: administrators' requests sent")
            else:
                self.ctx.type_coverage.add((op, field))
        if not self.expect_reply(c, 1 + len(sent), "wrong-type frames"):
            return
        for (op, field, label, rid, codes, line), r in zip(sent, c.replies[1:]):
            if has_nul_escape(line):
                if r.get("id") is not None or r.get("ok") is not False or r["error"].get("code") != "EBADMSG":
                    self.wrong("a string with a NUL not refused", "frame %s\nreply %s" %
                               (short(line, 200), json.dumps(r)[:300]), variant="%s.%s" % (op, field))
                continue
            if r.get("id") != rid:
                self.wrong("a wrong-type reply with another id", "sent id %r, got %r: %s" % (rid, r.get("id"),
                                                                                           short(line)),
                           variant="%s.%s" % (op, field))
            if r.get("ok") is not False:
                self.wrong("a wrong type or value accepted", "frame %s\nreply %s" %
                           (short(line, 200), json.dumps(r)[:300]), variant="%s.%s = %s" % (op, field, label))
            elif r["error"].get("code") not in codes:
                self.wrong("a wrong type or value refused with an unexpected code",
                           "frame %s\nreply %s" % (short(line, 200), json.dumps(r)[:300]),
                           variant="%s.%s = %s: %s, not %s" % (op, field, label, r["error"].get("code"),
                                                               "/".join(sorted(codes))))
        # attaches that went through (a bug) leave leases; the close ends them

    def all_type_cases(self):
        ops = self.ctx.ops
        cases = []
        for op in ops:
            fields = dict(FIELDS.get(op, {}))
            fields["events"] = ("bool", False)
            for field, spec in fields.items():
                kind, required = spec[0], spec[1]
                lo, hi = (spec[2], spec[3]) if kind == "int" else (None, None)
                for label, value, codes in wrong_values(kind, lo, hi, required):
                    args = self.base_args(op, field)
                    args[field] = value
                    if op == "load" and field == "device":
                        args.pop("devices", None)
                    if self.reader and op in ADMIN_OPS:
                        codes = {"EPERM"}  # the role is checked before the arguments
                    cases.append((op, field, label, args, codes, None))
            # the envelope
            for label, value in [("true", True), ("false", False), ("[]", []), ("{}", {}), ("[1]", [1]),
                                 ('{"a":1}', {"a": 1})]:
                cases.append((op, "id", label, value, {"EINVAL"}, "id"))
            for label, value in [("[]", []), ('"x"', "x"), ("0", 0), ("true", True), ("null", Raw("null"))]:
                cases.append((op, "args", label, value, {"EINVAL"}, "args"))
        for label, value, codes in [("0", 0, {"EINVAL"}), ("null", None, {"EINVAL"}), ("true", True, {"EINVAL"}),
                                    ("[]", [], {"EINVAL"}), ("{}", {}, {"EINVAL"}), ('["list"]', ["list"], {"EINVAL"}),
                                    ('""', "", {"ENOSYS"}), ('"LIST"', "LIST", {"ENOSYS"}),
                                    ('"list "', "list ", {"ENOSYS"}), ('"hello\\u0001"', "hello\x01", {"ENOSYS"})]:
            cases.append(("list", "op", label, value, codes, "op"))
        # a bad value must not slip through for lack of the required field's check
        for op in ops:
            if any(s[1] for s in FIELDS.get(op, {}).values()) and op != "hello":
                cases.append((op, "(required missing)", "{}", {}, {"EPERM" if self.reader and op in ADMIN_OPS
                                                                   else "EINVAL"}, None))
        if self.reader:
            # what an administrator would run, the campaign's end included
            for op, args in [("shutdown", {}), ("unload", {"name": MODEL}), ("unload", {"name": MODEL, "force": True}),
                             ("load", {"path": self.ctx.ckpt, "name": "by-a-reader"}), ("verify", {"name": MODEL}),
                             ("verify", {"name": MODEL, "quick": True}), ("snapshot", {}),
                             ("policy", {"conf": "max_split_size_mb:20"}), ("policy", {"conf": "default"})]:
                cases.append((op, "(a reader)", "valid", args, {"EPERM"}, None))
        return cases

    def base_args(self, op, field):
        """Valid arguments for op around the field under test."""
        return collections.OrderedDict({
            "hello": {"version": "1.0"},
            "load": {"path": self.ctx.ckpt, "name": "fuzz-never-loaded", "devices": [0], "placement": "replicate"},
            "unload": {"name": MODEL, "force": False, "wait": 1},
            "verify": {"name": MODEL},
            "info": {"name": MODEL, "offset": 0, "limit": 2},
            "attach": {"name": MODEL, "device": 0, "writable": False},
            "detach": {"lease": 1},
            "reattach": {"token": "0" * 32},
            "leases": {"offset": 0},
            "policy": {},
            "snapshot": {"device": 0, "segment": 0, "block": 0},
        }.get(op, {}))

    def do_overlong(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if not self.hello(c):
            return
        which = rng.choice(["raw", "json", "exact", "exact", "idlong", "several"])
        if which == "raw":
            n = WP_MAX_LINE + rng.choice([0, 1, 2, 100, 65536, 1 << 20])
            data = b"a" * n if rng.random() < 0.5 else rng.randbytes(n).replace(b"\n", b"x")
            c.send(data + (b"\n" if rng.random() < 0.5 else b""), timeout=20)
            self.expect_emsgsize(c, "a line of %d bytes (%s)" % (n, which))
        elif which == "json":
            pad = WP_MAX_LINE - 40 + rng.randint(1, 5000)
            line = b'{"id":9,"op":"list","args":{"x":"' + b"a" * pad + b'"}}\n'
            if len(line) <= WP_MAX_LINE:
                line = line[:-4] + b"a" * (WP_MAX_LINE + 1 - len(line)) + b'"}}\n'
            c.send(line, timeout=20)
            self.expect_emsgsize(c, "a JSON line of %d bytes" % len(line))
        elif which == "exact":
            # exactly WP_MAX_LINE with its newline: must be served
            head = b'{"id":"exact","op":"list","args":{"x":"'
            tail = b'"}}\n'
            extra = rng.choice([0, 1])  # 1: one byte over
            line = head + b"b" * (WP_MAX_LINE - len(head) - len(tail) + extra) + tail
            c.send(line, timeout=20)
            if extra == 0:
                if self.expect_reply(c, 2, "a line of exactly 1 MiB", timeout=self.ctx.reply_timeout * 2):
                    r = c.replies[1]
                    if r.get("ok") is not True or r.get("id") != "exact":
                        self.wrong("a line of exactly 1 MiB (newline included) refused", json.dumps(r)[:300])
            else:
                self.expect_emsgsize(c, "a line of 1 MiB + 1")
        elif which == "idlong":
            # an id string near 1 MiB: its reply echoes it
            n = WP_MAX_LINE - rng.choice([100, 60, 200, 1000, 4000])
            line = b'{"id":"' + b"i" * n + b'","op":"list"}\n'
            line = line if len(line) <= WP_MAX_LINE else line[:0]
            if line and c.send(line, timeout=20):
                if c.replies_at_least(2, self.ctx.reply_timeout):
                    r = c.replies[1]
                    if r.get("ok") is True and r.get("id") != "i" * n:
                        self.wrong("an id near 1 MiB not echoed", "id of %d bytes" % n)
                elif c.eof:
                    self.wrong("request with an id string near 1 MiB: no reply, the daemon dropped the connection",
                               "a list request whose line is %d bytes (id %d bytes); its reply would not fit "
                               "1 MiB; the daemon logs 'does not fit a message; dropping the client'" % (len(line), n))
                else:
                    self.finding("hang", "no reply to a request with an id near 1 MiB", "id of %d bytes" % n)
        else:
            # several lines of 900 KB each, valid
            k = rng.randint(2, 4)
            line = b'{"id":7,"op":"stats","args":{"pad":"' + b"p" * (900 * 1024) + b'"}}\n'
            c.send(line * k, timeout=30)
            if self.expect_reply(c, 1 + k, "%d lines of 900 KB" % k, timeout=self.ctx.reply_timeout * 2):
                bad = [r for r in c.replies[1:] if r.get("ok") is not True]
                if bad:
                    self.wrong("a 900 KB stats line refused", json.dumps(bad[0])[:300])

    def expect_emsgsize(self, c, what):
        if not c.wait(lambda: c.eof or len(c.replies) >= 2, self.ctx.reply_timeout * 2):
            self.finding("hang", "no EMSGSIZE for %s" % what.split(" (")[0].split(" of ")[0],
                         "%s: neither a reply nor EOF within %.0f s" % (what, self.ctx.reply_timeout * 2))
            return
        c.wait_eof(self.ctx.reply_timeout)
        errs = [r for r in c.replies[1:] if isinstance(r.get("error"), dict)]
        if not errs or errs[0]["error"].get("code") != "EMSGSIZE":
            self.wrong("no EMSGSIZE reply for an over-long line", "%s: replies %r" % (what, c.replies[1:][:2]))
        if not c.eof:
            self.wrong("connection left open after an over-long line", what)

    def make_fd_pool(self):
        pool = self.fd_pool
        try:
            pool.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
            pool.extend(os.pipe())
            a, b = socket.socketpair()
            pool.extend([a.detach(), b.detach()])
            m = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(m, 4096)
            pool.append(m)
            if hasattr(os, "eventfd"):
                pool.append(os.eventfd(0))
            pool.append(os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            ep = select.epoll()
            pool.append(os.dup(ep.fileno()))
            ep.close()
        except OSError:
            pass

    def pick_fds(self, n, extra_conn=None):
        src = list(self.fd_pool)
        if extra_conn is not None and extra_conn.sock is not None:
            src.append(extra_conn.sock.fileno())
        return [os.dup(self.rng.choice(src)) for _ in range(n)]

    def do_fds(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        other = self.conn() if rng.random() < 0.3 else None  # a socket to the daemon, sent to the daemon
        prehello = rng.random() < 0.2
        if not prehello:
            if not self.hello(c):
                return
        expect = 1 if not prehello else 0
        most = 0
        for _ in range(rng.randint(1, 6)):
            n = rng.choice([1, 2, 3, 10, 64, 200, 252, 253, 254, 300, 506, 512])
            most = max(most, n)
            split = n > WP_MAX_FDS and rng.random() < 0.7
            fds = self.pick_fds(n, other if rng.random() < 0.5 else None)
            what = rng.randrange(5)
            try:
                if what == 0:
                    ok = c.send(frame(rng.randrange(1 << 20), "list"), fds, split_fds=split)
                    expect += 1
                elif what == 1:
                    ok = c.send(b"garbage " + rng.randbytes(8).replace(b"\n", b"") + b"\n", fds, split_fds=split)
                    expect += 1
                elif what == 2:  # on the first half of a line, then the rest
                    f = frame(rng.randrange(1 << 20), "stats")
                    cut = rng.randrange(1, len(f) - 1)
                    ok = c.send(f[:cut], fds, split_fds=split) and c.send(f[cut:])
                    expect += 1
                elif what == 3:  # with nothing but a newline
                    ok = c.send(b"\n", fds, split_fds=split)
                else:  # with a hello before hello, or an attach
                    ok = c.send(frame(rng.randrange(1 << 20), "leases"), fds, split_fds=split)
                    expect += 1
            finally:
                for fd in fds:
                    os.close(fd)
            if not ok:
                return
        if self.expect_reply(c, expect, "frames with descriptors"):
            if not prehello:
                # descriptors wait with a half-read line for the request that
                # names them: past what the reader holds (2 x 253) they are
                # refused with EMSGSIZE
                allowed = ("EBADMSG", "EMSGSIZE") if most > WP_MAX_FDS else ("EBADMSG",)
                bad = [r for r in c.replies[1:] if r.get("ok") is not True and
                       not (isinstance(r.get("error"), dict) and r["error"].get("code") in allowed)]
                if bad:
                    self.wrong("a request with descriptors refused (%s)" % bad[0]["error"].get("code"),
                               json.dumps(bad[0])[:300])
        if rng.random() < 0.5:
            fds = self.pick_fds(3)
            try:
                c.send(frame(1, "list")[:-3], fds)  # left unfinished, with descriptors
            finally:
                for fd in fds:
                    os.close(fd)
            c.close(rst=rng.random() < 0.5)

    def do_halfline(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if rng.random() < 0.6 and not self.hello(c):
            return
        f = valid_frames(rng, self.ctx, rand_id(rng))
        cut = rng.randrange(0, len(f) - 1)
        fds = self.pick_fds(rng.choice([0, 0, 1, 5])) if rng.random() < 0.4 else []
        try:
            c.send(f[:cut], fds or None)
        finally:
            for fd in fds:
                os.close(fd)
        how = rng.randrange(3)
        if how == 0:
            c.close()
        elif how == 1:
            c.close(rst=True)
        else:
            c.shut_wr()
            if not c.wait_eof(self.ctx.reply_timeout):
                self.finding("hang", "no EOF after shutdown(SHUT_WR) on a half line",
                             "sent %s then SHUT_WR" % short(f[:cut]))

    def do_noread(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if not self.hello(c):
            return
        c.read_enabled = False
        reqs = []
        for _ in range(rng.randint(20, 200)):
            r = rng.random()
            if r < 0.3:
                reqs.append(frame(1, "info", {"name": MODEL, "limit": 100000}))
            elif r < 0.5:
                reqs.append(frame(2, "snapshot", {"device": rng.randrange(self.ctx.n_devices)}))
            elif r < 0.6:
                reqs.append(frame(3, "attach", {"name": MODEL}))
            else:
                reqs.append(frame(4, "stats"))
        c.send(b"".join(reqs), timeout=rng.uniform(0.5, 3.0))
        self.ctx.stop.wait(rng.uniform(0.5, 3.0))
        c.close(rst=rng.random() < 0.3)

    def do_burst(self, conns):
        rng = self.rng
        for _ in range(rng.randint(3, 30)):
            c = self.conn()
            if not c:
                continue
            r = rng.random()
            if r < 0.3:
                c.send(frame(1, "hello", {"version": "1.0"}))
            elif r < 0.4:
                c.send(frame(1, "hello", {"version": "1.0"}) + frame(2, "attach", {"name": MODEL}))
            c.close(rst=rng.random() < 0.4)
            conns.remove(c)

    def do_prehello(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        ops = list(self.ctx.ops)
        rng.shuffle(ops)
        sent = []
        for op in ops[:rng.randint(3, len(ops))]:
            if op == "hello":
                continue
            args = self.base_args(op, None)
            if op in DANGEROUS_OPS:
                args["events"] = "wrong"  # never a valid form (the hello check comes first anyway)
            rid = rng.randrange(1 << 20)
            if c.send(frame(rid, op, args)):
                sent.append((op, rid, "EPROTO"))
        for v, code in [(rng.choice(["2.0", "0.9", "-1.0", "9999999999999999999.0", "1000000.0"]), "EPROTONOSUPPORT"),
                        (rng.choice(["x", "1e0", "", ".1", "1-0", "v1", "1,0"]), "EINVAL")]:
            rid = rng.randrange(1 << 20)
            if c.send(frame(rid, "hello", {"version": v})):
                sent.append(("hello %r" % v, rid, code))
            rid = rng.randrange(1 << 20)
            if c.send(frame(rid, "list")):
                sent.append(("list after a refused hello", rid, "EPROTO"))
        rid = rng.randrange(1 << 20)
        if c.send(frame(rid, "frobnicate")):
            sent.append(("unknown op before hello", rid, "ENOSYS"))
        if not self.expect_reply(c, len(sent), "requests before hello"):
            return
        for (what, rid, code), r in zip(sent, c.replies):
            got = r.get("error", {}).get("code") if r.get("ok") is False else "ok"
            if got != code or r.get("id") != rid:
                self.wrong("a wrong answer before hello", json.dumps(r)[:300],
                           variant="%s answered %s, not %s" % (what, got, code))

    def do_flood(self, conns):
        rng = self.rng
        ctx = self.ctx
        c = self.conn()
        if not c:
            return
        n = rng.choice([20, 50, 100, 200, 400])
        reqs = [("hello", 0, frame(0, "hello", {"version": "1.0"}))]
        attaches = verifies = 0
        policy_want = {}
        for i in range(1, n + 1):
            r = rng.random()
            if r < 0.2:
                op, a = "list", None
            elif r < 0.35:
                op, a = "stats", None
            elif r < 0.5:
                op, a = "info", {"name": MODEL, "offset": rng.randrange(ctx.n_tensors), "limit": rng.randint(1, 50)}
            elif r < 0.6:
                op, a = "leases", None
            elif r < 0.7:
                op, a = "snapshot", {"device": rng.randrange(ctx.n_devices)}
            elif r < 0.78:
                op, a = "policy", None
            elif r < 0.84:
                # other connections' leases (small ids) are not this one's
                op, a = "detach", {"lease": rng.randrange(1, 300) if rng.random() < 0.6 else rng.randrange(1, 1 << 40)}
            elif r < 0.88:
                conf = rng.choice(POLICY_CONFS)
                op, a = "policy", {"conf": conf[0]}
                policy_want[i] = conf[1]
            elif r < 0.95:
                op, a = "info", {"name": "nope"}
            elif r < 0.98 and attaches < 2:
                op, a = "attach", {"name": MODEL, "device": rng.randrange(ctx.n_devices)}
                if rng.random() < 0.3:
                    a["writable"] = True  # refused: attach_writable is off
                attaches += 1
            elif verifies < 1 and rng.random() < 0.3:
                op, a = "verify", {"name": MODEL}
                verifies += 1
            else:
                op, a = "hello", {"version": "1.%d" % rng.randrange(100)}
            reqs.append((op, i, frame(i, op, a)))
        if not c.send(b"".join(f for _, _, f in reqs), timeout=30):
            return
        if not self.expect_reply(c, len(reqs), "a pipelined flood of %d requests" % len(reqs),
                                 timeout=ctx.reply_timeout * 2):
            return
        ids = [r.get("id") for r in c.replies]
        if sorted(ids, key=str) != sorted([i for _, i, _ in reqs], key=str):
            self.wrong("a flood's replies do not answer each request once", "ids %r" % ids[:40])
        sync_sent = [i for op, i, _ in reqs if op != "verify"]
        sync_got = [i for i in ids if i in set(sync_sent)]
        if sync_got != sync_sent:
            self.wrong("a flood's replies out of order", "first difference near %r" %
                       next(((a, b) for a, b in zip(sync_sent, sync_got) if a != b), None))
        byid = {r.get("id"): r for r in c.replies}
        own = set(m.get("lease") for m in c.msgs if m.get("event") == "attach")
        for op, i, f in reqs:
            r = byid.get(i)
            if r is None:
                continue
            want_ok = not (op == "detach" or (op == "info" and b'"nope"' in f) or b'"writable":true' in f)
            if op == "policy" and i in policy_want:
                want_ok = policy_want[i]
            refused = self.reader and (op in ADMIN_OPS or (op == "policy" and i in policy_want))
            if refused:
                want_ok = False
            if op == "detach" and r.get("ok") and (r.get("result") or {}).get("lease") in own:
                continue  # its own lease, from an attach of this flood
            if refused and not r.get("ok") and (r.get("error") or {}).get("code") != "EPERM":
                self.wrong("flood: a reader's request for an administrator not refused with EPERM",
                           "request %s\nreply %s" % (short(f, 200), json.dumps(r)[:300]), variant=op)
                continue
            if (want_ok and not r.get("ok") and i in policy_want
                    and (r.get("error") or {}).get("code") == "EBUSY"):
                continue  # another peer's load is running: policy set waits for it, by design
            if bool(r.get("ok")) != want_ok:
                self.wrong("flood: an answer of the wrong kind", "request %s\nreply %s" % (short(f, 200),
                                                                                           json.dumps(r)[:300]),
                           variant="%s answered %s" % (op, "ok" if r.get("ok") else r.get("error", {}).get("code")))
                continue
            if not r.get("ok"):
                continue
            res = r.get("result") or {}
            if op == "list" and model_names(res) != [MODEL]:
                self.wrong("flood: list does not show exactly the model", json.dumps(r)[:300])
            elif op == "attach" and res.get("tensors", 0) <= 0:
                self.wrong("flood: attach with no tensors", json.dumps(r)[:300])
            elif op == "verify" and res.get("match") is not True:
                self.wrong("flood: verify does not match", json.dumps(r)[:300])
            elif op == "info" and b'"nope"' not in f:
                if res.get("tensors") != ctx.n_tensors or not isinstance(res.get("tensor_list"), list):
                    self.wrong("flood: info is wrong", json.dumps(r)[:300])

    def do_worker(self, conns):
        """A worker that dies: weightctl attach --hold, killed at a random moment."""
        rng = self.rng
        if not self.ctx.slots.acquire(timeout=2):
            return
        try:
            dev = rng.choice([None] + list(range(self.ctx.n_devices)))
            cmd = h.ctl_cmd(self.ctx.sock, ["attach", MODEL, "--hold", "3"] +
                            (["--device", str(dev)] if dev is not None else []))
            self.step(("note", -1, "run %s" % " ".join(cmd)))
            who = {}
            if self.reader:
                uid = self.ctx.reader.uid
                who = dict(user=uid, group=uid, extra_groups=[])
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env=h.child_env(), **who)
            self.frames += 1
            self.ctx.stop.wait(rng.uniform(0.0, 1.0))
            p.kill()
            _, err = p.communicate(timeout=30)
            if h.sanitizer_report(err.decode(errors="replace")):
                self.finding("crash", "sanitizer report in weightctl attach", err.decode(errors="replace")[-3000:])
        finally:
            self.ctx.slots.release()

    def do_verify(self, conns):
        rng = self.rng
        c = self.conn()
        if not c:
            return
        if not self.hello(c):
            return
        k = rng.randint(1, 3)
        for i in range(k):
            c.send(frame(100 + i, "verify", {"name": MODEL, "events": rng.random() < 0.5}))
        if rng.random() < 0.4:
            self.ctx.stop.wait(rng.uniform(0, 0.3))
            c.close(rst=rng.random() < 0.5)  # abandoned: cancelled
            return
        if self.expect_reply(c, 1 + k, "%d pipelined verifies" % k, timeout=self.ctx.reply_timeout * 3):
            for r in c.replies[1:]:
                if self.reader:
                    if r.get("ok") is not False or r["error"].get("code") != "EPERM":
                        self.wrong("a reader's verify not refused with EPERM", json.dumps(r)[:300])
                elif r.get("ok") is not True or r["result"].get("match") is not True:
                    self.wrong("verify failed or did not match", json.dumps(r)[:300])


    def ask(self, c, op, args, what):
        """One request on c; its reply, or None (a finding when none came)."""
        n = len(c.replies)
        rid = "%s-%d-%d" % (op, self.action, n)
        if not c.send(frame(rid, op, args)) or not self.expect_reply(c, n + 1, what):
            return None
        return c.replies[n]

    def do_reattach(self, conns):
        rng = self.rng
        a = self.conn()
        if not a or not self.hello(a):
            return
        r = self.ask(a, "attach", {"name": MODEL}, "an attach")
        if r is None:
            return
        res = r.get("result") or {}
        token, lease = res.get("token"), res.get("lease")
        if r.get("ok") is not True or not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]{32}", token):
            self.wrong("an attach without a lease token", json.dumps(r)[:300])
            return
        b = self.conn()
        if not b or not self.hello(b):
            return
        other = token[:-1] + ("1" if token[-1] == "0" else "0")
        altered = [token.upper(), token[:-1], token + "0", other, " " + token]
        for t, code in [(token, "EBUSY")] + [(t, "ENOENT") for t in rng.sample(altered, rng.randint(1, 3))]:
            r = self.ask(b, "reattach", {"token": t}, "a reattach")
            if r is None:
                return
            got = "ok" if r.get("ok") else (r.get("error") or {}).get("code")
            if got != code and not (code == "ENOENT" and t.upper() == token.upper() and got == "EBUSY"):
                self.wrong("reattach: a wrong answer", json.dumps(r)[:300],
                           variant="%s token answered %s, not %s" % ("its" if t == token else "an altered", got, code))
        r = self.ask(b, "leases", None, "leases")
        if r is not None and token in json.dumps(r):
            self.wrong("leases shows a lease's token", json.dumps(r)[:300])
        a.close()
        # The lease ends when the daemon sees the close: EBUSY until then.
        deadline = time.monotonic() + self.ctx.reply_timeout
        while True:
            r = self.ask(b, "reattach", {"token": token}, "a reattach")
            if r is None:
                return
            code = "ok" if r.get("ok") else (r.get("error") or {}).get("code")
            if code != "EBUSY":
                break
            if time.monotonic() > deadline:
                self.finding("leak", "a lease outlives its connection", "lease %r: %s" % (lease, json.dumps(r)[:300]))
                return
            self.ctx.stop.wait(0.05)
        if code != "ENOENT":
            self.wrong("reattach: a lease taken again after its connection closed", json.dumps(r)[:300],
                       variant=code)


def transient(m):
    """A model that a hostile load of a path that does not exist made: listed
    as loading until its open fails."""
    return isinstance(m, dict) and m.get("state") == "loading" and str(m.get("path", "")).startswith(SAFE_LOAD_PREFIX)


def model_names(list_result, strict=False):
    models = list_result.get("models") if isinstance(list_result, dict) else None
    if not isinstance(models, list):
        return None
    return [m.get("name") for m in models if strict or not transient(m)]


def _strict_int_like(tok, where):
    """True when tok is a value the field may accept (an integer in range)."""
    try:
        v = json.loads(tok, parse_constant=_bad_constant)
    except ValueError:
        v = None
        try:
            v = float(tok)
        except ValueError:
            return False
    if isinstance(v, bool):
        return where.endswith(("force", "writable"))
    d = _num(v)
    return d is not None and math.isfinite(d) and d == math.floor(d) and d >= 0


# ---- the well-behaved checker -------------------------------------------------------

class CheckFailed(Exception):
    pass


class Checker(threading.Thread):
    def __init__(self, ctx):
        super().__init__(name="checker", daemon=True)
        self.ctx = ctx
        self.rng = random.Random("%d:checker" % ctx.seed)
        self.rounds = 0
        self.ctl_runs = 0
        self.latencies = collections.defaultdict(list)
        self.base = None
        self.attach_base = {}
        self.last_ctl = 0.0
        self.last_verify = 0.0
        self.ctl_kind = 0
        self.failures = 0
        self.lockouts = 0

    def fail(self, cls, key, text):
        self.ctx.findings.add(cls, "checker: " + key, text + "\n  " + self.ctx.recent_actions())
        self.failures += 1

    def run(self):
        while not self.ctx.stop.is_set():
            try:
                self.round()
            except CheckFailed:
                pass
            except Exception:
                self.ctx.tool_errors.append("checker:\n" + traceback.format_exc())
            self.ctx.stop.wait(self.ctx.checker_pause)

    def connect(self):
        deadline = time.monotonic() + self.ctx.reply_timeout
        busy = 0
        while True:
            try:
                c = h.RawClient(self.ctx.sock, timeout=self.ctx.reply_timeout)
            except OSError as e:
                if time.monotonic() > deadline:
                    self.fail("hang", "cannot connect", "connect: %s" % e)
                    raise CheckFailed()
                time.sleep(0.1)
                continue
            try:
                r = self.call(c, "hello", {"version": "1.0"})
            except CheckFailed:
                c.close()
                raise
            if r.get("ok") is False and r.get("error", {}).get("code") == "EBUSY" and r.get("id") is None:
                c.close()
                busy += 1
                if busy == 1:
                    self.lockouts += 1
                if time.monotonic() > deadline:
                    self.fail("hang", "locked out: EBUSY (max_clients) for %.0f s" % self.ctx.reply_timeout,
                              "every connect answered %s" % json.dumps(r))
                    raise CheckFailed()
                time.sleep(0.1)
                continue
            self.expect_ok(r, "hello")
            res = r["result"]
            if res.get("version") != "1.0" or res.get("pid") != self.ctx.daemon.pid or \
                    sorted(res.get("ops", [])) != sorted(self.ctx.ops):
                self.fail("wrong", "hello reply changed", json.dumps(r)[:500])
            return c

    def call(self, c, op, args=None):
        t0 = time.monotonic()
        try:
            r = c.request(op, args, timeout=self.ctx.reply_timeout)
        except socket.timeout:
            self.fail("hang", "%s unanswered for %.0f s" % (op, self.ctx.reply_timeout), "request %s %r" % (op, args))
            c.close()
            raise CheckFailed()
        except (AssertionError, OSError) as e:
            self.fail("wrong", "%s: connection failed" % op, "%s %r: %s" % (op, args, str(e)[:500]))
            c.close()
            raise CheckFailed()
        dt = time.monotonic() - t0
        self.latencies[op].append(dt)
        if dt > self.ctx.slow_s:
            self.fail("hang", "%s took over %.0f s" % (op, self.ctx.slow_s), "%s %r took %.2f s" % (op, args, dt))
        return r

    def expect_ok(self, r, what):
        if not isinstance(r, dict) or r.get("ok") is not True or not isinstance(r.get("result"), dict):
            self.fail("wrong", "%s failed" % what, json.dumps(r)[:500])
            raise CheckFailed()

    def round(self):
        ctx = self.ctx
        c = self.connect()
        try:
            snap = {}
            r = self.call(c, "list")
            self.expect_ok(r, "list")
            models = r["result"].get("models")
            if not isinstance(models, list) or model_names(r["result"]) != [MODEL]:
                self.fail("wrong", "list does not show exactly the model", json.dumps(r)[:800])
            else:
                m = dict([x for x in models if x.get("name") == MODEL][0])
                if m.get("state") != "ready":
                    self.fail("wrong", "the model is not ready", json.dumps(m)[:500])
                m.pop("leases", None)
                m.pop("lease_count", None)
                snap["list"] = m
            # info, a page at a time
            limit = self.rng.randint(1, ctx.n_tensors + 3)
            offset, tensors, pages = 0, [], 0
            summary = None
            while offset is not None:
                r = self.call(c, "info", {"name": MODEL, "offset": offset, "limit": limit})
                self.expect_ok(r, "info")
                res = r["result"]
                pages += 1
                if res.get("offset") != offset or not isinstance(res.get("tensor_list"), list):
                    self.fail("wrong", "info page malformed", json.dumps(res)[:500])
                    break
                tensors.extend(res["tensor_list"])
                nxt = res.get("next")
                if nxt is not None and (not isinstance(nxt, int) or nxt <= offset):
                    self.fail("wrong", "info next does not advance", "offset %r next %r" % (offset, nxt))
                    break
                s = {k: v for k, v in res.items()
                     if k not in ("tensor_list", "offset", "next", "leases", "lease_count")}
                if summary is None:
                    summary = s
                elif s != summary:
                    self.fail("wrong", "info summary differs between pages", "%r vs %r" % (s, summary))
                offset = nxt
                if pages > ctx.n_tensors + 5:
                    self.fail("wrong", "info pages never end", "offset %r" % offset)
                    break
            self.check_tensors(tensors)
            snap["info"] = (summary, tensors)
            r = self.call(c, "stats")
            self.expect_ok(r, "stats")
            devs = r["result"].get("devices", [])
            if len(devs) != ctx.n_devices:
                self.fail("wrong", "stats device count", json.dumps(r)[:500])
            snap["stats"] = [{k: d.get(k) for k in ("device", "uuid", "capacity")} |
                             {k: (d.get(k) or {}).get("current") for k in ("allocated_bytes", "requested_bytes",
                                                                            "active_bytes")}
                             for d in devs]
            r = self.call(c, "leases")
            self.expect_ok(r, "leases")
            if not isinstance(r["result"].get("leases"), list):
                self.fail("wrong", "leases malformed", json.dumps(r)[:300])
            d = self.rng.randrange(ctx.n_devices)
            r = self.call(c, "snapshot", {"device": d})
            self.expect_ok(r, "snapshot")
            if r["result"].get("device") != d or not isinstance(r["result"].get("segments"), list):
                self.fail("wrong", "snapshot malformed", json.dumps(r)[:300])
            if time.monotonic() - self.last_verify > ctx.verify_every:
                self.last_verify = time.monotonic()
                r = self.call(c, "verify", {"name": MODEL})
                self.expect_ok(r, "verify")
                if r["result"].get("match") is not True or r["result"].get("tensors") != ctx.n_tensors:
                    self.fail("wrong", "verify does not match", json.dumps(r)[:500])
            if self.base is None:
                self.base = snap
            else:
                for k in ("list", "info", "stats"):
                    if k in snap and snap[k] != self.base.get(k):
                        self.fail("wrong", "%s changed during the campaign" % k,
                                  "now %s\n  was %s" % (json.dumps(snap[k])[:700], json.dumps(self.base.get(k))[:700]))
        finally:
            c.close()
        if time.monotonic() - self.last_ctl > ctx.ctl_every:
            self.last_ctl = time.monotonic()
            self.attach_ctl()
        self.rounds += 1

    def check_tensors(self, tensors):
        want = self.ctx.expected
        names = [t.get("name") for t in tensors]
        if sorted(names) != sorted(want) or len(set(names)) != len(names):
            self.fail("wrong", "info tensor list differs from the checkpoint",
                      "%d tensors, %d expected" % (len(names), len(want)))
            return
        for t in tensors:
            dtype, shape, nbytes = want[t["name"]]
            if t.get("dtype") != dtype or t.get("shape") != shape or t.get("bytes") != nbytes:
                self.fail("wrong", "info tensor differs from the checkpoint", json.dumps(t)[:400])
                return
            per_dev = collections.Counter()
            for p in t.get("placements", []):
                per_dev[p.get("device")] += p.get("bytes", 0)
            if nbytes and (not per_dev or any(v > nbytes for v in per_dev.values()) or sum(per_dev.values()) < nbytes):
                self.fail("wrong", "info placements do not cover the tensor", json.dumps(t)[:400])
                return

    def attach_ctl(self):
        ctx = self.ctx
        self.ctl_kind = (self.ctl_kind + 1) % (ctx.n_devices + 1)
        dev = None if self.ctl_kind == 0 else self.ctl_kind - 1
        args = ["attach", MODEL, "--verify"] + (["--device", str(dev)] if dev is not None else [])
        cmd = h.ctl_cmd(ctx.sock, ["--timeout", "%d" % ctx.reply_timeout] + args, json_mode=True)
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=h.child_env(),
                               timeout=ctx.reply_timeout * 3)
        except subprocess.TimeoutExpired:
            self.fail("hang", "weightctl attach --verify did not finish", " ".join(cmd))
            return
        dt = time.monotonic() - t0
        self.ctl_runs += 1
        self.latencies["weightctl attach --verify"].append(dt)
        out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        if h.sanitizer_report(err):
            self.fail("crash", "sanitizer report in weightctl", err[-3000:])
        try:
            o = json.loads(out)
        except ValueError:
            o = None
        if p.returncode != 0 or not isinstance(o, dict):
            self.fail("wrong", "weightctl attach --verify failed", "rc %d: %s %s" % (p.returncode, out[-600:],
                                                                                   err[-600:]))
            return
        if o.get("match") is not True or o.get("mismatched_tensors") != 0:
            self.fail("wrong", "weightctl attach --verify: mismatch", out[-800:])
        key = {k: o.get(k) for k in ("name", "descriptors", "handles", "tensors", "parts", "bytes", "devices",
                                     "handle_type", "writable")}
        if dev is None and o.get("tensors") != ctx.n_tensors:
            self.fail("wrong", "weightctl attach: tensor count", out[-600:])
        if dt > ctx.slow_s * 2:
            self.fail("hang", "weightctl attach --verify took over %.0f s" % (ctx.slow_s * 2), "%.1f s" % dt)
        was = self.attach_base.setdefault(dev, key)
        if key != was:
            self.fail("wrong", "weightctl attach result changed", "now %r\n  was %r" % (key, was))


# ---- the campaign -------------------------------------------------------------------

def proc_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
                    out[k] = int(v.split()[0]) * (1024 if "kB" in v else 1)
    except OSError:
        pass
    return out


def proc_cpu(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def fd_kinds(pid):
    kinds = collections.Counter()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            kinds[re.sub(r"\[\d+\]|:\d+|\d+", "", t)[:40]] += 1
    except OSError:
        pass
    return kinds


class Context:
    pass


def mib(n):
    return "%.1f MiB" % (n / MiB)


def setup(args, ctx):
    """The daemon with the model loaded; fills ctx."""
    work = h.new_tempdir("wdlive-")
    ctx.work = work
    ck = os.path.join(work, "ckpt")
    t0 = time.monotonic()
    h.make_checkpoint(ck, args.preset, layers=args.layers, experts=args.experts, vocab=args.vocab,
                      shard_size=args.shard_size)
    ctx.ckpt = ck
    ctx.expected = h.tensors_of(ck)
    ctx.n_tensors = len(ctx.expected)
    flags = ["--backend", "host", "--host-devices", str(args.devices), "--host-capacity", args.capacity]
    env = {}
    if args.malloc_tunables and args.malloc_tunables != "none" and not h.SANITIZED:
        env["GLIBC_TUNABLES"] = args.malloc_tunables
    if h.SANITIZED:
        env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:log_path=" + os.path.join(work, "asan")
    d = h.Daemon(work, flags, env=env or None)
    d.start()
    ctx.daemon = d
    ctx.sock = d.sock
    load = ["load", ck, "--name", MODEL]
    if args.devices > 1:
        load += ["--devices", ",".join(str(i) for i in range(args.devices)), "--placement", "expert-parallel"]
    r = h.run_ctl(d.sock, *load, timeout=h.T(120))
    if r.rc != 0:
        raise SystemExit("setup: load failed: %r" % r)
    with h.RawClient(d.sock, hello=False) as c:
        hello = c.hello()
        ctx.ops = hello["result"]["ops"]
        if set(ctx.ops) != set(FIELDS):
            raise SystemExit("setup: the daemon's operations %s are not FIELDS' %s: every op is fuzzed with "
                             "its fields" % (sorted(ctx.ops), sorted(FIELDS)))
        st = c.request("stats")["result"]
        ctx.uuids = [dv["uuid"] for dv in st["devices"]]
    ctx.n_devices = args.devices
    ctx.mirror = Mirror(args.devices, ctx.uuids)
    print("setup: %s (%d tensors, %s) loaded on %d device(s) in %.1f s; daemon pid %d, socket %s" %
          (args.preset, ctx.n_tensors, mib(h.checkpoint_bytes(ck)), args.devices, time.monotonic() - t0, d.pid,
           d.sock), flush=True)


def settle(ctx, pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def save_replay(ctx, name, steps, note):
    path = os.path.join(ctx.work, "replay", name + ".jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({"note": note, "seed": ctx.seed, "build": ctx.build}) + "\n")
        for s in steps:
            if s[0] == "send":
                f.write(json.dumps({"op": "send", "conn": s[1], "hex": s[2].hex(), "fds": s[3],
                                    "split_fds": s[4]}) + "\n")
            elif s[0] == "close":
                f.write(json.dumps({"op": "close", "conn": s[1], "rst": s[2]}) + "\n")
            elif s[0] == "note":
                f.write(json.dumps({"op": "note", "conn": s[1], "text": s[2]}) + "\n")
            elif s[0] == "connect":
                f.write(json.dumps({"op": "connect", "conn": s[1], "reader": s[2]}) + "\n")
            else:
                f.write(json.dumps({"op": s[0], "conn": s[1]}) + "\n")
    return path


def recent_actions(ctx):
    out = []
    for p in ctx.peers:
        hist = ["%d:%s" % (a, k) for a, k, _ in list(p.history)[-3:]]
        out.append("peer%d [%s, now %s]" % (p.index, " ".join(hist), p.kind))
    return "recent hostile actions: " + "; ".join(out)


def summary(ctx, args, t_start, t_end, base, end, cpu):
    print("\n==== summary (seed %d, build %s, %.0f s of fuzzing) ====" % (ctx.seed, args.build, t_end - t_start))
    tot_frames = sum(p.frames for p in ctx.peers)
    tot_bytes = sum(p.bytes for p in ctx.peers)
    print("hostile peers: %d; actions %d; frames %d; bytes %s; descriptors sent %d; lines checked %d" %
          (len(ctx.peers), sum(ctx.kind_counts.values()), tot_frames, mib(tot_bytes),
           sum(p.fds_sent for p in ctx.peers), ctx.lines_checked))
    if ctx.reader:
        print("readers (uid %d): peers %s, %d connections" % (ctx.reader.uid, ", ".join(map(str, sorted(
            ctx.reader_peers))), ctx.reader.connections))
    print("  %-10s %8s %10s %12s" % ("kind", "actions", "frames", "bytes"))
    for k in KINDS:
        if ctx.kind_counts[k] or ctx.kind_frames[k]:
            print("  %-10s %8d %10d %12s" % (k, ctx.kind_counts[k], ctx.kind_frames[k], mib(ctx.kind_bytes[k])))
    counts = collections.Counter()
    for p in ctx.peers:
        counts.update(p.counts)
    for k, v in sorted(counts.items()):
        print("  %s: %d" % (k, v))
    for why, ex in sorted(ctx.denied_examples.items()):
        print("  denied (%s), e.g. %s" % (why, ex))
    universe = set((c[0], c[1]) for c in Peer(ctx, 0, []).all_type_cases())
    missing = sorted(universe - ctx.type_coverage)
    print("wrong-type coverage: %d of %d (op, field) pairs (every op's fields, events, id, args, op)%s" %
          (len(ctx.type_coverage & universe), len(universe),
           "; not reached: " + ", ".join("%s.%s" % m for m in missing[:30]) if missing else ""))
    ck = ctx.checker
    lat = []
    for op, v in sorted(ck.latencies.items()):
        v = sorted(v)
        lat.append("%s n=%d p50=%.0f ms max=%.0f ms" % (op, len(v), 1000 * v[len(v) // 2], 1000 * v[-1]))
    print("checker: %d rounds, %d weightctl attach --verify runs, %d failures, %d EBUSY lockouts" %
          (ck.rounds, ck.ctl_runs, ck.failures, ck.lockouts))
    for l in lat:
        print("  " + l)
    if base:
        print("daemon fds: baseline %d, end %s%s" % (base["fds"], end.get("fds", "?"),
                                                    (" (by kind, end - baseline: %r)" % end["fd_diff"])
                                                    if end.get("fd_diff") else ""))
        print("daemon VmRSS: baseline %s, peak during %s, end %s (RssAnon %s -> %s, RssShmem %s -> %s)" %
              (mib(base["VmRSS"]), mib(ctx.peak_rss), mib(end.get("VmRSS", 0)), mib(base.get("RssAnon", 0)),
               mib(end.get("RssAnon", 0)), mib(base.get("RssShmem", 0)), mib(end.get("RssShmem", 0))))
        print("daemon fds peak during the campaign: %d" % ctx.peak_fds)
    print("CPU: daemon %.1f s, this tool %.1f s, weightctl/mkckpt children %.1f s over %.0f s of wall time" %
          (cpu["daemon"], cpu["self"], cpu["children"], time.monotonic() - ctx.t0))
    if ctx.tool_errors:
        print("tool errors (bugs of live.py, not findings): %d; first:\n%s" % (len(ctx.tool_errors),
                                                                               ctx.tool_errors[0][-2000:]))


def print_findings(ctx, args):
    if not ctx.findings.items:
        print("\nno findings")
        return
    groups = ctx.findings.groups()
    print("\n==== %d findings ====" % len(groups))
    for cls in CLASSES:
        items = [(k, v) for k, v in groups.items() if k[0] == cls]
        if not items:
            continue
        print("\n-- %s (%d) --" % (CLASS_TITLES[cls], len(items)))
        for (_, key), fs in items:
            note = known_note(key)
            print("* %s  [%d time%s%s]%s" % (key, sum(f.count for f in fs), "s" if sum(f.count for f in fs) > 1 else "",
                                              ", %d variants" % len(fs) if len(fs) > 1 else "",
                                              "  (%s)" % note if note else ""))
            for f in fs[:args.variants]:
                indent = "    " if f.variant else "  "
                if f.variant:
                    print("  - %s  [x%d]" % (f.variant, f.count))
                print(indent + f.text[:900].replace("\n", "\n" + indent))
                if f.repro:
                    print(indent + "replay: %s %s --build %s --replay %s" % (sys.executable, os.path.relpath(__file__),
                                                                          args.build, f.repro))
            if len(fs) > args.variants:
                print("  ... and %d more variants: %s" % (len(fs) - args.variants,
                                                         "; ".join(f.variant[:60] for f in fs[args.variants:])[:1500]))
    n_known = sum(1 for (_, key) in groups if known_note(key))
    print("\n%d findings, %d of them in classes already known" % (len(groups), n_known))
    if args.probe:
        print("reproduce: %s %s --build %s --probe %s" % (sys.executable, os.path.relpath(__file__), args.build,
                                                         args.probe))
        return
    if args.replay:
        return
    print("reproduce the campaign: %s %s --build %s --seconds %d --seed %d --peers %d%s" %
          (sys.executable, os.path.relpath(__file__), args.build, args.seconds, ctx.seed, args.peers,
           ((" --kinds " + args.kinds) if args.kinds else "") +
           ((" --reader-peers %d" % args.reader_peers) if args.reader_peers >= 0 else "") +
           ((" --reader-uid %d" % args.reader_uid) if args.reader_uid != 61001 else "")))
    print("(each peer's frames are the same for a seed; their timing is not)")


def campaign(args):
    ctx = Context()
    ctx.seed = args.seed
    ctx.build = args.build
    ctx.t0 = time.monotonic()
    ctx.findings = Findings()
    ctx.tool_errors = []
    ctx.stop = threading.Event()
    ctx.stop_now = threading.Event()
    ctx.slots = threading.BoundedSemaphore(args.max_conns)
    ctx.kind_counts = collections.Counter()
    ctx.denied_examples = {}
    ctx.count_lock = threading.Lock()
    ctx.kind_frames = collections.Counter()
    ctx.kind_bytes = collections.Counter()
    ctx.type_coverage = set()
    ctx.lines_checked = 0
    ctx.pause = args.pause
    ctx.checker_pause = 0.2
    ctx.reply_timeout = args.reply_timeout * (2.5 if h.SANITIZED else 1.0)
    ctx.slow_s = args.slow * (3.0 if h.SANITIZED else 1.0)
    ctx.ctl_every = 3.0
    ctx.verify_every = 8.0
    ctx.peers = []
    ctx.peak_rss = ctx.peak_fds = 0
    ctx.save_replay = lambda name, steps, note: save_replay(ctx, name, steps, note)
    ctx.recent_actions = lambda: recent_actions(ctx)
    ctx.reader = None
    ctx.reader_peers = set()
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    for k in kinds:
        if k not in KINDS:
            raise SystemExit("unknown kind %r (kinds: %s)" % (k, ", ".join(KINDS)))
    print("live fuzz: build %s%s, seed %d, %d s, %d peers, at most %d hostile connections, kinds %s%s" %
          (args.build, " (sanitizers)" if h.SANITIZED else "", args.seed, args.seconds, args.peers, args.max_conns,
           ",".join(kinds), "" if h.SANITIZED or args.malloc_tunables == "none"
           else ", daemon GLIBC_TUNABLES=" + args.malloc_tunables), flush=True)
    setup(args, ctx)
    d = ctx.daemon
    base = None
    end = {}
    cpu0 = proc_cpu(d.pid)
    t_start = t_end = time.monotonic()
    checker = Checker(ctx)
    ctx.checker = checker
    died = False
    try:
        checker.round()  # the first round: the reference for all others, and warm caches
        checker.round()
        if ctx.findings.items:
            raise SystemExit("the checker fails before any fuzzing:\n" +
                             "\n".join(f.text for f in ctx.findings.items.values()))
        time.sleep(0.5)
        settle(ctx, lambda: h.fd_count(d.pid) == h.fd_count(d.pid), 5)
        base = dict(proc_status(d.pid))
        base["fds"] = h.fd_count(d.pid)
        base["fd_kinds"] = fd_kinds(d.pid)
        print("baseline: %d fds, VmRSS %s (RssAnon %s, RssShmem %s)" % (base["fds"], mib(base["VmRSS"]),
                                                                      mib(base.get("RssAnon", 0)),
                                                                      mib(base.get("RssShmem", 0))), flush=True)
        n_readers = args.peers // 3 if args.reader_peers < 0 else min(args.reader_peers, args.peers)
        if n_readers and os.geteuid() == 0:
            # the socket and its folder open to the other user
            os.chmod(ctx.work, 0o755)
            os.chmod(ctx.sock, 0o666)
            ctx.reader = ReaderConnector(ctx.sock, args.reader_uid)
            ctx.reader_peers = set(range(args.peers - n_readers, args.peers))
            print("readers: peers %s connect as uid %d" % (", ".join(map(str, sorted(ctx.reader_peers))),
                                                           args.reader_uid), flush=True)
        elif n_readers:
            print("readers: none (not root: every peer is the daemon's own user, an administrator)", flush=True)
        ctx.peers = [Peer(ctx, i, kinds) for i in range(args.peers)]
        t_start = time.monotonic()
        for p in ctx.peers:
            p.start()
        checker.start()
        deadline = t_start + args.seconds
        next_report = t_start + 10
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if not d.running():
                died = True
                break
            st = proc_status(d.pid)
            ctx.peak_rss = max(ctx.peak_rss, st.get("VmRSS", 0))
            try:
                ctx.peak_fds = max(ctx.peak_fds, h.fd_count(d.pid))
            except OSError:
                pass
            if time.monotonic() >= next_report:
                next_report += 10
                print("  t=%3.0f s: actions %d, frames %d, checker rounds %d, findings %d, daemon VmRSS %s, fds %d" %
                      (time.monotonic() - t_start, sum(ctx.kind_counts.values()), sum(p.frames for p in ctx.peers),
                       checker.rounds, len(ctx.findings), mib(st.get("VmRSS", 0)), h.fd_count(d.pid)), flush=True)
        t_end = time.monotonic()
        ctx.stop.set()
        if died:
            ctx.stop_now.set()
        for p in ctx.peers:
            p.join(timeout=ctx.reply_timeout * 4)
            if p.is_alive():
                ctx.stop_now.set()
                p.join(timeout=10)
                if p.is_alive():
                    ctx.tool_errors.append("peer %d did not stop" % p.index)
        checker.join(timeout=ctx.reply_timeout * 4)
        # frames per kind, from the peers' histories is partial: count from the live counters instead
        if not died and not d.running():
            died = True
        if died:
            rc = d.proc.wait(timeout=30)
            log = d.log()
            saved = []
            for p in ctx.peers:
                for a, k, steps in p.history:
                    saved.append(save_replay(ctx, "crash-peer%d-action%d-%s" % (p.index, a, k), steps,
                                             "before the daemon died"))
                if p.steps:
                    saved.append(save_replay(ctx, "crash-peer%d-action%d-%s-current" % (p.index, p.action, p.kind),
                                             p.steps, "in flight when the daemon died"))
            f = ctx.findings.add("crash", "the daemon died (exit %r)" % rc,
                                 "stderr tail:\n%s\n  %s\n  each peer's last actions saved: %s" %
                                 (log[-6000:], recent_actions(ctx), os.path.dirname(saved[0]) if saved else "-"))
            if saved and f:
                f.repro = " ".join(saved[-args.peers:])
            d.closed = True
        else:
            # Alive and answering, then settled: every hostile connection has gone.
            try:
                checker.round()
            except CheckFailed:
                pass

            def connections_one():
                try:
                    with h.RawClient(d.sock, hello=True, timeout=ctx.reply_timeout) as c:
                        st = c.request("stats")["result"]
                        ls = c.request("leases")["result"]
                        names = model_names(c.request("list")["result"], strict=True)
                        return (st.get("connections") == 1 and not st.get("jobs") and ls.get("leases") == []
                                and names == [MODEL]), (st, ls, names)
                except (OSError, AssertionError) as e:
                    return False, str(e)

            ok, detail = False, None
            deadline = time.monotonic() + ctx.reply_timeout
            while time.monotonic() < deadline:
                ok, detail = connections_one()
                if ok:
                    break
                time.sleep(0.3)
            if not ok:
                st = detail[0] if isinstance(detail, tuple) else detail
                ls = detail[1] if isinstance(detail, tuple) else None
                names = detail[2] if isinstance(detail, tuple) else None
                ctx.findings.add("leak", "connections, jobs, leases or models left after every hostile peer left",
                                 "stats connections=%r jobs=%r; leases=%r; models %r" %
                                 (st.get("connections") if isinstance(st, dict) else st,
                                  st.get("jobs") if isinstance(st, dict) else None,
                                  (ls or {}).get("leases") if isinstance(ls, dict) else ls, names))
            fd_slack, rss_slack = args.fd_slack, args.rss_slack * MiB
            if h.SANITIZED:
                rss_slack = args.rss_slack_san * MiB
            settle(ctx, lambda: h.fd_count(d.pid) <= base["fds"] and
                   proc_status(d.pid).get("VmRSS", 0) <= base["VmRSS"] + rss_slack, args.settle)
            end = dict(proc_status(d.pid))
            end["fds"] = h.fd_count(d.pid)
            kinds_now = fd_kinds(d.pid)
            diff = {k: kinds_now[k] - base["fd_kinds"].get(k, 0) for k in set(kinds_now) | set(base["fd_kinds"])
                    if kinds_now[k] != base["fd_kinds"].get(k, 0)}
            end["fd_diff"] = diff
            if end["fds"] > base["fds"] + fd_slack:
                ctx.findings.add("leak", "descriptors: %d at the end, %d at the baseline" % (end["fds"], base["fds"]),
                                 "after %.0f s to settle; by kind (now - baseline): %r" % (args.settle, diff))
            if end.get("VmRSS", 0) > base["VmRSS"] + rss_slack:
                ctx.findings.add("leak", "memory: VmRSS %s at the end, %s at the baseline (slack %s)" %
                                 (mib(end["VmRSS"]), mib(base["VmRSS"]), mib(rss_slack)),
                                 "RssAnon %s -> %s, RssShmem %s -> %s, peak VmRSS during %s" %
                                 (mib(base.get("RssAnon", 0)), mib(end.get("RssAnon", 0)),
                                  mib(base.get("RssShmem", 0)), mib(end.get("RssShmem", 0)), mib(ctx.peak_rss)))
            cpu_daemon = proc_cpu(d.pid) - cpu0
            d.send_signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(timeout=h.T(30))
            except subprocess.TimeoutExpired:
                d._kill()
                rc = None
                ctx.findings.add("hang", "the daemon did not stop within %.0f s of SIGTERM" % h.T(30),
                                 d.log()[-3000:])
            d.closed = True
            log = d.log()
            if rc is not None and rc != 0:
                ctx.findings.add("crash", "exit code %r after SIGTERM" % rc, log[-4000:])
            if rc == 0 and "every segment released" not in log:
                ctx.findings.add("wrong", "no 'every segment released' at the stop", log[-2000:])
            asan = ""
            for fn in os.listdir(ctx.work):
                if fn.startswith("asan"):
                    with open(os.path.join(ctx.work, fn), errors="replace") as f:
                        asan += f.read()
            m = h.sanitizer_report(log + asan)
            if m:
                ctx.findings.add("crash" if "Leak" not in m else "leak", "sanitizer report in the daemon: %s" % m,
                                 (asan or log)[-6000:])
            ctx.cpu_daemon = cpu_daemon
    finally:
        ctx.stop.set()
        ctx.stop_now.set()
        if d.running():
            d._kill()
            d.closed = True
        if ctx.reader:
            ctx.reader.close()
    t = os.times()
    cpu = {"daemon": getattr(ctx, "cpu_daemon", proc_cpu(d.pid) - cpu0), "self": t.user + t.system,
           "children": t.children_user + t.children_system}
    summary(ctx, args, t_start, t_end, base, end, cpu)
    print_findings(ctx, args)
    print("work dir (daemon stderr, replays): %s" % ctx.work)
    cleanup(ctx, args)
    return 1 if ctx.findings.items or ctx.tool_errors else 0


def replay(args):
    """Sends saved actions to a fresh daemon with the model; prints what comes back."""
    ctx = Context()
    ctx.seed = args.seed
    ctx.build = args.build
    ctx.findings = Findings()
    ctx.tool_errors = []
    ctx.stop = threading.Event()
    ctx.stop_now = threading.Event()
    ctx.slots = threading.BoundedSemaphore(10000)
    ctx.reply_timeout = args.reply_timeout * (2.5 if h.SANITIZED else 1.0)
    ctx.lines_checked = 0
    ctx.type_coverage = set()
    ctx.denied_examples = {}
    ctx.reader = None
    setup(args, ctx)
    d = ctx.daemon
    peer = Peer(ctx, 0, list(KINDS))
    peer.make_fd_pool()
    peer._conns = []
    peer.kind = "replay"

    class Echo(Conn):
        def _read_some(self):
            n = len(self.msgs)
            super()._read_some()
            for m in self.msgs[n:]:
                print("  <- conn %d: %s" % (self.idx, short(json.dumps(m, ensure_ascii=False).encode(), 300)))
            if self.eof:
                print("  <- conn %d: EOF" % self.idx)

    ctx.mirror = Mirror(ctx.n_devices, ctx.uuids)
    for path in args.replay:
        print("replaying %s" % path)
        conns = {}
        with open(path) as f:
            head = json.loads(f.readline())
            print("  (%s)" % head.get("note"))
            for line in f:
                s = json.loads(line)
                c = conns.get(s["conn"])
                if s["op"] == "note":
                    print("  (%s)" % s.get("text"))
                elif s["op"] == "connect":
                    c = conns[s["conn"]] = Echo(peer)
                    c.idx = s["conn"]
                    if s.get("reader") and ctx.reader is None and os.geteuid() == 0:
                        os.chmod(ctx.work, 0o755)
                        os.chmod(ctx.sock, 0o666)
                        ctx.reader = ReaderConnector(ctx.sock, args.reader_uid)
                    c.as_reader = bool(s.get("reader") and ctx.reader)
                    c.open()
                    print("  -> conn %d: connect%s" % (c.idx, " as uid %d" % args.reader_uid if c.as_reader else
                                                       " (a reader's, as root: run as root to replay it)"
                                                       if s.get("reader") else ""))
                elif c is None or c.sock is None:
                    continue
                elif s["op"] == "send":
                    data = bytes.fromhex(s["hex"])
                    fds = peer.pick_fds(s["fds"]) if s["fds"] else None
                    print("  -> conn %d: %s%s" % (c.idx, short(data, 200), " + %d fds" % s["fds"] if s["fds"] else ""))
                    try:
                        c.send(data, fds, split_fds=s.get("split_fds"))
                    finally:
                        for fd in fds or []:
                            os.close(fd)
                    c.drain(idle=0.3, most=ctx.reply_timeout)
                elif s["op"] == "close":
                    c.drain(idle=0.3, most=2)
                    print("  -> conn %d: close%s" % (c.idx, " (reset)" if s["rst"] else ""))
                    c.close(rst=s["rst"])
                elif s["op"] == "shutwr":
                    print("  -> conn %d: shutdown(SHUT_WR)" % c.idx)
                    c.shut_wr()
                    c.drain(idle=0.5, most=ctx.reply_timeout)
        for c in conns.values():
            c.drain(idle=0.3, most=2)
            c.close()
        print("  daemon %s" % ("alive" if d.running() else "DEAD (exit %r)" % d.proc.poll()))
        if not d.running():
            break
    if d.running():
        with h.RawClient(d.sock, hello=True) as c:
            print("  list after replay: %s" % json.dumps(c.request("list"))[:300])
    try:
        d.close()
        print("daemon stopped cleanly (exit 0, no sanitizer report)")
    except AssertionError as e:
        print("daemon teardown: %s" % str(e)[:4000])
        ctx.findings.add("crash", "the daemon's stop after the replay", str(e)[:3000])
    if not ctx.findings.items:
        print("\nno finding from the line checks and the stop (a replay does not re-check an action's "
              "expectations, such as a missing reply: read the exchange above)")
    else:
        print_findings(ctx, args)
    if ctx.reader:
        ctx.reader.close()
    cleanup(ctx, args)
    return 1 if ctx.findings.items else 0


def cleanup(ctx, args):
    """The checkpoint goes (150 MB); the daemon's stderr and the replays stay."""
    if not args.keep and getattr(ctx, "ckpt", None):
        shutil.rmtree(ctx.ckpt, ignore_errors=True)


# ---- probes: one-shot reproductions of what the campaign bounds or finds -----------

def probe_exchange(ctx, lines, hello=True, timeout=10.0):
    """Sends each line on a fresh connection; returns [(sent, [replies as bytes], eof)]."""
    out = []
    for line in lines:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(ctx.sock)
        f = s.makefile("rb")
        got, eof = [], False
        try:
            if hello:
                s.sendall(frame(0, "hello", {"version": "1.0"}))
                r = f.readline()
                if b'"ok":true' not in r:  # refused (EBUSY): that is the answer
                    out.append((line, [r.rstrip(b"\n")] if r else [], True))
                    s.close()
                    continue
            s.sendall(line)
            r = f.readline()
            if not r:
                eof = True
            else:
                got.append(r.rstrip(b"\n"))
                while b'"event"' in r[:12]:
                    r = f.readline()
                    if not r:
                        eof = True
                        break
                    got.append(r.rstrip(b"\n"))
        except socket.timeout:
            got.append(b"(no reply within %.0f s)" % timeout)
        except OSError as e:
            got.append(("(%s)" % e).encode())
            eof = True
        s.close()
        out.append((line, got, eof))
    return out


def probe_echo(ctx, args):
    """Single frames, each a minimal reproduction of a wrong answer."""
    big_id = WP_MAX_LINE - 100
    cases = [
        ("invalid UTF-8 in a reply", "a raw 0xff byte in the op name is echoed raw into the error message",
         b'{"id":1,"op":"\xff"}\n', lambda r, e: not _utf8(r)),
        ("invalid UTF-8 in a reply", "a raw 0xff byte in a string id is echoed raw as the reply's id",
         b'{"id":"\xff","op":"stats"}\n', lambda r, e: not _utf8(r)),
        ("invalid UTF-8 in a reply", "valid UTF-8 in, invalid out: %.64s cuts the op name inside a character",
         ('{"id":1,"op":"%s\u00e9"}\n' % ("a" * 63)).encode(), lambda r, e: not _utf8(r)),
        ("invalid UTF-8 in a reply", "valid UTF-8 in, invalid out: a long multibyte name is cut at 767 bytes inside a "
         "character (common/errors.c)", ('{"id":1,"op":"info","args":{"name":"%s"}}\n' % ("\u20ac" * 300)).encode(),
         lambda r, e: not _utf8(r)),
        ("control characters (newlines, escapes) of a request echoed into an error message",
         "a newline in a name comes back inside "
         "the message", b'{"id":1,"op":"info","args":{"name":"a\\nb"}}\n', lambda r, e: b"\\n" in r),
        ("request with an id string near 1 MiB: no reply, the daemon dropped the connection",
         "a 1 MiB - 100 byte line whose id is a string: its reply would be over 1 MiB",
         b'{"id":"' + b"i" * (big_id - 25) + b'","op":"list"}\n', lambda r, e: e and not r),
        ("a numeric id not echoed as sent", "2**53+1 comes back as 9.00719925474099e+15 (cJSON prints 15 digits "
         "when they are close enough)", b'{"id":9007199254740993,"op":"stats"}\n',
         lambda r, e: b'"id":9007199254740993' not in r and b'"id":9007199254740992' not in r),
        ("a numeric id not echoed as sent", "DBL_MAX comes back as 1.79769313486232e+308, which reads as infinity",
         b'{"id":1.7976931348623157e308,"op":"stats"}\n', lambda r, e: b"1.79769313486232e+308" in r),
        ("a wrong type or value accepted", "a string cut at its NUL: \"%s\\u0000junk\" finds the model" % MODEL,
         ('{"id":1,"op":"info","args":{"name":"%s\\u0000junk","limit":1}}\n' % MODEL).encode(),
         lambda r, e: b'"ok":true' in r),
        ("a wrong type or value accepted", "an op cut at its NUL: \"list\\u0000junk\" is list",
         b'{"id":1,"op":"list\\u0000junk"}\n', lambda r, e: b'"ok":true' in r),
        ("a wrong type or value accepted", "a device cut at its NUL: \"1\\u0000\" is device 1 (attach succeeds; load "
         "would too)", ('{"id":1,"op":"attach","args":{"name":"%s","device":"1\\u0000"}}\n' % MODEL).encode(),
         lambda r, e: b'"event":"attach"' in r),
        ("a wrong type or value refused with an unexpected code", "lease 2**62 is past the bound INT64_MAX/2 but "
         "compared as a double it is not: ENOENT, not EINVAL", b'{"id":1,"op":"detach","args":{"lease":4611686018427387904}}\n',
         lambda r, e: b"ENOENT" in r),
        ("a wrong type or value refused with an unexpected code", "lease 2**62+512 is answered as lease 2**62",
         b'{"id":1,"op":"detach","args":{"lease":4611686018427388416}}\n', lambda r, e: b"4611686018427387904" in r),
    ]
    for (key, what, line, bad), (_, got, eof) in zip(cases, probe_exchange(ctx, [c[2] for c in cases])):
        first = got[0] if got else b""
        shown = "sent %s\ngot  %s%s" % (short(line, 160), short(first, 300), " then EOF" if eof else "")
        print("%s: %s\n  %s" % ("FOUND" if bad(first, eof) else "ok", what, shown.replace("\n", "\n  ")))
        if bad(first, eof):
            ctx.findings.add("wrong", key, shown, variant="probe: " + what)


def _utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def probe_lockout(ctx, args):
    """max_clients connections that never send a byte: nobody else gets in."""
    n = 256
    idle = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(ctx.sock)
            idle.append(s)
        time.sleep(0.5)
        got = probe_exchange(ctx, [frame(1, "list")], hello=True)[0]
        r = h.run_ctl(ctx.sock, "list", json_mode=True, timeout=30)
        time.sleep(5)
        later = probe_exchange(ctx, [frame(1, "list")], hello=True)[0]
        text = ("%d connections that never send a byte (no hello, no idle timeout) fill max_clients (256):\n"
                "a new client's hello gets %s\n5 s later still %s\nweightctl --json list: exit %d, %s" %
                (n, short(got[1][0] if got[1] else b"EOF", 200), short(later[1][0] if later[1] else b"EOF", 120),
                 r.rc, " ".join(r.out.split())[:200]))
        print(text)
        if any(b"EBUSY" in x for x in got[1] + later[1]):
            ctx.findings.add("hang", "idle connections lock every other client out", text, variant="probe: lockout")
        if r.rc != 0 and "EBUSY" not in r.out:
            ctx.findings.add("wrong", "weightctl reports a refused connection as a broken pipe", text,
                             variant="probe: lockout")
    finally:
        for s in idle:
            s.close()


def probe_verify_flood(ctx, args):
    """One client pipelines verifies in less than 1 MiB: what the others see."""
    n = args.flood_verifies
    data = frame(0, "hello", {"version": "1.0"}) + b"".join(frame(i, "verify", {"name": MODEL}) for i in range(1, n + 1))
    c = h.RawClient(ctx.sock, hello=True, timeout=300)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ctx.sock)
    t0 = time.monotonic()
    sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
    sender.start()
    worst = (0.0, 0.0)
    while (sender.is_alive() and time.monotonic() - t0 < 240) or time.monotonic() - t0 < 2:
        t = time.monotonic()
        c.request("list")
        dt = time.monotonic() - t
        if dt > worst[0]:
            worst = (dt, t - t0)
        time.sleep(0.02)
    sent = time.monotonic() - t0
    stats_line = None
    c2 = h.RawClient(ctx.sock, hello=True, timeout=300)
    try:
        c2.send(frame(99, "stats"))
        stats_line = c2.recv_line(timeout=300)
    except OSError:
        pass
    c2.close()
    t = time.monotonic()
    v = None
    if args.flood_verify_wait:
        try:
            v = c.request("verify", {"name": MODEL}, timeout=120)
        except OSError:
            v = False  # still waiting after 120 s
    dv = time.monotonic() - t
    s.close()
    text = ("one connection wrote hello + %d verify requests of %s in one write (%s):\n"
            "the daemon took %.1f s to read them; another client's list took up to %.2f s (at t=%.1f s)%s;\n"
            "that client's stats then %s" %
            (n, MODEL, mib(len(data)), sent, worst[0], worst[1],
             "" if v is None else "; its verify waited %.1f s behind the flood%s" % (dv, "" if v else
                                                                                      " and had no answer yet"),
             "came back (%d bytes)" % len(stats_line) if stats_line else
             "got no reply: the daemon dropped it ('a reply of N bytes does not fit a message'; stats lists "
             "every job, unpaged)"))
    print(text)
    if worst[0] > ctx.slow_s:
        ctx.findings.add("hang", "a pipelined verify flood stalls the loop for everyone", text,
                         variant="probe: %d verifies" % n)
    if v is not None and dv > ctx.slow_s * 3:
        ctx.findings.add("hang", "a pipelined verify flood starves every other client's verify (and loads: one "
                         "thread pool, no limit per client)", text, variant="probe: %d verifies" % n)
    if not stats_line:
        ctx.findings.add("wrong", "stats fails for everyone while one client has many jobs: the reply lists every "
                         "job and goes over 1 MiB", text, variant="probe: %d verifies" % n)
    c.close()
    t = time.monotonic()
    def no_jobs():
        try:
            with h.RawClient(ctx.sock, hello=True, timeout=60) as c3:
                return not c3.request("stats")["result"]["jobs"]
        except (OSError, AssertionError):
            return False  # dropped: still too many jobs to list
    ok = settle(ctx, no_jobs, 300)
    print("the cancelled verifies were gone %.1f s after the flood's connection closed%s" %
          (time.monotonic() - t, "" if ok else " (not all)"))


PROBES = collections.OrderedDict([("echo", probe_echo), ("lockout", probe_lockout),
                                  ("verify-flood", probe_verify_flood)])


def probes(args):
    ctx = Context()
    ctx.seed = args.seed
    ctx.build = args.build
    ctx.findings = Findings()
    ctx.slow_s = args.slow * (3.0 if h.SANITIZED else 1.0)
    ctx.reply_timeout = args.reply_timeout * (2.5 if h.SANITIZED else 1.0)
    setup(args, ctx)
    d = ctx.daemon
    names = list(PROBES) if args.probe == "all" else args.probe.split(",")
    try:
        for name in names:
            print("\n== probe %s" % name, flush=True)
            PROBES[name](ctx, args)
            if not d.running():
                ctx.findings.add("crash", "the daemon died in probe %s" % name, d.log()[-4000:])
                break
    finally:
        try:
            d.close()
        except AssertionError as e:
            ctx.findings.add("crash", "the daemon's stop after the probes", str(e)[:3000])
    print_findings(ctx, args)
    cleanup(ctx, args)
    return 1 if ctx.findings.items else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="kinds: " + ", ".join(KINDS))
    ap.add_argument("--build", default="build", help="the build folder (build, build-san)")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    ap.add_argument("--peers", type=int, default=6, help="hostile peer threads (default 6)")
    ap.add_argument("--max-conns", type=int, default=32, help="most hostile connections open at once (default 32)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds to run (default all)")
    ap.add_argument("--reader-peers", type=int, default=-1,
                    help="peers that connect as another user, a reader, when run as root (default: a third)")
    ap.add_argument("--reader-uid", type=int, default=61001, help="that user (default 61001)")
    ap.add_argument("--pause", type=float, default=0.03, help="seconds between a peer's actions (CPU; default 0.03)")
    ap.add_argument("--reply-timeout", type=float, default=15.0, help="seconds to wait for an answer (x2.5 sanitized)")
    ap.add_argument("--slow", type=float, default=3.0, help="a checker request slower than this is a finding "
                                                            "(x3 sanitized)")
    ap.add_argument("--fd-slack", type=int, default=2)
    ap.add_argument("--rss-slack", type=int, default=64, help="MiB of VmRSS growth allowed (normal build)")
    ap.add_argument("--rss-slack-san", type=int, default=512, help="MiB allowed under ASan (its quarantine)")
    ap.add_argument("--malloc-tunables", default=DEFAULT_TUNABLES,
                    help="GLIBC_TUNABLES for the daemon, normal build ('none': glibc's defaults, whose dynamic "
                         "mmap threshold keeps ~60 MiB of freed 1 MiB buffers; default %(default)s)")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds allowed for fds/RSS to come back")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--capacity", default="2GiB")
    ap.add_argument("--preset", default="qwen3-moe")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--shard-size", default="50MB")
    ap.add_argument("--replay", nargs="+", help="replay files saved by a campaign")
    ap.add_argument("--probe", default="", help="instead of a campaign, one-shot reproductions: all or some of "
                    + ", ".join(PROBES))
    ap.add_argument("--flood-verifies", type=int, default=20000, help="verify requests of the verify-flood probe")
    ap.add_argument("--flood-verify-wait", action="store_true",
                    help="verify-flood: also time a verify behind the flood (about 30 ms per queued verify here)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint in the work dir")
    ap.add_argument("--variants", type=int, default=6, help="variants of a finding shown in full (default 6)")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = int(time.time()) % 100000
    build = args.build if os.path.isabs(args.build) else os.path.join(REPO, args.build)
    if not os.path.exists(os.path.join(build, "weightd")):
        print("no weightd in %s: build first (make, or make SANITIZE=address,undefined all)" % build, file=sys.stderr)
        return 2
    os.environ["WEIGHTD_BUILD"] = build
    global h
    sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
    import harness
    h = harness
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.setswitchinterval(0.002)
    if args.replay:
        return replay(args)
    if args.probe:
        for p in ([] if args.probe == "all" else args.probe.split(",")):
            if p not in PROBES:
                print("unknown probe %r (probes: all, %s)" % (p, ", ".join(PROBES)), file=sys.stderr)
                return 2
        return probes(args)
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
