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

A worker gets a model's tensors without reading the checkpoint:

    with weightd.Client() as c, c.attach("gpt-oss", device=0) as att:
        model.load_state_dict(att.state_dict(), assign=True)   # zero-copy torch tensors

attach() maps the daemon's memory through libweightd-client itself (ctypes):
one implementation of import-and-map for C and Python (see Attachment).
"""

import array
import collections.abc
import ctypes
import ctypes.util
import errno
import json
import os
import select
import socket
import threading
import time

__all__ = ["Client", "Attachment", "WeightdError", "default_socket", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = "1.0"
MAX_MESSAGE = 1 << 20  # the protocol's limit on a line
MAX_FDS = 253          # descriptors one message may carry (the kernel's SCM_MAX_FD)


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
            self._connect(timeout)
            self._hello()
        except BaseException:
            self.close()
            raise

    def _hello(self):
        """The first exchange of a new connection. A connection the daemon
        has closed already is one it refused: its words are raised, and no
        other connection is tried (that would retry for as long as the
        daemon refuses)."""
        self._greeted = False
        try:
            self.server_info = self.call("hello", {"version": PROTOCOL_VERSION, "client": "weightd.py"})
        except ConnectionError:
            self._raise_refusal()
            raise
        self._greeted = True

    def _connect(self, timeout):
        """Connects, waiting (up to timeout) while the daemon's listen queue
        is full, as weightctl does, rather than failing at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                self._sock.settimeout(timeout)
                self._sock.connect(self.path)
                return
            except (BlockingIOError, InterruptedError):
                # EAGAIN from a Unix socket: its backlog is full right now.
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise TimeoutError("weightd at %s does not accept connections (its queue is full)"
                                       % self.path) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _raise_refusal(self):
        """A daemon that refuses a connection says why and closes at once,
        perhaps before the hello went: raises its words, if they came."""
        try:
            self._sock.setblocking(False)
            data = self._buf + self._sock.recv(65536)
        except OSError:
            return
        line = data.split(b"\n", 1)[0]
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if isinstance(msg, dict) and msg.get("ok") is False:
            err = msg.get("error") or {}
            raise WeightdError(err.get("code", "EPROTO"), err.get("message", "")) from None

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

    def call(self, op, args=None, on_event=None, timeout=None, events=False, fds=()):
        """Sends {"op": op, "args": args} and returns the reply's result.
        With on_event (or events), asks for the request's events; on_event
        gets each (a dict, e.g. a load's "progress"). timeout bounds each wait
        for a message; a job that sends events keeps it alive however long it
        runs. fds: descriptors to send with the request (load's files)."""
        if self._sock is None:
            raise ConnectionError("the client is closed")
        self._reconnect_if_dropped()
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
            if fds:
                # the descriptors ride on the line's first byte
                sent = self._sock.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                self._sock.sendall(line[sent:])
            else:
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

    def _reconnect_if_dropped(self):
        """A connection the daemon closed while it was idle (idle_timeout;
        calls are synchronous, so nothing of ours was in flight) is opened
        again before a request goes."""
        if not self._greeted:
            return  # a new connection's hello reads a refusal itself
        data, closed = b"", False
        self._sock.setblocking(False)
        try:
            while True:
                chunk = self._sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed = True
        finally:
            self._sock.settimeout(self.timeout)
        if not closed:
            self._buf += data  # events that came meanwhile: the next read takes them
            return
        self._sock.close()
        self._buf, self._sock = b"", socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connect(self.timeout)
        self._hello()

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
        load's summary; on_progress gets each progress event.

        The files are opened here and their descriptors sent (the daemon
        then reads what this process can read); without libweightd-client,
        which finds the files, the daemon opens the path itself, which it
        does only for root and its own user."""
        path = os.path.abspath(path)
        args = {"path": _text(path)}
        if isinstance(devices, str):
            devices = devices.split(",")
        for key, value in (("name", name), ("device", device), ("devices", devices), ("placement", placement)):
            if value is not None:
                args[key] = list(value) if key == "devices" else value
        fds = []
        try:
            files = _checkpoint_files(path)
            if files is not None:
                for f in files:
                    fds.append(os.open(f, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))
                args["files"] = [_text(f) for f in files]
            return self.call("load", args, on_event=on_progress, timeout=timeout, events=True, fds=fds)
        finally:
            for fd in fds:
                os.close(fd)

    def unload(self, name, force=False, wait=None, keep_cached=False):
        """Frees a model; every segment goes back to the devices unless
        keep_cached. force: its holders are asked to detach and waited for."""
        args = {"name": name}
        if force:
            args["force"] = True
        if wait is not None:
            args["wait"] = int(wait)
        if keep_cached:
            args["keep_cached"] = True
        return self.call("unload", args, timeout=None if wait is None else self.timeout + wait)

    def sleep(self, name, mode="offload", force=False):
        """Gives every byte of a model back to its devices: "offload" keeps
        a copy in the daemon's host memory, "discard" reads the checkpoint
        again at wake. Attached workers unmap and keep their addresses."""
        return self.call("sleep", {"name": name, "mode": mode, "force": bool(force)},
                         timeout=max(self.timeout or 0, 3600))

    def wake(self, name):
        """Brings a sleeping model back, at the same addresses in its workers."""
        return self.call("wake", {"name": name}, timeout=max(self.timeout or 0, 3600))

    def _paged(self, op, key, args=None):
        """Every entry of a listing the daemon sends a page at a time."""
        out, offset = [], 0
        while offset is not None:
            page = self.call(op, dict(args or {}, offset=offset))
            out += page[key]
            offset = page.get("next")
        return out

    def list(self):
        """The models, loaded and loading."""
        return self._paged("list", "models")

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

    def leases(self):
        """Every lease: the workers attached (lease, model, pid, uid, process,
        age, device, writable) this user may see (an administrator: every
        one), gathered from the daemon's pages."""
        return self._paged("leases", "leases")

    def attach(self, name, device=None, framework="auto", writable=False, on_revoke=None, timeout=None,
               reconnect=300.0):
        """Maps model `name` into this process and returns an Attachment: a
        read-only mapping from tensor name to a zero-copy tensor. device: a
        device number or UUID (needed when the model spans several);
        framework: "torch", "numpy", "memoryview" or "auto" (the first that
        imports). The attachment has a connection of its own, which holds the
        lease: this client stays free for other calls."""
        return Attachment(self.path, name, device=device, framework=framework, writable=writable,
                          on_revoke=on_revoke, timeout=self.timeout if timeout is None else timeout,
                          reconnect=reconnect)

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


