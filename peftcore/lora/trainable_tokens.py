"""`trainable_token_indices`: chosen rows of a token embedding (and of an output head tied to it) train, the
rest of the table stays frozen. The use: new special tokens for a chat format, without training, or saving,
the whole (vocab, dim) table as modules_to_save would.

HF PEFT's layout, so its files load both ways: `<embedding>.token_adapter.base_layer.weight` is the frozen table
and `<embedding>.token_adapter.trainable_tokens_delta.<adapter>` the (len(indices), dim) rows that replace
it. The rows start as copies of the table's (PEFT's init_weights=True), so a new adapter changes nothing. The
indices are not in the file: they live in adapter_config.json. A module whose weight *is* the embedding's
(an lm_head under tie_word_embeddings) gets a layer that shares the rows, as PEFT ties it: the saved file holds
them once, under the embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.lora.modules_to_save import set_submodule, walk_unwrapped
from peftcore.lora.registry import LORA_LAYERS
from peftcore.prompt.encoders import input_embeddings


class TrainableTokensLayer(nn.Module):
    """The base layer's weight with the rows of each active adapter swapped in; an nn.Embedding or nn.Linear."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.tied_to = [tied_to] if tied_to else []  # a list: the source must not become a submodule here
        source = tied_to or self
        # A tied layer shares the source's state: one set of rows, and one merge, for the one shared weight
        self.trainable_tokens_delta = tied_to.trainable_tokens_delta if tied_to else nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = source.token_indices if tied_to else {}
        self.merged_adapters: list[str] = source.merged_adapters if tied_to else []
        self.rows_before_merge: dict[str, torch.Tensor] = source.rows_before_merge if tied_to else {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add_adapter(self, name: str, indices: list[int]) -> None:
        weight = self.base_layer.weight
        check_indices(indices, weight.shape[0], name)
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(weight.detach()[list(indices)].clone())
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.token_indices and not self.tied_to:
            del self.token_indices[name], self.trainable_tokens_delta[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_params(self, name: str):
        """The rows of `name`; none for a tied layer (its source owns them: an optimizer must see them once)."""
        if name in self.token_indices and not self.tied_to:
            yield self.trainable_tokens_delta[name]

    # -- the weight -------------------------------------------------------------------------------
    def weight_with_rows(self, names: list[str]) -> torch.Tensor:
        check_disjoint(self.token_indices, list(dict.fromkeys(self.merged_adapters + names)))
        weight = self.base_layer.weight
        for name in names:  # index_copy, not in place: autograd reaches the rows, the table stays as it is
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    def check_mergeable(self, names: list[str]) -> None:
        """Refused before anything merges: rows two adapters both replace."""
        check_disjoint(self.token_indices, list(dict.fromkeys(self.merged_adapters + self.pending(names))))

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging `name` adds to the table (the Adapter Protocol's): its rows minus the table's, 0 elsewhere."""
        weight = self.base_layer.weight.detach()
        index = torch.tensor(self.token_indices[name], device=weight.device)
        rows = self.trainable_tokens_delta[name].detach().to(weight)
        return torch.zeros_like(weight).index_copy(0, index, rows - weight[index])

    def pending(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.token_indices and n not in self.merged_adapters]

    def merge(self, names: list[str]) -> None:
        """Write the rows into the table (a tied layer finds them written already: it shares merged_adapters)."""
        weight = self.base_layer.weight
        for name in self.pending(names):
            index = torch.tensor(self.token_indices[name], device=weight.device)
            rows = self.trainable_tokens_delta[name].detach().to(weight)
            self.rows_before_merge[name] = weight.detach()[index].clone()
            weight.data.index_copy_(0, index, rows)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:  # last merged first: each restores the rows it overwrote
            name = self.merged_adapters.pop()
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight.data.index_copy_(0, index, self.rows_before_merge.pop(name).to(weight))

    # -- running ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        if adapter_names is not None and not self.disable_adapters:
            return self.mixed_batch_forward(x, adapter_names)
        names = [] if self.disable_adapters or self.merged_adapters else self.live_adapters(self.active_adapters)
        return self.run(x, self.weight_with_rows(names) if names else self.base_layer.weight)

    def live_adapters(self, names) -> list[str]:
        return [n for n in names if n in self.token_indices]

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings, as PEFT's _get_embed_scale
            return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)
        return F.linear(x, weight, base.bias)

    def mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Row b with the rows of adapter_names[b] ("__base__", or an adapter without rows here: the table)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]}")
        if self.merged_adapters:
            raise ValueError("a mixed-adapter batch needs the adapters unmerged: call unmerge_adapter() first")
        outputs, order = [], []
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            names = self.live_adapters([name])
            outputs.append(self.run(x[rows], self.weight_with_rows(names) if names else self.base_layer.weight))
            order += rows
        return torch.cat(outputs)[torch.tensor(order).argsort()]


class TrainableTokensWrapper(nn.Module):
    """What takes the embedding's place: its keys read `<name>.token_adapter....`, as PEFT's wrapper's."""

    is_adapter_wrapper = True  # walk_unwrapped does not look inside: the table in here is no target of its own

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None):
        super().__init__()
        self.token_adapter = TrainableTokensLayer(base_layer, tied_to)

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (PEFT's wrapper reads through the same way), for code that reads `.weight`."""
        return self.token_adapter.base_layer.weight

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return self.token_adapter(x, adapter_names=adapter_names)


def check_indices(indices: list[int], vocab: int, name: str) -> None:
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < vocab]
    if bad or not indices:
        raise ValueError(f"trainable_token_indices of adapter {name!r}: {bad or 'none given'} "
                         f"{'are not rows of' if bad else 'for'} a table of {vocab} tokens")
    if len(set(indices)) != len(indices):
        raise ValueError(f"trainable_token_indices of adapter {name!r} repeat a token: {sorted(indices)}")


def check_disjoint(token_indices: dict[str, list[int]], names: list[str]) -> None:
    """Two adapters that both replace a row would each overwrite the other (PEFT's ValueError too)."""
    seen: dict[int, str] = {}
    for name in names:
        for i in token_indices.get(name, []):
            if i in seen:
                raise ValueError(f"adapters {seen[i]!r} and {name!r} both train token {i}: only adapters with "
                                 "disjoint trainable_token_indices can be active or merged together")
            seen[i] = name


# -- injection --------------------------------------------------------------------------------------
def token_targets(model: nn.Module, indices: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """Module name -> indices. A list means the input embedding (PEFT's rule); a dict names modules by the end
    of their full name (PEFT's `endswith` match)."""
    if isinstance(indices, dict):
        return dict(indices)
    return {input_embedding_name(model): list(indices)}


def input_embedding_name(model: nn.Module) -> str:
    """The input embedding's name, also once an earlier adapter has put a TrainableTokensWrapper there."""
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokensWrapper) and isinstance(module.base_layer, nn.Embedding) \
                and not module.token_adapter.tied_to:
            return name
    embedding = input_embeddings(model)
    return next(n for n, m in model.named_modules() if m is embedding)


def find_module(model: nn.Module, key: str) -> tuple[str, nn.Module]:
    found = [(n, m) for n, m in walk_unwrapped(model) if n == key or n.endswith(f".{key}")]
    tables = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.Linear))]
    if not found:
        raise ValueError(f"trainable_token_indices names {key!r}, which matches no module; embeddings and linear "
                         f"layers are: {', '.join(tables[:8])}{' ...' if len(tables) > 8 else ''}")
    name, module = found[0]
    if isinstance(module, LORA_LAYERS):
        raise ValueError(f"trainable_token_indices names {name!r}, which LoRA adapts already (target_modules): "
                         "train its rows or adapt it, not both")
    if not isinstance(module, (nn.Embedding, nn.Linear, TrainableTokensWrapper)):
        raise TypeError(f"trainable_token_indices names {name!r}, a {type(module).__name__}: only nn.Embedding "
                        "and nn.Linear tables have token rows")
    return name, module


