"""Prompt tuning, P-tuning and prefix tuning against HF PEFT: files both ways, logits, generation."""
import copy
import warnings

import peft
import pytest
import torch
import transformers

from peftcore import PeftModel, get_peft_model
from peftcore.models import load_pretrained
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from tests.tolerances import assert_close

warnings.filterwarnings("ignore", category=UserWarning)
N_VIRTUAL = 3
VOCAB = 61

METHODS = {
    "prompt": (peft.PromptTuningConfig, PromptTuningConfig, {}),
    "ptuning-mlp": (peft.PromptEncoderConfig, PromptEncoderConfig, {"encoder_hidden_size": 12}),
    "ptuning-lstm": (peft.PromptEncoderConfig, PromptEncoderConfig,
                     {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12}),
    "prefix": (peft.PrefixTuningConfig, PrefixTuningConfig, {}),
    "prefix-projection": (peft.PrefixTuningConfig, PrefixTuningConfig,
                          {"prefix_projection": True, "encoder_hidden_size": 12}),
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=None, bos_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return folder, hf


def batch():
    ids = torch.randint(0, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def peft_adapter(hf, method, tmp_path):
    peft_cls, _, extra = METHODS[method]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(hf),
                             peft_cls(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **extra)).eval()
    pm.save_pretrained(tmp_path / "theirs")
    return pm, tmp_path / "theirs"


def their_logits(pm, method, ids, mask):
    logits = pm(input_ids=ids, attention_mask=mask).logits
    return logits if method.startswith("prefix") else logits[:, N_VIRTUAL:]


def greedy_by_forward(pm, ids, steps):
    """Greedy decoding by re-running PEFT's full forward each step (no cache): the reference output.

    PEFT 0.21's own generate() (with transformers 5) disagrees with its forward: for prompt tuning /
    P-tuning it drops position_ids and transformers numbers the generated tokens from the length
    of input_ids, forgetting the virtual tokens (each new token sits num_virtual_tokens positions
    too early; seen here: step 4 picks token 2 where the forward picks 36); for prefix tuning the
    prefill numbers the real tokens from 0 although its forward numbers them after the prefix
    (the first new token already differs). Ours equals its forward, which is the reference.
    """
    for _ in range(steps):
        logits = pm(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_adapter_loads_here_with_equal_logits_and_generation(llama_folder, method, tmp_path):
    folder, hf = llama_folder
    theirs, adapter = peft_adapter(hf, method, tmp_path)
    ours = PeftModel.from_pretrained(load_pretrained(folder), adapter).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask)[mask.bool()], their_logits(theirs, method, ids, mask)[mask.bool()])
        expected = greedy_by_forward(theirs, ids[:1], 6)
    assert torch.equal(ours.generate(ids[:1], max_new_tokens=6), expected)
    padded = ours.generate(ids, attention_mask=mask, max_new_tokens=6)  # left padding changes nothing
    assert torch.equal(padded[1, -6:], ours.generate(ids[1:, 2:], max_new_tokens=6)[0, -6:])


@pytest.mark.parametrize("method", list(METHODS))
def test_our_adapter_loads_in_peft_with_equal_logits(llama_folder, method, tmp_path):
    folder, hf = llama_folder
    _, ours_cls, extra = METHODS[method]
    ours = get_peft_model(load_pretrained(folder),
                          ours_cls(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **extra)).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    ids, mask = batch()
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask)[mask.bool()], their_logits(theirs, method, ids, mask)[mask.bool()])


@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_counts_match_peft_and_only_prompt_params_learn(llama_folder, method):
    folder, hf = llama_folder
    peft_cls, ours_cls, extra = METHODS[method]
    theirs = peft.get_peft_model(copy.deepcopy(hf),
                                 peft_cls(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **extra))
    ours = get_peft_model(load_pretrained(folder),
                          ours_cls(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **extra))
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    ids, _ = batch()
    ours(ids).sum().backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert name.startswith("prompt_encoder."), name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_prefix_is_sized_to_the_kv_heads(llama_folder):
    folder, _ = llama_folder  # hidden 32, 4 heads, 2 KV heads, 2 layers
    pm = get_peft_model(load_pretrained(folder), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert pm.peft_config["default"].token_dim == 16
    assert pm.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 16)
