"""AdamW on megatron's DDP buffers, its state sharded over data parallel (ZeRO-1 for the logits).

Memory per prunable weight per GPU for 2:4 (1.5 logits per weight), the defaults:

* mask logits, fp32 (updates are tiny next to their values, and kappa up to 500 magnifies any
  rounding): 6 B, held in DDP's contiguous parameter buffer;
* their gradients in DDP's gradient buffer (``main_grad``), bf16 (``--main-grads-dtype``):
  3 B, reduce-scattered over data parallel during backward;
* Adam moments only for this data-parallel rank's 1/DP of each buffer (``--exp-avg-dtype``,
  ``--exp-avg-sq-dtype``, bf16): 6 B / DP.

That is 15 B at DP=1 and 9.75 B at DP=8 (fp32 AdamW on the logits: 24 B). After the step each
rank's updated slice is all-gathered by DDP's own parameter sync. All arithmetic is fp32, or
fp64 for fp64 parameters; only storage is narrow. Half-precision parameters (weights trained
with ``--train-weights`` on a GPU) get an fp32 main copy of their slice.

This is megatron's distributed-optimizer layout, but not its class: megatron's keeps fp32 main
parameters and fp32 moments (12 B per logit more) and type-checks CUDA tensors, so it could
neither hold narrow state nor run the CPU test suite. apex's FusedAdam is not used for the same
reason (fp32 state); the update runs over a few large flat slices per bucket, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed.param_and_grad_buffer import shard_buffer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from maskllm_megatron.cpu_shims import cuda_literals
from maskllm_megatron.errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_DTYPES = ("fp32", "bf16")  # what megatron's gradient clipping accepts
MOMENTS = ("exp_avg", "exp_avg_sq")

# elements updated at once in step(): bounds the fp32 temporaries of a huge bucket
_CHUNK = 1 << 22


@dataclass(frozen=True)
class StateFormat:
    """Storage dtypes of the gradient buffer and the Adam moments."""

    main_grads_dtype: torch.dtype = torch.bfloat16
    exp_avg_dtype: torch.dtype = torch.bfloat16
    exp_avg_sq_dtype: torch.dtype = torch.bfloat16

    def describe(self) -> dict:
        names = {v: k for k, v in DTYPES.items()}
        return {"main_grads_dtype": names[self.main_grads_dtype],
                "exp_avg_dtype": names[self.exp_avg_dtype],
                "exp_avg_sq_dtype": names[self.exp_avg_sq_dtype]}


def state_format(main_grads_dtype: str = "bf16", exp_avg_dtype: str = "bf16",
                 exp_avg_sq_dtype: str = "bf16") -> StateFormat:
    """The format from the trainer's flags (megatron's names), checked."""
    if main_grads_dtype not in GRAD_DTYPES:
        raise InputError(f"--main-grads-dtype must be one of {', '.join(GRAD_DTYPES)}, not "
                         f"{main_grads_dtype!r}")
    for name, value in (("--exp-avg-dtype", exp_avg_dtype),
                        ("--exp-avg-sq-dtype", exp_avg_sq_dtype)):
        if value not in DTYPES:
            raise InputError(f"{name} must be one of {', '.join(DTYPES)}, not {value!r}")
    return StateFormat(DTYPES[main_grads_dtype], DTYPES[exp_avg_dtype], DTYPES[exp_avg_sq_dtype])


@dataclass
class _Piece:
    """The part of one model parameter that falls in this rank's slice of a bucket."""

    param: torch.nn.Parameter
    start: int  # flat range within the parameter's local (TP-sharded) tensor
    stop: int
    shard_start: int  # where it begins in the slice

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class _Slice:
    """This rank's 1/DP of one DDP bucket: the elements it reduces, updates and gathers."""

    param: torch.Tensor  # flat view into bucket.param_data (the model's parameters)
    decoupled_grad: torch.Tensor  # flat view into bucket.grad_data (megatron's clip reads it)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    main_param: torch.Tensor | None  # fp32 copy of half-precision parameters
    pieces: list[_Piece]
    layout: list[tuple[torch.nn.Parameter, int]]  # every bucket parameter and its offset in it
    group: dist.ProcessGroup
    rank: int


