"""Qwen2/Qwen2.5, Qwen3 and Mistral: conversion both ways, logits against transformers at TP=1
and TP=2, and the TensorRT-LLM and Hugging Face exports, on tiny random models of odd sizes
(3 layers, 4 heads over 2 KV heads, a vocabulary of 999, Qwen3's head size 24 != 64 / 4,
a Mistral window of 7 under a 24-token sequence). Everything that writes files runs in one
process; the logits of every family come from two runs of the shared rank pool."""

import json
import shutil

import pytest
import torch
from cli_runner import run_cli as _run

from maskllm_megatron.core.nm import NMPattern, is_nm_sparse, mask_from_scores
from maskllm_megatron.cpu_shims import cuda_literals
from maskllm_megatron.deploy.validate import check_files, validate_trtllm
from maskllm_megatron.interop.hf import (
    ConversionError,
    hf_config_from_model_config,
    model_config_from_hf,
)

VOCAB = 999  # not a multiple of 64, odd: the TP=2 export pads lm_head
KINDS = ["qwen2", "qwen3", "mistral"]
WINDOW = 7
SEQ = 24
P24 = NMPattern(2, 4)


def hf_model(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=1e6, torch_dtype="float32")
    if kind == "qwen2":  # the small Qwen models tie their embeddings
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **common))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=24, tie_word_embeddings=True,
                                                   **common))
    else:
        model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=WINDOW, **common))
    gen = torch.Generator().manual_seed(len(kind))
    with torch.no_grad():  # norms and biases away from 1 and 0, so a mix-up shows
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


PIPELINE = """
import sys
from maskllm_megatron.interop import hf as convert
from maskllm_megatron.deploy import export
from maskllm_megatron.deploy.import_masks import import_masks
from maskllm_megatron import distributed
from maskllm_megatron.cpu_shims import cpu_shims
from maskllm_megatron.cli import parse_args
from maskllm_megatron.pruning.oneshot import prune_checkpoint
with cpu_shims():  # convert both ways, prune --method magnitude, export: one process
    distributed.init_distributed(device="cpu")
    for base in sys.argv[1:]:
        convert.hf_to_mcore(f"{base}/hf", f"{base}/mcore", tp=2, progress=False)
        convert.mcore_to_hf(f"{base}/mcore", f"{base}/back", progress=False)
        prune_checkpoint(parse_args([  # the flags `maskllm prune` takes
            "prune", "--method", "magnitude", "--load", f"{base}/mcore", "--save",
            f"{base}/pruned", "--device", "cpu", "--no-progress"]))
        load = f"{base}/pruned/pruned"
        loaded = export.load_for_export(load)
        for tp in (1, 2):
            export.export_trtllm(load, f"{base}/trt-{tp}", tp, 1, "float32", loaded=loaded,
                                 progress=False)
        export.export_hf(load, f"{base}/hfx", progress=False)
        import_masks(f"{base}/hfx", f"{base}/mcore", f"{base}/imported")  # and back again
        export.export_hf(f"{base}/imported/pruned", f"{base}/hfx2", progress=False)
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per kind: the HF model and its directory tree (hf, mcore, back, pruned, trt-1, trt-2,
    hfx, and hfx2: hfx's packed masks imported onto mcore and exported again), all written by
    one process."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for kind in KINDS:
        model = hf_model(kind)
        model.save_pretrained(root / kind / "hf")
        out[kind] = (model, root / kind)
    _run([str(root / kind) for kind in KINDS], script=PIPELINE)
    return out


def _safetensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_mcore_to_hf_is_bitwise_identical(made, kind):
    _, base = made[kind]
    before, after = _safetensors(base / "hf"), _safetensors(base / "back")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert json.loads((base / "back" / "config.json").read_text()) == \
        json.loads((base / "hf" / "config.json").read_text())
    names = set(before)
    assert ("model.layers.2.self_attn.k_proj.bias" in names) == (kind == "qwen2")
    assert ("model.layers.2.self_attn.k_norm.weight" in names) == (kind == "qwen3")
    assert ("lm_head.weight" in names) == (kind == "mistral")  # the Qwens are tied
    t = json.loads((base / "mcore" / "model_config.json").read_text())["transformer"]
    assert t.get("window_size") == ([WINDOW - 1, 0] if kind == "mistral" else None)
    assert t["kv_channels"] == (24 if kind == "qwen3" else 16)


def case_family_logits(mcores, tokens, no_window=False):
    """Logits (gathered over TP, padding cut) of each converted model; ``no_window``: built
    without its sliding window, to show the window matters."""
    from maskllm_megatron.checkpoint.model import load_model
    from maskllm_megatron.distributed import current_layout
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig

    layout = current_layout()
    out = []
    for mcore in mcores:
        cfg = ModelConfig.load(mcore)
        extra = {"window_size": None} if no_window else {}
        model = build_model(cfg, tp=layout.tp, sparse_layers=(), parallel_output=False, **extra)
        load_model(model, mcore)
        model.eval()
        with torch.no_grad(), cuda_literals():  # megatron's masks are made on "cuda"
            out.append(model(tokens, torch.arange(tokens.shape[1])[None], None)[..., :VOCAB])
    return out


def test_logits_equal_transformers_at_tp1_and_tp2(dist4, made):
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [made[kind][0](tokens).logits for kind in KINDS]
    mcores = [str(made[kind][1] / "mcore") for kind in KINDS]
    for tp in (1, 2):
        for rank, got in enumerate(dist4.run(case_family_logits, mcores, tokens, tp=tp)):
            for kind, g, w in zip(KINDS, got, want, strict=True):
                diff = (g - w).abs().max().item()
                assert diff <= 1e-4, f"{kind} at TP={tp} (rank {rank}): max |diff| {diff}"
    # the window is in force: without it megatron's logits leave transformers' far behind
    unwindowed = dist4.run(case_family_logits, mcores[2:], tokens, True, tp=1)[0][0]
    assert (unwindowed - want[2]).abs().max().item() > 1e-2
    assert torch.allclose(unwindowed[:, :WINDOW], want[2][:, :WINDOW], atol=1e-4)


def _config(kind, **change):
    """The HF config dict a family's checkpoint ships, with ``change`` applied."""
    import transformers as tf

    cls = {"qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config, "mistral": tf.MistralConfig}[kind]
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM"}[kind]
    config = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, architectures=[arch]).to_dict()
    config.update(change)
    return config


