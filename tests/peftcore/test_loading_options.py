"""PEFT 0.21.2's loading / saving options against the installed peft, on test_api_parity's tiny random Llama:
from_pretrained(config=, key_mapping=), load_adapter(key_mapping=), save_pretrained(safe_serialization=False,
save_embedding_layers=, is_main_process=), set_adapter(inference_mode=), and ignore_mismatched_sizes in
set_peft_model_state_dict and from_pretrained. Each: the same call in both libraries gives the same outputs,
requires_grad, files (one library's files load in the other) and warnings; misuse is a one-line error.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import warnings  # noqa: E402

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import peftcore  # noqa: E402
from peftcore import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model  # noqa: E402
from peftcore.adapter_io import AdapterLoadError  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from tests.peftcore import test_api_parity as api  # noqa: E402
from tests.peftcore.lora.test_vs_peft import file_keys  # noqa: E402
from tests.peftcore.test_api_parity import CONFIGS, hf_model, logits, pair, trainable  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

folder = api.folder  # its fixture: the tiny random Llama checkpoint
CAT = CONFIGS["cat"]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def files(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def saved(folder, tmp_path_factory):
    """PEFT's "default" adapter (random, perturbed weights) saved as safetensors, with the model that saved it."""
    theirs, _ = pair(folder, {"default": CAT})
    path = tmp_path_factory.mktemp("saved")
    theirs.eval().save_pretrained(path)
    return path, theirs


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return logits(model)


# -- 1. from_pretrained(config=) ----------------------------------------------------------------------------
@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_config_object_replaces_adapter_config_json_as_in_peft(folder, saved, tmp_path, is_trainable):
    path, reference = saved
    adapter = tmp_path / "no_config"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    theirs_config, ours_config = peft.LoraConfig(**CAT), LoraConfig(**CAT)
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), adapter, config=theirs_config, is_trainable=is_trainable)
    ours = PeftModel.from_pretrained(load_pretrained(folder), adapter, config=ours_config, is_trainable=is_trainable)
    assert ours.peft_config["default"].inference_mode is theirs.peft_config["default"].inference_mode is \
        (not is_trainable)
    assert trainable(ours) == trainable(theirs) and bool(trainable(ours)) is is_trainable
    assert ours.training is theirs.training is is_trainable
    assert ours_config.inference_mode is False  # ours sets a copy; PEFT sets the object passed
    assert_close(outputs(ours.eval()), outputs(reference))


def test_a_config_that_is_not_a_peft_config_is_refused_as_in_peft(folder, saved):
    with pytest.raises(ValueError, match="The input config must be a PeftConfig"):
        peft.PeftModel.from_pretrained(hf_model(folder), saved[0], config=dict(CAT))
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(load_pretrained(folder), saved[0], config=dict(CAT))
    assert "The input config must be a PeftConfig, got <class 'dict'>" in one_line(err)


# -- 2. key_mapping ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def renamed(saved, tmp_path_factory):
    """The saved adapter as an older architecture would have named it: `decoder.` where the model has `model.`."""
    path = tmp_path_factory.mktemp("renamed")
    tensors = load_file(saved[0] / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.model.", "base_model.model.decoder."): v for k, v in tensors.items()},
              path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text((saved[0] / "adapter_config.json").read_text())
    return path


KEY_MAPPING = {r"^decoder\.": "model.", r"^unused\.": "model."}


def test_key_mapping_renames_checkpoint_keys_as_in_peft(folder, saved, renamed):
    reference = outputs(saved[1])
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), renamed, key_mapping=KEY_MAPPING)
    ours = PeftModel.from_pretrained(load_pretrained(folder), renamed, key_mapping=KEY_MAPPING)
    assert_close(outputs(theirs), reference)
    assert_close(outputs(ours), reference)
    theirs.load_adapter(renamed, "again", key_mapping=KEY_MAPPING)
    ours.load_adapter(renamed, "again", key_mapping=KEY_MAPPING)
    theirs.set_adapter("again")
    ours.set_adapter("again")
    assert_close(outputs(theirs), reference)
    assert_close(outputs(ours), reference)


def test_key_mapping_errors_are_one_line(folder, renamed, tmp_path):
    with pytest.raises(AdapterLoadError, match="fits no parameter"):  # PEFT only warns of missing keys here
        PeftModel.from_pretrained(load_pretrained(folder), renamed)
    ours = PeftModel.from_pretrained(load_pretrained(folder), renamed, key_mapping=KEY_MAPPING)
    with pytest.raises(AdapterLoadError) as err:  # PEFT keeps one of the two tensors, silently
        ours.load_adapter(renamed, "clash", key_mapping={r"^decoder\.layers\.\d": "model.layers.0"})
    assert "renames both" in one_line(err) and list(ours.peft_config) == ["default"]
    with pytest.raises(ValueError) as err:
        ours.load_adapter(renamed, "bad", key_mapping={"(": "x"})
    assert "not a valid regex" in one_line(err)
    get_peft_model(load_pretrained(folder), PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="An error occurred while trying to load a PEFT state_dict with key_mapping"):
        peft.PeftModel.from_pretrained(hf_model(folder), tmp_path, key_mapping=KEY_MAPPING)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(load_pretrained(folder), tmp_path, key_mapping=KEY_MAPPING)
    assert "prompt_embeddings only" in one_line(err)


