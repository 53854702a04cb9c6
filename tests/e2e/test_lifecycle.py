"""The daemon's life: foreground start with levelled logging, clean stops on
SIGINT, SIGTERM and `weightctl shutdown` (also in the middle of a load),
stale sockets replaced, a live daemon's socket never stolen."""

import json
import time
import os
import re
import signal
import socket
import stat

from . import harness as h

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z weightd\[(\d+)\] "
                      r"(error|warning|notice|info|debug): \S")


class Foreground(h.E2ETestCase):

    def test_runs_in_the_foreground_and_logs_with_levels(self):
        d = self.daemon(devices=2, capacity="1GiB")
        with h.RawClient(d.sock) as c:
            hello = c.hello()
        self.assertTrue(hello["ok"], hello)
        self.assertEqual(hello["result"]["pid"], d.pid, "weightd must not fork away from its parent")
        self.assertEqual(hello["result"]["version"], "1.0")
        self.assertEqual(hello["result"]["backend"], "host")
        self.assertEqual(hello["result"]["devices"], 2)
        for op in ("hello", "load", "unload", "list", "info", "verify", "stats", "shutdown"):
            self.assertIn(op, hello["result"]["ops"])
        st = os.stat(d.sock)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
        lines = [l for l in d.log().splitlines() if l.strip()]
        self.assertTrue(lines, "weightd logs to stderr")
        for line in lines:
            m = LOG_LINE.match(line)
            self.assertTrue(m, "log line without a timestamp and a level: %r" % line)
            self.assertEqual(int(m.group(1)), d.pid)
        log = d.log()
        self.assertRegex(log, r"notice: weightd \d+\.\d+\.\d+ listening on %s \(backend host, 2 devices" %
                         re.escape(d.sock))
        self.assertIn("info: device 0: host device 0, capacity 1.00 GiB", log)
        self.assertIn("info: device 1: host device 1, capacity 1.00 GiB", log)
        self.assertEqual(d.stdout(), "", "weightd writes its log to stderr, nothing to stdout")

    def test_log_level_error_is_quiet(self):
        d = self.daemon("--log-level", "error")
        h.load_ok(self, d, h.checkpoint("small"))
        self.assertClean_quiet(d)

    def assertClean_quiet(self, d):
        d.send_signal(signal.SIGTERM)
        rc = d.wait()
        self.assertEqual(rc, 0, d.log())
        self.assertFalse(os.path.exists(d.sock))
        self.assertEqual(d.log(), "", "--log-level error: nothing below error is logged")


