"""LoRA / DoRA against the installed HF PEFT, on tiny random transformers checkpoints (no downloads).

Each case builds the same adapter config in both libraries. With `init_lora_weights=False` both A
and B start random, and every trainable tensor (magnitudes, modules_to_save copies, biases) is then
perturbed, so a tensor that is loaded into the wrong place, or not at all, changes the logits.
Checked per case: logits after loading PEFT's files here and ours into PEFT, trainable / total
parameter counts, in-memory state-dict keys, saved file keys, and merge_and_unload -> transformers.
"""
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402

from peftcore import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftcore.models import load_pretrained, save_pretrained  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

VOCAB = 101
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, LLAMA, transformers.AutoModelForCausalLM),
    "qwen2": (transformers.Qwen2Config, LLAMA, transformers.AutoModelForCausalLM),  # q/k/v carry biases
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
             transformers.AutoModelForCausalLM),
    "bert": (transformers.BertConfig, dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=40, max_position_embeddings=64, num_labels=3),
             transformers.AutoModelForSequenceClassification),
}

# case -> (family, LoraConfig kwargs); the same kwargs go to peft.LoraConfig and ours.
CASES = {
    "q_v_llama": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
    "all_linear_rslora_patterns": ("qwen2", dict(
        target_modules="all-linear", r=4, lora_alpha=8, use_rslora=True,
        rank_pattern={"up_proj": 2, r"layers\.1\.self_attn\.v_proj": 6}, alpha_pattern={"o_proj": 3})),
    "dora": ("qwen2", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=16, use_dora=True)),
    "regex_targets": ("llama", dict(target_modules=r".*\.layers\.1\.(self_attn\.k|mlp\.gate)_proj", r=2)),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4)),
    "gpt2_conv1d_dora": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True, r=4)),
    "modules_to_save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"], r=4)),
    "bias_lora_only": ("qwen2", dict(target_modules=["q_proj", "k_proj", "o_proj"], bias="lora_only", r=4)),
    "bias_all": ("qwen2", dict(target_modules=["v_proj"], bias="all", r=4)),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                          layers_pattern="layers", r=4)),
    "exclude_modules": ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "k_proj"], r=2)),
    "embedding_targets": ("llama", dict(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=4)),
    "lm_head_target": ("llama", dict(target_modules=["lm_head", "v_proj"], r=4)),
    "gpt2_tied_wte_target": ("gpt2", dict(target_modules=["wte", "c_fc"], fan_in_fan_out=True, r=4)),
    "embedding_dora": ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_dora=True, r=4)),
    "layer_index_int_no_pattern": ("llama", dict(target_modules=["gate_proj", "model.layers.0.self_attn.q_proj"],
                                                 layers_to_transform=1, r=2)),
    "exclude_regex": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=r".*\.0\..*", r=2)),
    "bert_seq_cls": ("bert", dict(task_type="SEQ_CLS", target_modules=["query", "value"],
                                  modules_to_save=["classifier"], r=4)),
    "bert_seq_cls_head_implied": ("bert", dict(task_type="SEQ_CLS", target_modules="all-linear", bias="all", r=2)),
}



def perturb(params) -> None:
    """Fresh inits leave biases at 0, norms at 1 and DoRA magnitudes at the weight norm: move them all."""
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> folder of a tiny random transformers model, every tensor perturbed."""
    folders = {}
    for family, (config_cls, kwargs, auto_cls) in FAMILIES.items():
        torch.manual_seed(0)
        model = auto_cls.from_config(config_cls(**kwargs))
        perturb(model.parameters())
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
    return folders


def hf_model(checkpoints, family):
    return FAMILIES[family][2].from_pretrained(checkpoints[family]).eval()


def inputs(family):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, 5:] = 0  # a padded row: the encoder's mask path is part of what is compared
    return ids, mask


@torch.no_grad()
def hf_logits(model, family):
    ids, mask = inputs(family)
    return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def our_logits(model, family, **kwargs):
    ids, mask = inputs(family)
    return model(ids, attention_mask=mask, **kwargs)


def file_keys(folder) -> set[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


class Pair:
    """One case built in both libraries: PEFT's adapter created there and loaded here."""

    def __init__(self, case, checkpoints, tmp_path_factory):
        self.family, kwargs = CASES[case]
        self.kwargs = kwargs
        self.checkpoints = checkpoints
        torch.manual_seed(0)
        self.hf = peft.get_peft_model(hf_model(checkpoints, self.family),
                                      peft.LoraConfig(**kwargs, init_lora_weights=False))
        perturb(p for p in self.hf.parameters() if p.requires_grad)
        self.hf.eval()
        self.hf_dir = tmp_path_factory.mktemp(f"peft_{case}")
        self.hf.save_pretrained(self.hf_dir)
        self.ours = PeftModel.from_pretrained(load_pretrained(checkpoints[self.family]), self.hf_dir).eval()
        self.expected = hf_logits(self.hf, self.family)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, checkpoints, tmp_path_factory):
    return Pair(request.param, checkpoints, tmp_path_factory)


