"""One error surface: every user error of every command is one line, ``error: maskllm CMD:
...``, with exit code 2, and leaves no output directory behind (an existing one unchanged); a
bug is a traceback and exit code 1; ``--debug`` adds the traceback to a user error.

The commands run in this process (``maskllm_megatron.cli.main``, which starts and ends its own
process group each call), a few as real processes for the exit code the OS sees."""

import json
import shutil
import subprocess
import sys

import pytest
from cli_runner import CLI, ENV

from maskllm_megatron.cli import main
from maskllm_megatron.training.loop import FAULT_INJECTION


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny LLaMA: its HF directory, its dense conversion, a magnitude-pruned copy, a pruned
    copy whose mask indices were tampered with, and a directory of unrelated files."""
    from test_convert import hf_model

    from maskllm_megatron import distributed
    from maskllm_megatron.checkpoint.model import save_model
    from maskllm_megatron.cpu_shims import cpu_shims
    from maskllm_megatron.deploy.export import load_for_export
    from maskllm_megatron.model.config import copy_model_files
    from maskllm_megatron.model.layers import sparse_layers

    root = tmp_path_factory.mktemp("surface")
    hf_model("llama").save_pretrained(root / "hf")
    assert main(["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out",
                 str(root / "mcore"), "--no-progress"]) == 0
    assert main(["prune", "--method", "magnitude", "--load", str(root / "mcore"), "--save",
                 str(root / "pruned"), "--no-progress"]) == 0
    with cpu_shims():
        distributed.init_distributed(device="cpu")
        try:
            model, cfg, _, _, config_dir, _ = load_for_export(root / "pruned" / "pruned")
            sparse_layers(model)[0][1].mask_indices[0, 0] = 200  # 2:4 has 6 candidates
            save_model(model, root / "tampered")
            copy_model_files(config_dir, root / "tampered")
        finally:
            distributed.shutdown()
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not a checkpoint")
    (root / "foreign" / "weights.bin").write_bytes(b"\0" * 64)
    return root


def _user_error(capsys, argv, out=None, says=(), code=2):
    """Run ``maskllm ARGV``: exit code 2, one stderr line ``error: maskllm CMD: ...`` saying
    each of ``says``, and ``out`` (a directory the command would write) not written."""
    before = _snapshot(out)
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    command = " ".join(w for w in argv if not w.startswith("-"))
    assert len(lines) == 1, err
    assert lines[0].startswith("error: maskllm ") and command.startswith(
        lines[0][len("error: maskllm "):].split(":")[0]), err
    for text in says:
        assert text in lines[0], lines[0]
    if out is not None:
        assert _snapshot(out) == before, f"{out} was written"
        assert not out.with_name(out.name + ".partial").exists()
    return lines[0]


def _snapshot(out):
    """The files under ``out`` and their bytes (None: no such directory)."""
    if out is None or not out.exists():
        return None
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def _train(corpus, save, *extra):
    return ["train", "--model-config", str(corpus / "model"), "--data-path",
            str(corpus / "data" / "docs"), "--micro-batch-size", "2", "--global-batch-size",
            "2", "--seq-length", "32", "--train-iters", "2", "--save", str(save),
            "--no-progress", *extra]


# ----------------------------------------------------------------------------- bad paths


def test_a_missing_path_is_named(made, corpus, tmp_path, capsys):
    out, gone = tmp_path / "out", str(tmp_path / "missing")
    cases = [
        _train(corpus, out, "--load", gone),
        _train(corpus, out, "--data-path", gone),
        ["train", "--model-config", gone, "--data-path", str(corpus / "data" / "docs"),
         "--save", str(out)],
        ["prune", "--method", "magnitude", "--load", gone, "--save", str(out)],
        ["prune", "--method", "wanda", "--load", str(made / "mcore"), "--data-path", gone,
         "--save", str(out)],
        ["eval-ppl", "--load", gone, "--text", str(corpus / "text.txt")],
        ["eval-ppl", "--load", str(made / "mcore"), "--text", gone],
        ["convert", "hf-to-mcore", "--hf", gone, "--out", str(out)],
        ["convert", "mcore-to-hf", "--mcore", gone, "--out", str(out)],
        ["trim", gone, "--out", str(out)],
        ["export", "trtllm", "--load", gone, "--out", str(out)],
        ["export", "hf", "--load", gone, "--out", str(out)],
        ["validate", "trtllm", gone],
    ]
    for argv in cases:
        _user_error(capsys, argv, out, says=[gone])


# ----------------------------------------------------------------------------- foreign checkpoints


def test_a_foreign_checkpoint_is_refused(made, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    text = str(corpus / "text.txt")
    for load in (made / "hf", made / "foreign"):
        _user_error(capsys, ["trim", str(load), "--out", str(out)], out,
                    says=["not a maskllm checkpoint"])
        for target in ("trtllm", "hf"):
            _user_error(capsys, ["export", target, "--load", str(load), "--out", str(out)],
                        out, says=["not a maskllm checkpoint"])
        _user_error(capsys, ["eval-ppl", "--load", str(load), "--text", text], says=[str(load)])
        _user_error(capsys, ["prune", "--method", "magnitude", "--load", str(load), "--save",
                             str(out)], out, says=[str(load)])
        _user_error(capsys, _train(corpus, out, "--load", str(load)), out, says=[str(load)])
    # an input directory is never the output
    _user_error(capsys, ["convert", "hf-to-mcore", "--hf", str(made / "hf"), "--out",
                         str(made / "hf"), "--no-progress"], says=["choose another --out"])


def test_a_checkpoint_of_another_model_is_a_user_error(made, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    _user_error(capsys, _train(corpus, out, "--load", str(made / "mcore")), out)


def test_a_truncated_checkpoint_is_a_user_error(made, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(made / "pruned" / "pruned", broken)
    for shard in broken.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out"
    _user_error(capsys, ["export", "trtllm", "--load", str(broken), "--out", str(out),
                         "--no-progress"], out, says=[str(broken)])


# ----------------------------------------------------------------------------- layouts


def test_a_layout_that_does_not_divide_the_model_or_the_world(made, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    hf = str(made / "hf")
    _user_error(capsys, ["convert", "hf-to-mcore", "--hf", hf, "--out", str(out), "--tp", "3"],
                out, says=["--tp 3 must divide"])
    _user_error(capsys, ["convert", "hf-to-mcore", "--hf", hf, "--out", str(out), "--pp", "3"],
                out, says=["--pp 3 must divide"])
    _user_error(capsys, ["export", "trtllm", "--load", str(made / "pruned" / "pruned"), "--out",
                         str(out), "--tp", "3", "--no-progress"], out, says=["TP=3 x PP=1"])
    world = ["must divide the world size (1)", "torchrun"]
    _user_error(capsys, ["eval-ppl", "--load", str(made / "mcore"), "--text",
                         str(corpus / "text.txt"), "--tensor-model-parallel-size", "2"],
                says=world)
    _user_error(capsys, _train(corpus, out, "--pipeline-model-parallel-size", "2"), out,
                says=world)


def test_heads_that_tp_does_not_divide_stop_every_torchrun_rank(corpus, tmp_path):
    """Two ranks at TP=2 on a model with 3 heads: each rank says it in one line and exits 2."""
    from maskllm_megatron.model.config import ModelConfig

    cfg = ModelConfig.load(corpus / "model")
    cfg.transformer.num_attention_heads, cfg.transformer.kv_channels = 3, 16
    cfg.transformer.num_query_groups, cfg.transformer.hidden_size = 3, 48
    cfg.save(tmp_path / "model")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         *CLI[1:], *_train(corpus, out, "--tensor-model-parallel-size", "2", "--model-config",
                           str(tmp_path / "model"))],
        env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: maskllm")]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert "tensor-parallel size 2 does not divide the 3 attention heads" in errors[0]
    assert "exitcode  : 2" in proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- N:M shapes


def test_shapes_not_divisible_by_m(made, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    says = ["M=6", "choose an M that divides them"]
    _user_error(capsys, _train(corpus, out, "--N", "2", "--M", "6"), out, says=says)
    _user_error(capsys, ["prune", "--method", "magnitude", "--load", str(made / "mcore"),
                         "--save", str(out), "--N", "2", "--M", "6", "--no-progress"], out,
                says=says)
    _user_error(capsys, _train(corpus, out, "--N", "4", "--M", "4"), out,
                says=["choose --N below --M"])
    cfg = json.loads((corpus / "model" / "model_config.json").read_text())
    cfg["transformer"]["ffn_hidden_size"] = 130
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_config.json").write_text(json.dumps(cfg))
    _user_error(capsys, _train(corpus, out, "--model-config", str(tmp_path / "odd")), out,
                says=["linear_fc2 has 130 input columns"])


# ----------------------------------------------------------------------------- architectures


def test_an_unknown_architecture(made, tmp_path, capsys):
    bert = tmp_path / "bert"
    shutil.copytree(made / "hf", bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps(dict(config, architectures=["BertModel"])))
    out = tmp_path / "out"
    _user_error(capsys, ["convert", "hf-to-mcore", "--hf", str(bert), "--out", str(out)], out,
                says=["BertModel", "supported: LlamaForCausalLM"])


# ----------------------------------------------------------------------------- export


def test_weights_that_are_not_n_m_are_not_exported(made, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")  # a failed export leaves it as it was
    for target in ("trtllm", "hf"):
        _user_error(capsys, ["export", target, "--load", str(made / "mcore"), "--out",
                             str(out), "--no-progress"], out, says=["holds no masks"])
        _user_error(capsys, ["export", target, "--load", str(made / "tampered"), "--out",
                             str(out), "--no-progress"], out, says=["corrupted"])
    _user_error(capsys, ["trim", str(made / "mcore"), "--out", str(out)], out,
                says=["holds no masks"])
    assert (out / "keep.txt").read_text() == "an earlier export"


# ----------------------------------------------------------------------------- data


def test_bad_text_leaves_no_dataset_behind(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat sat"}\n{"body": "no text key"}\n')
    prefix = tmp_path / "data" / "set"
    tokenizer = str(corpus / "spm.model")
    _user_error(capsys, ["preprocess", str(bad), "--tokenizer", tokenizer, "--output-prefix",
                         str(prefix), "--no-progress"], says=["bad.jsonl:2", "--json-key"])
    _user_error(capsys, ["preprocess", str(tmp_path / "missing.txt"), "--tokenizer", tokenizer,
                         "--output-prefix", str(prefix)], says=["missing.txt"])
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- training


def test_a_nan_loss_stops_the_run_and_leaves_no_run_directory(corpus, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv(FAULT_INJECTION, "nan-loss:1")
    out = tmp_path / "run"
    _user_error(capsys, _train(corpus, out), out,
                says=["iteration 0: non-finite loss", "--skip-nonfinite-steps=0", "lower --lr"])


# ----------------------------------------------------------------------------- bugs and --debug


def test_a_bug_is_a_traceback_and_exit_code_1(made, tmp_path, capsys, monkeypatch):
    from maskllm_megatron.deploy import export

    def broken(*args, **kwargs):
        raise KeyError("decoder.layers.0.mlp.linear_fc1.weight")

    monkeypatch.setattr(export, "validate_trtllm", broken)  # after every rank file is written
    out = tmp_path / "out"
    assert main(["export", "trtllm", "--load", str(made / "pruned" / "pruned"), "--out",
                 str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "is a bug, please report it" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_debug_shows_the_traceback_of_a_user_error(made, tmp_path, capsys):
    out = tmp_path / "out"
    for argv in (["--debug", "trim", str(made / "mcore"), "--out", str(out)],
                 ["trim", str(made / "mcore"), "--out", str(out), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("Traceback") and any("ExportError" in x for x in err)
        assert err[-1].startswith("error: maskllm trim: ") and "holds no masks" in err[-1]
        assert not out.exists()


def test_the_os_sees_exit_code_2_and_one_line(tmp_path):
    proc = subprocess.run([*CLI, "trim", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "out")], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: maskllm trim: {tmp_path / 'missing'}: no such "
                                   "checkpoint (check the path)")
    assert not (tmp_path / "out").exists()