# -- 3. save_pretrained(safe_serialization=False) --------------------------------------------------------------
def test_a_bin_save_is_peft_s_file_and_loads_both_ways(folder, tmp_path):
    theirs, ours = pair(folder, {"default": CAT})
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=False)
    ours.save_pretrained(tmp_path / "ours")  # a .safetensors first: the .bin save must replace it
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    assert files(tmp_path / "ours") == files(tmp_path / "peft") == \
        ["README.md", "adapter_config.json", "adapter_model.bin"]
    ours_bin = torch.load(tmp_path / "ours" / "adapter_model.bin", weights_only=True)
    theirs_bin = torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True)
    assert ours_bin.keys() == theirs_bin.keys() and all(torch.equal(v, theirs_bin[k]) for k, v in ours_bin.items())
    expected = outputs(theirs)
    assert_close(outputs(peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "ours")), expected)
    assert_close(outputs(PeftModel.from_pretrained(load_pretrained(folder), tmp_path / "peft")), expected)


def test_a_prompt_adapter_saved_as_bin_loads_in_peft(folder, tmp_path):
    ours = get_peft_model(load_pretrained(folder), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path)
    prompts = [model.prompt_encoder["default"].embedding.weight for model in (theirs, ours)]
    assert torch.equal(*prompts)
    back = PeftModel.from_pretrained(load_pretrained(folder), tmp_path)
    assert_close(outputs(back), outputs(ours))


# -- 4. set_adapter(inference_mode=) -------------------------------------------------------------------------
def test_set_adapter_in_inference_mode_freezes_as_in_peft(folder):
    configs = {"cat": {**CAT, "modules_to_save": ["lm_head"]}, "dog": CONFIGS["dog"]}
    theirs, ours = pair(folder, configs)
    for model in (theirs, ours):
        model.set_adapter("cat", inference_mode=True)
    assert trainable(ours) == trainable(theirs) == []
    assert_close(outputs(ours), outputs(theirs))  # cat runs, frozen
    for model in (theirs, ours):
        model.add_adapter("bird", (peft.LoraConfig if model is theirs else LoraConfig)(target_modules=["k_proj"]))
    assert trainable(ours) == trainable(theirs) == []  # adding an adapter keeps the active one frozen, as PEFT
    for model in (theirs, ours):
        model.set_adapter("cat")
    assert trainable(ours) == trainable(theirs) != []
    assert any("modules_to_save.cat" in n for n in trainable(ours))


# -- 5. ignore_mismatched_sizes ------------------------------------------------------------------------------
BAD_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def caught(call) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in seen if "ignore_mismatched_sizes" in str(w.message)]


def test_set_peft_model_state_dict_skips_mismatched_sizes_as_peft(folder):
    theirs, ours = pair(folder, {"default": CAT})
    state = peft.get_peft_model_state_dict(theirs)
    state = {k: torch.zeros_like(v) for k, v in state.items()} | {BAD_KEY: torch.zeros(3, 32)}
    before = ours.state_dict()[BAD_KEY.replace(".weight", ".default.weight")].clone()
    theirs_result, theirs_warned = caught(lambda: peft.set_peft_model_state_dict(theirs, state,
                                                                                 ignore_mismatched_sizes=True))
    ours_result, ours_warned = caught(lambda: peftcore.set_peft_model_state_dict(ours, state,
                                                                                 ignore_mismatched_sizes=True))
    assert len(ours_warned) == len(theirs_warned) == 1
    assert ours_warned[0] == theirs_warned[0].replace(type(theirs).__name__, "PeftModel")
    assert set(ours_result.missing_keys) == set(theirs_result.missing_keys)
    assert ours_result.unexpected_keys == theirs_result.unexpected_keys == []
    skipped = BAD_KEY.replace(".weight", ".default.weight")
    assert skipped in ours_result.missing_keys and torch.equal(ours.state_dict()[skipped], before)
    assert_close(outputs(ours), outputs(theirs))  # the other tensors loaded (zeros), the skipped one kept
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.set_peft_model_state_dict(theirs, state)
    with pytest.raises(AdapterLoadError) as err:
        peftcore.set_peft_model_state_dict(ours, state)
    assert "ignore_mismatched_sizes=True skips" in one_line(err)


