"""``maskllm prune``: one-shot N:M masks (magnitude, Wanda, SparseGPT)."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_model_arguments


def add_parsers(sub: typing.Any) -> None:
    prn = sub.add_parser("prune", help="one-shot N:M masks (magnitude, Wanda, SparseGPT)",
                         formatter_class=HelpFormatter)
    add_model_arguments(prn)
    prn.add_argument("--method", required=True,
                     help="magnitude | wanda | sparsegpt (required)")
    prn.add_argument("--data-path", nargs="+", default=[],
                     help="calibration data: indexed dataset prefixes, as for training "
                          "(default: none; magnitude needs none)")
    prn.add_argument("--calib-samples", type=int, default=128,
                     help="calibration sequences of --seq-length tokens")
    prn.add_argument("--update-weights", action="store_true",
                     help="keep SparseGPT's weight updates (default: original weights x mask, "
                          "the MaskLLM prior setting)")
    prn.add_argument("--row-parallel-hessian", default="gather", choices=["gather", "shard"],
                     help="SparseGPT on row-parallel layers: the exact full-row problem "
                          "(gather) or each shard's own columns (shard)")
    prn.add_argument("--save", required=True,
                     help="writes SAVE/pruned and SAVE/masks (required; a recipe's save is "
                          "the trainer's and is not used)")
    prn.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import run_on_device
    from maskllm_megatron.pruning.oneshot import run_prune

    return run_on_device(run_prune, args)
