"""sleep and wake on the host backend: real daemons, real worker processes,
real files. What must hold: every byte of a sleeping model goes back to its
devices (stats and the backend's free figure), a wake brings identical
contents (verify), a discarded model wakes only from unchanged files, and a
worker keeps its tensors at the same addresses across a sleep and a wake."""

import os
import sys
import time

from . import harness as h
from .test_attach import StdinWorker

sys.path.insert(0, os.path.join(h.REPO, "client", "python"))
import weightd  # noqa: E402

MIB = 1 << 20


def reserved(d, device=0):
    return d.device(device)["reserved_bytes"]["current"]


def free_bytes(d, device=0):
    return d.device(device)["free_bytes"]


def fd_links(d):
    out = []
    for f in sorted(os.listdir("/proc/%d/fd" % d.pid), key=int):
        try:
            out.append(os.readlink("/proc/%d/fd/%s" % (d.pid, f)))
        except OSError:
            pass
    return out


class Sleeper(StdinWorker):
    """worker.py sleeper: a worker process attached through the Python client."""

    def __init__(self, tc, d, name):
        super().__init__(tc, d, "sleeper", name)

    def wait_state(self, asleep, timeout):
        return self.wait(lambda st: st["asleep"] == asleep, timeout)


class SleepCase(h.E2ETestCase):

    def loaded(self, d, kind, name, *args):
        r = d.ctl("load", h.checkpoint(kind), "--name", name, *args)
        self.assertEqual(r.rc, 0, r)

    def sleep(self, d, name, *args):
        r = d.ctl_json("sleep", name, *args)
        self.assertEqual(r.rc, 0, r)
        return r.json

    def wake(self, d, name):
        r = d.ctl_json("wake", name)
        self.assertEqual(r.rc, 0, r)
        return r.json

    def verified(self, d, name):
        for args in ((), ("--quick",)):
            r = d.ctl_json("verify", name, *args)
            self.assertEqual(r.rc, 0, r)
            self.assertTrue(r.json["match"], r)


