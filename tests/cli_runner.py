"""Run ``maskllm`` (or a Python snippet) in a subprocess, as a user would, with one rank's
threads; a failure shows the command's own output."""

import os
import subprocess
import sys

# the package of this checkout, whatever copy is installed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
           PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
CLI = [sys.executable, "-m", "maskllm_megatron.cli"]


def run_cli(args, check=True, script=None):
    """``maskllm ARGS``, or ``python -c SCRIPT ARGS`` when ``script`` is given."""
    cmd = [sys.executable, "-c", script, *args] if script else CLI + list(args)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd[1:]))} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc
