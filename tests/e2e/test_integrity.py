"""Checksums: an XXH3 checksum per tensor, computed by the load's readers in
pieces, against weightctl inspect --checksums (the files read from start to
end); verify --quick against the devices' copies; attach --verify on the
worker's side."""

import os

from . import harness as h


def all_tensors(d, name):
    """Every tensor of name (weightctl gathers info's pages)."""
    r = d.ctl_json("info", name)
    assert r.rc == 0, r
    return r.json["tensor_list"]


def file_sums(path):
    r = h.run_ctl("/nonexistent", "inspect", path, "--checksums", json_mode=True)
    assert r.rc == 0, r
    return r.json["checksums"]


class Checksums(h.E2ETestCase):

    def assert_sums_match_files(self, d, name, path):
        want = file_sums(path)
        got = {t["name"]: t.get("checksum") for t in all_tensors(d, name)}
        self.assertEqual(got, want)

    def test_loaded_checksums_are_the_files(self):
        # one shard of 1 GB tensors (many chunks each), nine small shards,
        # and a sparse one of 1032 tensors
        d = self.daemon(capacity="8GiB")
        for kind in ("big", "qwen", "qwen-many"):
            with self.subTest(kind=kind):
                h.load_ok(self, d, h.checkpoint(kind), "--name", kind)
                self.assert_sums_match_files(d, kind, h.checkpoint(kind))
                r = d.ctl_json("verify", kind, "--quick")
                self.assertEqual(r.rc, 0, r)
                self.assertEqual((r.json["match"], r.json["quick"]), (True, True))
                self.assertEqual(r.json["bytes"], h.checkpoint_bytes(h.checkpoint(kind)))

    def test_replicated_and_split_models(self):
        d = self.daemon(devices=2, capacity="4GiB")
        path = h.checkpoint("small")
        h.load_ok(self, d, path, "--name", "rep", "--devices", "0,1")
        h.load_ok(self, d, path, "--name", "split", "--devices", "0,1", "--placement", "expert-parallel")
        for name in ("rep", "split"):
            with self.subTest(name=name):
                self.assert_sums_match_files(d, name, path)
                r = d.ctl_json("verify", name, "--quick")
                self.assertEqual((r.rc, r.json["match"]), (0, True), r)
        # every copy is hashed: twice the checkpoint for the replicated model
        r = d.ctl_json("verify", "rep", "--quick")
        self.assertEqual(r.json["bytes"], 2 * h.checkpoint_bytes(path))
        # The worker hashes what it maps: every tensor when it attaches all
        # devices, only those whole on device 0 when it attaches that one.
        r = d.ctl_json("attach", "split", "--verify")
        self.assertEqual((r.rc, r.json["match"], r.json["checksums_checked"]), (0, True, r.json["tensors"]), r)
        r = d.ctl_json("attach", "split", "--device", "0", "--verify")
        self.assertEqual((r.rc, r.json["match"]), (0, True), r)
        self.assertLess(r.json["checksums_checked"], r.json["tensors"])

    @h.unittest.skipUnless(os.geteuid() == 0, "needs root to write into the daemon's memory")
    def test_quick_verify_finds_a_changed_byte_on_a_device(self):
        d = self.daemon(devices=2, capacity="4GiB")
        path = h.checkpoint("small")
        h.load_ok(self, d, path, "--name", "m", "--devices", "0,1")
        tensor = all_tensors(d, "m")[3]
        place = [p for p in tensor["placements"] if p["device"] == 1][0]
        snap = d.ctl_json("snapshot").json
        dev1 = [x for x in snap["devices"] if x["device"] == 1][0]
        seg = [s for s in dev1["segments"] if s["id"] == place["segment"]][0]
        with open("/proc/%d/mem" % d.pid, "r+b", buffering=0) as mem:
            mem.seek(seg["address"] + place["offset"] + 5)
            old = mem.read(1)
            mem.seek(seg["address"] + place["offset"] + 5)
            mem.write(bytes([old[0] ^ 0x40]))
        r = d.ctl_json("verify", "m", "--quick")
        self.assertEqual(r.rc, 1, r)
        self.assertEqual(r.json["mismatched_tensors"], 1)
        self.assertIn('tensor "%s": the copy on device 1 has checksum' % tensor["name"], r.json["first_mismatch"])
        self.assertIn(tensor["checksum"], r.json["first_mismatch"])
        r = d.ctl_json("attach", "m", "--device", "1", "--verify")
        self.assertEqual((r.rc, r.json["match"]), (1, False), r)
        self.assertIs(d.ctl_json("attach", "m", "--device", "0", "--verify").json["match"], True)

    def test_without_checksums(self):
        d = self.daemon("--checksums", "off")
        h.load_ok(self, d, h.checkpoint("small"), "--name", "m")
        self.assertNotIn("checksum", all_tensors(d, "m")[0])
        self.assertJsonError(d.ctl_json("verify", "m", "--quick"), "EINVAL")
        self.assertEqual(d.ctl("verify", "m").rc, 0, "a full verify still works")
        self.assertIs(d.ctl_json("attach", "m", "--verify").json["checksums_checked"], 0)


