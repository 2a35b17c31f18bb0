"""``maskllm demo``: the whole method on CPU, every step cached."""

from __future__ import annotations

import argparse
import os
import typing

from maskllm_megatron.cli.options import HelpFormatter


def add_parsers(sub: typing.Any) -> None:
    dem = sub.add_parser("demo", help="the whole method on CPU: pretrain, one-shot baselines, "
                         "MaskLLM, perplexities, export (about 20 minutes on 2 cores)",
                         formatter_class=HelpFormatter)
    dem.add_argument("--workdir", default="~/.cache/maskllm/demo",
                     help="every step is cached here; a rerun skips what is done")
    dem.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (gloo on CPU)")
    dem.add_argument("--size", default="default", choices=["default", "tiny"],
                     help="model and data size; tiny: a 2-layer model for a quick check")
    dem.add_argument("--pretrain-iters", type=int,
                     help="dense pretraining iterations (default: the size's)")
    dem.add_argument("--mask-iters", type=int,
                     help="mask-learning iterations (default: the size's)")
    dem.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="progress bars")
    dem.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                     help="auto: cuda:LOCAL_RANK when CUDA is present, else the CPU")
    dem.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The demo on this machine's ranks; ``--tp`` > 1 outside torchrun relaunches it under
    torchrun with that many ranks (the CLI is what starts processes)."""
    import dataclasses
    import subprocess
    import sys

    from maskllm_megatron.cli.device import run_in_process_group

    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={args.tp}", "-m", "maskllm_megatron.cli",
                                *sys.argv[1:]])
    from maskllm_megatron import demo

    size = dataclasses.replace(demo.SIZES[args.size], **{
        name: value for name, value in (("pretrain_iters", args.pretrain_iters),
                                        ("mask_iters", args.mask_iters)) if value})
    return run_in_process_group(lambda a: _demo(a, size), args, tp=args.tp, device=args.device)


def _demo(args: argparse.Namespace, size) -> None:
    import dataclasses
    from pathlib import Path

    from maskllm_megatron import demo
    from maskllm_megatron.cli.device import is_rank0

    demo.shakespeare_texts()  # a clear error before any work
    workdir = Path(args.workdir).expanduser()
    if is_rank0():
        print(f"demo in {workdir} with {dataclasses.asdict(size)}", flush=True)
    table = demo.run_demo(workdir, size, tp=args.tp, progress=args.progress, device=args.device,
                          log=lambda message: print(message, flush=True))
    if is_rank0():
        print(table["markdown"])
        plot = (" and results.png (training loss, held-out PPL and mask changes of the MaskLLM "
                "runs)" if table["png"] else " (no results.png: pip install matplotlib)")
        print(f"wrote {workdir / 'results.md'}, results.json{plot}")
