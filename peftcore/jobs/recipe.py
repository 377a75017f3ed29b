"""Recipes: one TOML file describes a fine-tuning job; validated into dataclasses with clear errors.

    [model]    path = "ckpt/" | "pip:<package>" (its `model/` folder) | builtin = "tiny-llama"; task, dtype, quantize
    [data]     train, eval (paths relative to the recipe), max_length, packing, labels;
               [data.template] (peftcore.data.records.PromptTemplate),
               [data.augment] (peftcore.data.augment.AugmentConfig)
    [adapter]  method = "lora" | "dora" | "prompt" | "p-tuning" | "prefix", plus that config's fields
    [train]    peftcore.training.config.TrainConfig's fields
    [eval]     generation settings, glossary, how many samples
    [tasks.<name>]  multi-task recipes (peftcore.multitask), one table per task: kind, train, eval,
               weight, labels / num_labels (classification); [data] then holds only shared settings

Every error names the file (or the `--set` that caused it), the section and the key:
"recipe.toml: unknown key [train] lr; did you mean learning_rate?".
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from peftcore.data.augment import AugmentConfig
from peftcore.data.records import PromptTemplate
from peftcore.jobs.builtin import EXAMPLES_DIR
from peftcore.jobs.recipe_methods import ADAPTER_DEFAULTS, INTERNAL_ADAPTER_FIELDS, METHODS
from peftcore.models.generate import SamplingOptions
from peftcore.multitask.heads import HEAD_KINDS, KINDS, POOLINGS, Classification, check_task_name
from peftcore.training.config import (
    COUNT,
    NON_NEGATIVE,
    OFF_OR_EVERY,
    POSITIVE,
    PROBABILITY_BELOW_1,
    TrainConfig,
    check_limits,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RECIPE_NAME = "support_smollm2.toml"
DTYPES = ("float32", "bfloat16", "float16", "auto")
TASKS = ("CAUSAL_LM", "SEQ_CLS")
# Numbers a recipe refuses by key before the model loads (the configs check theirs too): values that
# fail late, in torch's words, or make a job that silently trains nothing. The library's TrainConfig
# takes learning_rate 0 (a step that only computes gradients); a recipe with it would train nothing.
ADAPTER_LIMITS = {"lora_alpha": POSITIVE, "lora_dropout": PROBABILITY_BELOW_1, "encoder_dropout": PROBABILITY_BELOW_1,
                  "encoder_hidden_size": COUNT, "encoder_num_layers": COUNT}
EVAL_LIMITS = {"samples": OFF_OR_EVERY, "max_new_tokens": COUNT, "temperature": NON_NEGATIVE, "top_k": COUNT,
               "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "max_records": COUNT, "batch_size": COUNT}
SECTION_LIMITS = {"model": {"group_size": COUNT, "threads": OFF_OR_EVERY}, "eval": EVAL_LIMITS,
                  "train": {"learning_rate": POSITIVE}}


class RecipeError(ValueError):
    """A recipe that cannot run: unknown key, wrong type, missing value, a path that does not exist."""


@dataclass
class ModelSection:
    path: str | None = field(default=None, metadata={"path": True})  # a checkpoint folder, or "pip:<package>"
    builtin: str | None = None  # "tiny-llama": made in code (peftcore.jobs.builtin)
    task: str = "CAUSAL_LM"  # or "SEQ_CLS" (a BERT encoder gets a new classification head)
    dtype: str = "float32"  # the base weights' dtype: float32 | bfloat16 | float16
    quantize: str | None = None  # "nf4" | "int4" | "int8": a quantized base (QLoRA); "keep": a GGUF file's own blocks
    group_size: int | None = None  # int4 / int8: weights sharing one scale (unset: the format's default)
    double_quant: bool = False  # nf4: quantize the absmax scales too (8-bit, blocks of 256), as QLoRA
    device: str = "auto"  # "auto": cuda when available
    threads: int = 0  # CPU threads; 0 keeps PyTorch's default

    def __post_init__(self):
        if (self.path is None) == (self.builtin is None):
            raise ValueError("set exactly one of path (a checkpoint folder) or builtin (e.g. \"tiny-llama\")"
                             if self.path is None else "path and builtin both set; keep one")
        if self.task not in TASKS:
            raise ValueError(f"task = {self.task!r}; choose from {', '.join(TASKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.quantize not in (None, "nf4", "int4", "int8", "keep"):
            raise ValueError(f"quantize = {self.quantize!r}; choose from nf4, int4, int8, keep (a GGUF file's blocks)")
        if self.double_quant and self.quantize != "nf4":
            raise ValueError(f"double_quant applies to quantize = \"nf4\", not {self.quantize!r}")

    @property
    def base_name(self) -> str:
        """What adapter_config.json records as base_model_name_or_path."""
        return f"builtin:{self.builtin}" if self.builtin else self.path


@dataclass
class DataSection:
    train: str = field(default="", metadata={"required": True, "path": True})  # JSONL / JSON records to train on
    eval: str | None = field(default=None, metadata={"path": True})  # held-out records: eval loss, samples, scores
    max_length: int = 256  # tokens a row keeps (longer rows are truncated; the data report counts them)
    packing: bool = False  # concatenate short rows into max_length windows (no attention across rows)
    labels: str | None = field(default=None, metadata={"path": True})  # SEQ_CLS: {"labels": [...]}
    template: PromptTemplate = field(default_factory=PromptTemplate)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass
class AdapterSection:
    method: str = "lora"  # lora | dora | adalora | ia3 | loha | lokr | oft | vera | prompt | p-tuning | prefix
    options: dict = field(default_factory=dict)  # the method's config fields, validated against its class

    def config(self, **filled):
        """The PeftConfig: recipe defaults, then the recipe's options, then what the job fills in."""
        cls = METHODS[self.method]
        extra = {"use_dora": True} if self.method == "dora" else {}
        return cls(**{**ADAPTER_DEFAULTS[self.method], **self.options, **extra, **filled})


