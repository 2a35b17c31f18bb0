"""Where a command's ranks compute and the process group they share: the CLI starts it (from
torchrun's environment, else one rank), the library functions only lay it out."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable


def on_device(device: str | None) -> contextlib.AbstractContextManager:
    """The CPU shims around a CPU run, nothing around a GPU run."""
    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    chosen = distributed.select_device(device or "auto")
    return cpu_shims() if chosen.type == "cpu" else contextlib.nullcontext()


def run_in_process_group(fn: Callable[[argparse.Namespace], object], args: argparse.Namespace,
                         *, tp: int = 1, pp: int = 1, device: str = "cpu",
                         seed: int = 1234) -> int:
    """``fn(args)`` on every rank of a process group started on ``device`` (conversion and
    export: the CPU) at TP x PP; the group is shut down afterwards, even when ``fn`` fails."""
    from maskllm_megatron import distributed

    try:
        with on_device(device):
            distributed.init_distributed(tp, pp, seed, device=device)
            fn(args)
    finally:
        distributed.shutdown()
    return 0


def model_layout(args: argparse.Namespace) -> dict:
    """The process-group arguments of a command that builds a model at a TP x PP layout."""
    return dict(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                device=args.device, seed=args.seed)


def is_rank0() -> bool:
    """Whether this rank prints (rank 0 of a started group, or no group)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
