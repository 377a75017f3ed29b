"""What a LoHa / LoKr adapter learned, per layer, measured on its dense update dW, straight from the adapter folder.

LoRA's report (peftcore.analysis.lowrank) never forms dW: s B A has rank r, and two QRs give its spectrum. LoHa's
and LoKr's updates are no such thin product:

    LoHa  dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r     a Hadamard product: rank(X * Y) <= rank X * rank Y, so up
                                                         to r^2 directions from two rank-r products (FedPara,
                                                         arXiv 2108.06098, Proposition 1)
    LoKr  dW = kron(w1, w2) * alpha / r                  a Kronecker product: its singular values are the products
                                                         sigma_i(w1) sigma_j(w2), so rank dW = rank w1 * rank w2

so dW is formed, as the (out, in * prod kernel) matrix the base weight flattens to, in float64, and its singular
values are computed directly: one dense SVD per layer, O(out * in * min(out, in)), 0.13-0.26 s for 576 x 1536
(SmolLM2's MLP) on one CPU core; without a base only svdvals (no singular vectors: no amplification to compute).
The formula is the layers' own, not a second copy: the saved factors go into a LoHaLayer / LoKrLayer built around
a bias-free base on the meta device (only its shape is read; no memory), and its delta_weight is what the model
adds (LoKr's Conv1d layout, CP rebuilds and all).

Per layer: ||dW||_F, sigma1, the numerical rank r(dW) above round-off (lowrank.numerical_rank's tolerance), the
most directions the method's form allows (`max rank`: LoHa min(r^2, out, in); LoKr rank-bound(w1) x
rank-bound(w2), a factor's bound being r when it is stored as a low-rank or CP product and its smaller side when
whole), effective and stable rank; with the base: ||dW|| / ||W|| and the amplification factor, as LoRA's report.
LoKr layers also list their factors' shapes and numerical ranks, whose product r(dW) equals.

Convolutions are measured as the matrix (out, in / groups * prod kernel) of the base's own weight: a LoHa / LoKr
delta is grouped as the base is (unlike LoRA's conv adapter, which reads every input channel; lowrank.py). A LoHa
conv outside the CP form, and a LoKr conv with a low-rank w2, store the kernel flattened into their factors: the
file alone gives that matrix (measured as a linear layer's), and the base, when given, shows which kernel it was.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftcore._json import json_safe
from peftcore.adapter_io import adapter_weights, read_adapter_config
from peftcore.analysis.base_weights import BaseCheckpoint
from peftcore.analysis.lowrank import (
    LowRankSVD,
    amplification_factor,
    effective_rank,
    natural_key,
    numerical_rank,
    stable_rank,
)
from peftcore.lora.inject import pattern_value
from peftcore.lycoris import LoHaLayer, LoKrLayer

FACTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\."
                        r"(?P<part>hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)$")
METHODS = {"LOHA": ("LoHa", LoHaLayer, "hada_"), "LOKR": ("LoKr", LoKrLayer, "lokr_")}  # peft_type -> ...
REPORTED = tuple(METHODS)
ADAPTER = "default"  # the name the rebuilt layer holds the saved factors under
FORMS = {"LoHa": "dW = (w1_a w1_b) * (w2_a w2_b) * alpha/r: max rank r^2 (Hadamard product of two rank-r products)",
         "LoKr": "dW = kron(w1, w2) * alpha/r: max rank = rank(w1) x rank(w2) (r for a low-rank / CP factor)"}


@dataclass
class DeltaStats:
    module: str
    method: str  # "LoHa" / "LoKr"
    rank: int  # the adapter's r
    scale: float  # alpha / r
    shape: list[int]  # dW as measured: (out, in / groups * prod kernel)
    max_rank: int  # the most directions the method's form allows (module docstring)
    max_rank_rule: str  # how max_rank comes about: "r^2", "2 x 4" (w1's bound x w2's)
    numerical_rank: int  # singular values above round-off
    delta_fro: float
    delta_spectral: float
    singular_values: list[float]  # the largest max(max_rank, numerical_rank): beyond, dW's form has none
    effective_rank: float  # exp(entropy) of the singular values above round-off (lowrank.effective_rank)
    stable_rank: float
    relative_delta: float | None = None  # ||dW||_F / ||W||_F, with the base weight
    amplification: float | None = None
    factors: dict = field(default_factory=dict)  # LoKr: w1 / w2 as matrices, their shapes and numerical ranks


def read_factors(folder: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config.json, {module: {"hada_w1_a": tensor, ...}}) of a LoHa / LoKr adapter folder (ours or HF
    PEFT's; safetensors, or an older save's .bin read weights-only), the factors as float64."""
    config = read_adapter_config(folder)
    if config.get("peft_type") not in METHODS:
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r}; this report reads LoHa and LoKr "
                         "adapters (LoRA: peftcore.analysis.lowrank)")
    name, _, prefix = METHODS[config["peft_type"]]
    factors: dict[str, dict[str, torch.Tensor]] = {}
    _, _, tensors = adapter_weights(folder)
    for key, tensor in tensors:
        match = FACTOR_KEY.match(key)
        if match and match["part"].startswith(prefix):
            factors.setdefault(match["module"], {})[match["part"]] = tensor.double()
    if not factors:
        raise ValueError(f"{folder}: no {name} factors ({prefix}*) in its weights")
    return config, factors