def test_from_pretrained_skips_mismatched_sizes_as_peft(folder, saved, tmp_path):
    tensors = load_file(saved[0] / "adapter_model.safetensors")
    save_file({**tensors, BAD_KEY: torch.zeros(3, 32)}, tmp_path / "adapter_model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text((saved[0] / "adapter_config.json").read_text())
    torch.manual_seed(5)
    theirs, theirs_warned = caught(lambda: peft.PeftModel.from_pretrained(
        hf_model(folder), tmp_path, config=peft.LoraConfig(**CAT), ignore_mismatched_sizes=True))
    ours, ours_warned = caught(lambda: PeftModel.from_pretrained(
        load_pretrained(folder), tmp_path, ignore_mismatched_sizes=True))
    assert len(ours_warned) == len(theirs_warned) == 1
    key = BAD_KEY.replace(".weight", ".default.weight")
    ours.load_state_dict({key: theirs.state_dict()[key]}, strict=False)  # the skipped tensor's random init
    assert_close(outputs(ours), outputs(theirs))
    with pytest.raises(AdapterLoadError, match="has shape"):
        PeftModel.from_pretrained(load_pretrained(folder), tmp_path)
    with pytest.raises(AdapterLoadError) as err:
        PeftModel.from_pretrained(load_pretrained(folder), tmp_path, ignore_mismatched_sizes=True,
                                  low_cpu_mem_usage=True)
    assert "meta device" in one_line(err)


# -- 6. save_embedding_layers, is_main_process, refused options ---------------------------------------------
@pytest.mark.parametrize("targets, value", [(["q_proj"], True), (["q_proj", "embed_tokens"], False),
                                            (["q_proj", "embed_tokens"], True)])
def test_save_embedding_layers_saves_the_keys_peft_saves(folder, tmp_path, targets, value):
    theirs, ours = pair(folder, {"default": {**CAT, "target_modules": targets}})
    with torch.no_grad():  # a moved base table: what loads differs when it is saved
        next(p for n, p in theirs.named_parameters() if "embed_tokens" in n and "lora" not in n).add_(1.0)
    ours.load_state_dict(theirs.state_dict())
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=value)
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=value)
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "peft")
    assert any("embed_tokens" in k and "lora" not in k for k in file_keys(tmp_path / "ours")) is value
    assert set(peftcore.get_peft_model_state_dict(ours, save_embedding_layers=value)) == file_keys(tmp_path / "peft")
    reference = outputs(peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "peft"))
    assert_close(outputs(peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "ours")), reference)
    assert_close(outputs(PeftModel.from_pretrained(load_pretrained(folder), tmp_path / "peft")), reference)
    if value:  # the saved table brings the moved one back
        assert_close(reference, outputs(theirs))


def test_auto_saves_a_resized_embedding_as_peft(folder, tmp_path):
    """A transformers model wrapped directly (get_input_embeddings), its vocabulary grown past its config.json's."""
    models = []
    for lib in (peft, peftcore):
        model = hf_model(folder)
        model.resize_token_embeddings(model.config.vocab_size + 3)
        config = lib.LoraConfig(target_modules=["q_proj"], base_model_name_or_path=str(folder))
        models.append(lib.get_peft_model(model, config))
    for model, name in zip(models, ("peft", "ours")):
        with pytest.warns(UserWarning, match="embedding layer has been resized"):
            model.save_pretrained(tmp_path / name)
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "peft")
    assert "base_model.model.model.embed_tokens.weight" in file_keys(tmp_path / "ours")


def test_not_the_main_process_writes_nothing_as_in_peft(folder, tmp_path):
    theirs, ours = pair(folder)
    theirs.save_pretrained(tmp_path / "peft", is_main_process=False)
    ours.save_pretrained(tmp_path / "ours", is_main_process=False)
    assert files(tmp_path / "ours") == files(tmp_path / "peft") == ["cat", "dog"]  # empty folders, as PEFT's


def test_save_options_peftcore_refuses_are_one_line_errors(folder, tmp_path):
    ours = get_peft_model(load_pretrained(folder), LoraConfig(**CAT))
    (tmp_path / "file").write_text("")
    calls = {"path_initial_model_for_weight_conversion": lambda: ours.save_pretrained(
                 tmp_path / "a", path_initial_model_for_weight_conversion=str(tmp_path / "init")),
             "should be a directory": lambda: ours.save_pretrained(tmp_path / "file"),
             "True, False or 'auto'": lambda: ours.save_pretrained(tmp_path / "a", save_embedding_layers="yes")}
    for needle, call in calls.items():
        with pytest.raises((ValueError, NotImplementedError)) as err:
            call()
        assert needle in one_line(err)
    prompt = get_peft_model(load_pretrained(folder), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError) as err:
        prompt.save_pretrained(tmp_path / "p", save_embedding_layers=True)
    assert "prompts only" in one_line(err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="should be a directory"):
        peft.get_peft_model(hf_model(folder), peft.LoraConfig(**CAT)).save_pretrained(tmp_path / "file")
