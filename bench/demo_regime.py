"""How much one-shot 2:4 pruning costs the demo model as its dense pretraining goes on.

Learned masks can only show what they are worth where pruning hurts. This bench pretrains a
demo-like model (the demo size's fields, any of them overridden by flags), keeps it every
``--every`` iterations, and at each kept iteration measures the held-out PPL of the dense model
and of its one-shot 2:4 prunings (magnitude, Wanda, SparseGPT mask only): the pruning cost
(pruned / dense - 1) over training. It is how the demo's size was chosen (README, "The demo").

    PYTHONPATH=$PWD python bench/demo_regime.py [--size default|tiny] [--every 300]
        [--layers 4 --hidden 128 --vocab 512 --seq 128 --pretrain-iters 1200 --init-std 0.1 ...]
        [--workdir DIR] [--out FILE.json]

Prints a table and writes JSON (the size, every point, wall times).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

METHODS = ("magnitude", "wanda", "sparsegpt")  # mask only, 2:4
OVERRIDABLE = ("layers", "hidden", "heads", "ffn", "vocab", "seq", "micro_batch",
               "global_batch", "pretrain_iters", "pretrain_lr", "init_std", "calib_samples",
               "heldout_chars")


def regime(args, size, log) -> dict:
    """Pretrain (kept every ``args.every`` iterations), then prune and measure each kept
    model; returns the points (iteration, dense PPL, PPL and cost per method)."""
    from maskllm_megatron import demo

    steps, prep = demo.prepare(args.workdir, size, progress=args.progress, device="cpu",
                               log=log, keep_every=args.every)
    run = Path(prep.dense)
    points = []
    for iteration in range(args.every, size.pretrain_iters + 1, args.every):
        ckpt = run / f"iter_{iteration:07d}"
        point = {"iteration": iteration}
        label = f"held-out PPL: dense at iteration {iteration}"
        point["dense"] = steps.run(
            f"ppl-dense-{iteration}", lambda c=ckpt, lb=label: demo.heldout_ppl(
                prep, c, lb, str(run)), label)["ppl"]
        for method in METHODS:
            out = prep.workdir / "regime" / f"{method}-{iteration}"
            steps.run(f"prune-{method}-{iteration}", lambda m=method, o=out, c=ckpt: (
                demo.prune_one(prep, m, False, o, load=c, model_config=str(run))),
                f"one-shot 2:4 {method} at iteration {iteration}")
            label = f"held-out PPL: {method} at iteration {iteration}"
            point[method] = steps.run(
                f"ppl-{method}-{iteration}", lambda o=out, lb=label: demo.heldout_ppl(
                    prep, o / "pruned", lb), label)["ppl"]
        point["cost"] = {m: point[m] / point["dense"] - 1 for m in METHODS}
        log(json.dumps(point))
        points.append(point)
    return {"points": points, "pretrain_seconds": steps.results["pretrain"]["seconds"]}


def markdown(result: dict) -> str:
    lines = ["| pretraining iteration | dense PPL | magnitude 2:4 | Wanda 2:4 | SparseGPT 2:4 |",
             "|---|---|---|---|---|"]
    for p in result["points"]:
        cells = " | ".join(f"{p[m]:.2f} ({p['cost'][m]:+.1%})" for m in METHODS)
        lines.append(f"| {p['iteration']} | {p['dense']:.2f} | {cells} |")
    s = result["size"]
    lines += ["", f"{s['layers']} layers, d={s['hidden']}, vocabulary {s['vocab']}, sequence "
              f"{s['seq']}, initialisation std {s['init_std']}, pretrained {s['pretrain_iters']}"
              f" iterations of {s['global_batch']} x {s['seq']} tokens at lr {s['pretrain_lr']}"
              f" (cosine; the kept models are mid-schedule except the last); held-out PPL "
              f"(one-shot masks, no weight update; in brackets: the cost over dense)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["default", "tiny"])
    parser.add_argument("--every", type=int, default=300, help="keep and measure the dense "
                        "model every this many pretraining iterations")
    for field in OVERRIDABLE:
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, default=None,
                            type=float if field in ("pretrain_lr", "init_std") else int)
    parser.add_argument("--workdir", default=None, help="cached steps (default: "
                        "bench/results/regime-work-SIZE)")
    parser.add_argument("--out", default=None, help="JSON (default: "
                        "bench/results/demo-regime-SIZE.json; the .md beside it)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()

    from maskllm_megatron import demo, distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    size = dataclasses.replace(demo.SIZES[args.size], **{
        f: getattr(args, f) for f in OVERRIDABLE if getattr(args, f) is not None})
    if args.every < 1 or size.pretrain_iters % args.every:
        parser.error(f"--every {args.every} must divide --pretrain-iters {size.pretrain_iters}")
    args.workdir = args.workdir or f"bench/results/regime-work-{args.size}"
    demo.shakespeare_texts()  # a clear error before any work
    start = time.time()
    try:
        with cpu_shims():
            distributed.init_distributed(1, 1, 1234, device="cpu")
            result = regime(args, size, lambda m: print(m, flush=True))
    finally:
        distributed.shutdown()
    result.update(size=dataclasses.asdict(size), every=args.every,
                  wall_seconds=round(time.time() - start, 1), command=" ".join(sys.argv))
    out = Path(args.out or f"bench/results/demo-regime-{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    out.with_suffix(".md").write_text(text + "\n")
    out.write_text(json.dumps(result, indent=1))
    print(text)
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {out}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
