"""``maskllm train``: the trainer's flags come from the ``TrainArgs`` fields, help included."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from maskllm_megatron.cli.options import HelpFormatter
from maskllm_megatron.training.args import TrainArgs

# Field annotations are strings (postponed evaluation); these are the ones that take a value.
_VALUE_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float,
                "list[float]": float}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe with any of the flags below (same names, "
                        "dashes or underscores); flags given here win (default: none)")
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif f.type.startswith("list["):
            parser.add_argument(flag, nargs="+", type=_VALUE_TYPES.get(f.type, str),
                                default=default, help=help_text)
        else:
            parser.add_argument(flag, type=_VALUE_TYPES.get(f.type, str), default=default,
                                help=help_text)


def train_args_from(args: argparse.Namespace) -> TrainArgs:
    """The checked ``TrainArgs`` of a parsed (and recipe-filled) command line."""
    train_args = TrainArgs(**{f.name: getattr(args, f.name)
                              for f in dataclasses.fields(TrainArgs)})
    train_args.validate()
    return train_args


def add_parsers(sub: typing.Any) -> None:
    trn = sub.add_parser("train", help="learn N:M masks (or train weights) with TP/PP/DP",
                         formatter_class=HelpFormatter)
    add_train_arguments(trn)
    trn.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import is_rank0, model_layout, run_in_process_group
    from maskllm_megatron.paths import removed_on_failure
    from maskllm_megatron.training.loop import train

    train_args = train_args_from(args)

    def run_training(_) -> None:
        # a failure before the first checkpoint also removes the imported prior with --save
        with removed_on_failure(train_args.save, done=lambda: _resumable(train_args.save)):
            metrics = train(_with_imported_prior(train_args, is_rank0()))
        if metrics and is_rank0():
            print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in metrics.items()))

    return run_in_process_group(run_training, args, **model_layout(train_args))


PRIOR_DIR = "prior_masks"


def _resumable(save: str | None) -> bool:
    from maskllm_megatron.checkpoint.run_dir import latest_checkpoint

    return latest_checkpoint(save) is not None


def _with_imported_prior(train_args: TrainArgs, main: bool) -> TrainArgs:
    """``--prior mask_compressed.npz`` (or nm_masks.safetensors): the masks are checked against
    ``--load``'s model and written as a masks-only checkpoint ``SAVE/prior_masks`` (on the
    run's shared storage, so every node reads it), which becomes the prior. A run that resumes
    does not use its prior, so the import happens once, before the first checkpoint."""
    from maskllm_megatron.deploy.import_masks import import_prior, is_mask_file
    from maskllm_megatron.errors import InputError
    from maskllm_megatron.training.loop import check_inputs

    if not train_args.prior or not is_mask_file(train_args.prior):
        return train_args
    check_inputs(dataclasses.replace(train_args, prior=None))  # before the import's work
    if not train_args.load or not train_args.save:
        raise InputError(f"--prior {train_args.prior} is a mask file: give --load (the model "
                         "the masks were made for) and --save (the masks are kept there)")
    out = Path(train_args.save) / PRIOR_DIR
    if not _resumable(train_args.save):
        report = import_prior(train_args.prior, train_args.load, out, train_args.N, train_args.M)
        if main:
            print(f"prior: {report['entries']} {report['pattern']} masks from "
                  f"{train_args.prior} -> {out}")
    return dataclasses.replace(train_args, prior=str(out))
