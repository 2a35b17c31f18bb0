"""Opening a checkpoint runs no code from it: a pickle planted in any file a command reads
(``.metadata``, a byte item in a ``.distcp`` file, ``common.pt``, the optimizer's
``.metadata``, an HF ``pytorch_model.bin``) is refused with one ``error:`` line naming the file
and exit code 2, and the pickle's payload (creating a marker file) never runs.

Each planter re-seals the checkpoint's ``checksums.json``, as whoever planted the pickle would:
the checksums catch damage, these checks catch intent.

The commands run in this process through ``maskllm_megatron.cli.main`` (each starts and shuts
down its own process group, as in a subprocess); one subprocess checks the real command."""

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from maskllm_megatron.checkpoint.integrity import seal


class Planted:
    """Unpickling this creates ``marker``: any reader that runs a pickle's code shows."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def plant_metadata(checkpoint: Path, marker: Path) -> Path:
    """The checkpoint's own ``.metadata`` with the payload inside (as its planner data)."""
    file = checkpoint / ".metadata"
    with open(file, "rb") as f:
        metadata = pickle.load(f)  # our own freshly written file
    metadata.planner_data = Planted(marker)
    file.write_bytes(pickle.dumps(metadata))
    seal(checkpoint)
    return file


def plant_byte_item(checkpoint: Path, marker: Path, key: str = "decoder._extra_state/shard_0_1"):
    """A byte item (as megatron's ShardedObjects are stored) appended to a ``.distcp`` file and
    listed in ``.metadata``: torch's reader would ``torch.load`` it with weights_only=False."""
    distcp = sorted(checkpoint.glob("*.distcp"))[0]
    payload = io.BytesIO()
    torch.save([Planted(marker)], payload)
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(payload.getvalue())
    file = checkpoint / ".metadata"
    with open(file, "rb") as f:
        metadata = pickle.load(f)
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo(distcp.name, offset,
                                                             len(payload.getvalue()))
    file.write_bytes(pickle.dumps(metadata))
    seal(checkpoint)
    return distcp


def plant_common(checkpoint: Path, marker: Path) -> Path:
    file = checkpoint / "common.pt"
    torch.save({"payload": Planted(marker)}, file)
    seal(checkpoint)
    return file


PLANTS = {"metadata": plant_metadata, "byte-item": plant_byte_item, "common": plant_common}


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """A converted tiny LLaMA (``mcore``), its magnitude pruning (``pruned/pruned``, and the
    masks-only prior ``pruned/masks``) and a one-iteration run from it (``run``), all written
    by this package's writers."""
    from test_convert import hf_model

    from maskllm_megatron.cli import main

    root = tmp_path_factory.mktemp("safe")
    hf_model("llama").save_pretrained(root / "hf")
    steps = [["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out", str(root / "mcore"),
              "--no-progress"],
             ["prune", "--load", str(root / "mcore"), "--save", str(root / "pruned"),
              "--method", "magnitude", "--no-progress"],
             train_args(corpus, "--load", str(root / "pruned" / "pruned"),
                        "--save", str(root / "run"))]
    for argv in steps:
        assert main(argv) == 0, argv
    return root


def train_args(corpus, *extra):
    return ["train", "--data-path", str(corpus / "data" / "docs"), "--split", "90,10,0",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "32",
            "--train-iters", "1", "--no-progress", "--tokenizer", str(corpus / "spm.model"),
            *extra]


