"""LoRA / DoRA on nn.Conv1d / Conv2d / Conv3d against the installed HF PEFT, on a small user module.

PEFT builds the adapter (A and B random, init_lora_weights=False; DoRA magnitudes moved off their init, where
m / ||W + sBA|| would be 1 and DoRA would equal LoRA), and its state dict is copied into ours, so every
comparison below runs the same numbers through both libraries' code.
"""
import copy
import warnings

import peft
import peft.tuners.lora.layer as peft_layers
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.adapter_keys import adapter_state_dict
from peftcore.lora.conv import LoraConv
from peftcore.lora.layer import Adapter
from peftcore.lora.registry import LORA_LAYERS
from tests.tolerances import assert_close

CONVS = ["c1", "c2", "g2", "p2", "c3"]
TARGETS = CONVS + ["head"]
UNGROUPED = [t for t in TARGETS if t != "g2"]  # PEFT (and we) cannot merge into a grouped conv


class Convs(nn.Module):
    """Conv1d; Conv2d with a 3x1 kernel, stride 2 and padding; a grouped Conv2d; a 1x1 Conv2d (PEFT's separate
    delta branch); a Conv3d; a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, (3, 1), stride=2, padding=(1, 0))
        self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.p2 = nn.Conv2d(8, 6, 1)
        self.c3 = nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, bias=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x1, x2, x3):
        a = self.c1(x1).mean(-1)
        b = self.p2(torch.relu(self.g2(self.c2(x2)))).mean((-1, -2))
        c = self.c3(x3).mean((-1, -2, -3))
        return self.head(torch.cat([a, b, c], -1))


def inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 7, generator=g), torch.randn(batch, 3, 9, 5, generator=g),
            torch.randn(batch, 2, 3, 5, 4, generator=g))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Convs().eval()


def kwargs(dora: bool, targets=TARGETS) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=dora)


def build(base, dora: bool, targets=TARGETS):
    """-> (PEFT's model, ours holding PEFT's adapter tensors)."""
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that the grouped conv cannot be merged
        reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs(dora, targets))).eval()
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs(dora, targets))).eval()
    move_magnitudes(reference)
    ours.load_state_dict(reference.state_dict())  # strict: the in-memory keys are PEFT's
    return reference, ours


@torch.no_grad()
def move_magnitudes(model) -> None:
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * torch.randn_like(p))


@torch.no_grad()
def run(model, x=None):
    return model(*(x or inputs()))


def file_tensors(folder) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_outputs_keys_shapes_and_counts_equal_peft(base, dora):
    reference, ours = build(base, dora)
    assert set(ours.state_dict()) == set(reference.state_dict())
    expected = peft.get_peft_model_state_dict(reference)
    got = adapter_state_dict(ours, "default", ours.peft_config["default"])
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert any(k.endswith("g2.lora_B.weight") for k in got) and all(isinstance(ours.model.get_submodule(c), LoraConv)
                                                                    for c in CONVS)
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert (run(reference) - run(base)).abs().max() > 1e-2, "the adapter must change the output"
    assert_close(run(ours), run(reference))


@pytest.mark.parametrize("conv", CONVS)
def test_a_new_dora_layer_equals_peft_from_the_same_seed(base, conv):
    """A, B and the magnitude from one seed: the same draws in the same order, and m = PEFT's ||W + s*BA|| (for
    the grouped conv: PEFT's own reshaping of BA), in PEFT's shape (1, out, 1, ...)."""
    config = kwargs(True, [conv])
    torch.manual_seed(3)
    cls = {1: peft_layers.Conv1d, 2: peft_layers.Conv2d, 3: peft_layers.Conv3d}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_conv = copy.deepcopy(base.get_submodule(conv))
        theirs = cls[base_conv.weight.dim() - 2](base_conv, "default", config=peft.LoraConfig(**config), r=4,
                                                 lora_alpha=8)
        torch.manual_seed(3)
        ours = LoraConv(copy.deepcopy(base.get_submodule(conv)))
        ours.add_adapter("default", LoraConfig(**config), 4, 8)
    expected = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    assert ours.lora_magnitude_vector["default"].weight.shape == (1, base_conv.out_channels,
                                                                  *[1] * (base_conv.weight.dim() - 2))
    for key, value in ours.state_dict().items():
        assert_close(value, expected[key])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_delta_weight_equals_peft_and_merge_equals_unmerged(base, dora):
    reference, ours = build(base, dora, UNGROUPED)
    for conv in ("c1", "c2", "p2", "c3"):
        theirs = reference.base_model.model.get_submodule(conv).get_delta_weight("default")
        assert_close(ours.model.get_submodule(conv).delta_weight("default"), theirs)
    before = {c: ours.model.get_submodule(c).base_layer.weight.detach().clone() for c in UNGROUPED}
    unmerged = run(ours)
    ours.merge_adapter()
    assert_close(run(ours), unmerged, atol=1e-5, rtol=1e-4)  # W + sBA rounds once more
    reference.merge_adapter()
    assert_close(run(ours), run(reference), atol=1e-5, rtol=1e-4)
    ours.unmerge_adapter()
    for c, weight in before.items():
        assert_close(ours.model.get_submodule(c).base_layer.weight, weight)
    assert_close(run(ours), unmerged)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, LORA_LAYERS) for m in merged.modules())
    assert_close(run(merged), unmerged, atol=1e-5, rtol=1e-4)


def test_a_grouped_conv_refuses_to_merge_as_peft_and_nothing_is_merged(base):
    reference, ours = build(base, False)
    with pytest.raises(NotImplementedError, match="groups=2"):
        ours.merge_adapter()
    with pytest.raises(NotImplementedError):
        reference.merge_adapter()
    assert not any(m.merged_adapters for m in ours.modules() if isinstance(m, LORA_LAYERS))
    with pytest.raises(NotImplementedError, match="dense conv"):
        ours.model.g2.delta_weight("default")


def test_dense_delta_of_a_grouped_conv_is_the_adapter(base):
    """B after A equals one groups=1 conv with the dense weight: what inspect measures for grouped convs."""
    _, ours = build(base, False)
    layer = ours.model.g2
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        adapter = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        dense = F.conv2d(x, layer.dense_delta("default"), padding=1)
    assert_close(dense, adapter)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_files_load_both_ways(base, dora, tmp_path):
    reference, ours = build(base, dora)
    with torch.no_grad():
        for p in ours.parameters():  # ours now differs from PEFT's: the files must carry it
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    theirs_file, ours_file = file_tensors(tmp_path / "peft"), file_tensors(tmp_path / "ours")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        loaded_here = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_close(run(loaded_by_peft), run(ours))
    assert_close(run(loaded_here), run(reference))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradients_equal_peft(base, dora):
    reference, ours = build(base, dora)
    reference.train(), ours.train()
    for model in (reference, ours):
        model(*inputs()).square().mean().backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(got) == set(expected)
    for name, grad in got.items():
        assert_close(grad, expected[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_with_dropout_equals_peft(base, dora):
    """With dropout on, DoRA re-runs the base conv on the dropped input (no bias): the same masks from one seed."""
    torch.manual_seed(2)
    config = dict(kwargs(dora), lora_dropout=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).train()
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config)).train()
    move_magnitudes(reference)  # at m = ||W + sBA|| the re-run base term has weight m / norm - 1 = 0
    ours.load_state_dict(reference.state_dict())
    outputs = []
    for model in (reference, ours):
        torch.manual_seed(7)
        outputs.append(model(*inputs()))
    torch.manual_seed(8)
    assert (ours(*inputs()) - outputs[1]).abs().max() > 1e-4, "dropout must be active"
    assert_close(outputs[1], outputs[0])


def test_mixed_adapter_batch_equals_peft_and_per_adapter_runs(base):
    reference, ours = build(base, False)
    torch.manual_seed(4)
    second = dict(kwargs(False, ["c2", "g2", "c3"]), r=2, lora_alpha=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.add_adapter("other", peft.LoraConfig(**second))
        ours.add_adapter("other", LoraConfig(**second))
    ours.load_state_dict(reference.state_dict())
    names = ["other", "__base__", "default"]
    x = inputs()
    with torch.no_grad():
        expected = reference(*x, adapter_names=names)
        got = ours(*x, adapter_names=names)
        ours.set_adapter("other")
        alone = ours(*x)
    assert_close(got, expected)
    assert_close(got[0], alone[0])
    assert (got[0] - got[2]).abs().max() > 1e-3


def test_the_layers_are_adapters():
    assert issubclass(LoraConv, Adapter) and isinstance(LoraConv(nn.Conv2d(2, 2, 1)), LORA_LAYERS)


def test_rank_not_a_multiple_of_groups_is_refused_like_peft(base):
    config = dict(target_modules=["g2"], r=3)
    with pytest.raises(ValueError, match="multiple of 2"):
        get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))


def test_weight_based_inits_are_refused_for_convs(base):
    with pytest.raises(ValueError, match="not defined for conv layers"):
        get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["c2"], r=2, init_lora_weights="pissa"))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, padding=2, dilation=2),
                                  nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")], ids=["dilated", "reflect"])
def test_dilation_and_padding_mode_follow_the_base_so_merging_keeps_the_output(conv):
    """PEFT leaves lora_A at dilation 1 and zero padding: a shape error on the dilated base, and on the reflect
    one a merged model that differs from the unmerged. Here lora_A takes both from the base."""
    torch.manual_seed(5)
    model = nn.Sequential(conv)
    pm = get_peft_model(model, LoraConfig(target_modules=["0"], r=2, init_lora_weights=False)).eval()
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        base_out = conv(x)
        unmerged = pm(x)
        assert (unmerged - base_out).abs().max() > 1e-3
        pm.merge_adapter()
        assert_close(pm(x), unmerged, atol=1e-5, rtol=1e-4)
