"""The allocator's policy and its segment map through the daemon: weightctl
policy (get and set), the load policy pushed for each load and popped after
it, failures included, and weightctl snapshot (every segment and block)."""

import os

from . import harness as h


def write_tiny_tensors(path, n):
    """One safetensors file of n tensors of 256 F32 each."""
    header = {"t%05d" % i: {"dtype": "F32", "shape": [256], "data_offsets": [i * 1024, (i + 1) * 1024]}
              for i in range(n)}
    with open(path, "wb") as f:
        f.write(h.st_image(header, os.urandom(n * 1024)))


class Policy(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")
        cls.big = h.checkpoint("big")

    def test_get_and_set(self):
        d = self.daemon()
        r = d.ctl("policy")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(r.out, "in force: default\nload policy: %s\n" % h.LOAD_POLICY)
        # Keys named change; the others stay; "default" puts every key back.
        self.assertEqual(d.ctl_json("policy", "garbage_collection_threshold:0.8").json["current"],
                         "garbage_collection_threshold:0.8")
        self.assertEqual(d.ctl_json("policy", "max_split_size_mb:64").json["current"],
                         "max_split_size_mb:64,garbage_collection_threshold:0.8")
        self.assertEqual(d.stats()["policy"]["current"], "max_split_size_mb:64,garbage_collection_threshold:0.8")
        self.assertEqual(d.ctl_json("policy", "default").json["current"], "default")

    def test_bad_policies_change_nothing(self):
        d = self.daemon()
        d.ctl("policy", "max_split_size_mb:64")
        for conf, words in (("max_split_size_mb:5", "too small"), ("bogus:1", 'unknown option "bogus"'),
                            ("expandable_page_mb:3", "even number")):
            with self.subTest(conf=conf):
                r = d.ctl("policy", conf)
                self.assertEqual(r.rc, 1, r)
                self.assertIn(words, r.err)
                self.assertJsonError(d.ctl_json("policy", conf), "EINVAL")
        self.assertEqual(d.stats()["policy"]["current"], "max_split_size_mb:64")

    def test_the_load_policy_is_popped_after_a_failed_load(self):
        d = self.daemon(capacity="256MiB")
        d.ctl("policy", "garbage_collection_threshold:0.9")
        r = d.ctl("load", self.big)
        self.assertEqual(r.rc, 1, r)
        self.assertIn("out of memory", r.err)
        pol = d.stats()["policy"]
        self.assertEqual((pol["current"], pol["depth"], pol["load_policy_active"]),
                         ("garbage_collection_threshold:0.9", 0, False))
        h.load_ok(self, d, self.small)
        pol = d.stats()["policy"]
        self.assertEqual((pol["current"], pol["depth"]), ("garbage_collection_threshold:0.9", 0))

    def test_an_explicit_load_policy(self):
        d = self.daemon("--load-alloc-conf", "max_split_size_mb:20")
        h.load_ok(self, d, self.small)
        self.assertEqual(d.stats()["policy"]["load"], "max_split_size_mb:20")
        # Classic segments under vLLM's policy: PyTorch's segment count sees them.
        self.assertGreater(d.stats()["devices"][0]["segment"]["current"], 0)

    def test_no_policy_change_while_a_load_holds_it(self):
        d = self.daemon()
        c = self.raw(d)
        c.send_request("load", {"path": self.big, "name": "big"}, id="load", events=True)
        m = c.recv(timeout=h.T(30))
        self.assertEqual(m.get("event"), "progress", m)
        r = d.ctl_json("policy", "max_split_size_mb:64")
        if r.rc == 1:  # the load was still running: refused
            self.assertJsonError(r, "EBUSY")
        self.assertTrue(c.reply_to("load", timeout=h.T(120))["ok"])


class Snapshot(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")

    def check_tiling(self, snap):
        for dev in snap["devices"]:
            for seg in dev["segments"]:
                at = seg["address"]
                for b in seg["blocks"]:
                    self.assertEqual(b["address"], at)
                    self.assertIn(b["state"], ("allocated", "free", "unmapped"))
                    at += b["size"]
                self.assertEqual(at, seg["address"] + seg["size"], "blocks tile their segment")

    def test_every_segment_and_block(self):
        d = self.daemon(devices=2)
        self.assertEqual(d.ctl_json("snapshot").json, {"devices": [{"device": 0, "segments": []},
                                                                   {"device": 1, "segments": []}]})
        h.load_ok(self, d, self.small, "--device", "1")
        snap = d.ctl_json("snapshot").json
        self.check_tiling(snap)
        dev1 = snap["devices"][1]
        allocated = [b for s in dev1["segments"] for b in s["blocks"] if b["state"] == "allocated"]
        info = d.ctl_json("info", "small").json
        self.assertEqual(len(allocated), len(info["slab_list"]), "a block per slab")
        self.assertEqual(sum(b["requested"] for b in allocated), h.slab_bytes(info, 1))
        mapped = sum(s["mapped"] for s in dev1["segments"])
        self.assertEqual(mapped, d.stats()["devices"][1]["reserved_bytes"]["current"])
        r = d.ctl("snapshot")
        self.assertEqual(r.rc, 0, r)
        self.assertIn("expandable", r.out)
        self.assertIn("allocated requested", r.out)

    def test_a_snapshot_larger_than_a_message_comes_in_pages(self):
        # 6000 tensors in one expandable segment: more blocks than one message holds.
        path = os.path.join(self.tmp, "tiny.safetensors")
        write_tiny_tensors(path, 6000)
        d = self.daemon("--slab-size", "1")  # a slab, so a block, per tensor
        h.load_ok(self, d, path)
        c = self.raw(d)
        first = c.request("snapshot", {"device": 0})["result"]
        self.assertIsInstance(first["next"], dict, "the first page says where the next begins")
        self.assertGreater(first["next"]["block"], 0, "a segment split between pages")
        snap = d.ctl_json("snapshot").json
        self.check_tiling(snap)
        allocated = sum(1 for s in snap["devices"][0]["segments"] for b in s["blocks"] if b["state"] == "allocated")
        self.assertEqual(allocated, 6000)
        self.assertEqual(d.ctl("verify", "tiny").rc, 0)
        self.assertEqual(c.request("snapshot", {"device": 7})["error"]["code"], "ENODEV")
