"""Tokenizers from a Hugging Face checkpoint folder: `tokenizer.json` (the `tokenizers` library) plus
the special tokens and chat template of `tokenizer_config.json` / `special_tokens_map.json`.

Padding and truncation are done per call, never by the tokenizer.json's own settings: a saved
`padding: {"strategy": {"Fixed": 128}}` would otherwise pad every single `encode` to 128 ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer

from .gguf_tokenizer import gguf_tokenizer_parts

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def read_json(path: Path) -> dict:
    """A checkpoint's JSON (maybe saved by a Windows editor, with a byte-order mark); a broken one is
    an error at its file:line:column, not a decoder traceback."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None


def token_content(value) -> str | None:
    """A special token as saved: a plain string or an AddedToken dict {"content": ..., ...}."""
    return value.get("content") if isinstance(value, dict) else value


def special_tokens(folder: Path, config: dict) -> dict[str, str | None]:
    tokens = {name: token_content(config.get(name)) for name in SPECIAL_TOKENS}
    # transformers reads special_tokens_map.json only for configs without `added_tokens_decoder`
    # (the legacy layout), and there it overrides tokenizer_config.json.
    if "added_tokens_decoder" not in config:
        legacy = read_json(folder / "special_tokens_map.json")
        tokens.update({name: token_content(legacy[name]) for name in SPECIAL_TOKENS if legacy.get(name)})
    return tokens


def read_chat_template(folder: Path, config: dict) -> str | None:
    """The default template: chat_template.jinja (transformers >= 4.43) or the tokenizer_config entry."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8-sig")  # a byte-order mark would start every rendered prompt
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


class Tokenizer:
    """Encode / decode / pad batches the way transformers' fast tokenizer does for the same folder."""

    def __init__(self, backend: RustTokenizer, tokens: dict[str, str | None], chat_template: str | None = None,
                 model_max_length: int | None = None):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        for name, token in tokens.items():
            setattr(self, name, token)  # plain attributes: `tok.pad_token = tok.eos_token` works
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def cls_token_id(self) -> int | None:
        return self.token_to_id(self.cls_token)

    @property
    def sep_token_id(self) -> int | None:
        return self.token_to_id(self.sep_token)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary without added tokens (transformers' `vocab_size`); `len()` counts them."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str,
                            add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and each token's (start, end) character range in `text` (special tokens: (0, 0))."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, encoding.offsets

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_encode(self, texts, padding=True, padding_side: str = "right", max_length: int | None = None,
                     truncation: bool = False, return_tensors: str | None = "pt",
                     add_special_tokens: bool = True) -> dict:
        """-> {"input_ids", "attention_mask"}: LongTensors (B, T) with return_tensors="pt", else lists.

        padding: True / "longest" pads to the longest text, "max_length" to `max_length`, False not at all.
        truncation cuts each text to `max_length` ids, special tokens included (transformers' rule).
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        ids = self._encode_all(list(texts), max_length if truncation else None, add_special_tokens)
        if padding:
            ids, mask = self._pad(ids, padding, padding_side, max_length)
        else:
            mask = [[1] * len(row) for row in ids]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": mask}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if len({len(row) for row in ids}) > 1:
            raise ValueError("texts have different lengths: pass padding=True to return tensors")
        return {"input_ids": torch.tensor(ids, dtype=torch.long),  # (B, T)
                "attention_mask": torch.tensor(mask, dtype=torch.long)}

    __call__ = batch_encode

    def _encode_all(self, texts: list[str], max_length: int | None, add_special_tokens: bool) -> list[list[int]]:
        if max_length is None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        # The backend truncates before adding special tokens, so they survive the cut.
        self.backend.enable_truncation(max_length)
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        finally:
            self.backend.no_truncation()

    def _pad(self, ids: list[list[int]], padding, side: str, max_length: int | None):
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max(max_length, *(len(row) for row in ids))
        elif padding in (True, "longest"):
            width = max(len(row) for row in ids)
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        pad_id = self.pad_token_id
        if pad_id is None and any(len(row) < width for row in ids):
            raise ValueError(
                "this tokenizer has no pad token; set one first, e.g. `tokenizer.pad_token = tokenizer.eos_token`"
            )
        padded, mask = [], []
        for row in ids:
            fill = width - len(row)
            padded.append(row + [pad_id] * fill if side == "right" else [pad_id] * fill + row)
            mask.append([1] * len(row) + [0] * fill if side == "right" else [0] * fill + [1] * len(row))
        return padded, mask


def save_tokenizer(tokenizer: Tokenizer, folder) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) that load_tokenizer and transformers'
    AutoTokenizer read back: how a GGUF file's tokenizer travels with an adapter or a merged model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    config = {name: getattr(tokenizer, name) for name in SPECIAL_TOKENS if getattr(tokenizer, name) is not None}
    config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    if tokenizer.model_max_length is not None:
        config["model_max_length"] = tokenizer.model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    if tokenizer.chat_template:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def tokenizer_from_gguf_metadata(metadata: dict[str, object]) -> Tokenizer:
    """The tokenizer a GGUF file's metadata (key -> plain value) describes; see gguf_tokenizer.py."""
    return Tokenizer(*gguf_tokenizer_parts(metadata))


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (needs tokenizer.json, a "fast" tokenizer) or of a .gguf file."""
    folder = Path(path)
    if folder.suffix.lower() == ".gguf" and folder.is_file():
        from .gguf import GGUFFile  # deferred: only GGUF paths need the file reader

        return tokenizer_from_gguf_metadata(GGUFFile(folder).metadata)
    file = folder / "tokenizer.json"
    if not file.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        where = f"found: {', '.join(found) or 'nothing'}" if folder.is_dir() else "the folder does not exist"
        raise FileNotFoundError(
            f"no tokenizer.json in {folder} ({where}); peftcore reads fast tokenizers only. Convert once with "
            f"transformers: AutoTokenizer.from_pretrained({str(folder)!r}).save_pretrained({str(folder)!r})"
        )
    config = read_json(folder / "tokenizer_config.json")
    max_len = config.get("model_max_length")
    return Tokenizer(
        RustTokenizer.from_file(str(file)),
        special_tokens(folder, config),
        read_chat_template(folder, config),
        int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,  # 1e30: "no limit"
    )
