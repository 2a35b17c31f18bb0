"""Pruning and perplexity on a tiny megatron GPT at TP x PP: the layout does not change the
result (except SparseGPT's documented per-shard approximation), and perplexity follows the
pinned protocol."""

import math

import pytest
import torch

from maskllm_megatron.cpu_shims import cuda_literals

SEQ, VOCAB, CALIB = 16, 128, 8
TRUE_VOCAB = 100  # rows 100..127 play a converted model's vocabulary padding


def _build(mode="fixed", sequence_parallel=False):
    from megatron.core import parallel_state as ps

    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig, TransformerFields
    from maskllm_megatron.model.layers import MaskSettings, assign_layer_ids

    cfg = ModelConfig(TransformerFields(num_layers=2, hidden_size=64, num_attention_heads=4,
                                        ffn_hidden_size=128, add_bias_linear=True),
                      vocab_size=VOCAB, max_sequence_length=SEQ)
    torch.manual_seed(0)
    model = build_model(cfg, MaskSettings(mode=mode), tp=ps.get_tensor_model_parallel_world_size(),
                        pp=ps.get_pipeline_model_parallel_world_size(),
                        sequence_parallel=sequence_parallel)
    assign_layer_ids(model)
    return model


def _calibration():
    gen = torch.Generator().manual_seed(5)
    samples = []
    for _ in range(CALIB):
        tokens = torch.randint(0, VOCAB, (SEQ + 1,), generator=gen)
        samples.append({"tokens": tokens[:-1], "labels": tokens[1:],
                        "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)})
    return samples


def case_save_dense(path):
    from maskllm_megatron.checkpoint.model import save_model

    save_model(_build(mode="dense"), path)


def case_prune(path, method, hessian, sequence_parallel=False):
    import torch.distributed as dist

    from maskllm_megatron.checkpoint.model import global_tensors, load_model
    from maskllm_megatron.data.datasets import BatchLayout
    from maskllm_megatron.distributed import current_layout
    from maskllm_megatron.pruning.oneshot import prune_model
    from maskllm_megatron.training.step import forward_passes

    model = _build(sequence_parallel=sequence_parallel)
    load_model(model, path, missing_masks="keep")
    layout = current_layout()
    batches = BatchLayout(2, CALIB, layout.dp)
    data = _calibration()
    prune_model(model, lambda: forward_passes(model, data, batches, SEQ, dp_rank=layout.dp_rank),
                method, update=method == "sparsegpt", row_parallel_hessian=hessian,
                progress=False)
    found = global_tensors(model, suffixes=(".mask_indices", ".weight"))
    return found if dist.get_rank() == 0 else None


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_is_the_same_at_every_layout(dist4, tmp_path, method):
    from maskllm_megatron.core.nm import NMPattern, is_nm_sparse

    path = str(tmp_path / "dense")
    dist4.run(case_save_dense, path)
    ref = dist4.run(case_prune, path, method, "gather")[0]
    masks = {k: v for k, v in ref.items() if k.endswith("mask_indices")}
    assert len(masks) == 4
    for key, value in ref.items():
        if "linear_" in key and key.endswith(".weight"):
            assert all(is_nm_sparse(value[layer], NMPattern(2, 4)) for layer in range(2)), key
    for tp, pp, sp in ((2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)):
        got = dist4.run(case_prune, path, method, "gather", sp, tp=tp, pp=pp)[0]
        for key, want in ref.items():
            if key.endswith("mask_indices"):
                assert torch.equal(got[key], want), f"{key} at TP={tp} PP={pp} SP={sp}"
            else:
                torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5,
                                           msg=f"{key} at TP={tp} PP={pp} SP={sp}")
    if method == "sparsegpt":
        # per-shard Hessians: the first block's column-parallel layers (same inputs, rows
        # independent) stay exact, its row-parallel layers change; later blocks then see
        # different inputs
        got = dist4.run(case_prune, path, method, "shard", tp=2)[0]
        for key, want in masks.items():
            same = torch.equal(got[key][0], want[0])
            row_parallel = "linear_proj" in key or "linear_fc2" in key
            assert same != row_parallel, key
            assert all(is_nm_sparse(got[key.replace("mask_indices", "weight")][layer],
                                    NMPattern(2, 4)) for layer in range(2))


def case_perplexity(path, tokens, seq_length, sequence_parallel=False):
    from maskllm_megatron.checkpoint.model import load_model
    from maskllm_megatron.eval.perplexity import perplexity

    model = _build(mode="dense", sequence_parallel=sequence_parallel)
    load_model(model, path, missing_masks="keep")
    return perplexity(model, tokens, seq_length, micro_batch_size=2, true_vocab_size=TRUE_VOCAB)


def case_reference_nll(path, tokens, seq_length):
    """Plain forward of each window on one rank: logits -> log-softmax in float64."""
    from maskllm_megatron.checkpoint.model import load_model

    model = _build(mode="dense")
    load_model(model, path, missing_masks="keep")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), cuda_literals():  # megatron's default causal mask: device="cuda"
        for start in range(0, len(tokens), seq_length):
            window = tokens[start:start + seq_length]
            if len(window) < 2:
                continue
            logits = model(window[None], torch.arange(len(window))[None], None)
            logp = torch.log_softmax(logits[0, :, :TRUE_VOCAB].double(), dim=-1)
            total -= float(logp[:-1].gather(1, window[1:, None]).sum())
            count += len(window) - 1
    return total, count


def test_perplexity_protocol_and_layouts(dist4, tmp_path):
    path = str(tmp_path / "dense")
    dist4.run(case_save_dense, path)
    tokens = torch.randint(0, TRUE_VOCAB, (16 * 5 + 7,), generator=torch.Generator().manual_seed(2))
    total, count = dist4.run(case_reference_nll, path, tokens, SEQ)[0]
    assert count == 5 * 15 + 6  # the tail window of 7 tokens predicts 6
    ref = dist4.run(case_perplexity, path, tokens, SEQ)[0]
    assert ref["tokens"] == count and ref["windows"] == 6
    assert ref["loss"] == pytest.approx(total / count, rel=1e-6)
    assert ref["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    for tp, pp, sp in ((2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True), (4, 1, True)):
        got = dist4.run(case_perplexity, path, tokens, SEQ, sp, tp=tp, pp=pp)
        assert all(g["loss"] == pytest.approx(ref["loss"], rel=1e-5) for g in got), (tp, pp, sp)
        assert all(g["tokens"] == count for g in got)  # sequence-parallel padding not counted