# command -> (the checkpoint it opens: a directory under `built`, where in it the file is
# planted, its command line given the copy and a scratch directory)
COMMANDS = {
    "train --load": ("pruned/pruned", ".", lambda c, ck, out: train_args(c, "--load", ck)),
    "train --prior": ("pruned/masks", ".", lambda c, ck, out: train_args(
        c, "--load", str(Path(ck).parent.parent / "mcore"), "--prior", ck)),
    "train resume": ("run", "iter_0000001/model", lambda c, ck, out: train_args(
        c, "--load", str(Path(ck).parent / "pruned" / "pruned"), "--save", ck,
        "--train-iters", "2")),
    "trim": ("run", "iter_0000001/model", lambda c, ck, out: ["trim", ck, "--out", out]),
    "export hf": ("pruned/pruned", ".", lambda c, ck, out: [
        "export", "hf", "--load", ck, "--out", out, "--no-progress"]),
    "export trtllm": ("pruned/pruned", ".", lambda c, ck, out: [
        "export", "trtllm", "--load", ck, "--out", out, "--no-progress"]),
    "eval-ppl": ("pruned/pruned", ".", lambda c, ck, out: [
        "eval-ppl", "--load", ck, "--text", str(c / "text.txt"), "--seq-length", "32",
        "--tokenizer", str(c / "spm.model"), "--no-progress"]),  # the text is read first
    "prune --load": ("pruned/pruned", ".", lambda c, ck, out: [
        "prune", "--load", ck, "--save", out, "--method", "magnitude", "--no-progress"]),
    "convert mcore-to-hf": ("pruned/pruned", ".", lambda c, ck, out: [
        "convert", "mcore-to-hf", "--mcore", ck, "--out", out, "--no-progress"]),
}
CASES = [(command, kind) for command in COMMANDS for kind in PLANTS]
# resume also reads the optimizer's moments (a checkpoint of their own)
RESUME_OPTIMIZER = [("train resume", kind) for kind in PLANTS]


def _copy(built, tmp_path, source):
    """A copy of ``built/source`` with what sits beside it (model_config.json, the HF files)."""
    where = tmp_path / "copy"
    shutil.copytree(built, where, ignore=shutil.ignore_patterns("hf"))
    return where / source


def _refused(capsys, argv, file, marker):
    from maskllm_megatron.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit code {code}:\n" + "\n".join(err[-20:])
    assert err[-1].startswith("error: maskllm ") and str(file) in err[-1], err[-1]
    assert not marker.exists(), f"{marker} was created: the planted pickle ran"


@pytest.mark.parametrize("command,kind", CASES + [("train resume optimizer", k) for k in PLANTS],
                         ids=[f"{c}-{k}" for c, k in CASES]
                         + [f"train resume optimizer-{k}" for k in PLANTS])
def test_a_planted_pickle_is_refused_and_never_runs(built, corpus, tmp_path, capsys,
                                                   command, kind):
    source, inside, argv = COMMANDS[command.replace(" optimizer", "")]
    if command.endswith("optimizer"):
        inside = "iter_0000001/optimizer"
    checkpoint = _copy(built, tmp_path, source)
    marker = tmp_path / "marker"
    file = PLANTS[kind](checkpoint / inside, marker)
    _refused(capsys, argv(corpus, str(checkpoint), str(tmp_path / "out")), file, marker)


def test_a_planted_pytorch_model_bin_is_refused(built, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(built / "hf", hf)
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({"model.embed_tokens.weight": Planted(marker)}, hf / "pytorch_model.bin")
    _refused(capsys, ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o"),
                      "--no-progress"], hf / "pytorch_model.bin", marker)


