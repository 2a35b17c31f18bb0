"""``maskllm trim``: hard masks from a training checkpoint, without logits or optimizer state."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_pattern_arguments


def add_parsers(sub: typing.Any) -> None:
    trm = sub.add_parser("trim", help="hard masks from a training checkpoint; drops logits and "
                         "optimizer state", formatter_class=HelpFormatter)
    trm.add_argument("checkpoint", help="a run directory, iter_N or model checkpoint")
    trm.add_argument("--out", required=True, help="output directory (required)")
    add_pattern_arguments(trm)
    trm.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import run_in_process_group

    return run_in_process_group(_trim, args)


def _trim(args: argparse.Namespace) -> None:
    from maskllm_megatron.deploy.export import trim

    report = trim(args.checkpoint, args.out, args.N, args.M)
    print(f"{'layer':<44} {'shape':>14} {'sparsity':>9}")
    for name, shape, sparsity in report.rows:
        print(f"{name:<44} {str(list(shape)):>14} {sparsity:9.1%}")
    print(f"dropped {report.logits_bytes / 2**20:.1f} MiB of logits and "
          f"{report.optimizer_bytes / 2**20:.1f} MiB of optimizer state; the masks take "
          f"{report.mask_bytes / 2**20:.2f} MiB as uint8 indices ({report.bits_per_weight:.2f} "
          f"bit per weight; {report.pattern} packs to {report.packed_bits_per_weight:.3f} in "
          "`export hf`)")
