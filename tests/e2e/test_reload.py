"""The configuration at run time: SIGHUP re-reads the config file, applies the
live options (log level and rate, client and request bounds, the
administrator lists, what loads and attaches read when they start), logs each
change and what waits for a restart, keeps every running value when the file
is invalid, and tells systemd RELOADING=1 then READY=1 either way.

The tests that change roles run peers as real other uids (as_user), so they
need root; they skip otherwise."""

import json
import os
import re
import signal
import socket
import threading
import time
import subprocess
import unittest

from . import harness as h

ROOT = os.geteuid() == 0
needs_root = unittest.skipUnless(ROOT, "needs root to act as other users")

# Users and groups of these tests, as in test_hostile: numbers only.
READER, ADMIN, MEMBER, OTHER = 61001, 61002, 61003, 61004
ADMIN_GROUP = 62000

CLIENT_DIR = os.path.join(h.REPO, "client", "python")

# A peer that keeps one connection (weightd.Client) and runs the requests it
# reads on stdin, one JSON [op, args] a line, printing each answer; "connect"
# opens one more connection and keeps it. same_connection says the client
# never had to connect again (it would after the daemon closed it).
_PEER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import weightd
c = weightd.Client(sys.argv[2], timeout=float(sys.argv[3]))
first, more = c._sock, []
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    op, args = json.loads(line)
    try:
        if op == "load":
            out = {"ok": True, "result": c.load(args["path"], name=args["name"])}
        elif op == "connect":
            more.append(weightd.Client(sys.argv[2], timeout=float(sys.argv[3])))
            out = {"ok": True}
        elif op == "each":
            out = {"ok": True, "result": [m.call(args["op"]) is not None for m in more]}
        else:
            out = {"ok": True, "result": c.call(op, args)}
    except weightd.WeightdError as e:
        out = {"ok": False, "code": e.code, "message": e.message}
    out["same_connection"] = c._sock is first
    print(json.dumps(out), flush=True)
"""


class Peer:
    """A client process of another user, kept for the length of a test."""

    def __init__(self, sock, user):
        env = h.child_env(h.client_lib_env())
        self.proc = subprocess.Popen([h.PEER_PYTHON, "-c", _PEER, CLIENT_DIR, sock, str(h.T(30))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True, **user)
        ready = self.proc.stdout.readline()
        if not ready:
            raise AssertionError("peer as %r did not start: %s" % (user, self.proc.stderr.read()))

    def __call__(self, op, args=None):
        self.proc.stdin.write(json.dumps([op, args or {}]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("peer died: %s" % self.proc.stderr.read())
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=h.T(30))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


class Notifications:
    """What the daemon tells systemd: a NOTIFY_SOCKET of our own, read as
    systemd reads it, at once (a daemon under the fd store sends a dozen
    messages a load, and a full socket would block it)."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.seen = []
        self.unread = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except OSError:
                return
            if not msg:  # close() shut the socket down
                return
            with self.cond:
                self.unread.append(msg)
                self.cond.notify_all()

    def env(self):
        return {"NOTIFY_SOCKET": self.path}

    def until(self, text, timeout):
        """Every message up to the first one holding text (after those seen)."""
        deadline = time.monotonic() + timeout
        got = []
        with self.cond:
            while True:
                while self.unread:
                    msg = self.unread.pop(0)
                    got.append(msg)
                    self.seen.append(msg)
                    if text in msg:
                        return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no notification with %r; got %r" % (text, got))
                self.cond.wait(left)

    def close(self):
        # The reader ends before its socket closes: a descriptor closed under
        # it could be another test's socket by the time it reads again.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(timeout=5)
        self.sock.close()


