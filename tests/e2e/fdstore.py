"""systemd's part in a restart, played without systemd: the notify socket
(NOTIFY_SOCKET) that takes READY=1, STATUS= and the fd store's FDSTORE=1 /
FDSTOREREMOVE=1 with their descriptors, and a start that hands the socket
and the stored descriptors to the next daemon (LISTEN_FDS, LISTEN_FDNAMES),
as systemd 252 does after a crash or `systemctl restart` (SYSTEMD.md).

The tests under a real systemd (tests/systemd) check the same against
systemd itself; this one runs anywhere, and on the GPU machine.
"""
import array
import os
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LISTEN_FDS = os.path.join(HERE, "listen_fds.py")
MAX_FDS = 253


class FakeSystemd:
    """A service manager for one daemon: its notify socket, its fd store and
    its listening socket, which outlive the daemon as systemd's do."""

    def __init__(self, workdir, sock_path, store_max=16384):
        self.notify_path = os.path.join(workdir, "notify.sock")
        self.sock_path = sock_path
        self.store_max = store_max
        self.store = []          # [(name, fd)], in the order stored
        self.messages = []       # every notify message's text
        self.cond = threading.Condition()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock_path)
        os.chmod(sock_path, 0o666)  # the tests' other users connect too
        self.listener.listen(4096)
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    # ---- what the daemon tells us
    def _serve(self):
        while not self.closed:
            try:
                msg, anc, _, _ = self.notify.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
            except OSError:
                return
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            self._handle(msg.decode(errors="replace"), list(fds))

    def _handle(self, text, fds):
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        with self.cond:
            self.messages.append(text)
            if fields.get("FDSTORE") == "1":
                name = fields.get("FDNAME", "stored")
                for fd in fds:
                    if len(self.store) < self.store_max:
                        self.store.append((name, fd))
                    else:
                        os.close(fd)
                fds = []
            elif fields.get("FDSTOREREMOVE") == "1":
                name = fields.get("FDNAME")
                for n, fd in [e for e in self.store if e[0] == name]:
                    os.close(fd)
                self.store = [e for e in self.store if e[0] != name]
            for fd in fds:
                os.close(fd)
            self.cond.notify_all()

    def names(self):
        with self.cond:
            return [n for n, _ in self.store]

    def wait_for(self, predicate, timeout=30, what="the fd store"):
        """Waits until predicate(names) holds; returns the names."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate([n for n, _ in self.store]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for %s; store holds %r; last messages %r" %
                                         (what, [n for n, _ in self.store], self.messages[-5:]))
                self.cond.wait(left)
            return [n for n, _ in self.store]

    def wait_settled(self, quiet=0.3, timeout=30):
        """Waits until no message came for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.cond:
                n = len(self.messages)
            time.sleep(quiet)
            with self.cond:
                if len(self.messages) == n:
                    return self.names()
        raise AssertionError("the daemon kept sending notify messages")

    # ---- what we hand the next daemon
    def env(self):
        return {"NOTIFY_SOCKET": self.notify_path}

    def command(self, argv):
        """argv started as systemd starts a service: the socket first (named
        after its unit), then every stored descriptor with its name."""
        pairs = [str(self.listener.fileno()), "weightd.socket"]
        with self.cond:
            for name, fd in self.store:
                pairs += [str(fd), name]
            fds = [self.listener.fileno()] + [fd for _, fd in self.store]
        return [sys.executable, LISTEN_FDS] + pairs + ["--"] + list(argv), fds

    def empty(self):
        """`systemctl stop`: the store lets go of everything."""
        with self.cond:
            for _, fd in self.store:
                os.close(fd)
            self.store = []

    def replace(self, name, fd):
        """Puts fd in the store in place of what is stored under name (a test's corruption)."""
        with self.cond:
            for i, (n, old) in enumerate(self.store):
                if n == name:
                    os.close(old)
                    self.store[i] = (name, fd)
                    return
        raise KeyError(name)

    def fd_of(self, name):
        with self.cond:
            return next(fd for n, fd in self.store if n == name)

    def close(self):
        self.closed = True
        self.empty()
        self.notify.close()
        self.listener.close()
        for p in (self.notify_path,):
            try:
                os.unlink(p)
            except OSError:
                pass