def test_peft_adapter_loaded_here_gives_peft_logits(pair):
    base = hf_logits(hf_model(pair.checkpoints, pair.family), pair.family)
    assert (pair.expected - base).abs().max() > 1e-3, "the adapter must change the output, else nothing is tested"
    assert_close(our_logits(pair.ours, pair.family), pair.expected)


def test_trainable_and_total_parameter_counts_equal_peft(pair):
    trainable = PeftModel.from_pretrained(load_pretrained(pair.checkpoints[pair.family]), pair.hf_dir,
                                          is_trainable=True)
    reference = peft.PeftModel.from_pretrained(hf_model(pair.checkpoints, pair.family), pair.hf_dir, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    # Loaded for inference nothing trains here. PEFT leaves requires_grad on for the biases that
    # bias="all"/"lora_only" selects even then, so only its total is compared in that state.
    frozen = peft.PeftModel.from_pretrained(hf_model(pair.checkpoints, pair.family), pair.hf_dir)
    assert pair.ours.get_nb_trainable_parameters() == (0, frozen.get_nb_trainable_parameters()[1])
    if pair.kwargs.get("bias", "none") == "none":
        assert frozen.get_nb_trainable_parameters()[0] == 0


def test_in_memory_state_dict_keys_equal_peft(pair):
    assert set(pair.ours.state_dict()) == set(pair.hf.state_dict())


def test_our_adapter_loaded_by_peft_gives_our_logits(pair, tmp_path):
    torch.manual_seed(1)
    ours = get_peft_model(load_pretrained(pair.checkpoints[pair.family]),
                          LoraConfig(**pair.kwargs, init_lora_weights=False))
    perturb(p for p in ours.parameters() if p.requires_grad)
    ours.eval()
    ours.save_pretrained(tmp_path)
    assert file_keys(tmp_path) == file_keys(pair.hf_dir)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["inference_mode"] is True
    reference = peft.PeftModel.from_pretrained(hf_model(pair.checkpoints, pair.family), tmp_path).eval()
    assert_close(hf_logits(reference, pair.family), our_logits(ours, pair.family))


def test_merge_and_unload_saves_a_checkpoint_transformers_loads(pair, tmp_path):
    merged = PeftModel.from_pretrained(load_pretrained(pair.checkpoints[pair.family]), pair.hf_dir).merge_and_unload()
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    save_pretrained(merged, tmp_path)
    reloaded = FAMILIES[pair.family][2].from_pretrained(tmp_path).eval()
    # PEFT's merged model is the reference: with a tied embedding, merging into it moves the head too.
    reference = peft.PeftModel.from_pretrained(hf_model(pair.checkpoints, pair.family), pair.hf_dir).merge_and_unload()
    expected = hf_logits(reference, pair.family)
    assert_close(hf_logits(reloaded, pair.family), expected, atol=1e-4, rtol=1e-4)  # W + sBA rounds once more
    if "wte" not in pair.kwargs["target_modules"]:
        assert_close(expected, pair.expected, atol=1e-4, rtol=1e-4)


def test_non_default_adapter_name_goes_to_a_sub_folder_peft_loads(checkpoints, tmp_path):
    torch.manual_seed(2)
    config = LoraConfig(target_modules=["q_proj", "o_proj"], r=4, init_lora_weights=False)
    ours = get_peft_model(load_pretrained(checkpoints["llama"]), config, adapter_name="mine").eval()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "mine" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    reference = peft.PeftModel.from_pretrained(hf_model(checkpoints, "llama"), tmp_path / "mine", adapter_name="mine")
    assert set(reference.eval().state_dict()) == set(ours.state_dict())
    assert_close(hf_logits(reference, "llama"), our_logits(ours, "llama"))


@pytest.mark.parametrize("targets", [["0", "1", "3"], "all-linear"])
def test_plain_user_module_gets_lora_like_peft(targets, tmp_path):
    """A user's own nn.Module (no transformers names): same keys, counts, output and file as PEFT's."""
    torch.manual_seed(3)
    base = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fresh = copy.deepcopy(base)
    kwargs = dict(target_modules=targets, r=2, lora_alpha=4, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = get_peft_model(base, LoraConfig(**kwargs))
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        assert (ours(ids) - base_output(reference, ids)).abs().max() > 1e-3
        assert_close(ours(ids), reference(ids))
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours")
    with torch.no_grad():
        assert_close(loaded(ids), reference(ids))


def base_output(reference, ids):
    with reference.disable_adapter():
        return reference(ids)


@pytest.mark.parametrize("case", ["q_v_llama", "dora", "gpt2_conv1d_dora", "embedding_dora", "bias_all"])
def test_gradients_equal_peft(case, checkpoints, tmp_path_factory):
    """One backward pass: every trainable tensor gets PEFT's gradient (DoRA's norm is detached in both)."""
    pair = Pair(case, checkpoints, tmp_path_factory)
    ours = PeftModel.from_pretrained(load_pretrained(checkpoints[pair.family]), pair.hf_dir, is_trainable=True)
    reference = peft.PeftModel.from_pretrained(hf_model(checkpoints, pair.family), pair.hf_dir, is_trainable=True)
    ids, mask = inputs(pair.family)
    ours(ids, attention_mask=mask).square().mean().backward()
    reference(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(got) == set(expected)
    for name, grad in got.items():
        assert_close(grad, expected[name], atol=1e-5, rtol=1e-4)


def test_mixed_adapter_batch_equals_peft(checkpoints, tmp_path):
    """Two PEFT adapters (with trained lm_head copies) loaded here; rows routed as in PEFT."""
    torch.manual_seed(4)
    hf = peft.get_peft_model(hf_model(checkpoints, "llama"), peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False), adapter_name="cat")
    # dog gets its own lm_head copy too: PEFT 0.21.2 raises a KeyError for rows of an adapter without one
    hf.add_adapter("dog", peft.LoraConfig(target_modules=["o_proj", "embed_tokens"], r=2, modules_to_save=["lm_head"],
                                          init_lora_weights=False))
    perturb(p for n, p in hf.named_parameters() if ".cat." in n or ".dog." in n)
    hf.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(load_pretrained(checkpoints["llama"]), tmp_path / "cat", adapter_name="cat")
    ours.load_adapter(tmp_path / "dog", "dog")
    names = ["dog", "__base__", "cat", "dog"]
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf.eval()(input_ids=ids, adapter_names=names).logits
        assert_close(ours.eval()(ids, adapter_names=names), expected)
        assert (expected[0] - expected[2]).abs().max() > 1e-3


@pytest.mark.parametrize("family, targets, scheme", [
    ("llama", ["q_proj", "down_proj"], "pissa"), ("llama", ["q_proj", "down_proj"], "pissa_niter_3"),
    ("llama", ["q_proj", "down_proj"], "olora"), ("gpt2", ["c_attn", "c_fc"], "pissa"),
    # not ("gpt2", ..., "olora"): PEFT 0.21.2's olora_init ignores fan_in_fan_out and factors the (in, out)
    # Conv1D weight, giving A (r, out) and B (in, r); ours factors W^T (out, in) like PiSSA does.
])
def test_weight_based_inits_equal_peft(checkpoints, family, targets, scheme):
    """PiSSA / OLoRA: the same A, B and the same residual base weights (the same SVD / QR underneath)."""
    kwargs = dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=scheme, fan_in_fan_out=family == "gpt2")
    torch.manual_seed(6)
    reference = peft.get_peft_model(hf_model(checkpoints, family), peft.LoraConfig(**kwargs)).state_dict()
    torch.manual_seed(6)
    ours = get_peft_model(load_pretrained(checkpoints[family]), LoraConfig(**kwargs)).state_dict()
    checked = [k for k in ours if "lora_" in k or ".base_layer." in k]
    assert len(checked) >= 3 * 2 * len(targets)  # A, B and the base weight of every adapted layer
    assert set(checked) == {k for k in reference if "lora_" in k or ".base_layer." in k}
    for key in checked:
        assert_close(ours[key], reference[key], atol=1e-4, rtol=1e-4)
