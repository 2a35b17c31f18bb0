"""The package's layers import only downward, and no module imports another's private names
(ARCHITECTURE.md): checked on the source, so a new upward import fails here, not in review."""

import ast
from pathlib import Path

import maskllm_megatron

# lowest first; a module may import its own layer and the ones before it
LAYERS = ["errors", "paths", "cpu_shims", "distributed", "core", "sampling", "data", "model",
          "checkpoint", "training", "pruning", "eval", "interop", "deploy", "demo", "cli"]
ROOT = Path(maskllm_megatron.__file__).parent


def _imports():
    """(importing module, imported module, names, layer of each) for every package import."""
    for path in sorted(ROOT.rglob("*.py")):
        here = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        here = here.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield here, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                yield here, "<relative>", []
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield here, alias.name, []


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "maskllm_megatron" and len(parts) > 1 else None


def test_every_module_is_in_a_layer():
    modules = {_layer(".".join(p.relative_to(ROOT.parent).with_suffix("").parts))
               for p in ROOT.rglob("*.py")}
    assert modules - {None, "__init__"} <= set(LAYERS), modules - set(LAYERS)


def test_imports_only_go_down():
    upward = [f"{here} imports {other}" for here, other, _ in _imports()
              if _layer(here) in LAYERS and _layer(other) in LAYERS
              and LAYERS.index(_layer(other)) > LAYERS.index(_layer(here))]
    assert not upward, upward


def test_imports_are_absolute_and_public():
    relative = [here for here, other, _ in _imports() if other == "<relative>"]
    assert not relative, relative
    private = [f"{here} imports {other}.{name}" for here, other, names in _imports()
               for name in names if other.startswith("maskllm_megatron") and other != here
               and name.startswith("_") and not name.startswith("__")]
    assert not private, private


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a core module importing the trainer is reported."""
    package = tmp_path / "maskllm_megatron"
    (package / "core").mkdir(parents=True)
    (package / "core" / "bad.py").write_text("from maskllm_megatron.training.loop import train\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", package)
    upward = [(h, o) for h, o, _ in _imports()
              if LAYERS.index(_layer(o)) > LAYERS.index(_layer(h))]
    assert upward == [("maskllm_megatron.core.bad", "maskllm_megatron.training.loop")]
