"""``outlast demo``: train on two ranks, kill one, resume on one rank, show what it cost.

The demo is the trainer run twice by torchrun as a subprocess (``--standalone``, so
no fixed port). The first launch has ``OUTLAST_FAULT_STEP=K`` in its environment, so
rank 1 SIGKILLs itself at the start of step K; gloo reports the lost peer to rank 0,
torchrun's elastic agent tears the group down (every collective also has a short
timeout) and exits non-zero. The second launch runs the *same* config on one rank:
the trainer finds the latest committed checkpoint and resumes from it, with no
conversion step, and continues to the end. Everything is written under ``--out``:
``config.toml`` (rerun it with ``outlast train``), ``run/`` (losses.jsonl,
checkpoints, fault.json), ``logs/`` (each launch's output), ``loss.png`` and
``summary.json``. While it trains, the demo shows a progress bar that follows the
run's ``losses.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .config import TrainConfig
from .loop import FAULT_FILE, FAULT_RANK_ENV, FAULT_STEP_ENV, LOSS_LOG, read_log

__all__ = ["DemoError", "DemoPlan", "demo_config", "run_demo", "summarize", "plot"]

# Names the demo owns inside --out; anything else there means it is not a demo folder.
OWNED = ("config.toml", "run", "logs", "loss.png", "summary.json")


class DemoError(RuntimeError):
    """The demo could not do what it promised (a launch failed, the fault did not fire)."""


@dataclass(frozen=True)
class DemoPlan:
    """How big the demo is and where the fault hits."""

    steps: int
    fault_step: int
    every: int
    model: dict
    data: dict


PLANS = {
    # ~1.5 minutes on 2 idle CPU cores: a 4-layer, 0.8M-parameter model on 8 documents per step.
    "full": DemoPlan(
        steps=200, fault_step=131, every=20,
        model={"preset": "tiny", "n_layers": 4, "max_seq_len": 256},
        data={"docs_per_step": 8, "max_doc_tokens": 256, "token_budget": 256},
    ),
    # For CI: the same story in well under a minute.
    "quick": DemoPlan(
        steps=30, fault_step=19, every=5,
        model={"preset": "tiny", "n_layers": 2, "d_model": 64, "d_ff": 256, "max_seq_len": 128},
        data={"docs_per_step": 6, "max_doc_tokens": 128, "token_budget": 128},
    ),
}


def demo_config(out: str, plan: DemoPlan) -> dict:
    """The demo's training config, as the dict a TOML file would hold."""
    return {
        "run_dir": os.path.join(out, "run"),
        "steps": plan.steps,
        "seed": 0,
        "log_every": 10,
        "progress": False,  # the launches' output goes to logs/; the demo draws its own bar
        "model": dict(plan.model),
        "data": {"seed": 0, **plan.data},
        "optim": {"lr": 2e-3, "warmup_steps": max(1, plan.steps // 12), "min_lr_ratio": 0.1},
        "checkpoint": {"every": plan.every, "keep_last": 3},
        # One thread per rank: at this size a second intra-op thread gains little, and on a
        # busy machine its spin-waits make a step several times slower.
        "dist": {"mode": "ddp", "timeout_s": 30.0, "threads": 1},
    }


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(d: dict) -> str:
    """A flat-sections dict as TOML (top-level scalars, then one table per sub-dict)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _prepare_out(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    foreign = sorted(set(os.listdir(out)) - set(OWNED))
    if foreign:
        raise DemoError(
            f"{out} holds files the demo did not write ({', '.join(foreign[:5])}); "
            "pass an empty or new --out directory"
        )
    for name in OWNED:  # a previous demo's results: start afresh
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _launch(config_path: str, nproc: int, log_path: str, env_extra: dict) -> subprocess.Popen:
    import outlast

    env = dict(os.environ)
    # The workers must import the very outlast this process runs.
    src = os.path.dirname(os.path.dirname(os.path.abspath(outlast.__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")  # the trainer sets its own thread count
    env.update(env_extra)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--max-restarts=0", "-m", "outlast.cli", "train", "--config", config_path,
    ]
    log = open(log_path, "w", encoding="utf-8")
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def _follow(proc: subprocess.Popen, run_dir: str, bar, attempt: int, deadline: float) -> int:
    """Wait for ``proc``, advancing ``bar`` with this attempt's steps from losses.jsonl."""
    path = os.path.join(run_dir, LOSS_LOG)
    offset, seen = 0, 0
    bar.refresh()
    while True:
        rc = proc.poll()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                f.seek(offset)
                chunk = f.read()
            # Only whole lines; a partial one is read again next time.
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete.encode("utf-8"))
            for line in complete.splitlines():
                r = json.loads(line)
                if r.get("attempt") == attempt and "loss" in r:
                    if not seen:  # the rate counts from this launch's first step
                        bar.reset(total=bar.total)
                        bar.initial = bar.n = r["step"] - 1
                    bar.update(r["step"] - bar.n)
                    bar.set_postfix(loss=f"{r['loss']:.3f}", refresh=False)
                    seen += 1
        if rc is not None:
            return rc
        if time.time() > deadline:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise DemoError(f"the training launch took longer than the demo's time limit; see {proc.args}")
        time.sleep(0.25)


def run_demo(out: str, *, quick: bool = False, timeout_s: float = 900.0, echo: Callable[[str], None] = print) -> dict:
    """Run the demo into ``out`` and return its summary (also in ``out/summary.json``).

    Args:
        out: Output folder (created; must hold nothing but an earlier demo's files).
        quick: The small plan (for CI).
        timeout_s: Give up (killing the launch) after this many seconds in all.
        echo: Where progress messages go.

    Returns:
        The summary dict (see :func:`summarize`).

    Raises:
        DemoError: a launch failed unexpectedly, the fault did not fire, or time ran out.
    """
    from tqdm import tqdm

    out = os.path.abspath(out)
    plan = PLANS["quick" if quick else "full"]
    _prepare_out(out)
    os.makedirs(os.path.join(out, "logs"))
    raw = demo_config(out, plan)
    cfg = TrainConfig.from_dict(raw)  # validate before launching anything
    config_path = os.path.join(out, "config.toml")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(to_toml(raw))
    t_start = time.time()
    deadline = t_start + timeout_s

    echo(f"outlast demo: {plan.steps} steps on 2 ranks (DDP, gloo); rank 1 will be killed at step {plan.fault_step}")
    bar = tqdm(total=plan.steps, desc="2 ranks", unit="step", file=sys.stderr, dynamic_ncols=True)
    proc = _launch(config_path, 2, os.path.join(out, "logs", "attempt-1.log"),
                   {FAULT_STEP_ENV: str(plan.fault_step), FAULT_RANK_ENV: "1"})
    rc = _follow(proc, cfg.run_dir, bar, 1, deadline)
    t_exit = time.time()
    bar.close()
    fault_path = os.path.join(cfg.run_dir, FAULT_FILE)
    if rc == 0 or not os.path.exists(fault_path):
        raise DemoError(f"the first launch exited with {rc} but the fault did not fire; see {out}/logs/attempt-1.log")
    with open(fault_path, encoding="utf-8") as f:
        fault = json.load(f)
    echo(f"rank {fault['rank']} (pid {fault['pid']}) SIGKILLed at step {fault['step']}; "
         f"torchrun tore the group down in {t_exit - fault['time']:.1f}s (exit code {rc})")

    echo("resuming on 1 rank from the latest committed checkpoint ...")
    bar = tqdm(total=plan.steps, desc="1 rank ", unit="step", file=sys.stderr, dynamic_ncols=True)
    proc = _launch(config_path, 1, os.path.join(out, "logs", "attempt-2.log"), {})
    rc = _follow(proc, cfg.run_dir, bar, 2, deadline)
    bar.close()
    if rc != 0:
        raise DemoError(f"the resumed launch failed with exit code {rc}; see {out}/logs/attempt-2.log")

    summary = summarize(cfg.run_dir, fault, t_exit)
    summary["wall_s"] = time.time() - t_start
    summary["png"] = os.path.join(out, "loss.png")
    plot(cfg.run_dir, summary, summary["png"])
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def _steps_of(records: list[dict], attempt: int) -> dict[int, dict]:
    return {r["step"]: r for r in records if "loss" in r and r.get("attempt") == attempt}


def summarize(run_dir: str, fault: dict, t_exit: float) -> dict:
    """What the crash cost, from the run's log: steps lost, time to resume, stalls, bytes."""
    records = read_log(run_dir)
    starts = [r for r in records if r.get("event") == "start"]
    if len(starts) < 2 or starts[1].get("resumed_from") is None:
        raise DemoError(f"{run_dir}/{LOSS_LOG} shows no resumed launch")
    first, second = _steps_of(records, 1), _steps_of(records, 2)
    resumed = int(starts[1]["resumed_from"])
    done_before_crash = int(fault["step"]) - 1
    first_after = second[min(second)]
    recomputed = [s for s in second if s in first]
    rel = [abs(second[s]["loss"] - first[s]["loss"]) / abs(first[s]["loss"]) for s in recomputed]
    saves = [r for r in records if r.get("event") == "save"]
    stalls = [r["stall_s"] for r in saves]
    nbytes = [r["nbytes"] for r in saves if r.get("nbytes")]
    final = second[max(second)]
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    committed = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step-")) if os.path.isdir(ckpt_dir) else []
    return {
        "steps": max(second),
        "fault_step": int(fault["step"]),
        "killed_rank": int(fault["rank"]),
        "resumed_from_step": resumed,
        "steps_lost": done_before_crash - resumed,
        "world_size_before": starts[0]["world_size"],
        "world_size_after": starts[1]["world_size"],
        "time_to_detect_s": t_exit - fault["time"],
        "time_to_resume_s": first_after["time"] - fault["time"],
        "restore_s": starts[1]["restore_s"],
        "saves": len(saves),
        "stall_per_save_s": {"mean": sum(stalls) / len(stalls), "max": max(stalls)} if stalls else None,
        "bytes_per_checkpoint": nbytes[-1] if nbytes else None,
        "bytes_written": sum(nbytes),
        "recomputed_steps": len(recomputed),
        "recomputed_max_rel_diff": max(rel) if rel else None,
        "first_loss": first[min(first)]["loss"],
        "final_loss": final["loss"],
        "latest_checkpoint": os.path.join(ckpt_dir, committed[-1]) if committed else None,
    }


def plot(run_dir: str, summary: dict, png: str) -> None:
    """Loss per step, the crash and the resume marked, saved as ``png`` (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DemoError("the demo's plot needs matplotlib: pip install 'outlast[demo]'") from e
    records = read_log(run_dir)
    first, second = _steps_of(records, 1), _steps_of(records, 2)
    saves = sorted({r["step"] for r in records if r.get("event") == "save"})
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    ax.plot(list(first), [r["loss"] for r in first.values()], color="tab:blue", lw=1.6,
            label=f"{summary['world_size_before']} ranks (DDP)")
    k, s = summary["fault_step"], summary["resumed_from_step"]
    # The resumed curve starts from the restored checkpoint's step.
    xs = ([s] if s in first else []) + list(second)
    ys = ([first[s]["loss"]] if s in first else []) + [r["loss"] for r in second.values()]
    ax.plot(xs, ys, color="tab:orange", lw=1.6,
            label=f"{summary['world_size_after']} rank, resumed from step {s}")
    ax.axvline(k, color="tab:red", ls="--", lw=1.2)
    ax.annotate(f"rank {summary['killed_rank']} SIGKILLed\nat step {k}", xy=(k, 0.55), xycoords=("data", "axes fraction"),
                xytext=(6, 0), textcoords="offset points", color="tab:red", va="center", fontsize=9)
    ax.axvspan(s, k - 1, color="tab:red", alpha=0.08, lw=0,
               label=f"{summary['steps_lost']} steps lost, recomputed")
    if s in first:
        ax.plot([s], [first[s]["loss"]], marker="o", ms=7, color="tab:orange", mec="black")
        ax.annotate(f"restored step-{s} on {summary['world_size_after']} rank\n"
                    f"{summary['time_to_resume_s']:.1f}s after the crash",
                    xy=(s, first[s]["loss"]), xytext=(10, 14), textcoords="offset points", fontsize=9)
    ymin = ax.get_ylim()[0]
    ax.plot(saves, [ymin] * len(saves), ls="none", marker="^", ms=6, color="tab:green", clip_on=False,
            label="checkpoint saved")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title("outlast demo: a rank dies, training resumes on fewer ranks")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def format_summary(s: dict) -> str:
    """The summary as the few lines the demo prints."""
    def mib(n):
        return "-" if n is None else f"{n / 2**20:.1f} MiB"

    stall = s["stall_per_save_s"]
    lines = [
        f"trained {s['steps']} steps; loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}",
        f"crash:       rank {s['killed_rank']} SIGKILLed at step {s['fault_step']} "
        f"(on {s['world_size_before']} ranks); group torn down after {s['time_to_detect_s']:.1f}s",
        f"resume:      from step {s['resumed_from_step']} on {s['world_size_after']} rank, no conversion; "
        f"steps lost: {s['steps_lost']}; time to resume: {s['time_to_resume_s']:.1f}s "
        f"(restore {s['restore_s']:.2f}s)",
    ]
    if s["recomputed_max_rel_diff"] is not None:
        lines.append(f"recomputed:  {s['recomputed_steps']} steps on 1 rank match the 2-rank losses "
                     f"to {s['recomputed_max_rel_diff']:.1e} (relative)")
    if stall:
        lines.append(f"checkpoints: {s['saves']} saves, stall per save {stall['mean'] * 1e3:.0f} ms mean / "
                     f"{stall['max'] * 1e3:.0f} ms max; {mib(s['bytes_per_checkpoint'])} each, "
                     f"{mib(s['bytes_written'])} written")
    lines.append(f"latest:      {s['latest_checkpoint']}")
    lines.append(f"plot:        {s['png']}")
    lines.append(f"wall time:   {s['wall_s']:.0f}s")
    return "\n".join(lines)