class CleanStops(h.E2ETestCase):

    def loaded_daemon(self):
        d = self.daemon(devices=2, capacity="1GiB")
        h.load_ok(self, d, h.checkpoint("small"))
        h.load_ok(self, d, h.checkpoint("qwen"), "--device", "1")
        self.assertEqual(len(d.models()), 2)
        return d

    def test_sigint(self):
        d = self.loaded_daemon()
        rc = d.stop(signal.SIGINT)
        self.assertClean(d, rc)
        self.assertIn("stopping (SIGINT)", d.log())

    def test_sigterm(self):
        d = self.loaded_daemon()
        rc = d.stop(signal.SIGTERM)
        self.assertClean(d, rc)
        self.assertIn("stopping (SIGTERM)", d.log())

    def test_shutdown_command(self):
        d = self.loaded_daemon()
        with h.RawClient(d.sock, hello=True) as bystander:
            r = d.ctl("shutdown")
            self.assertEqual(r.rc, 0, r)
            self.assertEqual(r.out.strip(), "weightd stopped")
            # weightctl returns once the daemon has hung up; other clients are closed too
            self.assertIsNone(bystander.recv(timeout=h.T(20)))
        rc = d.wait()
        self.assertClean(d, rc)
        self.assertIn("stopping (shutdown requested)", d.log())
        # nothing listens any more
        r = h.run_ctl(d.sock, "list")
        self.assertEqual(r.rc, 1, r)
        self.assertIn("not running", r.err)

    def stop_during_load(self, stopper):
        d = self.daemon(capacity="4GiB")
        watcher = self.raw(d)
        loader = self.ctl_bg(d.sock, "load", h.checkpoint("big"))
        h.wait_until(lambda: any(j["phase"] == "reading" for j in d.stats()["jobs"]), h.T(30),
                     what="the load to be reading")
        stopper(d)
        rc = d.wait()
        r = loader.finish()
        self.assertEqual(r.rc, 1, "the interrupted load reports a failure: %r" % r)
        self.assertTrue("cancel" in r.err or "closed" in r.err, r)
        self.assertIsNone(watcher.recv(timeout=h.T(20)), "the daemon closes every connection")
        self.assertClean(d, rc)
        self.assertNotIn("loaded big", d.log())

    def test_sigterm_during_load(self):
        self.stop_during_load(lambda d: d.send_signal(signal.SIGTERM))

    def test_shutdown_during_load(self):
        def shutdown(d):
            r = d.ctl("shutdown")
            self.assertEqual(r.rc, 0, r)
        self.stop_during_load(shutdown)

    def test_a_stop_lets_a_slow_reader_take_every_reply(self):
        # The stop closed every connection at once: a client that read its
        # replies slowly lost the end of them, the shutdown's own reply too.
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("qwen-many"), "--name", "m")
        c = self.raw(d)
        lines = b"".join(b'{"id": %d, "op": "info", "args": {"name": "m"}}\n' % i for i in range(60))
        c.sock.sendall(lines + b'{"id": "bye", "op": "shutdown"}\n')
        time.sleep(1)  # the daemon queues what the socket does not take, and stops
        replies = []
        c.sock.settimeout(h.T(30))
        while True:
            chunk = c.sock.recv(1 << 16)
            if not chunk:
                break
            c.buf += chunk
            time.sleep(0.005)
        replies = [json.loads(l) for l in c.buf.split(b"\n") if l]
        self.assertEqual(len(replies), 61)
        self.assertEqual(replies[-1]["id"], "bye")
        self.assertTrue(all(r["ok"] for r in replies))
        self.assertClean(d, d.wait())

    def test_shutdown_with_queued_loads(self):
        # One reader: the first load still runs when the shutdown comes.
        d = self.daemon("--read-threads", "1", capacity="4GiB")
        first = self.ctl_bg(d.sock, "load", h.checkpoint("big"), "--name", "first")
        h.wait_until(lambda: d.stats()["jobs"], h.T(30), what="the first load")
        second = self.ctl_bg(d.sock, "load", h.checkpoint("small"), "--name", "second")
        h.wait_until(lambda: len(d.stats()["jobs"]) == 2, h.T(30), what="the second load to queue")
        self.assertEqual(d.ctl("shutdown").rc, 0)
        rc = d.wait()
        self.assertEqual(first.finish().rc, 1)
        self.assertEqual(second.finish().rc, 1)
        self.assertClean(d, rc)


    def test_progress_for_a_queued_load_whose_client_cannot_take_it(self):
        # The tick's progress event to the queued load's client failed, which
        # closed it and freed the job the tick was walking.
        d = self.daemon("--read-threads", "1", capacity="4GiB")
        running = self.raw(d)
        running.send_request("load", {"path": h.checkpoint("big"), "name": "big"}, id="big", events=True)
        self.assertEqual(running.recv(timeout=h.T(30)).get("event"), "progress")
        queued = self.raw(d)
        queued.send_request("load", {"path": h.checkpoint("small"), "name": "q"}, id="q", events=True)
        h.wait_until(lambda: len(d.stats()["jobs"]) == 2, h.T(30), what="the second load to queue")
        queued.sock.shutdown(socket.SHUT_RD)
        def queued_gone():
            jobs = d.stats()["jobs"]
            if any(j["model"] == "q" for j in jobs):
                return None
            return {"big_still_loading": any(j["model"] == "big" for j in jobs)}
        seen = h.wait_until(queued_gone, h.T(30), what="the queued load to go with its client")
        self.assertTrue(running.reply_to("big", timeout=h.T(120))["ok"])
        # (on a slow machine "big" may end first, and "q" load before a tick
        # finds its client gone: then both are there)
        if seen["big_still_loading"]:
            self.assertEqual([m["name"] for m in d.models()], ["big"])
        self.assertClean(d, d.stop())

    def test_a_stop_with_two_queued_loads_of_a_client_that_cannot_take_replies(self):
        # Cancelling the first queued load sent an error its client could not
        # take: the close freed the second job, which the loop had saved as next.
        d = self.daemon("--read-threads", "1", capacity="4GiB")
        running = self.raw(d)
        running.send_request("load", {"path": h.checkpoint("big"), "name": "big"}, id="big")
        h.wait_until(lambda: d.stats()["jobs"], h.T(30), what="the first load")
        queued = self.raw(d)
        queued.send_request("load", {"path": h.checkpoint("small"), "name": "q1"}, id="q1")
        queued.send_request("load", {"path": h.checkpoint("qwen"), "name": "q2"}, id="q2")
        h.wait_until(lambda: len(d.stats()["jobs"]) == 3, h.T(30), what="two loads to queue")
        queued.sock.shutdown(socket.SHUT_RD)
        self.assertClean(d, d.stop())

    def test_sigterm_with_a_verify_running_and_clients_that_misbehave(self):
        d = self.daemon(capacity="4GiB")
        h.load_ok(self, d, h.checkpoint("big"))
        verifier = self.raw(d)
        verifier.send_request("verify", {"name": "big"}, id="v", events=True)
        self.assertEqual(verifier.recv(timeout=h.T(30)).get("phase"), "verifying")
        half = self.raw(d)
        half.send(b'{"id": 1, "op": "li')
        hog = self.raw(d)
        hog.sock.setblocking(False)
        req = b'{"id": 1, "op": "info", "args": {"name": "big"}}\n' * 500
        try:
            for _ in range(200):
                hog.sock.send(req)
        except BlockingIOError:
            pass  # its socket is full: the daemon stopped reading it
        rc = d.stop(signal.SIGTERM)
        self.assertClean(d, rc)
        # (the verify is cancelled, unless it won the race and finished first)
        self.assertTrue("verify of big failed: cancelled" in d.log() or "verified big" in d.log(), d.log())


