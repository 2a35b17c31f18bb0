"""The restricted ``.metadata`` unpickler and the readers' errors: each names its file."""

import io
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from maskllm_megatron.checkpoint.safe_load import (
    METADATA_GLOBALS,
    MetadataUnpickler,
    read_dcp_metadata,
    torch_load_safely,
)
from maskllm_megatron.errors import CheckpointError


class Calls:
    """Pickles as a call of ``fn(*args)``: what a planted pickle does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture
def checkpoint(tmp_path):
    """A DCP checkpoint of a few tensors (float32, bf16, uint8), written by torch in this
    process: its ``.metadata`` is the format's own."""
    state = {"w": torch.randn(4, 8), "b": torch.zeros(3, dtype=torch.bfloat16),
             "i": torch.arange(6, dtype=torch.uint8).reshape(2, 3)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "ckpt")), no_dist=True)
    return tmp_path / "ckpt"


def _globals(data: bytes) -> set[tuple[str, str]]:
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return found


def test_legit_metadata_loads_and_needs_only_the_listed_globals(checkpoint):
    metadata = read_dcp_metadata(checkpoint)
    assert isinstance(metadata, Metadata)
    assert sorted(metadata.state_dict_metadata) == ["b", "i", "w"]
    assert metadata.state_dict_metadata["b"].properties.dtype == torch.bfloat16
    used = _globals((checkpoint / ".metadata").read_bytes())
    dtypes = {("torch", n) for n in ("float32", "bfloat16", "uint8")}
    assert used - dtypes <= METADATA_GLOBALS and dtypes <= used


@pytest.mark.parametrize("payload,refused", [
    (Calls(Path.touch, Path("/nonexistent/marker")), "pathlib.Path.touch"),
    (Calls(os.system, "true"), f"{os.name}.system"),
    (Calls(eval, "1"), "builtins.eval"),
    (Calls(getattr, Path("/x"), "unlink"), "builtins.getattr"),  # PosixPath is allowed
    (Calls(torch.load, "x"), "torch.serialization.load"),
    (Calls(dict, [("a", 1)]), "builtins.dict"),
])
def test_every_other_global_is_refused_by_name(checkpoint, payload, refused):
    with open(checkpoint / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # torch's own file
    metadata.planner_data = payload  # the payload inside otherwise legit metadata
    file = checkpoint / ".metadata"
    file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=refused.replace(".", r"\.")) as caught:
        read_dcp_metadata(checkpoint)
    assert str(caught.value).startswith(f"{file}: refers to {refused},")


def test_unreadable_or_foreign_metadata_is_a_checkpoint_error(checkpoint):
    file = checkpoint / ".metadata"
    legit = file.read_bytes()
    file.write_bytes(legit[: len(legit) // 2])
    with pytest.raises(CheckpointError, match=f"^{file}: not readable as checkpoint metadata"):
        read_dcp_metadata(checkpoint)
    file.write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match=f"^{file}: holds a dict, not checkpoint metadata"):
        read_dcp_metadata(checkpoint)
    metadata = pickle.loads(legit)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read_dcp_metadata(checkpoint)
    assert MetadataUnpickler(io.BytesIO(legit), file).load().state_dict_metadata
    # torch's dtypes are allowed, no other attribute of torch
    assert MetadataUnpickler(io.BytesIO(b"ctorch\nbfloat16\n."), file).load() is torch.bfloat16
    with pytest.raises(CheckpointError, match=r"refers to torch\.load,"):
        MetadataUnpickler(io.BytesIO(b"ctorch\nload\n."), file).load()


def test_torch_load_safely_names_the_file_and_what_it_refused(tmp_path):
    file = tmp_path / "weights.pt"
    marker = tmp_path / "marker"
    torch.save({"w": Calls(Path.touch, marker)}, file)
    with pytest.raises(CheckpointError, match=f"^{file}: holds a pickle .* refuses .*getattr"):
        torch_load_safely(file, file)
    assert not marker.exists()
    file.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=f"^{file}: not readable"):
        torch_load_safely(file, file)
    torch.save({"w": torch.ones(2)}, file)
    assert torch.equal(torch_load_safely(file, file)["w"], torch.ones(2))


def test_json_files_of_a_checkpoint_name_themselves(tmp_path):
    from maskllm_megatron.checkpoint.model import read_sidecar
    from maskllm_megatron.checkpoint.run_dir import latest_checkpoint, read_train_state
    from maskllm_megatron.model.config import ModelConfig

    (tmp_path / "maskllm.json").write_text('{"pattern": "2:4"')
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'maskllm.json'}: not valid JSON"):
        read_sidecar(tmp_path)
    (tmp_path / "model_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="model_config.json: not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "model_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="model_config.json: holds a JSON list"):
        ModelConfig.load(tmp_path)
    iteration = tmp_path / "iter_0000001"
    iteration.mkdir()
    (iteration / "train_state.json").write_text(json.dumps({"iteration": 1}))
    with pytest.raises(CheckpointError, match="train_state.json: not a training run's state"):
        read_train_state(iteration)
    (tmp_path / "latest").write_text("../../etc")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'latest'}: does not name"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("iter_0000002")
    with pytest.raises(CheckpointError, match="iter_0000002, which is incomplete or missing"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("iter_0000001")
    assert latest_checkpoint(tmp_path) == iteration


def test_hf_and_export_files_name_themselves(tmp_path):
    from safetensors.torch import save_file

    from maskllm_megatron.deploy.export import MASKS_FILE, load_packed_masks
    from maskllm_megatron.deploy.validate import read_rank_files
    from maskllm_megatron.interop.hf import HFReader

    save_file({"a": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    good = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[:-4])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        HFReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    with pytest.raises(CheckpointError, match="index.json: not a safetensors index"):
        HFReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors").unlink()
    torch.save([torch.zeros(1)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a state dict of tensors"):
        HFReader(tmp_path)

    save_file({"w": torch.zeros(3, dtype=torch.uint8)}, str(tmp_path / MASKS_FILE),
              metadata={"pattern": "2:4"})  # no layout
    with pytest.raises(CheckpointError, match=f"{MASKS_FILE}: not a packed mask file"):
        load_packed_masks(tmp_path)

    header = b'["not", "an object"]'
    (tmp_path / "rank0.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    header = b'{"w": {"dtype": "F32", "shape": [2]}}'
    (tmp_path / "rank1.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (tmp_path / "rank2.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc")
    _, bad = read_rank_files(tmp_path, 3)
    assert bad[0].startswith("rank0.safetensors: the header is a JSON list")
    assert bad[1].startswith("rank1.safetensors: header entry w lacks")
    assert bad[2].startswith("rank2.safetensors: the header is not JSON")