@dataclass(frozen=True)
class EvalSection(SamplingOptions):
    """[eval]: the decoding options (peftcore.models.SamplingOptions: max_new_tokens, temperature, top_k,
    top_p) and what the evaluation shows and scores."""

    samples: int = 3  # sample generations shown after training
    max_records: int | None = None  # `peftcore eval`: records generated for BLEU / chrF (None: all)
    batch_size: int = 8  # records generated at once
    glossary: str | None = field(default=None, metadata={"path": True})  # {"term": "required translation"} JSON


@dataclass
class TaskSection:
    """[tasks.<name>]: one task of a multi-task recipe (a head on the shared adapted backbone)."""

    kind: str = field(default="", metadata={"required": True})  # classification | generation | qa
    train: str = field(default="", metadata={"required": True, "path": True})  # this task's training records
    eval: str | None = field(default=None, metadata={"path": True})  # this task's held-out records
    weight: float = 1.0  # this task's loss weight (peftcore.training.loop: per-task normalised, then weighted)
    labels: str | None = field(default=None, metadata={"path": True})  # classification: {"labels": [...]}
    num_labels: int | None = None  # classification with integer labels 0..n-1 and no label file
    pooling: str = "auto"  # classification: last | first | mean (auto: last for causal models, first for BERT)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind = {self.kind!r}; choose from {', '.join(KINDS)}")
        classifies = HEAD_KINDS[self.kind] is Classification
        if classifies and self.labels is None and self.num_labels is None:
            raise ValueError('a classification task needs labels = "labels.json" or num_labels')
        if not classifies and (self.labels, self.num_labels, self.pooling) != (None, None, "auto"):
            raise ValueError(f"labels, num_labels and pooling are for classification tasks, not {self.kind}")
        if self.pooling not in (*POOLINGS, "auto"):
            raise ValueError(f"pooling = {self.pooling!r}; choose from {', '.join(POOLINGS)}, auto")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    adapter: AdapterSection
    train: TrainConfig
    eval: EvalSection
    source: str = "recipe"  # the file name, for messages
    tasks: dict[str, TaskSection] = field(default_factory=dict)  # multi-task recipes only

    def to_dict(self) -> dict:
        out = {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
               "adapter": {"method": self.adapter.method, **self.adapter.options},
               "train": dataclasses.asdict(self.train), "eval": dataclasses.asdict(self.eval)}
        if self.tasks:
            out["tasks"] = {name: dataclasses.asdict(task) for name, task in self.tasks.items()}
        return out


