"""The sparse GPT layer spec: which classes go where (no process group needed)."""

import pytest
import torch

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.errors import InputError
from maskllm_megatron.model import spec as spec_module
from maskllm_megatron.model.layers import (
    MaskSettings,
    SparseColumnParallelLinear,
    SparseRowParallelLinear,
)
from maskllm_megatron.model.spec import LocalNorm, get_sparse_gpt_layer_spec


def _linears(spec):
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    return {"linear_qkv": attention.linear_qkv, "linear_proj": attention.linear_proj,
            "linear_fc1": mlp.linear_fc1, "linear_fc2": mlp.linear_fc2}


def test_all_four_linears_become_sparse_with_the_settings():
    settings = MaskSettings(pattern=NMPattern(1, 4))
    spec = get_sparse_gpt_layer_spec(settings)
    linears = _linears(spec)
    assert linears["linear_qkv"].module is SparseColumnParallelLinear
    assert linears["linear_fc1"].module is SparseColumnParallelLinear
    assert linears["linear_proj"].module is SparseRowParallelLinear
    assert linears["linear_fc2"].module is SparseRowParallelLinear
    assert all(s.params["mask_settings"] is settings for s in linears.values())


def test_layer_kinds_are_selectable_and_the_rest_stay_megatron_dense():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    spec = get_sparse_gpt_layer_spec(sparse_layers=("linear_fc1", "linear_fc2"))
    linears = _linears(spec)
    assert linears["linear_qkv"] is ColumnParallelLinear
    assert linears["linear_proj"] is RowParallelLinear
    assert linears["linear_fc2"].module is SparseRowParallelLinear
    with pytest.raises(ValueError, match="linear_qk.*choose from"):
        get_sparse_gpt_layer_spec(sparse_layers=("linear_qk",))


def test_transformer_impl_picks_te_norms_and_attention_or_local_ones(monkeypatch):
    class FakeTENorm:  # stand-ins: TE cannot be installed on CPU
        pass

    class FakeTEAttention:
        pass

    assert spec_module.transformer_engine_modules() is None  # not on this machine
    assert spec_module.default_transformer_impl(torch.device("cpu")) == "local"
    assert spec_module.default_transformer_impl(torch.device("cuda", 0)) == "local"  # no TE
    plain = get_sparse_gpt_layer_spec()
    assert plain.submodules.input_layernorm is LocalNorm  # no apex here either
    with pytest.raises(InputError, match="Transformer Engine"):  # the user's choice
        get_sparse_gpt_layer_spec(transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="choose from local, transformer_engine"):
        get_sparse_gpt_layer_spec(transformer_impl="te")

    monkeypatch.setattr(spec_module, "transformer_engine_modules",
                        lambda: (FakeTENorm, FakeTEAttention))
    assert spec_module.default_transformer_impl(torch.device("cuda", 0)) == "transformer_engine"
    assert spec_module.default_transformer_impl(torch.device("cpu")) == "local"
    te = get_sparse_gpt_layer_spec(transformer_impl="transformer_engine", qk_layernorm=True)
    assert te.submodules.input_layernorm is FakeTENorm
    assert te.submodules.pre_mlp_layernorm is FakeTENorm
    attention = te.submodules.self_attention.submodules
    assert attention.core_attention is FakeTEAttention
    assert attention.q_layernorm is FakeTENorm and attention.k_layernorm is FakeTENorm
    assert _linears(te)["linear_qkv"].module is SparseColumnParallelLinear  # linears stay ours
    local = get_sparse_gpt_layer_spec(transformer_impl="local")
    assert local.submodules.input_layernorm is LocalNorm


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_local_norm_matches_a_float64_reference(normalization, zero_centered):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=2,
                               normalization=normalization, sequence_parallel=True,
                               tensor_model_parallel_size=2,
                               layernorm_zero_centered_gamma=zero_centered,
                               use_cpu_initialization=True)
    norm = LocalNorm(config, 24, eps=1e-5)
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        if hasattr(norm, "bias"):
            norm.bias.normal_(generator=gen)
    assert all(p.sequence_parallel for p in norm.parameters())  # reduced over TP by megatron
    x = torch.randn(3, 5, 24, generator=gen)
    gamma = norm.weight.double() + (1 if zero_centered else 0)
    xd = x.double()
    if normalization == "RMSNorm":
        want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-5) * gamma
    else:
        centred = xd - xd.mean(-1, keepdim=True)
        want = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + 1e-5) * gamma
        want = want + norm.bias.double()
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-5, atol=1e-5)


def test_mask_settings_reject_unknown_modes():
    with pytest.raises(ValueError, match="choose from learn, hard, fixed, dense"):
        MaskSettings(mode="soft")
