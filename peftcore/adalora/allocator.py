"""AdaLoRA's rank allocation and orthogonality penalty (HF PEFT 0.21.2's RankAllocator and AdaLoraModel.forward).

Importance of a trained entry p: the smoothed sensitivity times its uncertainty,
    I = |p * grad|,  Ibar <- beta1 Ibar + (1 - beta1) I,  U <- beta2 U + (1 - beta2) |I - Ibar|,  s = Ibar * U
and of triplet i of a layer: s(E_i) + mean_j s(A_ij) + mean_j s(B_ji). Each allocation keeps the `budget`
highest-scoring triplets over all layers together (the threshold is the (total - budget)-th smallest score) and
zeroes E for the rest; a masked triplet may come back at a later allocation while E trains. The budget follows
PEFT's cubic schedule (see adalora.config). rank_pattern maps "<module>.lora_E" -> [kept?] * r, keyed without
the adapter name (what PEFT's saved files hold).
"""
from __future__ import annotations

import torch
from torch import nn

from peftcore.adalora.config import AdaLoraConfig
from peftcore.adalora.layer import ADALORA_LAYERS, keep_triplets


def svd_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(module name, layer) of the AdaLoRA layers holding `adapter_name`, in named_modules order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, ADALORA_LAYERS) and adapter_name in m.lora_A]


def pattern_key(module_name: str) -> str:
    return f"{module_name}.lora_E"


