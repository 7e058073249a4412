"""Regenerate the hostile manifests in this folder from tests/golden/v1/manifest.json.

Each case is the golden manifest with one malicious or broken change. ``expected.json``
maps each file to the error class and a fragment its message must contain. Run from the
repository root: ``python tests/hostile/make_hostile.py``.
"""

import copy
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "golden", "v1", "manifest.json")


def first_chunk(m):
    return m["tensors"]["model.embed.weight"]["chunks"][0]


def cases(m):
    def mut(fn):
        c = copy.deepcopy(m)
        fn(c)
        return json.dumps(c, indent=1)

    yield "not_json.json", "{ this is not json", "CorruptCheckpointError", "not valid JSON"
    yield "array_root.json", "[]", "CorruptCheckpointError", "must be a JSON object"
    yield "wrong_format.json", mut(lambda c: c.update(format="pytorch")), "CorruptCheckpointError", "'format'"
    yield "future_version.json", mut(lambda c: c.update(version=99)), "UnsupportedFormatError", "version 99"
    yield "string_version.json", mut(lambda c: c.update(version="1")), "CorruptCheckpointError", "'version'"
    yield "no_tensors.json", mut(lambda c: c.pop("tensors")), "CorruptCheckpointError", "'tensors'"
    yield "unknown_dtype.json", mut(lambda c: c["tensors"]["model.embed.weight"].update(dtype="F128")), "CorruptCheckpointError", "unknown dtype"
    yield "negative_shape.json", mut(lambda c: c["tensors"]["model.embed.weight"].update(shape=[-3, 4])), "CorruptCheckpointError", "non-negative"
    yield "chunk_outside_shape.json", mut(lambda c: first_chunk(c).update(offsets=[1, 0])), "CorruptCheckpointError", "outside shape"
    yield "chunk_not_covering.json", mut(lambda c: c["tensors"]["model.embed.weight"].update(shape=[6, 4])), "CorruptCheckpointError", "cover"
    yield "nbytes_lies.json", mut(lambda c: first_chunk(c).update(nbytes=4096)), "CorruptCheckpointError", "nbytes"
    yield "offset_past_file.json", mut(lambda c: first_chunk(c).update(offset=10**9)), "CorruptCheckpointError", "past the size"
    yield "path_traversal.json", mut(lambda c: (c["files"].update({"../../etc/passwd": 10**6}), first_chunk(c).update(file="../../etc/passwd"))), "CorruptCheckpointError", "relative path inside"
    yield "absolute_file.json", mut(lambda c: (c["files"].update({"/etc/passwd": 10**6}), first_chunk(c).update(file="/etc/passwd"))), "CorruptCheckpointError", "relative path inside"
    yield "unlisted_file.json", mut(lambda c: first_chunk(c).update(file="data/other.safetensors")), "CorruptCheckpointError", "not listed"
    yield "bad_checksum_field.json", mut(lambda c: first_chunk(c).update(checksum=12)), "CorruptCheckpointError", "checksum"
    yield "bad_path.json", mut(lambda c: c["tensors"]["model.embed.weight"].update(path=[{"x": 1}])), "CorruptCheckpointError", "path"
    yield "plain_without_value.json", mut(lambda c: c["plain"]["step"].pop("value")), "CorruptCheckpointError", "plain.step"

    # Element counts add up but the chunks do not tile: rows 0:2 and row 0 again, row 2 lost.
    def overlap(c):
        t = c["tensors"]["model.embed.weight"]
        a = dict(t["chunks"][0], sizes=[2, 4], nbytes=32)
        b = dict(t["chunks"][0], sizes=[1, 4], nbytes=16, key="model.embed.weight#dup")
        t["chunks"] = [a, b]
    yield "overlapping_chunks.json", mut(overlap), "CorruptCheckpointError", "overlap"
    yield "name_not_path.json", mut(lambda c: c["tensors"]["model.embed.weight"].update(path=["model", "other"])), "CorruptCheckpointError", "not the entry's name"
    yield "plain_name_not_path.json", mut(lambda c: c["plain"]["step"].update(path=["steps"])), "CorruptCheckpointError", "not the entry's name"

    def huge_index(c):
        e = c["tensors"].pop("layers.0")
        e["path"] = ["layers", [10**12]]
        c["tensors"]["layers.1000000000000"] = e
    yield "huge_list_index.json", mut(huge_index), "CorruptCheckpointError", "out of range"

    def name_collision(c):
        c["plain"]["model.counts"] = {"path": ["model", "counts"], "value": 1}
    yield "tensor_and_plain_same_name.json", mut(name_collision), "CorruptCheckpointError", "unique"
    yield "too_many_dims.json", mut(lambda c: c["tensors"]["model.embed.weight"].update(shape=[1] * 65)), "CorruptCheckpointError", "dimensions"
    yield "impossibly_large.json", mut(lambda c: c["tensors"]["model.empty"].update(shape=[2**62, 2**62])), "CorruptCheckpointError", "impossibly large"
    yield "empty_key.json", mut(lambda c: first_chunk(c).update(key="")), "CorruptCheckpointError", "non-empty"
    yield "uppercase_checksum.json", mut(lambda c: first_chunk(c).update(checksum=first_chunk(c)["checksum"].upper())), "CorruptCheckpointError", "lowercase hex"
    # Found by bench/fuzz.py: paths that cannot form one nested state, and an empty tensor
    # whose declared shape no shard header pins.
    yield "mixed_list_and_dict.json", mut(lambda c: c["tensors"]["layers.1.bias"]["path"].__setitem__(1, 1)), "CorruptCheckpointError", "mixes list indices and dict keys"
    yield "value_and_container.json", mut(lambda c: c["plain"].update({"model": {"path": ["model"], "value": 1}})), "CorruptCheckpointError", "both a value and a container"
    yield "empty_tensor_reshaped.json", mut(lambda c: c["tensors"]["model.empty"].update(shape=[0, 6])), "CorruptCheckpointError", "must be the whole tensor"
    yield "deep_nesting.json", "[" * 100000 + "]" * 100000, "CorruptCheckpointError", "not valid JSON"
    # The same key twice in one object: json.loads would silently keep the last one.
    dup = json.dumps(m, indent=1).replace('"step": 7,', '"step": 7,\n "step": 8,', 1)
    yield "duplicate_key.json", dup, "CorruptCheckpointError", "appears twice"
    bad_self = json.dumps(dict(m, sealed=True, manifest_checksum="0123456789abcdef"), indent=1)
    yield "bad_manifest_checksum.json", bad_self, "CorruptCheckpointError", "manifest itself is damaged"
    yield "sealed_without_checksum.json", json.dumps(dict(m, sealed=True), indent=1), "CorruptCheckpointError", "'sealed': true"


def main():
    with open(GOLDEN) as f:
        m = json.load(f)
    expected = {}
    for name, text, err, fragment in cases(m):
        with open(os.path.join(HERE, name), "w") as f:
            f.write(text)
        expected[name] = {"error": err, "message_contains": fragment}
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
