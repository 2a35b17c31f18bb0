"""Reading megatron-core distributed checkpoints without running code from them.

torch's reader unpickles ``.metadata`` with plain :mod:`pickle` and byte items (megatron's
``ShardedObject``s) with ``torch.load(weights_only=False)``: a checkpoint from someone else
could run any code the moment a command opens it. Here ``.metadata`` goes through an unpickler
that knows only the classes that file holds (:data:`METADATA_GLOBALS`), byte items and
``common.pt`` through ``torch.load(weights_only=True)``, and every byte item in a checkpoint is
read that way even when nothing asks for it, so a planted one cannot go unnoticed. A refusal,
or a file that does not parse, is a :class:`CheckpointError` naming the file.

Every load in the package goes through :func:`load_sharded` and :func:`read_tensors_metadata`.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.common import (
    COMMON_STATE_FNAME,
    TorchCommonLoadStrategy,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    TorchDistLoadShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan

from maskllm_megatron.errors import CheckpointError, UserError

METADATA_FILE = ".metadata"
CONFIG_FILE = "metadata.json"

# Everything a torch_dist ``.metadata`` refers to, found by listing the globals of the files
# our writers produce (model, optimizer moments, masks-only prior, trimmed, converted, and the
# old ones with ``_extra_state`` byte items; megatron's own writer pickles the same Metadata);
# plus every ``torch.<dtype>`` (see :meth:`MetadataUnpickler.find_class`).
METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: where it was written
})

_TRUST = ("it was not loaded; use checkpoints from a source you trust, or convert the model "
          "again from its Hugging Face weights")


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing any global outside
    :data:`METADATA_GLOBALS` (a pickle can name any callable and call it)."""

    def __init__(self, file, name: Path):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str):
        if (module, name) == ("pathlib._local", "PosixPath"):  # written by Python >= 3.13
            module = "pathlib"
        if (module, name) in METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.name}: refers to {module}.{name}, which checkpoint "
                              f"metadata never holds and which could run code; {_TRUST}")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.name}: holds a persistent reference, which checkpoint "
                              f"metadata never does; {_TRUST}")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """``path/.metadata`` through :class:`MetadataUnpickler`, checked to be DCP metadata whose
    files lie inside ``path``."""
    file = Path(path) / METADATA_FILE
    with open(file, "rb") as stream:  # a missing file is the CLI's FileNotFoundError
        try:
            metadata = MetadataUnpickler(stream, file).load()
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to decode is the file's fault
            raise CheckpointError(f"{file}: not readable as checkpoint metadata "
                                  f"({type(err).__name__}: {err}); the checkpoint is truncated "
                                  "or corrupted, write it again") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not checkpoint "
                              "metadata; the checkpoint is corrupted, write it again")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{file}: names a data file {name!r} outside the checkpoint "
                                  f"directory; {_TRUST}")
    return metadata


def read_json(path: str | Path):
    """A JSON file of a checkpoint or model directory; one that does not parse is a
    :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # JSON and Unicode errors
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or "
                              "corrupted, write it again") from None


def check_format(path: str | Path) -> Path:
    """``path`` is a megatron-core ``torch_dist`` checkpoint (its ``metadata.json`` says so)."""
    path = Path(path)
    config = path / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{path} is not a megatron-core distributed checkpoint (no "
                              f"{CONFIG_FILE})")
    described = read_json(config)
    backend = described.get("sharded_backend") if isinstance(described, dict) else None
    if backend != "torch_dist":
        raise CheckpointError(f"{config}: a {backend!r} checkpoint; only megatron-core's "
                              "torch_dist format is read (resave it with megatron-core >= 0.7)")
    return path


class SafeFileSystemReader(dcp.FileSystemReader):
    """torch's file reader with ``.metadata`` read by :func:`read_dcp_metadata`, once (as
    megatron's ``CachedMetadataFileSystemReader``), and every read failure naming its file."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.directory = Path(path)
        self._cached_metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._cached_metadata is None:
            metadata = read_dcp_metadata(self.directory)
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata

    def read_data(self, plan: LoadPlan, planner):
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                []).append(item)
        future = None
        for name, items in per_file.items():
            try:
                future = super().read_data(LoadPlan(items, plan.storage_data,
                                                    plan.planner_data), planner)
            except UserError:
                raise
            except FileNotFoundError:
                raise CheckpointError(f"{self.directory / name}: missing; the checkpoint is "
                                      "incomplete, write it again") from None
            except Exception as err:  # noqa: BLE001 - a data file that does not decode
                raise _unreadable(self.directory / name, err) from None
        return future if future is not None else super().read_data(plan, planner)


