"""AdaLoRA's adapter files against HF PEFT 0.21.2's: after the 15 training steps of pairs.py, and for a rank
pattern written by hand with a layer pruned to rank 0. A file holds only the triplets rank_pattern keeps (PEFT's
resize_state_dict_by_rank_pattern) and no ranknum; loading one shrinks the layers first (PEFT's
resize_modules_by_rank_pattern), ranknum staying init_r so the kept triplets compute what they did."""
import json

import peft
import pytest
import torch
import transformers
from safetensors import safe_open

from peftcore import PeftModel
from peftcore.adalora import AdaLoraLinear
from peftcore.models import load_pretrained
from tests.peftcore.adalora.pairs import SCHEDULE, logits, pair, train_pair
from tests.tolerances import assert_close

HAND_PATTERN = {  # ranks 0, 1, 2, 4, 3, 2 over the six layers
    "model.layers.0.self_attn.q_proj.lora_E": [False, False, False, False],
    "model.layers.0.self_attn.v_proj.lora_E": [False, True, False, False],
    "model.layers.0.mlp.down_proj.lora_E": [True, False, False, True],
    "model.layers.1.self_attn.q_proj.lora_E": [True, True, True, True],
    "model.layers.1.self_attn.v_proj.lora_E": [True, True, False, True],
    "model.layers.1.mlp.down_proj.lora_E": [False, True, True, False],
}


def file_shapes(folder) -> dict[str, tuple]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def file_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def saved_pattern(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]


def load_both_ways(llama_folder, tmp_path, hf, ours):
    """Save both; -> (PEFT's model on our file, ours on PEFT's file)."""
    hf.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs_on_ours = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(llama_folder),
                                                    tmp_path / "ours")
    ours_on_theirs = PeftModel.from_pretrained(load_pretrained(llama_folder), tmp_path / "theirs")
    return theirs_on_ours.eval(), ours_on_theirs.eval()


@pytest.fixture(scope="module")
def trained(llama_folder):
    hf, ours = pair(llama_folder)
    train_pair(hf, ours)
    return hf, ours


def test_trained_files_hold_the_pruned_tensors_peft_writes(llama_folder, trained, tmp_path):
    hf, ours = trained
    theirs_on_ours, ours_on_theirs = load_both_ways(llama_folder, tmp_path, hf, ours)
    shapes = file_shapes(tmp_path / "ours")
    assert shapes == file_shapes(tmp_path / "theirs")  # keys and pruned shapes
    assert not [k for k in shapes if "ranknum" in k] and len(shapes) == 18
    pattern = saved_pattern(tmp_path / "ours")
    assert pattern == saved_pattern(tmp_path / "theirs") == ours.peft_config["default"].rank_pattern
    ranks = {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert sum(ranks.values()) == 6 * SCHEDULE["target_r"] and len(set(ranks.values())) > 1
    for module, rank in ranks.items():
        key = f"base_model.model.{module}"
        assert shapes[f"{key}.lora_A"][0] == shapes[f"{key}.lora_E"][0] == rank
        assert shapes[f"{key}.lora_B"][1] == rank
    mine, theirs = file_tensors(tmp_path / "ours"), file_tensors(tmp_path / "theirs")
    for key, tensor in theirs.items():
        assert_close(mine[key], tensor)
    with torch.no_grad():
        reference, ours_logits = logits(hf), logits(ours)
        assert_close(ours_logits, reference)
        assert_close(logits(theirs_on_ours), reference)
        assert_close(logits(ours_on_theirs), ours_logits)
        with ours.disable_adapter():
            assert (logits(ours) - ours_logits).abs().max() > 1e-3  # the trained adapter changes the output


def apply_hand_pattern(hf, ours) -> None:
    """Mask E as PEFT's allocator does and set rank_pattern where its training would (its keys name the adapter)."""
    with torch.no_grad():
        for p in (p for n, p in hf.named_parameters() if "lora_E" in n):
            p.normal_()  # E leaves 0 (init_lora_weights=True), so the triplets matter
    ours.load_state_dict(hf.state_dict())
    hf.base_model.rankallocator.mask_using_rank_pattern(hf.base_model.model, {f"{k}.default": v for k, v in
                                                                                HAND_PATTERN.items()})
    hf.peft_config["default"].rank_pattern = {f"{k}.default": v for k, v in HAND_PATTERN.items()}
    ours.base_model.rankallocator.apply_pattern(HAND_PATTERN)
    ours.peft_config["default"].rank_pattern = dict(HAND_PATTERN)


def test_a_layer_pruned_to_rank_zero_saves_and_loads_both_ways(llama_folder, tmp_path):
    hf, ours = pair(llama_folder)
    with torch.no_grad():
        unpruned = logits(hf)
    apply_hand_pattern(hf, ours)
    with torch.no_grad():
        reference = logits(hf)
        assert (reference - unpruned).abs().max() > 1e-3  # the dropped triplets carried something
        assert_close(logits(ours), reference)
    theirs_on_ours, ours_on_theirs = load_both_ways(llama_folder, tmp_path, hf, ours)
    shapes = file_shapes(tmp_path / "ours")
    assert shapes == file_shapes(tmp_path / "theirs")
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert shapes[f"{q0}.lora_A"] == (0, 32) and shapes[f"{q0}.lora_B"] == (32, 0)
    assert shapes[f"{q0}.lora_E"] == (0, 1)
    assert saved_pattern(tmp_path / "ours") == saved_pattern(tmp_path / "theirs") == HAND_PATTERN
    layer = dict(ours_on_theirs.named_modules())[f"{q0}"]
    assert isinstance(layer, AdaLoraLinear) and layer.lora_A["default"].shape == (0, 32)
    assert layer.ranknum["default"].item() == SCHEDULE["init_r"]
    with torch.no_grad():
        assert_close(logits(theirs_on_ours), reference)
        assert_close(logits(ours_on_theirs), reference)


def test_merge_and_unload_after_loading_a_pruned_file(llama_folder, tmp_path):
    hf, ours = pair(llama_folder)
    apply_hand_pattern(hf, ours)
    hf.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_pretrained(llama_folder), tmp_path)
    theirs = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(llama_folder), tmp_path)
    with torch.no_grad():
        unmerged = logits(loaded)
        plain = loaded.merge_and_unload()
        assert not [m for m in plain.modules() if isinstance(m, AdaLoraLinear)]
        merged = logits(plain)
        assert_close(merged, unmerged)
        assert_close(merged, logits(theirs.merge_and_unload()))
        assert (merged - logits(load_pretrained(llama_folder))).abs().max() > 1e-3  # the merge changed weights


def test_training_a_pruned_adapter_further_is_refused_in_one_line(llama_folder, tmp_path):
    hf, ours = pair(llama_folder)
    apply_hand_pattern(hf, ours)
    hf.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_pretrained(llama_folder), tmp_path, is_trainable=True)
    with pytest.raises(ValueError, match="pruned"):
        loaded.step_hooks()
