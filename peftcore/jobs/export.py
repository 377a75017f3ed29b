"""`peftcore export --format gguf`: a LoRA adapter folder as a llama.cpp LoRA-adapter GGUF, the file
`llama-cli -m BASE.gguf --lora ADAPTER.gguf` (or llama_cpp.Llama(lora_path=...)) applies to its base.

The layout is llama.cpp's own (convert_lora_to_gguf.py writes it, src/llama-adapter.cpp reads it):
  metadata   general.type "adapter", general.architecture (the base's: llama.cpp refuses a mismatch),
             adapter.type "lora", adapter.lora.alpha (float32: read with gguf_get_val_f32)
  tensors    blk.N.<name>.weight.lora_a / .lora_b per adapted weight (attn_q, ffn_down, ...), with
             lora_a ne = [in, r] and lora_b ne = [r, out]: llama_adapter_lora_init checks
             model ne[0] == a.ne[0], model ne[1] == b.ne[1], a.ne[1] == b.ne[0]. In torch order that is
             PEFT's own lora_A (r, in) and lora_B (out, r), written as they are.
  scale      llama.cpp adds scale * B (A x) with scale = adapter.lora.alpha / rank, rank = b.ne[0] per pair
             (llama_adapter_lora_weight::get_scale): one alpha for the file, ranks per pair, so a rank_pattern
             is fine; an alpha_pattern or use_rslora (alpha / sqrt r) is folded into that pair's lora_b.
  AdaLoRA    its B diag(E) A * scaling / ranknum is a pair too: lora_a = A * E (E folded into A's rows), the
             scale folded into lora_b as above; triplets the schedule pruned are not in the file, and a layer
             pruned to rank 0 adds nothing, so it is left out (llama.cpp has no rank-0 pair).
  q / k      convert_hf_to_gguf.py permutes the rows of a llama base's q_proj / k_proj for llama.cpp's RoPE
             (LlamaModel.permute; convert_lora_to_gguf.py sends lora_B through the same permute, lora_A is
             untouched), so lora_B of those gets the same row permutation here.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from peftcore.adalora.layer import RANKNUM_EPS, svd_scaling
from peftcore.adapter_io import adapter_weights, load_config
from peftcore.config import CONFIG_NAME, LoraConfig, PeftType
from peftcore.jobs.bases import TaskError, canonical_base, resolve_base
from peftcore.lora.inject import pattern_value
from peftcore.lora.layer import lora_scaling
from peftcore.models import checkpoint
from peftcore.models.gguf import FLOAT32, UINT32, GGUFFile
from peftcore.models.gguf_llama import PERMUTED_QK, GGUFConfigError, gguf_name, llama_config_from_gguf
from peftcore.models.gguf_writer import Typed, write_gguf
from peftcore.models.llama import LlamaConfig
from peftcore.multitask.model import HEADS_CONFIG

log = logging.getLogger(__name__)

FORMATS = ("gguf",)
OUTTYPES = {"f32": (torch.float32, 0), "f16": (torch.float16, 1)}  # -> dtype, general.file_type (LlamaFileType)
HF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # config.json model_type -> GGUF's
PREFIX = "base_model.model."  # PEFT's on-disk prefix of every adapter key
# LoRA's lora_A / lora_B are nn.Linears (`.weight`); AdaLoRA's lora_A / lora_B / lora_E are bare parameters
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB]\.weight|[ABE])")
_BASE_TABLE = ".base_layer.weight"  # the base table PEFT saves beside a targeted lm_head / embed_tokens


class ExportBase:
    """What the export needs of the base: its GGUF architecture, head counts (q / k permutation) and the
    shape (out, in) of every 2-D tensor under its GGUF name."""

    def __init__(self, arch: str, config: LlamaConfig, shapes: dict[str, tuple[int, ...]]):
        self.arch, self.shapes = arch, shapes
        self.heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        self.permuted = arch in PERMUTED_QK


def run_export(adapter: Path, output: Path, fmt: str = "gguf", base: str | None = None,
               outtype: str = "f32") -> Path:
    """Write the LoRA adapter in `adapter` (its base: `base`, else the recorded one) as a llama.cpp
    LoRA-adapter GGUF at `output`. -> output."""
    if fmt not in FORMATS:
        raise TaskError(f"--format {fmt!r}: choose {', '.join(FORMATS)}")
    if outtype not in OUTTYPES:
        raise TaskError(f"--outtype {outtype!r}: choose {', '.join(OUTTYPES)}")
    adapter, output = Path(adapter), Path(output)
    config = exportable_config(adapter)
    base_name = base or config.base_model_name_or_path
    if not base_name:
        raise TaskError(f"{adapter}/{CONFIG_NAME} names no base_model_name_or_path; pass --base PATH")
    target = read_base(resolve_base(canonical_base(base_name)))
    pairs = lora_pairs(adapter)
    if (adapter / HEADS_CONFIG).is_file():  # they sit on the hidden states, which a llama.cpp LoRA cannot add
        log.warning(f"{adapter} is multi-task: its shared LoRA is exported, its task heads ({HEADS_CONFIG}) are not")
    pairs = without_empty_pairs(pairs)
    tensors, folded = gguf_tensors(pairs, config, target, OUTTYPES[outtype][0])
    metadata = {"general.type": "adapter", "general.architecture": target.arch, "general.name": adapter.name,
                "general.file_type": Typed(UINT32, OUTTYPES[outtype][1]), "adapter.type": "lora",
                "adapter.lora.alpha": Typed(FLOAT32, file_alpha(config))}
    output.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(output, metadata, tensors)
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    log.info(f"exported {len(pairs)} LoRA pairs of {adapter} (rank {'/'.join(map(str, ranks))}, alpha "
             f"{file_alpha(config):g}, {outtype}) for the {target.arch} base {base_name} -> {output}")
    if folded:
        log.info(f"folded the per-module scale of {folded} pairs into their lora_b (alpha_pattern / use_rslora / "
                 "AdaLoRA's ranknum: llama.cpp scales every pair by adapter.lora.alpha / rank)")
    log.info(f"use: llama-cli -m <the base .gguf> --lora {output}")
    return output


def exportable_config(adapter: Path) -> LoraConfig:
    """The adapter's LoraConfig, refusing what a llama.cpp LoRA pair (scale * B A, nothing else) cannot carry."""
    if not (adapter / CONFIG_NAME).is_file():
        raise TaskError(f"--adapter {adapter}: no {CONFIG_NAME} there (point at the adapter folder, "
                        "e.g. runs/<timestamp>/adapter)")
    config = load_config(adapter)
    if not isinstance(config, LoraConfig):  # AdaLoRA's is a LoraConfig too, and its update a B A pair
        what = ("prompt learning adds virtual tokens, not weight deltas" if config.peft_type.value.endswith("TUNING")
                else "its update is no B A pair (merge it into the base with `peftcore merge` instead)")
        raise TaskError(f"{adapter} holds a {config.peft_type.value} adapter: {what}, and a llama.cpp LoRA file "
                        "holds only lora_a / lora_b pairs")
    refused = [(config.use_dora, "use_dora (DoRA's magnitude vector rescales the merged weight; llama.cpp "
                                 "adds B A only: merge it with `peftcore merge` instead)"),
               (config.lora_bias, "lora_bias (a bias on lora_B; llama.cpp's LoRA pairs have none)"),
               (config.bias != "none", f"bias={config.bias!r} (trained base biases; a LoRA file cannot carry them)"),
               (bool(config.modules_to_save), f"modules_to_save={config.modules_to_save} (whole module copies; "
                                              "a LoRA file cannot carry them)"),
               (config.trainable_token_indices is not None, "trainable_token_indices (replaced embedding rows; "
                                                            "llama.cpp's LoRA pairs cannot carry them)"),
               (bool(config.target_parameters), f"target_parameters={config.target_parameters} (LoRA on bare "
                                                "parameters, which llama.cpp's LoRA loader does not map)")]
    for on, what in refused:
        if on:
            raise TaskError(f"{adapter} cannot be a llama.cpp LoRA adapter: it sets {what}")
    return config


