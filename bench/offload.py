"""Offloaded AdamW: step time against in-memory AdamW, and against the disk's bound under a memory limit.

Two measurements, one run, side by side:

1. **A model that fits** (residual MLP, fp32, ``--fit-layers`` x 2048^2): step time of
   ``OffloadAdamW`` (state files on ``--dir``), plain and with ``overlap_forward``, against
   ``torch.optim.AdamW`` in memory.
   The two modes run in fresh processes, interleaved for ``--rounds`` rounds with the
   order rotating, so drift of a shared machine hits both alike; a run's step time is the
   median of its steps after the first; the table shows the median over rounds.
2. **A model that does not fit**: the bf16 model of tests/e2e/test_offload_memory.py
   (``--big-layers`` x 2048^2, fp32 masters offloaded) under a cgroup memory limit of a
   third of its fp32 parameters + gradients + AdamW state. Its step time is compared with
   the bound ``max(compute, bytes moved / disk bandwidth)``, where compute is the forward
   and backward plus the update stage's working time, and the disk time is a raw
   read+write pass over the same bytes through the same pipeline with no update, measured
   in the same process right after the steps. Also shown: the engine's own bound
   ``fwd+bwd + max(update, raw I/O)`` (the forward and backward do not overlap the I/O),
   peak anonymous RSS above the interpreter against parameters + gradients + the buffer
   pool, and the peak page cache of the cgroup.
   Four rows (``--big-modes``): the plain step (``opt.step()`` after ``backward()``);
   ``overlap_backward=True`` (each chunk updated from the gradient hooks during the
   backward); ``overlap_forward=True`` (``step()`` returns at once, the next forward
   finishes the update, each module waiting for its own parameters); and both. The
   overlapped modes use ``--overlap-pool-sets`` buffer sets. Fresh processes, interleaved for
   ``--big-rounds`` rounds. The bound's compute (fwd+bwd and update) is the plain run's
   (the overlapped run's backward includes the update); its raw I/O the fastest of all.
   Each row is also divided by the bound computed with its own process's raw pass (``x own
   raw``): this VM's disk moves between ~3.3 and ~2 GB/s from one minute to the next, and
   the fastest pass of the whole bench can come from a faster minute than a run's steps.
   ``--big-steps`` sets the steps per run (the first is not counted).
   ``--raw-every K`` interleaves the bound with the steps in every process: after the first
   step and then after every K steps, the step's deferred work is finished (``synchronize()``,
   timed as part of that step, so ``overlap_forward`` loses its overlap there) and a raw pass
   is timed; each block of K steps is divided by ``max(fwd+bwd + update, mean of the raw
   passes on either side)`` (``x adj raw``: median over a process's blocks, then over rounds).
   A slow minute of the disk then weighs on the steps and their bound alike. (With it, the
   ``in bwd`` / ``in fwd`` columns are means over steps, the synchronized ones included.)
   ``--big-dtype float32 --big-layers 32`` is an I/O-bound variant: an fp32 model with
   fp32 masters offloaded, whose state (3 kinds) is read and written each step, under a
   limit of its parameters + gradients + 768 MiB (the state is then only ~1.15x the limit:
   with fp32 parameters resident it cannot be 3x; the bf16 default is the 3x case).

``--fused`` gives both optimizers ``fused=True`` (torch's fused AdamW kernel; the in-memory
baseline too); ``--fit-batch`` sets the rows per step of the model that fits (its forward and
backward grow with it, the state's I/O does not).

Peer (``--deepspeed``): DeepSpeed ZeRO-3 with ``offload_optimizer: nvme`` on its CPU
accelerator (bench/offload_deepspeed.py), the model that fits, once, in a fresh process
after the rounds; its ops JIT-build on first use (about 20 minutes on 2 cores).

    PYTHONPATH=src python bench/offload.py [--dir /work/offload-scratch --rounds 3 --deepspeed]
    PYTHONPATH=src python bench/offload.py --rounds 3 --steps 6 --fit-batch 512 --fused \
        --big-modes plain,forward,both --big-rounds 3 --big-steps 10 --raw-every 3   # as in docs/offload.md

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHILD = os.path.join(ROOT, "tests", "e2e", "offload_child.py")
sys.path.insert(0, os.path.join(ROOT, "src"))

from outlast.offload.cgroup import run_limited  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    # What docs/offload.md tells users of memory-tight jobs to set (glibc's dynamic mmap threshold
    # otherwise keeps freed gradients resident); the memory tests set it too. Without it, under
    # the cgroup limit, the overlapped step measured 3.13x the bound against 2.73x with it.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")
    return env


def _parse(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _run(args: list[str], limit: int | None = None) -> dict:
    cmd = [sys.executable, CHILD, *args]
    if limit:
        r = run_limited(cmd, limit, env=_env(), timeout_s=900)
        if r.returncode != 0:
            raise SystemExit(f"limited run failed ({r.returncode}, {r.oom_kills} OOM kills): {r.output[-3000:]}")
        d = _parse(r.output)
        d["cgroup_peak_bytes"] = r.peak_bytes
        return d
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"run failed: {p.stderr[-3000:]}")
    return _parse(p.stdout)


def _steady(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _adjacent_blocks(x: dict, compute_s: float) -> list[float]:
    """Each block of ``raw_every`` steps over ``max(compute, mean of the raw passes on either side)``."""
    k, raw, st = x["raw_every"], x["raw_between_s"], x["step_s"]
    return [statistics.fmean(st[j * k + 1:(j + 1) * k + 1]) / max(compute_s, (raw[j] + raw[j + 1]) / 2)
            for j in range(len(raw) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/work/offload-scratch", help="a directory on the local disk for state files")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fit-layers", type=int, default=8)
    ap.add_argument("--big-layers", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--big-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--big-rounds", type=int, default=1)
    ap.add_argument("--big-steps", type=int, default=0, help="steps per run of the big case (default: max(3, --steps - 1))")
    ap.add_argument("--overlap-pool-sets", type=int, default=0,
                    help="buffer sets of the overlapped modes (default: 16 for the bf16 3x case, whose limit leaves "
                         "~300 MiB beside the parameters and gradients and OOM-kills 64 sets; 64 for --big-dtype float32)")
    ap.add_argument("--big-modes", default="plain,overlap,forward,both",
                    help="plain: step() after backward; overlap: overlap_backward; forward: overlap_forward; "
                         "both: overlap_backward + overlap_forward")
    ap.add_argument("--raw-every", type=int, default=0,
                    help="big case: a raw pass after the first step and after every K steps, each block of K steps "
                         "compared with the passes on either side (--big-steps must then be 1 + a multiple of K)")
    ap.add_argument("--deepspeed", action="store_true", help="also run the DeepSpeed ZeRO-3 NVMe peer")
    ap.add_argument("--fused", action="store_true",
                    help="fused=True for both optimizers (torch's fused AdamW kernel; in-memory torch too)")
    ap.add_argument("--fit-batch", type=int, default=4,
                    help="rows per step of the model that fits (the forward and backward grow with it, the state's I/O does not)")
    a = ap.parse_args()
    unknown = set(a.big_modes.split(",")) - {"plain", "overlap", "forward", "both"}
    if unknown:
        ap.error(f"--big-modes: unknown {sorted(unknown)}; choose from plain, overlap, forward, both")
    if "plain" not in a.big_modes.split(","):
        ap.error("--big-modes needs plain: the bound's compute is the plain run's fwd+bwd + update")
    if a.raw_every and ((a.big_steps or max(3, a.steps - 1)) - 1) % a.raw_every:
        ap.error("--raw-every K needs --big-steps = 1 + a multiple of K (whole blocks between raw passes)")
    if a.deepspeed and a.skip_fit:
        ap.error("--deepspeed compares with the model that fits: drop --skip-fit")
    os.makedirs(a.dir, exist_ok=True)
    width = 2048
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
    print(f"machine: {os.cpu_count()} CPUs ({cpu}); state files on {a.dir}")

    # ---- 1. fits: offload vs in-memory, interleaved fresh processes ------------------
    fused = ["--fused"] if a.fused else []
    fit = ["--layers", str(a.fit_layers), "--width", str(width), "--dtype", "float32", "--steps", str(a.steps),
           "--batch", str(a.fit_batch), *fused]
    modes = ["torch", "offload", "offload_fwd"]
    margs = {"torch": ["--optim", "torch"], "offload": ["--optim", "offload"],
             "offload_fwd": ["--optim", "offload", "--overlap-forward"]}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    result: dict = {}
    for r in range(0 if a.skip_fit else a.rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for m in order:
            d = os.path.join(a.dir, f"fit-{m}")
            shutil.rmtree(d, ignore_errors=True)
            runs[m].append(_run(fit + margs[m] + ["--dir", d]))
            shutil.rmtree(d, ignore_errors=True)
    if not a.skip_fit:
        step = {m: statistics.median(_steady(x["step_s"]) for x in runs[m]) for m in modes}
        per_round = {m: [_steady(o["step_s"]) / _steady(t["step_s"]) for t, o in zip(runs["torch"], runs[m])]
                     for m in modes[1:]}
        losses_equal = all(t["losses"] == o["losses"] for m in modes[1:] for t, o in zip(runs["torch"], runs[m]))
        n_fit = runs["torch"][0]["params"]
        print(f"\n1. model that fits: {n_fit / 1e6:.0f}M fp32 params, AdamW state {8 * n_fit / 2**20:.0f} MiB, "
              f"{a.rounds} rounds x {a.steps} steps, batch {a.fit_batch} rows, fused={a.fused}")
        print(f"{'mode':<10}{'step s':>10}{'fwd+bwd s':>12}{'peak anon MiB':>15}")
        for m in modes:
            fb = statistics.median(_steady(x["compute_s"]) for x in runs[m])
            pk = statistics.median(x["peak_anon_above_base"] for x in runs[m]) / 2**20
            print(f"{m:<10}{step[m]:>10.3f}{fb:>12.3f}{pk:>15.0f}")
        ost = [s for x in runs["offload"] for s in x["stats"][1:]]
        stages = {k: statistics.median(s[k] for s in ost) for k in ("read_s", "update_s", "write_s", "pipeline_s")}
        print("offload step stages (median s): " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in stages.items()))
        for m in modes[1:]:
            print(f"{m} / in-memory: {step[m] / step['torch']:.2f}x (per round: "
                  f"{', '.join(f'{x:.2f}' for x in per_round[m])})")
        print(f"losses equal (all three): {losses_equal}")
        result["fit"] = {"params": n_fit, "batch": a.fit_batch, "fused": a.fused, "torch_step_s": step["torch"], "offload_step_s": step["offload"],
                          "offload_fwd_step_s": step["offload_fwd"], "ratio": step["offload"] / step["torch"],
                          "ratio_fwd": step["offload_fwd"] / step["torch"], "ratio_per_round": per_round,
                          "losses_equal": losses_equal, "offload_stages_s": stages}

    # ---- 2. does not fit: under a cgroup limit, against the disk's bound ---------------
    if not a.skip_big:
        n = a.big_layers * width * width
        limit = 16 * n // 3 if a.big_dtype == "bfloat16" else 8 * n + (768 << 20)
        d = os.path.join(a.dir, "big")
        common = ["--layers", str(a.big_layers), "--width", str(width), "--dtype", a.big_dtype, "--master",
                  "--optim", "offload", "--dir", d, "--steps", str(a.big_steps or max(3, a.steps - 1)), "--chunk-mb", "2", "--raw-io", *fused]
        if a.raw_every:
            common += ["--raw-every", str(a.raw_every)]
        ps = ["--pool-sets", str(a.overlap_pool_sets or (16 if a.big_dtype == "bfloat16" else 64))]
        bmodes = {"plain": [], "overlap": ["--overlap", *ps], "forward": ["--overlap-forward", *ps],
                  "both": ["--overlap", "--overlap-forward", *ps]}
        bmodes = {m: bmodes[m] for m in a.big_modes.split(",")}  # in the order given (round 2 reverses it)
        bruns: dict[str, list[dict]] = {m: [] for m in bmodes}
        for r in range(a.big_rounds):
            for m in (list(bmodes) if r % 2 == 0 else list(bmodes)[::-1]):
                shutil.rmtree(d, ignore_errors=True)
                bruns[m].append(_run(common + bmodes[m], limit))
                shutil.rmtree(d, ignore_errors=True)
        plain = bruns["plain"]
        fb = statistics.median(_steady(x["compute_s"]) for x in plain)
        upd = statistics.median(statistics.median(s["update_s"] for s in x["stats"][1:]) for x in plain)
        raw = min(t for m in bmodes for x in bruns[m] for t in x["raw_io_s"])
        bound = max(fb + upd, raw)
        engine_bound = fb + max(upd, raw)
        x0 = plain[0]
        state_bytes = x0["fp32_params_grads_adamw_bytes"]
        bw = x0["bytes_per_step"] / raw / 2**20
        print(f"\n2. model that does not fit: {n / 1e6:.0f}M {a.big_dtype} params + fp32 masters offloaded; fp32 "
              f"params+grads+AdamW {state_bytes / 2**30:.2f} GiB = {state_bytes / limit:.2f}x the "
              f"{limit / 2**30:.2f} GiB cgroup limit; {a.big_rounds} round(s), fused={a.fused}")
        print(f"bound = max(fwd+bwd {fb:.2f} + update {upd:.2f}, raw read+write {raw:.2f} s at {bw:.0f} MiB/s) = "
              f"{bound:.2f} s; engine bound without overlap fwd+bwd + max(update, raw) = {engine_bound:.2f} s")
        print(f"{'mode':<9}{'step s':>8}{'x bound':>9}{'per round':>18}{'x own raw':>10}{'per round':>18}"
              + (f"{'x adj raw':>10}{'per round':>18}{'blocks min-max':>16}" if a.raw_every else "")
              + f"{'in bwd':>8}{'in fwd':>8}{'drain s':>9}{'peak anon/(p+g+pool)':>22}{'cgroup peak GiB':>16}{'peak cache MiB':>15}")
        result["big"] = {"params": n, "dtype": a.big_dtype, "fused": a.fused, "limit_bytes": limit, "state_over_limit": state_bytes / limit,
                         "fwd_bwd_s": fb, "update_s": upd, "raw_io_s": raw, "bound_s": bound,
                         "engine_bound_s": engine_bound, "bytes_per_step": x0["bytes_per_step"], "disk_mib_s": bw}
        for m in bmodes:
            xs = bruns[m]
            step_s = statistics.median(_steady(x["step_s"]) for x in xs)
            per = [_steady(x["step_s"]) / bound for x in xs]
            # The same against the raw pass of the run's own process, taken right after its steps:
            # the disk's throughput here moves by 1.5x within minutes, and the fastest pass of the
            # whole bench (the bound above) can come from a faster minute than a run's steps.
            own = [_steady(x["step_s"]) / max(fb + upd, min(x["raw_io_s"])) for x in xs]
            adj_cols = ""
            if a.raw_every:
                blocks = [_adjacent_blocks(x, fb + upd) for x in xs]
                adj = [statistics.median(b) for b in blocks]
                flat = [v for b in blocks for v in b]
                adj_cols = (f"{statistics.median(adj):>10.2f}{', '.join(f'{v:.2f}' for v in adj):>18}"
                            f"{f'{min(flat):.2f}-{max(flat):.2f}':>16}")
            st = [s for x in xs for s in x["stats"][1:]]
            # with --raw-every a block's last step is finished by synchronize() (no chunk in the
            # forward): the mean over steps then says how much of the work overlapped, a median would not
            avg = statistics.fmean if a.raw_every else statistics.median
            ovl = avg(s.get("overlapped_chunks", 0) / s.get("chunks", 1) for s in st)
            infwd = avg(s.get("forward_chunks", 0) / s.get("chunks", 1) for s in st)
            drain = statistics.median(s["drain_s"] for s in st) if m != "plain" else float("nan")
            mem = max(x["peak_anon_above_base"] / (x["params_grads_bytes"] + x["pool_bytes"]) for x in xs)
            cg = max(x["cgroup_peak_bytes"] for x in xs)
            cache = max(x["peak_cgroup_cache"] for x in xs)
            print(f"{m:<9}{step_s:>8.2f}{step_s / bound:>9.2f}{', '.join(f'{v:.2f}' for v in per):>18}{statistics.median(own):>10.2f}{', '.join(f'{v:.2f}' for v in own):>18}{adj_cols}{ovl:>8.0%}{infwd:>8.0%}"
                  f"{drain:>9.2f}{mem:>22.2f}{cg / 2**30:>16.2f}{cache / 2**20:>15.0f}")
            result["big"][m] = {"step_s": step_s, "x_bound": step_s / bound, "x_bound_per_round": per,
                                "x_own_bound": statistics.median(own), "x_own_bound_per_round": own,
                                "raw_io_s": [min(x["raw_io_s"]) for x in xs],
                                "x_engine_bound": step_s / engine_bound, "overlapped_fraction": ovl,
                                "forward_fraction": infwd, "drain_s": drain,
                                "x_memory": mem, "cgroup_peak_bytes": cg, "peak_cgroup_cache": cache,
                                "pool_bytes": xs[0]["pool_bytes"], "losses": xs[0]["losses"]}
            if a.raw_every:
                result["big"][m].update(x_adjacent_bound=statistics.median(adj), x_adjacent_bound_per_round=adj,
                                        x_adjacent_bound_blocks=blocks,
                                        raw_between_s=[x["raw_between_s"] for x in xs])
        losses = {m: bruns[m][0]["losses"] for m in bmodes}
        same = all(v == next(iter(losses.values())) for v in losses.values())
        print(f"losses equal ({', '.join(bmodes)}): {same}")
        result["big"]["losses_equal"] = same
    if a.deepspeed:
        d = os.path.join(a.dir, "ds")
        shutil.rmtree(d, ignore_errors=True)
        p = subprocess.run([sys.executable, os.path.join(HERE, "offload_deepspeed.py"), "--dir", d, "--layers",
                            str(a.fit_layers), "--width", str(width), "--steps", str(a.steps)],
                           env=_env(), capture_output=True, text=True, timeout=3000)
        shutil.rmtree(d, ignore_errors=True)
        try:
            ds = _parse(p.stdout)
        except (ValueError, IndexError):
            ds = {"ok": False, "error": f"exit {p.returncode}: {p.stderr[-1500:]}"}
        if ds.get("ok"):
            ds_step = _steady(ds["step_s"])
            print(f"\npeer: DeepSpeed {ds['deepspeed']} ZeRO-3 offload_optimizer=nvme (CPU accelerator), the model "
                  f"that fits: step {ds_step:.3f} s = {ds_step / step['torch']:.2f}x in-memory torch AdamW "
                  f"(median round), outlast offload {step['offload'] / ds_step:.2f}x of it")
            result["deepspeed_nvme"] = {"step_s": ds_step, "x_torch": ds_step / step["torch"],
                                        "outlast_over_deepspeed": step["offload"] / ds_step, "losses": ds["losses"]}
        else:
            print(f"\npeer: DeepSpeed ZeRO-3 NVMe failed: {ds.get('error')}")
            result["deepspeed_nvme"] = {"error": ds.get("error")}
    else:
        result["deepspeed_nvme"] = "not run (pass --deepspeed)"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
