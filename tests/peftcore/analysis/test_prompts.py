"""`peftcore inspect` on prompt-learning adapters (HF PEFT's and peftcore's files): virtual-token
norms, nearest vocabulary tokens by cosine read from the base checkpoint, prefix key / value norms."""
import copy
import dataclasses
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

from peftcore import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from peftcore.analysis.live import prompt_stats
from peftcore.cli import main
from peftcore.models import LlamaConfig, from_config, save_pretrained
from peftcore.prompt.encoders import prefix_keys_values

WORDS = ["<unk>", "<s>", "</s>"] + [f"word{i}" for i in range(37)]
COPIED = [5, 17, 23, 8]  # the vocabulary rows the HF prompt starts from: the nearest tokens to find


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_tokenizer(folder) -> None:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def brute_force_nearest(prompts: torch.Tensor, vocab: torch.Tensor, k: int) -> list[list[int]]:
    cosine = torch.stack([torch.stack([torch.dot(p, v) / (p.norm() * v.norm()) for v in vocab.double()])
                          for p in prompts.double()])  # (n, V), one pair at a time
    return cosine.topk(k, dim=-1).indices.tolist()


@pytest.fixture(scope="module")
def hf_prompt(tmp_path_factory):
    """A prompt-tuning adapter saved by HF PEFT on a transformers Llama saved beside it with a tokenizer."""
    root = tmp_path_factory.mktemp("hf_prompt")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    )).save_pretrained(root / "base")
    write_tokenizer(root / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(root / "base")  # so PEFT records the base's folder
    pm = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(COPIED)))
    with torch.no_grad():
        rows = hf.get_input_embeddings().weight[COPIED]
        pm.prompt_encoder["default"].embedding.weight.copy_(3 * rows + 0.01 * torch.randn_like(rows))
    pm.save_pretrained(root / "adapter")
    return root / "adapter", root / "base", hf.get_input_embeddings().weight.detach().clone()


def test_hf_peft_prompt_adapter_norms_and_nearest_tokens(hf_prompt, tmp_path, capsys):
    adapter, base, vocab = hf_prompt
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    code, out, err = cli(capsys, adapter, "--output-dir", tmp_path, "--top-k", 3)  # the base: the recorded one
    assert code == 0, err
    stats = json.loads((tmp_path / "inspect.json").read_text())
    prompts = load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"].float()
    assert stats["method"] == "PROMPT_TUNING" and stats["base"] == str(base)
    assert [t["norm"] for t in stats["virtual_tokens"]] == pytest.approx(prompts.norm(dim=-1).tolist(), rel=1e-6)
    nearest = [t["nearest_ids"] for t in stats["virtual_tokens"]]
    assert nearest == brute_force_nearest(prompts, vocab, 3) and [ids[0] for ids in nearest] == COPIED
    assert [t["nearest_tokens"][0] for t in stats["virtual_tokens"]] == [WORDS[i] for i in COPIED]
    norms = vocab.norm(dim=-1)
    assert stats["vocab_norm"]["mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
    assert sum(stats["vocab_norm"]["histogram"]["counts"]) == len(WORDS)
    assert all(t["vocab_percentile"] == 100.0 for t in stats["virtual_tokens"])  # 3x a row: louder than every row
    assert ("nearest vocabulary tokens (cosine)" in out and f"'{WORDS[COPIED[1]]}'" in out
            and "vocabulary norms: mean" in out)
    assert (tmp_path / "inspect_prompt_norms.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def peftcore_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peftcore_base")
    torch.manual_seed(0)
    model = from_config(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                    num_attention_heads=2, num_key_value_heads=1))
    save_pretrained(model, folder)
    write_tokenizer(folder)
    return model, folder


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
                                    PromptEncoderConfig(num_virtual_tokens=3)], ids=["prompt", "p-tuning"])
def test_peftcore_prompt_adapter_matches_the_live_model(peftcore_base, config, tmp_path, capsys):
    model, base = peftcore_base
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(model), dataclasses.replace(config, base_model_name_or_path=str(base)))
    pm.save_pretrained(tmp_path / "adapter")
    code, out, err = cli(capsys, tmp_path / "adapter", "--output-dir", tmp_path, "--top-k", 4)
    assert code == 0, err
    assert "vocab pct" in out and "skipped" not in out and "shown as ids" not in out
    stats = json.loads((tmp_path / "inspect.json").read_text())
    prompts = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"].float()
    assert [t["norm"] for t in stats["virtual_tokens"]] == pytest.approx(prompts.norm(dim=-1).tolist(), rel=1e-6)
    vocab = model.model.embed_tokens.weight.detach()
    assert [t["nearest_ids"] for t in stats["virtual_tokens"]] == brute_force_nearest(prompts, vocab, 4)
    live = prompt_stats(pm, top_k=4)  # the training-time path: the same computation on the live prompts
    assert [t["nearest_ids"] for t in live["virtual_tokens"]] == [t["nearest_ids"] for t in stats["virtual_tokens"]]
    assert [t["norm"] for t in live["virtual_tokens"]] == pytest.approx(
        [t["norm"] for t in stats["virtual_tokens"]], rel=1e-5
    )


