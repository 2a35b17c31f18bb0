"""The ``maskllm`` command: one entry point, one module per subcommand.

The CLI is the top layer: it alone parses recipes, prints tables and turns errors into exit
codes. Building the parser imports nothing heavy, so ``--help`` is instant and quiet.
"""

from __future__ import annotations

import argparse

from maskllm_megatron.cli import (
    convert,
    data,
    demo,
    eval_ppl,
    eval_tasks,
    export,
    import_masks,
    info,
    plan,
    prune,
    train,
    trim,
    validate,
)
from maskllm_megatron.cli.errors import (
    command_name,
    debug_requested,
    run_reported,
    silence_fallback_warnings,
)
from maskllm_megatron.cli.options import HelpFormatter
from maskllm_megatron.cli.recipe import apply_recipe

# In the order `maskllm --help` lists them.
SUBCOMMANDS = (info, data, train, prune, import_masks, eval_ppl, eval_tasks, convert, trim, export,
               validate, plan, demo)

# Commands that build a model from a checkpoint: --load here or in the recipe.
NEEDS_LOAD = ("prune", "eval-ppl", "eval-tasks")


def build_parser() -> argparse.ArgumentParser:
    from maskllm_megatron import __version__

    parser = argparse.ArgumentParser(
        prog="maskllm", description="Learnable N:M sparsity (MaskLLM) for megatron-core models.",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"maskllm_megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parsers(sub)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    _add_debug_flag(sub)
    return parser


DEBUG_HELP = ("print the traceback of a user error too (also MASKLLM_DEBUG=1; default: only "
              "the one-line error)")


def _add_debug_flag(sub: argparse._SubParsersAction) -> None:
    """``--debug`` after any (sub)command, as before it: ``maskllm train --debug ...``."""
    for parser in dict.fromkeys(sub.choices.values()):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:
            _add_debug_flag(action)
        if not nested:
            parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help=DEBUG_HELP)


def _with_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser,
                 argv: list[str] | None) -> argparse.Namespace:
    """``args`` with its recipe (``--config``, or plan's positional one) applied."""
    recipe = getattr(args, "config", None) or getattr(args, "recipe", None)
    if recipe:
        apply_recipe(args, parser, recipe, argv)
    if args.command in NEEDS_LOAD and not args.load:
        parser.error(f"{args.command}: --load is required (or a --config that sets load)")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """What a subcommand runs with: the command line, then its recipe."""
    parser = build_parser()
    return _with_recipe(parser.parse_args(argv), parser, argv)


def main(argv: list[str] | None = None) -> int:
    silence_fallback_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_reported(command_name(args), lambda: args.func(_with_recipe(args, parser, argv)),
                        debug=debug_requested(args))