class ReloadCase(h.E2ETestCase):

    def setUp(self):
        super().setUp()
        self.conf = os.path.join(self.tmp, "weightd.conf")

    def write_config(self, text):
        # Written whole and renamed into place, as an editor or a package would.
        with open(self.conf + ".new", "w") as f:
            f.write(text)
        os.rename(self.conf + ".new", self.conf)

    def started(self, text, *args, env=None, host_flags=True):
        """A daemon on the config file text, with a NOTIFY_SOCKET of ours:
        READY=1 says when a reload is over, whatever it logged."""
        self.write_config(text)
        self.notify = Notifications(os.path.join(self.tmp, "notify.sock"))
        self.addCleanup(self.notify.close)
        d = self.daemon("--config", self.conf, *args, env=dict(env or {}, **self.notify.env()),
                        host_flags=host_flags)
        self.notify.until("READY=1", h.T(10))
        return d

    def reload(self, d, text=None):
        """Writes the file (when text is given), sends SIGHUP and waits for
        READY=1; returns the log lines the reload wrote."""
        if text is not None:
            self.write_config(text)
        before = d.log()
        d.send_signal(signal.SIGHUP)
        self.last_notifications = self.notify.until("READY=1", h.T(10))
        return d.log()[len(before):]

    def options(self, d):
        return d.stats()["options"]

    def peer(self, d, user):
        p = Peer(d.sock, user)
        self.addCleanup(p.close)
        return p

    def open_to_all(self, d):
        os.chmod(self.tmp, 0o755)
        os.chmod(d.sock, 0o666)

    def readable_checkpoint(self, kind, name):
        """A copy of a checkpoint that every user may read."""
        path = h.copy_checkpoint(h.checkpoint(kind), os.path.join(self.tmp, name))
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        return path


class LiveOptions(ReloadCase):

    def test_the_log_level(self):
        d = self.started("log_level = notice\n")
        self.assertEqual(d.ctl("list").rc, 0)
        self.assertNotIn(" debug: ", d.log())
        self.assertNotIn(" info: ", d.log())
        lines = self.reload(d, "# more, for a while\nlog_level = debug\n")
        self.assertIn("notice: reload: log_level notice -> debug (%s:2)" % self.conf, lines)
        self.assertIn("notice: reload (%s): 1 option applied (log_level), 0 wait for a restart, "
                      "0 connections changed role" % self.conf, lines)
        self.assertEqual(d.ctl("list").rc, 0)
        h.wait_until(lambda: re.search(r" debug: client \d+ connected", d.log()), h.T(10),
                     what="a debug line after the reload")
        self.assertEqual(self.options(d)["log_level"], "debug")
        # Back to quiet: the change itself still shows (it is logged at the
        # more verbose of the two levels), then nothing below error.
        lines = self.reload(d, "log_level = error\n")
        self.assertIn("reload: log_level debug -> error", lines)
        size = len(d.log())
        self.assertEqual(d.ctl("list").rc, 0)
        self.assertEqual(self.reload(d, "log_level = error\n"), "")  # nothing changed: nothing said
        self.assertEqual(d.log()[size:], "")
        self.assertEqual(self.options(d)["log_level"], "error")

    def test_the_command_line_and_environment_still_win(self):
        d = self.started("max_clients = 100\nidle_timeout = 100\nlog_rate = 3\n", "--max-clients", "50",
                         env={"WEIGHTD_IDLE_TIMEOUT": "60"})
        self.assertEqual([self.options(d)[k] for k in ("max_clients", "idle_timeout", "log_rate")], [50, 60, 3])
        lines = self.reload(d, "max_clients = 7\nidle_timeout = 7\nlog_rate = 7\n")
        self.assertIn("reload: log_rate 3 -> 7 (%s:3)" % self.conf, lines)
        self.assertNotIn("max_clients", lines)
        self.assertNotIn("idle_timeout", lines)
        self.assertEqual([self.options(d)[k] for k in ("max_clients", "idle_timeout", "log_rate")], [50, 60, 7])

    def test_systemd_hears_reloading_then_ready_whatever_the_file(self):
        d = self.started("log_level = info\n")
        for text in ("log_level = debug\n", "log_level = shouty\n", "no_such_option = 1\n"):
            with self.subTest(text=text):
                self.reload(d, text)
                got = self.last_notifications
                reloading = [i for i, m in enumerate(got) if m.startswith("RELOADING=1")]
                self.assertEqual(len(reloading), 1, got)
                self.assertRegex(got[reloading[0]], r"^RELOADING=1\nMONOTONIC_USEC=\d+$")
                self.assertTrue(got[-1].startswith("READY=1"), got)
        self.assertTrue(d.running())

    def test_slab_size_and_checksums_apply_to_loads_that_start_later(self):
        d = self.started("", "--read-threads", "1")
        big = h.RawClient(d.sock, hello=True)
        self.addCleanup(big.close)
        big.send_request("load", {"path": h.checkpoint("big"), "name": "big"}, id="big", events=True)
        self.assertEqual(big.recv(timeout=h.T(30)).get("event"), "progress")
        # While it loads: reloads that change what loads read, and other
        # clients served between them.
        for i, text in enumerate(("slab_size = 1\nchecksums = off\n", "slab_size = 1\nchecksums = off\n"
                                  "max_requests_per_client = 1\nlog_level = debug\n",
                                  "slab_size = 1\nchecksums = off\nmax_requests_per_client = 1\n")):
            lines = self.reload(d, text)
            if i == 0:
                self.assertIn("reload: slab_size 0 -> 1 (", lines)
                self.assertIn("reload: checksums on -> off (", lines)
            self.assertEqual(d.ctl("list").rc, 0)
        reply = big.reply_to("big", timeout=h.T(300))
        self.assertTrue(reply["ok"], reply)
        log = d.log()
        self.assertLess(log.index("reload: slab_size 0 -> 1"), log.index("loaded big"), "reloaded while it loaded")
        self.assertEqual(d.ctl("verify", "big", "--quick").rc, 0, "the load in progress kept its checksums")
        h.load_ok(self, d, h.checkpoint("qwen-tiny"), "--name", "later")
        models = {m["name"]: m for m in d.models()}
        self.assertLess(models["big"]["slabs"], models["big"]["tensors"], "the running load kept its slab size")
        self.assertGreaterEqual(models["later"]["slabs"], models["later"]["tensors"], "slab_size 1: one per tensor")
        r = d.ctl_json("verify", "later", "--quick")
        self.assertJsonError(r, "EINVAL")
        self.assertIn("without checksums", r.json["error"]["message"])

    def test_shorter_timeouts_reach_the_connections_there(self):
        d = self.started("idle_timeout = 900\nhello_timeout = 60\n")
        idle = h.RawClient(d.sock, hello=True)
        silent = h.RawClient(d.sock, hello=False)
        self.addCleanup(idle.close)
        self.addCleanup(silent.close)
        self.assertTrue(idle.request("list")["ok"])
        self.reload(d, "idle_timeout = 1\nhello_timeout = 1\n")
        for c, words in ((idle, "idle for 1 s (idle_timeout)"), (silent, "no hello within 1 s (hello_timeout)")):
            m = c.recv(timeout=h.T(10))
            h.assert_error_reply(self, m, "ETIMEDOUT", None)
            self.assertIn(words, m["error"]["message"])
            self.assertIsNone(c.recv(timeout=h.T(10)), "then the connection closes")


