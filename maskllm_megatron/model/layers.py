"""Sparse tensor-parallel linears: megatron-core's Column/RowParallelLinear plus mask logits.

Each layer keeps megatron's frozen weight shard where megatron keeps it (so dense checkpoints
load unchanged) and adds one parameter, ``mask_logits`` ``[out_local, in_local // M, C]`` fp32,
sharded like the weight (column: axis 0, row: axis 1). The forward pass masks the weight and
hands it to megatron's own ``_forward_impl`` (async all-reduce, sequence parallel and the frozen
weight path all unchanged). When the optimizer gives the logits a ``main_grad`` buffer, the
sampler's backward adds their gradient straight into it (megatron's gradient-accumulation
fusion, applied to the logits): no logits-sized ``.grad`` is allocated per micro-batch.

Modes (:data:`MODES`):

* ``learn``: sample a soft mask every micro-batch (Gumbel-softmax, see :mod:`.sampling`);
* ``hard``: the argmax candidate of the logits, no noise;
* ``fixed``: a stored hard mask (``mask_indices`` ``[out_local, in_local // M]`` uint8); no
  logits;
* ``dense``: no mask.

Sampling needs the training position (seed, iteration, micro-batch, data-parallel rank, tau,
kappa). Nothing about it lives on a layer: each forward call runs inside :func:`sampling`, a
scope holding one :class:`SamplingState` (so the micro-batch is the one the pipeline schedule
gave that call, also under interleaved schedules) that also collects the layers' regulariser
terms for the caller. :func:`assign_layer_ids` gives each layer a stable id from its global
layer number.

Distillation (``SamplingState.teacher_half``): the micro-batch is doubled along the batch axis
(dim 1 of megatron's ``[seq, batch, hidden]`` activations, also under sequence parallelism),
and each sparse layer runs the first half (the student) with ``W * mask`` and the second half
(the teacher: the same model, masks off) with the plain ``W`` under ``torch.no_grad()``. The
teacher costs activations, not a second copy of the weights, and no gradient reaches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from maskllm_megatron.core.nm import NMPattern, hard_mask_from_logits, indices_to_mask
from maskllm_megatron.errors import InputError
from maskllm_megatron.sampling import NoiseKey, ShardGroups, sample_masked_weight
from maskllm_megatron.sampling.noise import counter_normal

MODES = ("learn", "hard", "fixed", "dense")
# layer kinds as megatron names their TP communication buffers; part of each layer's noise id
LAYER_KINDS = {"qkv": 0, "proj": 1, "fc1": 2, "fc2": 3}
LOGITS_INIT_STD = 0.01  # the original initialisation


@dataclass
class MaskSettings:
    """Static per-layer choices, carried by the layer spec (``ModuleSpec.params``)."""

    pattern: NMPattern = field(default_factory=lambda: NMPattern(2, 4))
    mode: str = "learn"
    hard_sampling: bool = False  # straight-through Gumbel instead of the soft mask
    backend: str = "auto"
    # megatron's gradient-accumulation fusion for the logits: when the optimizer gave them a
    # ``main_grad`` buffer, the sampler's backward adds into it (no logits-sized .grad)
    fuse_grad_accumulation: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mask mode {self.mode!r}; choose from {', '.join(MODES)}")


@dataclass(frozen=True)
class SamplingState:
    """Where one forward call samples: its noise key's training position and the Gumbel
    schedule's tau and kappa. Frozen: each call gets its own, nothing shared is mutated."""

    seed: int = 1234
    iteration: int = 0
    microbatch: int = 0
    dp_rank: int = 0
    tau: float = 4.0
    kappa: float = 100.0
    # distillation: the last half of the batch axis is the teacher (plain weights, no grad)
    teacher_half: bool = False


class MaskSample:
    """One forward call's sampling scope: the state its learn-mode layers draw noise at, and
    the regulariser terms ``sum((W * mask)**2)`` they produced, handed to the caller rather
    than kept on the layers."""

    def __init__(self, state: SamplingState):
        self.state = state
        self.terms: list[torch.Tensor] = []

    def regularizer(self) -> torch.Tensor | None:
        """Sum of this call's terms (this rank's sparse layers), or None without any."""
        return sum(self.terms) if self.terms else None


