"""Recipes as text a person reads: the resolved recipe as TOML (`peftcore train --print-config`) and
the key reference made from the section dataclasses themselves (`peftcore recipes keys`), so neither
can drift from what the loader accepts.

A key's one line of meaning is the comment written beside its field in the dataclass source (read
with `tokenize`, never executed): the code's own documentation, not a copy of it.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import tokenize

from peftcore.jobs.recipe import SECTIONS, TaskSection


def to_toml(recipe: dict) -> str:
    """Recipe.to_dict() as TOML that load_recipe reads back as the same recipe."""
    lines: list[str] = []
    for section, table in recipe.items():
        if section == "tasks":
            for name, task in table.items():
                lines += table_lines(f"tasks.{name}", task)
        else:
            lines += table_lines(section, table)
    return "\n".join(lines).strip() + "\n"


def table_lines(name: str, table: dict) -> list[str]:
    # None (TOML has no null) and "" (a required key a multi-task recipe's [data] leaves unset) are left out
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None and v != ""}
    lines = ["", f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in scalars.items()]
    for key, value in table.items():
        if isinstance(value, dict) and value:  # nested tables: [data.template], [data.augment]
            lines += table_lines(f"{name}.{key}", value)
    return lines


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string is a JSON string


def field_comments(cls) -> dict[str, str]:
    """{field: the comment on its line, else the comment lines just above it} in the class source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, name, above = {}, None, []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and name is None:
            name = token.string  # a field's name starts its line, indented once
            if above:
                comments[name] = " ".join(above)
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("# ").strip()
            if name is not None:
                comments[name] = text
            else:
                above.append(text)
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            if name is not None:
                above = []
            name = None
    return comments


def key_reference() -> str:
    """Every recipe key: section, name, type, default and its comment, as a markdown page (docs/recipe_keys.md
    is this text: `peftcore recipes keys > docs/recipe_keys.md` regenerates it)."""
    out = ["# Recipe keys", "",
           "Every key a TOML recipe takes (`peftcore train RECIPE`, `--set section.key=value`), made from the",
           "dataclasses the loader validates against; the meaning is the comment beside each field in the code.",
           "`peftcore train --print-config` shows a recipe resolved, `peftcore recipes ls` the shipped ones.", "",
           "| key | type | default | meaning |", "|---|---|---|---|"]
    for section, cls in {**SECTIONS, "tasks.<name>": TaskSection}.items():
        out += section_rows(section, cls)
        if section == "adapter":
            out.append("| `[adapter] <field>` | | the method's | any field of the method's config, as HF PEFT "
                       "names it (LoraConfig: r, lora_alpha, target_modules, ...) |")
    return "\n".join(out) + "\n"


def section_rows(section: str, cls) -> list[str]:
    """One row a field; a field that is itself a table ([data.template], [data.augment]) gets its rows."""
    comments, rows = inherited_comments(cls), []
    for f in dataclasses.fields(cls):
        if f.name in ("extra", "options") or f.name.startswith("_"):
            continue
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            rows += section_rows(f"{section}.{f.name}", type(nested))
            continue
        cells = (f"`[{section}] {f.name}`", f"`{type_text(f.type)}`", default_text(f), comments.get(f.name, ""))
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # a bare | splits a cell
    return rows


def inherited_comments(cls) -> dict[str, str]:
    """field_comments of cls and its dataclass bases ([eval]'s decoding fields are SamplingOptions')."""
    comments = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            comments.update(field_comments(base))
    return comments


def type_text(annotation) -> str:
    return str(annotation).replace("typing.", "")


def default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("required"):
        return "(required)"
    if f.default is not dataclasses.MISSING:
        return "none" if f.default is None else f"`{toml_value(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        return "a table" if dataclasses.is_dataclass(made) else f"`{toml_value(made)}`"
    return ""