class Sleep(SleepCase):

    def check_round_trip(self, mode, *args):
        d = self.daemon(*args, devices=2)
        before = [(reserved(d, i), free_bytes(d, i)) for i in range(2)]
        self.loaded(d, "medium", "m", "--devices", "0,1")
        loaded = [reserved(d, i) for i in range(2)]
        res = self.sleep(d, "m", "--" + mode)
        self.assertEqual(res["state"], "asleep")
        self.assertEqual(res["sleeps_in"], "host" if mode == "offload" else "checkpoint")
        for i in range(2):
            # Every segment went back to the device, none to a cache.
            self.assertEqual(reserved(d, i), before[i][0])
            self.assertEqual(free_bytes(d, i), before[i][1])
            self.assertGreater(loaded[i], 0)
        self.assertEqual(res["free_bytes_after"] - res["free_bytes_before"], sum(loaded))
        (m,) = d.models()
        self.assertEqual((m["state"], m["sleeps_in"]), ("asleep", res["sleeps_in"]))
        r = d.ctl("list")
        self.assertIn("asleep:%s" % ("host" if mode == "offload" else "ckpt"), r.out)
        # Asleep, a model cannot be attached or verified, and says why.
        r = d.ctl_json("verify", "m")
        self.assertJsonError(r)
        self.assertIn("asleep", r.json["error"]["message"])
        res = self.wake(d, "m")
        self.assertEqual((res["state"], res["from"]), ("ready", "host" if mode == "offload" else "checkpoint"))
        self.assertEqual([reserved(d, i) for i in range(2)], loaded)
        self.verified(d, "m")
        self.assertEqual(d.ctl("unload", "m").rc, 0)
        self.assertEqual([reserved(d, i) for i in range(2)], [b[0] for b in before])
        self.assertClean(d, d.stop())

    def test_offload_gives_every_byte_back_and_wakes_identical(self):
        self.check_round_trip("offload")

    def test_sleep_pin_changes_nothing_where_copies_are_not_staged(self):
        # (the host backend copies with memcpy: nothing to pin; the cuda
        # path is tests/gpu/test_sleep.py's)
        self.check_round_trip("offload", "--sleep-pin", "on")

    def test_discard_gives_every_byte_back_and_wakes_from_the_checkpoint(self):
        self.check_round_trip("discard")

    def test_repeated_sleeps_and_wakes_leak_nothing(self):
        d = self.daemon()
        self.loaded(d, "small", "s")
        fds = h.settled_fds(d)
        links = fd_links(d)
        loaded = reserved(d)
        for mode in ("offload", "discard") * 3:
            self.sleep(d, "s", "--" + mode)
            self.wake(d, "s")
        self.assertEqual(reserved(d), loaded)
        # (the host copies go on a thread of the pool: their memfds close soon
        # after; and the baseline may still count the connection that asked)
        h.settled_fds(d)
        h.wait_until(lambda: h.fd_count(d.pid) <= fds, h.T(10),
                     what="the daemon's descriptors to return (%r then, %r now)" % (links, fd_links(d)))
        self.verified(d, "s")

    def test_a_discarded_model_wakes_only_from_unchanged_files(self):
        d = self.daemon()
        path = h.copy_checkpoint(h.checkpoint("qwen-tiny"), os.path.join(self.tmp, "ck"))
        self.assertEqual(d.ctl("load", path, "--name", "q").rc, 0)
        self.sleep(d, "q", "--discard")
        shard = h.shard_files(path)[0]
        st = os.stat(shard)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        r = d.ctl_json("wake", "q")
        self.assertJsonError(r)
        self.assertEqual(r.json["error"]["code"], "ESTALE")
        self.assertIn(shard, r.json["error"]["message"])
        self.assertEqual(d.models()[0]["state"], "asleep")
        self.assertEqual(reserved(d), 0)
        # An asleep model unloads like any other.
        self.assertEqual(d.ctl("unload", "q").rc, 0)
        self.assertEqual(d.models(), [])

    def test_an_offloaded_model_wakes_after_its_files_changed(self):
        d = self.daemon()
        path = h.copy_checkpoint(h.checkpoint("qwen-tiny"), os.path.join(self.tmp, "ck"))
        self.assertEqual(d.ctl("load", path, "--name", "q").rc, 0)
        self.sleep(d, "q")
        for f in h.shard_files(path):
            with open(f, "r+b") as fh:
                fh.seek(-64, os.SEEK_END)
                fh.write(b"\xff" * 64)
        self.wake(d, "q")
        # The host copy is what was loaded: the checksums say so...
        r = d.ctl_json("verify", "q", "--quick")
        self.assertTrue(r.json["match"], r)
        # ...and the files, changed, no longer match it.
        r = d.ctl_json("verify", "q")
        self.assertFalse(r.json["match"], r)

    def test_wrong_states_and_arguments_are_refused(self):
        d = self.daemon()
        self.loaded(d, "small", "s")
        for args, code in ((("wake", "s"), "EINVAL"), (("sleep", "nope"), "ENOENT"), (("wake", "nope"), "ENOENT")):
            r = d.ctl_json(*args)
            self.assertJsonError(r)
            self.assertEqual(r.json["error"]["code"], code, r)
        c = self.raw(d)
        for op, args, code in (("sleep", {"name": "s", "mode": "elsewhere"}, "EINVAL"),
                               ("sleep", {"name": "s", "force": "yes"}, "EINVAL"),
                               ("slept", {"lease": 1}, "ENOENT")):
            h.assert_error_reply(self, c.request(op, args), code, check_id=False)
        self.sleep(d, "s")
        r = d.ctl_json("sleep", "s")
        self.assertEqual(r.json["error"]["code"], "EBUSY", r)
        self.assertIn("asleep already", r.json["error"]["message"])
        r = d.ctl_json("attach", "s")
        self.assertEqual(r.json["error"]["code"], "EBUSY", r)

    def test_a_wake_without_room_fails_and_leaves_the_model_asleep(self):
        d = self.daemon(capacity="1GiB")
        self.loaded(d, "medium", "a")
        self.sleep(d, "a")
        self.loaded(d, "big", "b")
        r = d.ctl_json("wake", "a")
        self.assertJsonError(r)
        self.assertEqual(r.json["error"]["code"], "ENOMEM", r)
        a = [m for m in d.models() if m["name"] == "a"][0]
        self.assertEqual(a["state"], "asleep")
        self.assertEqual(d.ctl("unload", "b").rc, 0)
        self.assertEqual(reserved(d), 0)
        self.wake(d, "a")
        self.verified(d, "a")


