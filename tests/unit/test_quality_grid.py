"""bench/quality.py's grid: one factor at a time around the base cell, one budget and seed for
every cell, and skipped cells that say why. No training."""

import importlib.util
import sys
from pathlib import Path

import pytest

from maskllm_megatron import demo

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_reduced_grid_varies_each_factor_once_around_the_base(quality):
    fields = quality.train_fields() | {"kd_weight", "kd_temperature"}
    cells = quality.grid_cells("reduced", 40, fields, demo.SIZES["tiny"])
    names = [c.name for c in cells]
    assert len(names) == len(set(names))
    assert cells[0].name == "base" and cells[0].levels == quality.BASE
    assert quality.BASE == {"prior": "sparsegpt", "reg": "on", "loss": "ce", "pattern": "2:4",
                            "schedule": "paper", "strength": "3", "lr": "demo"}
    seen = {f: {quality.BASE[f]} for f in quality.FACTORS}
    for cell in cells[1:]:
        changed = [f for f in quality.FACTORS if cell.levels[f] != quality.BASE[f]]
        assert len(changed) == 1, cell  # one factor at a time
        assert cell.levels[changed[0]] not in seen[changed[0]], cell  # each level once
        seen[changed[0]].add(cell.levels[changed[0]])
    assert seen == {f: set(levels) for f, levels in quality.FACTORS.items()}
    assert {"2:4", "1:4", "4:8", "2:8"} == seen["pattern"]
    assert len(cells) == 1 + sum(len(v) - 1 for v in quality.FACTORS.values())
    assert {(c.train_iters, c.seed) for c in cells} == {(40, quality.SEED)}
    assert all(c.skip is None for c in cells)


def test_every_cell_has_the_same_budget_and_its_own_factors(quality):
    cells = quality.grid_cells("full", 7, quality.train_fields() | {"kd_weight"},
                               demo.SIZES["default"])
    assert len(cells) == 3 * 2 * 3 * 4 * 2 * 2 * 2
    assert len({c.name for c in cells}) == len(cells)
    for cell in cells:
        o = cell.overrides()
        assert o["train_iters"] == 7 and o["seed"] == quality.SEED
        assert (o["N"], o["M"]) == cell.pattern
        assert o["weight_reg"] == (1e-5 if cell.levels["reg"] == "on" else 0.0)
        assert o.get("kd_weight", 0.0) == quality.LOSSES[cell.levels["loss"]]
        assert o["prior_strength"] == float(cell.levels["strength"])
        assert ("lr" in o) == (cell.levels["lr"] == "paper")  # else the demo size's
        if "lr" in o:
            assert o["lr"] == 5e-4 and o["min_lr"] == 5e-5
    base = next(c for c in cells if c.name == "base").overrides()
    assert base["gumbel_temperature_range"] == [4.0, 0.05]
    assert base["gumbel_scale_range"] == [1e2, 5e2] and base["gumbel_schedule"] == "linear"
    size = demo.SIZES["default"]
    budget = quality.budget(size, 150)
    assert budget["tokens"] == 150 * size.global_batch * size.seq


def test_cells_that_cannot_run_say_why(quality):
    fields = quality.train_fields() - {"kd_weight"}
    cells = {c.name: c for c in quality.grid_cells("reduced", 40, fields, demo.SIZES["tiny"])}
    for name in ("loss-kd", "loss-mix"):
        assert "kd_weight" in cells[name].skip
    assert cells["base"].skip is None
    odd = demo.SIZES["tiny"].__class__(hidden=68, ffn=272)  # multiples of 4, not of 8
    cells = {c.name: c for c in quality.grid_cells("reduced", 40, fields, odd)}
    assert "M=8" in cells["pattern-4of8"].skip and cells["pattern-1of4"].skip is None
