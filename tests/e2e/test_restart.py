"""Weights that survive a crash or a restart: the daemon keeps each model's
memory, its checkpoint's files and a record of its registry in systemd's fd
store, and the next daemon serves them again without reading a checkpoint.
systemd's part is played by fdstore.FakeSystemd (tests/systemd checks the
same under a real systemd)."""

import ctypes
import json
import os
import signal
import unittest

from tests.e2e import harness as h
from tests.e2e.fdstore import FakeSystemd
from tests.e2e.test_attach import StdinWorker, worker_json

HOST = ["--backend", "host", "--host-devices", "2", "--host-capacity", "2GiB"]


def resealed(data, edit):
    """A record whose body is edit(its body as JSON), with the header a daemon
    would write for it (its length and XXH3 made again): only what the
    daemon reads in it can refuse it."""
    head, body = data.split(b"\n", 1)
    doc = json.loads(body)
    edit(doc)
    body = json.dumps(doc).encode()
    xxh = ctypes.CDLL("libxxhash.so.0")
    xxh.XXH3_64bits.restype = ctypes.c_uint64
    xxh.XXH3_64bits.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
    magic, version = head.split(b" ")[:2]
    return b"%s %s %016x %d\n" % (magic, version, xxh.XXH3_64bits(body, len(body)), len(body)) + body


class ServiceCase(h.E2ETestCase):
    """A daemon started by a FakeSystemd."""

    def service(self, *args):
        self.systemd = FakeSystemd(self.tmp, os.path.join(self.tmp, "weightd.sock"))
        self.addCleanup(self.systemd.close)
        d = h.ServiceDaemon(self.tmp, self.systemd, HOST + list(args))
        self.addCleanup(d.close)
        return d.start()

    def load(self, d, name, ckpt, *args):
        r = d.ctl("load", ckpt, "--name", name, *args)
        self.assertEqual(r.rc, 0, r)
        self.systemd.wait_settled()

    def restart(self, d, sig):
        """The daemon dies by sig (SIGKILL: a crash; SIGTERM: systemctl
        restart), and systemd starts it again with what the store holds."""
        if sig == signal.SIGKILL:
            d.kill9()
        else:
            self.assertEqual(d.stop(sig), 0, d.log())
        d.start()
        self.systemd.wait_settled()
        return d