SECTIONS = {"model": ModelSection, "data": DataSection, "adapter": AdapterSection, "train": TrainConfig,
            "eval": EvalSection}


# -- loading ----------------------------------------------------------------------------------
def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """A recipe file (a bare name not here: shipped examples/NAME.toml; None: the default) with `--set` overrides."""
    if path is None:
        path, source = EXAMPLES_DIR / DEFAULT_RECIPE_NAME, "(default recipe)"
        if not path.is_file():
            raise RecipeError(f"the default recipe {path} is missing from this installation; pass a CONFIG.toml")
    else:
        path, source = Path(path), Path(path).name
        path = path if path.is_file() or len(path.parts) > 1 else shipped_recipe(path.name)
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    return parse_recipe(raw, source, path.resolve().parent, overrides)


def shipped_recipe(name: str) -> Path:
    """examples/NAME(.toml) (peftcore.examples in a wheel): a bare name finds it from any folder."""
    names = sorted(p.stem for p in EXAMPLES_DIR.glob("*.toml"))
    if (stem := name.removesuffix(".toml")) in names:
        return EXAMPLES_DIR / f"{stem}.toml"
    close = difflib.get_close_matches(stem, names, n=len(names), cutoff=0.5)
    raise RecipeError(f"{name}: no such recipe file; shipped recipes: {', '.join(dict.fromkeys(close + names))}")


def parse_recipe(raw: dict, source: str, base_dir: Path, overrides: list[str] = ()) -> Recipe:
    origins: dict[tuple, str] = {}
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(raw, keys, value, item)
        origins[tuple(keys)] = f"--set {item}"
        switch_base(raw, keys)
    v = Validator(source, origins, base_dir)
    unknown = [k for k in raw if k not in SECTIONS and k != "tasks"]
    for key in unknown:
        v.fail((key,), f"unknown section [{key}]" + suggestion(key, [*SECTIONS, "tasks"]))
    tables = {}
    for name in SECTIONS:
        table = raw.get(name, {})
        if not isinstance(table, dict):
            v.fail((name,), f"[{name}] must be a table, got {type_name(table)}")
        tables[name] = table
    tasks = v.tasks(raw.get("tasks", {}))
    if "data" not in raw and not tasks:
        v.fail(("data",), 'missing section [data]; a recipe needs at least [data] train = "train.jsonl"')
    v.check_task_settings(tables, tasks)
    return Recipe(
        model=v.section(ModelSection, tables["model"], ("model",)),
        data=v.section(DataSection, tables["data"], ("data",), required=not tasks),
        adapter=v.adapter(tables["adapter"]),
        train=v.section(TrainConfig, tables["train"], ("train",)),
        eval=v.section(EvalSection, tables["eval"], ("eval",)),
        source=source,
        tasks=tasks,
    )


def switch_base(raw: dict, keys: list[str]) -> None:
    """`--set model.builtin=tiny-llama` on a recipe whose base is a path (the default job's SmolLM2) swaps
    the base instead of failing on "path and builtin both set", and the other way round; quantize = "keep"
    (a GGUF file's own blocks) goes with the file."""
    model = raw.get("model")
    if keys[:1] != ["model"] or len(keys) != 2 or keys[1] not in ("builtin", "path") or not isinstance(model, dict):
        return
    model.pop("path" if keys[1] == "builtin" else "builtin", None)
    if keys[1] == "builtin" and model.get("quantize") == "keep":
        model.pop("quantize")


