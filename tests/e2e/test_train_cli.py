"""The trainer end to end through `maskllm train` (torchrun, gloo) on a tiny generated corpus."""

import contextlib
import os
import signal
import subprocess
import sys

import pytest
import torch
from cli_runner import ENV
from run_files import final_logits as _final_logits
from run_files import plain_tensors
from run_files import train_log as _log

from maskllm_megatron.training.loop import FAULT_INJECTION


def _command(corpus, save, tp=1, pp=1, iters=6, extra=()):
    nproc = tp * pp
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable])
    return launcher + [
        "-m", "maskllm_megatron.cli", "train", "--model-config", str(corpus / "model"),
        "--data-path", str(corpus / "data" / "docs"), "--split", "90,10,0",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", str(iters), "--save", str(save), "--save-interval", "1",
        "--keep-checkpoints", "2", "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp), "--seed", "3", "--no-progress", *extra]


def _run(cmd, check=True):
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _killed(cmd, point: str) -> int:
    """Run ``cmd`` with the trainer's fault injection at ``point``; returns its exit code once
    the ranks are dead, and removes whatever they left running (as a node failure would)."""
    proc = subprocess.Popen(cmd, env={**ENV, FAULT_INJECTION: point}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    code = proc.wait(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return code


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_a_killed_run_resumes_bitwise(corpus, tmp_path, tp):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_command(corpus, straight, tp=tp))
    # every rank SIGKILLed right after iteration 3 (the trainer's fault-injection hook)
    assert _killed(_command(corpus, killed, tp=tp), "kill-after-iteration:3") != 0
    assert max(r["iteration"] for r in _log(killed)) == 3
    _run(_command(corpus, killed, tp=tp))  # the same command again
    assert (killed / "latest").read_text() == "iter_0000006"
    want, got = _final_logits(straight, 6), _final_logits(killed, 6)
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{key} differs after resume at TP={tp}"
    losses = {r["iteration"]: r["loss"] for r in _log(straight)}
    for record in _log(killed):  # every iteration, before and after the kill, matches
        assert record["loss"] == losses[record["iteration"]]
    assert len(list(killed.glob("iter_???????"))) == 2  # --keep-checkpoints
    assert (killed / "train_curves.png").stat().st_size > 0


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(corpus, tmp_path):
    import shutil

    save = tmp_path / "run"
    # killed during the iteration-3 save, between the model and the optimizer moments
    assert _killed(_command(corpus, save, iters=3), "kill-during-save:3") != 0
    assert (save / "iter_0000003.tmp" / "model").is_dir()
    assert (save / "latest").read_text() == "iter_0000002"
    # and a directory `latest` does not name, without its train state
    shutil.copytree(save / "iter_0000002", save / "iter_0000004")
    (save / "iter_0000004" / "train_state.json").unlink()
    proc = _run(_command(corpus, save, iters=3))
    assert "final: iteration=3" in proc.stdout
    assert [r["iteration"] for r in _log(save)] == [1, 2, 3]  # resumed from 2, not 0 or 4
    # resuming with another optimizer state format is refused, naming both
    proc = _run(_command(corpus, save, iters=4, extra=["--exp-avg-sq-dtype", "fp32"]),
                check=False)
    assert proc.returncode == 2
    assert "'exp_avg_sq_dtype': 'bf16'" in proc.stderr and "'fp32'" in proc.stderr
    assert (save / "latest").read_text() == "iter_0000003"


MAKE_CHECKPOINT = """  # a dense starting checkpoint, optionally with a NaN weight
import sys, torch
from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.model import save_model
from maskllm_megatron.cpu_shims import cpu_shims
from maskllm_megatron.model.layers import assign_layer_ids, sparse_layers
from maskllm_megatron.model.config import ModelConfig
from maskllm_megatron.model.build import build_model
with cpu_shims():
    distributed.init_distributed(1, 1, device="cpu")
    model = build_model(ModelConfig.load(sys.argv[1]))
    assign_layer_ids(model, logits_seed=1234)
    if sys.argv[3] == "nan":
        with torch.no_grad():
            sparse_layers(model)[0][1].weight[0, 0] = float("nan")
    save_model(model, sys.argv[2])
    distributed.shutdown()
"""


def test_non_finite_steps_are_refused_and_stop_the_run(corpus, tmp_path, budget=1):
    poisoned, save = tmp_path / "poisoned", tmp_path / "run"
    _run([sys.executable, "-c", MAKE_CHECKPOINT, str(corpus / "model"), str(poisoned), "nan"])
    proc = _run(_command(corpus, save, iters=4, extra=[
        "--load", str(poisoned), "--skip-nonfinite-steps", str(budget)]), check=False)
    assert proc.returncode == 2
    assert f"iteration {budget}: non-finite loss" in proc.stderr
    assert f"{budget + 1} such steps exceed --skip-nonfinite-steps={budget}" in proc.stderr
    assert not save.exists()  # no step was taken: the run directory it made is removed


def test_yaml_config_and_flags(tmp_path):
    from maskllm_megatron.cli import parse_args
    from maskllm_megatron.cli.train import train_args_from

    config = tmp_path / "recipe.yaml"
    config.write_text("tensor-model-parallel-size: 2\ntrain_iters: 50\n"
                      "gumbel-temperature-range: [3.0, 0.1]\nlr: 1.0e-4\n")
    args = train_args_from(parse_args(["train", "--config", str(config), "--lr", "2e-4"]))
    assert args.tensor_model_parallel_size == 2 and args.train_iters == 50
    assert args.gumbel_temperature_range == [3.0, 0.1]
    assert args.lr == 2e-4  # the command line wins over the file
    assert args.gumbel_scale_range == [1e2, 5e2] and args.prior_strength == 3.0
    config.write_text("tensor_parallel: 2\n")
    with pytest.raises(ValueError, match="unknown key 'tensor_parallel'"):
        parse_args(["train", "--config", str(config)])


def test_blended_datasets_follow_weights_and_seed(corpus):
    from maskllm_megatron.data.datasets import BatchLayout, build_gpt_datasets, parse_blend
    from maskllm_megatron.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(corpus / "spm.model")
    prefix = str(corpus / "data" / "docs")
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a"]) == (["a"], None)
    first, _, _ = build_gpt_datasets(["1", prefix, "3", prefix], tokenizer, 32, 5, (400, 0, 0),
                                     split="100,0,0")
    again, _, _ = build_gpt_datasets(["1", prefix, "3", prefix], tokenizer, 32, 5, (400, 0, 0),
                                     split="100,0,0")
    other, _, _ = build_gpt_datasets(["1", prefix, "3", prefix], tokenizer, 32, 6, (400, 0, 0),
                                     split="100,0,0")
    counts = torch.bincount(torch.as_tensor(first.dataset_index[:400], dtype=torch.long))
    assert abs(counts[1].item() / 400 - 0.75) < 0.05  # weights 1:3
    assert all(torch.equal(torch.as_tensor(first[i]["tokens"]), torch.as_tensor(again[i]["tokens"]))
               for i in range(20))
    assert not all(torch.equal(torch.as_tensor(first[i]["tokens"]),
                               torch.as_tensor(other[i]["tokens"])) for i in range(20))
    layout = BatchLayout(micro_batch_size=2, global_batch_size=8, data_parallel_size=2)
    seen = [i for k in range(2) for r in range(2) for i in layout.indices(3, k, r)]
    assert sorted(seen) == list(range(24, 32))  # iteration 3 reads its own 8 samples
    with pytest.raises(ValueError, match="multiple"):
        BatchLayout(micro_batch_size=3, global_batch_size=8, data_parallel_size=2)


def test_train_weights_with_masks_off_is_dense_pretraining(corpus, tmp_path, tp=2):
    start, save = tmp_path / "start", tmp_path / "run"
    _run([sys.executable, "-c", MAKE_CHECKPOINT, str(corpus / "model"), str(start), "ok"])
    # at TP=2 the Adam moments of row-parallel weights are sharded along the input axis
    extra = ["--load", str(start), "--train-weights", "--dense", "--lr", "1e-3",
             "--eval-interval", "3", "--eval-iters", "2"]
    _run(_command(corpus, save, tp=tp, iters=3, extra=extra))
    before, after = plain_tensors(start), plain_tensors(save / "iter_0000003" / "model")
    weights = [k for k in before if k.endswith("linear_fc1.weight")]
    assert weights and not torch.equal(before[weights[0]], after[weights[0]])
    for key in (k for k in before if k.endswith("mask_logits")):
        assert torch.equal(before[key], after[key])  # masks off: logits untouched
    losses = [r["loss"] for r in _log(save)]
    assert losses[-1] < losses[0]
    validation = [r["val_loss"] for r in _log(save) if "val_loss" in r]
    assert len(validation) == 1 and 0 < validation[0] < 2 * losses[0]  # held-out split


# ----------------------------------------------------------------------------- in the rank pool
