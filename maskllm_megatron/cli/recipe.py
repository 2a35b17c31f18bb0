"""The one recipe loader: a YAML file whose keys are ``maskllm`` flag names (dashes or
underscores) fills the flags a command line did not give.

One file serves every command: a key another subcommand takes (the trainer's ``train_iters``
in a prune) is skipped, a key no subcommand takes is a typo and an error, and a flag typed on
the command line wins whatever its value, its default included.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from maskllm_megatron.errors import InputError

# Flags that are not settings: a recipe naming them is a mistake.
NOT_SETTINGS = ("help", "version", "config")


class RecipeError(InputError):
    """A recipe the command cannot use (reported as one line, exit code 2)."""


def read_recipe(path: str) -> dict[str, Any]:
    """The recipe's settings, keys spelled as argparse destinations (underscores)."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: a recipe maps flag names to values")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def settings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags of one parser a recipe may set, by destination."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in NOT_SETTINGS}


def all_settings(root: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every flag any ``maskllm`` subcommand takes, by destination."""
    found: dict[str, argparse.Action] = {}
    for parser in _parsers(root):
        found.update(settings(parser))
    return found


def command_parser(root: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    subcommands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return subcommands.choices[command]


def explicit_flags(root: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations the command line gave, whatever their value: the same arguments parsed
    again with every default suppressed leave only those."""
    bare = copy.deepcopy(root)
    for parser in _parsers(bare):
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def _suggestion(key: str, known: dict[str, argparse.Action]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {known[close[0]].option_strings[0]}?" if close else ""


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [os.path.expanduser(v) if isinstance(v, str) else v for v in value]
    return value


def _typed(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """``value`` as the command line would have given it: typed, listed, within its choices."""
    value = _expand(value)
    if value is None:
        return None
    if action.nargs == 0:  # store_true and --flag/--no-flag
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: {key} is true or false, not {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise RecipeError(f"{path}: {key} takes one value, not a list")
    if action.type is not None:
        try:
            items = [action.type(v) for v in items]
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{path}: {key}: {value!r} is not {action.type.__name__}") from err
    for item in items:
        if action.choices is not None and item not in action.choices:
            raise RecipeError(f"{path}: {key} must be one of "
                              f"{', '.join(map(str, action.choices))}, not {item!r}")
    return items if many else items[0]


def recipe_values(path: str, parser: argparse.ArgumentParser, known: dict[str, argparse.Action],
                  given: Collection[str] = ()) -> dict[str, Any]:
    """What the recipe at ``path`` sets for ``parser``'s command: ``known`` (every maskllm flag)
    tells a typo from another command's setting; flags in ``given`` are left to the command
    line."""
    own = settings(parser)
    values = {}
    for key, value in read_recipe(path).items():
        if key not in known:
            raise RecipeError(f"{path}: unknown key {key!r}: no maskllm command takes "
                              f"--{key.replace('_', '-')}{_suggestion(key, known)}")
        if key in own and key not in given:
            values[key] = _typed(own[key], key, value, path)
    return values


def apply_recipe(args: argparse.Namespace, root: argparse.ArgumentParser, path: str,
                 argv: list[str] | None) -> None:
    """Fill ``args`` (parsed by ``root`` from ``argv``) from the recipe at ``path``."""
    command = command_parser(root, args.command)
    given = explicit_flags(root, argv)
    for key, value in recipe_values(path, command, all_settings(root), given).items():
        setattr(args, key, value)
