"""The sparse GPT layer spec: which classes go where (no process group needed)."""

import pytest
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from maskllm_megatron import spec as spec_module
from maskllm_megatron.layers import (
    MaskSettings,
    SparseColumnParallelLinear,
    SparseRowParallelLinear,
)
from maskllm_megatron.nm import NMPattern
from maskllm_megatron.spec import get_sparse_gpt_layer_spec


def _linears(spec):
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    return {"linear_qkv": attention.linear_qkv, "linear_proj": attention.linear_proj,
            "linear_fc1": mlp.linear_fc1, "linear_fc2": mlp.linear_fc2}


def test_all_four_linears_become_sparse_with_the_settings():
    settings = MaskSettings(pattern=NMPattern(1, 4))
    spec = get_sparse_gpt_layer_spec(settings, use_transformer_engine=False)
    linears = _linears(spec)
    assert linears["linear_qkv"].module is SparseColumnParallelLinear
    assert linears["linear_fc1"].module is SparseColumnParallelLinear
    assert linears["linear_proj"].module is SparseRowParallelLinear
    assert linears["linear_fc2"].module is SparseRowParallelLinear
    assert all(s.params["mask_settings"] is settings for s in linears.values())


def test_layer_kinds_are_selectable_and_the_rest_stay_megatron_dense():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    spec = get_sparse_gpt_layer_spec(sparse_layers=("linear_fc1", "linear_fc2"),
                                     use_transformer_engine=False)
    linears = _linears(spec)
    assert linears["linear_qkv"] is ColumnParallelLinear
    assert linears["linear_proj"] is RowParallelLinear
    assert linears["linear_fc2"].module is SparseRowParallelLinear
    with pytest.raises(ValueError, match="linear_qk.*choose from"):
        get_sparse_gpt_layer_spec(sparse_layers=("linear_qk",))


def test_transformer_engine_norms_and_attention_are_used_when_te_imports(monkeypatch):
    class FakeTENorm:  # stand-ins: TE cannot be installed on CPU
        pass

    class FakeTEAttention:
        pass

    assert spec_module.transformer_engine_modules() is None  # not on this machine
    plain = get_sparse_gpt_layer_spec()
    assert plain.submodules.input_layernorm is WrappedTorchNorm
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        get_sparse_gpt_layer_spec(use_transformer_engine=True)

    monkeypatch.setattr(spec_module, "transformer_engine_modules",
                        lambda: (FakeTENorm, FakeTEAttention))
    te = get_sparse_gpt_layer_spec()
    assert te.submodules.input_layernorm is FakeTENorm
    assert te.submodules.pre_mlp_layernorm is FakeTENorm
    assert te.submodules.self_attention.submodules.core_attention is FakeTEAttention
    assert _linears(te)["linear_qkv"].module is SparseColumnParallelLinear  # linears stay ours
    local = get_sparse_gpt_layer_spec(use_transformer_engine=False)
    assert local.submodules.input_layernorm is WrappedTorchNorm


def test_mask_settings_reject_unknown_modes():
    with pytest.raises(ValueError, match="choose from learn, hard, fixed, dense"):
        MaskSettings(mode="soft")
