"""Faults during a load and an attach, each leaving the daemon serving and
its devices' figures as they were before: an allocation failure injected at
every allocation point of a load, a read error at every read, short reads,
a worker killed at each step of an attach, and the daemon killed mid-load
and started again. The injection is the test-only hook of common/fault.h
(WEIGHTD_FAULTS), compiled out of release builds."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

from . import harness as h


def injected(d):
    return "injected fault:" in d.log()


class Faults(h.E2ETestCase):

    def faulty_load(self, fault, path, extra=()):
        """A load of path by a daemon with WEIGHTD_FAULTS=fault; returns None
        when the fault did not fire, else whether the load recovered from it
        (the allocator retries) after checking that a failed load put
        everything back and the daemon loads the same path again."""
        d = self.daemon(*extra, env={"WEIGHTD_FAULTS": fault}, capacity="2GiB")
        try:
            return self.check_faulty_load(d, fault, path)
        finally:
            d.close()  # stopped already, unless a check failed

    def check_faulty_load(self, d, fault, path):
        before = h.usage_of(d.device(0))
        r = d.ctl_json("load", path, "--name", "m")
        if not injected(d):
            self.assertEqual(r.rc, 0, r)
            d.stop()
            return None
        if r.rc == 0:
            self.assertIs(d.ctl_json("verify", "m", "--quick").json["match"], True)
            self.assertEqual(d.ctl("attach", "m", "--verify").rc, 0, "and serves what it loaded")
        else:
            if fault.startswith("alloc:"):
                self.assertEqual(r.json["error"]["code"], "ENOMEM", r)
            self.assertEqual(d.models(), [], "a failed load leaves nothing behind")
            self.assertEqual(h.usage_of(d.device(0)), before, "and gives every byte back")
            self.assertEqual(d.stats()["policy"]["depth"], 0, "and pops its policy")
            r2 = d.ctl_json("load", path, "--name", "m")  # the fault fired once: this one loads
            self.assertEqual(r2.rc, 0, r2)
            self.assertIs(d.ctl_json("verify", "m").json["match"], True)
        self.assertClean(d, d.stop())
        return r.rc == 0

    def each_pass(self, point, path, extra=(), at_most=400):
        """Arms point's nth pass for n = 1, 2, ... until a load passes
        without it. Returns (failed, recovered): the passes whose fault
        failed the load, and those the daemon recovered from."""
        failed = recovered = 0
        for n in range(1, at_most + 1):
            with self.subTest(point=point, n=n):
                got = self.faulty_load("%s:%d" % (point, n), path, extra)
                if got is None:
                    return failed, recovered
                recovered, failed = recovered + got, failed + (not got)
        self.fail("more than %d passes through %s in one load" % (at_most, point))

    def allocation_sites(self, path):
        """Every allocation a load of path makes once the daemon serves, as
        (FILE:LINE, pass): the first pass through each, and the second where
        there is one (a loop, or two allocations on one line)."""
        d = self.daemon(env={"WEIGHTD_FAULTS": "alloc:list"}, capacity="2GiB")
        h.load_ok(self, d, path, "--name", "m")
        d.stop()
        return re.findall(r"fault site: alloc (\S+), pass (\d+)", d.log())

    def test_an_allocation_failure_at_every_allocation_point_of_a_load(self):
        path = h.checkpoint("qwen")
        sites = self.allocation_sites(path)
        files = {site.split(":")[0] for site, _ in sites}
        for where in ("loader/checkpoint.c", "loader/loader.c", "allocator/segment.c", "allocator/backend_host.c",
                      "daemon/jobs.c", "daemon/registry.c", "daemon/attach.c"):
            self.assertIn(where, files, "the load's allocations are all hooked (common/fault.h)")
        failed, recovered, missed = [], [], []
        for site, n in sites:
            with self.subTest(site=site, n=n):
                got = self.faulty_load("alloc:%s@%s" % (site, n), path)
                (missed if got is None else recovered if got else failed).append("%s@%s" % (site, n))
        # a site the listing load passed and this one did not: the readers'
        # threads share some work in whatever order they get to it
        self.assertLessEqual(len(missed), len(sites) // 10, "sites not reached again: %s" % missed)
        self.assertGreater(len(failed), len(sites) // 2, (failed, recovered))

    def test_a_read_error_at_every_read_of_a_load(self):
        failed, _ = self.each_pass("read", h.checkpoint("qwen"), ("--read-threads", "1"))
        self.assertGreater(failed, 9, "a read a shard at least")

    def test_short_reads_everywhere(self):
        d = self.daemon(env={"WEIGHTD_FAULTS": "short_read:1+"})
        h.load_ok(self, d, h.checkpoint("qwen"), "--name", "m")
        self.assertTrue(injected(d))
        self.assertIs(d.ctl_json("verify", "m").json["match"], True)
        self.assertIs(d.ctl_json("verify", "m", "--quick").json["match"], True)

    def test_a_worker_killed_at_each_step_of_an_attach(self):
        d = self.daemon(devices=2)
        h.load_ok(self, d, h.checkpoint("qwen"), "--name", "m", "--devices", "0,1")
        with h.RawClient(d.sock, hello=True) as c:
            n_msgs = 0
            c.send_request("attach", {"name": "m"}, id="a")
            while True:
                m = c.recv()
                n_msgs += 1
                if "event" not in m:
                    break
        h.wait_until(lambda: not d.ctl_json("leases").json["leases"], h.T(10), what="the lease to end")
        fds0, before = h.settled_fds(d), d.stats()["devices"]
        script = r"""