def test_a_tensor_replaced_by_a_pickle_is_refused(built, tmp_path, capsys):
    """A tensor's bytes in a ``.distcp`` file swapped for a pickle: torch reads tensors with
    weights_only=True, and the refusal names the file."""
    checkpoint = _copy(built, tmp_path, "pruned/pruned")
    marker = tmp_path / "marker"
    distcp = sorted(checkpoint.glob("*.distcp"))[0]
    payload = io.BytesIO()
    torch.save(Planted(marker), payload)
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(payload.getvalue())
    with open(checkpoint / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    index = next(i for i in metadata.storage_data if i.fqn.endswith("linear_proj.weight"))
    metadata.storage_data[index] = _StorageInfo(distcp.name, offset, len(payload.getvalue()))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    seal(checkpoint)
    _refused(capsys, ["convert", "mcore-to-hf", "--mcore", str(checkpoint), "--out",
                      str(tmp_path / "out"), "--no-progress"], distcp, marker)


def test_the_command_line_refuses_in_its_own_process(built, tmp_path):
    checkpoint = _copy(built, tmp_path, "pruned/pruned")
    marker = tmp_path / "marker"
    file = plant_metadata(checkpoint, marker)
    proc = run_cli(["convert", "mcore-to-hf", "--mcore", str(checkpoint), "--out",
                    str(tmp_path / "out"), "--no-progress"], check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: maskllm convert mcore-to-hf: "), \
        proc.stderr[-3000:]
    assert str(file) in last and "pathlib.Path.touch" in last
    assert not marker.exists()


def test_the_planted_pickles_would_run_without_these_checks(built, tmp_path):
    """The payloads are live: torch's and megatron's own readers run them."""
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint = _copy(built, tmp_path, "pruned/pruned")
    for kind, plant in PLANTS.items():
        marker = tmp_path / f"marker-{kind}"
        plant(checkpoint, marker)
        if kind == "metadata":
            FileSystemReader(str(checkpoint)).read_metadata()  # megatron's reader: pickle.load
        elif kind == "byte-item":
            metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
            info = metadata.storage_data[MetadataIndex("decoder._extra_state/shard_0_1")]
            raw = (checkpoint / info.relative_path).read_bytes()
            torch.load(io.BytesIO(raw[info.offset:info.offset + info.length]),
                       weights_only=False)  # what torch's DefaultLoadPlanner.load_bytes does
        else:
            torch.load(checkpoint / "common.pt", weights_only=False)
        assert marker.exists(), kind
        marker.unlink()


def test_fresh_checkpoints_hold_no_byte_items(built, tmp_path):
    """Every writer (conversion, pruning, masks-only, a run's model and moments, trim) leaves
    megatron's ``_extra_state`` objects out: the metadata lists tensors only."""
    from maskllm_megatron.checkpoint.safe_load import read_dcp_metadata
    from maskllm_megatron.cli import main

    assert main(["trim", str(built / "run"), "--out", str(tmp_path / "trimmed")]) == 0
    written = [built / "mcore", built / "pruned" / "pruned", built / "pruned" / "masks",
               built / "run" / "iter_0000001" / "model",
               built / "run" / "iter_0000001" / "optimizer", tmp_path / "trimmed"]
    for checkpoint in written:
        entries = read_dcp_metadata(checkpoint).state_dict_metadata
        assert entries and not [k for k, v in entries.items()
                                if isinstance(v, BytesStorageMetadata)], checkpoint


OLD_FORMAT = """
import sys, torch
from pathlib import Path
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.model import InProcessTorchDistSave, global_tensors, load_model
from maskllm_megatron.checkpoint.safe_load import read_dcp_metadata
from maskllm_megatron.cpu_shims import cpu_shims
from maskllm_megatron.model.build import build_model
from maskllm_megatron.model.config import ModelConfig
source, old = sys.argv[1:]
with cpu_shims():
    distributed.init_distributed(device="cpu")
    cfg = ModelConfig.load(source)
    model = build_model(cfg, sparse_layers=(), perform_initialization=False)
    load_model(model, source, missing_masks="keep")
    # the way checkpoints were written before: the whole sharded state dict, _extra_state too
    Path(old).mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), old,
                            sharded_strategy=InProcessTorchDistSave())
    kinds = [type(v) for v in read_dcp_metadata(old).state_dict_metadata.values()]
    assert BytesStorageMetadata in kinds, kinds
    fresh = build_model(cfg, sparse_layers=(), perform_initialization=True)
    load_model(fresh, old, missing_masks="keep")
    want, got = global_tensors(model, suffixes=("",)), global_tensors(fresh, suffixes=("",))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
print("ok", len(want))
"""


def test_checkpoints_with_extra_state_byte_items_still_load(built, tmp_path):
    proc = run_cli([str(built / "mcore"), str(tmp_path / "old")], script=OLD_FORMAT)
    assert proc.stdout.strip().startswith("ok")
