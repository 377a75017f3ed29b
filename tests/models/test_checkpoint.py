"""Checkpoint folders: every error names what is wrong, sharded files, dtype casting, peak RAM."""
import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftcore.models import CheckpointError, from_config, load_pretrained, save_pretrained
from peftcore.models.checkpoint import read_config
from peftcore.models.families import DEFAULT_ARCHITECTURE
from peftcore.models.llama import LlamaConfig
from peftcore.models.safetensors_io import iter_tensors, read_exactly, read_header
from tests.models import rss

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)



@pytest.fixture
def folder(tmp_path):
    """A tiny Llama checkpoint written by us."""
    torch.manual_seed(0)
    save_pretrained(from_config(LlamaConfig(**TINY)), tmp_path)
    return tmp_path


def rewrite_weights(folder, edit) -> None:
    """Load model.safetensors, let `edit` change the dict in place, write it back."""
    file = folder / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


# ---- errors ---------------------------------------------------------------------------------

def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*Hugging Face checkpoint folder"):
        load_pretrained(tmp_path)


def test_config_json_that_is_not_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_pretrained(folder)


def test_no_safetensors_lists_what_was_found(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained(folder)
    message = str(err.value)
    assert "no model.safetensors or model.safetensors.index.json" in message
    assert "found: config.json, pytorch_model.bin" in message
    assert "safetensors only" in message


def test_unknown_model_type_lists_supported_ones(folder):
    config = read_config(folder)
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(folder)
    assert "unsupported model_type 'gpt_neox'" in str(err.value)
    assert f"supported: {', '.join(sorted(DEFAULT_ARCHITECTURE))}" in str(err.value)
    assert {"llama", "mistral", "qwen2"} <= set(DEFAULT_ARCHITECTURE)  # the list above is the registry's


def test_missing_keys_are_named(folder):
    rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): model\.layers\.1\.mlp\.up_proj\.weight$"):
        load_pretrained(folder)


def test_unexpected_keys_are_named(folder):
    rewrite_weights(folder, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): model\.layers\.0\.mlp\.extra\.weight$"):
        load_pretrained(folder)


def test_many_missing_keys_are_listed_with_a_count(folder):
    rewrite_weights(folder, lambda s: [s.pop(k) for k in list(s) if k.startswith("model.layers.")])
    with pytest.raises(CheckpointError, match=r"missing 18 key\(s\): .* \.\.\.$"):
        load_pretrained(folder)


def test_misshaped_key_names_the_key_and_both_shapes(folder):
    rewrite_weights(folder, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    expected = (r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj\.weight has shape \(8, 32\) "
                r"but the model built from config\.json expects \(16, 32\)")
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(folder)


def test_unreadable_dtype_names_the_tensor(folder):
    rewrite_weights(folder, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.float8_e4m3fn)}))
    with pytest.raises(
        ValueError, match=r"tensor 'model\.norm\.weight' has dtype F8_E4M3, which peftcore does not read"
    ):
        load_pretrained(folder)


def test_index_naming_an_absent_shard(folder):
    weight_map = {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError, match=r"names shard\(s\) that are not in .*: model-00002-of-00002\.safetensors"
    ):
        load_pretrained(folder)


def test_index_without_a_weight_map(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json has no \"weight_map\" object"):
        load_pretrained(folder)


def test_from_config_rejects_a_foreign_config_object():
    with pytest.raises(
        TypeError, match=r"from_config got a dict_items; expected a config\.json dict or one of .*LlamaConfig"
    ):
        from_config({}.items())


def test_truncated_weights_file_is_refused(folder):
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"is truncated: tensor '.*' needs \d+ bytes, found \d+"):
        load_pretrained(folder)


