"""Issue 18: VeRA (and IA3, LoHa, LoKr, OFT) beside modules_to_save through PeftModel, against the installed peft.

Two ways a module comes to be saved whole: named in the config (`modules_to_save=["lm_head"]`, a causal Llama), and
implied by the task (SEQ_CLS: PEFT adds "classifier" and "score" to modules_to_save, lora_backend's
add_head_to_modules_to_save), on a BERT classifier. PEFT's adapter tensors and its modules_to_save copies are
perturbed, then loaded into ours key for key. Checked per case: outputs, every gradient, parameter counts, the
config's resolved modules_to_save, saved file keys and tensors (PEFT 0.21.2 saves a copy under the module's plain
path, `base_model.model.classifier.weight`, and VeRA's shared projections once, `base_model.vera_A`), files loaded
both ways, merge == unmerged, merge_and_unload keeping the trained copy."""
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from peftcore import PeftModel, get_peft_model  # noqa: E402
from peftcore.ia3 import IA3Config  # noqa: E402
from peftcore.lycoris import LoHaConfig, LoKrConfig  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from peftcore.oft import OFTConfig  # noqa: E402
from peftcore.vera import VeraConfig  # noqa: E402
from tests.peftcore.lora.test_vs_peft import FAMILIES, LLAMA, hf_logits, inputs, our_logits  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

# vera_drawn_lm_head: both libraries warn that save_projection=False rebuilds the projections from the PRNG key
pytestmark = [pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning"),
              pytest.mark.filterwarnings("ignore:save_projection=False:UserWarning")]
