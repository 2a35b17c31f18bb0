"""``maskllm trim``: hard masks from a training checkpoint, without logits or optimizer state."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter


def add_parsers(sub: typing.Any) -> None:
    trm = sub.add_parser("trim", help="hard masks from a training checkpoint; drops logits and "
                         "optimizer state", formatter_class=HelpFormatter)
    trm.add_argument("checkpoint", help="a run directory, iter_N or model checkpoint")
    trm.add_argument("--out", required=True, help="output directory (required)")
    trm.add_argument("--N", type=int, default=2, help="N of the N:M pattern: weights kept")
    trm.add_argument("--M", type=int, default=4, help="M of the N:M pattern: group size")
    trm.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import run_on_device
    from maskllm_megatron.deploy.export import trim

    return run_on_device(lambda a: trim(a.checkpoint, a.out, a.N, a.M), args)
