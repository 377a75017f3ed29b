"""A new LoRA adapter made from a weighted combination of existing ones: HF PEFT's `add_weighted_adapter`.

Three families of `combination_type`, with PEFT's (0.21.2) semantics and results:

  cat      A' = concat_i(w_i s_i A_i) (rows), B' = concat_i(B_i) (columns): B'A' = sum_i w_i s_i B_i A_i exactly;
           r' = the sum of the ranks.
  linear, ties, dare_linear, dare_ties, magnitude_prune
           the A's and the B's are merged *separately* (a rough approximation: B'A' has cross terms), each with
           sqrt(|w_i s_i|), the sign going on A only (on both it would cancel); all ranks must be equal; r' = r.
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
           the dense deltas s_i B_i A_i are merged, then truncated to rank r' (svd_rank, default the largest
           rank) by an SVD: B' = U S, A' = V^T, optionally clamped at the svd_clamp quantile.

The merges of the task tensors (weights w_i): linear = sum_i w_i t_i; magnitude_prune keeps the top `density` of
each t_i by |value| first; dare_* keep each entry with probability `density` and divide by it (torch.bernoulli, the
draws in PEFT's order and shapes: per layer, A's then B's, one draw per adapter); ties / dare_ties elect a sign per
entry (majority_sign_method "total": of the sum, "frequency": of the count) and average the entries that agree.

The new adapter's config is the first adapter's with r = lora_alpha = r' (its scaling is then 1), the union of
the target modules and no rank / alpha patterns, as in PEFT; it is added inactive, like any new adapter.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from peftcore.config import LoraConfig, PeftType
from peftcore.lora.modules_to_save import ModulesToSave
from peftcore.lora.registry import LORA_LAYERS

FACTORED_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*FACTORED_TYPES, "cat", *SVD_TYPES)
SIGN_METHODS = ("total", "frequency")


@dataclasses.dataclass(frozen=True)
class WeightedMerge:
    """How the adapters combine (add_weighted_adapter's options, checked), passed whole to the per-layer code."""

    combination_type: str
    rank: int  # r' of the new adapter
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None

    @property
    def rule(self) -> str:
        """How the task tensors merge: the type without its "_svd" ("svd" itself merges linearly)."""
        return "linear" if self.combination_type == "svd" else self.combination_type.removesuffix("_svd")


# -- merging task tensors (PEFT's merge_utils semantics) ------------------------------------------------
def magnitude_pruned(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its int(density * numel) largest-|value| entries zeroed (top-k, as PEFT, so ties break alike)."""
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.reshape(t.shape)


def randomly_pruned(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density so the expectation is t.
    torch.bernoulli looked up at call time, on a tensor shaped like t: the same draws as PEFT's from the same state."""
    mask = torch.bernoulli(torch.full_like(t, density))
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry, which task tensors carry the elected sign: that of the sum ("total") or the most frequent one
    ("frequency"); a tie elects +. Zeros agree with no sign, so they do not count in the average."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


def merge_tensors(rule: str, tensors: list[torch.Tensor], weights: torch.Tensor, merge: WeightedMerge) -> torch.Tensor:
    """One merged tensor from same-shaped task tensors; `rule` is WeightedMerge.rule."""
    if rule in ("ties", "magnitude_prune", "dare_linear", "dare_ties") and merge.density < 1:  # 1: nothing pruned
        prune = randomly_pruned if rule.startswith("dare") else magnitude_pruned
        tensors = [prune(t, merge.density) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if rule in ("ties", "dare_ties"):
        # the sign is elected on the unweighted tensors, as in PEFT (TIES-merging's paper weights none)
        agree = majority_sign_mask(stacked, merge.majority_sign_method)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)
    return weighted.sum(dim=0)


def weight_tensor(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Float32 at least (as PEFT's torch.tensor(weights)): half-precision factors then merge in float32."""
    return torch.tensor(weights, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


# -- one layer ----------------------------------------------------------------------------------------
def factors(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of adapter `name` in `layer`, or None if the layer lacks it. PEFT's names: linear-like layers (and
    conv) hold modules lora_A / lora_B (their .weight), embeddings bare parameters lora_embedding_A / _B."""
    if name in getattr(layer, "lora_A", ()):
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in getattr(layer, "lora_embedding_A", ()):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def concatenated(layer: nn.Module, sources: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """cat: the weight and scaling go into A only, so B'A' is exactly the weighted sum of the B A's."""
    pairs = [(factors(layer, name), weight, layer.scaling[name]) for name, weight in sources]
    A = torch.cat([a * weight * scaling for (a, _), weight, scaling in pairs], dim=0)  # PEFT's order of products
    return A, torch.cat([b for (_, b), _, _ in pairs], dim=1)


def factored(layer: nn.Module, sources: list[tuple[str, float]], merge: WeightedMerge):
    """linear / ties / dare / magnitude_prune on A and B separately, each with sqrt(|w s|): B'A' then carries w s
    for a single adapter. The sign goes on A alone (on both factors it would cancel in B'A')."""
    As, Bs = zip(*(factors(layer, name) for name, _ in sources))
    shapes = {tuple(a.shape) for a in As}
    if len(shapes) > 1:
        raise ValueError(f"combination_type={merge.combination_type!r} adds the adapters' A's, but in "
                         f"{type(layer).__name__} they have the shapes {sorted(shapes)}: use 'cat' or an svd type")
    scaled = [weight * layer.scaling[name] for name, weight in sources]
    roots = [math.sqrt(abs(ws)) for ws in scaled]
    weights_A = weight_tensor([root if ws >= 0 else -root for root, ws in zip(roots, scaled)], As[0])
    A = merge_tensors(merge.rule, list(As), weights_A, merge)  # A's first: DARE's random draws in PEFT's order
    B = merge_tensors(merge.rule, list(Bs), weight_tensor(roots, Bs[0]), merge)
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def svd_input(layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """The merged delta as the matrix B'A' must approximate, (out, in): delta_weight is in the base weight's
    layout, which GPT-2's Conv1D (fan_in_fan_out) and embeddings store as (in, out); a conv kernel
    (out, in, kh, kw) flattens to (out, in*kh*kw), lora_A's layout."""
    if delta.dim() > 2:
        return delta.flatten(start_dim=1)
    return delta.T if getattr(layer, "fan_in_fan_out", False) or hasattr(layer, "lora_embedding_A") else delta


def truncated_svd(matrix: torch.Tensor, merge: WeightedMerge) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = (V_r^T, U_r S_r): the best rank-r factors of `matrix` (fewer when it has fewer singular values)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=merge.svd_full_matrices, driver=merge.svd_driver)
    k = min(merge.rank, S.numel())  # PEFT slices r alone, and fails when r exceeds min(out, in) < out
    B, A = U[:, :k] @ torch.diag(S[:k]), Vh[:k, :]
    if merge.svd_clamp is not None:  # outlier entries clipped, at the quantile of both factors together
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), merge.svd_clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B


def svd_merged(layer: nn.Module, sources: list[tuple[str, float]], merge: WeightedMerge):
    """The svd types: merge the dense deltas (each s B A, from the layer's delta_weight, in the base weight's layout,
    where PEFT draws DARE's masks), then factor the result at rank r'."""
    deltas = [layer.delta_weight(name) for name, _ in sources]
    delta = merge_tensors(merge.rule, deltas, weight_tensor([w for _, w in sources], deltas[0]), merge)
    return truncated_svd(svd_input(layer, delta), merge)


def padded_to_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to `rank`: B A is unchanged. cat with rank patterns, or an SVD with fewer
    singular values than r', gives fewer (PEFT leaves zeros there too, or stores the smaller tensors)."""
    missing = rank - A.shape[0]
    if missing <= 0:
        return A, B
    A = torch.cat([A, A.new_zeros(missing, *A.shape[1:])], dim=0)
    return A, torch.cat([B, B.new_zeros(B.shape[0], missing, *B.shape[2:])], dim=1)


def combined_factors(layer: nn.Module, sources: list[tuple[str, float]], merge: WeightedMerge):
    """(A', B') for the adapters this layer holds, `sources` = [(name, weight)]; fitted_factors brings them to the
    new adapter's shapes (an SVD gives 2-D factors, and fewer than r' of them at times)."""
    if merge.combination_type == "cat":
        return concatenated(layer, sources)
    if merge.combination_type in SVD_TYPES:
        return svd_merged(layer, sources, merge)
    return factored(layer, sources, merge)


def fitted_factors(layer: nn.Module, sources: list[tuple[str, float]], merge: WeightedMerge,
                   shape_A: torch.Size, shape_B: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """combined_factors in the new adapter's shapes (r' = shape_A[0]): zero-padded to r', reshaped for conv."""
    A, B = combined_factors(layer, sources, merge)
    A, B = padded_to_rank(A.reshape(A.shape[0], *shape_A[1:]), B, shape_A[0])
    return A.reshape(shape_A), B.reshape(shape_B)


@torch.no_grad()
def fill_layer(layer: nn.Module, adapter_name: str, sources: list[tuple[str, float]], merge: WeightedMerge) -> None:
    """Write the combination into the new adapter's A and B. A layer the union of targets reaches but none of the
    adapters holds gets zeros (the weighted sum of nothing; PEFT raises there)."""
    target_A, target_B = factors(layer, adapter_name)
    present = [(name, weight) for name, weight in sources if factors(layer, name) is not None]
    if not present:
        target_A.zero_(), target_B.zero_()
        return
    A, B = fitted_factors(layer, present, merge, target_A.shape, target_B.shape)
    target_A.copy_(A)
    target_B.copy_(B)


# -- the model ----------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers in named_modules order: the order PEFT fills them in, so DARE's draws line up."""
    return [m for m in model.modules() if isinstance(m, LORA_LAYERS)]


def check_options(combination_type: str, majority_sign_method: str, svd_rank: int | None,
                  svd_clamp: float | None) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not one of {', '.join(COMBINATION_TYPES)}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is not one of {', '.join(SIGN_METHODS)}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive int (or None: the largest rank), not {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile in [0, 1] (or None: no clamping), not {svd_clamp!r}")


def check_density(combination_type: str, density: float | None) -> None:
    """The pruning types need it (PEFT fails inside torch on None); 1 keeps everything, 0 nothing."""
    if combination_type.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        if density is None or not 0 <= density <= 1:
            raise ValueError(f"combination_type={combination_type!r} prunes: give density in [0, 1] "
                             f"(the fraction of entries kept), not {density!r}")


def check_adapters(peft_model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """What add_weighted_adapter refuses before it changes anything, each with a one-line reason."""
    if peft_model.is_prompt_learning:
        raise TypeError("add_weighted_adapter combines LoRA adapters; prompt-learning adapters have no weights "
                        "to combine")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: got {len(adapters)} adapter(s) and {len(weights)} weight(s)")
    peft_model.check_known(adapters)
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} exists already; pick a new name or delete_adapter() it")
    for name in adapters:
        config = peft_model.peft_config[name]
        if not isinstance(config, LoraConfig) or config.peft_type != PeftType.LORA:  # AdaLoRA's is a LoraConfig
            raise TypeError(f"adapter {name!r} is a {type(config).__name__}: add_weighted_adapter combines LoRA "
                            "adapters' A and B factors, as in HF PEFT")
        if config.use_dora or config.lora_bias:
            option = "use_dora=True" if config.use_dora else "lora_bias=True"
            raise ValueError(f"adapter {name!r} has {option}: add_weighted_adapter combines plain LoRA A and B "
                             "factors only (DoRA magnitudes and lora_B biases have no weighted combination)")
        if config.target_parameters:  # PEFT's refusal: "cat" would stack the experts' A rows into each other
            raise ValueError(f"adapter {name!r} targets bare parameters (target_parameters): add_weighted_adapter "
                             "does not combine them, as in HF PEFT")
        if config.trainable_token_indices is not None:  # PEFT would copy the indices, and fresh rows with them
            raise ValueError(f"adapter {name!r} trains token rows (trainable_token_indices): add_weighted_adapter "
                             "combines LoRA factors only; rows replaced by several adapters have no combination")


def check_layers(peft_model: nn.Module, adapters: list[str], combination_type: str) -> None:
    """Every layer holding an adapter keeps PEFT's factor names; no module_to_save copy is trained by two of them."""
    for layer in lora_layers(peft_model.model):
        held = [n for n in adapters if n in layer.r]
        if held and factors(layer, held[0]) is None:
            raise TypeError(f"{type(layer).__name__} keeps adapter {held[0]!r} in neither lora_A/lora_B nor "
                            "lora_embedding_A/_B: add_weighted_adapter cannot combine it")
        groups = getattr(layer.base_layer, "groups", 1)
        if held and groups > 1 and combination_type not in FACTORED_TYPES:
            # a grouped lora_B reads its own block of A's rows: stacked blocks or an SVD's dense factors break that
            raise ValueError(f"combination_type={combination_type!r} cannot combine adapters on a grouped "
                             f"{type(layer.base_layer).__name__} (groups={groups}); use one of "
                             f"{', '.join(FACTORED_TYPES)}, or leave the layer out of the adapters")
    for name, module in peft_model.model.named_modules():
        if isinstance(module, ModulesToSave) and sum(n in module.modules_to_save for n in adapters) > 1:
            raise ValueError(f"{name} is a modules_to_save copy in several of {adapters}: whole trained modules "
                             "cannot be combined (as in HF PEFT); combine adapters that save it at most once")


def adapter_rank(config: LoraConfig) -> int:
    """The largest rank any layer of this adapter has (rank_pattern included): r' must leave room for it."""
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def new_rank(configs: list[LoraConfig], combination_type: str, svd_rank: int | None) -> int:
    ranks = [adapter_rank(c) for c in configs]
    if combination_type in FACTORED_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination_type!r} adds the adapters' A's and B's, so they need one "
                             f"rank; got ranks {ranks}: use 'cat' or an svd type")
        return ranks[0]
    return sum(ranks) if combination_type == "cat" else svd_rank or max(ranks)


def union_of_targets(names: list[str], configs: list[LoraConfig]) -> list[str] | str:
    """Lists: their union; regexes: one alternation of them. Both kinds mixed have no common form (PEFT refuses)."""
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise ValueError(f"adapters {names} mix a regex target_modules (a str) with lists of names; combine "
                         "adapters whose target_modules are all lists or all regexes")
    if kinds == {True}:
        return "|".join(f"({c.target_modules})" for c in configs)
    return sorted(set().union(*(c.target_modules for c in configs)))


def combined_config(names: list[str], configs: list[LoraConfig], rank: int) -> LoraConfig:
    """The first adapter's config with r = lora_alpha = r' (scaling 1), the targets' union, no patterns (PEFT's).
    A string init (PiSSA / OLoRA) becomes True: it would rewrite the base weights while injecting (PEFT's does), and
    the new weights are overwritten anyway."""
    first = configs[0]
    if first.use_rslora:
        warnings.warn(f"the combined adapter keeps use_rslora=True from {names[0]!r} with lora_alpha=r={rank}, so "
                      f"its scaling is sqrt({rank}), not 1, as in HF PEFT: its update is sqrt({rank}) times the "
                      "combination")
    init = first.init_lora_weights if isinstance(first.init_lora_weights, bool) else True
    return dataclasses.replace(first, r=rank, lora_alpha=rank, target_modules=union_of_targets(names, configs),
                               alpha_pattern={}, rank_pattern={}, init_lora_weights=init)


def add_weighted_adapter(peft_model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add adapter `adapter_name` to `peft_model` (a peftcore PeftModel of LoRA adapters), combining `adapters` with
    `weights` (negative ones subtract), as HF PEFT's LoraModel.add_weighted_adapter; see the module docstring.

    Like PEFT, one adapter always combines "linear"; unlike PEFT, an existing `adapter_name`, a weights list of
    another length and DoRA / lora_bias adapters are refused instead of ignored, and a failure leaves no adapter
    behind. The new adapter is inactive: set_adapter(adapter_name) to use it."""
    check_options(combination_type, majority_sign_method, svd_rank, svd_clamp)
    check_adapters(peft_model, adapters, weights, adapter_name)
    combination_type = "linear" if len(adapters) == 1 else combination_type  # PEFT: nothing else to combine
    check_density(combination_type, density)
    check_layers(peft_model, adapters, combination_type)
    configs = [peft_model.peft_config[name] for name in adapters]
    rank = new_rank(configs, combination_type, svd_rank)
    merge = WeightedMerge(combination_type, rank, density, majority_sign_method, svd_clamp, svd_full_matrices,
                          svd_driver)
    peft_model.add_adapter(adapter_name, combined_config(adapters, configs, rank))
    try:
        for layer in lora_layers(peft_model.model):
            if adapter_name in layer.r:
                fill_layer(layer, adapter_name, list(zip(adapters, weights)), merge)
    except BaseException:
        peft_model.delete_adapter(adapter_name)  # no half-combined adapter left behind
        raise
