"""Registers, spills and occupancy of every Triton sampler kernel, compiled ahead of time (no GPU).

Every configuration the launcher can pick (pattern x weight dtype x soft/hard x forward or
backward with the weight gradient on/off and the logits gradient returned or added into an
fp32/bf16/fp16 ``main_grad``) is bound with Triton's own binder; configurations that launch the
same compiled variant share one row. Each variant is compiled with ``triton.compile`` for the
chosen architectures (bundled ``ptxas``) and read back from the cubin (``cuobjdump``):
registers per thread, stack bytes (spills go there: 0 means none), block size and warps, and
occupancy = resident warps per SM / 64 from the register file (65536, allocated per warp in
256s), the warp and block limits and shared memory. Targets: no spills anywhere, 2:4 at >= 50%
occupancy on sm_90. Prints the table and writes JSON; without triton, exits with status 2.

    python bench/bench_triton_registers.py [--archs 80,90] [--jobs N]
                                           [--out bench/results/triton_registers.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (CPU count)")
    parser.add_argument("--out", default="bench/results/triton_registers.json")
    args = parser.parse_args()

    from maskllm_megatron.sampling import triton_aot

    if not triton_aot.AVAILABLE:
        print("triton is not installed: nothing to compile", file=sys.stderr)
        return 2
    import triton

    archs = tuple(int(a) for a in args.archs.split(","))
    start = time.perf_counter()
    records = triton_aot.compile_all(archs, jobs=args.jobs)
    seconds = time.perf_counter() - start

    header = (f"{'kernel':<8} {'pattern':>7} {'dtype':>5} {'mode':<40} {'arch':>5} {'block':>5} "
              f"{'warps':>5} {'regs':>4} {'spills':>6} {'occupancy':>9}")
    print(header)
    print("-" * len(header))
    for r in records:
        print(f"{r['kernel']:<8} {r['pattern']:>7} {r['dtype']:>5} {r['mode']:<40} "
              f"{'sm_' + str(r['arch']):>5} {r['block']:>5} {r['num_warps']:>5} "
              f"{r['registers']:>4} {r['spills']:>6} {r['occupancy']:>9.0%}")
    spilling = [r for r in records if r["spills"]]
    low = [r for r in records if r["pattern"] == "2:4" and r["arch"] == 90
           and r["occupancy"] < 0.5]
    print(f"\n{len(records)} variants ({len(triton_aot.calls())} launcher configurations, "
          f"{len(archs)} archs) compiled or taken from Triton's cache in {seconds:.0f}s")
    print(f"spills: {len(spilling)} variants (target 0): {'met' if not spilling else 'NOT met'}")
    if 90 in archs:
        print(f"2:4 below 50% occupancy on sm_90: {len(low)} (target 0): "
              f"{'met' if not low else 'NOT met'}")
    for arch in archs:
        for pattern in triton_aot.PATTERNS:
            rows = [r for r in records if (r["arch"], r["pattern"]) == (arch, pattern)]
            regs, occ = [r["registers"] for r in rows], [r["occupancy"] for r in rows]
            print(f"sm_{arch} {pattern}: registers {min(regs)}-{max(regs)}, "
                  f"occupancy {min(occ):.0%}-{max(occ):.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"triton": triton.__version__, "archs": list(archs),
                               "seconds": seconds,
                               "configurations": len(triton_aot.calls()),
                               "variants": records}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