def test_prefix_adapter_per_layer_key_and_value_norms(peftcore_base, tmp_path, capsys):
    model, _ = peftcore_base
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():  # layers of distinct scale, keys and values apart: a swapped layout cannot pass
        for layer in range(3):
            pm.prompt_encoder["default"].embedding.weight.view(4, 3, 2, -1)[:, layer, 1] *= 2 + layer
    pm.save_pretrained(tmp_path / "adapter")
    code, out, err = cli(capsys, tmp_path / "adapter", "--output-dir", tmp_path)
    assert code == 0, err
    stats = json.loads((tmp_path / "inspect.json").read_text())
    config = pm.peft_config["default"]
    keys, values = prefix_keys_values(pm.prompt_encoder["default"].embedding.weight.detach(), config, 1)
    for name, tensors in (("key_norm_per_layer", keys), ("value_norm_per_layer", values)):
        per_token = [t[0].permute(1, 0, 2).reshape(4, -1).norm(dim=-1) for t in tensors]  # (heads, n, hd) -> (n,)
        assert stats[name] == pytest.approx([float(n.mean()) for n in per_token], rel=1e-6)
    assert stats["value_norm_per_layer"][2] > stats["value_norm_per_layer"][0]
    assert "nearest_ids" not in json.dumps(stats) and "key norm" in out and "value norm" in out
    assert "skipped" not in out  # a prefix needs no base
    assert (tmp_path / "inspect_prompt_norms.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missing_base_skips_nearest_tokens_with_one_line(hf_prompt, tmp_path, capsys):
    adapter, _, _ = hf_prompt
    moved = tmp_path / "adapter"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")})
    )
    code, out, err = cli(capsys, moved)
    assert code == 0, err
    (skipped,) = [line for line in out.splitlines() if "skipped" in line]
    assert skipped.startswith(f"base '{tmp_path / 'gone'}' not available "
                              f"(base model '{tmp_path / 'gone'}': no such folder")
    assert skipped.endswith("): nearest vocabulary tokens skipped")
    stats = json.loads((moved / "inspect.json").read_text())
    prompts = load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"].float()
    assert [t["norm"] for t in stats["virtual_tokens"]] == pytest.approx(prompts.norm(dim=-1).tolist(), rel=1e-6)
    assert stats["base"] is None and all("nearest_ids" not in t for t in stats["virtual_tokens"])


def test_a_base_without_tokenizer_lists_ids_and_a_wrong_base_is_one_line(hf_prompt, peftcore_base, tmp_path, capsys):
    adapter, base, _ = hf_prompt
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((base / name).read_bytes())
    code, out, err = cli(capsys, adapter, "--base", bare, "--output-dir", tmp_path, "--top-k", 1)
    assert code == 0, err
    assert "nearest tokens shown as ids" in out and f"#{COPIED[0]} " in out
    assert [t["nearest_ids"] for t in json.loads((tmp_path / "inspect.json").read_text())["virtual_tokens"]] == [
        [i] for i in COPIED
    ]
    code, _, err = cli(capsys, adapter, "--base", peftcore_base[1], "--output-dir", tmp_path)  # 16 wide, not 32
    assert code == 1 and err.strip() == ("peftcore inspect: error: the prompts are 32 wide but the base's token "
                                         "embeddings 16: an adapter for another base? pass --base")
    code, _, err = cli(capsys, adapter, "--compare", adapter, "--output-dir", tmp_path)
    assert code == 1 and "--compare measures LoRA subspaces" in err


def test_nearest_tokens_chunk_by_chunk_equal_one_pass_over_the_vocabulary():
    from peftcore.analysis.prompts import nearest_vocabulary

    torch.manual_seed(3)
    prompts, vocab = torch.randn(5, 12), torch.randn(50, 12, dtype=torch.bfloat16)  # 50 rows: chunks of 7 leave 1
    cosine, ids, norms = nearest_vocabulary(prompts, vocab, top_k=6, chunk=7)
    assert ids.tolist() == brute_force_nearest(prompts, vocab.float(), 6)
    full = torch.nn.functional.normalize(prompts, dim=-1) @ torch.nn.functional.normalize(vocab.float(), dim=-1).T
    torch.testing.assert_close(cosine, full.topk(6, dim=-1).values)
    torch.testing.assert_close(norms, vocab.float().norm(dim=-1))


def test_a_bin_prompt_adapter_reads_like_its_safetensors_twin(tmp_path):
    """PEFT's safe_serialization=False writes adapter_model.bin: inspect reads it through the one adapter
    reader (torch.load with weights_only=True), with the same prompts as the safetensors file."""
    import shutil

    import torch

    from peftcore.adapter_io import WEIGHTS_NAME
    from peftcore.analysis.prompts import PROMPT_KEY, read_prompt_adapter
    from peftcore.models import safetensors_io

    safe = tmp_path / "safe"
    safe.mkdir()
    (safe / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 4}')
    prompts = torch.randn(3, 4)
    safetensors_io.write({PROMPT_KEY: prompts}, safe / WEIGHTS_NAME)
    legacy = tmp_path / "bin"
    shutil.copytree(safe, legacy)
    (legacy / WEIGHTS_NAME).unlink()
    torch.save({PROMPT_KEY: prompts}, legacy / "adapter_model.bin")
    torch.testing.assert_close(read_prompt_adapter(legacy)[1], read_prompt_adapter(safe)[1], atol=0, rtol=0)
