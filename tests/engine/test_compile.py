"""``compile=true`` with each ``compile_mode``: the trainer compiles the algorithm's compile targets in place and
trains exactly as the eager run does (here on the CPU: inductor's C++ kernels; CUDA graphs apply on a GPU only)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_cfg, tiny
from selfsup.engine.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _run(tmp_path, *overrides: str) -> tuple[Trainer, list[float]]:
    cfg = compose_cfg([*tiny("mae"), "dataset.num_samples=48", "knn.enabled=false", "log.interval=1", *overrides])
    trainer = Trainer(cfg, tmp_path / "_".join(overrides))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize(
    ("device", "mode", "rtol"),
    [
        ("cpu", "reduce-overhead", 1e-4),  # the mode reaches torch.compile; CUDA graphs are skipped on the CPU
        pytest.param("cuda", "reduce-overhead", 1e-3, marks=pytest.mark.cuda),  # + CUDA graphs (TF32 convs)
    ],
)
def test_a_compiled_run_trains_like_the_eager_one(tmp_path, device, mode, rtol):
    torch._dynamo.reset()
    eager, want = _run(tmp_path, f"device={device}", "precision=fp32")
    compiled, got = _run(tmp_path, f"device={device}", "precision=fp32", "compile=true", f"compile_mode={mode}")
    targets = compiled.algo.compile_targets()
    assert targets and all(m._compiled_call_impl is not None for m in targets)  # compiled in place ...
    assert eager.algo.backbone._compiled_call_impl is None
    assert compiled.algo.state_dict().keys() == eager.algo.state_dict().keys()  # ... with the same checkpoint keys
    assert len(got) == len(want) == 3
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)  # kernels fused differently: rounding apart
