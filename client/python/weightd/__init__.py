"""weightd's Python client: the daemon's Unix-socket JSON protocol, with
nothing but the standard library.

    import weightd
    with weightd.Client() as c:                       # $WEIGHTD_SOCKET, or the default
        c.load("/models/gpt-oss-120b", name="gpt-oss",
               on_progress=lambda ev: print(ev["bytes_done"], "of", ev["bytes_total"]))
        for t in c.tensors("gpt-oss"):
            print(t["name"], t["dtype"], t["shape"], t["placements"])
        print(c.stats()["devices"][0]["reserved_bytes"])
        c.unload("gpt-oss")

Every method sends one request and returns the reply's result (a dict). A
daemon error raises WeightdError with its code ("ENOENT") and message; a
connection that ends or stays silent raises ConnectionError or TimeoutError.
One thread per Client. The protocol is described in the README; this module
follows the C client library (libweightd-client) call for call.
"""

import array
import json
import os
import socket

__all__ = ["Client", "WeightdError", "default_socket", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = "1.0"
MAX_MESSAGE = 1 << 20  # the protocol's limit on a line
MAX_FDS = 64           # descriptors taken from one message


class WeightdError(Exception):
    """An error reply: code is the errno name ("ENOENT"), message the
    daemon's words."""

    def __init__(self, code, message):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


def default_socket():
    """Where weightd listens by default, as weightd and weightctl decide it:
    $WEIGHTD_SOCKET, else /run/weightd/weightd.sock as root, else
    $XDG_RUNTIME_DIR/weightd.sock, else /tmp/weightd-UID.sock."""
    path = os.environ.get("WEIGHTD_SOCKET")
    if path:
        return path
    if os.geteuid() == 0:
        return "/run/weightd/weightd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "weightd.sock")
    return "/tmp/weightd-%d.sock" % os.geteuid()


class Client:
    """A connection to weightd; it says hello on connecting (server_info is
    the daemon's answer). timeout, in seconds, bounds each wait for a message
    (None: wait forever)."""

    def __init__(self, path=None, timeout=30.0):
        self.path = path or default_socket()
        self.timeout = timeout
        self._next_id = 1
        self._buf = b""
        self._fds = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.path)
            self.server_info = self.call("hello", {"version": PROTOCOL_VERSION, "client": "weightd.py"})
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Closes the connection, and any descriptors not taken."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    # ---- the protocol -----------------------------------------------------

    def call(self, op, args=None, on_event=None, timeout=None, events=False):
        """Sends {"op": op, "args": args} and returns the reply's result.
        With on_event (or events), asks for the request's events; on_event
        gets each (a dict, e.g. a load's "progress"). timeout bounds each wait
        for a message; a job that sends events keeps it alive however long it
        runs."""
        if self._sock is None:
            raise ConnectionError("the client is closed")
        rid = self._next_id
        self._next_id += 1
        args = dict(args or {})
        if on_event is not None or events:
            args["events"] = True
        line = json.dumps({"id": rid, "op": op, "args": args}, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_MESSAGE:
            raise ValueError("a %s request of %d bytes is larger than the protocol's 1 MiB" % (op, len(line)))
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(line)
        except socket.timeout:
            self.close()  # part of a line may have gone: the stream is no longer whole
            raise TimeoutError("weightd at %s does not take the request" % self.path) from None
        while True:
            msg = self._recv(timeout)
            if "event" in msg:
                if on_event is not None and msg.get("id") == rid:
                    on_event(msg)
                continue
            # A reply to no request (id null) is the daemon refusing the line.
            if msg.get("id") not in (rid, None):
                continue
            if msg.get("ok"):
                return msg.get("result")
            err = msg.get("error") or {}
            raise WeightdError(err.get("code", "EPROTO"), err.get("message", "malformed error reply"))

    def take_fds(self):
        """The descriptors that came with replies so far; the caller owns them."""
        fds, self._fds = self._fds, []
        return fds

    def _recv(self, timeout):
        """The next message, as a dict."""
        self._sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_MESSAGE:
                raise ConnectionError("weightd sent a line longer than the protocol's 1 MiB")
            fds = array.array("i")
            try:
                data, anc, flags, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                                         socket.MSG_CMSG_CLOEXEC)
            except socket.timeout:
                raise TimeoutError("no answer from weightd at %s" % self.path) from None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise ConnectionError("weightd sent more descriptors than a message may carry (%d)" % MAX_FDS)
            if not data:
                raise ConnectionError("weightd closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise ConnectionError("weightd sent a line that is not JSON") from None
        if not isinstance(msg, dict):
            raise ConnectionError("weightd sent a message that is not an object")
        return msg

    # ---- operations ---------------------------------------------------------

    def load(self, path, name=None, device=None, devices=None, placement=None, on_progress=None, timeout=None):
        """Loads a checkpoint (a file, a directory or an index; made absolute
        here, as the daemon has its own working directory). device, or each
        of devices (a list, or "0,1" as weightctl takes it), is a device number
        or UUID; placement is "replicate" or "expert-parallel". Returns the
        load's summary; on_progress gets each progress event."""
        args = {"path": os.path.abspath(path)}
        if isinstance(devices, str):
            devices = devices.split(",")
        for key, value in (("name", name), ("device", device), ("devices", devices), ("placement", placement)):
            if value is not None:
                args[key] = list(value) if key == "devices" else value
        return self.call("load", args, on_event=on_progress, timeout=timeout, events=True)

    def unload(self, name):
        return self.call("unload", {"name": name})

    def list(self):
        """The models, loaded and loading."""
        return self.call("list")["models"]

    def info(self, name, offset=0, limit=None):
        """One page of a model's tensors, from tensor number offset; the
        result's "next" is where the next page starts (None: the last)."""
        args = {"name": name, "offset": offset}
        if limit is not None:
            args["limit"] = limit
        return self.call("info", args)

    def tensors(self, name):
        """Every tensor of a model (name, dtype, shape, bytes, placements),
        gathered from info's pages."""
        offset = 0
        while offset is not None:
            page = self.info(name, offset)
            yield from page["tensor_list"]
            offset = page.get("next")

    def verify(self, name, on_progress=None, timeout=None):
        """Compares a model on its devices with its checkpoint; the result's
        "match" says whether every byte is the same."""
        return self.call("verify", {"name": name}, on_event=on_progress, timeout=timeout, events=True)

    def stats(self):
        return self.call("stats")

    def policy(self, conf=None):
        """The allocator policy in force, or, given conf, sets it."""
        return self.call("policy", {} if conf is None else {"conf": conf})

    def snapshot(self, device=None, segment=None, block=None):
        """The segment map of a device, from segment and block on (the
        result says where the next page starts when it does not fit one)."""
        args = {k: v for k, v in (("device", device), ("segment", segment), ("block", block)) if v is not None}
        return self.call("snapshot", args)

    def shutdown(self, timeout=None):
        """Asks the daemon to stop and waits until it has (every segment
        released and the connection closed)."""
        self.call("shutdown")
        try:
            while True:
                self._recv(timeout)
        except ConnectionError:
            pass
        finally:
            self.close()
