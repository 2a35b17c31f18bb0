"""Fused Gumbel mask sampler vs the original formulation, forward + backward, on CPU.

Original (NVlabs/MaskLLM): ``F.gumbel_softmax(kappa * logits, tau)`` -> ``@ candidates`` ->
``W * mask``, autograd keeping every intermediate; its logits gradient is then added into the
optimizer's ``main_grad`` buffer (what megatron's DDP hook does). Fused: ``sample_masked_weight``
with the C++ kernel, which recomputes instead of storing and adds the logits gradient into
``main_grad`` inside its backward (megatron's gradient-accumulation fusion). Both end with the
same ``main_grad``. Also measured: the C++ kernel returning its gradient for the hook to add
(``fused-returning-grad``, what the fusion saves) and the chunked PyTorch path (fused too).

Shapes: LLaMA-2 7B's four linear layers with both dimensions divided by ``--scale`` (default 4).
Time: median of ``--repeats`` forward+backward passes. Memory: peak RSS of one forward+backward
above its inputs (weight, logits, the bf16 ``main_grad`` buffer, the incoming gradient of
``W * mask``), in a fresh process (Linux: the peak is reset through ``/proc/self/clear_refs``
once the inputs exist; ``MALLOC_MMAP_THRESHOLD_`` makes freed memory leave RSS).
Targets: fused >= 4x faster and <= 0.25x the original's extra memory.
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

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.sampling import sample_masked_weight

LLAMA2_7B = {"qkv": (12288, 4096), "proj": (4096, 4096), "fc1": (22016, 4096),
             "fc2": (4096, 11008)}
PATTERN = NMPattern(2, 4)
TAU, KAPPA = 4.0, 100.0
H100_BANDWIDTH = 3.35e12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAIN_GRAD_DTYPE = torch.bfloat16  # the trainer's default (--main-grads-dtype)
VARIANTS = ("original", "fused", "fused-returning-grad", "torch")


def make_inputs(rows: int, cols: int, dtype: torch.dtype):
    """Weight, logits, main_grad, incoming gradient; in-place fills, no temporaries."""
    weight = torch.empty(rows, cols, dtype=dtype).normal_()
    logits = torch.empty(rows, cols // PATTERN.m, PATTERN.num_candidates).normal_(0.0, 0.01)
    main_grad = torch.zeros(logits.shape, dtype=MAIN_GRAD_DTYPE)
    grad_out = torch.empty(rows, cols, dtype=dtype).normal_()
    return weight, logits.requires_grad_(), main_grad, grad_out


def step(variant: str, weight, logits, main_grad, grad_out) -> None:
    """One forward + backward that leaves the logits gradient added into ``main_grad``."""
    if variant == "original":
        y = torch.nn.functional.gumbel_softmax(KAPPA * logits, tau=TAU)
        mask = (y @ PATTERN.candidates(torch.float32)).reshape(weight.shape)
        out = weight * mask.to(weight.dtype)
    else:
        backend = "torch" if variant == "torch" else "cpu"
        fuse = variant in ("fused", "torch")
        out, _ = sample_masked_weight(weight, logits, PATTERN, tau=TAU, kappa=KAPPA, key=1,
                                      backend=backend, main_grad=main_grad if fuse else None)
    out.backward(grad_out)
    del out
    if logits.grad is not None:  # megatron's DDP hook: main_grad += grad
        main_grad.add_(logits.grad)
        logits.grad = None


def child(variant: str, rows: int, cols: int, dtype: str) -> None:
    """Runs in a fresh process: prints peak extra bytes of one forward+backward."""
    step(variant, *make_inputs(64, 256, DTYPES[dtype]))  # load libraries, start threads
    inputs = make_inputs(rows, cols, DTYPES[dtype])
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline = psutil.Process().memory_info().rss
    step(variant, *inputs)
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


def median_time(variant: str, inputs, repeats: int) -> float:
    step(variant, *inputs)  # warm-up (builds the C++ kernel once)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(variant, *inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def masked_weight_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """``W * mask``: the one output any implementation must materialise for the GEMM."""
    return rows * cols * torch.finfo(dtype).bits // 8


def triton_traffic(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes one fused forward + backward must read and write (weight grad off, bf16
    main_grad read and written in place)."""
    w = rows * cols * torch.finfo(dtype).bits // 8
    n_logits = rows * cols // PATTERN.m * PATTERN.num_candidates
    logits, main_grad = 4 * n_logits, 2 * n_logits
    forward = w + logits + w  # read W, logits; write W * mask
    backward = w + w + logits + 2 * main_grad  # read dOut, W, logits; update main_grad
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
    header = (f"{'layer':<6} {'shape':>11} {'dtype':>5} {'orig ms':>8} {'fused ms':>8} "
              f"{'ret. ms':>8} {'torch ms':>8} {'speedup':>7} {'extra MiB orig/fused/ret.':>26} "
              f"{'ratio':>6} {'W*mask MiB':>10} {'H100 floor us':>13}")
    print(f"threads={torch.get_num_threads()}  pattern={PATTERN}  tau={TAU}  kappa={KAPPA}  "
          f"main_grad={str(MAIN_GRAD_DTYPE).removeprefix('torch.')}")
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for name, (rows, cols) in LLAMA2_7B.items():
            rows, cols = rows // args.scale, cols // args.scale
            inputs = make_inputs(rows, cols, dtype)
            times = {v: median_time(v, inputs, args.repeats if v != "torch"
                                    else max(1, args.repeats // 2)) for v in VARIANTS}
            extra = {v: peak_extra_memory(v, rows, cols, dtype_name) for v in VARIANTS[:3]}
            traffic = triton_traffic(rows, cols, dtype)
            row = dict(layer=name, rows=rows, cols=cols, dtype=dtype_name,
                       **{f"{v.replace('-', '_')}_s": t for v, t in times.items()},
                       speedup=times["original"] / times["fused"],
                       **{f"{v.replace('-', '_')}_extra_bytes": m for v, m in extra.items()},
                       masked_weight_bytes=masked_weight_bytes(rows, cols, dtype),
                       memory_ratio=extra["fused"] / max(1, extra["original"]),
                       triton_bytes=traffic, h100_floor_s=traffic / H100_BANDWIDTH)
            results.append(row)
            mib = "/".join(f"{extra[v] / 2**20:.1f}" for v in VARIANTS[:3])
            print(f"{name:<6} {f'{rows}x{cols}':>11} {dtype_name:>5} "
                  f"{times['original'] * 1e3:8.1f} {times['fused'] * 1e3:8.1f} "
                  f"{times['fused-returning-grad'] * 1e3:8.1f} {times['torch'] * 1e3:8.1f} "
                  f"{row['speedup']:6.2f}x {mib:>26} {row['memory_ratio']:6.3f} "
                  f"{row['masked_weight_bytes'] / 2**20:10.1f} {row['h100_floor_s'] * 1e6:13.1f}")
            del inputs
    speedup = statistics.median(r["speedup"] for r in results)
    memory = statistics.median(r["memory_ratio"] for r in results)
    worst = max(r["memory_ratio"] for r in results)
    print(f"\nmedian speedup {speedup:.2f}x (range {min(r['speedup'] for r in results):.2f}x to "
          f"{max(r['speedup'] for r in results):.2f}x; target >= 4x): "
          f"{'met' if speedup >= 4 else 'NOT met'}")
    print(f"median extra-memory ratio {memory:.3f} (worst {worst:.3f}; target <= 0.25): "
          f"{'met' if memory <= 0.25 else 'NOT met'}")
    print("Triton floor: bytes of one forward+backward at full-size shapes scale by "
          f"{args.scale ** 2}x; compare a GPU run against 'H100 floor us' x {args.scale ** 2}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "pattern": str(PATTERN),
                               "main_grad_dtype": str(MAIN_GRAD_DTYPE),
                               "median_speedup": speedup, "median_memory_ratio": memory,
                               "worst_memory_ratio": worst, "rows": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
