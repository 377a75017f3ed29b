"""Issue 18: the weight methods beyond LoRA (IA3, OFT) through PeftModel, against the installed peft on one tiny
random Llama, PEFT's adapter tensors perturbed and copied key for key: logits, trainable counts, files both
ways (keys and outputs), merge_and_unload, several adapters, and what one PeftModel refuses."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from peftcore import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftcore.ia3 import IA3Config  # noqa: E402
from peftcore.lycoris import LoHaConfig, LoKrConfig  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from peftcore.oft import OFTConfig  # noqa: E402
from peftcore.vera import VeraConfig  # noqa: E402
from tests.peftcore.lora.test_vs_peft import LLAMA, file_keys, perturb  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

CASES = {  # name: (our config class, PEFT's, the options both take)
    "ia3": (IA3Config, peft.IA3Config, dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"])),
    "oft": (OFTConfig, peft.OFTConfig, dict(target_modules=["q_proj", "up_proj"], r=0, oft_block_size=8)),
    "oft_bias": (OFTConfig, peft.OFTConfig, dict(target_modules=["q_proj"], oft_block_size=4, bias="oft_only")),
    "loha": (LoHaConfig, peft.LoHaConfig, dict(target_modules=["q_proj", "down_proj"], r=4, alpha=8)),
    "lokr": (LoKrConfig, peft.LoKrConfig, dict(target_modules=["v_proj", "up_proj"], r=2, decompose_both=True)),
    "vera": (VeraConfig, peft.VeraConfig, dict(target_modules=["q_proj", "v_proj"], r=8, projection_prng_key=5)),
    "vera_drawn": (VeraConfig, peft.VeraConfig, dict(target_modules=["o_proj"], r=4, save_projection=False)),
}
ADAPTER_WORDS = ("ia3_l", "oft_R", "hada_", "lokr_", "vera_lambda")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, attention_bias=True))
    perturb(model.parameters())
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def ids():
    return torch.tensor([[3, 7, 9, 50, 11, 2], [4, 3, 3, 60, 7, 1]])


def logits(model):
    out = model(input_ids=ids())
    return getattr(out, "logits", out)


def pair(folder, case):
    ours_type, theirs_type, kwargs = CASES[case]
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folder), theirs_type(**kwargs))
    ours = get_peft_model(load_pretrained(folder), ours_type(**kwargs))
    perturb(p for n, p in theirs.named_parameters() if any(w in n for w in ADAPTER_WORDS))
    ours.load_state_dict(theirs.state_dict())  # the same keys, or this fails
    return theirs, ours


def trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_trainable_parameters_equal_peft(folder, case):
    theirs, ours = pair(folder, case)
    assert trainable(ours) == trainable(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        mine = logits(ours)
        assert_close(mine, logits(theirs))
        with ours.disable_adapter():
            assert not torch.allclose(logits(ours), mine)  # non-triviality: the adapter changes the output


@pytest.mark.parametrize("case", CASES)
def test_files_are_peft_files_both_ways(folder, case, tmp_path):
    theirs, ours = pair(folder, case)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    with torch.no_grad():
        reference = logits(theirs)
        assert_close(logits(PeftModel.from_pretrained(load_pretrained(folder), tmp_path / "theirs")), reference)
        hf = transformers.LlamaForCausalLM.from_pretrained(folder)
        assert_close(logits(peft.PeftModel.from_pretrained(hf, tmp_path / "ours")), reference)


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_gives_the_plain_model_with_the_same_outputs(folder, case):
    _, ours = pair(folder, case)
    with torch.no_grad():
        unmerged = logits(ours)
        ours.merge_adapter(safe_merge=True)
        assert_close(logits(ours), unmerged)
        ours.unmerge_adapter()
        plain = ours.merge_and_unload()
        assert all(type(m).__module__.startswith(("torch", "peftcore.models")) for m in plain.modules())
        assert_close(logits(plain), unmerged)


def test_a_second_adapter_trains_alone_once_set_and_methods_do_not_mix(folder):
    model = get_peft_model(load_pretrained(folder), IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    model.add_adapter("other", IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    model.set_adapter("other")
    assert trainable(model) and all(n.endswith(".other") for n in trainable(model))
    with pytest.raises(ValueError, match="one model holds adapters of one method"):
        model.add_adapter("oft", OFTConfig(target_modules=["q_proj"], oft_block_size=8))
    with pytest.raises(TypeError, match="combines LoRA adapters"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    lora = get_peft_model(load_pretrained(folder), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="is OFT but adapter 'default' is LoRA"):
        lora.add_adapter("oft", OFTConfig(target_modules=["q_proj"], oft_block_size=8))

