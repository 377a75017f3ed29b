"""transformers' own GPT-2 (its Conv1D, from transformers.pytorch_utils) wrapped by our get_peft_model, against
HF PEFT wrapping a copy of the same model with the same config.

PEFT builds the adapter (A and B random; DoRA magnitudes moved off their init, where DoRA equals LoRA) and its
state dict is copied into ours: strict, so the in-memory keys are PEFT's too.
"""
import copy
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402

from peftcore import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftcore.lora.inject import wrap  # noqa: E402
from peftcore.lora.layer import LoraLinear, is_conv1d  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

VOCAB = 61
TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases start at 0: move them, so a bias mix-up shows
            p.add_(0.02 * torch.randn_like(p))
    return model


def kwargs(dora: bool) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=dora)


def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    return model(input_ids=ids()).logits


def build(gpt2, dora: bool):
    torch.manual_seed(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(**kwargs(dora))).eval()
        ours = get_peft_model(copy.deepcopy(gpt2), LoraConfig(**kwargs(dora))).eval()
    # both say fan_in_fan_out=False does not fit a Conv1D, and set it (saved that way)
    assert sum("fan_in_fan_out" in str(w.message) for w in caught) >= 2
    assert ours.peft_config["default"].fan_in_fan_out and reference.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def file_keys(folder) -> set[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


def test_transformers_conv1d_is_known_by_its_contract():
    conv = transformers.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    assert is_conv1d(conv) and not is_conv1d(nn.Linear(4, 6))
    layer = wrap(conv, "c")
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (4, 6)
    layer.add_adapter("default", LoraConfig(target_modules=["c"], r=2, init_lora_weights=False), 2, 4)
    assert layer.delta_weight("default").shape == (4, 6)  # the stored (in, out) layout


def test_a_conv1d_breaking_the_contract_says_what_is_wrong():
    class Conv1D(nn.Module):  # GPT-2's name, but nf does not match the weight
        def __init__(self):
            super().__init__()
            self.nf, self.weight = 3, nn.Parameter(torch.zeros(4, 5))

    with pytest.raises(TypeError, match=r"Conv1D but not GPT-2's.*nf=3 and weight shape \(4, 5\)"):
        wrap(Conv1D(), "odd")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_logits_counts_and_merge_equal_peft(gpt2, dora):
    reference, ours = build(gpt2, dora)
    expected = logits(reference)
    assert (expected - logits(gpt2)).abs().max() > 1e-2, "the adapter must change the logits"
    assert_close(logits(ours), expected)
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer.weight" in n}
    ours.merge_adapter()
    assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)  # W + sBA rounds once more
    ours.unmerge_adapter()
    for name, p in ours.named_parameters():
        if name in before:
            assert_close(p, before[name])
    assert_close(logits(ours), expected)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_files_equal_peft_and_load_both_ways(gpt2, dora, tmp_path):
    reference, ours = build(gpt2, dora)
    with torch.no_grad():
        for p in ours.parameters():  # now ours differs from PEFT's: the file must carry it
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "ours").eval()
    loaded_here = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "peft").eval()
    assert_close(logits(loaded_by_peft), logits(ours))
    assert_close(logits(loaded_here), logits(reference))


def test_gradients_equal_peft(gpt2):
    reference, ours = build(gpt2, True)
    for model in (reference, ours):
        model(input_ids=ids()).logits.square().mean().backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(got) == set(expected)
    for name, grad in got.items():
        assert_close(grad, expected[name], atol=1e-5, rtol=1e-4)


def test_all_linear_takes_transformers_conv1d_like_peft(gpt2):
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(target_modules="all-linear", r=2))
        ours = get_peft_model(copy.deepcopy(gpt2), LoraConfig(target_modules="all-linear", r=2))
    assert set(ours.state_dict()) == set(reference.state_dict())
