"""kill -9 during saves, repeatedly: restore always returns a committed step, bit-exact."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import outlast

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from crash_child import expected  # noqa: E402

SRC = os.path.abspath(os.path.join(HERE, "..", "..", "src"))


def run_and_kill(directory: str, delay: float) -> tuple[int | None, int | None]:
    """Start the child; once it has committed a save of its own, kill it ``delay`` s later
    (it saves every step, so the kill lands in a save). Returns (restored start, last
    committed step it reported)."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "crash_child.py"), directory],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        for line in p.stdout:
            lines.append(line.strip())
            if line.startswith("committed"):
                ready.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        if not ready.wait(120):
            p.kill()
            raise AssertionError(f"child never committed a save: {p.stderr.read()[-2000:]}")
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    t.join(timeout=10)
    start = lines[0].split()[1]
    committed = [int(x.split()[1]) for x in lines if x.startswith("committed")]
    return (None if start == "None" else int(start)), (max(committed) if committed else None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_during_saves_always_restores_last_committed(tmp_path):
    rng = random.Random(1234)
    directory = str(tmp_path / "run")
    last_restored = None
    for kill in range(8):
        start, committed = run_and_kill(directory, rng.uniform(0.0, 0.6))
        # The child resumed from where the previous one was (or later: a save that
        # committed after its last report).
        if last_restored is not None:
            assert start is not None and start >= last_restored
        state = {"w": torch.zeros(1 << 20, dtype=torch.float64), "v": torch.zeros(7, dtype=torch.int64), "step": -1}
        with outlast.Checkpointer(directory, keep_last=3, keep_every=5) as ckpt:
            got = ckpt.restore(state)
            leftovers = [n for n in os.listdir(directory) if n.startswith(".")]
        assert leftovers == []
        if committed is not None:
            assert got is not None and got >= committed, (kill, got, committed)
        if got is None:
            continue
        assert state["step"] == got
        assert torch.equal(state["w"], expected(got)), f"kill {kill}: data of step {got} is not exact"
        assert torch.equal(state["v"], torch.full((7,), got, dtype=torch.int64))
        last_restored = got
    assert last_restored is not None and last_restored > 0
