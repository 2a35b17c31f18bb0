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
    """One rank, or each torchrun rank, runs on its device; the launching process (--tp > 1)
    only starts torchrun."""
    from maskllm_megatron.cli.device import run_on_device
    from maskllm_megatron.demo import main as demo_main

    if args.tp == 1 or "WORLD_SIZE" in os.environ:
        return run_on_device(demo_main, args)
    return demo_main(args)