class SafeLoadPlanner(MCoreLoadPlanner):
    """megatron's planner with byte items read by ``torch.load(weights_only=True)`` and shape
    or key mismatches reported as :class:`CheckpointError`."""

    def __init__(self, directory: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.directory = directory

    def _validate_global_shapes(self, metadata, sharded_tensors):
        for sh_ten in sharded_tensors:
            stored = metadata.state_dict_metadata.get(sh_ten.key)
            if stored is None:
                raise CheckpointError(f"{self.directory}: has no tensor {sh_ten.key}; it was "
                                      "written for another model")
            if tuple(stored.size) != tuple(sh_ten.global_shape):
                raise CheckpointError(f"{self.directory}: {sh_ten.key} has global shape "
                                      f"{list(stored.size)}, the model expects "
                                      f"{list(sh_ten.global_shape)}; it was written for "
                                      "another model")

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        file = self.directory / self.metadata.storage_data[read_item.storage_index].relative_path
        loaded = torch_load_safely(value, f"{file} (object {read_item.dest_index.fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def torch_load_safely(file, name, **kwargs):
    """``torch.load(file, weights_only=True)`` on the CPU; a refusal or a file that does not
    decode is a :class:`CheckpointError` naming ``name`` (the file, or where in it)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - UnpicklingError, EOFError, a bad zip, ...
        raise _unreadable(name, err) from None


def _unreadable(name, err: Exception) -> CheckpointError:
    """What to say about ``name`` that torch could not load: a global torch's weights-only
    unpickler refused (code), or a file that does not decode."""
    text, detail = str(err), _first_line(err)
    if "WeightsUnpickler error:" in text:  # torch's unpickler: say what it stopped at
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split(". Please")[0]
        detail = (detail.splitlines() or [""])[0]
        if "global" in detail.lower():  # a class or function to call: code, refused
            return CheckpointError(f"{name}: holds a pickle that torch.load(weights_only=True) "
                                   f"refuses ({detail}); it could run code, so {_TRUST}")
    return CheckpointError(f"{name}: not readable ({type(err).__name__}: {detail}); the file "
                           "is truncated or corrupted, write it again")


class SafeTorchDistLoad(TorchDistLoadShardedStrategy):
    """megatron's ``torch_dist`` load through :class:`SafeFileSystemReader` and
    :class:`SafeLoadPlanner`; the counterpart of ``InProcessTorchDistSave``. Besides what is
    requested, it reads every byte item in the checkpoint (old checkpoints hold megatron's
    ``_extra_state`` objects, which nothing requests) and drops them."""

    def load(self, sharded_state_dict, checkpoint_dir: Path):
        directory = Path(checkpoint_dir)
        reader = SafeFileSystemReader(directory)
        metadata = reader.read_metadata()  # refused here, before torch's collective steps
        tensors = [item for item in leaves(sharded_state_dict) if isinstance(item, ShardedTensor)]
        flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, True)
        unrequested = [key for key, md in metadata.state_dict_metadata.items()
                       if isinstance(md, BytesStorageMetadata) and key not in pyt_state_dict]
        for key in unrequested:
            pyt_state_dict[key] = io.BytesIO()
        planner = SafeLoadPlanner(
            directory,
            shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
            allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors
                                                  if t.allow_shape_mismatch})
        try:
            dcp.load_state_dict(pyt_state_dict, reader, planner=planner)
        except CheckpointException as err:  # torch's wrapper (a BaseException) of every rank's
            raise _first_user_error(err, directory) from None
        self.cached_global_metadata = metadata
        for key in unrequested:
            del pyt_state_dict[key]
        state = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        state = _replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        _restore_dict_types(state, sharded_state_dict)
        return state

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Metadata = None):
        if metadata is None:
            metadata = read_dcp_metadata(checkpoint_dir)
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path):
        metadata = read_dcp_metadata(checkpoint_dir)
        out = {}
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                obj = ShardedObject.empty_from_unique_key(key)
                out[obj.unique_key] = obj
        out.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return out


def leaves(tree):
    """The leaves of a (sharded) state dict: nested dicts, lists and tuples walked through."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from leaves(value)
    else:
        yield tree


def _first_user_error(err: CheckpointException, directory: Path) -> BaseException:
    """The error a user can act on among the ranks' failures (megatron's own checkpoint
    exceptions become :class:`CheckpointError`), else torch's exception itself."""
    failures = [exc for exc, _ in err.failures.values()]
    for exc in failures:
        if isinstance(exc, UserError):
            return exc
    for exc in failures:
        if isinstance(exc, CheckpointingException):
            return CheckpointError(f"{directory}: {_first_line(exc)}")
    return err


class SafeCommonLoad(TorchCommonLoadStrategy):
    """``common.pt`` through ``torch.load(weights_only=True)``; a refusal or a file that does
    not decode is a :class:`CheckpointError` naming it."""

    def load_common(self, checkpoint_dir):
        file = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete, write it "
                                  "again")
        return torch_load_safely(file, file)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: sharded objects are read from the "
                              "torch_dist files only")


def load_sharded(sharded_state_dict, path: str | Path):
    """``dist_checkpointing.load`` of ``sharded_state_dict`` from ``path``, safely."""
    path = check_format(path)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(path),
                                       sharded_strategy=SafeTorchDistLoad(),
                                       common_strategy=SafeCommonLoad())
    except CheckpointingException as err:  # megatron's: about this checkpoint
        raise CheckpointError(f"{path}: {_first_line(err)}") from None


def read_tensors_metadata(path: str | Path) -> dict:
    """Key -> ShardedTensor without data (global shape and dtype) of every tensor in ``path``."""
    path = check_format(path)
    return dist_checkpointing.load_tensors_metadata(str(path),
                                                    sharded_strategy=SafeTorchDistLoad())
