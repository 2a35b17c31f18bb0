"""``maskllm eval-ppl``: perplexity of a text file under a named protocol."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_model_arguments
from maskllm_megatron.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS, get_protocol


def add_parsers(sub: typing.Any) -> None:
    ppl = sub.add_parser("eval-ppl", help="perplexity of a text file (named protocols)",
                         formatter_class=HelpFormatter)
    add_model_arguments(ppl)
    ppl.add_argument("--text", required=True,
                     help="the corpus, a local UTF-8 file (required): for demo, text tokenised "
                          "whole; for wikitext2-*, the raw test file (one record per line) or a "
                          "JSONL of records; for c4-*, a JSONL (.json[l][.gz]) of validation "
                          "records or the already joined text")
    # not argparse choices: an unknown name is the one-line error of every other bad input
    ppl.add_argument("--protocol", default=DEFAULT_PROTOCOL, metavar="NAME",
                     help=f"{', '.join(PROTOCOLS)}: how the corpus is joined, BOS, window "
                          "length (--seq-length overrides it), the last partial window "
                          f"(README, Perplexity; default: {DEFAULT_PROTOCOL})")
    ppl.add_argument("--masks", default="auto", choices=["auto", "dense"],
                     help="auto: the checkpoint's masks (argmax of logits, or fixed); dense: "
                          "ignore them")
    ppl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import model_layout, run_in_process_group

    get_protocol(args.protocol)  # a bad name fails before any process group starts
    return run_in_process_group(_evaluate, args, **model_layout(args))


def _evaluate(args: argparse.Namespace) -> None:
    from maskllm_megatron.cli.device import is_rank0
    from maskllm_megatron.eval.perplexity import evaluate_checkpoint

    r = evaluate_checkpoint(args)
    if is_rank0():
        print(r.summary)
        print(f"{'checkpoint':<40} {'masks':<7} {'windows':>7} {'tokens':>8} {'loss':>9} "
              f"{'ppl':>10}")
        print(f"{str(r.checkpoint)[-40:]:<40} {r.masks:<7} {r.windows:>7} {r.tokens:>8} "
              f"{r.loss:.7f} {r.ppl:10.4f}")
