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
    from maskllm_megatron.cli.device import model_layout, run_in_process_group

    return run_in_process_group(_evaluate, args, **model_layout(args))


def _evaluate(args: argparse.Namespace) -> None:
    from maskllm_megatron.cli.device import is_rank0
    from maskllm_megatron.eval.perplexity import evaluate_checkpoint

    r = evaluate_checkpoint(args)
    if is_rank0():
        print(f"{'checkpoint':<40} {'masks':<7} {'windows':>7} {'tokens':>8} {'loss':>9} "
              f"{'ppl':>10}")
        print(f"{str(r.checkpoint)[-40:]:<40} {r.masks:<7} {r.windows:>7} {r.tokens:>8} "
              f"{r.loss:.7f} {r.ppl:10.4f}")
