"""notebooks/walkthrough.ipynb runs from top to bottom (nbclient, as `make notebook` does) and is committed
without outputs."""

from __future__ import annotations

import os

import nbformat
import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def test_the_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs before committing"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_notebook_runs(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SELFSUP_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # t-SNE, MAE panels, curves
    text = "".join(o.get("text", "") for o in outputs)
    assert "kNN top-1: random init" in text and "knn: top1_k20 = " in text and "linear: " in text
    assert (tmp_path / "runs" / "simclr" / "benchmarks" / "results.md").is_file()