import json, os, signal, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"id": 1, "op": "hello", "args": {"version": "1.0"}}\n'
          b'{"id": 2, "op": "attach", "args": {"name": "m"}}\n')
want, got, buf = int(sys.argv[2]) + 1, 0, b""
while got < want:
    data, anc, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(253 * 4))  # descriptors stay open: they die with us
    if not data:
        break
    buf += data
    got = buf.count(b"\n")
os.kill(os.getpid(), signal.SIGKILL)
"""
        for k in range(n_msgs + 1):
            with self.subTest(messages_read=k):
                p = subprocess.run([sys.executable, "-c", script, d.sock, str(k)], capture_output=True, timeout=h.T(30))
                self.assertEqual(p.returncode, -signal.SIGKILL, p.stderr)
                h.wait_until(lambda: not d.ctl_json("leases").json["leases"], h.T(10), what="the lease to end")
                h.wait_until(lambda: h.settled_fds(d) == fds0, h.T(10), what="the descriptors to come back")
                self.assertEqual(d.stats()["devices"][0]["reserved_bytes"], before[0]["reserved_bytes"])
        # killed while it holds its mappings, at random moments
        rng = random.Random(5)
        for _ in range(5):
            p = self.ctl_bg(d.sock, "attach", "m", "--hold", "10")
            time.sleep(rng.uniform(0.0, 0.3))
            p.proc.kill()
            p.proc.wait()
            h.wait_until(lambda: not d.ctl_json("leases").json["leases"], h.T(10), what="the lease to end")
        h.wait_until(lambda: h.settled_fds(d) == fds0, h.T(10), what="the descriptors to come back")
        r = d.ctl_json("attach", "m", "--verify")
        self.assertEqual((r.rc, r.json["match"]), (0, True), r)
        self.assertClean(d, d.stop())

    def test_the_daemon_killed_mid_load_then_started_again(self):
        d = self.daemon("--read-threads", "1")
        loader = self.ctl_bg(d.sock, "load", h.checkpoint("big"), "--name", "big")
        h.wait_until(lambda: any(j["phase"] == "reading" for j in d.stats()["jobs"]), h.T(30), interval=0.005,
                     what="the load to read")
        d.kill9()
        self.assertEqual(loader.finish(timeout=h.T(30)).rc, 1)
        again = self.daemon(sock=d.sock)
        self.assertIn("replacing the stale socket", again.log())
        self.assertEqual(again.models(), [], "nothing half-registered")
        self.assertEqual(again.device(0)["reserved_bytes"]["current"], 0)
        h.load_ok(self, again, h.checkpoint("big"), "--name", "big")
        self.assertIs(again.ctl_json("verify", "big", "--quick").json["match"], True)
        self.assertClean(again, again.stop())
