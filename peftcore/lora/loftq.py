"""LoftQ (Li et al. 2023, arXiv:2310.08659): LoRA factors for a layer that will run quantized, so that
Q + B A starts close to its dense weight W instead of at Q. HF PEFT 0.21.2's loftq_utils, on peftcore's quantizers:

    R = W;  T times:  Q = quant(R);  (B, A) = top-r SVD of W - dequant(Q);  R = W - B A  (not after the last)

The base weight becomes dequant(Q), so quantizing it again (quantize_base_layers, or any peftcore NF4 / int8
quantization) gives Q back bit for bit: NF4's absmax of a dequantized block is the absmax it was built from (the
largest weight maps to code +-1), and every other weight sits exactly on a code. The SVD split puts sqrt(S) on
both factors, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, as PEFT's _low_rank_decomposition.

Where this follows PEFT on purpose, and where not:
- No division by the LoRA scaling: PEFT's factors make B A (not s B A) the top-r part of the residual, so
  Q + s B A is close to W only when s = lora_alpha / r is 1 (PEFT's default r = lora_alpha = 8). PEFT issue
  huggingface/peft#1982 asks about it; we keep PEFT's factors (its files and ours hold the same A, B) and warn.
- GPT-2's Conv1D: PEFT 0.21.2 factors the stored (in, out) matrix, giving A (r, out) and B (in, r), whose forward
  fails (or, when in == out, adds the transpose). We factor and quantize the (out, in) weight, the layout
  peftcore's QuantLinear quantizes, so the round trip through quantization still reproduces Q.
- loftq_bits=8 is peftcore's int8 (per-row absmax, fp32); PEFT's bitsandbytes Int8Params rounds W to fp16 first,
  which can move a weight by one int8 step.
- The computation runs in fp32 on the weight's device (PEFT moves it to cuda / xpu).
- lora_B's bias (lora_bias=True) is zeroed: PEFT leaves nn.Linear's random bias, an offset LoftQ did not ask for.

replace_lora_weights_loftq is PEFT's QLoRA pairing: over an already-quantized base it sets A, B from one SVD of
W - dequant(Q), W read from the checkpoint's safetensors (never pickle). It works for every QuantLinear method
(nf4, int4, int8, a GGUF file's kept blocks: their own dequantize), where PEFT's takes bitsandbytes 4-bit only.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from peftcore.config import LOFTQ_BITS
from peftcore.models import checkpoint, safetensors_io
from peftcore.models.quantized import SKIP_BY_DEFAULT, QuantLinear, quantize_model

# Children of a LoRA layer (and of a modules_to_save wrapper) that are adapter weights, not base layers: PEFT's
# attribute names, which the adapter files key on.
ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                           "modules_to_save"})


# -- the algorithm -----------------------------------------------------------------------------------
def dequantized(W: torch.Tensor, method: str, group_size: int | None = None) -> torch.Tensor:
    """dequant(quant(W)) for an (out, in) weight, through QuantLinear itself: the very rounding a model
    quantized later with `method` gets. fp32, on W's device."""
    layer = QuantLinear(W.shape[1], W.shape[0], method, group_size=group_size)
    layer.load_dense_weight(W)
    return layer.dequantize(torch.float32)


def low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """residual (out, in) ~ U S V^T -> (A, B) = (sqrt(S_r) V_r^T, U_r sqrt(S_r)): (r, in), (out, r); B A is the
    residual's best rank-r approximation. Elementwise products, where PEFT multiplies by diag(sqrt S): the same
    numbers (a product with the diagonal's zeros adds exact zeros)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(S[:r])
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


def loftq_factors(W: torch.Tensor, r: int, method: str = "nf4", num_iter: int = 1,
                  group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (out, in) -> (dequant(Q) (out, in), A (r, in), B (out, r)), all fp32: PEFT's loftq_init (module docstring).
    `method`: "nf4" / "int8" (loftq_bits 4 / 8), or "int4" (groups of `group_size`; the Python API only, since
    PEFT's config has no way to say it)."""
    if num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r}: LoftQ takes at least one quantize / SVD step")
    W = W.float()
    target = W
    for step in range(num_iter):
        Q = dequantized(target, method, group_size)
        A, B = low_rank(W - Q, r)
        if step + 1 < num_iter:
            target = W - B @ A
    return Q, A, B


