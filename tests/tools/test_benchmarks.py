"""The benchmark tools run on a tiny configuration and print every figure they promise (figures themselves
are machine-dependent: never asserted beyond being positive)."""

from __future__ import annotations

import pytest

from conftest import tiny
from selfsup.tools import benchmark_data, benchmark_step

pytestmark = pytest.mark.slow


def test_benchmark_data_prints_views_loaders_and_training(capsys):
    benchmark_data.main(["--batches", "2", "--repeats", "1", "--compare", "--", *tiny("simclr"), "device=cpu"])
    out = capsys.readouterr().out.splitlines()
    modes = [line.split()[1] for line in out]
    assert modes[:2] == ["per_sample", "batched"] and "torchvision_on_batch" in modes
    assert {"cache=none", "cache=memory"} <= set(modes)
    assert "x per_sample" in out[1] and "% of the synthetic step rate" in out[-1]
    assert all(float(line.split("img/s")[0].split()[-1].replace(",", "")) > 0 for line in out)
    # --what picks sections: the loaders alone (what the GPU check measures for nvJPEG decoding)
    benchmark_data.main(["--batches", "2", "--what", "loader", "--", *tiny("simclr"), "device=cpu"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["loader", "loader"]
    with pytest.raises(SystemExit):
        benchmark_data.main(["--what", "views,speed"])
    assert "--what views,speed: choose sections from views, loader, train" in capsys.readouterr().err


def test_benchmark_step_times_the_step_and_the_lars_step(capsys):
    r = benchmark_step.benchmark([*tiny("simclr"), "device=cpu"], steps=2, warmup=1)
    assert r["img_per_s"] > 0 and r["batch"] == 16 and r["algo"] == "SimCLR"
    benchmark_step.main(["--lars", "--steps", "2", "--", *tiny("simclr"), "device=cpu"])
    out = capsys.readouterr().out
    assert "LARS step over" in out and "foreach" in out and "loop" in out