@pytest.mark.parametrize("content", [b"", b"\x05\x00", b"\xff" * 16, b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{"])
def test_file_that_is_not_safetensors(folder, content):
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a safetensors file"):
        load_pretrained(folder)


def test_header_span_that_disagrees_with_the_shape(folder):
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = [16]  # 32 floats stored, 16 declared
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # spaces after JSON are allowed
    assert len(text) == n
    file.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' spans 128 bytes but its shape and dtype need 64"):
        load_pretrained(folder)


def write_raw(path, header, data: bytes = b"") -> None:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON header, data."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = [  # (header, data, what the error says)
    ([entry()], bytes(8), r"m\.safetensors is not a safetensors file \(its header is a JSON list, not an object\)"),
    ({"w": [1, 2]}, bytes(8), r"m\.safetensors: tensor 'w' has a header entry of list, not an object"),
    ({"w": entry(shape=(-1, 2))}, bytes(8),
     r"m\.safetensors: tensor 'w' has shape \[-1, 2\]; a shape is a list of integers >= 0"),
    ({"w": entry(shape=(2.5,))}, bytes(8), r"m\.safetensors: tensor 'w' has shape \[2\.5\]; a shape is a list"),
    ({"w": entry(shape=("2",))}, bytes(8), r"m\.safetensors: tensor 'w' has shape \['2'\]; a shape is a list"),
    ({"w": entry(shape=(True,))}, bytes(8), r"m\.safetensors: tensor 'w' has shape \[True\]; a shape is a list"),
    ({"w": entry(dtype="F17")}, bytes(8),
     r"m\.safetensors: tensor 'w' has dtype 'F17', which is not a safetensors dtype"),
    ({"w": entry(offsets=(8, 0))}, bytes(8),
     r"m\.safetensors: tensor 'w' has data_offsets \[8, 0\]; expected \[start, end\]"),
    ({"w": entry(offsets=(0,))}, bytes(8),
     r"m\.safetensors: tensor 'w' has data_offsets \[0\]; expected \[start, end\]"),
    ({"w": entry(offsets=(0, 4))}, bytes(8),
     r"m\.safetensors: tensor 'w' spans 4 bytes but its shape and dtype need 8"),
    ({"w": entry(), "v": entry(offsets=(8, 16))}, bytes(12),
     r"m\.safetensors is truncated: tensor 'v' needs 8 bytes, found 4"),
]


@pytest.mark.parametrize("header, data, message", BAD_HEADERS, ids=[
    "list header", "list entry", "negative dim", "float dim", "string dim", "bool dim", "unknown dtype",
    "reversed offsets",
    "one offset", "span vs shape", "data past the end"])
def test_a_bad_header_is_refused_naming_the_file_the_tensor_and_the_problem(tmp_path, header, data, message):
    write_raw(tmp_path / "m.safetensors", header, data)
    with pytest.raises(ValueError, match=message) as e:
        read_header(tmp_path / "m.safetensors")
    assert "\n" not in str(e.value)


def test_a_truncated_file_is_refused_by_its_header_alone(folder):
    """The headers-only reader (inspect-model) sees the truncation too, not just a full load."""
    file = folder / "model.safetensors"
    header, _ = read_header(file)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"is truncated: tensor '{re.escape(last)}' needs \d+ bytes, found \d+"):
        read_header(file)


def test_a_good_hand_written_file_reads_back(tmp_path):
    """The checks above refuse only what is wrong: the same writer makes a file both readers accept."""
    write_raw(tmp_path / "m.safetensors",
              {"__metadata__": {"format": "pt"}, "w": entry(), "e": entry(shape=(0, 3), offsets=(8, 8))},
              torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert set(read_header(tmp_path / "m.safetensors")[0]) == {"w", "e"}
    got = dict(iter_tensors(tmp_path / "m.safetensors"))
    assert got["w"].tolist() == [1.0, 2.0] and got["e"].shape == (0, 3)
    assert load_file(tmp_path / "m.safetensors")["w"].tolist() == [1.0, 2.0]  # the safetensors package agrees


class Trickle:
    """A file that returns at most 3 bytes per read, as read(2) does past ~2 GiB on Linux."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readinto(self, buffer) -> int:
        chunk = self.data[self.pos:self.pos + min(3, len(buffer))]
        buffer[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def test_read_exactly_keeps_reading_after_short_reads():
    buffer = bytearray(10)
    read_exactly(Trickle(bytes(range(10))), memoryview(buffer), "f", "t")
    assert buffer == bytes(range(10))
    with pytest.raises(ValueError, match=r"f is truncated: tensor 't' needs 12 bytes, found 10"):
        read_exactly(Trickle(bytes(range(10))), memoryview(bytearray(12)), "f", "t")


# ---- what loads -----------------------------------------------------------------------------

def test_sharded_transformers_checkpoint_loads(tmp_path):
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_pretrained(tmp_path)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_fp32_checkpoint_loads_as_bf16(folder):
    fp32 = load_pretrained(folder)
    bf16 = load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.model.inv_freq.dtype == torch.float32  # RoPE frequencies keep their digits
    for (name, a), (_, b) in zip(fp32.state_dict().items(), bf16.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_dtype_none_keeps_the_stored_dtype(folder):
    save_pretrained(load_pretrained(folder, dtype=torch.float16), folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    assert {p.dtype for p in load_pretrained(folder).parameters()} == {torch.float16}


def test_tied_embeddings_are_saved_once_and_loaded_tied(tmp_path):
    save_pretrained(from_config(LlamaConfig(**TINY, tie_word_embeddings=True)), tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = load_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_iter_tensors_reads_selected_names_in_file_order(folder):
    state = load_file(folder / "model.safetensors")
    names = ["model.norm.weight", "lm_head.weight"]
    got = dict(iter_tensors(folder / "model.safetensors", names))
    assert got.keys() == set(names) and all(torch.equal(got[k], state[k]) for k in names)


# ---- peak RAM ----------------------------------------------------------------------------------

# ~75 MB of fp32 weights: big enough that a second copy dwarfs interpreter and allocator noise.
BIG = dict(vocab_size=8000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=8)

IMPORTS = """
from pathlib import Path
from peftcore.models import from_config, load_pretrained
from peftcore.models.checkpoint import read_config
from safetensors.torch import load_file
"""
LOAD = """
if sys.argv[2] == "ours":
    model = load_pretrained(sys.argv[1])
else:  # what a user would write without care: a built model plus a loaded state dict
    model = from_config(read_config(sys.argv[1]))
    model.load_state_dict(load_file(Path(sys.argv[1]) / "model.safetensors"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.slow
def test_loading_costs_about_one_copy_of_the_checkpoint(tmp_path):
    rss.save_random_llama(BIG, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 60e6 < size < 100e6
    ours, naive = (rss.start_growth(IMPORTS, LOAD, str(tmp_path), which) for which in ("ours", "naive"))
    ours_growth, naive_growth = rss.growth_bytes(ours) / size, rss.growth_bytes(naive) / size
    print(f"RSS growth / checkpoint size: load_pretrained {ours_growth:.2f}x, build + load_file {naive_growth:.2f}x")
    assert ours_growth < 1.3, (
        f"load_pretrained grew RSS by {ours_growth:.2f}x the checkpoint (naive: {naive_growth:.2f}x)"
    )


TINY_LLAMA = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
              "num_attention_heads": 2}


@pytest.mark.parametrize("config, message", [
    ({"model_type": "llama", **TINY_LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     "rope_type 'yarn' is not supported; supported: 'default', 'llama3'"),
    ({"model_type": "llama", **TINY_LLAMA, "hidden_act": "gelu"},
     r"hidden_act 'gelu' is not supported \(Llama-family models use 'silu'\)"),
    ({"model_type": "qwen2", **TINY_LLAMA, "use_sliding_window": True},
     "Qwen2 use_sliding_window=True is not supported"),
    ({"model_type": "gpt2", "vocab_size": 40, "n_embd": 18, "n_layer": 1, "n_head": 4, "n_positions": 16},
     "n_embd 18 is not divisible by n_head 4"),
    ({"model_type": "bert", "vocab_size": 40, "hidden_size": 18, "num_hidden_layers": 1, "num_attention_heads": 4,
      "intermediate_size": 24}, "hidden_size 18 is not a multiple of num_attention_heads 4"),
], ids=["rope_type", "hidden_act", "qwen2_sliding_window", "gpt2_heads", "bert_heads"])
def test_unsupported_or_inconsistent_configs_are_one_line_errors(config, message):
    with pytest.raises(ValueError, match=message):
        from_config(config)


def test_a_mask_that_does_not_cover_the_input_and_a_negative_temperature_are_errors():
    from peftcore.models import generate

    model = from_config({"model_type": "llama", **TINY_LLAMA})
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask covers 4 positions but cache \\+ input hold 5"):
        model(ids, attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1.0"):
        generate(model, ids, 2, temperature=-1.0)