class ShardedAdamW:
    """AdamW (decoupled weight decay, bias-corrected) over megatron DDP chunks built with
    ``use_distributed_optimizer=True``; ``param_groups`` is what megatron's
    ``OptimizerParamScheduler`` sets ``lr`` and ``weight_decay`` on."""

    def __init__(self, model_chunks: list, fmt: StateFormat, lr: float = 1e-3,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        self.chunks, self.format = list(model_chunks), fmt
        self.betas, self.eps = tuple(betas), eps
        self.step_count = 0
        self.slices: list[_Slice] = []
        for chunk in self.chunks:
            if not chunk.ddp_config.use_distributed_optimizer:
                raise ValueError("ShardedAdamW needs DDP built with use_distributed_optimizer")
            for group in chunk.bucket_groups:
                for bucket in group.buckets:
                    self.slices.append(self._slice(chunk, group, bucket))
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay}]

    def _slice(self, chunk, group, bucket) -> _Slice:
        size = group.intra_distributed_optimizer_instance_size
        rank = group.intra_distributed_optimizer_instance_rank
        param = shard_buffer(bucket.param_data, size)[rank]
        grad = shard_buffer(bucket.grad_data, size)[rank]
        lo, hi = rank * param.numel(), (rank + 1) * param.numel()
        buffer = next(b for b in chunk.buffers if bucket in b.buckets)
        pieces, layout = [], []
        for p in bucket.params_list:
            start, stop, _ = buffer.param_index_map[p]
            start, stop = start - bucket.offset, stop - bucket.offset
            layout.append((p, start))
            if max(start, lo) < min(stop, hi):
                pieces.append(_Piece(p, max(start, lo) - start, min(stop, hi) - start,
                                     max(start, lo) - lo))
        main = param.float() if param.dtype in (torch.bfloat16, torch.float16) else None
        return _Slice(param=param, decoupled_grad=grad,
                      exp_avg=torch.zeros_like(param, dtype=self.format.exp_avg_dtype),
                      exp_avg_sq=torch.zeros_like(param, dtype=self.format.exp_avg_sq_dtype),
                      main_param=main, pieces=pieces, layout=layout,
                      group=group.intra_distributed_optimizer_instance_group, rank=rank)

    # -- one iteration -----------------------------------------------------------------------

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def grad_norm(self) -> float:
        """L2 norm of the reduced gradients over every rank (each element counted once:
        data-parallel slices are disjoint, TP duplicates and tied copies are left out).

        Each piece's norm is taken in fp32 first (narrow gradients, no fp32 copy), and
        megatron's ``get_grad_norm_fp32`` combines them over the world."""
        norms = [torch.linalg.vector_norm(
                     s.decoupled_grad[p.shard_start:p.shard_start + p.numel],
                     dtype=torch.promote_types(s.decoupled_grad.dtype, torch.float32))
                 for s in self.slices for p in s.pieces if _counted_in_norm(p.param)]
        local = torch.stack(norms) if norms else torch.zeros(1, device=self._device())
        with cuda_literals():
            return float(get_grad_norm_fp32(local, grad_stats_parallel_group=dist.group.WORLD))

    def _device(self) -> torch.device:
        return self.chunks[0].buffers[0].grad_data.device

    def clip_grads(self, max_norm: float, total_norm: float) -> None:
        with cuda_literals():
            clip_grad_by_total_norm_fp32(self.slices, max_norm, total_norm,
                                         use_decoupled_grad=True)

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on this rank's slices, then DDP's all-gather of the parameters."""
        self.step_count += 1
        group = self.param_groups[0]
        lr, decay = group["lr"], group["weight_decay"]
        beta1, beta2 = self.betas
        scale = lr / (1 - beta1 ** self.step_count)
        root = (1 - beta2 ** self.step_count) ** 0.5
        for s in self.slices:
            target = s.main_param if s.main_param is not None else s.param
            for start in range(0, target.numel(), _CHUNK):
                stop = min(target.numel(), start + _CHUNK)
                p = target[start:stop]
                wide = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64
                g = s.decoupled_grad[start:stop].to(wide)
                m = s.exp_avg[start:stop]
                v = s.exp_avg_sq[start:stop]
                m32 = m.to(wide).mul_(beta1).add_(g, alpha=1 - beta1)
                v32 = v.to(wide).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if decay:
                    p.mul_(1 - lr * decay)
                p.addcdiv_(m32, v32.sqrt().div_(root).add_(self.eps), value=-scale)
                m.copy_(m32)
                v.copy_(v32)
            if s.main_param is not None:
                s.param.copy_(s.main_param)
        for chunk in self.chunks:
            chunk.start_param_sync(force_sync=True)

    # -- what it holds -----------------------------------------------------------------------

    def params(self) -> list[torch.nn.Parameter]:
        """The trained parameters (each once), in DDP's buffer order."""
        seen: dict[int, torch.nn.Parameter] = {}
        for chunk in self.chunks:
            for buffer in chunk.buffers:
                for p in buffer.params:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: parameters and gradient buffers (DDP's), moments and main
        copies (this rank's slices only)."""
        total = dict.fromkeys(("param", "main_grad", "exp_avg", "exp_avg_sq", "main_param"), 0)
        for chunk in self.chunks:
            for buffer in chunk.buffers:
                total["param"] += buffer.param_data.numel() * buffer.param_data.element_size()
                total["main_grad"] += buffer.grad_data.numel() * buffer.grad_data.element_size()
        for s in self.slices:
            for name in MOMENTS:
                tensor = getattr(s, name)
                total[name] += tensor.numel() * tensor.element_size()
            if s.main_param is not None:
                total["main_param"] += s.main_param.numel() * s.main_param.element_size()
        return total

    # -- checkpoints: moments in the parameters' layout (megatron's "fully_reshardable") -----

    @torch.no_grad()
    def gather_moments(self) -> dict[int, dict[str, torch.Tensor]]:
        """``{id(param): {moment: tensor shaped like the parameter, on the CPU}}``: each
        bucket's slices all-gathered over data parallel, one bucket at a time on the device."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for s in self.slices:
            whole = {}
            for name in MOMENTS:
                part = getattr(s, name)
                full = part.new_empty(part.numel() * dist.get_world_size(s.group))
                dist.all_gather_into_tensor(full, part, group=s.group)
                whole[name] = full.cpu()
            for param, start in s.layout:  # the whole bucket, on every rank
                out[id(param)] = {name: whole[name][start:start + param.numel()].view(param.shape)
                                  for name in MOMENTS}
        return out

    @torch.no_grad()
    def load_moments(self, moments: dict[int, dict[str, torch.Tensor]], step_count: int) -> None:
        """Take this rank's slices out of parameter-shaped moments (any layout they came from)."""
        for s in self.slices:
            for piece in s.pieces:
                for name in MOMENTS:
                    source = moments[id(piece.param)][name].reshape(-1)[piece.start:piece.stop]
                    getattr(s, name)[piece.shard_start:piece.shard_start + piece.numel].copy_(
                        source)
            if s.main_param is not None:
                s.main_param.copy_(s.param)
        self.step_count = step_count


def _counted_in_norm(param: torch.nn.Parameter) -> bool:
    """Not a tied copy and not a TP duplicate (megatron's rule for gradient norms)."""
    return param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)
