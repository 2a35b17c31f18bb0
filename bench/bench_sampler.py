"""Fused Gumbel mask sampler vs the original formulation, forward + backward, on CPU.

Original (NVlabs/MaskLLM): ``F.gumbel_softmax(kappa * logits, tau)`` -> ``@ candidates`` ->
``W * mask``, autograd keeping every intermediate. Fused: ``sample_masked_weight`` with the
C++ kernel (and the PyTorch path for reference), which recomputes instead of storing.

Shapes: LLaMA-2 7B's four linear layers with both dimensions divided by ``--scale`` (default 4).
Time: median of ``--repeats`` forward+backward passes. Memory: peak RSS above the inputs of one
forward+backward in a fresh process (Linux: the peak is reset through ``/proc/self/clear_refs``
once the inputs exist; ``MALLOC_MMAP_THRESHOLD_`` makes freed memory leave RSS).
*Workspace* is that extra memory less what every implementation must hold (W * mask, its
gradient, the logits gradient); it is what the sampler itself adds, and what the memory target
(fused <= 0.25x the original) is judged on. Targets: fused >= 4x faster, <= 0.25x workspace.
Also prints, for the Triton kernel, the bytes one forward+backward must move and the time floor
at H100 bandwidth (3.35 TB/s).

    python bench/bench_sampler.py [--scale 4] [--repeats 5]
                                  [--out bench/results/sampler.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from maskllm_megatron.nm import NMPattern
from maskllm_megatron.sampling import sample_masked_weight

LLAMA2_7B = {"qkv": (12288, 4096), "proj": (4096, 4096), "fc1": (22016, 4096),
             "fc2": (4096, 11008)}
PATTERN = NMPattern(2, 4)
TAU, KAPPA = 4.0, 100.0
H100_BANDWIDTH = 3.35e12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(rows: int, cols: int, dtype: torch.dtype):
    # in-place fills: no temporaries that would raise the baseline peak
    weight = torch.empty(rows, cols, dtype=dtype).normal_()
    logits = torch.empty(rows, cols // PATTERN.m, PATTERN.num_candidates).normal_(0.0, 0.01)
    return weight, logits.requires_grad_()


def step(variant: str, weight: torch.Tensor, logits: torch.Tensor) -> None:
    logits.grad = None
    if variant == "original":
        y = torch.nn.functional.gumbel_softmax(KAPPA * logits, tau=TAU)
        mask = (y @ PATTERN.candidates(torch.float32)).reshape(weight.shape)
        out = weight * mask.to(weight.dtype)
    else:
        out, _ = sample_masked_weight(weight, logits, PATTERN, tau=TAU, kappa=KAPPA, key=1,
                                      backend=variant)
    out.backward(torch.ones_like(out))


def child(variant: str, rows: int, cols: int, dtype: str) -> None:
    """Runs in a fresh process: prints peak extra bytes of one forward+backward."""
    step(variant, *make_inputs(64, 256, DTYPES[dtype]))  # load libraries, start threads
    weight, logits = make_inputs(rows, cols, DTYPES[dtype])
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline = psutil.Process().memory_info().rss
    step(variant, weight, logits)
    peak = _vm_hwm()
    print(json.dumps({"extra_bytes": max(0, peak - baseline)}))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_extra_memory(variant: str, rows: int, cols: int, dtype: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(rows), str(cols),
                          dtype], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def median_time(variant: str, weight, logits, repeats: int) -> float:
    step(variant, weight, logits)  # warm-up (builds the C++ kernel once)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(variant, weight, logits)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unavoidable_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """W * mask and its incoming gradient (weight dtype) plus the fp32 logits gradient."""
    w = rows * cols * torch.finfo(dtype).bits // 8
    return 2 * w + rows * cols // PATTERN.m * PATTERN.num_candidates * 4


def triton_traffic(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes one fused forward + backward must read and write (weight grad off)."""
    w = rows * cols * torch.finfo(dtype).bits // 8
    logits = rows * cols // PATTERN.m * PATTERN.num_candidates * 4
    forward = w + logits + w  # read W, logits; write W * mask
    backward = w + w + logits + logits  # read dOut, W, logits; write d logits
    return forward + backward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out", default="bench/results/sampler.json")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "ROWS", "COLS", "DTYPE"))
    args = parser.parse_args()
    if args.child:
        variant, rows, cols, dtype = args.child
        child(variant, int(rows), int(cols), dtype)
        return 0

    results = []
    header = (f"{'layer':<6} {'shape':>12} {'dtype':>5} {'orig ms':>8} {'fused ms':>9} "
              f"{'torch ms':>9} {'speedup':>8} {'extra MiB o/f':>14} {'workspace MiB o/f':>18} "
              f"{'ratio':>6} "
              f"{'H100 floor us':>13}")
    print(f"threads={torch.get_num_threads()}  pattern={PATTERN}  tau={TAU}  kappa={KAPPA}")
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for name, (rows, cols) in LLAMA2_7B.items():
            rows, cols = rows // args.scale, cols // args.scale
            weight, logits = make_inputs(rows, cols, dtype)
            t_orig = median_time("original", weight, logits, args.repeats)
            t_fused = median_time("cpu", weight, logits, args.repeats)
            t_torch = median_time("torch", weight, logits, max(1, args.repeats // 2))
            m_orig = peak_extra_memory("original", rows, cols, dtype_name)
            m_fused = peak_extra_memory("cpu", rows, cols, dtype_name)
            traffic = triton_traffic(rows, cols, dtype)
            need = unavoidable_bytes(rows, cols, dtype)
            ws_orig, ws_fused = max(0, m_orig - need), max(0, m_fused - need)
            row = dict(layer=name, rows=rows, cols=cols, dtype=dtype_name,
                       original_s=t_orig, fused_s=t_fused, torch_path_s=t_torch,
                       speedup=t_orig / t_fused, original_extra_bytes=m_orig,
                       fused_extra_bytes=m_fused, unavoidable_bytes=need,
                       original_workspace_bytes=ws_orig, fused_workspace_bytes=ws_fused,
                       memory_ratio=ws_fused / max(1, ws_orig),
                       triton_bytes=traffic, h100_floor_s=traffic / H100_BANDWIDTH)
            results.append(row)
            print(f"{name:<6} {f'{rows}x{cols}':>12} {dtype_name:>5} {t_orig * 1e3:8.1f} "
                  f"{t_fused * 1e3:9.1f} {t_torch * 1e3:9.1f} {row['speedup']:7.2f}x "
                  f"{m_orig / 2**20:6.1f}/{m_fused / 2**20:<7.1f} "
                  f"{ws_orig / 2**20:9.1f}/{ws_fused / 2**20:<8.1f} {row['memory_ratio']:6.3f} "
                  f"{row['h100_floor_s'] * 1e6:13.1f}")
            del weight, logits
    speedup = statistics.median(r["speedup"] for r in results)
    memory = statistics.median(r["memory_ratio"] for r in results)
    print(f"\nmedian speedup {speedup:.2f}x (target >= 4x): {'met' if speedup >= 4 else 'NOT met'}")
    print(f"median workspace ratio {memory:.3f} (target <= 0.25): "
          f"{'met' if memory <= 0.25 else 'NOT met'}")
    print("Triton floor: bytes of one forward+backward at full-size shapes scale by "
          f"{args.scale ** 2}x; compare a GPU run against 'H100 floor us' x {args.scale ** 2}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "pattern": str(PATTERN),
                               "median_speedup": speedup, "median_memory_ratio": memory,
                               "rows": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