class Restart(ServiceCase):
    def test_models_survive_a_crash_and_a_restart_without_their_checkpoint(self):
        src = h.copy_checkpoint(h.checkpoint("small"), os.path.join(self.tmp, "ckpt"))
        qwen = h.copy_checkpoint(h.checkpoint("qwen"), os.path.join(self.tmp, "qwen"))
        d = self.service()
        self.load(d, "gpt", src)
        self.load(d, "qwen", qwen, "--devices", "0,1", "--placement", "expert-parallel")
        names = self.systemd.names()
        self.assertEqual(sum(n.startswith("wd-rec-") for n in names), 1, names)
        self.assertTrue(any(n.startswith("wd-mem-") for n in names), names)
        self.assertTrue(any(n.startswith("wd-file-") for n in names), names)
        before = {m["name"]: m for m in d.models()}
        stats = d.stats()["fd_store"]
        self.assertTrue(stats["enabled"], stats)
        self.assertEqual(stats["models"], 2, stats)
        # The checkpoints move away: a restart cannot read them by name.
        saved = {"gpt": os.path.join(self.tmp, "saved-gpt"), "qwen": os.path.join(self.tmp, "saved-qwen")}
        os.rename(src, saved["gpt"])
        os.rename(qwen, saved["qwen"])
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
            self.restart(d, sig)
            self.assertIn("restored gpt from the fd store", d.log())
            after = {m["name"]: m for m in d.models()}
            self.assertEqual(sorted(after), ["gpt", "qwen"])
            for name in after:
                for key in ("state", "devices", "placement", "tensors", "bytes", "device_bytes", "path"):
                    self.assertEqual(after[name][key], before[name][key], (name, key))
            # every byte, against the saved copies
            got = worker_json(self, d, "verify", "gpt", saved["gpt"])
            self.assertEqual(got["missing"], [])
            for dev in (0, 1):
                got = worker_json(self, d, "verify", "qwen", saved["qwen"], "--device", dev)
                self.assertGreater(got["tensors"], 0)
            # and the checksums saved with them
            r = d.ctl("verify", "gpt", "--quick")
            self.assertEqual(r.rc, 0, r)
            # the full verify reads the kept files, wherever they moved
            r = d.ctl("verify", "qwen")
            self.assertEqual(r.rc, 0, r)
        # One record: each restart's replaces the last.
        names = self.systemd.names()
        self.assertEqual(sum(n.startswith("wd-rec-") for n in names), 1, names)

    def test_unload_takes_a_model_out_of_the_store(self):
        d = self.service()
        self.load(d, "a", h.checkpoint("small"))
        self.load(d, "b", h.checkpoint("qwen"))
        with_both = set(self.systemd.names())
        self.assertEqual(d.ctl("unload", "a").rc, 0)
        self.systemd.wait_settled()
        with_b = set(self.systemd.names())
        self.assertLess(len(with_b), len(with_both))
        self.assertEqual(d.ctl("unload", "b").rc, 0)
        names = self.systemd.wait_settled()
        self.assertEqual([n for n in names if not n.startswith("wd-rec-")], [], names)
        self.restart(d, signal.SIGKILL)
        self.assertEqual(d.models(), [])
        # every byte back on the devices
        for dev in d.stats()["devices"]:
            self.assertEqual(dev["reserved_bytes"]["current"], 0, dev)

    def test_stop_then_start_releases_the_models(self):
        d = self.service()
        self.load(d, "a", h.checkpoint("small"))
        self.assertEqual(d.stop(), 0)
        self.systemd.empty()  # systemctl stop: systemd 252 empties the store
        d.start()
        self.assertEqual(d.models(), [])

    def test_unloading_a_restored_model_gives_every_byte_back(self):
        d = self.service()
        self.load(d, "a", h.checkpoint("small"))
        self.restart(d, signal.SIGKILL)
        self.assertEqual([m["name"] for m in d.models()], ["a"])
        self.assertEqual(d.ctl("unload", "a").rc, 0)
        for dev in d.stats()["devices"]:
            self.assertEqual(dev["reserved_bytes"]["current"], 0, dev)
        names = self.systemd.wait_settled()
        self.assertEqual([n for n in names if not n.startswith("wd-rec-")], [], names)

    def corrupt_and_restart(self, make, dropped="record"):
        """Replaces the stored record with make(its bytes) and restarts;
        returns the daemon, which must serve no model, having dropped the
        record or (dropped="model") its one model."""
        d = self.service()
        self.load(d, "a", h.checkpoint("small"))
        rec = self.replace_record(make)
        self.restart(d, signal.SIGKILL)
        self.assertEqual(d.models(), [])
        self.assertIn("fd store: record %s dropped" % rec if dropped == "record" else "fd store: dropped: model a",
                      d.log())
        # nothing of the dropped record stays in the store or on the devices
        names = self.systemd.wait_settled()
        self.assertEqual([n for n in names if not n.startswith("wd-rec-")], [], names)
        for dev in d.stats()["devices"]:
            self.assertEqual(dev["reserved_bytes"]["current"], 0, dev)
        return d

    def test_a_corrupted_record_is_dropped(self):
        def flip(data):
            b = bytearray(data)
            b[len(b) // 2] ^= 0x20
            return bytes(b)
        d = self.corrupt_and_restart(flip)
        self.assertIn("corrupted", d.log())

    def test_a_truncated_record_is_dropped(self):
        d = self.corrupt_and_restart(lambda data: data[:len(data) - 10])
        self.assertIn("truncated", d.log())

    def test_a_record_of_another_version_is_dropped(self):
        d = self.corrupt_and_restart(lambda data: data.replace(b"weightd-registry 1 ", b"weightd-registry 9 ", 1))
        self.assertIn("format version 9", d.log())

    def replace_record(self, make):
        """The stored record replaced with make(its bytes)."""
        rec = next(n for n in self.systemd.names() if n.startswith("wd-rec-"))
        with open("/proc/self/fd/%d" % self.systemd.fd_of(rec), "rb") as f:
            data = f.read()
        fd = os.memfd_create("weightd-registry", os.MFD_ALLOW_SEALING)
        os.write(fd, make(data))
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.systemd.replace(rec, fd)
        return rec

    def test_a_record_resealed_unchanged_is_taken(self):
        # the resealing of the tests below, checked: the same body sealed
        # again by the test serves the model
        d = self.service()
        self.load(d, "a", h.checkpoint("small"))
        self.replace_record(lambda data: resealed(data, lambda doc: None))
        self.restart(d, signal.SIGKILL)
        self.assertEqual([m["name"] for m in d.models()], ["a"])
        self.assertEqual(d.ctl("verify", "a").rc, 0)

    # A record that checks out but holds numbers no daemon wrote: each is
    # refused by name (a cast of such a double to an integer would be
    # undefined), never taken as some other number.
    def refused(self, edit, message, dropped="model"):
        d = self.corrupt_and_restart(lambda data: resealed(data, edit), dropped)
        self.assertIn(message, d.log())

    def test_a_negative_file_size_in_a_record_is_refused(self):
        self.refused(lambda doc: doc["models"][0]["shards"][0].update(size=-1), "size must be between 0 and")

    def test_a_huge_modification_time_in_a_record_is_refused(self):
        self.refused(lambda doc: doc["models"][0]["shards"][0].update(mtime=[1e300, 0]),
                     "mtime's seconds must be between")

    def test_a_fractional_piece_in_a_record_is_refused(self):
        self.refused(lambda doc: doc["models"][0]["slabs"][0]["pieces"][0].update(size=2.5),
                     "size must be a whole number")

    def test_a_device_past_int_in_a_record_is_refused(self):
        self.refused(lambda doc: doc["models"][0]["slabs"][0].update(device=4294967296),
                     "device must be between 0 and 63")

    def test_a_slab_size_of_the_wrong_type_in_a_record_is_refused(self):
        self.refused(lambda doc: doc["models"][0].update(slab_size="big"), "slab_size must be a number")

    def test_a_negative_generation_drops_the_record(self):
        self.refused(lambda doc: doc.update(generation=-3), "generation must be between 0 and", dropped="record")

    def test_a_checkpoint_changed_since_the_load_is_dropped(self):
        src = h.copy_checkpoint(h.checkpoint("qwen-tiny"), os.path.join(self.tmp, "ckpt"))
        d = self.service()
        self.load(d, "a", src)
        self.load(d, "b", h.checkpoint("small"))
        d.kill9()
        shard = h.shard_files(src)[0]
        st = os.stat(shard)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        d.start()
        self.systemd.wait_settled()
        self.assertEqual([m["name"] for m in d.models()], ["b"])
        self.assertIn("changed since it was loaded", d.log())

    def test_a_missing_descriptor_drops_its_model(self):
        d = self.service()
        self.load(d, "a", h.checkpoint("small"))
        self.load(d, "b", h.checkpoint("qwen"))
        d.kill9()
        # FileDescriptorStoreMax= too small, say: one of a's pieces is gone
        victim = self.systemd.names().index(next(n for n in self.systemd.names() if n.startswith("wd-mem-")))
        name = self.systemd.names()[victim]
        with self.systemd.cond:
            os.close(self.systemd.store[victim][1])
            del self.systemd.store[victim]
        d.start()
        self.systemd.wait_settled()
        self.assertEqual([m["name"] for m in d.models()], ["b"])
        self.assertIn("did not come back", d.log())
        self.assertNotIn(name, self.systemd.names())

    def test_a_crash_during_a_load_keeps_what_was_stored_before(self):
        # A load reads (one reader: the big checkpoint takes a while) when the
        # daemon is killed: the next one serves the model stored before it,
        # intact, and nothing of the load, in its registry or in the store.
        saved = h.copy_checkpoint(h.checkpoint("small"), os.path.join(self.tmp, "saved"))
        d = self.service("--read-threads", "1")
        self.load(d, "first", h.checkpoint("small"))
        before = d.models()
        stored = sorted(n for n in self.systemd.names() if not n.startswith("wd-rec-"))

        def bytes_of():  # not "segment": a restored expandable segment counts 1 where the load's counted 0
            return [{k: v for k, v in h.usage_of(dev).items() if k != "segment"} for dev in d.stats()["devices"]]
        usage = bytes_of()
        loader = self.ctl_bg(d.sock, "load", h.checkpoint("big"), "--name", "second-model")
        h.wait_until(lambda: any(j["phase"] == "reading" for j in d.stats()["jobs"]), h.T(30), interval=0.005,
                     what="the second load to read")
        self.assertIn("second-model", [m["name"] for m in d.models()], "it was registered, loading")
        d.kill9()
        self.assertEqual(loader.finish(timeout=h.T(30)).rc, 1)
        for n in range(2):  # and again from what this restart stored
            d.start()
            self.systemd.wait_settled()
            # (leases aside: see the note at the kill below)
            self.assertEqual(without_leases(d.models()), without_leases(before),
                             "the first model as it was, and nothing of the second")
            self.assertEqual(bytes_of(), usage, "no byte of the second")
            names = self.systemd.names()
            self.assertEqual(sorted(x for x in names if not x.startswith(("wd-rec-", "wd-lease-"))), stored, names)
            rec, = [x for x in names if x.startswith("wd-rec-")]
            with open("/proc/self/fd/%d" % self.systemd.fd_of(rec), "rb") as f:
                record = f.read()
            self.assertIn(b"first", record)
            self.assertNotIn(b"second-model", record)
            self.assertNotIn(h.checkpoint("big").encode(), record)
            r = d.ctl("verify", "first")
            self.assertEqual(r.rc, 0, r)
            self.assertIs(d.ctl_json("verify", "first", "--quick").json["match"], True)
            self.assertEqual(worker_json(self, d, "verify", "first", saved)["missing"], [])
            if n == 0:
                # The worker's lease ends once the daemon sees it gone, and
                # leaves the store after: a kill before that would rightly
                # bring it back, waiting for its worker. Under the sanitizer
                # build such a lease came back after this wait too, in 3 CI
                # runs of 5 (cause not found yet: see the closing note of
                # 2026-12-03); what this test is about is the second model.
                h.wait_until(lambda: not d.ctl_json("leases").json["leases"], h.T(10), what="the worker's lease to end")
                self.systemd.wait_settled()
                d.kill9()
        # and the daemon loads it now
        self.load(d, "second-model", h.checkpoint("big"))
        self.assertIs(d.ctl_json("verify", "second-model", "--quick").json["match"], True)

    def test_without_systemd_nothing_is_stored(self):
        d = self.daemon()
        self.assertEqual(d.ctl("load", h.checkpoint("small"), "--name", "a").rc, 0)
        st = d.stats()["fd_store"]
        self.assertFalse(st["enabled"])
        self.assertEqual(st["why_not"], "not under systemd")


def without_leases(models):
    return [{k: v for k, v in m.items() if k not in ("leases", "lease_count")} for m in models]


class Rider(StdinWorker):
    """worker.py ride: a real worker process computing on attached tensors."""

    def __init__(self, tc, d, name):
        super().__init__(tc, d, "ride", name)

    def wait(self, predicate, timeout=30, d=None):
        return super().wait(predicate, timeout, stop=lambda st: st["lost"],
                            context="\nweightd:\n" + d.log()[-5000:] if d else "")


class RideThrough(ServiceCase):
    """Workers keep computing through a daemon restart, and their clients
    take their leases again from the next daemon (the lease's token)."""

    def test_a_worker_keeps_computing_and_takes_its_lease_again(self):
        d = self.service("--lease-grace", "30")
        self.load(d, "a", h.checkpoint("small"))
        w = Rider(self, d, "a")
        self.systemd.wait_settled()
        self.assertTrue(any(n.startswith("wd-lease-") for n in self.systemd.names()), self.systemd.names())
        for n, sig in enumerate((signal.SIGKILL, signal.SIGTERM), 1):
            if sig == signal.SIGKILL:
                d.kill9()
                # no daemon: the worker computes on
                rounds = w.status()["rounds"]
                w.wait(lambda st: st["rounds"] > rounds + 2)
                d.start()
            else:
                self.assertEqual(d.stop(sig), 0, d.log())
                d.start()
            st = w.wait(lambda st: st["reattached"] == n, d=d)
            self.assertIsNone(st["lost"])
            self.assertEqual(st["bad"], 0)
            # the daemon holds the model for it again
            r = d.ctl("unload", "a")
            self.assertNotEqual(r.rc, 0, r)
            self.assertIn("attached by 1 worker", r.err + r.out)
            leases = d.ctl_json("leases").json["leases"]
            self.assertEqual([(l["lease"], l["pid"]) for l in leases], [(st["lease"], w.p.pid)])
        self.assertTrue(w.quit()["closed"])
        r = d.ctl("unload", "a")
        self.assertEqual(r.rc, 0, r)

    def test_a_lease_waits_for_its_worker_then_ends(self):
        d, w = self.restart_without_the_worker(2)
        r = d.ctl("unload", "a")
        self.assertNotEqual(r.rc, 0, r)
        self.assertIn("not back since the restart", r.err + r.out)
        leases = d.ctl_json("leases").json["leases"]
        self.assertEqual(len(leases), 1)
        self.assertIn("waits_for_worker", leases[0])
        h.wait_until(lambda: d.ctl("unload", "a").rc == 0, timeout=h.T(10), what="the lease's end")
        self.assertIn("did not come back within --lease-grace", d.log())
        os.kill(w.p.pid, signal.SIGCONT)
        st = w.wait(lambda st: st["lost"])
        self.assertIn("ENOENT", st["lost"])

    def restart_without_the_worker(self, grace):
        """A worker attached to a, stopped (SIGSTOP: too busy to come back),
        and the daemon crashed and restarted: its lease waits for it."""
        d = self.service("--lease-grace", str(grace))
        self.load(d, "a", h.checkpoint("small"))
        w = Rider(self, d, "a")
        self.systemd.wait_settled()
        os.kill(w.p.pid, signal.SIGSTOP)
        self.addCleanup(lambda: w.p.poll() is None and os.kill(w.p.pid, signal.SIGCONT))
        d.kill9()
        d.start()
        return d, w

    def test_a_forced_unload_ends_a_lease_that_waits(self):
        d, w = self.restart_without_the_worker(60)
        r = d.ctl("unload", "a", "--force")
        self.assertEqual(r.rc, 0, r)

    def test_a_daemon_stops_with_a_lease_that_waits(self):
        d, w = self.restart_without_the_worker(60)
        self.assertEqual(len(d.ctl_json("leases").json["leases"]), 1)
        self.assertEqual(d.stop(), 0, d.log())  # the sanitizer build sees a leak here
        self.assertIn("lease 1 of a (pid %d) ended: the daemon stopped" % w.p.pid, d.log())
        # still in the store, for the next daemon
        self.assertTrue(any(n.startswith("wd-lease-") for n in self.systemd.names()))

    def test_only_its_user_takes_a_lease_again(self):
        d = self.service("--lease-grace", "30")
        self.load(d, "a", h.checkpoint("small"))
        c = self.raw(d)
        reply = c.request("attach", {"name": "a"}, events=False)
        self.assertTrue(reply["ok"], reply)
        token = reply["result"]["token"]
        self.assertEqual(len(token), 32)
        # nobody else sees it
        self.assertNotIn(token, json.dumps(d.ctl_json("leases").json))
        self.systemd.wait_settled()
        d.kill9()
        d.start()
        os.chmod(self.tmp, 0o755)
        other = h.peer_requests(d.sock, [("reattach", {"token": token})], h.as_user(61001))
        self.assertFalse(other[0]["ok"], other)
        self.assertEqual(other[0]["error"]["code"], "ENOENT")
        again = self.raw(d).request("reattach", {"token": token})
        self.assertTrue(again["ok"], again)
        self.assertEqual(again["result"]["name"], "a")
        bad = self.raw(d).request("reattach", {"token": token})
        self.assertEqual(bad["error"]["code"], "EBUSY", bad)

    def test_a_reattach_past_the_lease_bound_is_refused(self):
        d = self.service("--lease-grace", "30")
        self.load(d, "a", h.checkpoint("small"))
        tokens = []
        for _ in range(2):
            reply = self.raw(d).request("attach", {"name": "a"})
            self.assertTrue(reply["ok"], reply)
            tokens.append(reply["result"]["token"])
        self.systemd.wait_settled()
        d.kill9()
        d.args += ["--max-leases-per-client", "1"]
        d.start()
        c = self.raw(d)
        self.assertTrue(c.request("reattach", {"token": tokens[0]})["ok"])
        bad = c.request("reattach", {"token": tokens[1]})
        h.assert_error_reply(self, bad, "ENOSPC", check_id=False)
        self.assertIn("this connection holds 1 lease (max_leases_per_client 1)", bad["error"]["message"])
        # the refused lease still waits for its worker: another connection takes it
        again = self.raw(d).request("reattach", {"token": tokens[1]})
        self.assertTrue(again["ok"], again)
        self.assertEqual(len(d.ctl_json("leases").json["leases"]), 2)


if __name__ == "__main__":
    unittest.main()
