"""Does compact optimizer state learn the same masks as plain fp32 AdamW, and what does it cost?

A planted problem: a frozen random two-layer MLP whose targets come from the same MLP with a
hidden 2:4 mask. Masks are learned from a neutral start with the trainer's schedules (tau 4 ->
0.05, kappa 1e2 -> 5e2, cosine lr) by the trainer's optimizer (megatron DDP gradient buffers,
``ShardedAdamW``) under each state format; the table reports the share of groups whose learned
argmax equals the planted mask, the hard-mask loss, and the bytes of training state per prunable
weight per GPU at DP=1 (measured) and DP=8 (the moments are sharded over data parallel:
logits + gradient buffer + moments / DP). Writes JSON.

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

FORMATS = {  # name -> (main grads, exp_avg, exp_avg_sq)
    "fp32 AdamW (original)": ("fp32", "fp32", "fp32"),
    "bf16 grads + exp_avg": ("bf16", "bf16", "fp32"),
    "all bf16 (default)": ("bf16", "bf16", "bf16"),
    "bf16 + fp16 exp_avg_sq": ("bf16", "bf16", "fp16"),
}


def run(fmt_flags, seed: int, steps: int, width: int, batch: int, lr: float) -> dict:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from maskllm_megatron.core.nm import NMPattern, hard_mask_from_logits, indices_to_mask
    from maskllm_megatron.core.schedules import GumbelSchedule
    from maskllm_megatron.sampling import NoiseKey, sample_masked_weight
    from maskllm_megatron.training.grads import wrap_model
    from maskllm_megatron.training.optim import ShardedAdamW, state_format

    pattern = NMPattern(2, 4)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(width, width, generator=gen) / math.sqrt(width) for _ in range(2)]
    planted = [torch.randint(0, pattern.num_candidates, (width, width // 4), generator=gen)
               for _ in range(2)]
    teacher = [w * indices_to_mask(p, pattern) for w, p in zip(weights, planted, strict=True)]

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                            use_cpu_initialization=True)
            self.logits = torch.nn.ParameterList(
                torch.randn(width, width // 4, pattern.num_candidates, generator=gen) * 0.01
                for _ in range(2))

    module = Logits()
    logits = list(module.logits)
    fmt = state_format(*fmt_flags)
    chunk = wrap_model(module, fmt.main_grads_dtype, overlap_grad_reduce=False)
    opt = ShardedAdamW([chunk], fmt, lr=lr)
    schedule = GumbelSchedule((4.0, 0.05), (1e2, 5e2), steps)

    def forward(ws, x):
        return ws[1] @ torch.relu(ws[0] @ x)

    for step in range(steps):
        x = torch.randn(width, batch, generator=gen)
        with torch.no_grad():
            target = forward(teacher, x)
        masked = [sample_masked_weight(w, lg, pattern, tau=schedule.tau(step),
                                       kappa=schedule.kappa(step), key=NoiseKey(seed, layer, step),
                                       main_grad=lg.main_grad)[0]
                  for layer, (w, lg) in enumerate(zip(weights, logits, strict=True))]
        loss = (forward(masked, x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        chunk.finish_grad_sync()
        opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
    with torch.no_grad():
        hard = [w * hard_mask_from_logits(lg, pattern)
                for w, lg in zip(weights, logits, strict=True)]
        x = torch.randn(width, 4 * batch, generator=gen)
        hard_loss = float((forward(hard, x) - forward(teacher, x)).square().mean())
        recovered = float(torch.cat([(lg.argmax(-1) == p).flatten()
                                     for lg, p in zip(logits, planted, strict=True)])
                          .float().mean())
    prunable = sum(w.numel() for w in weights)
    held = opt.state_bytes()
    moments = held["exp_avg"] + held["exp_avg_sq"]
    return dict(recovered=recovered, hard_loss=hard_loss,
                bytes_dp1=sum(held.values()) / prunable,
                bytes_dp8=(held["param"] + held["main_grad"] + moments / 8) / prunable)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--out", default="bench/results/optimizer_state.json")
    args = parser.parse_args()

    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    results = {}
    print(f"{'optimizer state':<24} {'B/w DP=1':>9} {'B/w DP=8':>9} {'planted mask found':>19} "
          f"{'hard loss':>10}")
    with cpu_shims():
        distributed.init_distributed(1, 1, device="cpu")
        for name, flags in FORMATS.items():
            runs = [run(flags, seed, args.steps, args.width, args.batch, args.lr)
                    for seed in range(args.seeds)]
            row = dict(bytes_per_prunable_weight_dp1=runs[0]["bytes_dp1"],
                       bytes_per_prunable_weight_dp8=runs[0]["bytes_dp8"],
                       recovered=statistics.mean(r["recovered"] for r in runs),
                       hard_loss=statistics.mean(r["hard_loss"] for r in runs), runs=runs)
            results[name] = row
            print(f"{name:<24} {row['bytes_per_prunable_weight_dp1']:9.2f} "
                  f"{row['bytes_per_prunable_weight_dp8']:9.2f} {row['recovered']:18.1%} "
                  f"{row['hard_loss']:10.4f}")
        distributed.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(settings=vars(args), results=results), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
