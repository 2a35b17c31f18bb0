"""Hugging Face <-> megatron-core conversion on tiny random models built from configs (no hub)."""

import json
import subprocess
import sys

import pytest
import torch
from cli_runner import ENV
from cli_runner import run_cli as _run

from maskllm_megatron.cpu_shims import cuda_literals

VOCAB = 300  # not a multiple of 128: padding is exercised


def hf_model(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, torch_dtype="float32")
    if kind.startswith("llama"):
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, rope_theta=50000.0,
                             tie_word_embeddings=kind == "llama-tied", **common)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "nemotron":
        cfg = tf.NemotronConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, partial_rotary_factor=0.5,
                                **common)
        model = tf.NemotronForCausalLM(cfg)
    else:
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                            eos_token_id=0, **common)
        model = tf.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(len(kind))
    with torch.no_grad():  # norms and biases away from 1 and 0, so a mix-up shows
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


KINDS = ["llama", "llama-tied", "nemotron", "gpt2"]


CONVERT = """
import sys
from maskllm_megatron.interop import hf as convert
from maskllm_megatron import distributed
from maskllm_megatron.cpu_shims import cpu_shims
with cpu_shims():  # what `maskllm convert` does, for several models in one process
    distributed.init_distributed(device="cpu")
    for hf_dir, mcore, back in zip(*[iter(sys.argv[1:])] * 3):
        convert.hf_to_mcore(hf_dir, mcore, tp=2, progress=False)
        convert.mcore_to_hf(mcore, back, progress=False)
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each kind: the HF directory, its mcore conversion (TP=2 padding) and the way back. The
    first through the ``maskllm`` command, the others through the library in one process."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for kind in KINDS:
        hf_dir, mcore, back = root / kind / "hf", root / kind / "mcore", root / kind / "back"
        hf_model(kind).save_pretrained(hf_dir)
        out[kind] = (hf_dir, mcore, back)
    hf_dir, mcore, back = out[KINDS[0]]
    _run(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(mcore), "--tp", "2",
          "--no-progress"])
    _run(["convert", "mcore-to-hf", "--mcore", str(mcore), "--out", str(back), "--no-progress"])
    _run([str(path) for kind in KINDS[1:] for path in out[kind]], script=CONVERT)
    return out


def _safetensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_mcore_to_hf_is_bitwise_identical(converted, kind):
    hf_dir, mcore, back = converted[kind]
    before, after = _safetensors(hf_dir), _safetensors(back)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    cfg = json.loads((mcore / "model_config.json").read_text())
    assert cfg["vocab_size"] == 512  # 300 padded to a multiple of 128 x TP=2
    assert json.loads((back / "config.json").read_text()) == \
        json.loads((hf_dir / "config.json").read_text())


def case_logits(mcore, tokens):
    import torch.distributed as dist

    from maskllm_megatron.checkpoint.model import load_model
    from maskllm_megatron.distributed import current_layout
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig

    layout = current_layout()
    cfg = ModelConfig.load(mcore)
    model = build_model(cfg, tp=layout.tp, pp=layout.pp, sparse_layers=(),
                        parallel_output=False)
    load_model(model, mcore)
    model.eval()
    from megatron.core import parallel_state as ps

    with torch.no_grad(), cuda_literals():  # megatron's default causal mask: device="cuda"
        if ps.get_pipeline_model_parallel_world_size() == 1:
            logits = model(tokens, torch.arange(tokens.shape[1])[None], None)
        else:  # send the hidden states through the stages by hand
            shape = (tokens.shape[1], tokens.shape[0], cfg.transformer.hidden_size)
            if ps.is_pipeline_first_stage():
                hidden = model(tokens, torch.arange(tokens.shape[1])[None], None)
                dist.send(hidden.contiguous(), ps.get_pipeline_model_parallel_next_rank())
                logits = None
            else:
                hidden = torch.empty(shape)
                dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
                logits = model(tokens, torch.arange(tokens.shape[1])[None], None)
    return None if logits is None else logits[..., :VOCAB]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers_at_tp1_tp2_pp2(dist4, converted, kind):
    hf_dir, mcore, _ = converted[kind]
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        results = [r for r in dist4.run(case_logits, str(mcore), tokens, tp=tp, pp=pp)
                   if r is not None]
        assert results
        for got in results:
            diff = (got - want).abs().max().item()
            assert diff <= 1e-4, f"{kind} at TP={tp} PP={pp}: max |diff| {diff}"


def test_eval_ppl_on_a_converted_model_equals_transformers_loss(corpus, tmp_path):
    import transformers as tf

    from maskllm_megatron.data.tokenizer import load_tokenizer
    from maskllm_megatron.eval.perplexity import windows

    model = hf_model("llama")
    model.save_pretrained(tmp_path / "hf")
    spm = corpus / "spm.model"
    _run(["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m"),
          "--tokenizer", str(spm), "--no-progress"])
    text = tmp_path / "test.txt"
    text.write_text((corpus / "text.txt").read_text()[:3000])
    out = _run(["eval-ppl", "--load", str(tmp_path / "m"), "--text", str(text),
                "--seq-length", "48", "--no-progress"]).stdout
    loss = float(out.strip().splitlines()[-1].split()[-2])

    tokens = torch.tensor(load_tokenizer(spm).tokenize(text.read_text()))
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    total = count = 0
    with torch.no_grad():
        for window in windows(tokens, 48):
            n = len(window) - 1
            total += float(hf(window[None], labels=window[None]).loss.double()) * n
            count += n
    assert len(tokens) % 48 != 0  # a tail window is part of the check
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_bad_conversions_are_clear_errors(tmp_path, capsys):
    from maskllm_megatron.cli import main

    hf_dir = tmp_path / "hf"
    hf_model("llama").save_pretrained(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cases = {"a": cfg, "b": dict(cfg, architectures=["BertModel"]),
             "c": dict(cfg, intermediate_size=128)}
    for name, config in cases.items():  # one HF directory per case, the weights shared
        (tmp_path / f"hf-{name}").mkdir()
        for f in hf_dir.iterdir():
            (tmp_path / f"hf-{name}" / f.name).symlink_to(f)
        (tmp_path / f"hf-{name}" / "config.json").unlink()
        (tmp_path / f"hf-{name}" / "config.json").write_text(json.dumps(config))
    extra = {"a": ["--tp", "4"], "b": [], "c": ["--no-progress"]}  # a: 2 KV groups
    codes, errs = {}, {}
    for n in cases:  # the CLI in this process: each case fails in well under a second
        capsys.readouterr()
        codes[n] = main(["convert", "hf-to-mcore", "--hf", str(tmp_path / f"hf-{n}"), "--out",
                         str(tmp_path / n), *extra[n]])
        errs[n] = capsys.readouterr().err

    assert codes["a"] == 2 and "--tp 4 must divide" in errs["a"]
    assert codes["b"] == 2 and errs["b"].startswith("error: maskllm convert hf-to-mcore: ")
    assert all(a in errs["b"] for a in ("LlamaForCausalLM", "NemotronForCausalLM",
                                        "GPT2LMHeadModel"))
    assert codes["c"] == 2
    assert "model.layers.0.mlp.gate_proj.weight [96, 64]" in errs["c"]
    assert "gives shape [192, 64]" in errs["c"] and "expects [256, 64]" in errs["c"]
    assert not any((tmp_path / n).exists() for n in cases)


SHARDED = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from maskllm_megatron.interop import hf as convert
from maskllm_megatron import distributed
from maskllm_megatron.cpu_shims import cpu_shims
with cpu_shims():
    distributed.init_distributed(device="cpu")
    convert.mcore_to_hf(sys.argv[1], sys.argv[2], max_shard_bytes=20000, progress=False)
reader = convert.HFReader(Path(sys.argv[2]))
want = load_file(sys.argv[3])
assert len(set(reader.where.values())) > 1, "expected several shards"
assert sorted(reader.where) == sorted(want)
assert all(torch.equal(reader(name), tensor) for name, tensor in want.items())
print("ok", len(set(reader.where.values())))
"""


def test_large_models_are_written_in_safetensors_shards_with_an_index(converted, tmp_path):
    hf_dir, mcore, _ = converted["llama"]
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(mcore), str(tmp_path / "hf"),
                           str(hf_dir / "model.safetensors")], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "hf").glob("*.partial"))