def relative_error(W: torch.Tensor, Q: torch.Tensor, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
                   scaling: float = 1.0) -> float:
    """||W - (Q + s B A)||_F / ||W||_F: what LoftQ minimises (without A, B: plain quantization's error)."""
    W = W.float()
    approx = Q if A is None else Q + scaling * (B.float() @ A.float())
    return (torch.linalg.matrix_norm(W - approx) / torch.linalg.matrix_norm(W)).item()


# -- init_lora_weights="loftq" on a dense base ----------------------------------------------------------
@torch.no_grad()
def init_loftq(layer, name: str, loftq_config: dict | None) -> None:
    """LoRA layer `layer`'s adapter `name` from LoftQ, and its base weight replaced by dequant(Q) in its dtype."""
    base = layer.base_layer
    if isinstance(base, QuantLinear):
        raise TypeError(f"init_lora_weights='loftq' needs the dense weight, and this base is already quantized "
                        f"({base.method}): create the adapter on the dense model and quantize afterwards "
                        "(peftcore.lora.loftq.quantize_base_layers), or keep this base and call "
                        "peftcore.lora.loftq.replace_lora_weights_loftq(peft_model, checkpoint)")
    if not loftq_config:
        raise ValueError("init_lora_weights='loftq' got no loftq_config: this layer type does not pass the "
                         "LoraConfig's loftq_config to init_adapter")
    r, (n_out, n_in) = layer.r[name], (layer.out_features, layer.in_features)
    if r > min(n_out, n_in):
        raise ValueError(f"init_lora_weights='loftq' takes the top r of a {n_out}x{n_in} weight: "
                         f"r={r} must be <= {min(n_out, n_in)}")
    warn_if_scaled(layer.scaling[name])
    W = base.weight  # (in, out) for Conv1D
    W_out_in = W.T if layer.fan_in_fan_out else W
    Q, A, B = loftq_factors(W_out_in, r, LOFTQ_BITS[loftq_config["loftq_bits"]], loftq_config["loftq_iter"])
    layer.lora_A[name].weight.copy_(A)
    layer.lora_B[name].weight.copy_(B)
    if layer.lora_B[name].bias is not None:
        nn.init.zeros_(layer.lora_B[name].bias)
    W.copy_((Q.T if layer.fan_in_fan_out else Q).to(W.dtype))


def warn_if_scaled(scaling: float) -> None:
    if scaling != 1:
        warnings.warn(f"init_lora_weights='loftq' with LoRA scaling {scaling:g} (lora_alpha / r): as in HF PEFT the "
                      "factors are not divided by it, so Q + s*B*A starts off W by (s - 1) times the low-rank part; "
                      "set lora_alpha = r (scaling 1) for LoftQ's approximation", stacklevel=3)


# -- quantizing afterwards -----------------------------------------------------------------------------
def quantize_base_layers(model: nn.Module, method: str = "nf4", group_size: int | None = None,
                         double_quant: bool = False, skip: tuple[str, ...] = SKIP_BY_DEFAULT) -> list[str]:
    """QLoRA's quantization for a model that already holds LoRA layers (the order LoftQ needs): every nn.Linear
    and GPT-2 Conv1D becomes a QuantLinear, the dense base inside each LoRA layer included, but the adapters'
    own weights, modules_to_save copies and the heads in `skip` (as models.quantized.quantize_model, which would
    take lora_A / lora_B for base linears). In place; -> the names of the layers quantized."""
    def keep_dense(name: str) -> bool:  # an adapter's own weight, or a head under its wrapper's name
        parts = name.split(".")
        logical = [p for p in parts if p not in ("base_layer", "original_module")]  # the name the model gives it
        return bool(ADAPTER_PARTS & set(parts)) or bool(logical) and logical[-1] in skip

    before = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    quantize_model(model, method, group_size, double_quant, skip=(), keep_dense=keep_dense)
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear) and name not in before]


# -- replace_lora_weights_loftq: the QLoRA pairing -----------------------------------------------------
@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path=None, adapter_name: str = "default",
                               callback=None) -> list[str]:
    """PEFT's replace_lora_weights_loftq: for every LoRA layer over a QuantLinear, A and B of `adapter_name`
    from one SVD of W - dequant(Q), W the layer's dense weight in `model_path` (a checkpoint folder, a
    .safetensors file, or a {key: tensor} state dict; None: the adapter config's base_model_name_or_path).
    `callback(peft_model, module_name) -> bool`, called after each layer: False puts the old A, B back (PEFT's
    greedy check, e.g. "do the logits get closer to the dense model's?"). -> the names of the layers replaced."""
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = quantized_lora_layers(model, adapter_name)
    source = model_path if model_path is not None else config_base_path(peft_model, adapter_name)
    kept = []
    for name, W in dense_weights(source, model, layers):
        layer = layers[name]
        A, B = low_rank(W.to(device=layer.lora_A[adapter_name].weight.device, dtype=torch.float32)
                        - layer.base_layer.dequantize(torch.float32), layer.r[adapter_name])
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (lora_A.clone(), lora_B.clone())
        lora_A.copy_(A)
        lora_B.copy_(B)
        if callback is not None and not callback(peft_model, name):
            lora_A.copy_(before[0])
            lora_B.copy_(before[1])
            continue
        kept.append(name)
    return kept


