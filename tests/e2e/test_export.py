"""trim, TensorRT-LLM export + validator, Hugging Face export with packed masks, on tiny models
converted from transformers (GPT-2 style, Nemotron style, LLaMA style)."""

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli as _run

from maskllm_megatron.core.nm import NMPattern, is_nm_sparse, mask_from_scores
from maskllm_megatron.deploy.validate import validate_trtllm

LAYOUTS = [(1, 1), (2, 1), (2, 2)]
KINDS = ["gpt2", "nemotron", "llama"]
P24 = NMPattern(2, 4)


EXPORTS = """
import sys
from maskllm_megatron.interop import hf as convert
from maskllm_megatron.deploy import export
from maskllm_megatron import distributed
from maskllm_megatron.cpu_shims import cpu_shims
from maskllm_megatron.cli import parse_args
from maskllm_megatron.pruning.oneshot import prune_checkpoint
base = sys.argv[1]
load, out = f"{base}/pruned/pruned", base
with cpu_shims():  # maskllm convert, prune --method magnitude, export: one process
    distributed.init_distributed(device="cpu")
    convert.hf_to_mcore(f"{base}/hf", f"{base}/mcore", progress=False)
    prune_checkpoint(parse_args([  # the flags `maskllm prune` takes
        "prune", "--method", "magnitude", "--load", f"{base}/mcore", "--save",
        f"{base}/pruned", "--device", "cpu", "--no-progress"]))
    loaded = export.load_for_export(load)
    for tp, pp in ((1, 1), (2, 1), (2, 2)):
        export.export_trtllm(load, f"{out}/trt-{tp}-{pp}", tp, pp, "float32", loaded=loaded,
                             progress=False)
    export.export_trtllm(load, f"{out}/trt-bf16", 2, 1, "bfloat16", loaded=loaded,
                         progress=False)
    export.export_hf(load, f"{out}/hf", progress=False)  # over the source: converted already
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per kind: the HF model, and exports of its magnitude-pruned conversion."""
    from test_convert import hf_model

    root = tmp_path_factory.mktemp("export")
    out = {}
    for kind in KINDS:
        base = root / kind
        model = hf_model(kind)
        model.save_pretrained(base / "hf")
        _run([str(base)], script=EXPORTS)
        out[kind] = (model, base)
    return out


def _hf_linear(model, kind, layer):
    """HF weights in [out, in] per TensorRT-LLM role."""
    if kind == "gpt2":
        block = model.transformer.h[layer]
        h = block.attn.c_attn.weight.shape[0]
        q, k, v = block.attn.c_attn.weight.t().split(h)
        return {"q": q, "k": k, "v": v, "dense": block.attn.c_proj.weight.t(),
                "fc": block.mlp.c_fc.weight.t(), "proj": block.mlp.c_proj.weight.t()}
    block = model.model.layers[layer]
    out = {"q": block.self_attn.q_proj.weight, "k": block.self_attn.k_proj.weight,
           "v": block.self_attn.v_proj.weight, "dense": block.self_attn.o_proj.weight,
           "proj": block.mlp.down_proj.weight}
    if kind == "llama":
        out.update(fc=block.mlp.gate_proj.weight, gate=block.mlp.up_proj.weight)
    else:
        out["fc"] = block.mlp.up_proj.weight
    return out