def read_base(path: Path) -> ExportBase:
    """A .gguf base as llama.cpp sees it (its own tensor table), or a checkpoint folder as llama.cpp's
    convert_hf_to_gguf.py would write it (shapes from the model built on the meta device)."""
    if path.is_file():
        try:
            with GGUFFile(path) as file:
                config = llama_config_from_gguf(file.metadata, file.tensors)
                shapes = {name: info.shape for name, info in file.tensors.items() if len(info.shape) == 2}
        except GGUFConfigError as e:
            raise TaskError(f"base {path}: {e}") from None
        return ExportBase(config.model_type, config, shapes)
    hf = checkpoint.read_config(path)
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise TaskError(f"base {path} is model_type {model_type!r}; GGUF export supports the Llama family "
                        f"({', '.join(HF_ARCHITECTURES)})")
    model = checkpoint.build_on_meta(hf)  # named_parameters lists a tied lm_head once, as embed_tokens:
    shapes = {gguf_name(key): tuple(p.shape) for key, p in model.named_parameters() if p.dim() == 2}
    return ExportBase(HF_ARCHITECTURES[model_type], model.config, shapes)  # llama.cpp writes no output.weight


def lora_pairs(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name (no PEFT prefix) -> (lora_A (r, in), lora_B (out, r)), float32 (AdaLoRA: A * E); any other
    tensor refused."""
    path, _, tensors = adapter_weights(adapter)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors:
        name = key.removeprefix(PREFIX)
        match = _LORA_KEY.fullmatch(name)
        if match:
            parts.setdefault(match["module"], {})[match["which"][0]] = tensor.float()
        elif not name.endswith(_BASE_TABLE):  # a base table: llama.cpp reads it from the base (as its converter)
            raise TaskError(f"{path.name} holds {key}, which is no lora_A / lora_B weight (embedding LoRA, "
                            "DoRA magnitudes, biases): a llama.cpp LoRA file holds only lora_a / lora_b pairs")
    for ab in parts.values():
        if "E" in ab:  # AdaLoRA: E (r, 1) scales A's rows
            ab["A"] = ab["A"] * ab.pop("E")
    incomplete = sorted(module for module, ab in parts.items() if len(ab) != 2)
    if incomplete:
        raise TaskError(f"{path.name}: {incomplete[0]} has only one of lora_A / lora_B")
    if not parts:
        raise TaskError(f"{path.name} holds no LoRA pairs")
    return {module: (ab["A"], ab["B"]) for module, ab in parts.items()}


def without_empty_pairs(pairs: dict) -> dict:
    """AdaLoRA can prune a layer to rank 0: it adds nothing, and llama.cpp has no rank-0 pair."""
    empty = sorted(module for module, (a, _) in pairs.items() if a.shape[0] == 0)
    if empty:
        log.info(f"left out {len(empty)} pair(s) of rank 0 (pruned by AdaLoRA; they add nothing): {empty[0]}, ...")
    kept = {module: ab for module, ab in pairs.items() if ab[0].shape[0] > 0}
    if not kept:
        raise TaskError("every pair has rank 0: the adapter adds nothing to export")
    return kept


def file_alpha(config: LoraConfig) -> float:
    """adapter.lora.alpha: LoRA's lora_alpha; AdaLoRA's too, or init_r where it is <= 0 (its scaling then)."""
    if config.peft_type == PeftType.ADALORA:
        return svd_scaling(config.lora_alpha, config.init_r)
    return float(config.lora_alpha)


def pair_scale(config: LoraConfig, module: str, rank: int) -> float:
    """What the adapter multiplies this pair's B A by: LoRA's alpha (per module) / r (or sqrt r); AdaLoRA's
    scaling / (ranknum + eps), ranknum staying init_r however many triplets the file kept."""
    if config.peft_type == PeftType.ADALORA:
        return file_alpha(config) / (config.init_r + RANKNUM_EPS)
    return lora_scaling(rank, pattern_value(module, config.alpha_pattern, config.lora_alpha), config.use_rslora)


def gguf_tensors(pairs: dict, config: LoraConfig, base: ExportBase,
                 dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """-> ({blk.N.<name>.weight.lora_a / .lora_b: tensor}, how many pairs had a scale folded into lora_b)."""
    tensors, folded = {}, 0
    for module in sorted(pairs, key=_layer_order):
        a, b = pairs[module]
        name = base_tensor(module, a, b, base)
        rank = a.shape[0]
        factor = pair_scale(config, module, rank) / (file_alpha(config) / rank)  # ours / llama.cpp's alpha / r
        if factor != 1.0:
            b, folded = b * factor, folded + 1
        kind = name.split(".")[-2]
        if base.permuted and kind in base.heads:
            b = qk_permuted(b, base.heads[kind])
        for suffix, tensor in (("lora_a", a), ("lora_b", b)):
            tensors[f"{name}.{suffix}"] = converted(tensor.to(dtype), f"{name}.{suffix}")
    return tensors, folded


def base_tensor(module: str, a: torch.Tensor, b: torch.Tensor, base: ExportBase) -> str:
    """The GGUF name of the base weight `module` adapts, checked to exist with the shape A and B fit."""
    name = gguf_name(f"{module}.weight")
    if name not in base.shapes:
        mapped = "attn_q/k/v, attn_output, ffn_gate/up/down" + (", output" if "output.weight" in base.shapes else "")
        raise TaskError(f"the adapter targets {module}, which has no weight in the llama.cpp base "
                        f"(LoRA exports to {mapped}; a tied lm_head has no output.weight)")
    out_features, in_features = base.shapes[name]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features \
            or a.shape[0] != b.shape[1]:
        raise TaskError(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base's {name} "
                        f"({out_features}, {in_features}): another base model?")
    return name


def qk_permuted(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute of q / k rows, `w.reshape(n_head, 2, rows // n_head // 2,
    *rest).swapaxes(1, 2).reshape(w.shape)`: the inverse of gguf_llama.undo_qk_permutation."""
    if w.shape[0] % (2 * n_head):
        raise TaskError(f"{w.shape[0]} rows do not split into {n_head} heads of rotary pairs")
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def converted(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()):
        raise TaskError(f"{name} has non-finite values in {tensor.dtype} (f16 overflows past 65504: use --outtype f32)")
    return tensor.contiguous()


def _layer_order(module: str) -> tuple[int, str]:
    found = re.search(r"\.layers\.(\d+)\.", module)
    return (int(found[1]) if found else -1, module)
