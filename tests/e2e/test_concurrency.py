"""Loads that overlap with other work: two loads at once (they queue), stats
and the load policy during a load, unload/info/verify of a model that is
still loading, and clients that go away in the middle of their load."""

import os
import shutil
import signal

from . import harness as h


def reading(d, name=None):
    """The running load's job once it is reading, else None."""
    for j in d.stats()["jobs"]:
        if j["kind"] == "load" and j["phase"] == "reading" and (name is None or j["model"] == name):
            return j
    return None


class Concurrency(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.big = h.checkpoint("big")
        cls.medium = h.checkpoint("medium")
        cls.small = h.checkpoint("small")

    def daemon(self, *args, **kw):
        # One reader thread: loads last long enough to be watched and interrupted.
        return super().daemon("--read-threads", "1", *args, **kw)

    def start_load(self, d, path, name):
        """A raw client's load with events; returns once it is reading."""
        c = self.raw(d)
        c.send_request("load", {"path": path, "name": name}, id="load-" + name, events=True)
        while True:
            m = c.recv(timeout=h.T(30))
            self.assertIsNotNone(m, "closed before the load read anything")
            self.assertIn("event", m, "the load ended before it could be observed: %r" % m)
            self.assertEqual(m["id"], "load-" + name)
            if m["phase"] == "reading" and m["bytes_done"] < m["bytes_total"]:
                return c, m

    def finish_load(self, c, name):
        r = c.reply_to("load-" + name, timeout=h.T(120))
        self.assertTrue(r["ok"], r)
        return r

    def test_two_loads_at_once_both_succeed_in_turn(self):
        d = self.daemon(capacity="4GiB")
        a = self.ctl_bg(d.sock, "load", self.medium, "--name", "a")
        b = self.ctl_bg(d.sock, "load", self.medium, "--name", "b")
        ra, rb = a.finish(), b.finish()
        self.assertEqual(ra.rc, 0, ra)
        self.assertEqual(rb.rc, 0, rb)
        models = {m["name"]: m for m in d.models()}
        self.assertEqual(set(models), {"a", "b"})
        self.assertTrue(all(m["state"] == "ready" for m in models.values()))
        # one load at a time: the second starts once the first has finished
        log = d.log().splitlines()
        order = [l.split(": ", 1)[1].split(" from ")[0].split(":")[0] for l in log
                 if "info: loading " in l or "notice: loaded " in l]
        self.assertIn(order, (["loading a", "loaded a", "loading b", "loaded b"],
                              ["loading b", "loaded b", "loading a", "loaded a"]), order)
        self.assertEqual(d.ctl("verify", "a").rc, 0)
        self.assertEqual(d.ctl("verify", "b").rc, 0)

    def test_a_second_load_queues_behind_the_first(self):
        d = self.daemon(capacity="4GiB")
        c1, _ = self.start_load(d, self.big, "first")
        c2 = self.raw(d)
        c2.send_request("load", {"path": self.small, "name": "second"}, id="load-second", events=True)
        jobs = h.wait_until(lambda: (lambda j: j if len(j) == 2 else None)(d.stats()["jobs"]), h.T(10),
                            what="two jobs")
        self.assertEqual([(j["model"], j["phase"]) for j in jobs], [("first", "reading"), ("second", "queued")])
        self.assertEqual({m["name"]: m["state"] for m in d.models()}, {"first": "loading", "second": "loading"})
        self.finish_load(c1, "first")
        self.finish_load(c2, "second")
        self.assertEqual({m["name"]: m["state"] for m in d.models()}, {"first": "ready", "second": "ready"})

    def test_stats_and_the_load_policy_during_a_load(self):
        d = self.daemon(capacity="4GiB")
        before = d.stats()["policy"]
        self.assertEqual(before, {"current": "default", "depth": 0, "load_policy_active": False,
                                  "load": h.LOAD_POLICY})
        c, ev = self.start_load(d, self.big, "big")
        self.assertEqual(ev["event"], "progress")
        for key in ("bytes_done", "bytes_total", "tensors_done", "tensors_total", "elapsed"):
            self.assertIn(key, ev)
        s = d.stats()
        pol = s["policy"]
        self.assertIs(pol["load_policy_active"], True)
        self.assertEqual(pol["depth"], 1)
        self.assertEqual(pol["current"], h.LOAD_POLICY_CANONICAL)
        job = s["jobs"][0]
        self.assertEqual((job["kind"], job["model"], job["phase"]), ("load", "big", "reading"))
        self.assertEqual(job["bytes_total"], h.checkpoint_bytes(self.big))
        r = d.ctl("stats")
        self.assertEqual(r.rc, 0, r)
        self.assertIn("[a load holds it]", r.out)
        self.finish_load(c, "big")
        # progress went forward and ended at the total
        done = [e["bytes_done"] for e in c.events]
        self.assertEqual(done, sorted(done))
        pol = d.stats()["policy"]
        self.assertEqual(pol, before, "the load policy is popped and the old one restored")
        self.assertEqual(d.stats()["jobs"], [])

    def test_custom_load_policy_is_pushed_and_popped(self):
        d = self.daemon("--alloc-conf", "garbage_collection_threshold:0.8", "--load-alloc-conf",
                        "max_split_size_mb:64", capacity="4GiB")
        before = d.stats()["policy"]
        self.assertNotEqual(before["current"], "default")
        self.assertIn("garbage_collection_threshold", before["current"])
        c, _ = self.start_load(d, self.big, "big")
        during = d.stats()["policy"]
        self.assertTrue(during["load_policy_active"])
        self.assertIn("max_split_size_mb:64", during["current"])
        self.finish_load(c, "big")
        self.assertEqual(d.stats()["policy"], before)

    def test_model_commands_while_it_loads(self):
        d = self.daemon(capacity="4GiB")
        c, _ = self.start_load(d, self.big, "busy")
        self.assertEqual([(m["name"], m["state"]) for m in d.models()], [("busy", "loading")])
        r = d.ctl("unload", "busy")
        self.assertEqual(r.rc, 1, r)
        self.assertIn("still loading", r.err)
        self.assertJsonError(d.ctl_json("unload", "busy"), "EBUSY")
        self.assertJsonError(d.ctl_json("info", "busy"), "EBUSY")
        self.assertJsonError(d.ctl_json("verify", "busy"), "EBUSY")
        self.assertJsonError(d.ctl_json("load", self.small, "--name", "busy"), "EEXIST")
        self.finish_load(c, "busy")  # the load went on, and succeeded
        self.assertEqual(d.ctl("verify", "busy").rc, 0)
        self.assertEqual(d.ctl("unload", "busy").rc, 0)
        self.assertEqual(d.device(0)["reserved_bytes"]["current"], 0)

    def test_unload_while_verifying(self):
        d = self.daemon(capacity="4GiB")
        h.load_ok(self, d, self.big)
        c = self.raw(d)
        # Eight verifies at once (each reads all 0.9 GB), so that the model
        # is still busy when the unload comes, however fast one verify is.
        for i in range(8):
            c.send_request("verify", {"name": "big"}, id="v%d" % i, events=True)
        m = c.recv(timeout=h.T(30))
        self.assertEqual((m.get("event"), m.get("phase")), ("progress", "verifying"), m)
        # The unload wins: verifies still queued or running are cancelled
        # (one verify runs at a time), and it answers once they are gone.
        r = d.ctl_json("unload", "big")
        self.assertEqual(r.rc, 0, r)
        replies = {}
        while len(replies) < 8:  # in the order the verifies end
            m = c.recv(timeout=h.T(60))
            if "event" not in m:
                replies[m["id"]] = m
        self.assertEqual(sorted(replies), ["v%d" % i for i in range(8)])
        cancelled = [r for r in replies.values() if not r["ok"]]
        self.assertGreaterEqual(len(cancelled), 7, replies)
        for r in cancelled:
            h.assert_error_reply(self, r, "ECANCELED", r["id"])
        self.assertEqual(d.models(), [])

    def check_rolled_back(self, d, before, name):
        h.wait_until(lambda: not d.stats()["jobs"], h.T(30), what="the cancelled load to end")
        self.assertEqual(h.usage_of(d.device(0)), before, "the cancelled load gave everything back")
        self.assertNotIn(name, [m["name"] for m in d.models()])
        pol = d.stats()["policy"]
        self.assertEqual((pol["current"], pol["depth"], pol["load_policy_active"]), ("default", 0, False))
        self.assertIn("cancelling the load of %s" % name, d.log())
        self.assertTrue(d.running())

    def test_client_disconnects_in_the_middle_of_a_load(self):
        d = self.daemon(capacity="4GiB")
        h.load_ok(self, d, self.small)
        before = h.usage_of(d.device(0))
        c, _ = self.start_load(d, self.big, "dropped")
        c.close()
        self.check_rolled_back(d, before, "dropped")
        self.assertNotIn("loaded dropped", d.log())
        # the daemon goes on: the same load from a patient client works
        h.load_ok(self, d, self.big, "--name", "dropped")
        self.assertEqual(d.ctl("verify", "dropped").rc, 0)
        self.assertEqual(d.ctl("verify", "small").rc, 0)

    def test_weightctl_killed_in_the_middle_of_a_load(self):
        d = self.daemon(capacity="4GiB")
        before = h.usage_of(d.device(0))
        p = self.ctl_bg(d.sock, "load", self.big, "--name", "killed")
        h.wait_until(lambda: reading(d, "killed"), h.T(30), what="the load to be reading")
        os.killpg(p.proc.pid, signal.SIGKILL)
        p.proc.wait()
        self.check_rolled_back(d, before, "killed")
        self.assertEqual(before["reserved_bytes"], 0)
        self.assertEqual(d.device(0)["allocated_bytes"]["current"], 0)

    def test_client_disconnects_while_its_load_is_queued(self):
        d = self.daemon(capacity="4GiB")
        c1, _ = self.start_load(d, self.big, "running")
        c2 = h.RawClient(d.sock, hello=True)
        c2.send_request("load", {"path": self.medium, "name": "queued"})
        h.wait_until(lambda: len(d.stats()["jobs"]) == 2, h.T(10), what="the second load to queue")
        c2.close()
        h.wait_until(lambda: len(d.stats()["jobs"]) == 1, h.T(10), what="the queued load to be dropped")
        self.assertIn("load of queued cancelled before it started", d.log())
        self.finish_load(c1, "running")
        self.assertEqual([m["name"] for m in d.models()], ["running"])
        self.assertEqual(d.ctl("verify", "running").rc, 0)

    def test_a_shard_that_changes_during_the_load(self):
        # a read-phase failure: everything the load took is given back
        copy = os.path.join(self.tmp, "changing")
        os.mkdir(copy)
        shards = h.shard_files(self.big)
        for f in os.listdir(self.big):
            src = os.path.join(self.big, f)
            if src == shards[-1]:
                shutil.copy(src, os.path.join(copy, f))  # the one that changes: a real copy
            else:
                os.link(src, os.path.join(copy, f))
        d = self.daemon(capacity="4GiB")
        before = h.usage_of(d.device(0))
        c, _ = self.start_load(d, copy, "changing")
        last = os.path.join(copy, os.path.basename(shards[-1]))
        os.truncate(last, 1000000)
        r = c.reply_to("load-changing", timeout=h.T(60))
        err = h.assert_error_reply(self, r, None, "load-changing")
        self.assertIn(last, err["message"])
        # Found at open (the size changed) or while reading (the data ends early).
        self.assertRegex(err["message"], "changed size|file ends at byte 1000000, before the data")
        h.wait_until(lambda: not d.stats()["jobs"], h.T(30), what="the job to end")
        self.assertEqual(h.usage_of(d.device(0)), before)
        self.assertEqual(d.models(), [])
        self.assertEqual(d.stats()["policy"]["depth"], 0)
