"""The tokenizer a GGUF file describes, rebuilt from its metadata as a `tokenizers` pipeline.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges (or scores), token types and special
ids under llama.cpp's key names, plus one name, `tokenizer.ggml.pre`, for the way text is split before
BPE. llama.cpp, the runtime these files are made for, is the reference: each supported pre-tokenizer
name maps to the regexes llama.cpp applies in turn (src/llama-vocab.cpp, `llm_tokenizer_bpe`), written
the way the models' own tokenizer.json spell them. A name we have no regex for is an error, never a
guess: a wrong split gives plausible-looking but different ids.

This module only builds the parts; `peftcore.models.tokenizer.tokenizer_from_gguf_metadata` wraps them
in a `Tokenizer` (that direction keeps the import graph free of circles).
"""
from __future__ import annotations

from typing import NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class PreTokenizer(NamedTuple):
    splits: tuple[str, ...]  # applied in turn, each keeping matches and gaps as pieces (llama.cpp's regex split)
    ignore_merges: bool = False  # a piece that is itself in the vocabulary is one token, merges unused
    add_bos: bool = False  # llama.cpp's default for files without tokenizer.ggml.add_bos_token


_GPT2 = PreTokenizer((GPT2_SPLIT,))
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", GPT2_SPLIT))  # StarCoder-style: every digit its own piece
_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_LLAMA3_SPLIT_ONLY = PreTokenizer((LLAMA3_SPLIT,))  # dbrx / smaug share the regex, not the other settings
_QWEN2 = PreTokenizer((QWEN2_SPLIT,))

PRE_TOKENIZERS = {
    "gpt-2": _GPT2, "phi-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2, "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "dbrx": _LLAMA3_SPLIT_ONLY, "smaug-bpe": _LLAMA3_SPLIT_ONLY,
    "qwen2": _QWEN2, "stablelm2": _QWEN2, "megrez": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}
# sentencepiece vocabularies of these architectures need Gemma's / Phi-3's own variant of the pipeline
SPM_UNSUPPORTED_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3n", "phi3")

# Tokenizer attribute -> GGUF id key. There is no cls key: llama.cpp files give BERT's [CLS] as the bos id.
SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "mask_token": "tokenizer.ggml.mask_token_id",
}


class GGUFTokenizerParts(NamedTuple):
    """The arguments of `Tokenizer(...)`, in its order."""
    backend: RustTokenizer
    tokens: dict[str, str | None]
    chat_template: str | None
    model_max_length: int | None


def gguf_tokenizer_parts(metadata: dict[str, object]) -> GGUFTokenizerParts:
    """Backend, special tokens, chat template and context length of the tokenizer in a GGUF's metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = string_list(metadata, "tokenizer.ggml.tokens")
    types = int_list(metadata, "tokenizer.ggml.token_type", len(tokens), default=NORMAL)
    if kind == "gpt2":
        backend, add_bos_default = byte_level_backend(metadata, tokens)
    elif kind == "llama":
        backend, add_bos_default = sentencepiece_backend(metadata, tokens), True  # llama.cpp: SPM adds BOS
    else:
        raise ValueError(f"unsupported GGUF tokenizer.ggml.model {kind!r}; supported: 'gpt2' (byte-level BPE), "
                         "'llama' (sentencepiece BPE)")
    named = {name: token_id(metadata, key, len(tokens)) for name, key in SPECIAL_TOKEN_KEYS.items()}
    add_added_tokens(backend, tokens, types, {i for i in named.values() if i is not None})
    backend.post_processor = template_processor(metadata, tokens, named, add_bos_default)
    special = {name: None if i is None else tokens[i] for name, i in named.items()}
    special["cls_token"] = None
    template = metadata.get("tokenizer.chat_template")
    return GGUFTokenizerParts(backend, special, template if isinstance(template, str) else None,
                              context_length(metadata))


def byte_level_backend(metadata: dict[str, object], tokens: list[str]) -> tuple[RustTokenizer, bool]:
    """GPT-2-style BPE over bytes spelled as printable characters (`Ġ` for a space)."""
    name = metadata.get("tokenizer.ggml.pre")
    pre = PRE_TOKENIZERS.get(name) if isinstance(name, str) else None
    if pre is None:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        raise ValueError(f"unsupported GGUF tokenizer.ggml.pre {name!r}; supported: {supported}")
    merges = [split_merge(m) for m in string_list(metadata, "tokenizer.ggml.merges")]
    backend = RustTokenizer(bpe_model(vocabulary(tokens), merges, ignore_merges=pre.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]  # the splits above replace its regex
    )
    backend.decoder = decoders.ByteLevel()
    return backend, pre.add_bos


def sentencepiece_backend(metadata: dict[str, object], tokens: list[str]) -> RustTokenizer:
    """Llama-2-style sentencepiece BPE: `▁` for a space, merges ranked by score, unknown bytes as <0xNN>."""
    arch = metadata.get("general.architecture")
    if arch in SPM_UNSUPPORTED_ARCHS:
        raise ValueError(f"unsupported GGUF sentencepiece tokenizer of architecture {arch!r} (its own variant); "
                         "supported: the Llama-2 style of other architectures")
    vocab = vocabulary(tokens)
    if "tokenizer.ggml.merges" in metadata:
        merges = [split_merge(m) for m in string_list(metadata, "tokenizer.ggml.merges")]
    else:
        merges = merges_from_scores(tokens, float_list(metadata, "tokenizer.ggml.scores", len(tokens)), vocab)
    unk = token_id(metadata, "tokenizer.ggml.unknown_token_id", len(tokens))
    backend = RustTokenizer(bpe_model(vocab, merges, unk_token=None if unk is None else tokens[unk],
                                      fuse_unk=True, byte_fallback=True))
    prefix = flag(metadata, "tokenizer.ggml.add_space_prefix", True)
    # A normalizer, not Metaspace: it runs on each stretch of text between added tokens, so like llama.cpp
    # (and sentencepiece) every stretch gets its `▁`, even one that starts with a space (" hi" -> "▁▁hi").
    escape = [normalizers.Replace(" ", "\u2581")]
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + escape)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return backend


def merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges a sentencepiece vocabulary implies: every split of a token into two tokens, ranked by the
    whole token's score, best first (sentencepiece merges the best-scoring adjacent pair). Ties: longer left
    piece first, then vocabulary order, as transformers' `generate_merges` ranks them."""
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, score) for left, right in pairs)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: equal keys keep their order
    return [(left, right) for left, right, _ in merges]


