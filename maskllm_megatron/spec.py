"""The GPT layer spec with sparse linears, and the megatron-core GPT model built from it.

megatron-core's own spec builder (``get_gpt_layer_local_spec``) assembles the transformer layer;
we only swap the classes of ``linear_qkv``, ``linear_proj``, ``linear_fc1`` and ``linear_fc2``
for the sparse ones (each kind selectable). When Transformer Engine imports, its norms and
attention replace the torch ones (fused kernels, flash attention, sequence parallel); the
linears stay ours, so the spec never depends on TE's fused LayerNorm-linear modules.

The model is megatron-core's ``GPTModel``: it is the model class the pinned releases
(0.16-0.19) build from layer specs and checkpoint with ``sharded_state_dict``; the legacy
``megatron.legacy`` models are deprecated and have no spec support.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from .layers import MaskSettings, SparseColumnParallelLinear, SparseRowParallelLinear

SPARSE_LAYER_KINDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_COLUMN = ("linear_qkv", "linear_fc1")


class ZeroCenteredNorm(torch.nn.Module):
    """LayerNorm / RMSNorm with zero-centred gamma (``(1 + weight)``, Nemotron's LayerNorm1p)
    for machines without Transformer Engine, whose norm supports it; megatron's torch norm
    does not. Same constructor as megatron's norms."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight + 1
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


def get_sparse_gpt_layer_spec(
    mask_settings: MaskSettings | None = None,
    sparse_layers: tuple[str, ...] = SPARSE_LAYER_KINDS,
    normalization: str = "LayerNorm",
    qk_layernorm: bool = False,
    use_transformer_engine: bool | None = None,
    zero_centered_gamma: bool = False,
) -> ModuleSpec:
    """megatron-core's GPT layer spec with the chosen linears made sparse.

    ``sparse_layers`` picks among ``linear_qkv``, ``linear_proj``, ``linear_fc1``,
    ``linear_fc2``; embeddings and the output layer are never in a layer spec and stay dense.
    ``use_transformer_engine``: None uses TE when it imports, True requires it.
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

    te = transformer_engine_modules() if use_transformer_engine is not False else None
    if use_transformer_engine and te is None:
        raise RuntimeError("use_transformer_engine=True but Transformer Engine does not import")
    if te is not None:
        te_norm, te_attention = te
        spec.submodules.input_layernorm = te_norm
        spec.submodules.pre_mlp_layernorm = te_norm
        attention.core_attention = te_attention
        if qk_layernorm:
            attention.q_layernorm = te_norm
            attention.k_layernorm = te_norm
    elif zero_centered_gamma:
        spec.submodules.input_layernorm = ZeroCenteredNorm
        spec.submodules.pre_mlp_layernorm = ZeroCenteredNorm
        if qk_layernorm:
            attention.q_layernorm = ZeroCenteredNorm
            attention.k_layernorm = ZeroCenteredNorm
    return spec


def build_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    mask_settings: MaskSettings | None = None,
    sparse_layers: tuple[str, ...] = SPARSE_LAYER_KINDS,
    position_embedding_type: str = "rope",
    share_embeddings_and_output_weights: bool = True,
    use_transformer_engine: bool | None = None,
    **gpt_kwargs,
) -> GPTModel:
    """megatron-core's GPTModel for this rank's pipeline stage, built from the sparse spec."""
    spec = get_sparse_gpt_layer_spec(
        mask_settings, sparse_layers,
        normalization=config.normalization, qk_layernorm=config.qk_layernorm,
        use_transformer_engine=use_transformer_engine,
        zero_centered_gamma=config.layernorm_zero_centered_gamma)
    if config.layernorm_zero_centered_gamma and spec.submodules.input_layernorm is \
            ZeroCenteredNorm:  # the final norm too (megatron's block would pick a torch norm)
        spec = ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=ZeroCenteredNorm))
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        position_embedding_type=position_embedding_type,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights, **gpt_kwargs)
