"""How the ``maskllm`` command reports failures: a known error is one line on stderr and exit
code 1, not a traceback; megatron's fallback warnings are said once, by ``maskllm info``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

# A bad input, a missing file, a run that had to stop (TrainingError is a RuntimeError).
KNOWN_ERRORS = (ValueError, FileNotFoundError, RuntimeError)

# megatron-core warns at import time when Transformer Engine or Apex are missing, then uses
# torch implementations; `maskllm info` says so instead of every command.
FALLBACK_WARNINGS = r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back"


def silence_fallback_warnings() -> None:
    warnings.filterwarnings("ignore", message=FALLBACK_WARNINGS, category=UserWarning)


def command_name(args: argparse.Namespace) -> str:
    """``convert hf-to-mcore``, ``export trtllm``, ``train``: the words the user typed."""
    words = [args.command]
    words += [getattr(args, d) for d in ("direction", "target", "format") if getattr(args, d, None)]
    return " ".join(words)


def run_reported(name: str, fn: Callable[[], int]) -> int:
    """``fn()``'s exit code; a known error becomes ``maskllm NAME: message`` and exit code 1."""
    try:
        return fn()
    except KNOWN_ERRORS as err:
        print(f"maskllm {name}: {err}", file=sys.stderr)
        return 1