class SeedScenario(SleepCase):
    """The seed's bug, the other way round: a device capped so that model B
    fits only if every byte of a sleeping model A came back."""

    def test_b_fits_only_because_a_gave_every_byte_back(self):
        d = self.daemon(capacity="1GiB")
        self.loaded(d, "medium", "a")
        # With A awake, B does not fit...
        r = d.ctl_json("load", h.checkpoint("big"), "--name", "b")
        self.assertJsonError(r)
        self.assertEqual(r.json["error"]["code"], "ENOMEM", r)
        # ...with A asleep it does.
        self.sleep(d, "a")
        self.loaded(d, "big", "b")
        self.verified(d, "b")
        self.assertEqual(d.ctl("unload", "b").rc, 0)
        self.wake(d, "a")
        self.verified(d, "a")
        self.assertClean(d, d.stop())


class PythonClient(SleepCase):

    def test_sleep_wake_and_unload_through_the_python_client(self):
        d = self.daemon("--load-alloc-conf", "max_split_size_mb:20")
        with weightd.Client(d.sock) as c:
            c.load(h.checkpoint("small"), name="s")
            res = c.sleep("s", mode="discard")
            self.assertEqual((res["state"], res["sleeps_in"]), ("asleep", "checkpoint"))
            with self.assertRaises(weightd.WeightdError) as e:
                c.sleep("s")
            self.assertEqual(e.exception.code, "EBUSY")
            self.assertEqual(c.wake("s")["state"], "ready")
            self.assertTrue(c.verify("s")["match"])
            self.assertTrue(c.unload("s", keep_cached=True)["kept_cached"])
            self.assertGreater(c.stats()["devices"][0]["reserved_bytes"]["current"], 0)


class Unload(SleepCase):

    def test_unload_gives_the_segments_back_unless_asked_to_keep_them(self):
        # (weightd's load policy caches nothing: its slabs' pages go back
        # as they are freed; vLLM's max_split policy keeps whole segments)
        d = self.daemon("--load-alloc-conf", "max_split_size_mb:20")
        self.loaded(d, "small", "s")
        r = d.ctl("unload", "s")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(reserved(d), 0)
        self.loaded(d, "small", "s")
        loaded = reserved(d)
        r = d.ctl_json("unload", "s", "--keep-cached")
        self.assertEqual(r.rc, 0, r)
        self.assertTrue(r.json["kept_cached"])
        st = d.device(0)
        self.assertEqual(st["reserved_bytes"]["current"], loaded)
        self.assertEqual(st["allocated_bytes"]["current"], 0)


