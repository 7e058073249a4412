"""Fuzzing the reader: every mutated manifest or shard header is refused or reads bit-exact.

bench/fuzz.py runs the same cases 10^5 times; here hypothesis drives a few hundred per run.
"""

import os
import random

from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_cases


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_mutations_are_refused_or_read_exactly(tmp_path_factory, seed):
    base = tmp_path_factory.getbasetemp() / "fuzz"
    pristine = str(base / "pristine")
    if not os.path.exists(pristine):
        fuzz_cases.make_pristine(pristine)
    original = fuzz_cases.make_pristine(str(base / "ref")) if not (base / "ref").exists() else __import__("outlast").read(str(base / "ref"))
    path = str(base / "case")
    what = fuzz_cases.apply_case(path, pristine, random.Random(seed))
    assert fuzz_cases.outcome(path, original, f"seed {seed}: {what}") in ("refused", "exact")


def test_every_manifest_byte_flip_is_refused(tmp_path):
    """The manifest checksums itself: flipping any single bit of it never loads."""
    import outlast
    from outlast.errors import CheckpointError

    pristine = str(tmp_path / "p")
    fuzz_cases.make_pristine(pristine)
    raw = open(os.path.join(pristine, "manifest.json"), "rb").read()
    rnd = random.Random(0)
    positions = rnd.sample(range(len(raw)), 200)
    for i in positions:
        flipped = bytearray(raw)
        flipped[i] ^= 1 << rnd.randrange(8)
        open(os.path.join(pristine, "manifest.json"), "wb").write(bytes(flipped))
        try:
            outlast.read(pristine)
        except CheckpointError:
            continue
        raise AssertionError(f"a flip at byte {i} of the manifest loaded")