def delta_shape(module: str, parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The weight shape (out, in, *kernel) the saved factors rebuild to; a flattened kernel stays in `in`."""
    try:
        if "hada_w1_a" in parts:
            w1a, w1b = parts["hada_w1_a"], parts["hada_w1_b"]
            if "hada_t1" in parts:  # CP form: modes (r, out), (r, in), core (r, r, kh, kw)
                return w1a.shape[1], w1b.shape[1], *parts["hada_t1"].shape[2:]
            return w1a.shape[0], w1b.shape[1]
        a, c = parts["lokr_w1"].shape if "lokr_w1" in parts else (parts["lokr_w1_a"].shape[0],
                                                                    parts["lokr_w1_b"].shape[1])
        if "lokr_w2" in parts:
            b, d, *kernel = parts["lokr_w2"].shape
        elif "lokr_t2" in parts:  # CP: modes (r, b), (r, d), core (r, r, kh, kw)
            b, d, kernel = parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1], parts["lokr_t2"].shape[2:]
        else:
            b, d, kernel = parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1], ()
    except KeyError as e:
        raise ValueError(f"{module}: the adapter file lacks {e.args[0]}, which its other factors "
                         f"({', '.join(sorted(parts))}) need") from None
    return a * b, c * d, *kernel


def meta_base(shape: tuple[int, ...]) -> nn.Module:
    """A bias-free base layer of the weight shape (out, in, *kernel) on the meta device: shape only, no memory."""
    out_dim, in_dim, *kernel = shape
    if not kernel:
        return nn.Linear(in_dim, out_dim, bias=False, device="meta")
    conv = nn.Conv1d if len(kernel) == 1 else nn.Conv2d
    return conv(in_dim, out_dim, tuple(kernel), bias=False, device="meta")


def rebuilt_layer(peft_type: str, module: str, parts: dict[str, torch.Tensor], scale: float) -> nn.Module:
    """A LoHaLayer / LoKrLayer holding the saved factors as adapter ADAPTER: its delta_weight is the model's dW."""
    layer = METHODS[peft_type][1](meta_base(delta_shape(module, parts)))
    layer.scaling[ADAPTER] = scale
    for part, tensor in parts.items():
        getattr(layer, part)[ADAPTER] = nn.Parameter(tensor, requires_grad=False)
    return layer


def adapter_rank(module: str, parts: dict[str, torch.Tensor], config: dict) -> int:
    """r: a low-rank or CP factor's (the saved factor is the truth, rank_pattern made it), else the config's
    (a LoKr layer with both factors whole stores no r; its scale is alpha / r all the same, as PEFT's)."""
    saved = next((parts[p] for p in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b") if p in parts), None)
    if saved is not None:
        return saved.shape[0]
    return pattern_value(module, config.get("rank_pattern") or {}, config.get("r", 8))


def rank_bound(method: str, r: int, parts: dict[str, torch.Tensor], matrix: tuple[int, int],
               factors: dict) -> tuple[int, str]:
    """(the most directions dW can have, how): LoHa min(r^2, out, in); LoKr w1's bound x w2's, a factor's being
    its smaller side when whole, at most r when a low-rank or CP product."""
    if method == "LoHa":
        return min(r * r, *matrix), "r^2"
    w1 = min(factors["w1 shape"]) if "lokr_w1" in parts else min(r, *factors["w1 shape"])
    w2 = min(factors["w2 shape"]) if "lokr_w2" in parts else min(r, *factors["w2 shape"])
    return w1 * w2, f"{w1} x {w2}"


def kron_factors(layer: nn.Module) -> dict:
    """A LoKr layer's w1 and w2 (as matrices: w2's kernel flattened into its columns), shapes and ranks."""
    found = {}
    with torch.no_grad():
        for name, w in zip(("w1", "w2"), layer.factors(ADAPTER)):
            w = w.flatten(1)
            found[f"{name} shape"] = list(w.shape)
            found[f"{name} rank"] = numerical_rank(torch.linalg.svdvals(w), tuple(w.shape))
    return found


def measure(config: dict, module: str, parts: dict[str, torch.Tensor], W: torch.Tensor | None) -> DeltaStats:
    """One layer's numbers; W: its base weight (as stored, float64) or None."""
    method = METHODS[config["peft_type"]][0]
    r = adapter_rank(module, parts, config)
    scale = pattern_value(module, config.get("alpha_pattern") or {}, config.get("alpha", 8)) / r
    layer = rebuilt_layer(config["peft_type"], module, parts, scale)
    with torch.no_grad():
        delta = layer.delta_weight(ADAPTER).flatten(1)  # (out, in * prod kernel), float64
    factors = kron_factors(layer) if method == "LoKr" else {}
    bound, rule = rank_bound(method, r, parts, tuple(delta.shape), factors)
    if W is None:
        S, svd = torch.linalg.svdvals(delta), None
    else:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        svd = LowRankSVD(U, S, Vh.T)
    k = numerical_rank(S, tuple(delta.shape))
    stats = DeltaStats(module, method, r, scale, list(delta.shape), bound, rule, k, float(torch.linalg.norm(S)),
                       float(S[0]), S[:max(bound, k)].tolist(), effective_rank(S[:k]), stable_rank(S),
                       factors=factors)
    if svd is not None:
        W = W.flatten(1)  # a conv's (out, in / groups, *kernel) as the matrix dW is
        stats.relative_delta = stats.delta_fro / float(torch.linalg.norm(W))
        stats.amplification = amplification_factor(svd, W)
    return stats


def base_shape(checkpoint: BaseCheckpoint, module: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The base weight shape to look for: the rebuilt one, or the stored conv weight it flattens to (a kernel the
    factors store flattened, or a Conv1d's kernel (k,) which the CP form holds as (k, 1))."""
    key = checkpoint.find_key(module)
    if key is None:
        return shape  # locate_all names it
    stored = tuple(checkpoint.shapes[key])
    if len(stored) > 2 and stored[0] == shape[0] and math.prod(stored[1:]) == math.prod(shape[1:]):
        return stored
    return shape


def inspect_dense_adapter(folder: str | Path, base: str | Path | None = None) -> list[DeltaStats]:
    """Per adapted layer statistics of the LoHa / LoKr adapter in `folder` (base checkpoint: relative norms and
    amplification too). One dense dW (and base weight) alive at a time."""
    config, factors = read_factors(folder)
    modules = sorted(factors, key=natural_key)
    if base is None:
        return [measure(config, m, factors[m], None) for m in modules]
    checkpoint = BaseCheckpoint(base)  # headers only; raises naming any module it cannot find, before any work
    shapes = {m: base_shape(checkpoint, m, delta_shape(m, factors[m])) for m in modules}
    keys = checkpoint.locate_all(shapes, False)  # LyCORIS adapts no GPT-2 Conv1D: nothing is stored (in, out)
    return [measure(config, m, factors[m], checkpoint.read(keys[m])) for m in modules]


def format_dense_table(stats: list[DeltaStats]) -> str:
    """One row per layer; the method's form (and so its max rank) on top. r(dW) below max rank: dW uses fewer
    directions than its form allows (a factor still at zero, or trained into fewer)."""
    methods = list(dict.fromkeys(s.method for s in stats))
    head = (f"{'module':<44} {'r':>3} {'scale':>6} {'max rank':>14} {'r(dW)':>5} {'||dW||':>9} {'||dW||/||W||':>12} "
            f"{'sigma1':>9} {'eff.rank':>8} {'st.rank':>7} {'amplif.':>8}")
    rows = [FORMS[m] for m in methods] + [head, "-" * len(head)]
    for s in stats:
        rel = f"{s.relative_delta:12.3e}" if s.relative_delta is not None else f"{'-':>12}"
        amp = f"{s.amplification:8.2f}" if s.amplification is not None else f"{'-':>8}"
        bound = f"{s.max_rank} ({s.max_rank_rule})"
        rows.append(f"{s.module[-44:]:<44} {s.rank:>3} {s.scale:6.3g} {bound:>14} {s.numerical_rank:>5} "
                    f"{s.delta_fro:9.3e} {rel} {s.delta_spectral:9.3e} {s.effective_rank:8.2f} {s.stable_rank:7.2f} "
                    f"{amp}")
    return "\n".join(rows)


def write_dense_json(stats: list[DeltaStats], path: str | Path) -> Path:
    """Strict JSON (a non-finite ratio, a zero base weight's, as null)."""
    payload = {"forms": {m: FORMS[m] for m in dict.fromkeys(s.method for s in stats)},
               "layers": [asdict(s) for s in stats]}
    Path(path).write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n")
    return Path(path)