@pytest.mark.parametrize("kind, change, message", [
    ("qwen2", {"use_sliding_window": True}, "Qwen2ForCausalLM with use_sliding_window: True"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     r"sliding-window attention on layers \[1\]"),
    ("qwen3", {"attention_bias": True}, "Qwen3ForCausalLM with attention_bias: True"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window false"),
    ("mistral", {"sliding_window": 0}, "sliding_window must be a positive integer"),
    ("mistral", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_what_a_target_cannot_express_is_refused_naming_the_key(kind, change, message):
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf(_config(kind, **change))


def test_qwen_and_mistral_read_their_implicit_keys_and_derive_back():
    qwen2 = model_config_from_hf(_config("qwen2", attention_bias=False))  # not a Qwen2 key
    t = qwen2.transformer
    assert t.add_qkv_bias and not t.add_bias_linear and not t.qk_layernorm
    assert qwen2.rotary_base == 10000.0 and t.window_size is None
    mistral = model_config_from_hf(_config("mistral", sliding_window=None))  # v0.2+: none
    assert mistral.transformer.window_size is None
    theta = model_config_from_hf(_config("qwen3", rope_parameters={"rope_theta": 1e6,
                                                                    "rope_type": "default"}))
    assert theta.rotary_base == 1e6 and theta.transformer.kv_channels == 128  # head_dim
    for kind in KINDS:  # a model not converted from HF finds its family again
        cfg = model_config_from_hf(_config(kind))
        hf = hf_config_from_model_config(cfg)
        assert hf["architectures"] == _config(kind)["architectures"]
        again = model_config_from_hf(hf)
        assert again.transformer == cfg.transformer
        assert (again.rotary_base, again.share_embeddings_and_output_weights) == \
            (cfg.rotary_base, cfg.share_embeddings_and_output_weights)


def _layer(model, i):
    return model.model.layers[i]


def _sparse(weight):
    weight = weight.detach()
    return weight * mask_from_scores(weight.abs(), P24)


@pytest.mark.parametrize("kind", KINDS)
def test_trtllm_export_follows_tensorrt_llms_converter(made, kind):
    from safetensors.torch import load_file

    from maskllm_megatron.deploy.export import trtllm_runtime_note
    from maskllm_megatron.model.config import ModelConfig

    model, base = made[kind]
    d = 24 if kind == "qwen3" else 16
    note = trtllm_runtime_note(ModelConfig.load(base / "pruned" / "pruned"))
    if kind == "mistral":  # what `maskllm export trtllm` prints after the build line
        assert f"--max_attention_window_size {WINDOW} " in note
        assert f"KvCacheConfig(max_attention_window=[{WINDOW}])" in note
    else:
        assert note is None
    for tp in (1, 2):
        directory = base / f"trt-{tp}"
        report = validate_trtllm(directory)
        assert report.ok, report.violations
        config = json.loads((directory / "config.json").read_text())
        if kind == "mistral":  # LLaMA; the window is the runtime's (max_attention_window_size)
            assert config["architecture"] == "LlamaForCausalLM"
            assert not config["attn_bias"] and "sliding_window" not in config
        else:
            assert config["architecture"] == "QWenForCausalLM"
            assert (config["qwen_type"], config["attn_bias"], config["mlp_bias"]) == \
                (kind, kind == "qwen2", False)
        assert (config["head_size"], config["rotary_base"], config["vocab_size"]) == \
            (d, 1e6, VOCAB)
        ranks = [load_file(str(directory / f"rank{r}.safetensors")) for r in range(tp)]
        for i in range(3):
            p, layer = f"transformer.layers.{i}.", _layer(model, i)
            attn, mlp = layer.self_attn, layer.mlp
            q_rows, kv_rows = 4 * d // tp, 2 * d // tp  # 4 heads, 2 KV heads
            qkv = [r[p + "attention.qkv.weight"] for r in ranks]
            got = {"q": torch.cat([x[:q_rows] for x in qkv]),
                   "k": torch.cat([x[q_rows:q_rows + kv_rows] for x in qkv]),
                   "v": torch.cat([x[q_rows + kv_rows:] for x in qkv]),
                   "dense": torch.cat([r[p + "attention.dense.weight"] for r in ranks], 1),
                   "fc": torch.cat([r[p + "mlp.fc.weight"] for r in ranks]),  # gate_proj
                   "gate": torch.cat([r[p + "mlp.gate.weight"] for r in ranks]),  # up_proj
                   "proj": torch.cat([r[p + "mlp.proj.weight"] for r in ranks], 1)}
            want = {"q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight,
                    "dense": attn.o_proj.weight, "fc": mlp.gate_proj.weight,
                    "gate": mlp.up_proj.weight, "proj": mlp.down_proj.weight}
            for role, weight in want.items():
                assert torch.equal(got[role], _sparse(weight)), f"{kind} TP={tp} {role}"
            assert not any(p + "attention.dense.bias" in r for r in ranks)
            if kind == "qwen2":  # q/k/v biases split like the weights
                bias = [r[p + "attention.qkv.bias"] for r in ranks]
                assert torch.equal(torch.cat([b[:q_rows] for b in bias]), attn.q_proj.bias)
                assert torch.equal(torch.cat([b[q_rows:q_rows + kv_rows] for b in bias]),
                                   attn.k_proj.bias)
                assert torch.equal(torch.cat([b[q_rows + kv_rows:] for b in bias]),
                                   attn.v_proj.bias)
            else:
                assert not any(p + "attention.qkv.bias" in r for r in ranks)
            for qk in ("q", "k"):  # Qwen3: replicated per-head RMSNorm
                name = p + f"attention.{qk}_layernorm.weight"
                if kind == "qwen3":
                    norm = getattr(attn, f"{qk}_norm").weight
                    assert all(torch.equal(r[name], norm) for r in ranks)
                else:
                    assert not any(name in r for r in ranks)
        head = torch.cat([r["lm_head.weight"] for r in ranks])
        assert head.shape[0] == (VOCAB + tp - 1) // tp * tp and not head[VOCAB:].any()
        assert torch.equal(head[:VOCAB], model.get_output_embeddings().weight)


def test_the_validator_knows_the_qwen_variants(made, tmp_path):
    cases = {"qwen3": ({"qwen_type": "qwen2"}, "unexpected tensor transformer.layers.0."
                                               "attention.q_layernorm.weight"),
             "qwen2": ({"attn_bias": False}, "unexpected tensor transformer.layers.0."
                                             "attention.qkv.bias")}
    for kind, (change, message) in cases.items():
        directory = tmp_path / kind
        shutil.copytree(made[kind][1] / "trt-2", directory)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        report = check_files(directory)  # the rules alone, past the checksums
        assert any(message in v for v in report.violations), (kind, report.violations)
    del config["qwen_type"]
    (directory / "config.json").write_text(json.dumps(config))
    assert any("qwen_type None" in v for v in check_files(directory).violations)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_export_and_import_masks_keep_biases_and_qk_norms(made, kind):
    from maskllm_megatron.deploy.export import load_packed_masks

    model, base = made[kind]
    exported = _safetensors(base / "hfx")
    masks = load_packed_masks(base / "hfx")
    assert len(masks) == 3 * 7  # q, k, v, o, gate, up, down per layer
    original = {k: v.detach() for k, v in model.state_dict().items()
                if k in exported}  # tied: no lm_head file entry
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        if name in masks:
            assert torch.equal(exported[name], _sparse(tensor)), name
            assert torch.equal(masks[name], mask_from_scores(tensor.abs(), P24).bool()), name
            assert is_nm_sparse(exported[name], P24), name
        else:  # embeddings, norms, Qwen3's q/k norms, Qwen2's q/k/v biases: untouched
            assert torch.equal(exported[name], tensor), name
    # import-masks reads the packed masks through the same tables: the round trip is exact
    again = _safetensors(base / "hfx2")
    assert again.keys() == exported.keys()
    assert all(torch.equal(again[k], exported[k]) for k in exported)
    assert all(torch.equal(m, masks[k]) for k, m in load_packed_masks(base / "hfx2").items())