_ACTIVE_SAMPLE: ContextVar[MaskSample | None] = ContextVar("maskllm_sample", default=None)


@contextmanager
def sampling(state: SamplingState) -> Iterator[MaskSample]:
    """Scope one forward call: learn-mode layers inside it sample at ``state``."""
    sample = MaskSample(state)
    token = _ACTIVE_SAMPLE.set(sample)
    try:
        yield sample
    finally:
        _ACTIVE_SAMPLE.reset(token)


class _SparseLinear:
    """The mask machinery shared by both layer classes; ``partition_axis`` is the TP axis."""

    partition_axis: int

    def _setup_mask(self, settings: MaskSettings | None, tp_comm_buffer_name: str | None) -> None:
        self.mask_settings = settings = settings or MaskSettings()
        self.kind = tp_comm_buffer_name or "linear"
        self.layer_id: int | None = None
        pattern = settings.pattern
        out_local, in_local = self.weight.shape
        if in_local % pattern.m != 0:
            tp = ps.get_tensor_model_parallel_world_size()
            raise InputError(
                f"{type(self).__name__} ({self.kind}): local weight shape "
                f"[{out_local}, {in_local}] at tensor-parallel size {tp} cannot hold {pattern} "
                f"sparsity: the input dimension {in_local} is not divisible by M={pattern.m}")
        self.weight.requires_grad_(False)  # frozen: no grad, no optimizer state, no DDP buffer
        self.mode = settings.mode
        groups = in_local // pattern.m
        device = self.weight.device
        if settings.mode == "fixed":
            self.register_buffer("mask_indices", torch.zeros(out_local, groups, dtype=torch.uint8,
                                                             device=device))
            self._mark_sharded(self.mask_indices)
        else:
            self.mask_logits = torch.nn.Parameter(
                torch.zeros(out_local, groups, pattern.num_candidates, dtype=torch.float32,
                            device=device))
            self._mark_sharded(self.mask_logits)

    def _mark_sharded(self, tensor: torch.Tensor) -> None:
        set_tensor_model_parallel_attributes(tensor, is_parallel=True, dim=self.partition_axis,
                                             stride=1)
        tensor.allreduce = True  # logits gradients are reduced over data parallel

    # -- where this shard sits in the unsharded layer -------------------------------------

    @property
    def _glu(self) -> bool:
        """fc1 of a gated MLP: each TP shard holds [gate_shard; up_shard]."""
        return self.kind == "fc1" and bool(getattr(self.config, "gated_linear_unit", False))

    def _row_segments(self) -> list[tuple[int, int, ShardGroups]]:
        """``(local_start, local_stop, ShardGroups)`` per contiguous block of global rows."""
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        out_local, in_local = self.weight.shape
        gpr_local = in_local // self.mask_settings.pattern.m
        if self.partition_axis == 1:  # row parallel: groups move along the input dimension
            return [(0, out_local, ShardGroups(0, rank * gpr_local, gpr_local * tp))]
        if not self._glu:
            return [(0, out_local, ShardGroups(rank * out_local, 0, gpr_local))]
        half = out_local // 2
        return [(0, half, ShardGroups(rank * half, 0, gpr_local)),
                (half, out_local, ShardGroups(tp * half + rank * half, 0, gpr_local))]

    # -- the mask ---------------------------------------------------------------------------

    def masked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` times this layer's current mask (mode dependent)."""
        pattern = self.mask_settings.pattern
        if self.mode == "dense":
            return weight
        if self.mode == "fixed":
            return weight * indices_to_mask(self.mask_indices, pattern).to(weight.dtype)
        if self.mode == "hard":
            return weight * hard_mask_from_logits(self.mask_logits.detach(), pattern).to(
                weight.dtype)
        sample = _ACTIVE_SAMPLE.get()
        if sample is None:
            raise RuntimeError(f"{type(self).__name__} ({self.kind}) is in learn mode: run the "
                               "forward call inside maskllm_megatron.model.layers.sampling(state)")
        s = sample.state
        key = NoiseKey(seed=s.seed, layer=self._require_id(), iteration=s.iteration,
                       microbatch=s.microbatch, dp_rank=s.dp_rank)
        main_grad = getattr(self.mask_logits, "main_grad", None)
        if not self.mask_settings.fuse_grad_accumulation:
            main_grad = None
        out, reg = sample_masked_weight(
            weight, self.mask_logits, pattern, tau=s.tau, kappa=s.kappa, key=key,
            segments=self._row_segments(), hard=self.mask_settings.hard_sampling,
            backend=self.mask_settings.backend, main_grad=main_grad)
        sample.terms.append(reg)
        return out

    def _forward_impl(self, input, weight, *args, **kwargs):
        sample = _ACTIVE_SAMPLE.get()
        if sample is not None and sample.state.teacher_half:
            return self._student_and_teacher(input, weight, *args, **kwargs)
        return self._masked_forward_impl(input, weight, *args, **kwargs)

    def _masked_forward_impl(self, input, weight, *args, **kwargs):
        masked = self.masked_weight(weight)
        if masked.requires_grad:  # derived weight: its gradient must flow through autograd
            kwargs["gradient_accumulation_fusion"] = False
        return super()._forward_impl(input, masked, *args, **kwargs)

    def _student_and_teacher(self, input, weight, *args, **kwargs):
        """A doubled micro-batch ``[seq, 2b, in]``: the first ``b`` with this layer's mask
        (the student), the last ``b`` with the plain weight under no_grad (the teacher)."""
        if input.dim() != 3 or input.shape[1] % 2:
            raise RuntimeError(f"{type(self).__name__} ({self.kind}): distillation runs a doubled "
                               f"micro-batch [seq, 2 x batch, hidden], got {list(input.shape)}")
        half = input.shape[1] // 2
        # contiguous halves: sequence parallelism all-gathers them, and only the student's
        # half is kept for backward
        student = self._masked_forward_impl(input[:, :half].contiguous(), weight, *args,
                                            **kwargs)
        with torch.no_grad():
            teacher = super()._forward_impl(input[:, half:].contiguous(), weight, *args,
                                            **kwargs)
        return torch.cat([student, teacher], dim=1)

    @torch.no_grad()
    def init_mask_logits(self, seed: int, std: float = LOGITS_INIT_STD) -> None:
        """N(0, std) logits drawn from the counter stream: identical for every TP layout."""
        if self.mode == "fixed":
            return
        key = NoiseKey(seed=seed, layer=self._require_id(), stream=1).philox_key()
        c = self.mask_settings.pattern.num_candidates
        gpr = self.mask_logits.shape[1]
        for start, stop, shard in self._row_segments():
            resolved = shard.resolve(stop - start, gpr)
            groups = resolved.global_indices(0, stop - start, gpr, device=self.mask_logits.device)
            values = counter_normal(key, groups, c).reshape(stop - start, gpr, c)
            self.mask_logits[start:stop] = std * values

    def _require_id(self) -> int:
        if self.layer_id is None:
            raise RuntimeError("layer ids are assigned by assign_layer_ids(model)")
        return self.layer_id

    # -- checkpoints -----------------------------------------------------------------------

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight, bias and mask tensors sharded on the TP axis; global mask shape
        ``[out, in // M, C]`` (logits) or ``[out, in // M]`` (fixed masks)."""
        metadata = metadata or {}
        dp_cp_group = metadata.get("dp_cp_group") or ps.get_data_parallel_group(
            with_context_parallel=True)
        axis = self.partition_axis
        axis_map = {"weight": axis, "mask_logits": axis, "mask_indices": axis}
        if axis == 0:
            axis_map["bias"] = 0
        state_dict = self.state_dict(prefix="", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            state_dict, prefix, axis_map, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=dp_cp_group)
        if self._glu:  # same [gate; up] re-layout megatron's MLP applies to fc1's weight
            for name in ("mask_logits", "mask_indices"):
                key = f"{prefix}{name}"
                if key in sharded:
                    sharded[key] = apply_swiglu_sharded_factory(
                        sharded[key], sharded_offsets,
                        metadata.get("singleton_local_shards", False))
        return sharded


class SparseColumnParallelLinear(_SparseLinear, ColumnParallelLinear):
    """megatron-core ColumnParallelLinear with learnable N:M mask logits (TP axis 0)."""

    partition_axis = 0

    def __init__(self, input_size, output_size, *, mask_settings: MaskSettings | None = None,
                 **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._setup_mask(mask_settings, kwargs.get("tp_comm_buffer_name"))


class SparseRowParallelLinear(_SparseLinear, RowParallelLinear):
    """megatron-core RowParallelLinear with learnable N:M mask logits (TP axis 1)."""

    partition_axis = 1

    def __init__(self, input_size, output_size, *, mask_settings: MaskSettings | None = None,
                 **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._setup_mask(mask_settings, kwargs.get("tp_comm_buffer_name"))


# ----------------------------------------------------------------------------- model helpers


def sparse_layers(model) -> list[tuple[str, _SparseLinear]]:
    """``(name, layer)`` of every sparse linear in a model or a list of pipeline chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [(name, module) for chunk in chunks for name, module in chunk.named_modules()
            if isinstance(module, _SparseLinear)]


def assign_layer_ids(model, logits_seed: int | None = None) -> list:
    """Give every sparse layer (of a model or a list of pipeline chunks) a stable id, part of
    its noise key, and with ``logits_seed`` draw the initial logits. Ids come from the global
    transformer layer number, so they do not depend on the pipeline layout."""
    layers = []
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            number = getattr(module, "layer_number", None)
            if number is None or not hasattr(module, "mlp"):
                continue
            others = 0
            for sub in module.modules():
                if isinstance(sub, _SparseLinear):
                    kind = LAYER_KINDS.get(sub.kind)
                    if kind is None:  # not one of megatron's four: ids 4.. in module order
                        kind, others = 4 + others, others + 1
                    sub.layer_id = int(number) * 8 + kind
                    layers.append(sub)
    numbered = {id(sub) for sub in layers}
    for _, sub in sparse_layers(model):  # sparse layers outside transformer layers, if any
        if id(sub) not in numbered:
            sub.layer_id = (1 << 20) + len(layers)
            layers.append(sub)
    if logits_seed is not None:
        for sub in layers:
            sub.init_mask_logits(logits_seed)
    return layers


def set_mask_mode(model, mode: str) -> None:
    """Switch every sparse layer between learn, hard and dense (fixed needs :func:`fix_masks`)."""
    if mode not in ("learn", "hard", "dense"):
        raise ValueError(f"set_mask_mode takes learn, hard or dense, got {mode!r}")
    for _, layer in sparse_layers(model):
        if layer.mode == "fixed" and mode != "dense":
            raise ValueError(f"{layer.kind} holds a fixed mask and no logits; cannot use {mode!r}")
        layer.mode = mode


@torch.no_grad()
def fix_masks(model) -> None:
    """Replace logits by their argmax candidates (uint8 indices) and switch to fixed mode."""
    for _, layer in sparse_layers(model):
        if layer.mode == "fixed":
            continue
        if layer.mask_settings.pattern.num_candidates > 256:
            raise InputError(f"fixed masks store candidate indices as uint8 (C <= 256), but "
                             f"{layer.mask_settings.pattern} has "
                             f"{layer.mask_settings.pattern.num_candidates}; choose a smaller M")
        indices = layer.mask_logits.argmax(-1).to(torch.uint8)
        del layer.mask_logits
        layer.register_buffer("mask_indices", indices)
        layer._mark_sharded(layer.mask_indices)
        layer.mode = "fixed"

