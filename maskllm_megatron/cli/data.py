"""``maskllm train-tokenizer`` and ``maskllm preprocess``: text in, training data out."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter


def add_parsers(sub: typing.Any) -> None:
    tok = sub.add_parser("train-tokenizer", help="train a SentencePiece model on text files",
                         formatter_class=HelpFormatter)
    tok.add_argument("input", nargs="+", help="text files")
    tok.add_argument("--model-prefix", required=True, help="writes PREFIX.model (required)")
    tok.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary")
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                     help="SentencePiece model type")
    tok.set_defaults(func=run_train_tokenizer)

    pre = sub.add_parser("preprocess", help="text / JSONL -> megatron indexed dataset",
                         formatter_class=HelpFormatter)
    pre.add_argument("input", nargs="+", help=".txt files (one document each) or .jsonl")
    pre.add_argument("--tokenizer", required=True,
                     help="SentencePiece .model or Hugging Face tokenizer directory (required)")
    pre.add_argument("--output-prefix", required=True,
                     help="writes PREFIX.bin and PREFIX.idx (required)")
    pre.add_argument("--json-key", default="text", help="the .jsonl field holding the text")
    pre.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="progress bar")
    pre.set_defaults(func=run_preprocess)


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from maskllm_megatron.data.tokenizer import train_tokenizer

    path = train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.model_type)
    print(f"wrote {path}")
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    from maskllm_megatron.data.preprocess import preprocess

    stats = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key,
                       progress=args.progress)
    print(f"{stats['documents']} documents, {stats['tokens']} tokens -> "
          f"{stats['prefix']}.bin/.idx")
    return 0