def _ranks(directory, tp, pp):
    from safetensors.torch import load_file

    return {(r // tp, r % tp): load_file(str(directory / f"rank{r}.safetensors"))
            for r in range(tp * pp)}


@pytest.mark.parametrize("kind", KINDS)
def test_rank_files_rebuild_hf_weights_times_the_mask(exported, kind):
    model, base = exported[kind]
    layers, kv = 2, 2 if kind != "gpt2" else 4
    for tp, pp in LAYOUTS:
        directory = base / f"trt-{tp}-{pp}"
        report = validate_trtllm(directory)
        assert report.ok, report.violations
        config = json.loads((directory / "config.json").read_text())
        assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
        assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
        ranks = _ranks(directory, tp, pp)
        d = 16
        for layer in range(layers):
            stage, local = divmod(layer, layers // pp)
            parts = [ranks[(stage, t)] for t in range(tp)]
            p = f"transformer.layers.{local}."
            qkv = [x[p + "attention.qkv.weight"] for x in parts]
            q_rows = 4 * d // tp
            kv_rows = (qkv[0].shape[0] - q_rows) // 2
            got = {"q": torch.cat([x[:q_rows] for x in qkv]),
                   "k": torch.cat([x[q_rows:q_rows + kv_rows] for x in qkv]),
                   "v": torch.cat([x[q_rows + kv_rows:] for x in qkv]),
                   "dense": torch.cat([x[p + "attention.dense.weight"] for x in parts], 1),
                   "fc": torch.cat([x[p + "mlp.fc.weight"] for x in parts]),
                   "proj": torch.cat([x[p + "mlp.proj.weight"] for x in parts], 1)}
            if kind == "llama":
                got["gate"] = torch.cat([x[p + "mlp.gate.weight"] for x in parts])
            assert got["k"].shape[0] == kv * d
            for role, weight in _hf_linear(model, kind, layer).items():
                want = weight.detach() * mask_from_scores(weight.detach().abs(), P24)
                assert torch.equal(got[role], want), f"{kind} TP={tp} PP={pp} {role}"
            if kind == "nemotron":  # LayerNorm1p written as gamma + 1
                ln = model.model.layers[layer].input_layernorm.weight.detach()
                torch.testing.assert_close(parts[0][p + "input_layernorm.weight"], ln + 1)
        last = ranks[(pp - 1, 0)]
        vocab = config["vocab_size"]
        assert vocab == 300 and last["lm_head.weight"].shape[0] == math.ceil(300 / tp)
        head = torch.cat([ranks[(pp - 1, t)]["lm_head.weight"] for t in range(tp)])
        assert not head[vocab:].any()
        want_head = model.get_output_embeddings().weight.detach()
        assert torch.equal(head[:vocab], want_head)


def test_bf16_export_and_hf_export_with_packed_masks(exported):
    import transformers as tf

    from maskllm_megatron.deploy.export import apply_packed_masks, load_packed_masks

    for kind in KINDS:
        model, base = exported[kind]
        report = validate_trtllm(base / "trt-bf16")
        assert report.ok, report.violations
        assert report.density["all sparse GEMM weights"] <= 0.5
        hf_dir = base / "hf"
        config = json.loads((hf_dir / "config.json").read_text())
        assert config["sparsity"]["pattern"] == "2:4"
        assert config["sparsity"]["bits_per_weight"] <= 0.67
        sparse = tf.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        masks = load_packed_masks(hf_dir)
        assert len(masks) == 2 * (4 if kind == "gpt2" else 7 if kind == "llama" else 6)
        params = dict(sparse.named_parameters())
        for name, mask in masks.items():
            weight = params[name].detach()
            assert torch.equal(weight, weight * mask), name  # zeros exactly where masked
            rows = weight.t() if kind == "gpt2" else weight
            assert is_nm_sparse(rows, P24), name
        dense = copy.deepcopy(model)  # the original dense weights
        assert apply_packed_masks(dense, hf_dir) == len(masks)
        for name, param in dense.named_parameters():
            if name in masks:
                assert torch.equal(param.detach(), params[name].detach()), name


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_the_validator_rejects_tampered_checkpoints(exported, tmp_path):
    _, base = exported["llama"]
    source = base / "trt-2-2"
    name = "transformer.layers.0.attention.qkv.weight"

    def three_nonzeros(t):
        t[name][5, 0:4] = torch.tensor([1.0, 2.0, 3.0, 0.0])

    def missing(t):
        del t["transformer.layers.0.mlp.gate.weight"]

    def wrong_shape(t):
        t[name] = t[name][:-1]

    def wrong_dtype(t):
        t[name] = t[name].half()

    cases = {"three": (three_nonzeros, "columns 0..3 hold 3 non-zeros"),
             "missing": (missing, "missing tensor transformer.layers.0.mlp.gate.weight"),
             "shape": (wrong_shape, f"{name} has shape"),
             "dtype": (wrong_dtype, f"{name} is F16")}
    for label, (change, message) in cases.items():
        copy = tmp_path / label
        shutil.copytree(source, copy)
        _rewrite(copy / "rank1.safetensors", change)
        report = validate_trtllm(copy)
        assert not report.ok and any(message in v for v in report.violations), \
            (label, report.violations)
    copy = tmp_path / "mapping"
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    config["mapping"]["rank"] = 0
    (copy / "config.json").write_text(json.dumps(config))
    report = validate_trtllm(copy)
    assert any("mapping has keys ['rank']" in v for v in report.violations)
    # the command line: exit code and the list of violations
    proc = _run(["validate", "trtllm", str(copy)], check=False)
    assert proc.returncode == 2 and "mapping has keys" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: maskllm validate trtllm: ")
    proc = _run(["validate", "trtllm", str(source)], check=False)
    assert proc.returncode == 0 and "valid" in proc.stdout


def test_layouts_that_break_the_pattern_or_heads_are_refused():
    from maskllm_megatron.deploy.export import ExportError, check_layout
    from maskllm_megatron.model.config import ModelConfig, TransformerFields

    cfg = ModelConfig(transformer=TransformerFields(num_layers=2, hidden_size=64,
                                                    num_attention_heads=4, num_query_groups=2,
                                                    ffn_hidden_size=72),
                      vocab_size=128)
    check_layout(cfg, 2, 2, P24)
    with pytest.raises(ExportError, match=r"mlp.proj: row-parallel shards of 72 // 4 = 18"):
        check_layout(cfg, 4, 1, P24)
    with pytest.raises(ExportError, match="8 heads|4 heads"):
        check_layout(cfg, 8, 1, P24)


def test_trim_turns_a_training_run_into_hard_masks(exported, corpus, tmp_path, capsys):
    """train -> trim -> export trtllm, the CLI in this process (no start-up cost per command)."""
    from maskllm_megatron.cli import main

    _, base = exported["llama"]
    run = tmp_path / "run"
    assert main(["train", "--load", str(base / "mcore"), "--data-path",
                 str(corpus / "data" / "docs"), "--split", "90,10,0", "--micro-batch-size", "2",
                 "--global-batch-size", "2", "--seq-length", "32", "--train-iters", "2",
                 "--save", str(run), "--no-progress", "--tokenizer",
                 str(corpus / "spm.model")]) == 0
    capsys.readouterr()
    assert main(["trim", str(run), "--out", str(tmp_path / "trimmed")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"total .* 50\.0%", out)
    assert "dropped" in out and "MiB of optimizer state" in out
    from run_files import plain_tensors

    logits = plain_tensors(run / "iter_0000002" / "model")
    trimmed = plain_tensors(tmp_path / "trimmed")
    assert not any(k.endswith("mask_logits") for k in trimmed)
    indices = {k: v for k, v in trimmed.items() if k.endswith("mask_indices")}
    assert len(indices) == 4
    for key, value in indices.items():
        assert torch.equal(value.long(), logits[key.replace("indices", "logits")].argmax(-1))
    assert main(["export", "trtllm", "--load", str(tmp_path / "trimmed"), "--out",
                 str(tmp_path / "trt"), "--tp", "2", "--dtype", "bfloat16",
                 "--no-progress"]) == 0
    assert validate_trtllm(tmp_path / "trt").ok


def case_export_on_every_rank(load, out):
    """Every rank of a running group calls the exporters (the demo at --tp 2 does): they lay
    the group out at TP=1 and rank 0 alone writes."""
    from maskllm_megatron.deploy import export

    export.trim(load, f"{out}/trimmed")
    export.export_trtllm(f"{out}/trimmed", f"{out}/trt", 2, 1, "float32", progress=False)
    export.export_hf(f"{out}/trimmed", f"{out}/hf", progress=False)
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())


def test_exporters_called_on_every_rank_write_once_what_one_process_writes(exported, dist4,
                                                                             tmp_path):
    from safetensors.torch import load_file

    _, base = exported["llama"]
    files = dist4.run(case_export_on_every_rank, str(base / "pruned" / "pruned"), str(tmp_path))
    assert all(f == files[0] for f in files) and not any(".partial" in f for f in files[0])
    for rank in range(2):  # the single-process export of the same pruned model, tp 2
        got = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        want = load_file(base / "trt-2-1" / f"rank{rank}.safetensors")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert validate_trtllm(tmp_path / "trt").ok
    got, want = (load_file(d / "hf" / "model.safetensors") for d in (tmp_path, base))
    assert all(torch.equal(got[k], want[k]) for k in want)