def bpe_model(vocab: dict[str, int], merges: list[tuple[str, str]], **options) -> models.BPE:
    try:
        return models.BPE(vocab=vocab, merges=merges, **options)
    except Exception as e:  # the backend's own words (a merge naming a token not in the vocabulary, ...)
        raise ValueError(f"GGUF tokenizer: cannot build its BPE model: {e}") from None


def add_added_tokens(backend: RustTokenizer, tokens: list[str], types: list[int], named: set[int]) -> None:
    """Control / unknown tokens and the named special ones are matched whole in text and skipped by
    `decode(skip_special_tokens=True)`; user-defined ones are matched whole but decoded like text (llama.cpp
    renders them always). Their GGUF strings are already vocabulary entries, so no id changes."""
    special = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN) or i in named]
    user = [i for i, t in enumerate(types) if t == USER_DEFINED and i not in named]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def template_processor(metadata: dict[str, object], tokens: list[str], named: dict[str, int | None],
                       add_bos_default: bool) -> processors.TemplateProcessing:
    """BOS / EOS around each sequence exactly when the file's add_bos_token / add_eos_token say so."""
    ends = {}
    for name, key, default in (("bos_token", "tokenizer.ggml.add_bos_token", add_bos_default),
                               ("eos_token", "tokenizer.ggml.add_eos_token", False)):
        wanted = flag(metadata, key, default)
        if wanted and named[name] is None:
            raise ValueError(f"GGUF {key} is true but the file gives no {SPECIAL_TOKEN_KEYS[name]}")
        ends[name] = named[name] if wanted else None
    bos, eos = ends["bos_token"], ends["eos_token"]

    def around(sequence: str, type_id: int) -> list[str]:
        # list form, not one string: a token's text may hold a space, which the string form splits on
        return ([f"{tokens[bos]}:{type_id}"] if bos is not None else []) + [f"${sequence}:{type_id}"] \
            + ([f"{tokens[eos]}:{type_id}"] if eos is not None else [])

    used = {tokens[i]: i for i in (bos, eos) if i is not None}
    try:
        return processors.TemplateProcessing(single=around("A", 0), pair=around("A", 0) + around("B", 1),
                                             special_tokens=list(used.items()))
    except Exception as e:  # e.g. a BOS whose text holds ':', which the template syntax cannot quote
        raise ValueError(f"GGUF tokenizer: cannot add BOS / EOS {list(used)}: {e}") from None


def context_length(metadata: dict[str, object]) -> int | None:
    arch = metadata.get("general.architecture")
    value = metadata.get(f"{arch}.context_length") if isinstance(arch, str) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def vocabulary(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:  # a repeat would silently shift every later id
            raise ValueError(f"GGUF tokenizer.ggml.tokens holds {token!r} twice (ids {vocab[token]} and {i})")
    return vocab


def split_merge(merge: str) -> tuple[str, str]:
    left, space, right = merge.partition(" ")
    if not space or not left or not right:
        raise ValueError(f"GGUF tokenizer.ggml.merges entry {merge!r} is not 'left right'")
    return left, right


def token_id(metadata: dict[str, object], key: str, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_tokens:
        raise ValueError(f"GGUF {key} is {value!r}, not a token id below the vocabulary size {n_tokens}")
    return value


def flag(metadata: dict[str, object], key: str, default: bool) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"GGUF {key} must be true or false, got {value!r}")
    return value


def string_list(metadata: dict[str, object], key: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"GGUF {key} must be a list of strings, got {type(value).__name__}")
    return value


def int_list(metadata: dict[str, object], key: str, length: int, default: int) -> list[int]:
    value = metadata.get(key, [default] * length)
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, int) for v in value):
        raise ValueError(f"GGUF {key} must be a list of {length} integers, one per token")
    return value


def float_list(metadata: dict[str, object], key: str, length: int) -> list[float]:
    value = metadata.get(key)
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"GGUF {key} must be a list of {length} numbers, one per token (a sentencepiece "
                         "vocabulary without merges needs its scores)")
    return value
