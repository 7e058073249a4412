"""Helpers for end-to-end tests: write a small training config, launch the trainer, read its log."""

import os
import subprocess
import sys

import outlast
from outlast.train.demo import to_toml
from outlast.train.loop import read_log

# The src folder of the outlast under test, so subprocesses import the same code.
SRC = os.path.dirname(os.path.dirname(os.path.abspath(outlast.__file__)))


def small_config(run_dir, **top) -> dict:
    """A run of a 2-layer, 64-wide model on 6 short documents per step: about 0.1 s a step."""
    cfg = {
        "run_dir": str(run_dir),
        "steps": 8,
        "progress": False,
        "model": {"preset": "tiny", "n_layers": 2, "d_model": 64, "d_ff": 256, "max_seq_len": 128},
        "data": {"docs_per_step": 6, "max_doc_tokens": 160, "token_budget": 128},
        "optim": {"warmup_steps": 2},
        "checkpoint": {"every": 4},
        "dist": {"timeout_s": 30.0, "threads": 1},
    }
    for key, value in top.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def env_for_subprocess(extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run_train(tmp_path, cfg: dict, nproc: int = 1, *, name: str = "config", timeout: float = 180, env=None):
    """Write ``cfg`` as TOML and run ``outlast train`` on ``nproc`` ranks; return the CompletedProcess."""
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(cfg))
    train = ["-m", "outlast.cli", "train", "--config", str(path)]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", *train]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env_for_subprocess(env))


def check(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def losses(run_dir) -> dict[int, float]:
    """Step -> loss, the last record of each step (a resumed run recomputes lost steps)."""
    return {r["step"]: r["loss"] for r in read_log(str(run_dir)) if "loss" in r}