class Sockets(h.E2ETestCase):

    def test_stale_socket_bound_then_abandoned_is_replaced(self):
        sock = os.path.join(self.tmp, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sock)
        s.close()
        self.assertTrue(os.path.exists(sock))
        d = self.daemon(sock=sock)
        self.assertIn("replacing the stale socket %s" % sock, d.log())
        self.assertEqual(d.ctl("list").rc, 0)
        self.assertClean(d, d.stop())

    def test_socket_left_by_a_killed_daemon_is_replaced(self):
        first = self.daemon()
        h.load_ok(self, first, h.checkpoint("small"))
        first.kill9()
        self.assertTrue(os.path.exists(first.sock), "SIGKILL leaves the socket file behind")
        self.assertFalse(h.can_connect(first.sock))
        second = self.daemon(sock=first.sock)
        self.assertIn("replacing the stale socket", second.log())
        self.assertEqual(second.models(), [], "a new daemon starts empty")
        h.load_ok(self, second, h.checkpoint("small"))
        self.assertClean(second, second.stop())

    def test_live_daemon_socket_is_not_stolen(self):
        first = self.daemon()
        h.load_ok(self, first, h.checkpoint("small"))
        inode = os.stat(first.sock).st_ino
        r = h.run_program([h.WEIGHTD, "--backend", "host", "--socket", first.sock], timeout=h.T(30))
        self.assertNotEqual(r.rc, 0, r)
        self.assertIn("already listening", r.err)
        self.assertIn(first.sock, r.err)
        self.assertEqual(os.stat(first.sock).st_ino, inode, "the live daemon's socket was replaced")
        # the first one still serves, on the same socket
        self.assertTrue(first.running())
        names = [m["name"] for m in first.models()]
        self.assertEqual(names, ["small"])
        h.load_ok(self, first, h.checkpoint("qwen"))
        self.assertClean(first, first.stop())

    def test_a_file_that_is_not_a_socket_is_left_alone(self):
        path = os.path.join(self.tmp, "precious")
        with open(path, "w") as f:
            f.write("do not delete\n")
        r = h.run_program([h.WEIGHTD, "--backend", "host", "--socket", path], timeout=h.T(30))
        self.assertNotEqual(r.rc, 0, r)
        self.assertIn(path, r.err)
        with open(path) as f:
            self.assertEqual(f.read(), "do not delete\n")

    def test_unusable_socket_paths_fail_clearly(self):
        # (found by this test: a path longer than sun_path used to be truncated
        # silently and the daemon listened somewhere else)
        missing = os.path.join(self.tmp, "no", "such", "dir", "w.sock")
        r = h.run_program([h.WEIGHTD, "--backend", "host", "--socket", missing], timeout=h.T(30))
        self.assertNotEqual(r.rc, 0, r)
        self.assertIn(missing, r.err)
        long_path = os.path.join(self.tmp, "x" * 120 + ".sock")
        r = h.run_program([h.WEIGHTD, "--backend", "host", "--socket", long_path], timeout=h.T(30))
        self.assertNotEqual(r.rc, 0, r)
        self.assertIn("too long", r.err)
        self.assertFalse(os.listdir(self.tmp), "nothing may be created at a truncated path")
        # the same path for weightctl, by flag and by $WEIGHTD_SOCKET
        for env, sock in (({}, long_path), ({"WEIGHTD_SOCKET": long_path}, None)):
            r = h.run_ctl(sock, "list", env=env)
            self.assertEqual(r.rc, 1, r)
            self.assertIn("too long", r.err)