class RestartOptions(ReloadCase):

    def test_a_restart_option_is_logged_and_keeps_its_running_value(self):
        d = self.started("backend = host\nhost_capacity = 1GiB\nlisten_backlog = 64\nmax_clients = 100\n",
                         host_flags=False)
        lines = self.reload(d, "backend = host\nhost_capacity = 2GiB\nmax_clients = 90\n")
        self.assertIn("warning: reload: host_capacity changed in %s:2 (1GiB -> 2GiB); it takes effect at the next "
                      "restart" % self.conf, lines)
        self.assertIn("warning: reload: listen_backlog changed in %s (64 -> 4096, its default); it takes effect "
                      "at the next restart" % self.conf, lines)
        self.assertIn("notice: reload: max_clients 100 -> 90 (%s:3)" % self.conf, lines)
        self.assertIn("reload (%s): 1 option applied (max_clients), 2 wait for a restart (host_capacity, "
                      "listen_backlog), 0 connections changed role" % self.conf, lines)
        st = d.stats()
        self.assertEqual(st["devices"][0]["capacity"], 1 << 30)
        self.assertEqual((st["options"]["host_capacity"], st["options"]["listen_backlog"],
                          st["options"]["max_clients"]), (1 << 30, 64, 90))
        # Still different from the file: said again at the next reload.
        self.assertIn("host_capacity changed in", self.reload(d))
        # And taken at the next start.
        self.assertClean(d, d.stop())
        e = self.daemon("--config", self.conf, host_flags=False)
        self.assertEqual(e.stats()["devices"][0]["capacity"], 2 << 30)