# ---- attach ---------------------------------------------------------------------

class _Part(ctypes.Structure):
    _fields_ = [("device", ctypes.c_int), ("cuda_device", ctypes.c_int), ("ptr", ctypes.c_void_p),
                ("bytes", ctypes.c_uint64), ("tensor_offset", ctypes.c_uint64), ("handle", ctypes.c_size_t),
                ("handle_offset", ctypes.c_uint64)]


class _Tensor(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_char_p), ("ndim", ctypes.c_size_t),
                ("shape", ctypes.POINTER(ctypes.c_uint64)), ("bytes", ctypes.c_uint64),
                ("n_parts", ctypes.c_size_t), ("parts", ctypes.POINTER(_Part)), ("has_checksum", ctypes.c_int),
                ("checksum", ctypes.c_uint64)]


class _Handle(ctypes.Structure):
    _fields_ = [("device", ctypes.c_int), ("cuda_device", ctypes.c_int), ("ptr", ctypes.c_void_p),
                ("bytes", ctypes.c_uint64)]


_NOTICE_FN = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)


def _text(path):
    """A path as JSON can carry it (valid UTF-8): undecodable bytes become
    U+FFFD. Only for display: the descriptors say which files are read."""
    return os.fsencode(path).decode("utf-8", "replace")


