"""train() itself on the session's warm gloo ranks: pipeline stages and the scheduled lr,
sequence parallelism, fp16 loss scaling and its resume, bf16 weights and their export."""

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from run_files import final_logits as _final_logits
from run_files import plain_tensors
from run_files import train_log as _log


# train() itself on the session's four gloo ranks (no process start-up): DP = 4 / (TP x PP)


def case_train(corpus, save, iters, flags=None):
    from megatron.core import parallel_state as ps

    from maskllm_megatron.training.args import TrainArgs
    from maskllm_megatron.training.loop import train

    args = TrainArgs(model_config=str(corpus / "model"), data_path=[str(corpus / "data" / "docs")],
                     split="90,10,0", micro_batch_size=2, global_batch_size=4, seq_length=32,
                     train_iters=iters, save=str(save), save_interval=1, seed=3, progress=False,
                     tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                     pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
                     **(flags or {}))
    return train(args)


def case_save_start(corpus, path):
    """A dense starting checkpoint (the fresh model and its initial logits)."""
    from maskllm_megatron.checkpoint.model import save_model
    from maskllm_megatron.distributed import current_layout
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig
    from maskllm_megatron.model.layers import assign_layer_ids

    layout = current_layout()
    model = build_model(ModelConfig.load(corpus / "model"), tp=layout.tp, pp=layout.pp)
    assign_layer_ids(model, logits_seed=3)
    save_model(model, path)


def test_pipeline_parallel_counts_every_stage_and_runs_at_the_scheduled_lr(dist4, corpus,
                                                                         tmp_path):
    """PP=2 equals PP=1 (the regulariser of every stage counted); and each step runs at its
    scheduled learning rate: Adam's first step moves every logit with a gradient by exactly
    the rate (megatron's scheduler, step 0)."""
    start = tmp_path / "start"
    dist4.run(case_save_start, corpus, start, tp=4)
    flags = dict(load=str(start), lr=1e-3, min_lr=1e-5, clip_grad=0.0)
    dist4.run(case_train, corpus, tmp_path / "pp1", 2, flags, tp=4)
    dist4.run(case_train, corpus, tmp_path / "pp2", 2, flags, tp=2, pp=2)
    one, two = _log(tmp_path / "pp1"), _log(tmp_path / "pp2")
    assert [r["lr"] for r in one] == pytest.approx([1e-3, 1e-5 + 0.5 * (1e-3 - 1e-5)])
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["reg"] == pytest.approx(a["reg"], rel=1e-5)  # both stages' layers
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    before, after = plain_tensors(start), _final_logits(tmp_path / "pp1", 1)
    for key, value in after.items():
        assert float((value - before[key]).abs().max()) == pytest.approx(1e-3, rel=1e-3), key


def test_sequence_parallel_training_equals_the_run_without_it(dist4, corpus, tmp_path):
    dist4.run(case_train, corpus, tmp_path / "tp2", 2, tp=2)
    # and with the reduction overlapping backward, as on GPUs
    dist4.run(case_train, corpus, tmp_path / "sp", 2,
              {"sequence_parallel": True, "overlap_grad_reduce": True}, tp=2)
    plain, split = _log(tmp_path / "tp2"), _log(tmp_path / "sp")
    assert len(plain) == len(split) == 2
    for a, b in zip(plain, split, strict=True):  # same samples, reductions in another order
        for key in ("loss", "reg", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_fp16_uses_megatron_loss_scaling_and_resumes_exactly(dist4, corpus, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    dist4.run(case_train, corpus, straight, 4, {"fp16": True}, tp=4)
    dist4.run(case_train, corpus, stopped, 4, {"fp16": True, "exit_interval": 2}, tp=4)
    assert (stopped / "latest").read_text() == "iter_0000002"
    state = json.loads((stopped / "iter_0000002" / "train_state.json").read_text())
    assert state["loss_scaler"]["scale"] == 2.0**16  # megatron's dynamic scaler, saved
    dist4.run(case_train, corpus, stopped, 4, {"fp16": True}, tp=4)  # the same run: resumes
    assert [r["loss"] for r in _log(stopped)] == [r["loss"] for r in _log(straight)]
    want, got = _final_logits(straight, 4), _final_logits(stopped, 4)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_bf16_weights_train_and_their_checkpoint_exports_in_fp32(dist4, corpus, tmp_path):
    """What a GPU run writes (bf16 frozen weights) exports on the CPU in fp32."""
    from maskllm_megatron.deploy.validate import validate_trtllm

    save = tmp_path / "run"
    dist4.run(case_train, corpus, save, 1, {"bf16": True}, tp=4)
    tensors = plain_tensors(save / "iter_0000001" / "model")
    fc1 = next(k for k in tensors if k.endswith("linear_fc1.weight"))
    assert tensors[fc1].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k.endswith("logits"))
    run_cli(["export", "trtllm", "--load", str(save), "--out", str(tmp_path / "trt"),
             "--dtype", "float32", "--no-progress"])
    assert validate_trtllm(tmp_path / "trt").ok