def wrap_token_rows(model: nn.Module, indices, adapter_name: str, modules_to_save: list[str] | None) -> list[str]:
    """Give adapter `adapter_name` its rows in every targeted table, and in modules tied to one. -> wrapped names."""
    wrapped = []
    for key, rows in token_targets(model, indices).items():
        if key in (modules_to_save or []):
            raise ValueError(f"{key!r} is in modules_to_save (trained whole) and in trainable_token_indices (some "
                             "rows trained): pick one of the two, as in HF PEFT")
        name, module = find_module(model, key)
        if isinstance(module, TrainableTokensWrapper):  # an earlier adapter's table, or one tied to it
            source = module.token_adapter.tied_to[0] if module.token_adapter.tied_to else None
        else:
            source = rows_of_same_weight(model, module)
        if source is not None:  # tied to a table with rows already (named after it, or tied by tie_to below)
            check_same_rows(name, source, adapter_name, rows)
            if not isinstance(module, TrainableTokensWrapper):
                set_submodule(model, name, TrainableTokensWrapper(module, tied_to=source))
            continue
        wrapper = module if isinstance(module, TrainableTokensWrapper) else TrainableTokensWrapper(module)
        wrapper.token_adapter.add_adapter(adapter_name, rows)
        if wrapper is not module:
            set_submodule(model, name, wrapper)
        wrapped += [name, *tie_to(model, wrapper.token_adapter)]
    return wrapped


def rows_of_same_weight(model: nn.Module, module: nn.Module) -> TrainableTokensLayer | None:
    """The rows layer of a table holding `module`'s very weight (tie_word_embeddings), if one has rows already."""
    return next((m.token_adapter for _, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)
                 and not m.token_adapter.tied_to and m.weight is module.weight), None)


def tie_to(model: nn.Module, source: TrainableTokensLayer) -> list[str]:
    """Modules that hold the very weight of `source` (tie_word_embeddings) share its rows."""
    weight, tied = source.base_layer.weight, []
    for name, module in list(walk_unwrapped(model)):  # the wrappers' insides are not walked
        if isinstance(module, TrainableTokensWrapper) or getattr(module, "weight", None) is not weight:
            continue
        if isinstance(module, LORA_LAYERS):
            raise ValueError(f"{name!r} shares the embedding's weight (tied) and LoRA adapts it: training rows of "
                             "the embedding would change it too; leave it out of target_modules")
        set_submodule(model, name, TrainableTokensWrapper(module, tied_to=source))
        tied.append(name)
    return tied


def check_same_rows(name: str, source: TrainableTokensLayer, adapter_name: str, rows: list[int]) -> None:
    if list(rows) != source.token_indices.get(adapter_name, list(rows)):
        raise ValueError(f"{name!r} shares its weight with the embedding (tie_word_embeddings) but "
                         f"trainable_token_indices gives it rows {list(rows)} and the embedding "
                         f"{source.token_indices[adapter_name]}: tied tables need the same rows")


def token_row_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """On-disk key -> in-memory key of the rows `adapter_name` owns (a tied layer's are its source's: saved once)."""
    return {f"{name}.trainable_tokens_delta": f"{name}.trainable_tokens_delta.{adapter_name}"
            for name, m in model.named_modules()
            if isinstance(m, TrainableTokensLayer) and not m.tied_to and adapter_name in m.token_indices}
