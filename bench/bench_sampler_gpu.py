"""Fused Triton Gumbel mask sampler on a CUDA GPU: time, achieved bandwidth, the original beside it.

LLaMA-2 7B's four linear layers (qkv 12288x4096, proj 4096x4096, fc1 22016x4096, fc2
4096x11008), 2:4 masks, bf16 weights, fp32 logits and the bf16 ``main_grad`` the trainer
accumulates into. Forward (``sample_masked_weight``, backend ``triton``) and backward (the
kernel adds the logits gradient into ``main_grad``; the weight is frozen) are each timed with
CUDA events: ``--warmup`` runs (the first compiles), then the median of ``--repeats``.

Memory floor, bytes per weight (2:4 has C / M = 1.5 fp32 logits per weight):

* forward 10: logits read 6, weight read 2, ``W * mask`` written 2;
* backward 16: logits read 6, bf16 ``main_grad`` (1.5 values per weight) read 3 and written 3,
  weight read 2, incoming ``d(W * mask)`` read 2.

The per-program partial sums of the regulariser (one fp32 per 128 groups) and scalar reads are
not counted. Achieved bandwidth = floor bytes / median time, as a fraction of the device's peak:
H200 4.8 TB/s, H100 SXM 3.35 TB/s, A100 80GB 2.0 TB/s by device name, otherwise a measured
device-to-device copy (bytes read + written / time).

Beside it, the original (NVlabs/MaskLLM) eager formulation: ``F.gumbel_softmax(kappa * logits,
tau)`` -> ``@ candidates`` -> ``W * mask`` with autograd; its backward ends with
``main_grad += logits.grad`` (megatron's DDP hook), so both leave ``main_grad`` in the same state.

Without a CUDA device it says so on stderr and exits with status 2 (not run; 0 means it ran).

    python bench/bench_sampler_gpu.py [--repeats 20] [--warmup 3]
                                      [--out bench/results/sampler_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.sampling import sample_masked_weight

LLAMA2_7B = {"qkv": (12288, 4096), "proj": (4096, 4096), "fc1": (22016, 4096),
             "fc2": (4096, 11008)}
PATTERN = NMPattern(2, 4)
TAU, KAPPA = 4.0, 100.0
FORWARD_BYTES_PER_WEIGHT = 10
BACKWARD_BYTES_PER_WEIGHT = 16


def peak_bandwidth(name: str) -> tuple[float, str]:
    """``(bytes/s, source)``: the data-sheet figure for known parts, else a measured copy."""
    if "H200" in name:
        return 4.8e12, "spec (H200)"
    if "H100" in name and "PCIe" not in name and "NVL" not in name:
        return 3.35e12, "spec (H100 SXM)"
    if "A100" in name and "80GB" in name:
        return 2.0e12, "spec (A100 80GB)"
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = median_ms(lambda: None, lambda _: dst.copy_(src), repeats=10, warmup=2) / 1e3
    return 2 * src.numel() / seconds, "measured device-to-device copy"


def median_ms(setup, body, repeats: int, warmup: int) -> float:
    """Median CUDA-event time of ``body(setup())``; ``setup`` runs outside the timed span."""
    times = []
    for i in range(warmup + repeats):
        state = setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        body(state)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def fused_forward(weight, logits, main_grad):
    return sample_masked_weight(weight, logits, PATTERN, tau=TAU, kappa=KAPPA, key=1,
                                backend="triton", main_grad=main_grad)[0]


def original_forward(weight, logits, candidates):
    y = torch.nn.functional.gumbel_softmax(KAPPA * logits, tau=TAU)
    mask = (y @ candidates).reshape(weight.shape)
    return weight * mask.to(weight.dtype)


def original_backward(out, grad_out, logits, main_grad):
    out.backward(grad_out)
    main_grad.add_(logits.grad)  # megatron's DDP hook
    logits.grad = None


def measure(rows: int, cols: int, repeats: int, warmup: int) -> dict:
    weight = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    logits = torch.empty(rows, cols // PATTERN.m, PATTERN.num_candidates,
                         device="cuda").normal_(0.0, 0.01).requires_grad_()
    main_grad = torch.zeros(logits.shape, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    candidates = PATTERN.candidates(torch.float32, "cuda")
    timed = dict(
        forward_ms=median_ms(lambda: None, lambda _: fused_forward(weight, logits, main_grad),
                             repeats, warmup),
        backward_ms=median_ms(lambda: fused_forward(weight, logits, main_grad),
                              lambda out: out.backward(grad_out), repeats, warmup),
        original_forward_ms=median_ms(
            lambda: None, lambda _: original_forward(weight, logits, candidates), repeats,
            warmup),
        original_backward_ms=median_ms(
            lambda: original_forward(weight, logits, candidates),
            lambda out: original_backward(out, grad_out, logits, main_grad), repeats, warmup))
    n = rows * cols
    return dict(timed, forward_bytes=FORWARD_BYTES_PER_WEIGHT * n,
                backward_bytes=BACKWARD_BYTES_PER_WEIGHT * n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench/results/sampler_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_sampler_gpu: no CUDA device, nothing measured (exit status 2)",
              file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name()
    peak, source = peak_bandwidth(name)
    print(f"{name}: peak {peak / 1e12:.2f} TB/s ({source}); pattern {PATTERN}, bf16 weights, "
          f"fp32 logits, bf16 main_grad, tau={TAU} kappa={KAPPA}")
    header = (f"{'layer':<5} {'shape':>11} {'fwd ms':>7} {'fwd TB/s':>8} {'fwd peak':>8} "
              f"{'bwd ms':>7} {'bwd TB/s':>8} {'bwd peak':>8} {'orig fwd':>8} {'orig bwd':>8} "
              f"{'speedup':>7}")
    print(header)
    print("-" * len(header))
    results = []
    for layer, (rows, cols) in LLAMA2_7B.items():
        row = dict(layer=layer, rows=rows, cols=cols, **measure(rows, cols, args.repeats,
                                                                 args.warmup))
        for phase in ("forward", "backward"):
            row[f"{phase}_bytes_per_s"] = row[f"{phase}_bytes"] / (row[f"{phase}_ms"] / 1e3)
            row[f"{phase}_fraction_of_peak"] = row[f"{phase}_bytes_per_s"] / peak
        row["speedup"] = ((row["original_forward_ms"] + row["original_backward_ms"])
                          / (row["forward_ms"] + row["backward_ms"]))
        results.append(row)
        print(f"{layer:<5} {f'{rows}x{cols}':>11} {row['forward_ms']:7.3f} "
              f"{row['forward_bytes_per_s'] / 1e12:8.2f} {row['forward_fraction_of_peak']:8.0%} "
              f"{row['backward_ms']:7.3f} {row['backward_bytes_per_s'] / 1e12:8.2f} "
              f"{row['backward_fraction_of_peak']:8.0%} {row['original_forward_ms']:8.3f} "
              f"{row['original_backward_ms']:8.3f} {row['speedup']:6.1f}x")
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "peak_bytes_per_s": peak, "peak_source": source,
                               "pattern": str(PATTERN), "tau": TAU, "kappa": KAPPA,
                               "bytes_per_weight": {"forward": FORWARD_BYTES_PER_WEIGHT,
                                                    "backward": BACKWARD_BYTES_PER_WEIGHT},
                               "repeats": args.repeats, "layers": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
