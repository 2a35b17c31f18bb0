"""GPU smoke test of the whole path (``pytest -m gpu``; skipped without CUDA): a tiny random HF
LLaMA converted to megatron-core, trained 20 steps on the GPU, saved, resumed bitwise, trimmed
and exported (on the CPU, from the GPU-written checkpoint); eval-ppl and SparseGPT on the GPU.

Every command runs as a user would run it, in its own process, with ``--device cuda``.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from maskllm_megatron.core.nm import NMPattern, is_nm_sparse
from maskllm_megatron.deploy.validate import validate_trtllm

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def llama(corpus, tmp_path_factory):
    """A 3-layer LLaMA (GQA, SwiGLU, RMSNorm, untied head) with the corpus' vocabulary,
    converted at TP=1."""
    import transformers as tf

    root = tmp_path_factory.mktemp("gpu")
    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, torch_dtype="float32")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "hf")
    run_cli(["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out", str(root / "mcore"),
             "--tokenizer", str(corpus / "spm.model"), "--no-progress"])
    return root


def _train(corpus, llama, save, *extra):
    return run_cli([
        "train", "--load", str(llama / "mcore"), "--data-path", str(corpus / "data" / "docs"),
        "--split", "90,10,0", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--seq-length", "32", "--save", str(save), "--seed", "7", "--device", "cuda",
        "--no-progress", *extra])


def _log(save: Path) -> list[dict]:
    return [json.loads(x) for x in (save / "train_log.jsonl").read_text().splitlines()]


def _logits(save: Path, iteration: int) -> dict:
    from run_files import plain_tensors

    tensors = plain_tensors(save / f"iter_{iteration:07d}" / "model")
    return {k: v for k, v in tensors.items() if k.endswith("mask_logits")}


def test_gpu_train_resume_trim_export(corpus, llama, tmp_path):
    assert torch.cuda.is_available()
    # dense warm-up of the random model, bf16 weights with fp32 main copies: loss must fall
    dense = tmp_path / "dense"
    proc = _train(corpus, llama, dense, "--train-weights", "--dense", "--lr", "3e-3",
                  "--train-iters", "20", "--main-grads-dtype", "fp32")
    assert "on cuda:0" in proc.stdout  # the memory table names the device
    losses = [r["loss"] for r in _log(dense)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses

    # mask learning from it: straight, and stopped at 5 then resumed with the same command
    common = ("--load", str(dense), "--train-iters", "10", "--save-interval", "5",
              "--lr", "5e-3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(corpus, llama, straight, *common)
    _train(corpus, llama, resumed, *common, "--exit-interval", "5")
    assert (resumed / "latest").read_text() == "iter_0000005"
    _train(corpus, llama, resumed, *common)
    want, got = _logits(straight, 10), _logits(resumed, 10)
    assert len(want) == 4
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{key} differs after resume on the GPU"
    assert [r["loss"] for r in _log(resumed)] == [r["loss"] for r in _log(straight)]

    # deploy on the CPU from the GPU-written checkpoint
    trimmed = tmp_path / "trimmed"
    run_cli(["trim", str(straight), "--out", str(trimmed)])
    run_cli(["export", "trtllm", "--load", str(trimmed), "--out", str(tmp_path / "trt"),
             "--dtype", "bfloat16", "--no-progress"])
    assert validate_trtllm(tmp_path / "trt").ok
    run_cli(["export", "hf", "--load", str(trimmed), "--out", str(tmp_path / "hf"),
             "--no-progress"])
    from safetensors.torch import load_file

    weights = {name: w for f in (tmp_path / "hf").glob("*.safetensors") if "nm_masks" not in f.name
               for name, w in load_file(f).items()}
    projections = [v for k, v in weights.items()
                   if k.endswith(("q_proj.weight", "down_proj.weight"))]
    assert projections and all(is_nm_sparse(w.float(), NMPattern(2, 4)) for w in projections)


def test_gpu_eval_ppl_and_sparsegpt(corpus, llama, tmp_path):
    text = corpus / "text.txt"
    dense = run_cli(["eval-ppl", "--load", str(llama / "mcore"), "--text", str(text),
                     "--seq-length", "32", "--micro-batch-size", "4", "--device", "cuda",
                     "--no-progress"])
    dense_ppl = float(dense.stdout.split()[-1])
    assert math.isfinite(dense_ppl) and dense_ppl > 1
    run_cli(["prune", "--method", "sparsegpt", "--load", str(llama / "mcore"), "--data-path",
             str(corpus / "data" / "docs"), "--calib-samples", "16", "--seq-length", "32",
             "--save", str(tmp_path / "pruned"), "--device", "cuda", "--no-progress"])
    pruned = run_cli(["eval-ppl", "--load", str(tmp_path / "pruned" / "pruned"), "--text",
                      str(text), "--seq-length", "32", "--device", "cuda", "--no-progress"])
    pruned_ppl = float(pruned.stdout.split()[-1])
    assert math.isfinite(pruned_ppl) and pruned_ppl != dense_ppl
