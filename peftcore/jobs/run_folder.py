"""A run folder (`peftcore train --output-dir DIR`): what may start in it, and what a resume continues.

A new run needs an empty (or absent) folder: a finished run's adapter and the files a user put
beside it are never replaced without being asked. `--overwrite` deletes the previous run's own files
(RUN_FOLDERS, RUN_FILES; other files stay) and starts afresh; `--resume` continues the checkpoint
there. A resumed run trains the model its checkpoint holds, so it reads the run's own recipe
(recipe.json) when none is given, and refuses a given one that differs from it in anything but the
step budget: another rank, target list or learning rate would otherwise fail on a tensor shape after
minutes of loading, or, worse, train on silently.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

from peftcore._json import read_json_object
from peftcore.jobs.recipe import (
    SECTIONS,
    Recipe,
    TaskSection,
    load_recipe,
    parse_recipe,
)
from peftcore.jobs.recipe_methods import ADAPTER_DEFAULTS, INTERNAL_ADAPTER_FIELDS, METHODS
from peftcore.training import distributed
from peftcore.training.state import resumable_state

RECIPE_FILE = "recipe.json"
RUN_FOLDERS = ("checkpoint", "best", "adapter")  # each also as <name>.tmp / <name>.old mid-replace
RUN_FILES = ("recipe.json", "summary.json", "metrics.jsonl", "metrics.jsonl.tmp", "data_report.json", "curve.png",
             "adapter_norms.png", "report.md", "report.json")
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs"}  # a longer (or shorter) run of the same job


class RunFolderError(ValueError):
    """The run folder cannot take this run: it is occupied, or resumed with another recipe."""


# -- where a run may start ------------------------------------------------------------------------------
def prepare(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an occupied folder unless resuming (then check the checkpoint is whole) or overwriting.

    Every rank checks the same folder; rank 0 alone deletes, and the others wait for it."""
    if resume:
        resumable_state(output_dir)
        return
    held = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (f", ... ({len(held) - 4} more)" if len(held) > 4 else "")
        raise RunFolderError(f"{output_dir} is not empty ({shown}): pass --resume to continue the run there, "
                             "--overwrite to replace it, or choose another --output-dir")
    if held and distributed.is_main():
        clear_run(output_dir)
    distributed.barrier()


def clear_run(output_dir: Path) -> None:
    """Delete what a run writes (its half-replaced copies too); anything else in the folder stays."""
    names = [name + suffix for name in RUN_FOLDERS for suffix in ("", ".tmp", ".old")] + list(RUN_FILES)
    for path in (output_dir / name for name in names):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# -- the recipe of a resumed run ------------------------------------------------------------------------
def recipe_for(config: Path | None, resume_dir: Path | None, overrides: list[str]) -> Recipe:
    """The recipe file given; else, resuming, the run's own (resume_dir/recipe.json); else the default."""
    if config is not None or resume_dir is None:
        return load_recipe(config, overrides)
    path = resume_dir / RECIPE_FILE
    if not path.is_file():
        raise RunFolderError(f"--resume: {path} does not exist, so the run's recipe is unknown: pass the recipe "
                             "file it was trained with")
    return parse_recipe(recipe_tables(read_saved(path)), str(path), path.parent, overrides)


def read_saved(path: Path) -> dict:
    return read_json_object(path, RunFolderError)


def recipe_tables(saved: dict) -> dict:
    """recipe.json (Recipe.to_dict, every field) as a recipe file's tables: without the values equal
    to their defaults, some of which a recipe may not spell out (a multi-task [data] has no train)."""
    tables = {name: as_written(cls, saved.get(name, {})) for name, cls in SECTIONS.items() if name != "adapter"}
    tables["adapter"] = saved.get("adapter", {})  # already only what the recipe set
    if saved.get("tasks"):
        tables["tasks"] = {name: as_written(TaskSection, task) for name, task in saved["tasks"].items()}
    return tables


def as_written(cls, table: dict) -> dict:
    named, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    out = {}
    for key, value in table.items():
        f = named.get(key)
        if f is not None and dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = as_written(hints[key], value)
            if not value:
                continue
        elif f is not None and as_json(value) == as_json(default_of(f)):
            continue
        out[key] = value
    return out


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def as_json(value):
    """Tuples as lists, enums as their values: how recipe.json holds them."""
    return json.loads(json.dumps(value))


# -- a resumed run trains the checkpoint's model ------------------------------------------------------------
def check_same_recipe(recipe: Recipe, output_dir: Path) -> None:
    """Refuse a recipe that differs from the run's recipe.json but for RESUMABLE_CHANGES, listing the keys.
    A run without recipe.json is left to the checkpoint's own checks (tensor names and shapes)."""
    path = output_dir / RECIPE_FILE
    if not path.is_file():
        return
    saved, given = settings(read_saved(path)), settings(recipe.to_dict())
    changed = sorted(k for k in saved.keys() | given.keys()
                     if saved.get(k) != given.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise RunFolderError(
            f"--resume: this recipe differs from the one {output_dir} was trained with ({path}) in "
            f"{', '.join(changed)}; resume with that recipe (leave CONFIG out: --resume then reads {path.name}; "
            "only train.max_steps may change), or start a new run in another --output-dir")


def settings(recipe: dict) -> dict[str, object]:
    """{"section.key": value} of a Recipe.to_dict(), JSON-normalized; the adapter's defaults filled in,
    so `r = 8` written out equals r left out."""
    tables = {name: table for name, table in recipe.items() if name != "labels"}  # read from the labels file
    tables["adapter"] = adapter_settings(tables.get("adapter", {}))
    return flatten(as_json(tables))


def adapter_settings(table: dict) -> dict:
    method = table.get("method", "lora")
    if method not in METHODS:  # only a hand-edited recipe.json: compared as written
        return table
    defaults = {f.name: default_of(f) for f in dataclasses.fields(METHODS[method])
                if f.name not in INTERNAL_ADAPTER_FIELDS}
    return {**defaults, **ADAPTER_DEFAULTS[method], **table, "method": method}


def flatten(table: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out
