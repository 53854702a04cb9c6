"""Checkpoint parsing that never trusts its input, seen from `weightctl inspect`.

1. A malformed-file corpus, generated at test time: one file (or folder) for
   every validation rule of loader/safetensors.h and loader/checkpoint.c.
   Each must make `weightctl inspect` exit 1 with one line on stderr that
   names the file (and the tensor, where one is involved) and the rule; and
   `--json inspect` must print {"ok": false, "error": {...}} with the same
   message. No sanitizer report anywhere (the harness checks every run).
2. The edge cases the format allows (empty and 0-dim tensors, no tensors,
   metadata, every dtype) are accepted, with the right counts.
3. Regressions for what the fuzzers found: messages stay one line of valid
   UTF-8 whatever names the files hold.
4. The fuzz corpora (tests/fuzz/corpus/*/ and tests/fuzz/regressions/*/)
   replayed through `weightctl inspect`: exit 0 or 1, never a crash, a
   sanitizer report or a hang. Under `make test SANITIZE=address,undefined`
   this replays them under ASan and UBSan.
5. fuzz_attach's corpus replayed into `weightctl attach`: each input is what
   the peer at the socket sends a worker that attaches (a hostile daemon,
   or whatever listens there), with its memfds; the same verdicts.
"""

import array
import concurrent.futures
import hashlib
import importlib.util
import json
import os
import socket
import struct
import threading

from . import harness as h
from .harness import st_image

FUZZ_DIR = os.path.join(h.REPO, "tests", "fuzz")

DTYPES = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

# ---- writing files -----------------------------------------------------------


