"""The base weights `peftcore.analysis.lowrank` compares an adapter with, found by name and read one at a time.

Adapter files name modules as the model class that trained them saw them ("transformer.h.0.attn.c_attn"),
while a checkpoint may lay keys out otherwise: the Hub's GPT-2 has no "transformer." prefix (the loader
adds it, models/gpt2.py `checkpoint_key`), a BERT saved from a task model adds "bert.", and a tied
lm_head has no key at all (its weight is the input embedding). So a module's key is resolved from its
name with and without such a prefix, then from the tied embedding, and checked against the adapter's
shape before a byte is read.

Conv adapters: the base weight must have the conv shape (out, in / groups, *kernel) the adapter implies, as
stored (a conv weight is never transposed).

Orientation: GPT-2's Conv1D stores (in, out). The shape tells for all but square weights; for those the
adapter's `fan_in_fan_out` flag cannot be trusted (HF PEFT clears it in the saved config when one target
is a plain Linear, e.g. lm_head, and decides per layer type), so the model the base's config.json
describes is built on the meta device (no memory) and asked which modules are Conv1D.

Memory: only headers are read up front; each weight is read when its layer is measured and dropped
after, so a 7B all-linear adapter costs one layer's weight (plus one fp64 copy of it), not 26 GB.
The reader is peftcore.models.safetensors_io (one tensor straight into its own storage) rather than
safe_open, whose memory map charges every touched page to the process for as long as it stays open.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from peftcore.adapter_keys import TOKEN_EMBEDDING_NAMES
from peftcore.models import safetensors_io

PREFIXES = ("transformer.", "model.", "bert.")  # what our model classes put before a checkpoint's own names
TIED_OUTPUTS = ("lm_head",)  # output projections HF ties to the input embedding (tie_word_embeddings)


@dataclass
class BaseKey:
    file: Path
    key: str
    transpose: bool  # stored (in, out): GPT-2's Conv1D, i.e. fan_in_fan_out


class BaseCheckpoint:
    """Headers of a base checkpoint folder (single file or sharded): key -> (file, shape); no tensor data."""

    def __init__(self, folder: str | Path):
        from peftcore.models.checkpoint import checkpoint_files

        self.folder = Path(folder)
        self.shapes: dict[str, list[int]] = {}
        self.files: dict[str, Path] = {}
        self.conv1d: set[str] | None | bool = False  # False: not looked up yet (only square weights need it)
        if self.folder.suffix.lower() == ".gguf":
            self.read_gguf_infos()
            return
        for file in checkpoint_files(self.folder):
            header, _ = safetensors_io.read_header(file)
            for key, info in header.items():
                self.shapes[key], self.files[key] = info["shape"], file
        self.tied = tie_word_embeddings(self.folder)

    def read_gguf_infos(self) -> None:
        """A llama.cpp file: its tensor table under transformers' keys; no Conv1D, tied without output.weight."""
        from peftcore.models.gguf import GGUFFile
        from peftcore.models.gguf_llama import hf_key, llama_config_from_gguf

        # kept open: opening parses the whole metadata (SmolLM2: 0.12 s, its 49k-token vocabulary), and
        # inspect reads one layer at a time; the mapping costs no memory until a tensor is read
        self.gguf = GGUFFile(self.folder)
        for name, info in self.gguf.tensors.items():
            if (key := hf_key(name)) is not None:
                self.shapes[key], self.files[key] = list(info.shape), self.folder
        self.gguf_config = llama_config_from_gguf(self.gguf.metadata, self.gguf.tensors)
        self.tied, self.conv1d = self.gguf_config.tie_word_embeddings, None

    def candidates(self, module: str) -> list[str]:
        """The keys the module's weight may be stored under, most literal first."""
        names = [module]
        names += [module.removeprefix(p) for p in PREFIXES if module.startswith(p)]
        names += [p + module for p in PREFIXES if not module.startswith(p)]
        return [f"{n}.weight" for n in names]

    def tied_embedding(self, module: str) -> list[str]:
        """A tied lm_head's weight is the input embedding: the keys that may hold it."""
        if not self.tied or module.rpartition(".")[2] not in TIED_OUTPUTS:
            return []
        return [k for k in self.shapes if k.removesuffix(".weight").rpartition(".")[2] in TOKEN_EMBEDDING_NAMES]

    def find_key(self, module: str) -> str | None:
        return next((k for k in self.candidates(module) + self.tied_embedding(module) if k in self.shapes), None)

    def orientation(self, module: str, key: str, expected: tuple[int, ...], fan_in_fan_out: bool) -> bool:
        """True when the stored weight is (in, out). `expected`: (out, in), or a conv's full weight shape. A key
        of another shape is an error: the base is another model than the adapter's."""
        shape = list(self.shapes[key])
        if len(expected) > 2:
            if shape != list(expected):
                raise ValueError(f"base weight {key} has shape {tuple(shape)}, but the adapter's {module} is a conv "
                                 f"adapter for a {tuple(expected)} weight: the base is not the adapter's model")
            return False
        out_features, in_features = expected
        if shape == [out_features, in_features] == [in_features, out_features]:  # square: ask the model
            conv1d = self.conv1d_modules()
            return fan_in_fan_out if conv1d is None else unprefixed(module) in conv1d
        if shape in ([out_features, in_features], [in_features, out_features]):
            return shape == [in_features, out_features]
        raise ValueError(f"base weight {key} has shape {tuple(shape)}, but the adapter's {module} is "
                         f"{out_features} x {in_features} (out x in): the base is not the adapter's model")

    def conv1d_modules(self) -> set[str] | None:
        """Names (prefix stripped) of the Conv1D modules of the model config.json describes; None when
        peftcore cannot build that model (then the adapter's fan_in_fan_out flag decides)."""
        if self.conv1d is False:
            from peftcore.models.checkpoint import build_on_meta, read_config
            from peftcore.models.layers import Conv1D

            try:
                model = build_on_meta(read_config(self.folder))
                self.conv1d = {unprefixed(n) for n, m in model.named_modules() if isinstance(m, Conv1D)}
            except (OSError, ValueError, TypeError, KeyError):  # no / unsupported config.json: a model we do not know
                self.conv1d = None
        return self.conv1d

    def locate_all(self, shapes: dict[str, tuple[int, ...]], fan_in_fan_out: bool) -> dict[str, BaseKey]:
        """{module: where its weight is} for every module in `shapes` ({module: (out, in)}, or a conv weight's
        shape). One line names the modules not found (checked first: a wrong base is likelier than a wrong shape)."""
        keys = {m: self.find_key(m) for m in shapes}
        missing = [m for m, key in keys.items() if key is None]
        if missing:
            raise ValueError(f"base {self.folder} has no weight for {len(missing)} of {len(shapes)} adapted module(s) "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                             f"its keys look like: {', '.join(self.near(missing[0]))}")
        return {m: BaseKey(self.files[key], key, self.orientation(m, key, shapes[m], fan_in_fan_out))
                for m, key in keys.items()}

    def near(self, module: str, n: int = 3) -> list[str]:
        """Checkpoint keys resembling the module's: what the user sees to tell a wrong base from a new layout."""
        close = difflib.get_close_matches(f"{module}.weight", list(self.shapes), n=n, cutoff=0.3)
        return close or sorted(self.shapes)[:n]

    def read(self, where: BaseKey) -> torch.Tensor:
        """The weight as (out, in) float64: the one copy a layer's statistics use, dropped by the caller after."""
        if where.file.suffix.lower() == ".gguf":
            return self.read_gguf(where.key).double()
        _, tensor = next(safetensors_io.iter_tensors(where.file, [where.key]))
        return (tensor.T if where.transpose else tensor).double()

    def read_gguf(self, key: str) -> torch.Tensor:
        """Dequantized (bit for bit), with llama.cpp's q / k row permutation undone."""
        from peftcore.models.gguf_llama import PERMUTED_QK, gguf_name, undo_qk_permutation

        tensor = self.gguf.tensor(gguf_name(key))
        heads = {"q_proj": self.gguf_config.num_attention_heads, "k_proj": self.gguf_config.num_key_value_heads}
        projection = key.split(".")[-2]
        if self.gguf_config.model_type in PERMUTED_QK and projection in heads:
            tensor = undo_qk_permutation(tensor, heads[projection])
        return tensor


def unprefixed(module: str) -> str:
    for prefix in PREFIXES:
        if module.startswith(prefix):
            return module.removeprefix(prefix)
    return module


def tie_word_embeddings(folder: Path) -> bool:
    """config.json's flag; absent means True, transformers' PretrainedConfig default (GPT-2 omits it)."""
    config = folder / "config.json"
    if not config.is_file():
        return True
    return bool(json.loads(config.read_text()).get("tie_word_embeddings", True))
