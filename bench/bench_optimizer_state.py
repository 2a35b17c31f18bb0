"""Does compact optimizer state learn the same masks as plain fp32 AdamW?

A planted problem: a frozen random two-layer MLP whose targets come from the same MLP with a
hidden 2:4 mask. Masks are learned from a neutral start with the trainer's schedules (tau 4 ->
0.05, kappa 1e2 -> 5e2, cosine lr) under each optimizer state format; the table reports the share
of groups whose learned argmax equals the planted mask and the hard-mask loss, with the bytes of
state per prunable weight. Writes JSON.

    python bench/bench_optimizer_state.py [--steps 1000 --seeds 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

FORMATS = {  # name -> (main grads, exp_avg, exp_avg_sq, second moment)
    "fp32 AdamW (original)": ("fp32", "fp32", "fp32", "element"),
    "bf16 grads + exp_avg": ("bf16", "bf16", "fp32", "element"),
    "all bf16 (default)": ("bf16", "bf16", "bf16", "element"),
    "bf16 + fp16 exp_avg_sq": ("bf16", "bf16", "fp16", "element"),
    "per-group exp_avg_sq": ("bf16", "bf16", "fp32", "group"),
}


def run(fmt_flags, seed: int, steps: int, width: int, batch: int, lr: float) -> dict:
    from maskllm_megatron.nm import NMPattern, hard_mask_from_logits, indices_to_mask
    from maskllm_megatron.optim import MaskAdamW, mask_state_format
    from maskllm_megatron.sampling import NoiseKey, sample_masked_weight
    from maskllm_megatron.schedules import GumbelSchedule

    pattern = NMPattern(2, 4)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(width, width, generator=gen) / math.sqrt(width) for _ in range(2)]
    planted = [torch.randint(0, pattern.num_candidates, (width, width // 4), generator=gen)
               for _ in range(2)]
    teacher = [w * indices_to_mask(p, pattern) for w, p in zip(weights, planted, strict=True)]
    logits = [torch.nn.Parameter(torch.randn(width, width // 4, pattern.num_candidates,
                                             generator=gen) * 0.01) for _ in range(2)]
    opt = MaskAdamW([{"params": logits, "format": mask_state_format(*fmt_flags)}], lr=lr)
    schedule = GumbelSchedule((4.0, 0.05), (1e2, 5e2), steps)

    def forward(ws, x):
        return ws[1] @ torch.relu(ws[0] @ x)

    for step in range(steps):
        x = torch.randn(width, batch, generator=gen)
        with torch.no_grad():
            target = forward(teacher, x)
        masked = [sample_masked_weight(w, lg, pattern, tau=schedule.tau(step),
                                       kappa=schedule.kappa(step),
                                       key=NoiseKey(seed, layer, step))[0]
                  for layer, (w, lg) in enumerate(zip(weights, logits, strict=True))]
        loss = (forward(masked, x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
    with torch.no_grad():
        hard = [w * hard_mask_from_logits(lg, pattern)
                for w, lg in zip(weights, logits, strict=True)]
        x = torch.randn(width, 4 * batch, generator=gen)
        hard_loss = float((forward(hard, x) - forward(teacher, x)).square().mean())
        recovered = float(torch.cat([(lg.argmax(-1) == p).flatten()
                                     for lg, p in zip(logits, planted, strict=True)])
                          .float().mean())
    bytes_per_weight = sum(opt.state_bytes().values()) / sum(w.numel() for w in weights)
    return dict(recovered=recovered, hard_loss=hard_loss, bytes=bytes_per_weight)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--out", default="bench/results/optimizer_state.json")
    args = parser.parse_args()

    results = {}
    print(f"{'optimizer state':<24} {'bytes/w':>8} {'planted mask found':>19} {'hard loss':>10}")
    for name, flags in FORMATS.items():
        runs = [run(flags, seed, args.steps, args.width, args.batch, args.lr)
                for seed in range(args.seeds)]
        row = dict(bytes_per_prunable_weight=runs[0]["bytes"],
                   recovered=statistics.mean(r["recovered"] for r in runs),
                   hard_loss=statistics.mean(r["hard_loss"] for r in runs), runs=runs)
        results[name] = row
        print(f"{name:<24} {row['bytes_per_prunable_weight']:8.1f} "
              f"{row['recovered']:18.1%} {row['hard_loss']:10.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(settings=vars(args), results=results), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
