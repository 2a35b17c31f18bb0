"""The GPT layer spec with sparse linears (the model is built from it in :mod:`.build`).

megatron-core's own spec builder (``get_gpt_layer_local_spec``) assembles the transformer layer;
we only swap the classes of ``linear_qkv``, ``linear_proj``, ``linear_fc1`` and ``linear_fc2``
for the sparse ones (each kind selectable). Around them, ``transformer_impl`` picks the rest:

* ``transformer_engine``: TE's norms and fused attention (flash / cuDNN), sequence parallel
  through TE's norms. The linears stay ours, so the spec never depends on TE's fused
  LayerNorm-linear modules;
* ``local``: megatron's attention, apex's fused LayerNorm when apex imports, otherwise
  :class:`LocalNorm`, a torch norm that also does what megatron's torch fallback refuses
  (sequence parallel, Nemotron's zero-centred gamma).

:func:`default_transformer_impl` picks TE on a GPU when it imports.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from maskllm_megatron.errors import InputError
from maskllm_megatron.model.layers import (
    MaskSettings,
    SparseColumnParallelLinear,
    SparseRowParallelLinear,
)

SPARSE_LAYER_KINDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
_COLUMN = ("linear_qkv", "linear_fc1")


class LocalNorm(torch.nn.Module):
    """LayerNorm or RMSNorm in torch ops, with megatron's norm constructor.

    Unlike megatron's torch fallback it runs under sequence parallelism (its parameters are
    marked so that ``finalize_model_grads`` reduces their gradients over TP) and supports
    zero-centred gamma (``(1 + weight)``, Nemotron's LayerNorm1p). State-dict keys are torch's
    (``weight``, ``bias``), so checkpoints are interchangeable with the other norms."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        init = torch.zeros if self.zero_centered else torch.ones
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype,
                                              device=device))
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype,
                                                       device=device))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight + 1 if self.zero_centered else self.weight
        if self.rms:
            norm = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (norm * gamma.float()).to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), gamma, self.bias, self.eps)


def transformer_engine_modules():
    """``(TENorm, TEDotProductAttention)`` when Transformer Engine works here, else ``None``."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm
    except Exception:  # noqa: BLE001 - a missing or broken TE both mean: use torch modules
        return None
    return TENorm, TEDotProductAttention


def apex_layer_norm():
    """megatron's apex ``FusedLayerNorm`` when apex imports, else ``None``."""
    try:
        import apex  # noqa: F401
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    except Exception:  # noqa: BLE001 - missing or broken: the torch norm serves
        return None
    return FusedLayerNorm


def default_transformer_impl(device: torch.device | str | None = None) -> str:
    """``transformer_engine`` on a GPU where TE imports, else ``local``."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    return "transformer_engine" if on_gpu and transformer_engine_modules() else "local"


def get_sparse_gpt_layer_spec(
    mask_settings: MaskSettings | None = None,
    sparse_layers: tuple[str, ...] = SPARSE_LAYER_KINDS,
    normalization: str = "LayerNorm",
    qk_layernorm: bool = False,
    transformer_impl: str = "local",
) -> ModuleSpec:
    """megatron-core's GPT layer spec with the chosen linears made sparse.

    ``sparse_layers`` picks among ``linear_qkv``, ``linear_proj``, ``linear_fc1``,
    ``linear_fc2``; embeddings and the output layer are never in a layer spec and stay dense.
    ``transformer_impl``: ``local`` or ``transformer_engine`` (which must then import).
    """
    unknown = set(sparse_layers) - set(SPARSE_LAYER_KINDS)
    if unknown:
        raise ValueError(f"unknown sparse layer kinds {sorted(unknown)}; choose from "
                         f"{', '.join(SPARSE_LAYER_KINDS)}")
    settings = mask_settings or MaskSettings()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization,
                                                  qk_layernorm=qk_layernorm))
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    owners = {"linear_qkv": attention, "linear_proj": attention, "linear_fc1": mlp,
              "linear_fc2": mlp}
    for kind in sparse_layers:
        cls = SparseColumnParallelLinear if kind in _COLUMN else SparseRowParallelLinear
        setattr(owners[kind], kind, ModuleSpec(module=cls, params={"mask_settings": settings}))

    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"unknown transformer implementation {transformer_impl!r}; choose from "
                         f"{', '.join(TRANSFORMER_IMPLS)}")
    if transformer_impl == "transformer_engine":
        te = transformer_engine_modules()
        if te is None:
            raise InputError("--transformer-impl transformer_engine, but Transformer Engine "
                               "does not import here (use --transformer-impl local)")
        norm, attention.core_attention = te
    else:
        fused = apex_layer_norm()
        norm = fused if fused is not None and normalization == "LayerNorm" else LocalNorm
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    if qk_layernorm:
        attention.q_layernorm = norm
        attention.k_layernorm = norm
    return spec
