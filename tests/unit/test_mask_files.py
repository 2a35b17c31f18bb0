"""Reading published masks (``import-masks``): the official ``.npz`` layout, entry checks that
name the entry, N:M checks, and masks mapped like weights (fused QKV, ``[gate; up]``)."""

import numpy as np
import pytest
import torch

from maskllm_megatron.core.nm import NMPattern, mask_from_scores
from maskllm_megatron.deploy.import_masks import check_nm, read_npz_masks, to_mcore_masks
from maskllm_megatron.errors import CheckpointError, InputError
from maskllm_megatron.interop.hf import TensorMapping, model_config_from_hf, qkv_to_mcore

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (8, 12),
          "model.layers.0.mlp.down_proj.weight": (4, 20)}


def random_mask(shape, seed=0):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return mask_from_scores(scores, NMPattern(2, 4))


def write_npz(path, masks):
    np.savez(path, **{f"{name}.mask": np.packbits(m.numpy().reshape(-1)) for name, m in
                      masks.items()})
    return path


def test_npz_round_trip_is_bitwise(tmp_path):
    masks = {name: random_mask(shape, i) for i, (name, shape) in enumerate(SHAPES.items())}
    read = read_npz_masks(write_npz(tmp_path / "m.npz", masks), SHAPES)
    assert set(read) == set(masks)
    for name, mask in masks.items():
        assert read[name].dtype == torch.bool and torch.equal(read[name], mask)


@pytest.mark.parametrize("case", ["missing", "extra", "short", "dtype"])
def test_a_bad_entry_is_named(tmp_path, case):
    masks = {name: random_mask(shape) for name, shape in SHAPES.items()}
    arrays = {f"{name}.mask": np.packbits(m.numpy().reshape(-1)) for name, m in masks.items()}
    q = "model.layers.0.self_attn.q_proj.weight.mask"
    if case == "missing":
        del arrays[q]
    elif case == "extra":
        arrays["model.layers.9.self_attn.q_proj.weight.mask"] = arrays[q]
    elif case == "short":
        arrays[q] = arrays[q][:-1]
    else:
        arrays[q] = arrays[q].astype(np.int32)
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(InputError) as err:
        read_npz_masks(tmp_path / "m.npz", SHAPES)
    assert ("layers.9" if case == "extra" else q) in str(err.value)


def test_pickled_entries_are_refused_unread(tmp_path):
    np.savez(tmp_path / "m.npz", **{"model.layers.0.self_attn.q_proj.weight.mask":
                                    np.array([{"a": 1}], dtype=object),
                                    "model.layers.0.mlp.down_proj.weight.mask":
                                    np.zeros(10, np.uint8)})
    with pytest.raises(CheckpointError, match="q_proj"):
        read_npz_masks(tmp_path / "m.npz", SHAPES)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.npz"):
        read_npz_masks(tmp_path / "junk.npz", SHAPES)


def test_non_nm_masks_are_named_with_their_first_bad_group():
    good = random_mask((4, 8))
    check_nm({"a.weight": good}, NMPattern(2, 4), False, "f.npz")
    check_nm({"a.weight": good.t()}, NMPattern(2, 4), True, "f.npz")  # GPT-2's [in, out]
    bad = good.clone()
    bad[2, 4:8] = True
    with pytest.raises(InputError, match=r"'a.weight' is not a 2:4 mask.*row 2, columns 4..7"):
        check_nm({"a.weight": bad}, NMPattern(2, 4), False, "f.npz")


def test_masks_map_like_weights():
    """Fused QKV per query group and [gate; up]: the converter's own mapping."""
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 16,
          "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 8}
    cfg = model_config_from_hf(hf)
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (16, 16), p + "input_layernorm.weight": (16,),
              p + "post_attention_layernorm.weight": (16,), "model.norm.weight": (16,),
              "lm_head.weight": (16, 16)}
    masks = {}
    for i, (name, shape) in enumerate({"self_attn.q_proj": (16, 16), "self_attn.k_proj": (8, 16),
                                       "self_attn.v_proj": (8, 16), "self_attn.o_proj": (16, 16),
                                       "mlp.gate_proj": (24, 16), "mlp.up_proj": (24, 16),
                                       "mlp.down_proj": (16, 24)}.items()):
        masks[f"{p}{name}.weight"] = random_mask(shape, i)
        shapes[f"{p}{name}.weight"] = shape
    mcore = to_mcore_masks(TensorMapping("llama", hf, cfg), masks, shapes)
    m = "decoder.layers.0."
    assert set(mcore) == {m + "self_attention.linear_qkv.weight",
                          m + "self_attention.linear_proj.weight", m + "mlp.linear_fc1.weight",
                          m + "mlp.linear_fc2.weight"}
    assert torch.equal(mcore[m + "self_attention.linear_qkv.weight"], qkv_to_mcore(
        masks[p + "self_attn.q_proj.weight"], masks[p + "self_attn.k_proj.weight"],
        masks[p + "self_attn.v_proj.weight"], 2))
    assert torch.equal(mcore[m + "mlp.linear_fc1.weight"], torch.cat(
        [masks[p + "mlp.gate_proj.weight"], masks[p + "mlp.up_proj.weight"]]))
    assert torch.equal(mcore[m + "mlp.linear_fc2.weight"], masks[p + "mlp.down_proj.weight"])


def test_gpt2_conv1d_masks_are_transposed_like_its_weights():
    hf = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_embd": 16, "n_layer": 1,
          "n_head": 4, "n_positions": 8}
    cfg = model_config_from_hf(hf)
    p = "transformer.h.0."
    shapes = {"transformer.wte.weight": (16, 16), "transformer.wpe.weight": (8, 16),
              "transformer.ln_f.weight": (16,), "transformer.ln_f.bias": (16,)}
    for ln in ("ln_1", "ln_2"):
        shapes.update({f"{p}{ln}.weight": (16,), f"{p}{ln}.bias": (16,)})
    masks = {}
    for i, (name, shape) in enumerate({"attn.c_attn": (16, 48), "attn.c_proj": (16, 16),
                                       "mlp.c_fc": (16, 64), "mlp.c_proj": (64, 16)}.items()):
        masks[f"{p}{name}.weight"] = random_mask(shape[::-1], i).t()  # Conv1D: [in, out]
        shapes[f"{p}{name}.weight"] = shape
        shapes[f"{p}{name}.bias"] = (shape[1],)
    check_nm(masks, NMPattern(2, 4), True, "f.npz")
    mcore = to_mcore_masks(TensorMapping("gpt2", hf, cfg), masks, shapes)
    q, k, v = masks[p + "attn.c_attn.weight"].t().split([16, 16, 16])
    assert torch.equal(mcore["decoder.layers.0.self_attention.linear_qkv.weight"],
                       qkv_to_mcore(q, k, v, 4))
    assert torch.equal(mcore["decoder.layers.0.mlp.linear_fc2.weight"],
                       masks[p + "mlp.c_proj.weight"].t())
