"""The 2-process == 1-process harness (tests/ranks.py) on algorithms whose equality is known (SimCLR's
gathered negatives, BYOL's EMA target, both with SyncBN), and a control it must reject."""

from __future__ import annotations

import pytest
from ranks import check_algorithm_ranks


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_two_processes_equal_one(name, tmp_path):
    check_algorithm_ranks(name, tmp_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_harness_rejects_per_rank_batch_norm(tmp_path):
    """Without SyncBN each rank normalises its own half of the batch: not what 1 process computes."""
    with pytest.raises(AssertionError, match="simclr"):
        check_algorithm_ranks("simclr", sync_bn=False, steps=1, tmp_dir=tmp_path)
