"""A short kill -9 soak (bench/soak.py runs 1,000 trials): no cut save loses or corrupts a checkpoint."""

import soak_cases  # tests/ is on sys.path (tests/conftest.py)


def test_kill_and_fault_soak_never_loses_or_corrupts(tmp_path):
    lines = []
    counts = soak_cases.run(45, seed=1, root=str(tmp_path), log=lines.append)
    assert counts["wrong"] == 0 and counts["lost"] == 0, lines
    assert counts["trials"] == 45
    # the soak must actually have cut saves, failed them, and let some through
    assert counts["killed"] >= 10 and counts["faulted"] >= 5, counts
    assert counts["loaded_new"] >= 1 and counts["loaded_old"] >= 1, counts
    assert set(counts["by_kind"]) >= {"save:kill", "save-nfs:kill", "checkpointer:kill"}, counts
