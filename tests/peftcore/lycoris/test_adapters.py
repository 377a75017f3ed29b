"""Several LoHa / LoKr adapters in one model, mixed-adapter batches, half-precision bases, dropout in training,
against HF PEFT where PEFT has the feature (PEFT's LyCORIS layers take no adapter_names: the mixed batch is
checked against PEFT run once per adapter)."""
import copy

import peft
import pytest
import torch

from peftcore.lora.layer import Adapter
from tests.peftcore.lycoris.tiny import (
    METHODS,
    block,
    features,
    ours_state,
    pair,
    peft_adapter_params,
    peft_layers,
    perturb,
)
from tests.tolerances import assert_close

ALL = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SECOND = dict(target_modules=["q_proj", "v_proj", "up_proj"], r=2, alpha=3)  # a subset: layers without "other"
FIRST = {"loha": dict(target_modules=ALL, r=3), "lokr": dict(target_modules=ALL, r=1, decompose_both=True)}


def two_adapters(method: str):
    """PEFT's model and ours with adapters "default" (every module) and "other" (three), both perturbed."""
    peft_cls, our_cls, inject = METHODS[method]
    theirs, ours, layers = pair(method, block(), **FIRST[method])
    theirs.add_adapter("other", peft_cls(**SECOND))
    perturb(peft_adapter_params(theirs))
    inject(ours, our_cls(**SECOND), "other")
    ours.load_state_dict(ours_state(theirs), strict=True)
    return theirs, ours, layers


def set_active(theirs, layers, names):
    for layer in peft_layers(theirs).values():
        layer.set_adapter(names)
    for layer in layers.values():
        layer.active_adapters = list(names)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_several_active_adapters_add_up_as_in_peft(method):
    theirs, ours, layers = two_adapters(method)
    x = features()
    outs = {}
    for names in (["default"], ["other"], ["default", "other"]):
        set_active(theirs, layers, names)
        outs[tuple(names)] = ours(x)
        assert_close(outs[tuple(names)], theirs(x))
    assert (outs[("default", "other")] - outs[("default",)]).abs().max() > 1e-3
    for layer in layers.values():  # both merged, in turn: the sum again
        layer.merge()
    assert_close(ours(x), outs[("default", "other")])


def route(layers, names):
    """Every layer takes `adapter_names=names` (what PeftModel's hooks will pass)."""
    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}
    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers.values()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mixed_batch_rows_equal_per_adapter_runs(method):
    theirs, ours, layers = two_adapters(method)
    x = features(batch=5)
    names = ["other", "__base__", "default", "other", "default"]
    hooks = route(layers, names)
    mixed = ours(x)
    for handle in hooks:
        handle.remove()
    for row, name in enumerate(names):
        if name == "__base__":
            with theirs.disable_adapter():
                expected = theirs(x[row:row + 1])
        else:
            set_active(theirs, layers, [name])
            expected = theirs(x[row:row + 1])
        assert_close(mixed[row:row + 1], expected)
    for layer in layers.values():
        layer.merge(["default"])
    route(layers, names)
    with pytest.raises(RuntimeError, match="mixed-adapter batch needs unmerged adapters"):
        ours(x)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_dtypes_as_in_peft(method, dtype, autocast):
    """autocast_adapter_dtype=True: float32 factors on a half base (PEFT's cast_adapter_dtype); False: the base's
    dtype. The output keeps the input's dtype; merged weights equal PEFT's."""
    peft_cls, our_cls, inject = METHODS[method]
    model = block().to(dtype)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_cls(**FIRST[method]), autocast_adapter_dtype=autocast)
    perturb(peft_adapter_params(theirs))
    ours = copy.deepcopy(model)
    layers = inject(ours, our_cls(**FIRST[method]), "default", autocast_adapter_dtype=autocast)
    ours.load_state_dict(ours_state(theirs), strict=True)
    want = torch.float32 if autocast else dtype
    assert {p.dtype for layer in layers.values() for p in layer.adapter_params("default")} == {want}
    assert {p.dtype for p in peft_adapter_params(theirs)} == {want}
    x = features(dtype=dtype)
    out = ours(x)
    assert out.dtype == dtype
    assert_close(out, theirs(x))
    theirs.merge_adapter()
    for name, layer in layers.items():
        layer.merge()
        assert_close(layer.base_layer.weight, peft_layers(theirs)[name].base_layer.weight)


@pytest.mark.parametrize("method, extra", [("loha", {}), ("lokr", dict(rank_dropout_scale=True)), ("lokr", {}),
                                           ("loha", dict(module_dropout=0.0))])  # PEFT draws rand(1) at p = 0 too
def test_dropout_in_training_equals_pefts_under_a_seed(method, extra):
    """PEFT draws module dropout (torch.rand(1)) and the rank-dropout row mask on the CPU generator; ours draws
    the same numbers in the same order, so a seeded training step gives PEFT's output. Eval: no dropout. LoHa
    always rescales the kept rows, LoKr only with rank_dropout_scale."""
    kwargs = dict(FIRST[method], rank_dropout=0.5, module_dropout=0.3) | extra
    theirs, ours, _ = pair(method, block(), **kwargs)
    x = features()
    evaluated = ours(x)
    assert_close(evaluated, theirs(x))
    theirs.train(), ours.train()
    trained = []
    for seed in range(4):
        torch.manual_seed(seed)
        expected = theirs(x)
        torch.manual_seed(seed)
        trained.append(ours(x))
        assert_close(trained[-1], expected)
    assert all((t - evaluated).abs().max() > 1e-4 for t in trained)  # the dropouts acted
    assert (trained[0] - trained[1]).abs().max() > 1e-4  # and differ by seed


@pytest.mark.parametrize("method", sorted(METHODS))
def test_layers_satisfy_the_adapter_protocol_and_delete_cleanly(method):
    _, ours, layers = two_adapters(method)
    layer = layers["q_proj"]
    assert isinstance(layer, Adapter)
    assert layer.in_features == layer.out_features == 12
    layer.merge(["other"])
    with pytest.raises(ValueError, match="unmerge before deleting"):
        layer.delete_adapter("other")
    layer.unmerge()
    layer.active_adapters = ["default", "other"]
    layer.delete_adapter("other")
    assert layer.active_adapters == ["default"] and "other" not in layer.r and "other" not in layer.scaling
    assert not [k for k in layer.state_dict() if k.endswith(".other")]
    assert sum(1 for _ in layer.adapter_params("other")) == 0
    layer.disable_adapters = True
    assert_close(layer(features()), layer.base_layer(features()))
