"""The fuzzers cover every operation: each op of the daemon's table
(daemon/ops.c) has its fields in the live campaign's FIELDS (which also
stops at setup when the daemon's hello lists other ops), its name in
fuzz_daemon's dictionary and in seeds of its corpus, and every argument
key that the daemon reads is in the dictionary. A new op or argument that
the fuzzers miss fails here, not in a review."""

import hashlib
import importlib.util
import json
import os
import re
import unittest

from . import harness as h

FUZZ = os.path.join(h.REPO, "tests", "fuzz")


def load_module(name):
    spec = importlib.util.spec_from_file_location("fuzz_" + name, os.path.join(FUZZ, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read(*path):
    with open(os.path.join(h.REPO, *path), encoding="utf-8") as f:
        return f.read()


def op_table():
    """{op: role} from daemon/ops.c's table."""
    return dict(re.findall(r'^\s*\{"(\w+)",\s*\w+,\s*(READER|ADMIN),', read("daemon", "ops.c"), re.M))


def seed_ops(data):
    """The ops a fuzz_daemon input's lines name (after its 2 flag bytes)."""
    ops = set()
    for line in data[2:].split(b"\n"):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and isinstance(msg.get("op"), str):
            ops.add(msg["op"])
    return ops


class Coverage(unittest.TestCase):

    def test_every_op_in_both_fuzzers(self):
        table = op_table()
        self.assertIn("reattach", table)
        live = load_module("live")
        self.assertEqual(sorted(live.FIELDS), sorted(table), "live.py's FIELDS")
        self.assertEqual(sorted(live.ADMIN_OPS), sorted(op for op, role in table.items() if role == "ADMIN"),
                         "live.py's ADMIN_OPS (what its reader peers must be refused)")
        words = set(re.findall(r'^"\\"(\w+)\\""$', read("tests", "fuzz", "daemon.dict"), re.M))
        self.assertEqual(sorted(set(table) - words), [], "ops missing from daemon.dict")
        seeds = load_module("make_seeds").daemon_seeds()
        covered = set().union(*(seed_ops(s) for s in seeds))
        self.assertEqual(sorted(set(table) - covered), [], "ops no fuzz_daemon seed sends")
        corpus = os.path.join(FUZZ, "corpus", "daemon")
        missing = [i for i, s in enumerate(seeds)
                   if not os.path.exists(os.path.join(corpus, hashlib.sha1(s).hexdigest()))]
        self.assertEqual(missing, [], "seeds of make_seeds.py not in tests/fuzz/corpus/daemon: run it")

    def test_every_argument_in_the_dictionary(self):
        keys = set()
        for name in os.listdir(os.path.join(h.REPO, "daemon")):
            if name.endswith(".c"):
                keys |= set(re.findall(r'wp_arg_\w+\(\s*r->args,\s*"(\w+)"', read("daemon", name)))
        self.assertIn("token", keys)
        words = set(re.findall(r'^"\\"(\w+)\\""$', read("tests", "fuzz", "daemon.dict"), re.M))
        self.assertEqual(sorted(keys - words - {"events"}), [], "argument keys missing from daemon.dict")
        fields = set().union(*(set(f) for f in load_module("live").FIELDS.values()))
        self.assertEqual(sorted(keys - fields - {"events"}), [], "argument keys missing from live.py's FIELDS")


if __name__ == "__main__":
    unittest.main()
