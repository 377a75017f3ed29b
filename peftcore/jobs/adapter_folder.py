"""Adapter folders of peftcore jobs: written by `peftcore train`, read by eval / generate / merge.

An adapter folder written here holds, besides HF PEFT's two files, the base's tokenizer files and
`peftcore_recipe.json` (the resolved recipe: template, max_length, task, labels, eval settings),
and adapter_config.json names the base (`base_model_name_or_path`: a folder, "pip:<package>" or
"builtin:<name>"), so `peftcore eval / generate / merge --adapter DIR` need nothing else.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from peftcore.data.records import (
    PromptTemplate,
)
from peftcore.jobs.bases import TaskError, base_chat_template, canonical_base, load_base, resolve_base, set_runtime
from peftcore.jobs.tasks import read_json_object
from peftcore.models import load_tokenizer
from peftcore.models.tokenizer import save_tokenizer
from peftcore.multitask.model import HEADS_CONFIG, MultiTaskModel

RECIPE_FILE = "peftcore_recipe.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.txt")


def save_adapter_folder(peft_model, folder, base: Path, recipe_dict: dict, tokenizer) -> None:
    """The adapter, the base's tokenizer (its files; a .gguf base's, written out) and the recipe record."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    copy_tokenizer(base, tokenizer, folder)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe_dict, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_tokenizer(base: Path, tokenizer, folder: Path) -> None:
    """A checkpoint folder's tokenizer files as they are; a .gguf base's tokenizer (in its metadata) saved."""
    if not base.is_dir():
        save_tokenizer(tokenizer, folder)
        return
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)


def backbone(model: nn.Module) -> nn.Module:
    """The PeftModel that generates: a multi-task model's shared adapter + LM head, else the model itself."""
    return model.backbone if isinstance(model, MultiTaskModel) else model


def task_weights(model: nn.Module) -> dict[str, float] | None:
    """evaluate()'s task weights: a multi-task model's, else None (single-task rows have no task)."""
    return model.task_weights if isinstance(model, MultiTaskModel) else None


@dataclass
class Loaded:
    """An adapter folder loaded: `model` scores (a PeftModel, or a MultiTaskModel with its task heads),
    `peft_model` generates (for a multi-task folder: the shared backbone and its LM head)."""

    model: nn.Module
    tokenizer: object
    info: dict  # peftcore_recipe.json (or what the adapter config alone tells)
    base_folder: Path
    base_name: str
    device: torch.device

    @property
    def peft_model(self) -> nn.Module:
        return backbone(self.model)

    @property
    def task_weights(self) -> dict[str, float] | None:
        return task_weights(self.model)

    @property
    def task(self) -> str:
        return self.info["model"]["task"]

    @property
    def labels(self) -> list[str] | None:
        return self.info.get("labels")

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate(**self.info["data"]["template"])


def read_adapter_info(adapter_dir: Path) -> tuple[dict, dict]:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise TaskError(f"--adapter {adapter_dir}: no adapter_config.json there (point at the adapter folder, "
                        "e.g. runs/<timestamp>/adapter)")
    config = read_json_object(config_file)
    info_file = adapter_dir / RECIPE_FILE
    if info_file.is_file():
        info = check_adapter_info(read_json_object(info_file), info_file)
    else:  # an adapter from elsewhere (HF PEFT): defaults
        info = default_info("SEQ_CLS" if config.get("task_type") == "SEQ_CLS" else "CAUSAL_LM")
    return config, info


def default_info(task: str, template: PromptTemplate | None = None) -> dict:
    """The recipe record of a job nobody recorded (a foreign adapter, the base alone): defaults."""
    from dataclasses import asdict

    return {"model": {"task": task, "dtype": "float32", "quantize": None, "group_size": None, "double_quant": False,
                      "device": "auto", "threads": 0},
            "data": {"template": asdict(template or PromptTemplate()), "max_length": 512}, "eval": {}}


def load_base_alone(base: str) -> Loaded:
    """A base with no adapter (`peftcore generate` without --adapter): before / after by hand. Prompts go
    into its chat template when it has one (as an input/output adapter trained on it would see them)."""
    base_name = canonical_base(base)
    base_path = resolve_base(base_name)
    info = default_info("CAUSAL_LM", PromptTemplate(chat_template=base_chat_template(base_path)[0]))
    model_section = SimpleNamespace(**info["model"])
    device = set_runtime(model_section)
    model = load_base(base_path, model_section, None, device=device)
    return Loaded(model, load_tokenizer(base_path), info, base_path, base_name, device)


def check_adapter_info(info: dict, path: Path) -> dict:
    """The sections a loaded adapter reads (model.task, data.template): a hand-edited or foreign file is
    an error naming it, not a KeyError later."""
    model, data = info.get("model"), info.get("data")
    missing = [name for name, ok in (("model.task", isinstance(model, dict) and "task" in model),
                                     ("data.template",
                                      isinstance(data, dict) and isinstance(data.get("template"), dict)))
               if not ok]
    if missing:
        raise TaskError(f"{path}: no {', '.join(missing)}: not a recipe record written by `peftcore train`; "
                        f"delete {path.name} to load the folder as a plain (HF PEFT) adapter")
    return info


def load_adapter_folder(adapter_dir, base: str | None = None, merge_ready: bool = False) -> Loaded:
    """Base + adapter from `--adapter DIR` (and `--base`, which overrides the recorded base; "builtin" is
    the built-in tiny Llama). A multi-task folder (task_heads.json beside the adapter) loads with its heads."""
    from peftcore.peft_model import PeftModel

    adapter_dir = Path(adapter_dir)
    config, info = read_adapter_info(adapter_dir)
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise TaskError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; pass --base PATH")
    base_name = canonical_base(base_name)
    base_folder = resolve_base(base_name)
    model_section = SimpleNamespace(
        **{"group_size": None, "double_quant": False, "threads": 0, "device": "auto", **info["model"]})
    device = set_runtime(model_section)
    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base_folder)
    model = load_base(base_folder, model_section, info.get("labels"), device=device, quantize=not merge_ready)
    adapted = MultiTaskModel if (adapter_dir / HEADS_CONFIG).is_file() else PeftModel
    return Loaded(adapted.from_pretrained(model, adapter_dir), tokenizer, info, base_folder, base_name, device)