def budget_schedule(config: AdaLoraConfig, step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """(triplets to keep over the model, whether this step masks): init_bgt up to tinit, then a cubic fall to
    target_bgt at total_step - tfinal, masking every deltaT steps; after that target_bgt at every step."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt), step % config.deltaT == 0


def orthogonal_regularization(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """mean over A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F (PEFT's regu_loss, unweighted)."""
    return orthogonality_penalty(svd_layers(model, adapter_name), adapter_name)


def orthogonality_penalty(layers: list[tuple[str, nn.Module]], adapter_name: str) -> torch.Tensor:
    """orthogonal_regularization over the (name, layer) pairs svd_layers found (the allocator keeps them)."""
    total, count = torch.zeros(()), 0
    for _, layer in layers:
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        for cov in (A @ A.T, B.T @ B):  # (r, r) each
            term = torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro")
            total = total + term if count else term  # PEFT's running `regu_loss +=`: its rounding, bit for bit
            count += 1
    return total / count if count else total


class RankAllocator:
    """The importance EMAs of one trainable adapter and the masks they decide; `update_and_allocate(step)` after
    each optimizer step (gradients still in .grad), as PEFT's AdaLoraModel.update_and_allocate."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.model, self.config, self.adapter_name = model, config, adapter_name
        # found once: every step reads them (a walk over named_modules per step would repeat this)
        self.layers = svd_layers(model, adapter_name)
        if not self.layers:
            raise ValueError(f"the model holds no AdaLoRA layer of adapter {adapter_name!r}")
        ranks = {name: layer_rank(layer, adapter_name) for name, layer in self.layers}
        pruned = next(((name, r) for name, r in ranks.items() if r != config.init_r), None)
        if pruned:  # PEFT sizes its allocator before the file shrinks the layers, then masks every triplet
            raise ValueError(f"adapter {adapter_name!r} was pruned by an earlier AdaLoRA run ({pruned[0]} has "
                             f"rank {pruned[1]}, not init_r={config.init_r}): its rank schedule has run; load "
                             "it with is_trainable=False, or train a new AdaLoRA adapter")
        self.init_bgt = sum(ranks.values())
        self.target_bgt = config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def named_parts(self):
        """("<module>.lora_A", A), ... for every trained matrix of the adapter."""
        for module_name, layer in self.layers:
            for part in ("lora_A", "lora_B", "lora_E"):
                yield f"{module_name}.{part}", getattr(layer, part)[self.adapter_name]

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self.named_parts():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)  # an unused layer: no importance
            ipt = (p * grad).abs()
            avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
            self.exp_avg_ipt[key] = b1 * avg + (1 - b1) * ipt
            self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{"<module>.lora_E": (r,) scores}: E's own plus the mean over A's row and B's column of each triplet."""
        out = {}
        for module_name, _ in self.layers:
            a = self.score(f"{module_name}.lora_A").mean(dim=1)  # (r,)
            b = self.score(f"{module_name}.lora_B").mean(dim=0)  # (r,)
            out[pattern_key(module_name)] = self.score(f"{module_name}.lora_E").view(-1) + (a + b)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E where a triplet scores at or below the (init_bgt - budget)-th smallest score. -> rank_pattern."""
        scores = self.triplet_scores()
        if self.init_bgt - budget <= 0:  # target_r == init_r: nothing to prune (kthvalue needs k >= 1)
            return {key: [True] * len(s) for key, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_bgt - budget)[0].item()
        pattern = {key: (~(s <= threshold)).tolist() for key, s in scores.items()}  # PEFT: NaN kept
        self.apply_pattern(pattern)
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for module_name, layer in self.layers:
            E = layer.lora_E[self.adapter_name]
            keep = torch.tensor(pattern[pattern_key(module_name)], device=E.device).view(-1, 1)
            E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, step: int) -> dict | None:
        """One step of the schedule (0-based `step`). -> {"budget", "rank_pattern"} when it masked, else None;
        the final pattern (at total_step - tfinal) is written into config.rank_pattern and kept from then on."""
        config, final = self.config, self.config.total_step - self.config.tfinal
        if step > final:
            self.apply_pattern(config.rank_pattern)
            return None
        if step < final:
            self.update_ipt()
        budget, mask = budget_schedule(config, step, self.init_bgt, self.target_bgt)
        if not (mask or step == final):
            return None
        config.rank_pattern = self.mask_to_budget(budget)
        if step == final:
            self.reset_ipt()
        return {"budget": budget, "rank_pattern": config.rank_pattern}

    # -- the training loop's step hook (training.hooks.StepHook) ----------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        """orth_reg_weight * the orthogonality penalty, added once per optimizer step (PEFT adds it to each
        forward's loss; a gradient-accumulating trainer averages those, which is the same)."""
        if self.config.orth_reg_weight == 0:
            return None
        return self.config.orth_reg_weight * orthogonality_penalty(self.layers, self.adapter_name)

    def after_step(self, step: int) -> dict:
        """update_and_allocate after the optimizer step. -> metrics for the step's record: the budget, and the
        ranks per layer whenever a mask was set."""
        allocated = self.update_and_allocate(step)
        if allocated is None:
            return {}
        return {"adalora_budget": allocated["budget"], "adalora_ranks": ranks(allocated["rank_pattern"])}

    def state_dict(self) -> dict:
        """The EMAs, for a resumed run to allocate as the uninterrupted one would."""
        return {"exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc),
                "rank_pattern": self.config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        self.config.rank_pattern = state["rank_pattern"]


def ranks(pattern: dict[str, list[bool]]) -> dict[str, int]:
    """{module name: triplets kept} of a rank_pattern."""
    return {key.removesuffix(".lora_E"): sum(map(bool, kept)) for key, kept in pattern.items()}


def layer_rank(layer: nn.Module, adapter_name: str) -> int:
    return layer.lora_A[adapter_name].shape[0]


def resize_layers(model: nn.Module, pattern: dict[str, list[bool]], adapter_name: str) -> None:
    """Shrink each layer to the triplets `pattern` keeps (PEFT's resize_modules_by_rank_pattern: before a pruned
    file loads). Keys may carry the adapter name (`...lora_E.default`) or not."""
    layers = dict(svd_layers(model, adapter_name))
    for key, kept in pattern.items():
        module_name = key.removesuffix(f".{adapter_name}").removesuffix(".lora_E")
        if module_name not in layers:
            raise ValueError(f"rank_pattern names {key!r}, but the model has no AdaLoRA layer {module_name!r} for "
                             f"adapter {adapter_name!r}; layers: {', '.join(list(layers)[:5])}...")
        layer, rank = layers[module_name], layer_rank(layers[module_name], adapter_name)
        if rank == sum(map(bool, kept)):
            continue  # resized already (a file loaded before), or nothing was pruned
        if len(kept) != rank:
            raise ValueError(f"rank_pattern[{key!r}] has {len(kept)} entries for a layer of rank "
                             f"{rank} (init_r)")
        keep_triplets(layer, adapter_name, torch.tensor(kept, dtype=torch.bool))


def resized_tensors(tensors: dict[str, torch.Tensor], pattern: dict[str, list[bool]],
                    prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """The on-disk tensors with only the kept triplets (PEFT's resize_state_dict_by_rank_pattern)."""
    out = dict(tensors)
    for key, kept in pattern.items():
        module = prefix + key.removesuffix(".lora_E")
        keep = torch.tensor(kept, dtype=torch.bool)
        for part, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
            name = f"{module}.{part}"
            if name in out and out[name].shape[dim] != int(keep.sum()):
                out[name] = out[name].index_select(dim, keep.nonzero().view(-1).to(out[name].device))
    return out


def resize_for_load(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
    """Before a file loads: a file written after pruning holds only the kept triplets (config.rank_pattern)."""
    if config.rank_pattern:
        resize_layers(model, config.rank_pattern, adapter_name)


def resized_for_file(tensors: dict[str, torch.Tensor], config: AdaLoraConfig) -> dict[str, torch.Tensor]:
    """What a file holds: only the triplets config.rank_pattern keeps (all of them before the first mask)."""
    if not config.rank_pattern:
        return tensors
    prefix = "base_model.model." if any(k.startswith("base_model.model.") for k in tensors) else ""
    return resized_tensors(tensors, config.rank_pattern, prefix)


def check_one_trainable(configs: dict, adapter_name: str, config: AdaLoraConfig) -> None:
    """PEFT's AdaLoraModel: one rank allocator, so one AdaLoRA adapter trains; the others load for inference."""
    trainable = [n for n, c in configs.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
    if trainable and not config.inference_mode:
        raise ValueError(f"AdaLoRA trains one adapter at a time and {trainable[0]!r} trains already: add "
                         f"{adapter_name!r} with inference_mode=True (or load it with is_trainable=False), as HF PEFT")