BERT = FAMILIES["bert"][1]
CASES = {  # name: (family, our config class, PEFT's, the options both take, the modules saved whole)
    "vera_seq_cls": ("bert", VeraConfig, peft.VeraConfig,
                     dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4), ["classifier"]),
    "vera_seq_cls_and_pooler": ("bert", VeraConfig, peft.VeraConfig,
                                dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4,
                                     modules_to_save=["pooler.dense"]), ["bert.pooler.dense", "classifier"]),
    "vera_lm_head": ("llama", VeraConfig, peft.VeraConfig,
                     dict(target_modules=["q_proj", "v_proj"], r=8, modules_to_save=["lm_head"]), ["lm_head"]),
    "vera_drawn_lm_head": ("llama", VeraConfig, peft.VeraConfig,
                           dict(target_modules=["o_proj"], r=4, save_projection=False, modules_to_save=["lm_head"]),
                           ["lm_head"]),
    "ia3_seq_cls": ("bert", IA3Config, peft.IA3Config,
                    dict(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                         feedforward_modules=["output.dense"]), ["classifier"]),
    "loha_seq_cls_and_pooler": ("bert", LoHaConfig, peft.LoHaConfig,
                                dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=2,
                                     modules_to_save=["pooler.dense"]), ["bert.pooler.dense", "classifier"]),
    "lokr_lm_head": ("llama", LoKrConfig, peft.LoKrConfig,
                     dict(target_modules=["v_proj", "up_proj"], r=2, decompose_both=True,
                          modules_to_save=["lm_head"]), ["lm_head"]),
    "oft_seq_cls": ("bert", OFTConfig, peft.OFTConfig,
                    dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=0, oft_block_size=8),
                    ["classifier"]),
}
ADAPTER_WORDS = ("vera_lambda", "ia3_l", "hada_", "lokr_", "oft_R")
AUTO = {"bert": transformers.AutoModelForSequenceClassification, "llama": transformers.AutoModelForCausalLM}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a tiny random checkpoint folder."""
    made = {}
    for family, config in (("bert", transformers.BertConfig(**BERT)), ("llama", transformers.LlamaConfig(**LLAMA))):
        torch.manual_seed(0)
        made[family] = tmp_path_factory.mktemp(family)
        AUTO[family].from_config(config).save_pretrained(made[family])
    return made


def hf_model(folders, family):
    return AUTO[family].from_pretrained(folders[family]).eval()


def perturb(params) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))


def pair(folders, case: str):
    """(PEFT's model, ours): PEFT's trainable tensors (adapters and copies) perturbed, then loaded into ours."""
    family, ours_type, theirs_type, kwargs, _ = CASES[case]
    # each config gets its own lists: PEFT extends the modules_to_save list it is given in place
    theirs = peft.get_peft_model(hf_model(folders, family), theirs_type(**copy.deepcopy(kwargs)))
    ours = get_peft_model(load_pretrained(folders[family]), ours_type(**copy.deepcopy(kwargs)))
    torch.manual_seed(1)
    perturb(p for p in theirs.parameters() if p.requires_grad)
    ours.load_state_dict(theirs.state_dict())  # the same keys, or this fails
    return theirs.eval(), ours.eval()


def same_names(ours: list[str], theirs: list[str]) -> bool:
    """The same modules_to_save entries; the order may differ (test_the_implied_heads_come_in_pefts_order)."""
    return sorted(ours) == sorted(theirs)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", CASES)
def test_outputs_gradients_counts_and_saved_modules_equal_peft(folders, case):
    family, *_, whole = CASES[case]
    theirs, ours = pair(folders, case)
    assert sorted(trainable(ours)) == sorted(trainable(theirs))
    copies = sorted({n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in trainable(ours)
                     if ".modules_to_save.default." in n})
    assert copies == whole  # each module saved whole trains as a copy, and nothing else does
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert same_names(ours.peft_config["default"].modules_to_save, theirs.peft_config["default"].modules_to_save)
    mine = our_logits(ours, family)
    assert_close(mine, hf_logits(theirs, family))
    with ours.disable_adapter():
        assert (our_logits(ours, family) - mine).abs().max() > 1e-3  # non-triviality: the adapter changes the output
    ids, mask = inputs(family)
    target = torch.randn_like(mine)
    (ours(ids, attention_mask=mask) * target).sum().backward()
    (theirs(input_ids=ids, attention_mask=mask).logits * target).sum().backward()
    reference = trainable(theirs)
    for name, p in trainable(ours).items():
        assert p.grad is not None, name
        assert_close(p.grad, reference[name].grad, atol=1e-5, rtol=1e-4)
    assert any(p.grad.abs().max() > 0 for n, p in trainable(ours).items() if ".modules_to_save." in n)


@pytest.mark.parametrize("case", CASES)
def test_the_trained_copy_not_the_original_gives_the_output(folders, case):
    family, *_, whole = CASES[case]
    _, ours = pair(folders, case)
    with torch.no_grad():
        adapted = our_logits(ours, family)
        for name in whole:
            wrapper = ours.model.get_submodule(name)
            wrapper.modules_to_save["default"].load_state_dict(wrapper.original_module.state_dict())
        assert (our_logits(ours, family) - adapted).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_files_are_peft_files_both_ways(folders, case, tmp_path):
    family, *_, whole = CASES[case]
    theirs, ours = pair(folders, case)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    mine, reference = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "theirs"))
    assert mine.keys() == reference.keys()
    for name in whole:  # PEFT 0.21.2 saves a copy under the module's plain path, not `...modules_to_save.default`
        assert f"base_model.model.{name}.weight" in mine
    assert not any("modules_to_save" in k or "original_module" in k for k in mine)
    if CASES[case][1] is VeraConfig:
        shared = sorted(k for k in mine if "vera_A" in k or "vera_B" in k)
        projection = CASES[case][3].get("save_projection", True)
        assert shared == (["base_model.vera_A", "base_model.vera_B"] if projection else [])
    for key, value in reference.items():
        assert torch.equal(mine[key], value), key
    configs = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")]
    assert same_names(configs[0]["modules_to_save"], configs[1]["modules_to_save"])
    expected = hf_logits(theirs, family)
    assert_close(our_logits(PeftModel.from_pretrained(load_pretrained(folders[family]), tmp_path / "theirs"), family),
                 expected)
    assert_close(hf_logits(peft.PeftModel.from_pretrained(hf_model(folders, family), tmp_path / "ours"), family),
                 expected)


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_keeps_the_trained_copy(folders, case):
    family, *_, whole = CASES[case]
    theirs, ours = pair(folders, case)
    with torch.no_grad():
        unmerged = our_logits(ours, family)
        ours.merge_adapter()
        assert_close(our_logits(ours, family), unmerged)
        ours.unmerge_adapter()
        plain = ours.merge_and_unload()
        assert not any(w in k for k in plain.state_dict() for w in ("modules_to_save", "original_module",
                                                                    *ADAPTER_WORDS))
        assert_close(our_logits(plain, family), unmerged)
        merged = theirs.merge_and_unload()
    for name in whole:
        assert_close(plain.get_submodule(name).weight, merged.get_submodule(name).weight)


def test_the_implied_heads_come_in_pefts_order(folders):
    _, ours_type, theirs_type, kwargs, _ = CASES["vera_seq_cls"]
    theirs = peft.get_peft_model(hf_model(folders, "bert"), theirs_type(**copy.deepcopy(kwargs)))
    ours = get_peft_model(load_pretrained(folders["bert"]), ours_type(**copy.deepcopy(kwargs)))
    assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
