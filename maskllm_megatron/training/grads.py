"""Gradient reduction: megatron-core's DDP, with narrow gradient buffers for fp32 parameters.

megatron's ``DistributedDataParallel`` gives every trained parameter a ``main_grad`` view into
contiguous, bucketed buffers, reduce-scatters each bucket over data parallel as soon as
backward has produced its last gradient (overlapped with the rest of backward), and
all-gathers the updated parameters from a contiguous parameter buffer. The schedules and
``finalize_model_grads`` drive it (``no_sync`` over micro-batches, the final DP / TP / PP
reductions). The sparse layers' sampler adds the logits gradients straight into ``main_grad``.

One thing megatron cannot express: it sizes a gradient buffer by its parameters' dtype (or
fp32), while the mask logits must stay fp32 and a bf16 gradient buffer is what keeps mask
learning under 10 bytes per weight per GPU. :class:`MaskDataParallel` therefore chooses the
buffer class for the duration of megatron's constructor, so fp32 parameters get gradient
buffers of ``grad_dtype``; nothing else differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    distributed_data_parallel,
)
from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer


@contextlib.contextmanager
def _fp32_params_with_grad_dtype(grad_dtype: torch.dtype) -> Iterator[None]:
    class _NarrowGradBuffer(_ParamAndGradBuffer):
        def __init__(self, ddp_config, param_dtype, buffer_grad_dtype, *args, **kwargs):
            if param_dtype == torch.float32 and buffer_grad_dtype == torch.float32:
                buffer_grad_dtype = grad_dtype
            super().__init__(ddp_config, param_dtype, buffer_grad_dtype, *args, **kwargs)

    saved = distributed_data_parallel._ParamAndGradBuffer
    distributed_data_parallel._ParamAndGradBuffer = _NarrowGradBuffer
    try:
        yield
    finally:
        distributed_data_parallel._ParamAndGradBuffer = saved


class MaskDataParallel(DistributedDataParallel):
    """megatron-core's DDP; fp32 parameters get gradient buffers of ``grad_dtype``."""

    def __init__(self, config, ddp_config: DistributedDataParallelConfig, module,
                 grad_dtype: torch.dtype = torch.float32):
        narrow = grad_dtype != torch.float32 and not ddp_config.grad_reduce_in_fp32
        with _fp32_params_with_grad_dtype(grad_dtype) if narrow else contextlib.nullcontext():
            super().__init__(config, ddp_config, module)


def wrap_model(model, main_grads_dtype: torch.dtype, overlap_grad_reduce: bool = True,
               bucket_size: int | None = None) -> MaskDataParallel:
    """Wrap one model chunk for training: reduce-scatter into per-rank slices (the optimizer
    state is sharded over data parallel), gradients stored in ``main_grads_dtype``.

    Half-precision parameters (weights under ``--train-weights`` on a GPU) reduce in fp32
    when ``main_grads_dtype`` is fp32, else in their own dtype, as megatron does."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=main_grads_dtype == torch.float32,
        overlap_grad_reduce=overlap_grad_reduce, use_distributed_optimizer=True,
        bucket_size=bucket_size)
    return MaskDataParallel(model.config, ddp_config, model, grad_dtype=main_grads_dtype)
