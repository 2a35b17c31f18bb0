"""``maskllm convert``: Hugging Face <-> megatron-core checkpoints."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter


def add_parsers(sub: typing.Any) -> None:
    conv = sub.add_parser("convert", help="Hugging Face <-> megatron-core checkpoints",
                          formatter_class=HelpFormatter)
    way = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h2m = way.add_parser("hf-to-mcore", help="LlamaForCausalLM, NemotronForCausalLM, "
                         "GPT2LMHeadModel -> dist checkpoint + model_config.json",
                         formatter_class=HelpFormatter)
    h2m.add_argument("--hf", required=True, help="local Hugging Face model directory (required)")
    h2m.add_argument("--out", required=True, help="output directory (required)")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, checked against "
                     "heads and KV groups; the vocabulary is padded to a multiple of 128 x TP")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline stages, checked against the "
                     "layer count")
    h2m.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="vocabulary padding multiple (tokens), times TP")
    h2m.add_argument("--tokenizer", help="SentencePiece model or HF tokenizer directory "
                     "(default: the tokenizer files in --hf, copied beside the checkpoint)")
    m2h = way.add_parser("mcore-to-hf", help="a converted (or trained) checkpoint -> HF dir",
                         formatter_class=HelpFormatter)
    m2h.add_argument("--mcore", required=True,
                     help="converted directory or a run directory (required)")
    m2h.add_argument("--out", required=True, help="output directory (required)")
    for p in (h2m, m2h):
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="progress bar")
    conv.set_defaults(func=run)


def _convert(args: argparse.Namespace) -> None:
    from maskllm_megatron.interop import hf as convert

    if args.direction == "hf-to-mcore":
        cfg = convert.hf_to_mcore(args.hf, args.out, args.tp, args.pp,
                                  args.make_vocab_size_divisible_by, args.tokenizer,
                                  progress=args.progress)
        print(f"wrote {args.out}: megatron-core checkpoint + model_config.json "
              f"({cfg.transformer.num_layers} layers, vocab {cfg.vocab_size} padded)")
    else:
        print(f"wrote {convert.mcore_to_hf(args.mcore, args.out, progress=args.progress)}")


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import run_in_process_group

    return run_in_process_group(_convert, args)
