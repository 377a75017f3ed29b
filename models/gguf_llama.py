"""llama.cpp GGUF files of Llama-family models (general.architecture llama / mistral / qwen2) as a
checkpoint of our LlamaForCausalLM: the config from the metadata, the tensors under transformers' names,
dequantized to float32, with llama.cpp's Q/K row order undone.

`checkpoint.load_gguf` (and `load_pretrained` given a .gguf path) builds and fills the model from
`open_gguf_checkpoint`; this module builds no model itself, since it would then import checkpoint, which
imports it (an import circle).
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator
from dataclasses import replace
from typing import NamedTuple

import torch

from peftcore.kernels.gguf_blocks import BlockWeight, from_gguf_bytes

from .gguf import GGUFFile
from .llama import LlamaConfig, rope_inverse_frequencies

MODEL_TYPES = ("llama", "mistral", "qwen2")  # general.architecture -> our model_type, unchanged
# convert_hf_to_gguf.py's LlamaModel.modify_tensors permutes the rows of q_proj / k_proj (weights and
# biases) into llama.cpp's RoPE layout; Qwen2Model writes HF's rows as they are. llama.cpp has no "mistral"
# architecture (MistralModel subclasses LlamaModel and writes "llama"), so a file that says "mistral" comes
# from another writer: transformers' GGUF loader reads it unpermuted (TENSOR_PROCESSORS has only "llama"),
# and so do we.
PERMUTED_QK = ("llama",)
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's RoPE scaling, written as per-frequency factors
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
LAYER_TENSORS = {  # llama.cpp's blk.N.<name> -> transformers' model.layers.N.<name> (gguf tensor_mapping.py)
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_REQUIRED = object()


class GGUFConfigError(ValueError):
    """GGUF metadata that does not describe a model LlamaForCausalLM can be."""


def hf_key(name: str) -> str | None:
    """A GGUF tensor name as transformers' state-dict key; None for a name outside the Llama family."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    match = _LAYER_NAME.fullmatch(name)
    if match and match[2] in LAYER_TENSORS:
        return f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}.{match[3]}"
    return None


def gguf_name(key: str) -> str:
    """hf_key's inverse, for error messages; a key without a GGUF name comes back unchanged."""
    by_hf = {v: k for k, v in GLOBAL_TENSORS.items()}
    match = _HF_LAYER_NAME.fullmatch(key)
    layer = {v: k for k, v in LAYER_TENSORS.items()}
    if match and match[2] in layer:
        return f"blk.{match[1]}.{layer[match[2]]}.{match[3]}"
    return by_hf.get(key, key)


def _get(metadata: dict, key: str, kind: type, default=_REQUIRED):
    if key not in metadata:
        if default is _REQUIRED:
            raise GGUFConfigError(f"GGUF metadata has no {key!r}, which a {key.split('.')[0]} model needs")
        return default
    value = metadata[key]
    if isinstance(value, list) and value and all(v == value[0] for v in value):  # per-layer, all equal
        value = value[0]
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise GGUFConfigError(f"GGUF metadata {key!r} is {value!r}; expected one {kind.__name__}"
                              + (" (per-layer values that differ are not supported)" if isinstance(value, list)
                                 else ""))
    return kind(value)


def llama_config_from_gguf(metadata: dict[str, object], tensor_names: Collection[str]) -> LlamaConfig:
    """The LlamaConfig a GGUF file's metadata (and its tensor names: bias and output tensors) describes.

    Keys as llama.cpp writes them (gguf constants.py, Keys.LLM / Keys.Attention / Keys.Rope), prefixed by
    general.architecture. Llama 3.1's rope scaling is not in the metadata but in a tensor: see
    llama3_scaling_from_factors.
    """
    arch = metadata.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise GGUFConfigError(f"general.architecture {arch!r} is not a Llama-family model peftcore loads from "
                              f"GGUF; supported: {', '.join(MODEL_TYPES)}")

    def get(key, kind=int, default=_REQUIRED):
        return _get(metadata, f"{arch}.{key}", kind, default)

    _refuse_unsupported(metadata, arch, get)
    hidden, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", default=hidden // n_head)
    if get("attention.value_length", default=head_dim) != head_dim:
        raise GGUFConfigError(f"{arch}.attention.value_length differs from key_length {head_dim}: not supported")
    if get("rope.dimension_count", default=head_dim) != head_dim:
        raise GGUFConfigError(f"{arch}.rope.dimension_count {get('rope.dimension_count')} is not the head size "
                              f"{head_dim}: partial rotary embeddings are not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", default=len(tokens) if isinstance(tokens, list) else None)
    if vocab is None:
        raise GGUFConfigError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    special = {f"{which}_token_id": _get(metadata, f"tokenizer.ggml.{which}_token_id", int, None)
               for which in ("bos", "eos")}
    pad = _get(metadata, "tokenizer.ggml.padding_token_id", int, None)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=n_head,
        num_key_value_heads=get("attention.head_count_kv", default=n_head), head_dim=head_dim,
        max_position_embeddings=get("context_length"), rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
        rope_theta=get("rope.freq_base", float, 10000.0),  # llama.cpp's default when the key is absent
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,  # llama.cpp reuses token_embd, as transformers
        pad_token_id=pad if pad is not None and 0 <= pad < vocab else None, model_type=arch, **special,
    )


