"""The outlast command line: inspect, verify, ls; exit codes and --json."""

import json
import os
import subprocess
import sys

import pytest
import torch

import outlast


def run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "outlast.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ckroot(tmp_path):
    for step in (5, 10):
        outlast.save({"model": {"w": torch.ones(4, 4) * step}, "step": step}, str(tmp_path / f"step-{step:08d}"), step=step)
    (tmp_path / ".step-00000015.tmp-abcd" / "data").mkdir(parents=True)
    return tmp_path


def test_inspect_shows_names_shapes_and_totals(ckroot):
    r = run("inspect", str(ckroot / "step-00000010"))
    assert r.returncode == 0, r.stderr
    assert "model.w" in r.stdout and "[4, 4]" in r.stdout and "step 10" in r.stdout and "64 B" in r.stdout
    j = json.loads(run("inspect", "--json", str(ckroot / "step-00000010")).stdout)
    assert j["step"] == 10 and j["tensors"]["model.w"]["shape"] == [4, 4] and j["plain"]["step"] == 10


def test_verify_ok_and_bad(ckroot):
    good = str(ckroot / "step-00000010")
    r = run("verify", good)
    assert r.returncode == 0 and "ok" in r.stdout
    m = outlast.manifest_of(good)
    c = m.tensors["model.w"].chunks[0]
    with open(os.path.join(good, c.file), "r+b") as f:
        f.seek(c.offset)
        f.write(b"\xff\xff")
    r = run("verify", good)
    assert r.returncode == 1
    assert "model.w" in r.stderr and c.file in r.stderr
    j = json.loads(run("verify", "--json", good).stdout)
    assert j["ok"] is False and any("model.w" in p for p in j["problems"])


def test_verify_incomplete_exits_3(ckroot):
    r = run("verify", str(ckroot / ".step-00000015.tmp-abcd"))
    assert r.returncode == 3 and "incomplete" in r.stderr
    r = run("verify", "--json", str(ckroot / "missing"))
    assert r.returncode == 3 and json.loads(r.stdout)["error"] == "CheckpointNotFoundError"


def test_ls_lists_steps_sizes_and_status(ckroot):
    r = run("ls", str(ckroot))
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert "step-00000005" in lines[1] and "step-00000010" in lines[2]
    assert "incomplete" in r.stdout and "committed" in r.stdout
    j = json.loads(run("ls", "--json", str(ckroot)).stdout)
    assert [c["step"] for c in j["checkpoints"] if c["status"] == "committed"] == [5, 10]