def quantized_lora_layers(model: nn.Module, adapter_name: str) -> dict:
    """name -> LoRA layer over a QuantLinear holding `adapter_name` (duck-typed: lora/layer imports this package's
    init, which imports this module)."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(getattr(m, "base_layer", None), QuantLinear) and hasattr(m, "lora_A")}
    if not found:
        raise ValueError("replace_lora_weights_loftq found no LoRA layer over a quantized base (QuantLinear): load "
                         "the base with quantize='nf4' (or int4 / int8) before get_peft_model")
    holding = {name: m for name, m in found.items() if adapter_name in m.lora_A}
    if not holding:
        names = sorted({a for m in found.values() for a in m.lora_A})
        raise ValueError(f"replace_lora_weights_loftq: no quantized LoRA layer holds adapter {adapter_name!r} "
                         f"(they hold: {', '.join(names)})")
    return holding


def config_base_path(peft_model: nn.Module, adapter_name: str) -> Path:
    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    base = getattr(config, "base_model_name_or_path", None)
    if not base or not Path(base).is_dir():
        raise ValueError(f"replace_lora_weights_loftq needs model_path, the checkpoint folder holding the dense "
                         f"weights (the adapter's base_model_name_or_path, {base!r}, is no local folder)")
    return Path(base)


def dense_weights(source, model: nn.Module, layers: dict):
    """Yield (layer name, its dense (out, in) weight) from `source`, one tensor read at a time. Every layer's key is
    looked up (checkpoint keys mapped through the model's checkpoint_key, as load_pretrained maps them) before
    anything is read, so a checkpoint of another model fails in one line naming the keys it lacks."""
    to_ours = getattr(model, "checkpoint_key", lambda key: key)
    stored = stored_keys(source)  # checkpoint key -> file (None: the state dict)
    ours = {to_ours(key): key for key in stored}
    missing = [name for name in layers if f"{name}.weight" not in ours]
    if missing:
        shown = ", ".join(f"{n}.weight" for n in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                                                  else "")
        raise ValueError(f"{describe(source)} has no dense weight for {len(missing)} of the {len(layers)} quantized "
                         f"LoRA layers: {shown} (is it the checkpoint this model was quantized from?)")
    for name, layer in layers.items():
        key = ours[f"{name}.weight"]
        tensor = source[key] if stored[key] is None else next(safetensors_io.iter_tensors(stored[key], [key]))[1]
        yield name, fit(tensor, layer.base_layer, key)


def stored_keys(source) -> dict:
    """checkpoint key -> the safetensors file holding it (None for a state dict's own keys)."""
    if isinstance(source, dict):
        return {key: None for key, value in source.items() if isinstance(value, torch.Tensor)}
    path = Path(source)
    if path.is_dir():
        files = checkpoint.checkpoint_files(path)  # model.safetensors or its index; never a pickle .bin
    elif path.suffix == ".safetensors" and path.is_file():
        files = [path]
    else:
        raise ValueError(f"replace_lora_weights_loftq reads dense weights from safetensors only (a checkpoint folder, "
                         f"a .safetensors file or a state dict): {path} is "
                         f"{'not a .safetensors file' if path.exists() else 'missing'}")
    return {key: file for file in files for key in safetensors_io.read_header(file)[0]}


def describe(source) -> str:
    return "the state dict" if isinstance(source, dict) else str(source)


def fit(tensor: torch.Tensor, base: QuantLinear, key: str) -> torch.Tensor:
    """A checkpoint tensor as the (out, in) weight `base` quantized: GPT-2's Conv1D stores (in, out)."""
    stored = (base.in_features, base.out_features) if base.conv1d_layout else (base.out_features, base.in_features)
    if tuple(tensor.shape) != stored:
        raise ValueError(f"{key} has shape {tuple(tensor.shape)} but the quantized layer holds {stored}")
    return (tensor.T if base.conv1d_layout else tensor).float()