class Workers(SleepCase):

    def test_a_worker_keeps_its_tensors_at_the_same_addresses(self):
        d = self.daemon()
        self.loaded(d, "medium", "m")
        w = Sleeper(self, d, "m")
        awake = w.status()
        self.assertFalse(awake["asleep"])
        res = self.sleep(d, "m")
        # The worker unmapped before the daemon let the memory go.
        st = w.status()
        self.assertTrue(st["asleep"], st)
        self.assertEqual(st["handles"], awake["handles"])
        self.assertEqual(reserved(d), 0)
        self.assertEqual(res["reserved_bytes_after"], 0)
        self.assertIn("asking pid %d" % w.p.pid, d.log())
        self.wake(d, "m")
        st = w.wait_state(False, h.T(10))
        self.assertFalse(st["asleep"], st)
        self.assertIsNone(st["wake_error"])
        self.assertEqual(st["handles"], awake["handles"])
        self.assertEqual(st["crcs"], awake["crcs"])
        # Twice more, from the checkpoint too.
        for mode in ("discard", "offload"):
            self.sleep(d, "m", "--" + mode)
            self.wake(d, "m")
            st = w.wait_state(False, h.T(10))
            self.assertEqual((st["handles"], st["crcs"]), (awake["handles"], awake["crcs"]))
        leases = d.ctl_json("leases").json["leases"]
        self.assertEqual([l["lease"] for l in leases], [w.lease])

    def test_weightctl_attach_holds_through_a_sleep_and_verifies_after_the_wake(self):
        """libweightd-client answering by itself, in a C program."""
        d = self.daemon()
        self.loaded(d, "medium", "m")
        holder = self.ctl_bg(d.sock, "attach", "m", "--verify", "--hold", "8")
        h.wait_until(lambda: d.ctl_json("leases").json["leases"], h.T(20), what="the holder's lease")
        self.sleep(d, "m")
        self.assertEqual(reserved(d), 0)
        self.wake(d, "m")
        r = holder.finish(timeout=h.T(60))
        self.assertEqual(r.rc, 0, r)
        self.assertIn("the model slept 1 time and woke 1: mapped again at the same addresses", r.out)
        self.assertIn("after the wake: every part matches the checkpoint again", r.out)

    def test_two_workers_and_a_detach_while_asleep(self):
        d = self.daemon()
        self.loaded(d, "small", "s")
        w1, w2 = Sleeper(self, d, "s"), Sleeper(self, d, "s")
        first = w1.status()
        self.sleep(d, "s")
        w2.quit()  # detaches while the model sleeps
        self.wake(d, "s")
        st = w1.wait_state(False, h.T(10))
        self.assertEqual(st["crcs"], first["crcs"])
        self.assertEqual(len(d.ctl_json("leases").json["leases"]), 1)

    def test_a_holder_that_does_not_answer_keeps_the_model_awake(self):
        d = self.daemon("--sleep-timeout", "1")
        self.loaded(d, "small", "s")
        w = Sleeper(self, d, "s")
        first = w.status()
        silent = self.raw(d)  # attaches, then never reads
        r = silent.request("attach", {"name": "s"})
        self.assertTrue(r["ok"], r)
        loaded = reserved(d)
        t0 = time.monotonic()
        r = d.ctl_json("sleep", "s")
        self.assertJsonError(r)
        self.assertEqual(r.json["error"]["code"], "ETIMEDOUT", r)
        self.assertIn("sleep_timeout", r.json["error"]["message"])
        self.assertIn("pid %d" % os.getpid(), r.json["error"]["message"])
        self.assertNotIn("pid %d " % w.p.pid, r.json["error"]["message"])
        self.assertGreaterEqual(time.monotonic() - t0, 0.9)
        # Still awake; the worker that had unmapped has its memory back.
        self.assertEqual(d.models()[0]["state"], "ready")
        self.assertEqual(reserved(d), loaded)
        st = w.wait_state(False, h.T(10))
        self.assertEqual(st["crcs"], first["crcs"])
        # --force: the silent holder loses its lease; the worker rides through.
        res = self.sleep(d, "s", "--force")
        self.assertEqual(res["state"], "asleep")
        self.assertIn("did not unmap it in time; their leases end", d.log())
        self.wake(d, "s")
        st = w.wait_state(False, h.T(10))
        self.assertEqual(st["crcs"], first["crcs"])
        self.assertEqual([l["lease"] for l in d.ctl_json("leases").json["leases"]], [w.lease])

    def test_a_worker_killed_while_asked_lets_the_sleep_go_on(self):
        d = self.daemon("--sleep-timeout", "30")
        self.loaded(d, "small", "s")
        silent = self.raw(d)
        self.assertTrue(silent.request("attach", {"name": "s"})["ok"])
        sleeper = h.CtlProcess(d.sock, "sleep", "s", json_mode=True)
        self.addCleanup(sleeper.kill)
        h.wait_until(lambda: "asking" in d.log(), h.T(10), what="the sleep to ask its holders")
        silent.close()  # the holder goes: nothing left to wait for
        r = sleeper.finish(timeout=h.T(20))
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(r.json["state"], "asleep")
