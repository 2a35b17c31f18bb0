"""Help formatting and the flag groups several subcommands share."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` unless the text already states its default or there is none
    to show (a ``None`` default is described in the text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: cuda:LOCAL_RANK when CUDA is present, else the CPU")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", action="store_true", help="frozen weights in bf16 (default "
                       "when none of --bf16/--fp16/--fp32 is given: bf16 on a GPU, fp32 on the "
                       "CPU)")
    for name in ("fp16", "fp32"):
        dtype.add_argument(f"--{name}", action="store_true", help=f"frozen weights in {name}")


def add_pattern_arguments(p: argparse.ArgumentParser) -> None:
    """--N/--M: the N:M pattern, the same flags in every command that reads or writes masks."""
    p.add_argument("--N", type=int, default=2, help="N of the N:M pattern: weights kept per "
                   "group")
    p.add_argument("--M", type=int, default=4, help="M of the N:M pattern: group size")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that build a model from a checkpoint."""
    p.add_argument("--config", help="a recipe YAML whose keys (flag names) fill the flags not "
                   "given here; the trainer's recipes work, their training-only keys are "
                   "skipped (default: none)")
    p.add_argument("--load", help="checkpoint directory: a run, iter_N or model (required, "
                   "here or in --config; default: none)")
    p.add_argument("--model-config", help="model_config.json or its directory "
                   "(default: the one beside --load)")
    p.add_argument("--tokenizer", help="SentencePiece .model or Hugging Face tokenizer "
                   "directory (default: the model config's tokenizer)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel ranks per model copy")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages per model copy")
    p.add_argument("--seq-length", type=int,
                   help="tokens per sequence (default: eval-ppl's --protocol sets it, else "
                        "the model's max sequence length)")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="sequences per forward pass on one rank")
    add_pattern_arguments(p)
    p.add_argument("--seed", type=int, default=1234, help="seed of data order and sampling")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on rank 0")
    add_device_arguments(p)
    p.add_argument("--sequence-parallel", action="store_true",
                   help="split activations along the sequence over TP ranks")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"],
                   help="norms and attention around the sparse linears (default: Transformer "
                        "Engine on a GPU where it imports, else local)")
