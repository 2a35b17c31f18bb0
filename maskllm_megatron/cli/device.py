"""Where a command's ranks compute: the CPU shims around a CPU run, nothing around a GPU run."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable


def on_device(device: str | None) -> contextlib.AbstractContextManager:
    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    chosen = distributed.select_device(device or "auto")
    return cpu_shims() if chosen.type == "cpu" else contextlib.nullcontext()


def run_on_device(fn: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """``fn(args)`` on the command's device (conversion and export: the CPU), process groups
    shut down afterwards even when it fails."""
    from maskllm_megatron import distributed

    try:
        with on_device(getattr(args, "device", "cpu")):
            fn(args)
    finally:
        distributed.shutdown()
    return 0
