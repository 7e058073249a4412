"""Peak memory of merging N checkpoints: outlast.merge (streaming) vs a one-shot merge.

Writes N (default 4) transformer-shaped fp32 checkpoints of ~1 GiB each, then runs each
merge method in a fresh child process and reports the child's peak resident set size
(VmHWM from /proc/self/status, cross-checked with the child's ru_maxrss from wait4 in the
parent, which also counts the forked parent image before exec, so the parent stays small) against the child's RSS right after ``import torch, outlast`` (the baseline
every method pays). The page cache is not RSS; the streaming merge reads with pread into
a reused buffer, so file pages it touches are not mapped into the process.

* ``outlast.merge``: tensor by tensor; holds a read buffer and an fp32 accumulator of
  the largest tensor.
* ``one-shot``: ``outlast.read`` of every checkpoint, average, ``outlast.save`` — what a
  script without a streaming merge does.

Run:  python bench/merge_rss.py [--gib 1.0] [--n 4] [--dir /path/on/the/disk]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_state(gib: float, seed: int) -> dict:
    import torch

    d, vocab = 1024, 32000
    g = torch.Generator().manual_seed(seed)
    model = {"embed.weight": torch.randn(vocab, d, generator=g)}
    budget = int(gib * (1 << 30)) - model["embed.weight"].nbytes
    layer = 0
    while budget > 0:
        for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.out.weight", (d, d)),
                            ("mlp.up.weight", (4 * d, d)), ("mlp.down.weight", (d, 4 * d)),
                            ("norm1.weight", (d,)), ("norm2.weight", (d,))):
            t = torch.randn(*shape, generator=g)
            model[f"layers.{layer}.{name}"] = t
            budget -= t.nbytes
        layer += 1
    return {"model": model, "optim": {"step": torch.tensor(100 * (seed + 1))}, "step": 100 * (seed + 1)}


def child(method: str, srcs: list[str], dst: str) -> None:
    import torch

    import outlast

    if method == "make":  # dst is the scale and seed: "<gib>:<seed>"
        gib, seed = dst.split(":")
        state = make_state(float(gib), int(seed))
        outlast.save(state, srcs[0], step=state["step"])
        return

    base = vm("VmRSS")
    t0 = time.perf_counter()
    if method == "stream":
        outlast.merge_checkpoints(srcs, dst, method="mean")
    else:
        states = [outlast.read(p) for p in srcs]
        out = {"model": {}, "optim": states[-1]["optim"], "step": states[-1]["step"]}
        for k in states[0]["model"]:
            acc = torch.zeros_like(states[0]["model"][k], dtype=torch.float32)
            for s in states:
                acc += s["model"][k] / len(states)
            out["model"][k] = acc
        outlast.save(out, dst, step=out["step"])
    secs = time.perf_counter() - t0
    print(json.dumps({"baseline": base, "hwm": vm("VmHWM"), "seconds": secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of each checkpoint")
    ap.add_argument("--n", type=int, default=4, help="number of checkpoints to merge")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[2:], args.child[1])
        return

    import outlast

    root = tempfile.mkdtemp(prefix="outlast-merge-rss-", dir=args.dir)
    try:
        srcs = []
        for i in range(args.n):
            # Made in a child too: a big parent would inflate the children's ru_maxrss,
            # which counts the forked parent image before exec.
            p = os.path.join(root, f"step-{100 * (i + 1)}")
            subprocess.run([sys.executable, __file__, "--child", "make", f"{args.gib}:{i}", p], check=True)
            srcs.append(p)
        nbytes = outlast.manifest_of(srcs[0]).nbytes
        largest = max(t.nbytes for t in outlast.manifest_of(srcs[0]).tensors.values())
        rows = {}
        for method in ("stream", "one-shot"):
            dst = os.path.join(root, f"merged-{method}")
            proc = subprocess.Popen([sys.executable, __file__, "--child", method, dst, *srcs],
                                    stdout=subprocess.PIPE, text=True)
            out = proc.stdout.read()
            # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be a running max
            # over every child so far, the checkpoint makers included).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"{method} merge failed with exit code {proc.returncode}")
            r = json.loads(out.strip().splitlines()[-1])
            r["ru_maxrss"] = usage.ru_maxrss * 1024
            rows[method] = r
            shutil.rmtree(dst)
        mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "-"  # noqa: E731
        print(f"merge of {args.n} checkpoints x {nbytes / 2**30:.2f} GiB (largest tensor {largest / 2**20:.0f} MiB), "
              "peak RSS in MiB")
        head = ["method", "baseline", "peak (VmHWM)", "peak - baseline", "ru_maxrss", "seconds"]
        table = [head] + [[m, mib(r["baseline"]), mib(r["hwm"]), mib(r["hwm"] - r["baseline"]), mib(r["ru_maxrss"]),
                           f"{r['seconds']:.1f}"] for m, r in rows.items()]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
        for j, row in enumerate(table):
            print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if j == 0:
                print("  ".join("-" * w for w in widths))
        s, o = rows["stream"], rows["one-shot"]
        print(json.dumps({
            "bench": "merge_rss", "n": args.n, "checkpoint_bytes": nbytes, "largest_tensor_bytes": largest,
            "stream_peak_rss": s["hwm"], "stream_over_baseline": s["hwm"] - s["baseline"],
            "oneshot_peak_rss": o["hwm"], "oneshot_over_baseline": o["hwm"] - o["baseline"],
            "baseline_rss": s["baseline"], "stream_seconds": round(s["seconds"], 2),
            "oneshot_seconds": round(o["seconds"], 2),
            "ratio_over_baseline": round((o["hwm"] - o["baseline"]) / max(1, s["hwm"] - s["baseline"]), 1),
        }, sort_keys=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
