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


def test_eval_ppl_scores_the_imported_model_with_its_masks(made, corpus, tmp_path, capsys):
    """The pruned weights are already zero outside the masks: masks on or off, the same PPL;
    the dense model scores differently."""
    root = made[0]
    text = tmp_path / "text.txt"
    text.write_text("\n".join((corpus / "text.txt").read_text().splitlines()[:20]))

    def ppl(load, masks):
        capsys.readouterr()
        assert main(["eval-ppl", "--load", str(load), "--text", str(text),
                     "--tokenizer", str(corpus / "spm.model"), "--seq-length", "32",
                     "--masks", masks, "--no-progress"]) == 0
        row = capsys.readouterr().out.strip().splitlines()[-1].split()
        return row[1], float(row[-1])

    kind, pruned = ppl(root / "imported" / "pruned", "auto")
    assert kind == "fixed"
    assert ppl(root / "imported" / "pruned", "dense")[1] == pytest.approx(pruned, rel=1e-5)
    assert ppl(root / "mcore", "auto")[1] != pytest.approx(pruned, rel=1e-3)


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


def test_train_takes_the_npz_as_its_prior(made, corpus, tmp_path, capsys):
    """``train --prior mask_compressed.npz``: the masks land in SAVE/prior_masks, equal to
    import-masks' own, and bias the logits: the run's argmax is the imported mask."""
    from run_files import final_logits, plain_tensors

    root = made[0]
    run = tmp_path / "run"
    assert main(["train", "--load", str(root / "mcore"), "--prior",
                 str(root / "mask_compressed.npz"), "--data-path", str(corpus / "data" / "docs"),
                 "--tokenizer", str(corpus / "spm.model"), "--seq-length", "32",
                 "--global-batch-size", "2", "--train-iters", "2", "--lr-warmup-iters", "1",
                 "--save", str(run), "--no-progress"]) == 0
    assert "prior: 14 2:4 masks from" in capsys.readouterr().out
    ours = plain_tensors(run / "prior_masks")
    theirs = plain_tensors(root / "imported" / "masks")
    indices = sorted(k for k in theirs if k.endswith("mask_indices"))
    assert indices and sorted(k for k in ours if k.endswith("mask_indices")) == indices
    assert all(torch.equal(ours[k], theirs[k]) for k in indices)
    for key, logits in final_logits(run, 2).items():  # without a prior: 1 in 6 agree
        prior = theirs[key.replace("mask_logits", "mask_indices")].long()
        assert (logits.argmax(-1) == prior).float().mean() > 0.9, key


def test_a_mask_file_prior_needs_the_model_it_was_made_for(made, corpus, tmp_path, capsys):
    root = made[0]
    capsys.readouterr()
    assert main(["train", "--model-config", str(root / "mcore"), "--prior",
                 str(root / "mask_compressed.npz"), "--data-path", str(corpus / "data" / "docs"),
                 "--save", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "give --load" in err and not (tmp_path / "run").exists()


def test_other_masks_onto_a_pruned_checkpoint_are_refused(made, tmp_path, capsys):
    """Its weights are already zero outside its own masks: the import would keep them."""
    root, masks, arrays, _ = made
    name = "model.layers.0.mlp.down_proj.weight"
    arrays = dict(arrays)
    arrays[name + ".mask"] = np.packbits(masks[name].flip(-1).numpy().reshape(-1))
    np.savez(tmp_path / "other.npz", **arrays)
    capsys.readouterr()
    assert main(["import-masks", str(tmp_path / "other.npz"), "--load",
                 str(root / "imported" / "pruned"), "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "already pruned" in err and "decoder.layers.0.mlp.linear_fc2" in err
    assert not (tmp_path / "out").exists()
