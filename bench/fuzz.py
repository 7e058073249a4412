"""Fuzz the checkpoint reader: N mutated checkpoints, each refused or read bit-exact.

Every case is one mutation of a small pristine checkpoint (tests/fuzz_cases.py: manifest
bytes flipped/inserted/cut; one JSON node of the manifest replaced, removed or duplicated
and re-sealed like a crafted file; shard header bytes changed). The figure that matters
is ``wrong`` = 0 (a load that returned data other than what was saved, or an exception
that is not a CheckpointError). Baseline in the same run: for header mutations, how many
of the damaged shard files ``safetensors.safe_open`` still opens and reads (what a reader
without outlast's manifest cross-checks would accept).

    PYTHONPATH=src python bench/fuzz.py --cases 100000
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import fuzz_cases  # noqa: E402
from _common import emit_json, print_table  # noqa: E402


def safetensors_accepts(path: str) -> bool:
    from safetensors import safe_open

    try:
        for name in os.listdir(os.path.join(path, "data")):
            with safe_open(os.path.join(path, "data", name), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        return True
    except Exception:  # noqa: BLE001 - any refusal counts
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    counts: collections.Counter = collections.Counter()
    wrong: list[str] = []
    st_accepts = st_cases = 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        pristine = os.path.join(d, "pristine")
        original = fuzz_cases.make_pristine(pristine)
        case = os.path.join(d, "case")
        for i in range(args.cases):
            what = fuzz_cases.apply_case(case, pristine, rnd)
            kind = what.split(":")[0]
            try:
                got = fuzz_cases.outcome(case, original, f"case {i}: {what}")
            except AssertionError as e:
                got = "wrong"
                wrong.append(str(e))
            counts[(kind, got)] += 1
            if kind == "header-bytes":
                st_cases += 1
                st_accepts += safetensors_accepts(case)
            if (i + 1) % 10_000 == 0:
                print(f"  {i + 1} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    secs = time.perf_counter() - t0
    kinds = sorted({k for k, _ in counts})
    rows = [[k, counts[(k, "refused")], counts[(k, "exact")], counts[(k, "wrong")]] for k in kinds]
    rows.append(["all", sum(counts[(k, "refused")] for k in kinds), sum(counts[(k, "exact")] for k in kinds), len(wrong)])
    print_table(["mutation", "refused", "read bit-exact", "WRONG"], rows,
                f"fuzz: {args.cases} cases in {secs:.1f} s ({args.cases / secs:.0f}/s)")
    print(f"baseline: safetensors.safe_open read {st_accepts} of {st_cases} header-mutated shard sets without error")
    for w in wrong[:10]:
        print("  ", w)
    emit_json({
        "bench": "fuzz", "cases": args.cases, "seconds": round(secs, 2), "wrong": len(wrong),
        "refused": rows[-1][1], "exact": rows[-1][2],
        "by_kind": {k: {"refused": counts[(k, "refused")], "exact": counts[(k, "exact")], "wrong": counts[(k, "wrong")]} for k in kinds},
        "safetensors_baseline": {"header_cases": st_cases, "accepted": st_accepts},
    })
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
