"""``maskllm eval-ppl``: perplexity of a text file with one pinned protocol."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_model_arguments


def add_parsers(sub: typing.Any) -> None:
    ppl = sub.add_parser("eval-ppl", help="perplexity of a text file (pinned protocol)",
                         formatter_class=HelpFormatter)
    add_model_arguments(ppl)
    ppl.add_argument("--text", required=True,
                     help="UTF-8 text file, tokenised whole (required)")
    ppl.add_argument("--masks", default="auto", choices=["auto", "dense"],
                     help="auto: the checkpoint's masks (argmax of logits, or fixed); dense: "
                          "ignore them")
    ppl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import run_on_device
    from maskllm_megatron.eval.perplexity import run_eval_ppl

    return run_on_device(run_eval_ppl, args)
