"""`outlast demo serve` end to end: a model trains in the background, `serve --watch` follows it, clients see
the served step advance, and the completion a client got for the last step is what that step's checkpoint computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fleet_helpers import SRC

pytestmark = pytest.mark.slow


def test_demo_serve_step_advances_and_plots(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    env.pop("OUTLAST_ADMIN_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "outlast.cli", "demo", "serve", "--out", str(out), "--train-seconds", "8",
                        "--every", "15", "--timeout", "100", "--json"], capture_output=True, text=True, env=env, timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads(r.stdout)
    assert s["failed"] == 0 and s["requests"] > 0
    served = s["steps_served"]
    # the served step advanced while the clients ran, and the last committed step was served
    assert len(served) >= 2 and served[-1] == s["steps_committed"][-1] > served[0], s
    with open(out / "serve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The response that claims the last step equals a fresh engine on that step's checkpoint (greedy).
    from outlast.serve import EngineConfig, SamplingParams, load_engine
    from outlast.serve.reload import committed_steps

    last = s["steps"][-1]
    path = committed_steps(str(out / "run"))[last["step"]]
    eng = load_engine(path, EngineConfig(max_num_seqs=2, kv_cache_gib=0.01), tokenizer=str(out / "tokenizer"))
    reqs = [json.loads(line) for line in open(out / "requests.jsonl")]
    claimed = next(q for q in reqs if q["ok"] and q["step"] == last["step"])
    ids = eng.generate([eng.tokenizer.encode(claimed["prompt"])], SamplingParams(temperature=0, max_tokens=24))[0]
    assert eng.tokenizer.decode(ids) == claimed["text"]
