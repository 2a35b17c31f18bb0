"""``maskllm train``: the trainer's flags come from the ``TrainArgs`` fields, help included."""

from __future__ import annotations

import argparse
import dataclasses
import typing

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
    from maskllm_megatron.training.loop import train

    train_args = train_args_from(args)

    def run_training(_) -> None:
        metrics = train(train_args)
        if metrics and is_rank0():
            print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in metrics.items()))

    return run_in_process_group(run_training, args, **model_layout(train_args))