class InvalidFiles(ReloadCase):

    GOOD = "log_level = info\nmax_clients_per_uid = 5\nadmin_uids = %d\nidle_timeout = 300\n" % ADMIN

    def test_an_invalid_file_keeps_every_value(self):
        d = self.started(self.GOOD)
        running = self.options(d)
        cases = [
            ("unknown key", "log_level = debug\nmax_clients_per_uid = 1\nlog_lvel = debug\n",
             ":3: unknown option \"log_lvel\""),
            ("bad value", "log_level = debug\nmax_clients_per_uid = lots\n",
             ":2: max_clients_per_uid must be a whole number"),
            ("bad level", "max_clients_per_uid = 1\nlog_level = loud\n", ":2: log_level must be error, warning"),
            ("unknown user", "log_level = debug\nmax_clients_per_uid = 1\nadmin_uids = 0, nobody-here-61999\n",
             ":3: admin_uids: no user named \"nobody-here-61999\""),
            ("unknown group", "log_level = debug\nadmin_groups = no-group-62999\n",
             ":2: admin_groups: no group named \"no-group-62999\""),
            ("bad socket mode", "log_level = debug\nsocket_mode = rw\n", ":2: socket_mode \"rw\" is not an octal"),
            ("bad combination", "log_level = debug\nbackend = host\ndevices = 0\n", ":3: --devices picks GPUs"),
            ("no equals", "log_level = debug\njust words\n", ":2: expected \"key = value\""),
        ]
        for what, text, words in cases:
            with self.subTest(what=what):
                lines = self.reload(d, text)
                self.assertIn("error: reload failed; every option keeps its running value: %s%s" % (self.conf, words),
                              lines)
                self.assertNotIn("reload:", lines, "nothing was applied")
                self.assertEqual(self.options(d), running)
                self.assertTrue(d.running())
        os.unlink(self.conf)
        lines = self.reload(d)
        self.assertIn("reload failed; every option keeps its running value: config file %s: No such file" % self.conf,
                      lines)
        self.assertEqual(self.options(d), running)
        # The file put right: applied.
        lines = self.reload(d, self.GOOD.replace("idle_timeout = 300", "idle_timeout = 301"))
        self.assertIn("reload: idle_timeout 300 -> 301", lines)

    @needs_root
    def test_an_invalid_file_keeps_the_roles_and_bounds(self):
        d = self.started(self.GOOD, "--socket-mode", "0666")
        self.open_to_all(d)
        admin, reader = self.peer(d, h.as_user(ADMIN)), self.peer(d, h.as_user(READER))
        self.assertTrue(admin("snapshot")["ok"])
        lines = self.reload(d, "max_clients_per_uid = 1\nadmin_uids = nobody-here-61999\n")
        self.assertIn("reload failed", lines)
        r = admin("snapshot")
        self.assertTrue(r["ok"] and r["same_connection"], r)
        for _ in range(4):
            self.assertTrue(reader("connect")["ok"], "max_clients_per_uid is still 5")
        r = reader("connect")
        self.assertEqual(r["code"], "EBUSY", r)
        self.assertIn("(max_clients_per_uid 5)", r["message"])


