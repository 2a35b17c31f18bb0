"""``maskllm import-masks`` on a tiny converted LLaMA: the official ``.npz`` layout and our packed
masks become fixed masks bitwise (through megatron's fused QKV and [gate; up]); trim takes the
result; a wrong-size or non-2:4 entry is one error line naming it, exit 2, no output."""

import numpy as np
import pytest
import torch

from maskllm_megatron.cli import main
from maskllm_megatron.core.nm import NMPattern, indices_to_mask, mask_from_scores
from maskllm_megatron.interop.hf import qkv_to_mcore

SPARSE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny LLaMA converted to mcore, random 2:4 masks for its linears in the official
    layout, and that file imported."""
    from test_convert import hf_model

    root = tmp_path_factory.mktemp("import")
    model = hf_model("llama")
    model.save_pretrained(root / "hf")
    assert main(["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out",
                 str(root / "mcore"), "--no-progress"]) == 0
    gen = torch.Generator().manual_seed(7)
    state = model.state_dict()
    masks = {}
    for name, weight in state.items():
        if name.endswith(".weight") and any(f".{s}." in name for s in SPARSE):
            masks[name] = mask_from_scores(torch.rand(weight.shape, generator=gen),
                                           NMPattern(2, 4))
    arrays = {f"{n}.mask": np.packbits(m.numpy().reshape(-1)) for n, m in masks.items()}
    np.savez(root / "mask_compressed.npz", **arrays)
    assert main(["import-masks", str(root / "mask_compressed.npz"), "--load",
                 str(root / "mcore"), "--save", str(root / "imported")]) == 0
    return root, masks, arrays, state


def _fixed_masks(path):
    """mcore name -> (mask, weight) of the fixed masks of checkpoint ``path``."""
    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims
    from maskllm_megatron.deploy.export import load_for_export
    from maskllm_megatron.model.layers import sparse_layers

    with cpu_shims():
        distributed.init_distributed(device="cpu")
        try:
            model, _, mode, _, _, _ = load_for_export(path)
            assert mode == "fixed"
            return {name: (indices_to_mask(layer.mask_indices.long(), NMPattern(2, 4)),
                           layer.weight.detach().clone()) for name, layer in sparse_layers(model)}
        finally:
            distributed.shutdown()


def _expected(masks, state, i):
    """Layer ``i``'s HF masks and weights in megatron's layout, built here by hand."""
    p = f"model.layers.{i}."
    out = {}
    for source in (masks, state):
        get = lambda s, source=source: source[f"{p}{s}.weight"]  # noqa: E731
        out.setdefault("self_attention.linear_qkv", []).append(qkv_to_mcore(
            get("self_attn.q_proj"), get("self_attn.k_proj"), get("self_attn.v_proj"), 2))
        out.setdefault("self_attention.linear_proj", []).append(get("self_attn.o_proj"))
        out.setdefault("mlp.linear_fc1", []).append(torch.cat([get("mlp.gate_proj"),
                                                               get("mlp.up_proj")]))
        out.setdefault("mlp.linear_fc2", []).append(get("mlp.down_proj"))
    return out


def test_the_npz_becomes_fixed_masks_bitwise_and_trim_takes_it(made, tmp_path):
    root, masks, _, state = made
    assert (root / "imported" / "masks" / "metadata.json").exists()
    stored = _fixed_masks(root / "imported" / "pruned")
    assert len(stored) == 8
    for i in range(2):
        for kind, (mask, weight) in _expected(masks, state, i).items():
            got_mask, got_weight = stored[f"decoder.layers.{i}.{kind}"]
            assert torch.equal(got_mask, mask), kind
            assert torch.equal(got_weight, weight * mask), kind
    assert main(["trim", str(root / "imported" / "pruned"), "--out", str(tmp_path / "t")]) == 0


def test_our_packed_masks_import_the_same(made, tmp_path):
    root, masks, _, _ = made
    assert main(["export", "hf", "--load", str(root / "imported" / "pruned"), "--out",
                 str(tmp_path / "hf"), "--no-progress"]) == 0
    assert main(["import-masks", str(tmp_path / "hf" / "nm_masks.safetensors"), "--load",
                 str(root / "mcore"), "--save", str(tmp_path / "again")]) == 0
    first = _fixed_masks(root / "imported" / "pruned")
    again = _fixed_masks(tmp_path / "again" / "pruned")
    assert all(torch.equal(first[k][0], again[k][0]) for k in first)


@pytest.mark.parametrize("case", ["size", "not-2:4"])
def test_a_bad_entry_is_one_error_line_naming_it(made, tmp_path, capsys, case):
    root, masks, arrays, _ = made
    name = "model.layers.1.mlp.up_proj.weight"
    arrays = dict(arrays)
    if case == "size":
        arrays[name + ".mask"] = arrays[name + ".mask"][:-3]
    else:
        bad = masks[name].clone()
        bad[5, 8:12] = True
        arrays[name + ".mask"] = np.packbits(bad.numpy().reshape(-1))
    np.savez(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["import-masks", str(tmp_path / "bad.npz"), "--load", str(root / "mcore"),
                 "--save", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: maskllm import-masks: "), lines
    assert name in lines[0]
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_train_prior_names_the_import_for_a_mask_file(made, tmp_path, capsys):
    root = made[0]
    capsys.readouterr()
    assert main(["train", "--load", str(root / "mcore"), "--prior",
                 str(root / "mask_compressed.npz"), "--data-path", str(tmp_path / "d"),
                 "--save", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "import-masks" in err and not (tmp_path / "run").exists()
