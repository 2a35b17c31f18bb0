"""The demo's results: the table's columns (gap closed as documented), the data its plot is
drawn from, and nothing about internal goals. Synthetic step results, no training."""

import json
import math

import pytest

from maskllm_megatron import demo

PPL = {"dense": 100.0, "magnitude": 120.0, "wanda": 110.0, "sparsegpt": 115.0,
       "sparsegpt+update": 104.0, "maskllm": 112.0, "maskllm+sparsegpt-prior": 102.5}
MODELS = list(PPL)


def _results() -> dict:
    results = {f"ppl-{m}": {"ppl": p, "tokens": 1000, "seconds": 1.5} for m, p in PPL.items()}
    results["pretrain"] = {"seconds": 30.0}
    results.update({f"prune-{m}": {"seconds": 2.0} for m in demo.ONE_SHOT})
    results.update({f"learn-{m}": {"seconds": 20.0} for m in demo.LEARNED})
    results["curve-maskllm"] = {"points": [[8, 400.0], [16, 130.0]]}
    results["curve-maskllm+sparsegpt-prior"] = {"points": [[8, 110.0], [16, 105.0]]}
    return results


def _curves(results: dict, tmp_path) -> dict:
    curves = {}
    for name in demo.LEARNED:
        run = tmp_path / name
        run.mkdir()
        rows = [{"iteration": i, "loss": 3.0 - 0.01 * i, **({"flip_rate": 0.2 / i}
                                                            if i % 4 == 0 else {})}
                for i in range(1, 25)]
        (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        curves[name] = demo.learned_curves(run, results, name, 24)
    return curves


def test_gap_closed_is_measured_from_the_best_one_shot_mask_only_method():
    table = demo.results_table(_results(), MODELS)
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == MODELS
    assert table["best_one_shot_mask_only"] == "wanda"  # sparsegpt+update is lower, not mask-only
    assert table["best_maskllm"] == "maskllm+sparsegpt-prior"
    best, dense = PPL["wanda"], PPL["dense"]
    assert rows["dense"]["gap_closed"] == pytest.approx(1.0)
    assert rows["wanda"]["gap_closed"] == pytest.approx(0.0)
    assert rows["magnitude"]["gap_closed"] == pytest.approx((best - 120) / (best - dense))  # < 0
    assert rows["maskllm+sparsegpt-prior"]["gap_closed"] == pytest.approx(0.75)
    assert rows["sparsegpt+update"]["gap_closed"] is None
    assert rows["sparsegpt+update"]["mask_only"] is False
    assert rows["maskllm"]["mask_only"] is True and rows["dense"]["mask_only"] is None
    assert rows["dense"]["seconds"] == 30.0 and rows["maskllm"]["seconds"] == 20.0
    assert rows["wanda"]["seconds"] == 2.0 and rows["wanda"]["eval_seconds"] == 1.5
    for row in rows.values():
        assert {"method", "label", "kind", "ppl", "gap_closed", "seconds"} <= set(row)
    assert "(B - PPL) / (B - D)" in table["definitions"]["gap_closed"]


def test_the_table_says_what_a_user_needs_and_nothing_about_goals():
    table = demo.results_table(_results(), MODELS)
    markdown = demo.markdown_table(table)
    header = markdown.splitlines()[0]
    for column in ("method", "held-out PPL", "gap closed", "time (s)"):
        assert column in header
    assert "| SparseGPT + weight update | one-shot, weights updated | 104.00 | n/a |" in markdown
    assert "| MaskLLM (SparseGPT prior) | learned mask | 102.50 | 75% |" in markdown
    assert "| dense | dense | 100.00 | 100% |" in markdown
    assert "B = 110.00 for Wanda, the best one-shot mask-only method" in markdown
    for text in (markdown, json.dumps(table)):
        assert "goal" not in text.lower()


def test_the_plot_is_drawn_from_each_learned_run_with_reference_lines(tmp_path):
    results = _results()
    table = demo.results_table(results, MODELS)
    plot = demo.plot_data(table, _curves(results, tmp_path))
    loss, ppl, flips = plot["panels"]
    for panel in plot["panels"]:
        assert [s["run"] for s in panel["series"]] == list(demo.LEARNED)
        assert panel["xlabel"] == "iteration" and panel["ylabel"]
    assert "nats/token" in loss["ylabel"] and "moving average" in loss["smoothing"]
    scratch = loss["series"][0]
    assert scratch["x"] == list(range(1, 25))
    assert scratch["y"][0] == pytest.approx(2.99)  # bias-corrected: starts at the first loss
    assert scratch["y"][-1] > 3.0 - 0.01 * 24  # smoothed: lags the falling loss
    assert ppl["series"][0]["x"] == [8, 16, 24] and ppl["series"][0]["y"] == [400.0, 130.0,
                                                                             112.0]
    assert {r["method"]: r["y"] for r in ppl["reference_lines"]} == {
        m: p for m, p in PPL.items() if m not in demo.LEARNED}
    assert flips["series"][0]["x"] == [4, 8, 12, 16, 20, 24]
    assert flips["series"][0]["y"][0] == pytest.approx(5.0)  # percent
    assert "% per 4 iterations" in flips["ylabel"]
    pytest.importorskip("matplotlib")
    png = demo.render_plot(plot, tmp_path / "results.png")
    assert png is not None and png.stat().st_size > 10_000


def test_ema_of_a_constant_is_the_constant():
    assert all(math.isclose(v, 4.0) for v in demo.ema([4.0] * 30))


def test_the_trainer_progress_bar_says_what_runs():
    from maskllm_megatron.training.args import TrainArgs
    from maskllm_megatron.training.metrics import progress_label

    assert progress_label(TrainArgs(dense=True, train_weights=True)) == "dense pretraining"
    assert progress_label(TrainArgs()) == "mask learning"
    assert progress_label(TrainArgs(train_weights=True)) == "mask and weight learning"
    assert progress_label(TrainArgs(progress_label="mask learning (scratch)")) == \
        "mask learning (scratch)"