@needs_root
class Roles(ReloadCase):

    def test_an_added_administrator_may_load_and_a_removed_one_no_longer_may(self):
        ckpt = self.readable_checkpoint("qwen-tiny", "ckpt")
        d = self.started("admin_uids = %d\n" % ADMIN, "--socket-mode", "0666")
        self.open_to_all(d)
        old, new = self.peer(d, h.as_user(ADMIN)), self.peer(d, h.as_user(OTHER))
        self.assertTrue(old("load", {"path": ckpt, "name": "first"})["ok"])
        r = new("load", {"path": ckpt, "name": "second"})
        self.assertEqual(r["code"], "EPERM", r)
        self.assertIn("uid %d is a reader" % OTHER, r["message"])

        lines = self.reload(d, "admin_uids = %d\n" % OTHER)
        self.assertIn('reload: admin_uids "%d" -> "%d"' % (ADMIN, OTHER), lines)
        self.assertRegex(lines, r"reload: client \d+ \(pid \d+, uid %d\): administrator -> reader" % ADMIN)
        self.assertRegex(lines, r"reload: client \d+ \(pid \d+, uid %d\): reader -> administrator" % OTHER)
        self.assertIn("1 option applied (admin_uids), 0 wait for a restart, 2 connections changed role", lines)
        # On the connections they had before the reload:
        r = new("load", {"path": ckpt, "name": "second"})
        self.assertTrue(r["ok"] and r["same_connection"], r)
        r = new("unload", {"name": "second"})
        self.assertTrue(r["ok"] and r["same_connection"], r)
        for op, args in (("unload", {"name": "first"}), ("load", {"path": ckpt, "name": "third"}), ("snapshot", {})):
            r = old(op, args)
            self.assertEqual((r["ok"], r.get("code"), r["same_connection"]), (False, "EPERM", True), (op, r))
            self.assertIn("uid %d is a reader" % ADMIN, r["message"])
        self.assertTrue(old("list")["ok"], "a reader still reads")
        # And on new connections.
        r = h.run_ctl(d.sock, "unload", "first", user=h.as_user(ADMIN))
        self.assertEqual(r.rc, 1, r)
        self.assertIn("needs the administrator role", r.err)
        r = h.run_ctl(d.sock, "unload", "first", user=h.as_user(OTHER))
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(d.models(), [])

    def test_an_added_group_counts_for_connections_made_before_any_group_was_named(self):
        d = self.started("", "--socket-mode", "0666")
        self.open_to_all(d)
        member = self.peer(d, h.as_user(MEMBER, groups=[ADMIN_GROUP]))
        self.assertEqual(member("snapshot")["code"], "EPERM")
        lines = self.reload(d, "admin_groups = %d\n" % ADMIN_GROUP)
        self.assertRegex(lines, r"reload: client \d+ \(pid \d+, uid %d\): reader -> administrator" % MEMBER)
        r = member("snapshot")
        self.assertTrue(r["ok"] and r["same_connection"], r)
        lines = self.reload(d, "")
        self.assertIn('reload: admin_groups "%d" -> ""' % ADMIN_GROUP, lines)
        self.assertEqual(member("snapshot")["code"], "EPERM")

    def test_a_lowered_connection_bound_refuses_new_connections_only(self):
        d = self.started("max_clients_per_uid = 4\n", "--socket-mode", "0666")
        self.open_to_all(d)
        reader = self.peer(d, h.as_user(READER))  # one connection
        for _ in range(2):
            self.assertTrue(reader("connect")["ok"])
        lines = self.reload(d, "max_clients_per_uid = 2\n")
        self.assertIn("reload: max_clients_per_uid 4 -> 2", lines)
        # The three it holds stay and are served...
        r = reader("each", {"op": "list"})
        self.assertEqual(r["result"], [True, True], r)
        self.assertTrue(reader("list")["same_connection"])
        # ...a fourth is refused...
        r = reader("connect")
        self.assertEqual(r["code"], "EBUSY", r)
        self.assertIn("uid %d has 3 connections (max_clients_per_uid 2)" % READER, r["message"])
        # ...and administrators are not bound by it.
        self.assertEqual(d.ctl("list").rc, 0)
        # Raised again: a fourth may come.
        self.reload(d, "max_clients_per_uid = 4\n")
        self.assertTrue(reader("connect")["ok"])


class Documentation(unittest.TestCase):

    def test_readme_and_help_agree_on_the_options_and_which_are_live(self):
        h.preflight()
        out = h.run_program([h.WEIGHTD, "--help"]).out
        flags = dict(re.findall(r"^  (--[a-z-]+) \S+ .*?( \(live\))?$", out, re.M))
        flags = {f: bool(live) for f, live in flags.items() if f not in ("--help", "--version")}
        self.assertIn("--log-level", flags)
        with open(os.path.join(h.REPO, "README.md")) as f:
            readme = f.read()
        synopsis = re.search(r"### weightd\n\n```\n(weightd .*?)```", readme, re.S).group(1)
        self.assertEqual(sorted(set(re.findall(r"--[a-z-]+", synopsis))), sorted(flags), "the synopsis")
        live = re.search(r"\*\*Live options\*\* \(SIGHUP applies them\): (.*?)\.\n", readme, re.S).group(1)
        self.assertEqual(sorted(re.findall(r"`--([a-z-]+)`", live)), sorted(f[2:] for f, l in flags.items() if l))


if __name__ == "__main__":
    unittest.main()