class ChangedFiles(h.E2ETestCase):

    def test_a_shard_rewritten_in_place_during_a_load(self):
        # Same size, one byte changed: without the check the model would
        # have mixed the old file and the new.
        ckpt = h.copy_checkpoint(h.checkpoint("big"), os.path.join(self.tmp, "big"))
        shard = h.shard_files(ckpt)[-1]
        d = self.daemon("--read-threads", "1")
        before = d.stats()["devices"][0]
        loader = self.ctl_bg(d.sock, "load", ckpt, "--name", "big")
        h.wait_until(lambda: any(j["phase"] == "reading" for j in d.stats()["jobs"]), h.T(30), interval=0.005,
                     what="the load to read")
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) - 1)
            b = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([b[0] ^ 1]))
        r = loader.finish(timeout=h.T(120))
        self.assertEqual(r.rc, 1, r)
        self.assertIn("was modified while it was loaded", r.err)
        self.assertEqual(d.models(), [])
        after = d.stats()["devices"][0]
        self.assertEqual(h.usage_of(after), h.usage_of(before), "the failed load gave everything back")

    def test_a_shard_truncated_during_a_load(self):
        ckpt = h.copy_checkpoint(h.checkpoint("big"), os.path.join(self.tmp, "big"))
        shard = h.shard_files(ckpt)[-1]
        d = self.daemon("--read-threads", "1")
        before = h.usage_of(d.device(0))
        loader = self.ctl_bg(d.sock, "load", ckpt, "--name", "big")
        h.wait_until(lambda: any(j["phase"] == "reading" for j in d.stats()["jobs"]), h.T(30), interval=0.005,
                     what="the load to read")
        os.truncate(shard, os.path.getsize(shard) // 2)
        r = loader.finish(timeout=h.T(120))
        self.assertEqual(r.rc, 1, r)
        self.assertRegex(r.err, "file ends at byte|changed size|was modified")
        self.assertEqual(d.models(), [])
        self.assertEqual(h.usage_of(d.device(0)), before)

    def test_a_shard_replaced_during_a_load_is_not_read(self):
        # A new file renamed over the old: the load goes on reading the file
        # it opened, and verify too.
        ckpt = h.copy_checkpoint(h.checkpoint("big"), os.path.join(self.tmp, "big"))
        shard = h.shard_files(ckpt)[-1]
        d = self.daemon("--read-threads", "1")
        loader = self.ctl_bg(d.sock, "load", ckpt, "--name", "big")
        h.wait_until(lambda: any(j["phase"] == "reading" for j in d.stats()["jobs"]), h.T(30), interval=0.005,
                     what="the load to read")
        with open(shard + ".new", "wb") as f:
            f.write(b"\0" * os.path.getsize(shard))
        os.rename(shard + ".new", shard)
        r = loader.finish(timeout=h.T(120))
        self.assertEqual(r.rc, 0, r)
        self.assertIs(d.ctl_json("verify", "big").json["match"], True)
        self.assertIs(d.ctl_json("verify", "big", "--quick").json["match"], True)
        # and says so: the path names another checkpoint now
        self.assertEqual(d.ctl_json("info", "big").json["shards_replaced"], 1)
        self.assertIn("1 shard replaced at the path during the load", d.ctl("info", "big").out)
        self.assertIn("big: 1 of its shards (%s first) were replaced at their paths during the load" % shard, d.log())
