"""Prompt methods beyond PEFT parity: init schemes, the zero-prefix property, errors, resuming, BERT."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from peftcore import PeftModel, TaskType, get_peft_model
from peftcore.models import BertConfig, BertForSequenceClassification, LlamaConfig, from_config, generate
from peftcore.models.llama import rope_tables
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from tests.tolerances import assert_close

WORDS = ["<unk>", "<s>", "</s>", "hello", "support", "team", "restore", "point"]


def tiny_llama(layers=2, hidden=16):
    torch.manual_seed(0)
    return from_config(LlamaConfig(vocab_size=len(WORDS) + 24, hidden_size=hidden, intermediate_size=24,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1))


def tokenizer_folder(tmp_path):
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return tmp_path


def test_text_init_copies_the_texts_token_embeddings_repeated_to_length(tmp_path):
    model = tiny_llama()
    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="restore point",
                                tokenizer_name_or_path=str(tokenizer_folder(tmp_path)))
    pm = get_peft_model(model, config)
    ids = torch.tensor([6, 7, 6, 7, 6])  # "restore point" repeated and cut to 5, as PEFT does
    assert_close(pm.prompt_encoder["default"].embedding.weight, model.model.embed_tokens.weight[ids])


def test_sample_vocab_init_takes_rows_of_the_vocabulary():
    model = tiny_llama()
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.model.embed_tokens.weight
    for row in pm.prompt_encoder["default"].embedding.weight:
        assert torch.isclose(table, row).all(-1).any()


def test_a_zero_prefix_shrinks_attention_by_exactly_S_over_S_plus_n():
    """The property. With zero prefix keys every virtual token scores q.0 = 0, so softmax gives it
    weight 1 / (S + n) with S = sum_j exp(q.k_j / sqrt(d)) over the real keys; its value is zero,
    so the attention output over the real tokens is multiplied by S / (S + n) per query and head.
    It stays unchanged only as S / (S + n) -> 1; a "zero init" prefix (PEFT: init_weights="zero",
    described as a no-op) therefore does change the model, and this test shows by how much."""
    attn = tiny_llama().model.layers[0].self_attn
    with torch.no_grad():
        attn.o_proj.weight.copy_(torch.eye(16))  # read the attention output itself
    x = torch.randn(2, 5, 16)
    cos, sin = rope_tables(tiny_llama().model.inv_freq, torch.arange(5)[None].expand(2, 5), x.dtype)
    n, hd = 3, attn.head_dim
    zeros = torch.zeros(2, attn.n_kv_head, n, hd)
    with torch.no_grad():
        base, k, _ = attn(x, cos, sin, None)
        with_prefix, _, _ = attn(x, cos, sin, torch.ones(1, 1, 5, n + 5, dtype=torch.bool).tril(n), zeros, zeros)
        q = attn.q_proj(x).view(2, 5, attn.n_head, hd).transpose(1, 2)
        from peftcore.models.llama import apply_rope
        q = apply_rope(q, cos, sin)
        scores = (q @ k.repeat_interleave(attn.n_head // attn.n_kv_head, 1).transpose(-1, -2)) / hd**0.5
        S = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")).exp().sum(-1)  # (B, h, T)
    factor = (S / (S + n)).transpose(1, 2).repeat_interleave(hd, dim=-1)  # (B, T, h * hd)
    assert_close(with_prefix, base * factor)
    assert (with_prefix - base).abs().max() > 1e-3  # a zero prefix is not a no-op


@pytest.mark.parametrize("config", [
    PromptTuningConfig(num_virtual_tokens=3),
    PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
])
def test_save_with_encoder_resumes_training_exactly(tmp_path, config):
    pm = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path, save_prompt_encoder=True)
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    ids = torch.randint(0, 30, (2, 4))
    assert_close(resumed(ids), pm(ids))
    assert resumed.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]
    resumed(ids).sum().backward()
    assert all(p.grad is not None for p in resumed.prompt_encoder.parameters())


def test_reparameterized_prompts_without_encoder_weights_refuse_training(tmp_path):
    pm = get_peft_model(tiny_llama(), PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="save_prompt_encoder=True"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # inference works from the prompts alone
    ids = torch.randint(0, 30, (1, 4))
    assert_close(loaded(ids), pm.eval()(ids))


def test_prefix_tuning_trains_under_activation_checkpointing():
    model = tiny_llama()
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=3))
    ids = torch.randint(0, 30, (2, 5))
    pm(ids).sum().backward()
    plain = pm.prompt_encoder["default"].embedding.weight.grad.clone()
    pm.zero_grad()
    model.model.gradient_checkpointing = True
    pm.train()(ids).sum().backward()
    assert_close(pm.prompt_encoder["default"].embedding.weight.grad, plain)


@pytest.mark.parametrize("config", [
    PromptTuningConfig(num_virtual_tokens=3, task_type=TaskType.SEQ_CLS),
    PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, task_type=TaskType.SEQ_CLS),
    PrefixTuningConfig(num_virtual_tokens=3, task_type=TaskType.SEQ_CLS),
])
def test_sequence_classification_with_prompt_methods(config):
    torch.manual_seed(0)
    bert = from_config(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, num_labels=3, architectures=["BertForSequenceClassification"]))
    assert isinstance(bert, BertForSequenceClassification)
    pm = get_peft_model(bert, config)
    ids, mask = torch.randint(0, 30, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    logits = pm(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in pm.prompt_encoder.parameters())
    with pm.disable_adapter():
        assert not torch.allclose(pm(ids, attention_mask=mask), logits)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    get_peft_model(tiny_llama(hidden=16), PromptTuningConfig(num_virtual_tokens=3)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the adapter's token_dim is 16 but this LlamaForCausalLM needs 32"):
        PeftModel.from_pretrained(tiny_llama(hidden=32), tmp_path)
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(TypeError, match="nothing to merge"):
        pm.merge_adapter()
    with pytest.raises(ValueError, match="position_ids cannot be combined"):
        pm(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.arange(3)[None])


def test_an_unknown_task_type_is_a_clear_error_for_prompt_methods_too():
    with pytest.raises(ValueError, match="task_type 'TOKEN_CLS' is not supported; supported: CAUSAL_LM"):
        PromptTuningConfig(num_virtual_tokens=3, task_type="TOKEN_CLS")


@pytest.mark.parametrize("is_trainable", [True, False])
def test_load_adapter_trains_a_loaded_prompt_when_asked(tmp_path, is_trainable):
    """PEFT 0.21.2 refuses is_trainable for prompt adapters; ours resumes them, so the flag must hold here too."""
    get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3)).save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    pm.load_adapter(tmp_path, "other", is_trainable=is_trainable)
    trained = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert trained == (["prompt_encoder.other.embedding.weight"] if is_trainable else [])
    assert pm.active_adapter == "default"


def test_a_text_init_adapter_loads_the_same_way_through_from_pretrained_and_load_adapter(tmp_path):
    """Both loads build the encoder one way: no TEXT init (so no tokenizer, which is gone by now), the saved
    prompts copied in, and the config kept as saved."""
    (tmp_path / "tok").mkdir()
    tokenizer = tokenizer_folder(tmp_path / "tok")
    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello team",
                                tokenizer_name_or_path=str(tokenizer))
    saved = get_peft_model(tiny_llama(), config)
    saved.save_pretrained(tmp_path / "adapter")
    (tokenizer / "tokenizer.json").unlink()
    first = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    first.load_adapter(tmp_path / "adapter", "again")
    for name in ("default", "again"):
        assert_close(first.prompt_encoder[name].embedding.weight, saved.prompt_encoder["default"].embedding.weight)
        assert first.peft_config[name].prompt_tuning_init == "TEXT"
        assert first.peft_config[name].inference_mode


def test_a_prompt_model_refuses_mixed_batches_and_a_lora_adapter_beside_it():
    from peftcore import LoraConfig

    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3)).eval()
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="supported for LoRA adapters only"):
        pm(ids, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="supported for LoRA adapters only"):
        pm.generate(ids, adapter_names=["default", "default"], max_new_tokens=1)
    with pytest.raises(TypeError, match="holds prompt-learning adapters; a LoraConfig needs its own PeftModel"):
        pm.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="made from one of AdaLoraConfig, LoraConfig, .*, PromptLearningConfig"):
        get_peft_model(tiny_llama(), {"num_virtual_tokens": 3})


def test_a_disabled_prompt_runs_the_base_model_and_unload_returns_it_untouched():
    model = tiny_llama()
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=3)).eval()
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad(), pm.disable_adapter():
        assert_close(pm(ids), model(ids))
        assert torch.equal(pm.generate(ids, max_new_tokens=4), generate(model, ids, max_new_tokens=4))
    with torch.no_grad():
        assert not torch.allclose(pm(ids), model(ids))
    pm.unmerge_adapter()  # nothing merged: a no-op, as for LoRA with nothing merged
    assert pm.unload() is model


def test_every_saved_method_is_in_the_one_config_registry():
    from peftcore.adapter_io import CONFIG_CLASSES, config_from_dict

    assert sorted(CONFIG_CLASSES) == ["ADALORA", "IA3", "LOHA", "LOKR", "LORA", "OFT", "PREFIX_TUNING",
                                      "PROMPT_TUNING", "P_TUNING", "VERA"]
    config = config_from_dict(PrefixTuningConfig(num_virtual_tokens=2).to_dict())
    assert isinstance(config, PrefixTuningConfig) and config.num_virtual_tokens == 2