def parse_override(item: str) -> tuple[list[str], object]:
    """"section.key=value": the value is a TOML literal (3, 1e-4, true, ["a", "b"]), else a plain string."""
    name, sep, text = item.partition("=")
    keys = [k.strip() for k in name.split(".")]
    if not sep or len(keys) < 2 or not all(keys):
        raise RecipeError(f"--set {item}: expected section.key=value, e.g. --set train.learning_rate=3e-4")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return keys, value


def apply_override(raw: dict, keys: list[str], value, item: str) -> None:
    table = raw
    for key in keys[:-1]:
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            raise RecipeError(f"--set {item}: {key} is a value, not a table")
    table[keys[-1]] = value


def suggestion(key: str, candidates) -> str:
    """"; did you mean X?" by spelling (difflib), by initials (lr -> learning_rate) or by a part
    (warmup -> warmup_steps); otherwise the known names."""
    candidates = sorted(candidates)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    close = close or [c for c in candidates if len(key) > 1 and "".join(w[:1] for w in c.split("_")) == key.lower()]
    close = close or [c for c in candidates if len(key) > 3 and key.lower() in c]
    if len(close) >= 1:
        return f"; did you mean {close[0]}?"
    return f"; known: {', '.join(candidates)}"


def label(keys: tuple) -> str:
    """("data", "augment", "copies") -> "[data.augment] copies"."""
    return f"[{'.'.join(keys[:-1])}] {keys[-1]}" if len(keys) > 1 else f"[{keys[0]}]"


