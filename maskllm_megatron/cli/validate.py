"""``maskllm validate``: check an exported checkpoint without a GPU."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_pattern_arguments


def add_parsers(sub: typing.Any) -> None:
    val = sub.add_parser("validate", help="check an exported checkpoint (no GPU needed)",
                         formatter_class=HelpFormatter)
    what = val.add_subparsers(dest="format", metavar="FORMAT", required=True)
    vtrt = what.add_parser("trtllm", help="every check of a TensorRT-LLM 2:4 checkpoint",
                           formatter_class=HelpFormatter)
    vtrt.add_argument("directory", help="the exported checkpoint directory")
    add_pattern_arguments(vtrt)
    val.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; a checkpoint that fails a check is a user error (exit 2)."""
    from maskllm_megatron.deploy.validate import format_report, validate_trtllm
    from maskllm_megatron.errors import CheckpointError
    from maskllm_megatron.paths import require_path

    require_path(args.directory, "exported checkpoint directory")
    report = validate_trtllm(args.directory, args.N, args.M)
    print(format_report(report))
    if not report.ok:
        raise CheckpointError(f"{args.directory}: {len(report.violations)} check(s) failed "
                              "(listed above); export it again with `maskllm export trtllm`")
    return 0