def tensors(*specs):
    """specs: (name, dtype, shape) laid out in order -> (header dict, data)."""
    hdr, off = {}, 0
    for name, dtype, shape in specs:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * DTYPES[dtype] // 8
        hdr[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    return hdr, bytes(i & 0xFF for i in range(off))


def entry(dtype="U8", shape=(1,), offsets=(0, 1)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


def shard(*names):
    """A valid shard holding one U8 tensor of each name."""
    hdr, data = tensors(*[(n, "U8", [1]) for n in names])
    return st_image(hdr, data)


def index(weight_map, **extra):
    obj = dict(extra)
    obj["weight_map"] = weight_map
    return json.dumps(obj, indent=2)


# ---- the fuzz_discovery archive format (tests/fuzz/fuzz_discovery.c) --------

NAME_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789._-"
MAX_FILES = 8
MAX_NAME = 32
SHARD_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"


def unpack_archive(data):
    """{file name: bytes}, exactly as fuzz_discovery.c's unpack() reads it."""
    files, i = {}, 0
    for _ in range(MAX_FILES):
        if len(data) - i < 4:
            break
        is_index = data[i] & 1
        nl = data[i + 1] % (MAX_NAME + 1)
        i += 2
        if len(data) - i < nl + 2:
            break
        name = bytes(c if c in NAME_CHARS else NAME_CHARS[c % len(NAME_CHARS)] for c in data[i:i + nl]).decode()
        i += nl
        suffix = INDEX_SUFFIX if is_index else SHARD_SUFFIX
        if not name.endswith(suffix):
            name += suffix
        dl = min(data[i] | data[i + 1] << 8, len(data) - i - 2)
        i += 2
        files[name] = data[i:i + dl]
        i += dl
    return files


def corpus_files(kind):
    """Every input of one harness: its committed corpus and regressions."""
    out = []
    for top in ("corpus", "regressions"):
        d = os.path.join(FUZZ_DIR, top, kind)
        if os.path.isdir(d):
            out += sorted(os.path.join(d, f) for f in os.listdir(d)
                          if os.path.isfile(os.path.join(d, f)) and not f.startswith("."))
    return out


# ---- the rules ----------------------------------------------------------------
#
# Each case: name -> (files, path, code, fragments). files maps a relative
# path to its bytes; path is what inspect gets (relative, "" for the folder);
# fragments must all be in the message, "{d}" standing for the folder.

L = struct.pack("<Q", 100000001)
U64_PLUS_1 = 18446744073709551616

ONE = "x.safetensors"


def _f(header, data=b"", fragments=(), pad=True, code="EBADMSG"):
    return ({ONE: st_image(header, data, pad)}, ONE, code, ["{d}/" + ONE] + list(fragments))


HEADER_RULES = {
    # the 8-byte prefix
    "header_length_over_limit": ({ONE: L + b"{}"}, ONE, "EBADMSG",
                                 ["{d}/" + ONE, "header length 100000001 is over the limit of 100000000"]),
    "header_length_past_end": ({ONE: struct.pack("<Q", 100) + b"{}"}, ONE, "EBADMSG",
                               ["{d}/" + ONE, "header length 100 runs past the end of the file (10 bytes)"]),
    "file_shorter_than_8_bytes": ({ONE: b"\x02\x00\x00"}, ONE, "EBADMSG",
                                  ["{d}/" + ONE, "file is 3 bytes, too short for the 8-byte header length"]),
    "empty_file": ({ONE: b""}, ONE, "EBADMSG", ["{d}/" + ONE, "file is 0 bytes, too short"]),
    "header_empty": ({ONE: struct.pack("<Q", 0)}, ONE, "EBADMSG", ["{d}/" + ONE, "header is empty"]),
    # the header text
    "header_not_utf8": _f(b'{"caf\xe9": 1}', fragments=["not valid UTF-8", "byte 0xe9 at offset 5"]),
    "header_overlong_utf8": _f(b'{"\xc0\xaf": 1}', fragments=["not valid UTF-8"]),
    "header_not_json": _f('{"w": }', fragments=["not valid JSON"]),
    "header_not_json_token": _f('{"w": nope}', fragments=["not valid JSON: bad literal"]),
    "header_not_json_unclosed": _f('{"w": {"dtype": "U8"', fragments=["not valid JSON: the object is not closed"]),
    "header_json_array": _f("[1, 2]", fragments=["does not start with '{'"]),
    "header_json_string": _f('"{}"', fragments=["does not start with '{'"]),
    "header_leading_blank": _f(' {}', fragments=["does not start with '{'"]),
    "trailing_bytes_after_object": _f('{} x', fragments=["byte 0x78 at offset 3 after the JSON object"]),
    "trailing_second_object": _f('{}{}', fragments=["after the JSON object"]),
    "raw_control_byte_in_string": _f('{"a\tb": 1}', fragments=["raw control byte 0x09"]),
    "lone_surrogate": _f('{"\\udc00": 1}', fragments=["lone UTF-16 low surrogate"]),
    "bad_escape": _f('{"\\q": 1}', fragments=["unknown escape"]),
    "number_not_json": _f('{"w": {"dtype": "U8", "shape": [01], "data_offsets": [0, 1]}}', b"a",
                          fragments=["malformed number"]),
    "number_too_long": _f('{"w": {"dtype": "U8", "shape": [%s], "data_offsets": [0, 1]}}' % ("1" * 70), b"a",
                          fragments=["longer than 63 characters"]),
    # tensor entries
    "entry_not_object": _f({"w": [1]}, fragments=['tensor "w": entry is an array, not an object']),
    "missing_dtype": _f({"w": {"shape": [1], "data_offsets": [0, 1]}}, b"a",
                        fragments=['tensor "w": missing field "dtype"']),
    "missing_shape": _f({"w": {"dtype": "U8", "data_offsets": [0, 1]}}, b"a",
                        fragments=['tensor "w": missing field "shape"']),
    "missing_data_offsets": _f({"w": {"dtype": "U8", "shape": [1]}}, b"a",
                               fragments=['tensor "w": missing field "data_offsets"']),
    "unknown_field": _f({"w": dict(entry(), extra=1)}, b"a", fragments=['tensor "w": unknown field "extra"']),
    "field_twice": _f('{"w": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"a",
                      fragments=['tensor "w": field "dtype" appears twice']),
    "dtype_a_number": _f({"w": dict(entry(), dtype=8)}, b"a",
                         fragments=['tensor "w": "dtype" is a number, not a string']),
    "shape_a_string": _f({"w": dict(entry(), shape="1")}, b"a",
                         fragments=['tensor "w": "shape" is a string, not an array']),
    "data_offsets_a_number": _f({"w": dict(entry(), data_offsets=1)}, b"a",
                                fragments=['tensor "w": "data_offsets" is a number, not an array of 2 integers']),
    "data_offsets_3_entries": _f({"w": entry(offsets=(0, 1, 1))}, b"a",
                                 fragments=['tensor "w": "data_offsets" has 3 elements, not 2']),
    "float_dim": _f({"w": entry(shape=(1.0,))}, b"a",
                    fragments=['tensor "w": shape[0] is 1.0, not a non-negative integer']),
    "exponent_dim": _f('{"w": {"dtype": "U8", "shape": [1e0], "data_offsets": [0, 1]}}', b"a",
                       fragments=['tensor "w": shape[0] is 1e0, not a non-negative integer']),
    "negative_dim": _f({"w": entry(shape=(-1,))}, b"a",
                       fragments=['tensor "w": shape[0] is -1, not a non-negative integer']),
    "dim_beyond_2_64": _f({"w": entry(shape=(U64_PLUS_1,))}, b"a",
                          fragments=['tensor "w": shape[0] is 18446744073709551616, past 2^64-1']),
    "dim_a_string": _f({"w": entry(shape=("1",))}, b"a",
                       fragments=['tensor "w": shape[0] is a string, not a non-negative integer']),
    "float_offset": _f({"w": entry(offsets=(0, 1.5))}, b"a",
                       fragments=['tensor "w": data_offsets[1] is 1.5, not a non-negative integer']),
    "offset_beyond_2_64": _f({"w": entry(offsets=(0, U64_PLUS_1))}, b"a",
                             fragments=['tensor "w": data_offsets[1] is 18446744073709551616, past 2^64-1']),
    "unknown_dtype": _f({"w": entry(dtype="F128")}, b"a", fragments=['tensor "w": unknown dtype "F128"']),
    "dtype_wrong_case": _f({"w": entry(dtype="bf16", shape=(1,), offsets=(0, 2))}, b"ab",
                           fragments=['tensor "w": unknown dtype "bf16"']),
    "f4_odd_count": _f({"w": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, b"ab",
                       fragments=['tensor "w": shape [3] x F4 is 12 bits, not a whole number of bytes']),
    "f6_not_whole_bytes": _f({"w": entry(dtype="F6_E2M3", shape=(2,), offsets=(0, 2))}, b"ab",
                             fragments=['tensor "w": shape [2] x F6_E2M3 is 12 bits, not a whole number']),
    "shape_overflows_elements": _f({"w": entry(shape=(1 << 32, 1 << 32))}, b"a",
                                   fragments=['tensor "w": shape [4294967296, 4294967296] has more than 2^64-1 '
                                              'elements']),
    "shape_overflows_bits": _f({"w": entry(dtype="F64", shape=(1 << 61,))}, b"a",
                               fragments=['tensor "w": shape [2305843009213693952] x F64 is more than 2^64-1 bits']),
    "size_mismatch": _f({"w": entry(shape=(2,), offsets=(0, 3))}, b"abc",
                        fragments=['tensor "w": data_offsets [0, 3] hold 3 bytes but shape [2] x U8 needs 2']),
    "end_before_begin": _f({"w": entry(offsets=(2, 1))}, b"ab",
                           fragments=['tensor "w": data_offsets [2, 1] end before they begin']),
    # the layout of the data
    "gap_between_tensors": _f({"a": entry(), "b": entry(offsets=(2, 3))}, b"abc",
                              fragments=['tensor "b": data_offsets [2, 3] leave a gap of 1 bytes after tensor "a", '
                                         'which ends at 1']),
    "overlapping_tensors": _f({"a": entry(shape=(2,), offsets=(0, 2)), "b": entry(shape=(2,), offsets=(1, 3))},
                              b"abc", fragments=['tensor "b": data_offsets [1, 3] overlap tensor "a" [0, 2]']),
    "not_starting_at_0": _f({"w": entry(offsets=(1, 2))}, b"ab",
                            fragments=['tensor "w": data_offsets [1, 2] leave a gap of 1 bytes at the start']),
    "data_shorter_than_header_says": _f({"w": entry(shape=(4,), offsets=(0, 4))}, b"ab",
                                        fragments=["data section is 2 bytes but the tensors need 4 (truncated file?)"]),
    "bytes_after_last_tensor": _f({"w": entry()}, b"abc",
                                  fragments=['2 bytes follow the last tensor "w", which ends at 1']),
    "data_but_no_tensors": _f({}, b"abc", fragments=["data section is 3 bytes but the header lists no tensors"]),
    # names and metadata
    "duplicate_tensor_names": _f('{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                                 '"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"ab",
                                 fragments=['tensor "w" appears twice in the header']),
    "nul_in_name": _f('{"w\\u0000x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"a",
                      fragments=['string starting "w" at byte 1 contains an escaped NUL (\\u0000)']),
    "nul_in_metadata": _f('{"__metadata__": {"k": "v\\u0000"}}', fragments=["escaped NUL"]),
    "metadata_value_not_string": _f({"__metadata__": {"k": 1}},
                                    fragments=['"__metadata__": the value of "k" is a number, not a string']),
    "metadata_value_null": _f({"__metadata__": {"k": None}},
                              fragments=['"__metadata__": the value of "k" is null, not a string']),
    "metadata_not_object": _f({"__metadata__": ["k"]},
                              fragments=['"__metadata__" is an array, not an object of strings']),
    "metadata_key_twice": _f('{"__metadata__": {"k": "a", "k": "b"}}',
                             fragments=['"__metadata__": key "k" appears twice']),
    "metadata_twice": _f('{"__metadata__": {}, "__metadata__": {}}', fragments=['"__metadata__" appears twice']),
}

IDX = "model.safetensors.index.json"

DISCOVERY_RULES = {
    "index_names_missing_shard": ({IDX: index({"w": "gone.safetensors"})}, "", "ENOENT",
                                  ["index {d}/" + IDX, 'shard {d}/gone.safetensors (of tensor "w") is missing']),
    "index_tensor_absent_from_shard": ({"a.safetensors": shard("w"), IDX: index({"w": "a.safetensors",
                                                                               "v": "a.safetensors"})},
                                       "", "EBADMSG",
                                       ["index {d}/" + IDX, 'tensor "v" is absent from its shard {d}/a.safetensors']),
    "shard_tensor_absent_from_index": ({"a.safetensors": shard("w", "v"), IDX: index({"w": "a.safetensors"})},
                                       "", "EBADMSG",
                                       ["index {d}/" + IDX, 'tensor "v" is in shard {d}/a.safetensors but not in the '
                                                            'index']),
    "tensor_mapped_to_other_shard": ({"a.safetensors": shard("w"), "b.safetensors": shard("v"),
                                      IDX: index({"w": "b.safetensors", "v": "a.safetensors"})},
                                     "", "EBADMSG",
                                     ['tensor "v" is mapped to {d}/a.safetensors but is in {d}/b.safetensors']),
    "same_tensor_in_two_shards_with_index": ({"a.safetensors": shard("w"), "b.safetensors": shard("v", "w"),
                                              IDX: index({"w": "a.safetensors", "v": "b.safetensors"})},
                                             "", "EBADMSG",
                                             ['tensor "w" is in two shards: {d}/a.safetensors and {d}/b.safetensors']),
    "same_tensor_in_two_shards": ({"a.safetensors": shard("w"), "b.safetensors": shard("w")}, "", "EBADMSG",
                                  ['tensor "w" is in two shards: {d}/a.safetensors and {d}/b.safetensors']),
    "index_not_json": ({IDX: '{"weight_map": }'}, "", "EBADMSG", ["index {d}/" + IDX, "not valid JSON"]),
    "index_not_an_object": ({IDX: '["weight_map"]'}, "", "EBADMSG",
                            ["index {d}/" + IDX, "not a JSON object (starts with '[' at byte 0)"]),
    "index_not_utf8": ({IDX: b'{"weight_map": {"\xff": "a.safetensors"}}'}, "", "EBADMSG",
                       ["index {d}/" + IDX, "not valid UTF-8"]),
    "index_trailing_data": ({IDX: index({"w": "a.safetensors"}) + " x"}, "", "EBADMSG",
                            ["index {d}/" + IDX, "data after the JSON object"]),
    "index_without_weight_map": ({IDX: '{"metadata": {}}'}, "", "EBADMSG", ["index {d}/" + IDX, 'no "weight_map"']),
    "index_weight_map_not_object": ({IDX: '{"weight_map": ["a.safetensors"]}'}, "", "EBADMSG",
                                    ["index {d}/" + IDX, '"weight_map" is not an object']),
    "index_weight_map_empty": ({IDX: '{"weight_map": {}}'}, "", "EBADMSG",
                               ["index {d}/" + IDX, '"weight_map" is empty']),
    "index_weight_map_twice": ({IDX: '{"weight_map": {"w": "a.safetensors"}, "weight_map": {"w": "a.safetensors"}}'},
                               "", "EBADMSG", ["index {d}/" + IDX, '"weight_map" appears twice']),
    "index_metadata_not_object": ({IDX: index({"w": "a.safetensors"}, metadata=[1])}, "", "EBADMSG",
                                  ["index {d}/" + IDX, '"metadata" is not an object']),
    "index_value_not_string": ({IDX: index({"w": 1})}, "", "EBADMSG",
                               ["index {d}/" + IDX, 'weight_map: tensor "w" maps to a non-string']),
    "index_shard_name_with_slash": ({IDX: index({"w": "sub/a.safetensors"}), "sub/a.safetensors": shard("w")},
                                    "", "EBADMSG",
                                    ["index {d}/" + IDX, 'tensor "w" maps to "sub/a.safetensors", not a file name in '
                                                         "the index's folder"]),
    "index_shard_name_dotdot": ({IDX: index({"w": ".."})}, "", "EBADMSG",
                                ["index {d}/" + IDX, 'tensor "w" maps to "..", not a file name']),
    "index_tensor_twice": ({IDX: '{"weight_map": {"w": "a.safetensors", "w": "a.safetensors"}}'}, "", "EBADMSG",
                           ["index {d}/" + IDX, 'weight_map: tensor "w" appears twice']),
    "index_shard_invalid": ({IDX: index({"w": "a.safetensors"}), "a.safetensors": b"\x01"}, "", "EBADMSG",
                            ["{d}/a.safetensors: file is 1 bytes, too short"]),
    "two_index_files": ({"a.safetensors.index.json": index({"w": "s.safetensors"}),
                         "b.safetensors.index.json": index({"w": "s.safetensors"}), "s.safetensors": shard("w")},
                        "", "EBADMSG",
                        ["{d}: 2 index files and none is model.safetensors.index.json; name one of: "
                         "a.safetensors.index.json, b.safetensors.index.json"]),
    "empty_directory": ({}, "", "ENOENT", ["{d}: no *.safetensors files and no index"]),
    "directory_of_other_files": ({"config.json": "{}", ".hidden.safetensors": shard("w")}, "", "ENOENT",
                                 ["{d}: no *.safetensors files and no index"]),
    "directory_with_bad_shard": ({"a.safetensors": shard("w"), "b.safetensors": st_image({"v": entry()}, b"")},
                                 "", "EBADMSG",
                                 ["{d}/b.safetensors: data section is 0 bytes but the tensors need 1"]),
    "index_given_directly_names_missing_shard": ({"other.json": index({"w": "gone.safetensors"})}, "other.json",
                                                 "ENOENT", ["index {d}/other.json", "{d}/gone.safetensors",
                                                            '(of tensor "w") is missing']),
    "missing_path": ({}, "nothing.safetensors", "ENOENT", ["{d}/nothing.safetensors"]),
}


class CorpusCase(h.E2ETestCase):
    """Writes a case's files and checks what inspect says about them."""

    def materialise(self, files, rel):
        """The files in a fresh folder; returns (folder, path to inspect)."""
        self._cases = getattr(self, "_cases", 0) + 1
        d = os.path.join(self.tmp, "ckpt%d" % self._cases)
        os.makedirs(d)
        for name, data in files.items():
            write(os.path.join(d, name), data)
        return d, os.path.join(d, rel) if rel else d

    def check_refused(self, files, rel, code, fragments):
        d, path = self.materialise(files, rel)
        want = [f.replace("{d}", d) for f in fragments]
        r = h.run_ctl(None, "inspect", path, timeout=h.T(10))
        self.assertEqual(r.rc, 1, r)
        self.assertEqual(r.out, "", r)
        self.assertTrue(r.err.startswith("weightctl: inspect: "), r)
        self.assertTrue(r.err.endswith("\n") and r.err.count("\n") == 1, "one line: %r" % r.err)
        for w in want:
            self.assertIn(w, r.err)
        j = h.run_ctl(None, "inspect", path, json_mode=True, timeout=h.T(10))
        err = self.assertJsonError(j, code)
        self.assertEqual(set(j.json), {"ok", "error"}, j)
        for w in want:
            self.assertIn(w, err["message"])
        self.assertEqual("weightctl: inspect: %s\n" % err["message"], r.err)
        # valid UTF-8 (the harness decodes with errors="replace")
        self.assertNotIn("\ufffd", r.err + j.out, "not valid UTF-8")
        return r, j


def _rule_test(case):
    files, rel, code, fragments = case

    def test(self):
        self.check_refused(files, rel, code, fragments)
    return test


class HeaderRules(CorpusCase):
    """One file for every rule of the safetensors header (safetensors.h)."""


class DiscoveryRules(CorpusCase):
    """One folder or index for every rule of checkpoint discovery (checkpoint.c)."""


for _name, _case in HEADER_RULES.items():
    setattr(HeaderRules, "test_" + _name, _rule_test(_case))
for _name, _case in DISCOVERY_RULES.items():
    setattr(DiscoveryRules, "test_" + _name, _rule_test(_case))


class ValidEdgeCases(CorpusCase):
    """What the format allows is accepted, with the right counts."""

    def accepted(self, files, rel, n_tensors, n_bytes=None):
        _, path = self.materialise(files, rel)
        r = h.run_ctl(None, "inspect", path, timeout=h.T(10))
        self.assertEqual(r.rc, 0, r)
        self.assertIn("valid:      yes", r.out)
        j = h.run_ctl(None, "inspect", path, json_mode=True, timeout=h.T(10))
        self.assertEqual(j.rc, 0, j)
        o = j.json
        self.assertIs(o["ok"], True, o)
        self.assertEqual(o["tensors"], n_tensors, o)
        if n_bytes is not None:
            self.assertEqual(o["bytes"], n_bytes, o)
        return o

    def test_empty_tensor(self):
        hdr, data = tensors(("empty", "F32", [0, 4]), ("w", "U8", [3]))
        o = self.accepted({ONE: st_image(hdr, data)}, ONE, 2, 3)
        self.assertEqual(o["dtypes"]["F32"], {"tensors": 1, "bytes": 0})

    def test_zero_dim_tensor(self):
        hdr, data = tensors(("scalar", "F64", []))
        self.accepted({ONE: st_image(hdr, data)}, ONE, 1, 8)

    def test_no_tensors(self):
        self.accepted({ONE: st_image({})}, ONE, 0, 0)
        self.accepted({"y.safetensors": st_image("{}", pad=False)}, "y.safetensors", 0, 0)

    def test_metadata(self):
        hdr, data = tensors(("w", "BF16", [2, 2]))
        hdr["__metadata__"] = {"format": "pt", "note": "caf\u00e9 \u2603"}
        self.accepted({ONE: st_image(hdr, data)}, ONE, 1, 8)
        self.accepted({"m.safetensors": st_image({"__metadata__": {}})}, "m.safetensors", 0, 0)

    def test_every_dtype(self):
        for dt, bits in DTYPES.items():
            with self.subTest(dtype=dt):
                shape = [4] if bits == 6 else [2]   # whole bytes
                hdr, data = tensors(("w", dt, shape))
                name = "%s.safetensors" % dt.lower()
                o = self.accepted({name: st_image(hdr, data)}, name, 1, len(data))
                self.assertEqual(list(o["dtypes"]), [dt])

    def test_all_dtypes_in_one_file(self):
        specs = [("t." + dt.lower(), dt, [4] if bits == 6 else [2, 3]) for dt, bits in DTYPES.items()]
        hdr, data = tensors(*specs)
        o = self.accepted({ONE: st_image(hdr, data)}, ONE, 22, len(data))
        self.assertEqual(sorted(o["dtypes"]), sorted(DTYPES))

    def test_writer_padding_and_json_whitespace(self):
        text = '{ "w" : { "dtype" : "U8" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 2 ] } }\n\t\r  '
        self.accepted({ONE: st_image(text, b"ab")}, ONE, 1, 2)

    def test_escaped_and_non_ascii_names(self):
        hdr, data = tensors(("caf\u00e9", "U8", [1]), ('q"b\\s', "U8", [1]), ("\U0001F600", "U8", [1]),
                            ("tab\there", "U8", [1]), ("", "U8", [1]))
        raw = json.dumps(hdr).encode()   # \u escapes, surrogate pairs included
        self.accepted({ONE: st_image(raw, data)}, ONE, 5, 5)

    def test_sharded_with_index(self):
        files = {"a.safetensors": shard("w"), "b.safetensors": shard("v", "u"),
                 IDX: index({"w": "a.safetensors", "v": "b.safetensors", "u": "b.safetensors"},
                            metadata={"total_size": 3})}
        o = self.accepted(files, "", 3, 3)
        self.assertEqual(len(o["shards"]), 2)


class MessagesStayOneLine(CorpusCase):
    """Regressions (found by fuzz_discovery): names and paths from the files
    are escaped and cut at a character boundary, so that every message is
    one line of valid UTF-8 (tests/fuzz/regressions/discovery/)."""

    def refused_one_line(self, files, rel, fragments, code="EBADMSG"):
        return self.check_refused(files, rel, code, fragments)

    def test_shard_name_with_newline(self):
        # {"weight_map": {"": "\n"}}: the missing shard's path held a raw newline
        self.refused_one_line({IDX: index({"": "\n"})}, "", ["index {d}/" + IDX, "shard {d}/\\x0a (of tensor \"\")"],
                              code="ENOENT")

    def test_tensor_name_with_newline(self):
        self.refused_one_line({"a.safetensors": shard("x\ny"), "b.safetensors": shard("x\ny")}, "",
                              ['tensor "x\\x0ay" is in two shards'])
        self.refused_one_line({IDX: index({"x\ry": "gone.safetensors"})}, "",
                              ['(of tensor "x\\x0dy") is missing'], code="ENOENT")
        self.refused_one_line({IDX: index({"\u0001": 1})}, "", ['tensor "\\x01" maps to a non-string'])
        self.refused_one_line({"a.safetensors": shard("w"), IDX: index({"w": "a.safetensors", "\n": "a.safetensors"})},
                              "", ['tensor "\\x0a" is absent from its shard {d}/a.safetensors'])

    def test_long_name_cut_at_a_character(self):
        # 199 ASCII bytes then a 2-byte character: "%.200s" kept half of it
        name = "a" * 199 + "\u00e9"
        for files in ({IDX: index({name: "gone.safetensors"})},
                      {IDX: index({name: 1})},
                      {"a.safetensors": shard(name), "b.safetensors": shard(name)}):
            with self.subTest(files=sorted(files)):
                r, j = self.refused_one_line(files, "", ['"' + "a" * 150],
                                             code="ENOENT" if "gone" in str(files) else "EBADMSG")
                self.assertIn('"' + "a" * 199 + '..."', r.err)
                self.assertIn('"' + "a" * 199 + '..."', j.json["error"]["message"])

    def test_shard_file_name_with_newline(self):
        # the index names a file that exists, whose name holds a newline: the
        # shard's own message (safetensors.h) names it on one line
        self.refused_one_line({IDX: index({"w": "a\nb.safetensors"}), "a\nb.safetensors": b"\x01\x02"}, "",
                              ["{d}/a\\x0ab.safetensors: file is 2 bytes, too short"])

    def test_index_file_name_with_newline(self):
        self.refused_one_line({"a\n.safetensors.index.json": index({"w": 2})}, "",
                              ["index {d}/a\\x0a.safetensors.index.json: weight_map"])


class ReplayFuzzCorpus(h.E2ETestCase):
    """Every committed fuzz input through weightctl inspect: exit 0 or 1, no
    crash, no sanitizer report, no hang (the harness checks each run). A
    header input is one .safetensors file; a discovery input is unpacked
    into a folder, and inspect gets the folder and each index in it."""

    WORKERS = max(2, min(16, 2 * (os.cpu_count() or 1)))

    def inspect_ok(self, path):
        r = h.run_ctl(None, "inspect", path, timeout=h.T(10))
        if r.rc not in (0, 1):
            raise AssertionError("inspect %s exited %d: %r" % (path, r.rc, r))
        if r.rc == 1 and (not r.err.startswith("weightctl: inspect: ") or r.err.count("\n") != 1):
            raise AssertionError("inspect %s: not one error line: %r" % (path, r.err))
        return r.rc

    def replay(self, jobs):
        failures, verdicts = [], {0: 0, 1: 0}
        with concurrent.futures.ThreadPoolExecutor(self.WORKERS) as pool:
            futures = {pool.submit(self.inspect_ok, p): (src, p) for src, p in jobs}
            for fut in concurrent.futures.as_completed(futures):
                try:
                    verdicts[fut.result()] += 1
                except AssertionError as e:
                    failures.append("%s (%s): %s" % (futures[fut][0], futures[fut][1], e))
        if failures:
            self.fail("%d of %d replays failed:\n%s" % (len(failures), len(jobs), "\n\n".join(failures[:5])))
        return verdicts

    def test_header_corpus(self):
        inputs = corpus_files("header")
        self.assertGreater(len(inputs), 10, "the header corpus is missing (tests/fuzz/corpus/header)")
        jobs = []
        for src in inputs:
            with open(src, "rb") as f:
                data = f.read()
            dst = os.path.join(self.tmp, hashlib.sha1(src.encode()).hexdigest()[:16] + ".safetensors")
            write(dst, data)
            jobs.append((src, dst))
        verdicts = self.replay(jobs)
        # the corpus holds both kinds
        self.assertGreater(verdicts[0], 0, verdicts)
        self.assertGreater(verdicts[1], 0, verdicts)

    def test_discovery_corpus(self):
        inputs = corpus_files("discovery")
        self.assertGreater(len(inputs), 5, "the discovery corpus is missing (tests/fuzz/corpus/discovery)")
        jobs = []
        for k, src in enumerate(inputs):
            with open(src, "rb") as f:
                files = unpack_archive(f.read())
            d = os.path.join(self.tmp, "a%d" % k)
            os.makedirs(d)
            for name, data in files.items():
                write(os.path.join(d, name), data)
            # the folder, and each index given directly (its shards alone
            # are what the header corpus replays)
            jobs.append((src, d))
            jobs += [(src, os.path.join(d, name)) for name in files if name.endswith(INDEX_SUFFIX)]
        verdicts = self.replay(jobs)
        self.assertGreater(verdicts[0], 0, verdicts)
        self.assertGreater(verdicts[1], 0, verdicts)

    def test_regressions_are_replayed(self):
        found = corpus_files("discovery") + corpus_files("header")
        regressions = [p for p in found if os.sep + "regressions" + os.sep in p]
        self.assertGreaterEqual(len(regressions), 3, regressions)


class ReplayAttachCorpus(h.E2ETestCase):
    """Each fuzz_attach input (tests/fuzz/fuzz_attach.c: a byte saying how
    many 64 KiB memfds come along, then the stream) from a peer that answers
    hello and then sends it, to `weightctl attach` (the request ids as
    weightctl numbers them: attach is its second). Exit 0 or 1; no crash,
    sanitizer report or hang."""

    def serve(self, path, data, ready):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        ready.set()
        conn, _ = srv.accept()
        conn.settimeout(h.T(10))
        try:
            buf = b""
            while buf.count(b"\n") < 1:
                buf += conn.recv(4096)
            conn.sendall(b'{"id":1,"ok":true,"result":{"version":"1.0","backend":"host"}}\n')
            while buf.count(b"\n") < 2:
                buf += conn.recv(4096)
            fds = [os.memfd_create("fuzz") for _ in range(data[0] & 7)]
            for fd in fds:
                os.ftruncate(fd, 64 << 10)
            stream = data[1:].replace(b'"id":1', b'"id":2') or b"\n"
            conn.sendmsg([stream], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
            for fd in fds:
                os.close(fd)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):  # until weightctl is done
                pass
        except OSError:
            pass
        finally:
            conn.close()
            srv.close()

    def test_attach_corpus(self):
        inputs = corpus_files("attach")
        self.assertGreater(len(inputs), 5, "the attach corpus is missing (tests/fuzz/corpus/attach)")
        verdicts = {0: 0, 1: 0}
        for k, src in enumerate(inputs):
            with open(src, "rb") as f:
                data = f.read()
            if not data:
                continue
            path = os.path.join(self.tmp, "peer%d.sock" % k)
            ready = threading.Event()
            t = threading.Thread(target=self.serve, args=(path, data, ready))
            t.start()
            ready.wait(h.T(10))
            r = h.run_ctl(path, "attach", "m", timeout=h.T(20))
            t.join(h.T(20))
            self.assertIn(r.rc, (0, 1), "%s: %r" % (src, r))
            verdicts[r.rc] += 1
        self.assertGreater(verdicts[0], 0, verdicts)
        self.assertGreater(verdicts[1], 0, verdicts)


class ArchiveFormat(h.E2ETestCase):
    """The Python unpacker reads what tests/fuzz/make_seeds.py packs."""

    def test_round_trip(self):
        spec = importlib.util.spec_from_file_location("make_seeds", os.path.join(FUZZ_DIR, "make_seeds.py"))
        seeds = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(seeds)
        files = [("model", b'{"weight_map": {}}', True), ("a", b"\x01" * 300, False),
                 ("b.safetensors", b"", False), (".hidden", b"x", False)]
        self.assertEqual(unpack_archive(seeds.archive(files)),
                         {"model.safetensors.index.json": b'{"weight_map": {}}', "a.safetensors": b"\x01" * 300,
                          "b.safetensors": b"", ".hidden.safetensors": b"x"})
        # names mapped into [a-z0-9._-], the suffix not doubled, at most 8
        # files, the last of a name kept, a short tail cut
        raw = bytes([0, 3]) + b"A/Z" + b"\x01\x00" + b"x"
        raw += bytes([1, 40]) + b"q" * 7 + b"\x00\x00"
        raw += bytes([0, 3]) + b"A/Z" + b"\x05\x00" + b"yz"
        self.assertEqual(unpack_archive(raw), {"0im.safetensors": b"yz", "qqqqqqq.safetensors.index.json": b""})
        many = b"".join(bytes([0, 1, 0x61 + k, 0, 0]) for k in range(12))
        self.assertEqual(len(unpack_archive(many)), 8)