# -- validation -------------------------------------------------------------------------------
class Validator:
    def __init__(self, source: str, origins: dict, base_dir: Path):
        self.source, self.origins, self.base_dir = source, origins, base_dir

    def fail(self, keys: tuple, message: str):
        """Blame the --set that wrote this key; for a whole section, the file and the --sets inside it."""
        origin = next((o for k, o in self.origins.items() if keys[: len(k)] == k), None)
        if origin is None:
            inside = [o for k, o in self.origins.items() if k[: len(keys)] == keys]
            origin = self.source + (f" (with {', '.join(inside)})" if inside else "")
        raise RecipeError(f"{origin}: {message}")

    def section(self, cls, table: dict, keys: tuple, required: bool = True):
        """`required=False`: keys marked required may be left out (a multi-task recipe's [data] train)."""
        names = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in table:
            if key not in names:
                self.fail(keys + (key,), f"unknown key {label(keys + (key,))}" + suggestion(key, names))
        values = {}
        for name, f in names.items():
            if required and f.metadata.get("required") and name not in table:
                self.fail(keys + (name,), f"missing required key {label(keys + (name,))}")
            if name not in table:
                continue
            tp = hints[name]
            if dataclasses.is_dataclass(tp):
                if not isinstance(table[name], dict):
                    self.fail(keys + (name,), f"{label(keys + (name,))} must be a table ([{'.'.join(keys + (name,))}])")
                values[name] = self.section(tp, table[name], keys + (name,))
                continue
            values[name] = self.value(table[name], tp, keys + (name,))
            if f.metadata.get("path") and values[name] is not None:
                values[name] = self.path(values[name], keys + (name,))
        try:
            check_limits(values, SECTION_LIMITS.get(".".join(keys), {}))
            return cls(**values)
        except (ValueError, TypeError) as e:
            self.fail(keys, f"[{'.'.join(keys)}] {e}")

    def value(self, value, tp, keys: tuple):
        if isinstance(value, str) and value.lower() in ("none", "null") and accepts_none(tp) and keys in self.origins:
            return None  # TOML has no null; `--set eval.top_k=none` resets an optional value
        ok, converted = convert(value, tp)
        if not ok:
            self.fail(keys, f"{label(keys)} must be {describe(tp)}, got {type_name(value)} {value!r}")
        return converted

    def path(self, value: str, keys: tuple) -> str:
        """Relative paths: against the recipe's folder (a --set path: against the working directory)."""
        if value.startswith("pip:"):  # a package shipping a checkpoint: resolved when the job loads it
            return value
        base = Path.cwd() if keys in self.origins else self.base_dir
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            self.fail(keys, f"{label(keys)} = {value!r}: {path} does not exist")
        return str(path)

    def tasks(self, table) -> dict[str, TaskSection]:
        if not isinstance(table, dict):
            self.fail(("tasks",), "[tasks] must hold one table per task: [tasks.<name>]")
        tasks = {}
        for name, body in table.items():
            keys = ("tasks", name)
            try:
                check_task_name(name)
            except ValueError as e:
                self.fail(keys, f"[tasks.{name}] {e}")
            if not isinstance(body, dict):
                self.fail(keys, f"[tasks] {name} must be a table ([tasks.{name}] with kind, train, ...)")
            tasks[name] = self.section(TaskSection, body, keys)
        return tasks

    def check_task_settings(self, tables: dict, tasks: dict) -> None:
        """What a multi-task recipe sets per task, or cannot use; and task settings without tasks."""
        if "task_weights" in tables["train"]:
            self.fail(("train", "task_weights"),
                      "[train] task_weights: set each task's weight in [tasks.<name>] weight")
        if not tasks:
            return
        for key in ("train", "eval", "labels"):
            if key in tables["data"]:
                self.fail(("data", key), f"[data] {key}: a multi-task recipe reads each task's data from "
                          f"[tasks.<name>] {key}")
        if tables["data"].get("packing"):
            self.fail(("data", "packing"),
                      "[data] packing: multi-task batches keep one row per record; set packing = false")
        if tables["model"].get("task", "CAUSAL_LM") != "CAUSAL_LM":
            self.fail(("model", "task"),
                      "[model] task: a multi-task recipe sets each task's kind in [tasks.<name>] kind; "
                      "leave [model] task unset")
        if tables["adapter"].get("method", "lora") not in ("lora", "dora"):
            self.fail(("adapter", "method"), "[adapter] method: a multi-task model shares a LoRA / DoRA backbone")

    def adapter(self, table: dict) -> AdapterSection:
        keys = ("adapter",)
        method = table.get("method", "lora")
        if method not in METHODS:
            self.fail(keys + ("method",), f"unknown [adapter] method {method!r}" + suggestion(str(method), METHODS))
        cls = METHODS[method]
        hints = typing.get_type_hints(cls)
        allowed = {f.name for f in fields(cls)} - INTERNAL_ADAPTER_FIELDS
        options = {}
        for key, value in table.items():
            if key == "method":
                continue
            if key not in allowed:
                why = " (set by the job from the model)" if key in INTERNAL_ADAPTER_FIELDS else ""
                self.fail(keys + (key,), f"unknown key [adapter] {key} for method {method!r}{why}"
                          + ("" if why else suggestion(key, allowed | {"method"})))
            options[key] = self.value(value, hints[key], keys + (key,))
        section = AdapterSection(method, options)
        filled_later = {"tokenizer_name_or_path": "(the base's)"} if method == "prompt" else {}
        if method == "adalora" and "total_step" not in options:  # the run's step count, known to the job (jobs.train)
            filled_later["total_step"] = options.get("tinit", 0) + options.get("tfinal", 0) + 1
        try:
            check_limits(options, ADAPTER_LIMITS)
            section.config(**filled_later)  # the config's own checks (r > 0, bias, init values, ...)
        except (ValueError, TypeError) as e:
            self.fail(keys, f"[adapter] {e}")
        return section


def accepts_none(tp) -> bool:
    return type(None) in typing.get_args(tp)


def convert(value, tp) -> tuple[bool, object]:
    """(value fits tp?, the value converted: int -> float, list -> tuple). TOML gives str, int,
    float, bool, datetime, list and dict; bool is never an int here."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = convert(value, arg)
            if ok:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is typing.Any or tp is object:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp}, value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [convert(v, args[0]) if args else (True, v) for v in value]
        if not all(ok for ok, _ in items):
            return False, value
        out = [v for _, v in items]
        return True, tuple(out) if (origin or tp) is tuple else out
    return isinstance(value, tp), value


def describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "unset"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(args[0], describe(args[0]))}" if args else "a list"
    if tp is dict or origin is dict:
        return "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def type_name(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)

