"""Retention rules (pure): keep_last, keep_every, the newest valid is never deleted."""

import pytest

from outlast.checkpointer import plan_retention, step_dir_name


def test_keep_last():
    assert plan_retention([1, 2, 3, 4, 5], [], keep_last=2, keep_every=None) == [1, 2, 3]


def test_keep_every_is_forever():
    assert plan_retention([100, 200, 300, 400, 500], [], keep_last=1, keep_every=200) == [100, 300]


def test_keep_all_by_default():
    assert plan_retention([1, 2, 3], [], keep_last=None, keep_every=None) == []


def test_only_valid_one_never_deleted():
    # The newest directory is corrupt: it does not count, and the only valid one stays.
    assert plan_retention([3], [4], keep_last=1, keep_every=None) == []
    assert plan_retention([], [1, 2], keep_last=1, keep_every=None) == []


def test_invalid_older_than_newest_valid_are_removed_newer_are_left():
    assert plan_retention([2, 5], [1, 3, 7], keep_last=1, keep_every=None) == [1, 2, 3]


def test_step_dir_sorts():
    names = [step_dir_name(s) for s in (1200, 5, 99999)]
    assert names == ["step-00001200", "step-00000005", "step-00099999"]
    assert sorted(names) == [step_dir_name(s) for s in (5, 1200, 99999)]


@pytest.mark.parametrize("kw", [{"keep_last": 0}, {"keep_every": -1}, {"if_busy": "drop"}, {"max_in_flight": 0}, {"num_writers": 0}])
def test_config_errors_name_the_argument(tmp_path, kw):
    import outlast

    with pytest.raises(ValueError, match=next(iter(kw))):
        outlast.Checkpointer(tmp_path, **kw)
