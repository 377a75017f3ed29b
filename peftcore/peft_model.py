"""PeftModel: a base model with named adapters, and the adapter lifecycle around it.

Layout and names follow HF PEFT so state dicts and files line up. LoRA: `peft_model.base_model.model`
is the user's model with LoRA layers swapped in (keys `base_model.model.<module path>...`). Prompt
methods: `peft_model.base_model` is the untouched user's model and `peft_model.prompt_encoder[name]`
makes the prompt; one PeftModel holds adapters of one kind, as in PEFT.

PeftModel owns what every kind shares (adapters by name, which ones are active, configs, files, parameter
counts); what a kind does to the model is its backend's (`AdapterBackend`: lora_backend, prompt_backend),
chosen once from the first config.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from peftcore import adapter_io, adapter_keys
from peftcore.config import PeftConfig
from peftcore.lora_backend import LoraBackend
from peftcore.prompt_backend import PromptBackend

BASE = "__base__"  # adapter_names entry for a row that runs the base model only


class AdapterBackend(Protocol):
    """What one kind of adapter does to the model; PeftModel keeps names, configs and the active adapters."""

    config_type: type[PeftConfig]
    kind: str  # for messages: "LoRA" / "prompt-learning"
    is_prompt_learning: bool

    @property
    def model(self) -> nn.Module: ...  # the user's model (with adapter layers swapped in, for LoRA)
    def add(self, name: str, config: PeftConfig, autocast_adapter_dtype: bool, loading: bool,
            low_cpu_mem_usage: bool) -> None: ...
    def activate(self, names: list[str]) -> None: ...  # `names` run and train (unless inference_mode); others frozen
    def make_trainable(self, name: str) -> None: ...  # `name` trains too, the others keep their requires_grad
    def parameters(self, name: str) -> list[nn.Parameter]: ...
    def delete(self, name: str) -> None: ...
    def is_disabled(self) -> bool: ...
    def disable_layers(self) -> None: ...
    def enable_layers(self) -> None: ...
    def disabled(self) -> ContextManager: ...
    def is_merged(self) -> bool: ...
    def merge(self, names: list[str], safe_merge: bool) -> None: ...
    def unmerge(self) -> None: ...
    def unload(self) -> nn.Module: ...
    def forward(self, args: tuple, kwargs: dict, adapter_names: list[str] | None): ...
    def generate(self, input_ids, attention_mask, adapter_names: list[str] | None, kwargs: dict) -> torch.Tensor: ...
    def save(self, folder: str | Path, name: str, save_prompt_encoder: bool, safe_serialization: bool,
             save_embedding_layers: bool | str) -> None: ...
    def load_weights(self, folder: str | Path, name: str, key_mapping: dict[str, str] | None,
                     ignore_mismatched_sizes: bool) -> None: ...


BACKENDS: tuple[type[AdapterBackend], ...] = (LoraBackend, PromptBackend)


def backend_type(config: PeftConfig) -> type[AdapterBackend]:
    for backend in BACKENDS:
        if isinstance(config, backend.config_type):
            return backend
    kinds = ", ".join(c.__name__ for b in BACKENDS for c in
                      (b.config_type if isinstance(b.config_type, tuple) else (b.config_type,)))
    raise TypeError(f"a PeftModel is made from one of {kinds} (or a subclass), not a {type(config).__name__}")


class PeftModel(nn.Module):
    """`autocast_adapter_dtype` (here, in add_adapter, from_pretrained, load_adapter), as in PEFT: LoRA weights
    on a float16 / bfloat16 base are kept in float32 (False: in the base's dtype). `low_cpu_mem_usage`
    (add_adapter, from_pretrained, load_adapter), as in PEFT: the new adapter's tensors are made on the meta
    device, without their random init, for the loaded weights to take their place."""

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, _loading: bool = False, low_cpu_mem_usage: bool = False):
        super().__init__()
        self.peft_config: dict[str, PeftConfig] = {}
        self.backend: AdapterBackend = backend_type(config)(self, model)
        self._active: list[str] = [adapter_name]
        self._active_frozen = False  # set_adapter(..., inference_mode=True): the active adapters run frozen
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype, _loading, low_cpu_mem_usage)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.backend.model

    def get_base_model(self) -> nn.Module:
        """The user's model (with the LoRA layers in it), as PEFT's get_base_model."""
        return self.backend.model

    @property
    def is_prompt_learning(self) -> bool:
        return self.backend.is_prompt_learning

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name; with several active, their list (what PEFT's LoraModel.active_adapter
        holds after set_adapter(list); PEFT's PeftModel.set_adapter takes one name only)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def __getattr__(self, name: str):
        """Attributes of the wrapped model (`config`, `new_cache`, ...) read through, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "backend"):
                raise
            return getattr(self.base_model, name)

    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True,
                    _loading: bool = False, low_cpu_mem_usage: bool = False) -> None:
        """Inject a new, inactive adapter (the first one, made in __init__, is the active one)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete_adapter() it first")
        if not isinstance(config, self.backend.config_type):
            raise TypeError(f"this PeftModel holds {self.backend.kind} adapters; "
                            f"a {type(config).__name__} needs its own PeftModel")
        config = copy.deepcopy(config)
        self.backend.add(adapter_name, config, autocast_adapter_dtype, _loading, low_cpu_mem_usage)
        self.peft_config[adapter_name] = config
        self._activate(self._active)  # as in PEFT, a new adapter waits for set_adapter() to run

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_name` (or each of a list: their LoRA terms add up) the adapter(s) that run and train;
        the others stay loaded and frozen. Merged adapters are unmerged first, with PEFT's warning.

        inference_mode=True (PEFT's argument): they run frozen (requires_grad False on what adapter_parameters
        lists; base biases a bias="all" / "lora_only" adapter trains keep theirs, as in PEFT), and stay so through
        add_adapter / delete_adapter until the next set_adapter. inference_mode=False: an adapter loaded for
        inference (is_trainable=False) stays frozen here, where PEFT's set_adapter makes it trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name")
        self.check_known(names)
        if self.backend.is_merged():
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
            self.backend.unmerge()
        self._activate(names, frozen=bool(inference_mode))

    def _activate(self, names: list[str], frozen: bool | None = None) -> None:
        """`frozen`: set_adapter's inference_mode (None: as the last set_adapter said)."""
        self.backend.activate(names)  # first: it refuses what it cannot run, before anything changes here
        self._active = list(names)
        if frozen is not None:
            self._active_frozen = frozen
        for name in names if self._active_frozen else []:
            for p in self.backend.parameters(name):
                p.requires_grad_(False)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every tensor adapter `adapter_name` trains (LoRA factors, magnitudes, modules_to_save copies, prompts)."""
        return self.backend.parameters(adapter_name)

    def step_hooks(self) -> list:
        """What the training loop runs around each optimizer step for the adapters that train (training.hooks):
        AdaLoRA's rank allocator; none for most methods."""
        hooks = getattr(self.backend, "step_hooks", None)
        return hooks() if hooks is not None else []

    def delete_adapter(self, adapter_name: str) -> None:
        """As in PEFT, the other active adapters stay active; if none is left, the first remaining one is."""
        self.check_known([adapter_name])
        self.backend.delete(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            rest = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
            if rest:
                self._activate(rest)
            else:
                self._active = []

    def check_known(self, names, allow_base: bool = False) -> None:
        unknown = sorted({n for n in names if n not in self.peft_config and not (allow_base and n == BASE)})
        if unknown:
            raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; "
                             f"loaded: {', '.join(self.peft_config)}")

    def disable_adapter(self) -> ContextManager:
        """Run the base model alone inside the block (merged adapters are unmerged first, as in PEFT)."""
        return self.backend.disabled()

    def disable_adapter_layers(self) -> None:
        """PEFT's name: the base model alone until enable_adapter_layers() (disable_adapter(), as a block)."""
        self.backend.disable_layers()

    def enable_adapter_layers(self) -> None:
        self.backend.enable_layers()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kw) -> None:
        """PEFT's add_weighted_adapter: a new adapter from a weighted combination of loaded ones."""
        from peftcore.lora.weighted import add_weighted_adapter  # deferred: only this method needs it

        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kw)

    # -- merging --------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights, in place. safe_merge, as in PEFT:
        each merged weight is computed on a copy first and a NaN / inf there is a ValueError naming the
        adapter; here no layer is merged then (PEFT leaves the layers before the broken one merged)."""
        names = adapter_names or self.active_adapters
        self.check_known(names)
        self.backend.merge(names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.backend.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold adapters (default: the active ones) into the base weights and return the plain base model.
        `progressbar` is accepted for PEFT's signature; a merge here is quick enough to show none.

        A quantized base comes back dense (dequantized, then merged); `self.merge_report` holds,
        per layer, the error re-quantizing the merged weight would add (peftcore.lora.quantized_merge)."""
        from peftcore.lora.quantized_merge import densify, requantization_report

        merged = densify(self.model)
        if adapter_names is not None or not self.backend.is_merged():
            self.merge_adapter(adapter_names, safe_merge)
        model = self.unload()
        self.merge_report = requantization_report(model, merged)
        return model

    def unload(self) -> nn.Module:
        """Return the base model with every adapter layer swapped back for what it wrapped."""
        return self.backend.unload()

    # -- running --------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward, arguments passed through as given (input_ids, attention_mask=...).

        With a prompt method, per-token outputs cover the input tokens only (HF PEFT also returns
        the virtual tokens' positions, which callers then have to cut off)."""
        return self.backend.forward(args, kwargs, adapter_names)

    def generate(self, input_ids, adapter_names=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Decode with the active adapter(s)."""
        return self.backend.generate(input_ids, attention_mask, adapter_names, kwargs)

    def new_cache(self):
        return self.model.new_cache()

    # -- parameters -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts. A quantized linear's weight counts as its out x in
        weights (its packed codes and scales are buffers), as HF PEFT counts a 4-bit weight."""
        from peftcore.models.quantized import QuantLinear

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        quantized = sum(m.out_features * m.in_features for m in self.modules() if isinstance(m, QuantLinear))
        return trainable, sum(p.numel() for p in self.parameters()) + quantized

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        save_prompt_encoder: bool = False) -> None:
        """HF PEFT's format, and its README.md model card in `folder`; PEFT's arguments, in its order.
        safe_serialization=False: adapter_model.bin (torch.save) in place of adapter_model.safetensors.
        save_embedding_layers: True / False / "auto" (adapter_keys.embedding_keys). is_main_process=False: nothing
        is written (the adapters' folders are made, as PEFT makes them on every process). `save_prompt_encoder=True`
        (prompt methods; peftcore's) also writes the encoder's own weights, so training can resume from the
        folder (PEFT keeps only the prompts it produces)."""
        if path_initial_model_for_weight_conversion is not None:
            raise NotImplementedError("path_initial_model_for_weight_conversion (PEFT's PiSSA / CorDA / OLoRA -> LoRA "
                                      "conversion at save time) is not implemented in peftcore: save without it")
        if Path(folder).is_file():
            raise ValueError(f"Provided path ({folder}) should be a directory, not a file")
        adapter_keys.check_save_embedding_layers(save_embedding_layers, self.is_prompt_learning)
        names = selected_adapters or list(self.peft_config)
        self.check_known(names)
        for name in names:
            if not is_main_process:
                adapter_io.adapter_folder(folder, name).mkdir(parents=True, exist_ok=True)
                continue
            self.backend.save(folder, name, save_prompt_encoder, bool(safe_serialization), save_embedding_layers)
        if is_main_process:
            adapter_io.write_model_card(folder, {name: self.peft_config[name] for name in names})

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder, adapter_name: str = "default", is_trainable: bool = False,
                        config: PeftConfig | None = None, autocast_adapter_dtype: bool = True,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        ignore_mismatched_sizes: bool = False) -> PeftModel:
        """PEFT's arguments: `config`, a PeftConfig used in place of the folder's adapter_config.json (a copy,
        its inference_mode set to `not is_trainable`, as PEFT sets it); `key_mapping`, {regex: replacement} for
        the file's keys (adapter_io.mapped_keys; None: the model's `_checkpoint_conversion_mapping`, if any, as
        in PEFT); `ignore_mismatched_sizes` (PEFT takes it through **kwargs): a tensor whose shape is not the
        model's is skipped with PEFT's warning, instead of an error."""
        config = adapter_io.load_config_for(folder, is_trainable, config)
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype, _loading=True,
                         low_cpu_mem_usage=low_cpu_mem_usage)
        if key_mapping is None and not peft_model.is_prompt_learning:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
        peft_model.backend.load_weights(folder, adapter_name, key_mapping, ignore_mismatched_sizes)
        return peft_model if is_trainable else peft_model.eval()  # PEFT: loaded for inference, dropout off

    def load_adapter(self, folder, adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, ignore_mismatched_sizes: bool = False) -> None:
        """Load an adapter beside the others; it does not become the active one (PEFT's behaviour), but with
        is_trainable it trains (as in PEFT), the others keeping their requires_grad. key_mapping and
        ignore_mismatched_sizes: as in from_pretrained (PEFT's load_adapter applies no default key_mapping)."""
        self.add_adapter(adapter_name, adapter_io.load_config_for(folder, is_trainable), autocast_adapter_dtype,
                         _loading=True, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            self.backend.load_weights(folder, adapter_name, key_mapping, ignore_mismatched_sizes)
        except Exception:
            self.delete_adapter(adapter_name)  # leave no half-loaded adapter behind
            raise
        if is_trainable:  # add_adapter froze it, as every adapter but the active ones
            self.backend.make_trainable(adapter_name)
        else:
            self.eval()


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> PeftModel:
    return PeftModel(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
