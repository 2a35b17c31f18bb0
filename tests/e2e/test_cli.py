import os
import subprocess
import sys

from maskllm_megatron import __version__
from maskllm_megatron.cli import main


def test_console_script_reports_version_and_backends():
    out = subprocess.run([sys.executable, "-m", "maskllm_megatron.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
    out = subprocess.run([sys.executable, "-m", "maskllm_megatron.cli", "info"],
                         capture_output=True, text=True, check=True)
    assert "megatron-core" in out.stdout and "sampler: cpu (C++)  yes" in out.stdout
    lacking = [line for line in out.stdout.splitlines()
               if line.startswith(("transformer engine ", "apex ")) and "  no:" in line]
    # megatron's fallback warning, silenced everywhere, is said here, once
    assert out.stdout.count("megatron falls back to torch implementations") == (1 if lacking
                                                                                else 0)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_recipe_key_is_an_error_naming_it_and_the_closest_flag(tmp_path, capsys):
    recipe = _recipe(tmp_path, "load: ckpt\nmicro_batch_sise: 2\n")
    for command in (["train"], ["prune", "--method", "wanda", "--save", "out"],
                    ["eval-ppl", "--text", "t.txt"]):
        assert main([*command, "--config", recipe]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: maskllm {command[0]}: ") and err.count("\n") == 1
        assert "'micro_batch_sise'" in err and "--micro-batch-size" in err


def test_plan_reads_its_recipe_through_the_same_loader(tmp_path, capsys):
    recipe = _recipe(tmp_path, "model_config: m.json\ntensor_parallel: 2\n")
    assert main(["plan", recipe]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: maskllm plan: ") and "'tensor_parallel'" in err


def test_a_key_of_another_command_is_skipped(tmp_path):
    from maskllm_megatron.cli import parse_args

    recipe = _recipe(tmp_path, "load: ckpt\ntrain_iters: 7\nsave: runs/x\ncalib_samples: 3\n")
    args = parse_args(["prune", "--method", "wanda", "--save", "out", "--config", recipe])
    assert args.load == "ckpt" and args.calib_samples == 3 and args.save == "out"
    assert not hasattr(args, "train_iters")
    args = parse_args(["train", "--config", recipe])
    assert args.train_iters == 7 and args.save == "runs/x" and not hasattr(args, "calib_samples")


def test_an_explicit_flag_wins_even_when_it_equals_the_default(tmp_path):
    from maskllm_megatron.cli import build_parser, parse_args

    recipe = _recipe(tmp_path, "load: ckpt\nmicro-batch-size: 4\nseed: 7\nprogress: false\n")
    default = build_parser().parse_args(["train"]).micro_batch_size
    for command in (["train"], ["eval-ppl", "--text", "t.txt"]):
        args = parse_args([*command, "--config", recipe,
                           "--micro-batch-size", str(default), "--progress"])
        assert (args.micro_batch_size, args.progress, args.seed) == (default, True, 7)
        args = parse_args([*command, "--config", recipe])
        assert (args.micro_batch_size, args.progress) == (4, False)


def test_recipe_paths_are_expanded_and_values_typed(tmp_path):
    from pathlib import Path

    from maskllm_megatron.cli import parse_args

    recipe = _recipe(tmp_path, "load: ~/ckpt\ndata_path: [~/data/a, 2]\nlr: 5e-4\n")
    args = parse_args(["train", "--config", recipe])
    home = Path("~").expanduser()
    assert args.load == str(home / "ckpt")
    assert args.data_path == [str(home / "data" / "a"), "2"]
    assert args.lr == 5e-4  # YAML reads 5e-4 as a string; the flag's type makes it a number


def _options():
    import argparse

    from maskllm_megatron.cli import build_parser
    from maskllm_megatron.cli.options import HelpFormatter

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, f"{path} {name}")
            elif action.dest not in ("help", "version"):
                yield path, action, HelpFormatter("maskllm")._get_help_string(action)

    return list(walk(build_parser(), "maskllm"))


def test_every_flag_of_every_subcommand_has_help_stating_its_default():
    options = _options()
    assert len(options) > 100  # the trainer's flags are among them
    for path, action, text in options:
        name = f"{path} {'/'.join(action.option_strings) or action.dest}"
        assert (action.help or "").strip(), f"{name} has no help"
        if action.option_strings and not action.required:
            assert "default" in text, f"{name} does not state its default"


def test_help_and_version_print_no_third_party_warnings():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    for args in (["train", "--help"], ["--version"]):
        out = subprocess.run([sys.executable, "-m", "maskllm_megatron.cli", *args],
                             capture_output=True, text=True, check=True, env=env)
        assert out.stderr == "" and "warn" not in out.stdout.lower(), args
    assert "--micro-batch-size" in subprocess.run(
        [sys.executable, "-m", "maskllm_megatron.cli", "train", "--help"],
        capture_output=True, text=True, env=env).stdout
    # the reason it is quiet (and fast): building the parser loads neither megatron nor torch
    script = ("import sys; from maskllm_megatron.cli import build_parser; build_parser(); "
              "print(sorted({'megatron', 'torch'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_only_megatron_fallback_warnings_are_silenced():
    script = ("import warnings; from maskllm_megatron.cli.errors import "
              "silence_fallback_warnings; silence_fallback_warnings(); "
              "warnings.warn('Apex is not installed. Falling back to Torch Norm'); "
              "warnings.warn('Transformer Engine and Apex are not installed. Falling back to "
              "Torch optimizers.'); warnings.warn('something else')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, check=True).stderr
    assert "something else" in err and "not installed" not in err
