"""The suite cannot pass by skipping: an unexpected skip or xfail fails the run."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, body):
    (tmp_path / "test_x.py").write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "skip_guard", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )


def test_an_import_failure_skip_fails_the_run(tmp_path):
    p = _run(tmp_path, """
        import pytest
        np = pytest.importorskip("no_such_module_anywhere")
        def test_a(): pass
    """)
    assert p.returncode == 1, p.stdout
    assert "unexpected skips" in p.stdout and "no_such_module_anywhere" in p.stdout


def test_xfail_fails_the_run_but_an_allowed_skip_does_not(tmp_path):
    p = _run(tmp_path, """
        import pytest
        @pytest.mark.xfail(reason="broken for now")
        def test_a(): assert False
        def test_b(): pass
    """)
    assert p.returncode == 1 and "broken for now" in p.stdout, p.stdout
    p = _run(tmp_path, """
        import pytest
        def test_a(): pytest.skip("needs CUDA: no GPU on this machine")
        def test_b(): pass
    """)
    assert p.returncode == 0, p.stdout
