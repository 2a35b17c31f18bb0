"""``maskllm plan``: per-GPU memory of a recipe on a cluster, and a layout that fits."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter
from maskllm_megatron.training.args import TrainArgs


def add_parsers(sub: typing.Any) -> None:
    pln = sub.add_parser("plan", help="per-GPU memory of a recipe on a cluster; suggests a "
                         "layout that fits", formatter_class=HelpFormatter)
    pln.add_argument("recipe", help="a YAML recipe (the trainer's flag names), read as "
                     "`maskllm train --config` reads it")
    pln.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    pln.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    pln.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    pln.set_defaults(func=run)


def _recipe_train_args(path: str, known: dict[str, argparse.Action]) -> TrainArgs:
    """The ``TrainArgs`` that ``maskllm train --config PATH`` would run with."""
    from maskllm_megatron.cli.recipe import recipe_values
    from maskllm_megatron.cli.train import add_train_arguments, train_args_from

    trainer = argparse.ArgumentParser(add_help=False)
    add_train_arguments(trainer)
    args = trainer.parse_args([])
    vars(args).update(recipe_values(path, trainer, known))
    return train_args_from(args)


def run(args: argparse.Namespace) -> int:
    """Print the table; a layout that does not fit is a user error (exit 2) naming one that
    does."""
    from pathlib import Path

    from maskllm_megatron.cli import build_parser
    from maskllm_megatron.cli.recipe import all_settings
    from maskllm_megatron.training.plan import plan_training

    train_args = _recipe_train_args(args.recipe, all_settings(build_parser()))
    plan, better = plan_training(train_args, args.nodes, args.gpus_per_node, args.gpu_memory)
    _print(plan, Path(args.recipe).name)
    if plan.fits:
        return 0
    from maskllm_megatron.errors import InputError

    if better is None:
        raise InputError(f"{Path(args.recipe).name} does not fit and no layout does: use more "
                         "GPUs, or GPUs with more memory")
    raise InputError(f"{Path(args.recipe).name} does not fit; this does: "
                     f"--tensor-model-parallel-size {better.tp} --pipeline-model-parallel-size "
                     f"{better.pp} --micro-batch-size {better.micro_batch_size} (DP {better.dp}, "
                     f"{better.total / 2**30:.1f} GiB)")


def _print(plan, name: str) -> None:
    from maskllm_megatron.training.plan import HEADROOM

    print(f"{name}: TP {plan.tp} x PP {plan.pp} x DP {plan.dp}, micro-batch "
          f"{plan.micro_batch_size}; per GPU (first pipeline stage)")
    for what, value in plan.rows.items():
        print(f"  {what:<30} {value / 2**30:8.2f} GiB")
    print(f"  {'total':<30} {plan.total / 2**30:8.2f} GiB of {plan.gpu_bytes / 2**30:.0f} GiB "
          f"({'fits' if plan.fits else 'does NOT fit'} with {1 - HEADROOM:.0%} headroom)")
    print(f"  training state: {plan.state_bytes_per_weight:.2f} bytes per prunable weight "
          f"(logits, gradients, Adam moments sharded over DP {plan.dp})")
