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
    from maskllm_megatron.cli.device import model_layout, run_in_process_group

    return run_in_process_group(_prune, args, **model_layout(args))


def _prune(args: argparse.Namespace) -> None:
    from maskllm_megatron.cli.device import is_rank0
    from maskllm_megatron.pruning.oneshot import prune_checkpoint

    report = prune_checkpoint(args)
    if not is_rank0():
        return
    print(f"{report.method} {report.pattern} pruning, {report.calibration_tokens} calibration "
          "tokens per pass per data-parallel rank" if report.calibration_tokens is not None
          else f"{report.method} {report.pattern} pruning")
    print(f"{'stage':>5} {'tp':>3} {'layer':<40} {'shard':>14} {'nonzero':>8}")
    for pp_rank, tp_rank, name, shape, kept in report.shards:
        print(f"{pp_rank:>5} {tp_rank:>3} {name:<40} {str(shape):>14} {kept:8.1%}")
    print(f"wrote {report.pruned} (model) and {report.masks} (masks, for --prior)")
