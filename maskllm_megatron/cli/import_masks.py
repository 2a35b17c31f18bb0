"""``maskllm import-masks``: published N:M masks (MaskLLM's ``mask_compressed.npz``, or our
``nm_masks.safetensors``) as a pruned checkpoint and a ``--prior``."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_pattern_arguments


def add_parsers(sub: typing.Any) -> None:
    imp = sub.add_parser("import-masks", help="published N:M masks (MaskLLM's .npz, or "
                         "`export hf`'s nm_masks.safetensors) -> pruned checkpoint + prior",
                         formatter_class=HelpFormatter)
    imp.add_argument("file", help="mask_compressed.npz (keys '<HF name>.mask', np.packbits of "
                     "each flat mask), or nm_masks.safetensors or the `export hf` directory "
                     "holding it")
    imp.add_argument("--load", required=True, help="the model the masks are for: a converted "
                     "checkpoint (maskllm convert hf-to-mcore), a run or a pruned model "
                     "(required)")
    imp.add_argument("--save", required=True, help="writes SAVE/pruned (weights x masks) and "
                     "SAVE/masks (for train --prior), as `maskllm prune` does (required)")
    add_pattern_arguments(imp)
    imp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import run_in_process_group

    return run_in_process_group(_import, args)


def _import(args: argparse.Namespace) -> None:
    from maskllm_megatron.deploy.import_masks import import_masks

    report = import_masks(args.file, args.load, args.save, args.N, args.M)
    print(f"imported {report['entries']} {report['pattern']} masks from {args.file}")
    print(f"wrote {report['pruned']} (model) and {report['masks']} (masks, for --prior)")
