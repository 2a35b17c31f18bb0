"""Building the model: megatron-core's ``GPTModel`` from a :class:`ModelConfig` and the sparse
layer spec, for this rank's stage of a TP x PP layout. Every command and test builds it here.

The model class is megatron-core's ``GPTModel``: the class the pinned releases (0.16-0.19)
build from layer specs and checkpoint with ``sharded_state_dict``.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.cpu_shims import cuda_literals
from maskllm_megatron.errors import InputError
from maskllm_megatron.model.config import ModelConfig
from maskllm_megatron.model.layers import MaskSettings
from maskllm_megatron.model.spec import (
    SPARSE_LAYER_KINDS,
    default_transformer_impl,
    get_sparse_gpt_layer_spec,
)


def check_layout(cfg: ModelConfig, tp: int = 1, pp: int = 1, pattern: NMPattern | None = None,
                 sparse_layers: tuple[str, ...] = SPARSE_LAYER_KINDS) -> None:
    """Refuse, naming every problem, a TP x PP layout that does not divide the model, or an N:M
    pattern whose groups do not tile the sparse linears' inputs on each TP shard: checked
    before megatron builds anything (its own checks are asserts deep inside)."""
    t = cfg.transformer
    problems = []
    if tp < 1 or pp < 1:
        raise InputError(f"tensor ({tp}) and pipeline ({pp}) parallel sizes must be positive")
    for what, size in (("attention heads", t.num_attention_heads),
                       ("key-value groups", t.num_query_groups),
                       ("FFN size", t.ffn_hidden_size), ("padded vocabulary", cfg.vocab_size)):
        if size % tp:
            problems.append(f"tensor-parallel size {tp} does not divide the {size} {what}")
    if t.num_layers % pp:
        problems.append(f"pipeline-parallel size {pp} does not divide the {t.num_layers} layers")
    if problems:
        raise InputError(f"the model does not split at TP={tp} x PP={pp}: "
                         + "; ".join(problems) + "; choose sizes that divide it")
    if pattern is None:
        return
    inputs = {"linear_qkv": t.hidden_size, "linear_fc1": t.hidden_size,
              "linear_proj": t.num_attention_heads * t.kv_channels // tp,
              "linear_fc2": t.ffn_hidden_size // tp}
    bad = [f"{kind} has {inputs[kind]} input columns per shard" for kind in sparse_layers
           if inputs[kind] % pattern.m]
    if bad:
        raise InputError(f"{pattern} sparsity needs the sparse linears' inputs in whole groups "
                         f"of M={pattern.m} at TP={tp}, but " + ", ".join(bad)
                         + "; choose an M that divides them (or a model config whose hidden "
                         "and FFN sizes are multiples of M x TP)")


def check_seq_length(cfg: ModelConfig, seq_length: int) -> None:
    """Learned position embeddings end at the model's ``max_sequence_length``."""
    if seq_length < 1:
        raise InputError(f"--seq-length must be positive, got {seq_length}")
    if cfg.position_embedding_type == "learned_absolute" and seq_length > cfg.max_sequence_length:
        raise InputError(f"--seq-length {seq_length} exceeds the {cfg.max_sequence_length} "
                         "learned positions of the model; give at most that")


def build_model(cfg: ModelConfig, mask_settings: MaskSettings | None = None, *, tp: int = 1,
                pp: int = 1, device: torch.device | str | None = None,
                params_dtype: torch.dtype | None = None, sequence_parallel: bool = False,
                transformer_impl: str | None = None,
                sparse_layers: tuple[str, ...] = SPARSE_LAYER_KINDS,
                parallel_output: bool = True, vp_stage: int | None = None,
                **config_overrides) -> GPTModel:
    """The GPT of ``cfg`` for this rank's stage of a TP x PP layout, on ``device`` in
    ``params_dtype`` (default: the dtype ``cfg`` records).

    ``sparse_layers`` picks which linears are sparse (mask settings from ``mask_settings``);
    ``sparse_layers=()`` is the plain dense model of conversion, with megatron's own linears
    and no mask tensors. ``transformer_impl`` defaults to TE on a GPU where it imports;
    ``parallel_output=False`` gathers the logits over TP; ``config_overrides`` go to the
    ``TransformerConfig`` (e.g. ``perform_initialization=False``); ``vp_stage``: which of this
    rank's virtual-pipeline chunks to build (interleaved schedules)."""
    check_layout(cfg, tp, pp, (mask_settings or MaskSettings()).pattern if sparse_layers else None,
                 sparse_layers)
    config = cfg.transformer_config(tp, pp, device=device, params_dtype=params_dtype,
                                    sequence_parallel=sequence_parallel, **config_overrides)
    spec = get_sparse_gpt_layer_spec(
        mask_settings, sparse_layers, normalization=config.normalization,
        qk_layernorm=config.qk_layernorm,
        transformer_impl=transformer_impl or default_transformer_impl(device))
    # the final norm too: megatron's block would pick its own default class
    block = ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=spec.submodules.input_layernorm))
    with cuda_literals():  # tied embeddings at PP > 1 call .cuda()
        return GPTModel(
            config=config, transformer_layer_spec=block, vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_sequence_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type=cfg.position_embedding_type,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            rotary_base=cfg.rotary_base, rotary_percent=cfg.rotary_percent,
            parallel_output=parallel_output, vp_stage=vp_stage)
