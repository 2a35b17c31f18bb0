"""The Python API from a plain user script: no ``if __name__ == "__main__":`` guard needed."""

import subprocess
import sys

from cli_runner import ENV

# no main guard on purpose: a checkpoint writer started with multiprocessing's spawn would
# import this file again, run it a second time and overwrite its output
SCRIPT = """\
import sys
from pathlib import Path

import torch

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.model import load_model, save_model
from maskllm_megatron.cpu_shims import cpu_shims
from maskllm_megatron.model.config import ModelConfig, TransformerFields
from maskllm_megatron.model.layers import assign_layer_ids
from maskllm_megatron.model.build import build_model

out = Path(sys.argv[1])
with (out / "runs.txt").open("a") as runs:
    runs.write("ran\\n")
cfg = ModelConfig(TransformerFields(num_layers=2, hidden_size=64, num_attention_heads=4,
                                    ffn_hidden_size=128, activation="gelu", add_bias_linear=True),
                  vocab_size=384, max_sequence_length=32)
with cpu_shims():
    distributed.init_distributed(1, 1, device="cpu")
    torch.manual_seed(1)
    model = build_model(cfg)
    assign_layer_ids(model, logits_seed=7)
    save_model(model, out / "ckpt")
    torch.manual_seed(2)
    fresh = build_model(cfg)
    assign_layer_ids(fresh, logits_seed=8)
    load_model(fresh, out / "ckpt")
    saved, loaded = model.state_dict(), fresh.state_dict()
    tensors = [k for k, v in saved.items() if torch.is_tensor(v)]
    differ = [k for k in tensors if not torch.equal(saved[k], loaded[k])]
    logits = sum(k.endswith("mask_logits") for k in tensors)
    (out / "result.txt").write_text(f"{len(tensors)} {logits} {differ}")
    distributed.shutdown()
"""


def test_a_script_without_main_guard_saves_and_loads_once(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (tmp_path / "runs.txt").read_text() == "ran\n"  # the script ran exactly once
    count, logits, differ = (tmp_path / "result.txt").read_text().split(" ", 2)
    assert int(count) > 10 and int(logits) == 8 and differ == "[]"
