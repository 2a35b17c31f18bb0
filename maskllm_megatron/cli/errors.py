"""How the ``maskllm`` command reports failures, the same way for every subcommand.

A user error (:class:`maskllm_megatron.errors.UserError`, or a file that is missing or not
readable) is one line on stderr, ``error: ...``, and exit code 2; ``--debug`` adds its
traceback. Anything else is a bug: its traceback is printed and the exit code is 1.
megatron's fallback warnings are said once, by ``maskllm info``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable

from maskllm_megatron.errors import UserError

USER_ERROR_EXIT = 2
BUG_EXIT = 1

# A path the user named that does not exist or cannot be read is their error, not ours.
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

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


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, (UserError, *FILE_ERRORS))


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line report is joined with ``; ``)."""
    if isinstance(err, FILE_ERRORS) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` on the command line, or ``MASKLLM_DEBUG=1`` in the environment (torchrun)."""
    return bool(getattr(args, "debug", False)) or os.environ.get("MASKLLM_DEBUG", "") not in (
        "", "0")


def run_reported(name: str, fn: Callable[[], int], debug: bool = False) -> int:
    """``fn()``'s exit code; a user error becomes ``error: maskllm NAME: message`` and exit
    code 2 (with its traceback under ``debug``), any other exception a traceback and 1."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - the one place the CLI turns errors into codes
        if not is_user_error(err):
            traceback.print_exc()
            _say(f"maskllm {name}: internal error ({type(err).__name__}); the traceback above "
                 "is a bug, please report it")
            return BUG_EXIT
        if debug:
            traceback.print_exc()
        _say(f"error: maskllm {name}: {one_line(err)}")
        return USER_ERROR_EXIT


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun (unbuffered stderr) ``print`` writes the
    text and its newline separately, and two ranks' lines could run into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
