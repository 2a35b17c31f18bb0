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


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out