def _refuse_unsupported(metadata: dict, arch: str, get) -> None:
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":  # linear / yarn / longrope: LlamaConfig knows only default and llama3 RoPE
        raise GGUFConfigError(f"{arch}.rope.scaling.type {scaling!r} is not supported (only Llama 3.1's "
                              f"scaling, which llama.cpp stores as {ROPE_FREQS})")
    if get("expert_count", default=0):  # Mixtral GGUFs are general.architecture "llama" with experts
        raise GGUFConfigError(f"{arch}.expert_count {get('expert_count')}: mixture-of-experts is not supported")


def llama3_scaling_from_factors(factors: torch.Tensor, config: LlamaConfig) -> dict | None:
    """The llama3 `rope_scaling` whose frequencies are the base ones divided by `factors` (rope_freqs).

    llama.cpp divides each RoPE frequency by its factor (ggml_rope_ext's freq_factors), and
    convert_hf_to_gguf.py writes Llama 3.1's scaling only as those factors: 1 for short wavelengths,
    `factor` for long ones, 1 / ((1 - s) / factor + s) between, s = (old_ctx / wavelength - low) / (high - low).
    (old_ctx, low, high) and (c * old_ctx, c * low, c * high) give the same factors, so old_ctx is fixed at
    Llama 3's 8192 and the line s(old_ctx / wavelength) is fitted; a fit is kept only if it reproduces every
    frequency (rtol 1e-5), else the file is refused: loading it without the factors would be silently wrong.
    """
    base = rope_inverse_frequencies(replace(config, rope_scaling=None)).double()
    factors = factors.double().flatten()
    if factors.shape != base.shape or not bool((factors >= 1).all()):
        raise GGUFConfigError(f"{ROPE_FREQS} has {factors.numel()} factors (expected {base.numel()}, all >= 1)")
    if bool((factors == 1).all()):
        return None
    factor, old = factors.max().item(), 8192.0
    between = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidates = [(1.0, 4.0)]  # Llama 3.1's own low / high, for files with too few in-between points to fit
    if int(between.sum()) >= 2:
        x = old * base[between] / (2 * math.pi)  # old_ctx / wavelength
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        slope = ((s[-1] - s[0]) / (x[-1] - x[0])).item()
        low = -(s[0].item() - slope * x[0].item()) / slope
        candidates = [(round(low, 4), round(low + 1 / slope, 4)), (low, low + 1 / slope)]
    for low, high in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": int(old)}
        got = rope_inverse_frequencies(replace(config, rope_scaling=scaling)).double()
        if torch.allclose(got, base / factors, rtol=1e-5, atol=0):
            return scaling
    raise GGUFConfigError(f"{ROPE_FREQS} holds RoPE factors that are not Llama 3.1's scaling: not supported")


def undo_qk_permutation(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute,
    `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`, which interleaves
    each head's two rotary halves for llama.cpp's adjacent-pair RoPE; transformers' GGUF loader undoes it the
    same way (_reverse_permute_weights). Rows of a weight or entries of a bias; n_head: q heads for q_proj,
    kv heads for k_proj."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFCheckpoint(NamedTuple):
    hf_config: dict  # config.json's content for the model the file describes
    # (transformers key, float32 tensor, or a BlockWeight for the keys kept as blocks), read lazily; closes the file
    tensors: Iterator[tuple[str, torch.Tensor | BlockWeight]]
    unexpected: list[str]  # GGUF tensor names that are no Llama-family tensor
    types: dict[str, int]  # transformers key -> the GGML type the file stores it in


def open_gguf_checkpoint(path, keep: Collection[str] = ()) -> GGUFCheckpoint:
    """A GGUF file as config.json + tensors, to fill a model built on the meta device one tensor at a time.
    `keep`: transformers keys to yield as the file's own blocks (quantize="keep"), not dequantized; read
    as the tensors are, so the caller may fill it after seeing `types`, before iterating."""
    file = GGUFFile(path)
    try:
        config = llama_config_from_gguf(file.metadata, file.tensors)
        if ROPE_FREQS in file.tensors:
            config = replace(config, rope_scaling=llama3_scaling_from_factors(file.tensor(ROPE_FREQS), config))
    except BaseException:
        file.close()
        raise
    unexpected = [name for name in file.tensors if name != ROPE_FREQS and hf_key(name) is None]
    types = {hf_key(name): info.ggml_type for name, info in file.tensors.items() if hf_key(name) is not None}
    return GGUFCheckpoint(config.to_hf(), _hf_tensors(file, config, keep), unexpected, types)


def _hf_tensors(file: GGUFFile, config: LlamaConfig, keep: Collection[str]) -> Iterator[tuple[str, torch.Tensor]]:
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    with file:
        for name, info in file.tensors.items():
            key = hf_key(name)
            if key is None:
                continue
            tensor = (from_gguf_bytes(file.raw(name), info.ggml_type, info.shape) if key in keep
                      else file.tensor(name))
            projection = key.split(".")[-2]
            if config.model_type in PERMUTED_QK and projection in heads:
                tensor = unpermuted(tensor, heads[projection])
            yield key, tensor


def unpermuted(tensor: torch.Tensor | BlockWeight, n_head: int) -> torch.Tensor | BlockWeight:
    """The permutation moves whole rows, and a row's blocks stay in their row: the block planes
    (N, ...) move as a dense weight does, with no dequantizing."""
    if not isinstance(tensor, BlockWeight):
        return undo_qk_permutation(tensor, n_head)
    planes = [None if t is None else undo_qk_permutation(t, n_head) for t in (tensor.qs, tensor.d, tensor.m)]
    return BlockWeight(*planes, tensor.ggml_type, tensor.shape)
