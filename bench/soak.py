"""kill -9 soak: N saves cut at random file-system calls, by injected disk faults, or at random
moments of an asynchronous Checkpointer save; each followed by a restart-style load.

The figures that matter: ``wrong`` = 0 (a load returned data that was never saved) and
``lost`` = 0 (the last committed checkpoint no longer loaded, or an older one came back).
Baseline in the same run: the same kill points against a naive writer, ``torch.save``
straight onto the checkpoint path (what many training scripts do), counted the same way.

    PYTHONPATH=src python bench/soak.py --trials 1000
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import soak_cases  # noqa: E402
from _common import emit_json, print_table  # noqa: E402


def naive_baseline(trials: int, seed: int, root: str) -> dict:
    """torch.save onto the final path, killed at a random write call: how often is it lost?"""
    rnd = random.Random(seed)
    path = os.path.join(root, "naive.pt")
    torch.save(soak_cases.state_for(0)["model"], path)
    lost = ok = 0
    for i in range(trials):
        at = rnd.randint(1, 8)  # torch.save's zip writer makes a handful of write calls
        pid = os.fork()
        if pid == 0:
            import io

            n = [0]

            class Cut(io.FileIO):
                def write(self, b):
                    n[0] += 1
                    if n[0] == at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return super().write(b)

            with Cut(path, "w") as f:
                torch.save(soak_cases.state_for(i + 1)["model"], f)
            os._exit(0)
        os.waitpid(pid, 0)
        try:
            torch.load(path, weights_only=True)
            ok += 1
        except Exception:  # noqa: BLE001 - a lost checkpoint, whatever the error
            lost += 1
            torch.save(soak_cases.state_for(0)["model"], path)
    return {"trials": trials, "lost": lost, "loaded": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-trials", type=int, default=200)
    args = ap.parse_args()
    problems = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        counts = soak_cases.run(args.trials, args.seed, d, log=problems.append)
        secs = time.perf_counter() - t0
        base = naive_baseline(args.baseline_trials, args.seed, d)
    rows = [[k, v] for k, v in sorted(counts["by_kind"].items())]
    print_table(["mode:how", "trials"], rows, f"soak: {counts['trials']} trials in {secs:.1f} s")
    print_table(
        ["system", "trials", "killed", "faulted", "completed", "loaded new", "loaded old", "recovered .old", "WRONG", "LOST"],
        [["outlast", counts["trials"], counts["killed"], counts["faulted"], counts["completed"], counts["loaded_new"],
          counts["loaded_old"], counts["recovered_old"], counts["wrong"], counts["lost"]],
         ["torch.save onto the path (baseline)", base["trials"], base["trials"], 0, "-", base["loaded"], "-", "-", "-", base["lost"]]],
    )
    print(f"file-system calls per save: {counts['events_per_save']}")
    for p in problems[:10]:
        print("  ", p)
    emit_json({"bench": "soak", "seconds": round(secs, 1), **{k: v for k, v in counts.items()}, "baseline_torch_save": base})
    sys.exit(1 if counts["wrong"] or counts["lost"] else 0)


if __name__ == "__main__":
    main()
