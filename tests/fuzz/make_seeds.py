#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses (Python 3 stdlib only).

    tests/fuzz/make_seeds.py [--out tests/fuzz/corpus]

OUT/header/     inputs of fuzz_header: whole safetensors files (valid ones of
                every dtype and several shapes, empty and 0-dim tensors,
                metadata, escaped and non-ASCII names, writer padding), a few
                bare header JSONs, a few "8-byte data length + JSON" inputs,
                and a few files that break one rule each.
OUT/discovery/  inputs of fuzz_discovery: tiny archives (the format is in
                fuzz_discovery.c) of checkpoints: one shard, shards without an
                index, a sharded set with model.safetensors.index.json, other
                index names, hidden files, and a few broken sets.
OUT/attach/     inputs of fuzz_attach: a byte (how many 64 KiB memfds come
                with the stream), then an attach stream as the daemon sends it
                on the host backend (devices, descriptors, handles, tensors,
                the reply), whole, cut short, or with one rule broken.
OUT/daemon/     inputs of fuzz_daemon: a flags byte and a line byte (the
                format is in fuzz_daemon.c), then a connection's requests to a
                real daemon holding the harness's models "m", "moe" and
                "wide": hello
                first, at least one valid stream per operation, descriptors
                for load's "files", forced unloads, a reader's refusals, the
                lease bounds, reattach of a lease that waits for its worker
                (byte 1's bit 5), and wrong types for every operation's
                arguments.

Files are named by the SHA-1 of their contents, as libFuzzer names what it
adds, so running this again next to a merged corpus adds nothing twice.
"""

import argparse
import hashlib
import json
import os
import struct

DTYPES = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


def nbytes(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    bits = n * DTYPES[dtype]
    assert bits % 8 == 0, (dtype, shape)
    return bits // 8


def header_json(tensors, metadata=None):
    """tensors: [(name, dtype, shape)], laid out in order. Returns (json
    text, data length)."""
    obj, off = {}, 0
    if metadata is not None:
        obj["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = nbytes(dtype, shape)
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False), off


def st_file(tensors, metadata=None, pad=True, ensure_ascii=False):
    text, data_len = header_json(tensors, metadata)
    if ensure_ascii:
        text = json.dumps(json.loads(text), separators=(",", ":"))
    raw = text.encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    data = bytes((i * 37 + 11) & 0xFF for i in range(data_len))
    return struct.pack("<Q", len(raw)) + raw + data


def raw_file(header_text, data=b""):
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(raw)) + raw + data


def archive(files):
    """files: [(name, bytes, is_index)] -> the fuzz_discovery archive format.
    Names must be in [a-z0-9._-] and at most 32 bytes; the suffix is added
    by the unpacker when missing."""
    out = b""
    for name, data, is_index in files:
        n = name.encode()
        assert len(n) <= 32 and len(data) <= 0xFFFF, name
        out += bytes([1 if is_index else 0, len(n)]) + n + struct.pack("<H", len(data)) + data
    return out


def index(weight_map, metadata=None):
    obj = {}
    if metadata is not None:
        obj["metadata"] = metadata
    obj["weight_map"] = weight_map
    return json.dumps(obj, indent=2).encode()


def header_seeds():
    s = []
    # Every dtype, one small tensor each (F4 and F6 need whole bytes).
    for dt in DTYPES:
        shape = [4] if DTYPES[dt] == 6 else [2, 3] if DTYPES[dt] >= 8 else [2, 2]
        s.append(st_file([("w." + dt.lower(), dt, shape)]))
    # Several dtypes and shapes together, the writer's way and unpadded.
    mixed = [("model.embed_tokens.weight", "BF16", [8, 4]), ("model.norm.weight", "F32", [4]),
             ("lm_head.weight", "F16", [2, 2, 2]), ("experts.blocks", "U8", [2, 3, 4]),
             ("experts.scales", "F8_E8M0", [2, 3]), ("mxfp4", "F4", [3, 2])]
    s.append(st_file(mixed))
    s.append(st_file(mixed, pad=False))
    s.append(st_file(list(reversed(mixed))))
    # Empty tensors ([0, 4] and an empty dim among big ones), a 0-dim tensor.
    s.append(st_file([("empty", "F32", [0, 4]), ("a", "U8", [3]), ("empty2", "I64", [0])]))
    s.append(st_file([("zero_dims", "F64", [0, 18446744073709551615])]))
    s.append(st_file([("scalar", "F32", []), ("scalar2", "BF16", [])]))
    # No tensors at all; metadata only; metadata with tensors.
    s.append(st_file([]))
    s.append(st_file([], metadata={"format": "pt"}))
    s.append(st_file([("w", "F16", [2])], metadata={"format": "pt", "total": "4", "note": "caf\u00e9 \u2603"}))
    s.append(st_file([("w", "F16", [2])], metadata={}))
    # Names with escapes and non-ASCII text, raw and \u-escaped.
    names = [("caf\u00e9", "U8", [1]), ("quote\"back\\slash", "U8", [2]), ("tab\there\nnl", "U8", [1]),
             ("\U0001F600 emoji", "U8", [1]), ("", "U8", [1]), ("/slash/name", "U8", [1])]
    s.append(st_file(names))
    s.append(st_file(names, ensure_ascii=True))
    # Whitespace and tokens as other writers lay them out.
    s.append(raw_file('{ "a" : { "dtype" : "U8" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 2 ] } }\n\t\r ',
                      b"xy"))
    s.append(raw_file('{"a":{"data_offsets":[0,4],"shape":[2],"dtype":"I16"}}', b"abcd"))
    # One broken rule each: a head start for the error paths.
    s.append(raw_file('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"ab"))
    s.append(raw_file('{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"ab"))
    s.append(raw_file('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                      '"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', b"abc"))
    s.append(raw_file('{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}', b"abcd"))
    s.append(raw_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                      '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab"))
    s.append(raw_file('{"a\\u0000b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"a"))
    s.append(raw_file('{"__metadata__":{"k":1}}'))
    s.append(raw_file('{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}}', b"a"))
    s.append(raw_file('{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}', b"a"))
    s.append(raw_file(b'{"\xff":1}'))
    s.append(raw_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}x', b"a"))
    s.append(struct.pack("<Q", 100000001) + b"{}")
    s.append(raw_file('{"__metadata__":{"k":"a","k":"b"}}'))
    s.append(raw_file('{"__metadata__":{},"__metadata__":{}}'))
    # Long names (messages cut them at a character boundary), control
    # characters the writer must escape, many dims in a message.
    long_name = "\u00e9" * 100 + "\U0001F600" * 20
    s.append(st_file([(long_name, "U8", [1]), ("\x01\x0c\x1f\x7f", "U8", [1])]))
    s.append(raw_file('{"%s":{"dtype":"F4","shape":[1,1,1,1,1,1,1,1,1,3],"data_offsets":[0,2]}}' % long_name, b"ab"))
    s.append(raw_file('{"%s":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                      '"%s":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}' % (long_name, long_name[1:]), b"a"))
    # Header JSON alone (mode C of the harness).
    s.append(header_json(mixed)[0].encode())
    s.append(header_json([("scalar", "F32", []), ("e", "F32", [0, 4])], {"k": "v"})[0].encode())
    s.append(b"{}")
    # An 8-byte data length, then header JSON (mode D).
    text, n = header_json(mixed[:3])
    s.append(struct.pack("<Q", n) + text.encode())
    text, n = header_json([("x", "U16", [3])])
    s.append(struct.pack("<Q", n + 1) + text.encode())
    return s


def discovery_seeds():
    s = []
    one = st_file([("a", "U8", [1]), ("b", "F16", [2])])
    s.append(archive([("model", one, False)]))
    # Shards without an index, in name order; a hidden one and a stray file.
    s1 = st_file([("a0", "U8", [1])])
    s2 = st_file([("b0", "BF16", [2]), ("b1", "F32", [])])
    s.append(archive([("b", s2, False), ("a", s1, False), (".partial", b"junk", False)]))
    # A sharded set the Hugging Face way, with and without metadata.
    sh1 = st_file([("y", "U8", [1])], metadata={"format": "pt"})
    sh2 = st_file([("z", "U8", [2]), ("x", "F4", [2])])
    wm = {"x": "model-00002-of-00002.safetensors", "y": "model-00001-of-00002.safetensors",
          "z": "model-00002-of-00002.safetensors"}
    s.append(archive([("model-00001-of-00002", sh1, False), ("model-00002-of-00002", sh2, False),
                      ("model", index(wm, {"total_size": 4}), True)]))
    s.append(archive([("model", index(wm), True), ("model-00001-of-00002", sh1, False),
                      ("model-00002-of-00002", sh2, False), ("stray", s1, False)]))
    # Another index name; two indexes with the default among them.
    s.append(archive([("pytorch_model", index(wm), True), ("model-00001-of-00002", sh1, False),
                      ("model-00002-of-00002", sh2, False)]))
    s.append(archive([("model", index(wm), True), ("other", b"not json", True),
                      ("model-00001-of-00002", sh1, False), ("model-00002-of-00002", sh2, False)]))
    # Short names, so that mutations can line the names up with weight_map.
    s.append(archive([("a", st_file([("t", "U8", [1])]), False), ("b", st_file([("u", "I8", [2])]), False),
                      ("i", index({"t": "a.safetensors", "u": "b.safetensors"}), True)]))
    # Broken sets: a missing shard, a tensor in two shards, index and shard
    # disagreeing, two indexes and no default.
    s.append(archive([("model", index({"t": "gone.safetensors"}), True)]))
    s.append(archive([("a", st_file([("t", "U8", [1])]), False), ("b", st_file([("t", "U8", [1])]), False)]))
    s.append(archive([("a", st_file([("t", "U8", [1]), ("v", "U8", [1])]), False),
                      ("i", index({"t": "a.safetensors", "u": "a.safetensors"}), True)]))
    s.append(archive([("i", index({"t": "a.safetensors"}), True), ("j", index({"t": "a.safetensors"}), True),
                      ("a", st_file([("t", "U8", [1])]), False)]))
    s.append(archive([]))
    # Index rules: keys twice, wrong types, a shard name that leaves the folder.
    t = st_file([("t", "U8", [1])])
    for text in ('{"weight_map":{"t":"a.safetensors"},"weight_map":{"t":"a.safetensors"}}',
                 '{"metadata":{},"metadata":{},"weight_map":{"t":"a.safetensors"}}',
                 '{"weight_map":["a.safetensors"]}', '{"metadata":"x","weight_map":{"t":"a.safetensors"}}',
                 '{"weight_map":{"t":1}}', '{"weight_map":{"t":"../a.safetensors"}}', '{"weight_map":{}}',
                 '{"weight_map":{"t":"a.safetensors","t":"a.safetensors"}}', '{"weight_map":{"t":"a.safetensors"}} x'):
        s.append(archive([("a", t, False), ("model", text.encode(), True)]))
    return s


def attach_stream(n_fds, descriptors, handles, tensors, counts=None, lease=7, kind="memfd", reply=True):
    """fuzz_attach's input: the memfd count, then the daemon's messages."""
    def line(o):
        return json.dumps(o, separators=(",", ":")).encode() + b"\n"
    out = line({"event": "attach", "id": 1, "lease": lease, "name": "m", "backend": "host", "handle_type": kind,
                "writable": False, "devices": [{"device": 0, "uuid": "host-0"}]})
    if descriptors:
        out += line({"event": "attach", "id": 1, "lease": lease, "descriptors": descriptors})
    if handles:
        out += line({"event": "attach", "id": 1, "lease": lease, "handles": handles})
    if tensors:
        out += line({"event": "attach", "id": 1, "lease": lease, "tensors": tensors})
    c = counts or (len(descriptors), len(handles), len(tensors))
    if reply:
        out += line({"id": 1, "ok": True, "result": {"lease": lease, "name": "m", "handle_type": kind,
                                                      "devices": [{"device": 0, "uuid": "host-0"}],
                                                      "descriptors": c[0], "handles": c[1], "tensors": c[2],
                                                      "parts": sum(len(t["parts"]) for t in tensors), "messages": 4}})
    return bytes([n_fds]) + out


def attach_seeds():
    desc = [{"descriptor": i, "device": 0, "bytes": 65536} for i in range(2)]
    handles = [{"handle": 0, "device": 0, "bytes": 65536,
                "pieces": [{"descriptor": 0, "offset": 0, "bytes": 32768, "at": 0},
                           {"descriptor": 1, "offset": 32768, "bytes": 32768, "at": 32768}]},
               {"handle": 3, "device": 0, "bytes": 8192, "pieces": [{"descriptor": 1, "offset": 0, "bytes": 8192,
                                                                      "at": 0}]}]
    tensors = [{"name": "a", "dtype": "BF16", "shape": [4, 8], "bytes": 64,
                "parts": [{"device": 0, "handle": 0, "offset": 512, "bytes": 64, "tensor_offset": 0}]},
               {"name": "e", "dtype": "U8", "shape": [0], "bytes": 0, "parts": []},
               {"name": "split", "dtype": "F32", "shape": [4, 2], "bytes": 32,
                "parts": [{"device": 0, "handle": 3, "offset": 4096, "bytes": 16, "tensor_offset": 16}]}]
    good = attach_stream(2, desc, handles, tensors)
    s = [good, good[:len(good) // 2], attach_stream(2, desc, handles, tensors, reply=False),
         attach_stream(1, desc, handles, tensors),  # fewer descriptors than listed
         attach_stream(2, desc, handles, tensors, counts=(2, 2, 9)),  # counts that disagree
         attach_stream(0, [], [], [{"name": "e", "dtype": "U8", "shape": [0], "bytes": 0, "parts": []}]),
         attach_stream(2, desc, handles, tensors, kind="cuda-vmm"),
         bytes([0]) + b'{"id":1,"ok":false,"error":{"code":"ENOENT","message":"no model named \\"m\\""}}\n']
    # one rule broken each: a piece past its memfd, a gap, a part past its handle
    bad = json.loads(json.dumps(handles))
    bad[0]["pieces"][1]["offset"] = 65536
    s.append(attach_stream(2, desc, bad, tensors))
    bad = json.loads(json.dumps(handles))
    bad[0]["pieces"][1]["at"] = 36864
    s.append(attach_stream(2, desc, bad, tensors))
    bad = json.loads(json.dumps(tensors))
    bad[0]["parts"][0]["offset"] = 65500
    s.append(attach_stream(2, desc, handles, bad))
    return s


# fuzz_daemon's flags (fuzz_daemon.c): descriptors (count, kind), then how the peer behaves.
D_FDS = lambda n, kind=0: n | kind << 2
D_READS, D_PATIENT, D_READER, D_LINES = 0x10, 0x20, 0x40, 0x80
D_OTHER_UID = 0x80  # in the second byte
D_SLOW = 0x40       # in the second byte
D_ORPHAN = 0x20     # in the second byte: a lease of "m" waits for its worker, token D_TOKEN
D_TOKEN = "0123456789abcdef0123456789abcdef"  # fuzz_daemon.c's FZ_TOKEN
D_ONE = "/tmp/weightd-fuzz/m.safetensors"
D_BIG = "/tmp/weightd-fuzz/big.safetensors"
D_HUGE = "/tmp/weightd-fuzz/huge.safetensors"
D_MOE = "/tmp/weightd-fuzz/moe"
D_MOE_FILES = [D_MOE + "/model.safetensors.index.json", D_MOE + "/model-00001-of-00002.safetensors",
               D_MOE + "/model-00002-of-00002.safetensors"]


def daemon_input(flags, requests, fd_line=0, hello=True):
    """flags, the line the descriptors ride on, then the requests: (op, args)
    pairs numbered from 2 after a hello (id 1), or raw lines (str/bytes)."""
    lines = []
    if hello:
        lines.append(json.dumps({"id": 1, "op": "hello", "args": {"version": "1.0"}}, separators=(",", ":")))
    for i, r in enumerate(requests):
        if isinstance(r, tuple):
            msg = {"id": i + 2, "op": r[0]}
            if r[1] is not None:
                msg["args"] = r[1]
            lines.append(json.dumps(msg, separators=(",", ":")))
        else:
            lines.append(r)
    body = b"".join((l.encode() if isinstance(l, str) else l) + b"\n" for l in lines)
    return bytes([flags, fd_line]) + body


def daemon_seeds():
    RP = D_READS | D_PATIENT
    s = []
    # hello alone, and hello's refusals
    s.append(daemon_input(RP, []))
    s.append(daemon_input(RP, [("hello", {"version": "2.0"}), ("hello", {"version": "x"}), ("hello", {}),
                               ("hello", {"version": 1}), ("hello", None)], hello=False))
    s.append(daemon_input(RP, [("list", None), '{"id":3,"op":"hello","args":{"version":"1.9"}}', ("list", None)],
                          hello=False))
    # load: a path the daemon opens, then everything on the new model
    s.append(daemon_input(RP | D_LINES, [("load", {"path": D_ONE, "name": "m2", "events": True}), ("list", None),
                                         ("info", {"name": "m2"}), ("verify", {"name": "m2"}),
                                         ("verify", {"name": "m2", "quick": True}), ("unload", {"name": "m2"})]))
    s.append(daemon_input(RP, [("load", {"path": D_MOE, "name": "moe2", "devices": [1, 0],
                                         "placement": "expert-parallel"}),
                               ("load", {"path": D_MOE + "/model.safetensors.index.json", "device": "host-1"}),
                               ("load", {"path": D_ONE, "device": 1})]))
    # load with its files' descriptors
    s.append(daemon_input(RP | D_FDS(1), [("load", {"path": D_ONE, "name": "mf", "files": [D_ONE]})], fd_line=1))
    s.append(daemon_input(RP | D_FDS(3), [("load", {"path": D_MOE, "name": "moef", "files": D_MOE_FILES,
                                                    "devices": [0, 1], "placement": "expert-parallel",
                                                    "events": True}),
                                          ("verify", {"name": "moef"})], fd_line=1))
    s.append(daemon_input(RP | D_FDS(1, 2), [("load", {"path": D_ONE, "name": "pipe", "files": [D_ONE]})],
                          fd_line=1))
    s.append(daemon_input(RP | D_FDS(3, 3), [("load", {"path": D_ONE, "name": "mix", "files": [D_ONE, "/a", "/b"]})],
                          fd_line=1))
    s.append(daemon_input(RP | D_FDS(2, 1), [("load", {"path": D_ONE, "name": "two", "files": [D_ONE]}),
                                             ("list", None)], fd_line=1))
    # load's refusals
    s.append(daemon_input(RP, [("load", {"path": "/tmp/weightd-fuzz/nope"}), ("load", {"path": "relative"}),
                               ("load", {"path": D_ONE, "name": "m"}), ("load", {"path": D_ONE, "name": "-x"}),
                               ("load", {"path": D_ONE, "device": 0, "devices": [0]}),
                               ("load", {"path": D_ONE, "devices": [0, 0]}),
                               ("load", {"path": D_ONE, "devices": [7]}), ("load", {"path": D_ONE, "devices": []}),
                               ("load", {"path": D_ONE, "placement": "sideways"}),
                               ("load", {"path": D_ONE, "files": "x"}), ("load", {"path": D_ONE, "files": [D_ONE]})]))
    # a load its client leaves: cancelled
    s.append(daemon_input(D_READS, [("load", {"path": D_MOE, "name": "gone"}), ("attach", {"name": "gone"}),
                                    ("info", {"name": "gone"}), ("unload", {"name": "gone"}), ("stats", None)]))
    # unload, plain and forced, with a lease held
    s.append(daemon_input(RP, [("unload", {"name": "m"}), ("list", None), ("unload", {"name": "m"})]))
    s.append(daemon_input(RP | D_LINES, [("attach", {"name": "m"}), ("unload", {"name": "m"}),
                                         ("unload", {"name": "m", "force": True, "wait": 0}),
                                         ("detach", {"lease": 1}), ("list", None)]))
    s.append(daemon_input(RP | D_LINES, [("attach", {"name": "moe"}),
                                         ("unload", {"name": "moe", "force": True, "wait": 1}),
                                         ("unload", {"name": "moe"}), ("attach", {"name": "moe"}),
                                         ("detach", {"lease": 1})]))
    s.append(daemon_input(RP, [("attach", {"name": "m"}), ("unload", {"name": "m", "force": True, "wait": 0})]))
    # verify, both kinds, and an unload that cancels one
    s.append(daemon_input(RP, [("verify", {"name": "m"}), ("verify", {"name": "moe", "quick": True}),
                               ("verify", {"name": "moe", "events": True}), ("verify", {"name": "nope"})]))
    s.append(daemon_input(RP, [("verify", {"name": "m"}), ("verify", {"name": "m"}), ("unload", {"name": "m"})]))
    # sleep and wake: alone, with the connection's own lease (it answers with
    # slept, or does not and the sleep waits), discard, wrong states and arguments
    s.append(daemon_input(RP, [("sleep", {"name": "m"}), ("list", None), ("wake", {"name": "m"}),
                               ("verify", {"name": "m", "quick": True}), ("sleep", {"name": "moe", "mode": "discard"}),
                               ("sleep", {"name": "moe"}), ("wake", {"name": "moe"}), ("wake", {"name": "moe"})]))
    s.append(daemon_input(RP | D_LINES, [("attach", {"name": "m"}), ("sleep", {"name": "m"}), ("slept", {"lease": 1}),
                                         ("list", None), ("wake", {"name": "m"}), ("detach", {"lease": 1})]))
    s.append(daemon_input(RP, [("attach", {"name": "moe"}), ("sleep", {"name": "moe", "force": True}),
                               ("slept", {"lease": 7}), ("unload", {"name": "moe", "keep_cached": True})]))
    s.append(daemon_input(RP, [("sleep", {"name": "m", "mode": "elsewhere"}), ("sleep", {"name": "nope"}),
                               ("wake", {"name": "m"}), ("slept", {"lease": 1}), ("sleep", {"name": "m"}),
                               ("attach", {"name": "m"}), ("info", {"name": "m"}), ("unload", {"name": "m"})]))
    s.append(daemon_input(RP | D_READER, [("sleep", {"name": "m"}), ("wake", {"name": "m"}), ("slept", {"lease": 1})]))
    # list and info, paged
    s.append(daemon_input(RP, [("list", None), ("list", {"offset": 1, "limit": 1}), ("list", {"offset": 9}),
                               ("info", {"name": "m"}), ("info", {"name": "moe", "offset": 2, "limit": 3}),
                               ("info", {"name": "moe", "offset": 100}), ("info", {"name": "nope"})]))
    # attach, detach, leases
    s.append(daemon_input(RP, [("attach", {"name": "m"}), ("attach", {"name": "moe", "device": 1}),
                               ("attach", {"name": "moe", "device": "host-0"}),
                               ("attach", {"name": "moe", "writable": True}), ("attach", {"name": "m", "device": 1}),
                               ("leases", None), ("list", None), ("info", {"name": "moe"}),
                               ("detach", {"lease": 2}), ("detach", {"lease": 2}), ("detach", {"lease": 99}),
                               ("leases", {"offset": 1})]))
    s.append(daemon_input(D_PATIENT, [("attach", {"name": "moe"})] * 8 + [("leases", None)]))
    # the lease bounds of the harness: 8 a connection, 6 a user (a reader's)
    s.append(daemon_input(RP, [("attach", {"name": "m"})] * 9 + [("detach", {"lease": 3}), ("attach", {"name": "m"}),
                                                                   ("leases", None)]))
    s.append(daemon_input(RP | D_READER, [("attach", {"name": "moe", "device": 0})] * 7 + [("leases", None)]))
    # reattach: a lease that waits for its worker after a restart, taken by
    # its token; by another user; past the bound; never taken
    orphan = lambda flags, reqs: bytes([flags, D_ORPHAN]) + daemon_input(0, reqs)[2:]
    s.append(orphan(RP, [("leases", None), ("reattach", {"token": D_TOKEN}), ("leases", None), ("info", {"name": "m"}),
                         ("reattach", {"token": D_TOKEN}), ("unload", {"name": "m"}), ("detach", {"lease": 1}),
                         ("reattach", {"token": D_TOKEN}), ("list", None)]))
    s.append(orphan(RP, [("unload", {"name": "m"}), ("leases", None),
                         ("unload", {"name": "m", "force": True, "wait": 0}), ("reattach", {"token": D_TOKEN})]))
    s.append(orphan(RP | D_READER, [("reattach", {"token": D_TOKEN}), ("leases", None), ("list", None)]))
    s.append(orphan(RP, [("attach", {"name": "moe"})] * 8 + [("reattach", {"token": D_TOKEN}), ("detach", {"lease": 2}),
                                                             ("reattach", {"token": D_TOKEN}), ("leases", None)]))
    s.append(orphan(RP | D_LINES, [("reattach", {"token": D_TOKEN}), ("unload", {"name": "m", "force": True}),
                                   ("list", None)]))
    s.append(orphan(RP, [("reattach", {"token": D_TOKEN}), ("shutdown", None)]))
    s.append(orphan(RP, [("shutdown", None)]))
    s.append(orphan(RP, [("reattach", {"token": t}) for t in ("", D_TOKEN[:31], D_TOKEN + "0", D_TOKEN.upper(),
                                                              "g" * 32, D_TOKEN[:16] + "\u0000" + D_TOKEN[16:])]))
    # stats, policy, snapshot
    s.append(daemon_input(RP, [("stats", None), ("stats", {"jobs_offset": 3})]))
    s.append(daemon_input(RP, [("policy", None), ("policy", {"conf": "max_split_size_mb:64"}),
                               ("policy", {"conf": "garbage_collection_threshold:0.5,roundup_power2_divisions:4"}),
                               ("policy", {"conf": "expandable_segments:True"}), ("policy", {"conf": "default"}),
                               ("policy", {"conf": "nonsense:1"}), ("stats", None)]))
    s.append(daemon_input(RP, [("snapshot", None), ("snapshot", {"device": 1}),
                               ("snapshot", {"device": 0, "segment": 1, "block": 1}), ("snapshot", {"device": 5})]))
    # shutdown: the harness starts the daemon again
    s.append(daemon_input(RP, [("shutdown", None)]))
    s.append(daemon_input(D_READS, [("verify", {"name": "moe"}), ("load", {"path": D_ONE, "name": "late"}),
                                    ("attach", {"name": "m"}), ("shutdown", {}), ("list", None)]))
    # a reader: refusals, and what it may do
    s.append(daemon_input(RP | D_READER, [("load", {"path": D_ONE, "name": "r"}), ("unload", {"name": "m"}),
                                          ("verify", {"name": "m"}), ("policy", {"conf": "max_split_size_mb:64"}),
                                          ("snapshot", None), ("shutdown", None),
                                          ("attach", {"name": "m", "writable": True}), ("attach", {"name": "m"}),
                                          ("leases", None), ("list", None), ("policy", None)]))
    s.append(daemon_input(RP | D_READER | D_FDS(1), [("load", {"path": D_ONE, "name": "rf", "files": [D_ONE]})],
                          fd_line=1))
    # wrong types, op by op
    bad = [1, "x", True, None, [], {}, -1, 1.5, 1e300]
    for op, keys in [("load", ["path", "name", "device", "devices", "placement", "files", "events"]),
                     ("unload", ["name", "force", "wait"]), ("verify", ["name", "quick"]),
                     ("list", ["offset", "limit"]), ("info", ["name", "offset", "limit"]),
                     ("attach", ["name", "device", "writable"]), ("detach", ["lease"]), ("reattach", ["token"]),
                     ("leases", ["offset"]),
                     ("stats", ["jobs_offset"]), ("policy", ["conf"]),
                     ("snapshot", ["device", "segment", "block"]), ("shutdown", ["now"])]:
        reqs = []
        for k in keys:
            for v in bad[:5] if k not in ("name", "path", "token") else [1, True, [], {}, "", "\u00e9" * 3]:
                base = {"name": "m"} if k != "name" and op in ("unload", "verify", "info", "attach") else {}
                if op == "load" and k != "path":
                    base = {"path": D_ONE}
                base[k] = v
                reqs.append((op, base))
        s.append(daemon_input(RP, reqs))
    # bad frames: before hello, unknown op, broken JSON, odd ids, args not an object
    s.append(daemon_input(RP, [("list", None)] +
                          ['{"id":2,"op":"frobnicate"}', '{"id":[1],"op":"list"}', '{"id":1e20,"op":"list"}',
                           '{"id":"' + "i" * 200 + '","op":"list"}', '{"op":"list","args":[]}', "not json",
                           '{"id":3,"op":"list\\u0000x"}', b'{"id":4,"op":"list","args":{"name":"\xff"}}',
                           "", "   ", '{"id":5,"op":"hello","args":{"version":"1.0"}}', '{"id":6,"op":"list"}'],
                          hello=False))
    # a peer that does not read its replies
    s.append(daemon_input(0, [("info", {"name": "moe"})] * 40 + [("attach", {"name": "moe"})] * 10))
    # descriptors on a request that takes none
    s.append(daemon_input(RP | D_FDS(2, 1), [("list", None), ("stats", None)], fd_line=1))
    # the 16 MiB checkpoint: slabs allocated beside the reads; the huge one,
    # whose second slab (300 MiB) fails while the first one's reads run
    s.append(daemon_input(RP | D_LINES, [("load", {"path": D_BIG, "devices": [0, 1], "events": True}),
                                         ("info", {"name": "big"}), ("verify", {"name": "big", "quick": True}),
                                         ("attach", {"name": "big", "device": 1}), ("stats", None),
                                         ("unload", {"name": "big", "force": True, "wait": 0}),
                                         ("detach", {"lease": 1})]))
    s.append(daemon_input(RP | D_LINES, [("load", {"path": D_HUGE, "events": True}), ("stats", None),
                                         ("load", {"path": D_BIG, "device": 1, "events": True}),
                                         ("verify", {"name": "big"})]))
    s.append(daemon_input(D_READS, [("load", {"path": D_BIG, "events": True}), ("stats", None),
                                    ("policy", {"conf": "max_split_size_mb:64"}), ("attach", {"name": "big"})]))
    # the wide model (1200 tensors): info's pages
    s.append(daemon_input(RP, [("info", {"name": "wide"}), ("info", {"name": "wide", "offset": 1000}),
                               ("info", {"name": "wide", "limit": 100000}), ("list", None)]))
    s.append(bytes([RP | D_LINES, D_SLOW]) + daemon_input(0, [("info", {"name": "wide"})] * 3 +
                                                        [("attach", {"name": "wide"}), ("leases", None)])[2:])
    # more replies than the socket holds (the daemon pauses the connection,
    # then resumes it); more lasting requests than a connection may have in
    # flight (64). (The same replies to a peer that reads only after it has
    # shut down its side are cut: tests/fuzz/findings/daemon/.)
    s.append(daemon_input(D_READS, [("info", {"name": "wide"})] * 12 + [("list", None)]))
    s.append(daemon_input(D_READS, [("verify", {"name": "m", "quick": True})] * 66 + [("stats", None)]))
    # an administrator by --admin-uids that is not the daemon's user
    s.append(bytes([RP, D_OTHER_UID]) + daemon_input(0, [("load", {"path": D_ONE, "name": "o"}),
                                                         ("attach", {"name": "m", "writable": True}),
                                                         ("leases", None), ("snapshot", None)])[2:])
    s.append(bytes([RP | D_FDS(1), D_OTHER_UID | 1]) +
             daemon_input(0, [("load", {"path": D_ONE, "name": "of", "files": [D_ONE]}),
                              ("attach", {"name": "of"}), ("leases", None)])[2:])
    return s


def write(out, kind, seeds):
    d = os.path.join(out, kind)
    os.makedirs(d, exist_ok=True)
    new = 0
    for data in seeds:
        path = os.path.join(d, hashlib.sha1(data).hexdigest())
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            new += 1
    print("%s: %d seeds, %d new" % (d, len(seeds), new))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "corpus"))
    a = ap.parse_args()
    write(a.out, "header", header_seeds())
    write(a.out, "discovery", discovery_seeds())
    write(a.out, "attach", attach_seeds())
    write(a.out, "daemon", daemon_seeds())


if __name__ == "__main__":
    main()