def _checkpoint_files(path):
    """The files a load of path reads (index first), or None without the
    library that knows the rules."""
    try:
        lib = _library()
    except OSError:
        return None
    buf, size, err = ctypes.c_void_p(), ctypes.c_size_t(), ctypes.create_string_buffer(1024)
    rc = lib.wdc_checkpoint_files(os.fsencode(path), ctypes.byref(buf), ctypes.byref(size), err, len(err))
    if rc:
        raise WeightdError(errno.errorcode.get(-rc, "EIO"), err.value.decode("utf-8", "replace"))
    try:
        raw = ctypes.string_at(buf, size.value)
    finally:
        lib.wdc_free(buf)
    return [os.fsdecode(p) for p in raw.split(b"\0")[:-1]]
_lib = None


def _library():
    """libweightd-client: $WEIGHTD_CLIENT_LIB, else where make install put
    it, else the system's search path."""
    global _lib
    if _lib is not None:
        return _lib
    def candidates():
        yield os.environ.get("WEIGHTD_CLIENT_LIB")
        try:
            from . import _install  # written by make install
            yield os.path.join(_install.LIBDIR, "libweightd-client.so.0")
        except ImportError:
            pass
        yield "libweightd-client.so.0"
        yield ctypes.util.find_library("weightd-client")  # slow (it runs ldconfig): the last resort

    tried = []
    for path in candidates():
        if not path:
            continue
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            tried.append(str(e))
    else:
        raise OSError("libweightd-client.so.0 was not found (set WEIGHTD_CLIENT_LIB to its path): " +
                      "; ".join(tried))
    vp, cp, ci, sz, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint64
    for fn, res, args in (("wdc_new", vp, []), ("wdc_close", None, [vp]), ("wdc_connect", ci, [vp, cp, ci]),
                          ("wdc_error_code", cp, [vp]), ("wdc_error_message", cp, [vp]), ("wdc_fd", ci, [vp]),
                          ("wdc_set_notice_handler", None, [vp, _NOTICE_FN, vp]), ("wdc_poll", ci, [vp, ci]),
                          ("wdc_attach", ci, [vp, cp, cp, ctypes.c_uint, ci, ctypes.POINTER(vp)]),
                          ("wdc_attachment_tensor_count", sz, [vp]),
                          ("wdc_attachment_tensor", ctypes.POINTER(_Tensor), [vp, sz]),
                          ("wdc_attachment_handle_count", sz, [vp]),
                          ("wdc_attachment_handle", ctypes.POINTER(_Handle), [vp, sz]),
                          ("wdc_attachment_lease", u64, [vp]), ("wdc_attachment_info", cp, [vp]),
                          ("wdc_attachment_state", ci, [vp]),
                          ("wdc_detach", ci, [vp, vp, ci]), ("wdc_reattach", ci, [vp, vp, ci]),
                          ("wdc_checkpoint_files", ci, [cp, ctypes.POINTER(vp), ctypes.POINTER(sz), cp, sz]),
                          ("wdc_free", None, [vp])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    _lib = lib
    return lib


# safetensors dtype: (bytes an element, torch's name, numpy's name). numpy has
# no bfloat16 or float8: those come as the raw bits (uint16, uint8).
_DTYPES = {
    "BOOL": (1, "bool", "bool_"), "U8": (1, "uint8", "uint8"), "I8": (1, "int8", "int8"),
    "I16": (2, "int16", "int16"), "U16": (2, "uint16", "uint16"), "F16": (2, "float16", "float16"),
    "BF16": (2, "bfloat16", "uint16"), "I32": (4, "int32", "int32"), "U32": (4, "uint32", "uint32"),
    "F32": (4, "float32", "float32"), "F64": (8, "float64", "float64"), "I64": (8, "int64", "int64"),
    "U64": (8, "uint64", "uint64"), "C64": (8, "complex64", "complex64"),
    "F8_E4M3": (1, "float8_e4m3fn", "uint8"), "F8_E5M2": (1, "float8_e5m2", "uint8"),
    "F8_E8M0": (1, "float8_e8m0fnu", "uint8"), "F8_E4M3FNUZ": (1, "float8_e4m3fnuz", "uint8"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz", "uint8"),
}


class _CudaMemory:
    """A range of device memory as __cuda_array_interface__ bytes, for
    torch.as_tensor. The read-only flag stays False even for memory mapped
    read-only: torch refuses arrays that set it."""

    def __init__(self, ptr, nbytes, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1",
                                         "version": 3, "strides": None}


class _Mapping:
    """What is mapped, and the connection that holds its lease. Every buffer
    handed out refers to it, so that it outlives them unless closed."""

    def __init__(self, path, name, device, writable, on_notice, timeout):
        self.lib = _library()
        self.client = self.lib.wdc_new()
        self.att = None
        self.timeout_ms = -1 if timeout is None else int(timeout * 1000)
        if not self.client:
            raise MemoryError("wdc_new")
        self._notice = _NOTICE_FN(lambda raw, ctx: on_notice(json.loads(raw)))
        self.lib.wdc_set_notice_handler(self.client, self._notice, None)
        self._check(self.lib.wdc_connect(self.client, path.encode(), self.timeout_ms))
        att = ctypes.c_void_p()
        self._check(self.lib.wdc_attach(self.client, name.encode(), None if device is None else str(device).encode(),
                                        1 if writable else 0, self.timeout_ms, ctypes.byref(att)))
        self.att = att.value

    def _check(self, rc):
        if rc < 0:
            code = self.lib.wdc_error_code(self.client).decode() or "EIO"
            message = self.lib.wdc_error_message(self.client).decode(errors="replace")
            if self.att is None:
                self.close()
            raise WeightdError(code, message)
        return rc

    def close(self):
        client, att, self.client, self.att = self.client, self.att, None, None
        if client:
            if att:
                self.lib.wdc_detach(client, att, self.timeout_ms)
            self.lib.wdc_close(client)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _LeaseKeeper:
    """The thread that reads an attachment's connection and takes its lease
    again after a daemon restart (Attachment's docstring). It alone calls
    the library on the attachment's client until stop()."""

    def __init__(self, att, reconnect):
        self.map = att._map
        self.events = att._events
        self.reconnect = reconnect
        self.cond = threading.Condition()
        self.wake_r, self.wake_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        os.set_blocking(self.ready_w, False)
        self.stopping = False
        # The attachment, weakly: the thread must not keep it (or its
        # tensors' memory) alive.
        import weakref
        self.att = weakref.ref(att)
        self.thread = threading.Thread(target=self._run, name="weightd-lease-%d" % att.lease, daemon=True)
        self.thread.start()

    def _sleep(self, seconds):
        """False once stopping."""
        select.select([self.wake_r], [], [], seconds)
        return not self.stopping

    def _run(self):
        lib, client = self.map.lib, self.map.client
        while not self.stopping:
            fd = lib.wdc_fd(client)
            if fd >= 0:
                select.select([fd, self.wake_r], [], [])
                if self.stopping:
                    return
                n = len(self.events)
                rc = lib.wdc_poll(client, 0)
                if len(self.events) != n:
                    self._signal()
                if rc >= 0:
                    continue
            if not self._take_back(lib, client):
                return

    def _take_back(self, lib, client):
        """The daemon went away: its next one, and the lease from it."""
        deadline = time.monotonic() + self.reconnect
        while self._sleep(0.02) and time.monotonic() < deadline:
            rc = lib.wdc_reattach(client, self.map.att, 1000)
            att = self.att()
            if att is None:
                return False
            if rc == 0:
                att.lease = lib.wdc_attachment_lease(self.map.att)
                att.reattached += 1
                self._signal()
                return True
            code = lib.wdc_error_code(client).decode()
            if code not in ("ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "EPIPE", "EBUSY"):
                att.lost = "%s: %s" % (code, lib.wdc_error_message(client).decode(errors="replace"))
                self._signal()
                return False
        att = self.att()
        if att is not None and not self.stopping:
            att.lost = "ETIMEDOUT: weightd did not come back within %s s" % self.reconnect
            self._signal()
        return False

    def _signal(self):
        with self.cond:
            self.cond.notify_all()
        try:
            os.write(self.ready_w, b"!")
        except BlockingIOError:
            pass

    def wait(self, timeout):
        """Until an event is queued (or timeout seconds; None: forever)."""
        with self.cond:
            if not self.events:
                self.cond.wait(timeout)
        # What fileno() showed is taken now (ready_r is non-blocking).
        try:
            os.read(self.ready_r, 4096)
        except BlockingIOError:
            pass

    def stop(self):
        self.stopping = True
        os.write(self.wake_w, b"!")
        if self.thread is not threading.current_thread():
            self.thread.join()
        for fd in (self.wake_r, self.wake_w, self.ready_r, self.ready_w):
            os.close(fd)


def _framework(name, handle_type):
    if name not in ("auto", "torch", "numpy", "memoryview"):
        raise ValueError("framework %r: choose torch, numpy, memoryview or auto" % (name,))
    gpu = handle_type != "memfd"
    for candidate in ("torch", "numpy", "memoryview") if name == "auto" else (name,):
        if candidate == "memoryview":
            if gpu:
                raise ValueError("device memory cannot be a memoryview: use framework=\"torch\"")
            return candidate, None
        try:
            module = __import__(candidate)
        except ImportError:
            if name != "auto":
                raise
            continue
        if gpu and candidate == "numpy":
            if name == "auto":
                raise ImportError("attaching device memory needs torch, which does not import here")
            raise ValueError("numpy cannot hold device memory: use framework=\"torch\"")
        return candidate, module
    raise ImportError("no framework imports here")


class Attachment(collections.abc.Mapping):
    """A model's tensors, mapped into this process: a read-only mapping from
    tensor name to a zero-copy tensor whose memory is the daemon's (a
    torch.Tensor's data_ptr() is the mapped address; nothing is copied).

    torch: tensors on cuda:N on the CUDA backends (N this process's number of
    the daemon's GPU), on the CPU on the host backend, with the checkpoint's
    dtypes (a dtype this torch lacks comes as uint8: the same shape for
    one-byte types, a last dimension of the element's bytes otherwise).
    numpy: arrays, not writable; BF16 as uint16 and F8 types as uint8 (raw
    bits). memoryview: read-only bytes. A tensor split across devices by rows
    (expert-parallel) is this device's rows: rows(name) says which.

    The lease lasts while anything is mapped: until close() (or the end of a
    with block), or, without one, until the attachment and every tensor from
    it are gone, or the process exits. After close() the tensors must not be
    used: their memory is unmapped (a use faults, on the GPU or the CPU).
    Mappings are read-only unless writable=True and the daemon allows it: a
    write faults in this process alone, and the daemon's copy stays as it
    was. A "revoke" event (weightctl unload --force) calls on_revoke(att,
    event), from process_events(); it may close the attachment. One thread
    at a time, like Client.

    A thread of the attachment's own keeps its lease: it reads the daemon's
    events, and when the daemon goes away (a crash, or `systemctl restart`:
    its fd store keeps the model), it connects again as soon as the daemon
    is back, for up to `reconnect` seconds, and takes the lease again with
    its token. The tensors stay valid throughout: their memory never left
    this process. `reattached` counts those returns; `lost` says why the
    lease could not be taken again (the tensors are then unleased: the
    daemon may unload the model, and they must not be used after that).
    reconnect=0: no thread; events are read by process_events() alone.

    Sleep and wake (weightctl sleep, wake): when the daemon puts the model
    to sleep, the library unmaps every tensor's memory but keeps its
    addresses, and tells the daemon; at the wake it maps the new memory at
    the same addresses. The tensors (their data_ptr(), and CUDA graphs
    captured over them) are then valid again, unchanged. While `asleep`
    they must not be touched: on the CPU a read faults (SIGSEGV), on a GPU
    it is an illegal address that ends this process's CUDA context. The
    keeper thread answers at once; with reconnect=0, call process_events()
    often enough to answer within the daemon's sleep_timeout. `wake_error`
    says why a wake could not map the new memory (the tensors then stay
    unmapped: close the attachment)."""

    def __init__(self, path, name, device=None, framework="auto", writable=False, on_revoke=None, timeout=30.0,
                 reconnect=300.0):
        self.name = name
        self.revoked = None
        self.reattached = 0
        self.lost = None
        self._on_revoke = on_revoke
        self._keeper = None
        # The mapping must not keep the attachment alive (tensors keep the
        # mapping alive): the library hands its events to this list alone.
        self._events = []
        events = self._events
        t0 = time.perf_counter()
        self._map = _Mapping(path, name, device, writable, events.append, timeout)
        t1 = time.perf_counter()
        try:
            lib, att = self._map.lib, self._map.att
            self.info = json.loads(lib.wdc_attachment_info(att))
            self.lease = self.info["lease"]
            if device is None and len(self.info["devices"]) > 1:
                raise WeightdError("EINVAL", "model %r is on devices %s: attach one of them (device=N)" %
                                   (name, ",".join(str(d["device"]) for d in self.info["devices"])))
            self.framework, self._module = _framework(framework, self.info["handle_type"])
            self._writable = writable
            self._build(lib, att)
            # Where the time went, in seconds: the library's side (connect,
            # then the attach: the stream, importing, mapping) and the
            # framework's (making the tensors).
            self.timings = {"attach": t1 - t0, "library": self.info["client"]["seconds"],
                            "wrap": time.perf_counter() - t1}
        except BaseException:
            self._map.close()
            raise
        if reconnect:
            self._keeper = _LeaseKeeper(self, reconnect)

    # ---- building the tensors --------------------------------------------------

    def _bases(self, lib, att):
        """One buffer per handle, in the framework's terms."""
        bases = []
        for i in range(lib.wdc_attachment_handle_count(att)):
            h = lib.wdc_attachment_handle(att, i).contents
            if self.framework == "torch" and h.cuda_device >= 0:
                torch = self._module
                bases.append(torch.as_tensor(_CudaMemory(h.ptr, h.bytes, self._map),
                                             device=torch.device("cuda", h.cuda_device)))
                self.device = "cuda:%d" % h.cuda_device
                continue
            raw = (ctypes.c_ubyte * h.bytes).from_address(h.ptr)
            raw._owner = self._map
            if self.framework == "torch":
                bases.append(self._module.frombuffer(raw, dtype=self._module.uint8))
            elif self.framework == "numpy":
                arr = self._module.frombuffer(raw, dtype=self._module.uint8)
                arr.flags.writeable = self._writable
                bases.append(arr)
            else:
                view = memoryview(raw).cast("B")
                bases.append(view if self._writable else view.toreadonly())
            self.device = "cpu"
        return bases

    def _build(self, lib, att):
        self.device = "cpu"
        bases = self._bases(lib, att)
        self._views = {}  # (handle, dtype): the handle's memory as that dtype
        n = lib.wdc_attachment_tensor_count(att)
        table = (_Tensor * n).from_address(ctypes.addressof(lib.wdc_attachment_tensor(att, 0).contents)) if n else []
        self._tensors, self._rows, self._parts = {}, {}, {}
        for t in table:
            name = t.name.decode()
            dtype = t.dtype.decode()
            shape = list(t.shape[:t.ndim])
            parts = t.parts[:t.n_parts]
            self._parts[name] = parts
            if len(parts) == 1 and parts[0].bytes != t.bytes:
                # This device's rows of a tensor split by its first dimension.
                p = parts[0]
                first, rows = p.tensor_offset * shape[0] // t.bytes, p.bytes * shape[0] // t.bytes
                self._rows[name] = (first, rows)
                shape = [rows] + shape[1:]
            elif len(parts) > 1:
                raise WeightdError("EINVAL", "tensor %r has %d parts here" % (name, len(parts)))
            p = parts[0] if parts else None
            self._tensors[name] = self._wrap(bases, p, dtype, shape)
        # Copies: the library's table goes with close().
        self._parts = {name: [{"device": p.device, "cuda_device": p.cuda_device, "ptr": p.ptr or 0,
                               "bytes": p.bytes, "tensor_offset": p.tensor_offset} for p in parts]
                       for name, parts in self._parts.items()}

    def _wrap(self, bases, part, dtype, shape):
        size, torch_name, numpy_name = _DTYPES.get(dtype, (1, None, None))
        if self.framework == "torch":
            torch = self._module
            kind = getattr(torch, torch_name, None) if torch_name else None
            if kind is None:
                # A dtype this torch lacks (or F4, F6): its bytes.
                kind, shape = torch.uint8, (shape if size == 1 and torch_name else
                                            (shape + [size] if torch_name else [part.bytes if part else 0]))
            if part is None:
                return torch.empty(shape, dtype=kind, device=self.device)
            # One operation a tensor (they cost microseconds each on CUDA
            # tensors): a strided view of its handle, seen as its dtype.
            view = self._views.get((part.handle, kind))
            if view is None:
                view = self._views[(part.handle, kind)] = bases[part.handle].view(kind)
            strides, step = [], 1
            for dim in reversed(shape):
                strides.append(step)
                step *= dim
            return view.as_strided(shape, strides[::-1], part.handle_offset // view.element_size())
        if self.framework == "numpy":
            np = self._module
            if part is None:
                empty = np.empty(shape, dtype=numpy_name or "uint8")
                empty.flags.writeable = self._writable
                return empty
            flat = bases[part.handle][part.handle_offset:part.handle_offset + part.bytes]
            return flat.view(numpy_name).reshape(shape) if numpy_name else flat
        if part is None:
            return memoryview(b"")
        return bases[part.handle][part.handle_offset:part.handle_offset + part.bytes]

    # ---- the mapping -------------------------------------------------------------

    def __getitem__(self, name):
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def state_dict(self):
        """A plain dict of every tensor, for module.load_state_dict(...,
        assign=True)."""
        return dict(self._tensors)

    def rows(self, name):
        """(first, count) of the rows of a tensor split across devices that
        this device holds; None for a whole tensor."""
        return self._rows.get(name)

    def parts(self, name):
        """Where a tensor's bytes are mapped: device, cuda_device, ptr, bytes, tensor_offset."""
        return [dict(p) for p in self._parts[name]]

    # ---- events and the end ------------------------------------------------------

    @property
    def asleep(self):
        """True while the daemon has the model asleep: the tensors are unmapped."""
        return bool(self._map.att) and self._map.lib.wdc_attachment_state(self._map.att) == 1

    @property
    def wake_error(self):
        """None, or the error code of a wake that could not map the new memory."""
        state = self._map.lib.wdc_attachment_state(self._map.att) if self._map.att else 0
        return errno.errorcode.get(-state, "EIO") if state < 0 else None

    def fileno(self):
        """For select(): readable when the daemon said something (a
        revoke). Call process_events(0) before waiting on it: a message may
        already be buffered."""
        if not self._map.client:
            raise ValueError("the attachment is closed")
        if self._keeper:
            return self._keeper.ready_r
        return self._map.lib.wdc_fd(self._map.client)

    def process_events(self, timeout=0.0):
        """Reads what the daemon sent (waiting up to timeout seconds if
        nothing is buffered; None: until something comes) and runs
        on_revoke for each revoke of this lease; the number of events.
        on_revoke may close the attachment."""
        if self._keeper:
            self._keeper.wait(timeout)
        elif self._map.client:
            self._map._check(self._map.lib.wdc_poll(self._map.client, -1 if timeout is None else int(timeout * 1000)))
        handled = 0
        while self._events:
            event = self._events.pop(0)
            handled += 1
            if event.get("event") == "revoke" and event.get("lease") == self.lease:
                self.revoked = event.get("reason") or "revoked"
                if self._on_revoke is not None:
                    self._on_revoke(self, event)
        return handled

    def close(self):
        """Unmaps every tensor and ends the lease. The tensors must not be
        used after this."""
        self._tensors = {}
        if self._keeper:
            self._keeper.stop()
            self._keeper = None
        self._map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
