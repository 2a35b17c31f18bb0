"""Zero-shot tasks (``maskllm eval-tasks``) through lm-evaluation-harness, at any TP x PP x DP.

lm-eval (``pip install "maskllm_megatron[eval]"``) is optional: it is imported here only when a
task runs. The paper's seven tasks are :data:`PAPER_TASKS`; their results report ``acc`` (what
the paper's tables use) and ``acc_norm``. Everything runs offline: ``HF_DATASETS_OFFLINE`` and
``HF_HUB_OFFLINE`` are set unless the user set them, so task data comes from the user's datasets
cache or from local files named by a task YAML in ``include_path``; a task whose data is not
there is a one-line error naming it. The model runs through :class:`.lm_eval_adapter.MegatronLM`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import verify_model_files
from maskllm_megatron.checkpoint.model import load_sparse_model
from maskllm_megatron.checkpoint.run_dir import model_dir
from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.errors import InputError
from maskllm_megatron.eval.perplexity import MODES
from maskllm_megatron.model.config import ModelConfig
from maskllm_megatron.paths import require_path, write_file_atomically

PAPER_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
               "race")
# where lm-eval 0.4.13 keeps them: indexing only these folders takes a second, lm-eval's whole
# task tree (thousands of YAMLs) a minute or more on a small machine
PAPER_TASK_DIRS = {"hellaswag": "hellaswag", "piqa": "piqa", "winogrande": "winogrande",
                   "arc_easy": "arc", "arc_challenge": "arc", "openbookqa": "openbookqa",
                   "race": "race"}
INSTALL = 'pip install "maskllm_megatron[eval]"'
OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
DATA_HELP = ("give its data locally: run once where the Hugging Face hub is reachable so the "
             "datasets cache holds it (HF_DATASETS_CACHE / HF_HOME), or write a task YAML "
             "whose dataset_path/dataset_kwargs name local files and pass its folder as "
             "--include-path (README, Evaluating a sparse model)")


def require_lm_eval():
    """lm_eval, imported offline; a clear error naming the extra when it is not installed."""
    unset = [name for name in OFFLINE if name not in os.environ]
    for name in unset:
        os.environ[name] = "1"
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401 - the part that runs tasks
    except ImportError as err:
        raise InputError(f"eval-tasks needs lm-evaluation-harness, which is not installed "
                         f"({err}): {INSTALL}") from err
    if unset:  # they read the variables when first imported, maybe before this call
        import datasets.config
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return lm_eval


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` or a list -> task names, in order, without repeats."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise InputError("--tasks names no task: give a comma-separated list such as "
                         f"{','.join(PAPER_TASKS)}")
    return names


def _top_level(loaded: dict) -> list:
    """The Task/Group objects one name built (a group with its tasks inside, a tag's tasks)."""
    children = {c for names in loaded["group_map"].values() for c in names}
    groups = [g for name, g in loaded["groups"].items() if name not in children]
    grouped = {t.task_name for g in loaded["groups"].values() for t in g.get_all_tasks()}
    return groups + [t for name, t in loaded["tasks"].items() if name not in grouped]


def _managers(names: list[str], include_path: str | Path | None):
    """TaskManagers to try in turn, each with whether it is the last: first one that indexes
    only ``include_path`` and the folders of the paper's tasks among ``names`` (fast), then
    lm-eval's whole task tree with ``include_path``."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    builtin = Path(lm_eval.tasks.__file__).parent
    folders = dict.fromkeys(str(builtin / PAPER_TASK_DIRS[n]) for n in names
                            if n in PAPER_TASK_DIRS and (builtin / PAPER_TASK_DIRS[n]).is_dir())
    few = [*folders, *([str(include_path)] if include_path else [])]  # later ones win
    if few:
        manager = TaskManager(include_path=few, include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            yield manager, False
    yield TaskManager(include_path=str(include_path) if include_path else None), True


def load_tasks(names: list[str], include_path: str | Path | None = None):
    """(the TaskManager, the built tasks), each name loaded on its own so a task whose data is
    missing or a name lm-eval does not know is an error naming it. In a process group rank 0
    loads first (the one writer of a datasets cache being built), then the others; its error
    is raised on every rank."""
    require_lm_eval()
    if include_path is not None:
        require_path(include_path, "task folder (--include-path)")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _load_all(names, include_path)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            loaded = _load_all(names, include_path)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    return loaded if dist.get_rank() == 0 else _load_all(names, include_path)


def _load_all(names: list[str], include_path: str | Path | None):
    for manager, last in _managers(names, include_path):
        try:
            return manager, [obj for name in names for obj in _load(manager, name)]
        except KeyError as err:  # a name (or a group's task) the fast index lacks
            if last:
                name = err.args[0] if err.args else names
                raise InputError(
                    f"task {name} is not one lm-eval knows"
                    + (f" nor one in --include-path {include_path}" if include_path else "")
                    + "; give task names as `lm-eval ls tasks` lists them, or a folder of "
                    "task YAMLs as --include-path") from err
    raise AssertionError("unreachable: the last manager returns or raises")


def _load(manager, name: str) -> list:
    """The objects ``name`` builds; its data missing offline is an InputError naming it, an
    unknown name a KeyError (naming it)."""
    import datasets

    try:
        loaded = manager.load([name])
    except KeyError as err:
        raise KeyError(repr(name)) from err
    except (ConnectionError, FileNotFoundError,
            datasets.exceptions.DatasetNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"task {name!r}: its data is not available offline ({first}); "
                         + DATA_HELP) from err
    return _top_level(loaded)


@dataclass
class TasksReport:
    """lm-eval's results for one checkpoint (its own result format) and how they were run."""

    checkpoint: Path
    masks: str  # how its masks were applied: hard (argmax of logits), fixed or dense
    tasks: list[str]
    results: dict = field(repr=False)  # simple_evaluate's dict (samples only if asked for)
    table: str = field(default="", repr=False)  # lm-eval's make_table (and groups) of it

    def metric(self, task: str, name: str = "acc") -> float:
        """``results[task]["acc,none"]`` and the like."""
        return self.results["results"][task][f"{name},none"]


def _json_ready(results: dict) -> dict:
    """The results as lm-eval writes them (numpy scalars and sets made plain)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))


def run_tasks(lm, names: list[str], *, include_path: str | Path | None = None,
              num_fewshot: int | None = 0, limit: int | float | None = None,
              seed: int = 1234, log_samples: bool = False, bootstrap_iters: int = 100000,
              loaded: tuple | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` on ``lm`` (any ``LM``, also ours in a process group: every
    rank calls this) for the named tasks; the results dict (lm-eval's format, per-item
    ``samples`` only with ``log_samples``) on every rank. ``num_fewshot=None``: each task's
    own default. ``bootstrap_iters``: lm-eval's stderr resampling (its default; acc and
    acc_norm are means, whose stderr is closed-form; 0: no stderr).
    ``loaded``: what :func:`load_tasks` returned for these names, if it already ran."""
    from lm_eval import evaluator

    manager, built = loaded or load_tasks(names, include_path)
    results = evaluator.simple_evaluate(
        model=lm, tasks=built, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
        log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        batch_size=getattr(lm, "batch_size", None), device=str(getattr(lm, "device", None)))
    box = [_json_ready(results) if results is not None else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)  # rank 0 holds them (lm-eval's DP rank 0)
    return box[0]


def format_table(results: dict) -> str:
    """lm-eval's own markdown table(s) of ``results`` (tasks, then groups when any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def evaluate_checkpoint(args) -> TasksReport:
    """``maskllm eval-tasks`` in the running process group: load a dense, pruned or
    mask-learned checkpoint at the asked TP x PP (masks applied as eval-ppl applies them) and
    run ``args.tasks`` through lm-eval; writes ``args.output`` (lm-eval's result JSON, with
    its per-document ``samples`` when ``args.log_samples``) once."""
    names = parse_tasks(args.tasks)
    if args.masks not in MODES:
        raise InputError(f"--masks must be one of {', '.join(MODES)}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InputError(f"--num-fewshot must be 0 or more, not {args.num_fewshot}")
    log_samples = getattr(args, "log_samples", False)
    if log_samples and not args.output:
        raise InputError("--log-samples puts the samples in --output: give --output FILE.json")
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be positive, not {args.limit}")
    if args.output and Path(args.output).is_dir():  # found now, not after the whole run
        raise InputError(f"--output {args.output} is a directory; give a file name "
                         "(FILE.json)")
    require_path(args.load, "checkpoint (--load)")
    if args.model_config:
        require_path(args.model_config, "model config (--model-config)")
    require_lm_eval()
    from maskllm_megatron.eval.lm_eval_adapter import MegatronLM, load_lm_tokenizer

    layout = distributed.use_layout(args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size, args.seed,
                                    what="eval-tasks")
    path = model_dir(args.load)
    verify_model_files(args.model_config or args.load)
    cfg = ModelConfig.load(args.model_config or args.load)
    max_length = args.seq_length or cfg.max_sequence_length
    if max_length > cfg.max_sequence_length:
        raise InputError(f"--seq-length {max_length} exceeds the model's max_sequence_length "
                         f"{cfg.max_sequence_length}; give at most that")
    tokenizer = load_lm_tokenizer(args.tokenizer or cfg.tokenizer)
    loaded = load_tasks(names, args.include_path)  # missing data fails before the model loads
    model, applied, pattern = load_sparse_model(
        path, cfg, NMPattern(args.N, args.M), args.masks,
        params_dtype=distributed.params_dtype(args, layout.device),
        sequence_parallel=args.sequence_parallel, transformer_impl=args.transformer_impl)
    info = {"checkpoint": str(path), "masks": applied, "pattern": str(pattern),
            "tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
            "data_parallel_size": layout.dp, "device": str(layout.device)}
    lm = MegatronLM(model, tokenizer, max_length, batch_size=args.batch_size,
                    true_vocab_size=cfg.true_vocab_size,
                    progress=args.progress and layout.rank == 0, model_info=info)
    results = run_tasks(lm, names, include_path=args.include_path,
                        num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed,
                        log_samples=log_samples, loaded=loaded)
    if args.output:
        text = json.dumps(results, indent=2, ensure_ascii=False)
        distributed.on_rank0(lambda: write_file_atomically(args.output, text))
    return TasksReport(path, applied, names, results, format_table(results))
