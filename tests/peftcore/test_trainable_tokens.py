"""Issue 17: `trainable_token_indices` (chosen rows of the token embedding train) against the installed peft, on a
tiny random Llama, untied and tied (tie_word_embeddings: the lm_head shares the rows), PEFT's weights copied
key for key: outputs, gradients, trainable counts, files both ways, merges, several adapters."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from peftcore import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from tests.peftcore.lora.test_vs_peft import LLAMA, VOCAB, file_keys, perturb  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

ROWS = [3, 7, 50]
DELTA = "trainable_tokens_delta"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=request.param))
    perturb(model.parameters())
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def ids():
    return torch.tensor([[3, 7, 9, 50, 11, 2], [4, 3, 3, 60, 7, 1]])


def logits(model, **kwargs):
    out = model(input_ids=ids(), **kwargs)
    return getattr(out, "logits", out)


def pair(folder, indices=ROWS, **kwargs):
    """The same adapter in both libraries, its rows and LoRA factors moved away from their init, ours holding
    PEFT's tensors (loaded by PEFT's in-memory keys: equal key sets, or load_state_dict fails)."""
    kwargs = dict(target_modules=["q_proj"], r=2, **kwargs)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(**kwargs, trainable_token_indices=indices, init_lora_weights=False)
    theirs = peft.get_peft_model(hf, config)
    ours = get_peft_model(load_pretrained(folder), LoraConfig(**kwargs, trainable_token_indices=indices))
    perturb(p for n, p in theirs.named_parameters() if p.requires_grad)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def trainable(model) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def test_rows_train_as_in_peft_outputs_gradients_and_counts(folder):
    theirs, ours = pair(folder)
    assert trainable(ours) == trainable(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mine, ref = logits(ours), logits(theirs)
    assert_close(mine, ref)
    mine.square().mean().backward()
    ref.square().mean().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads[name], msg=name)
    delta = next(p for n, p in ours.named_parameters() if DELTA in n)
    assert delta.grad.abs().sum() > 0  # non-triviality: the rows are on the gradient path


def test_only_the_chosen_rows_change_and_a_new_adapter_changes_nothing(folder):
    base = load_pretrained(folder)
    with torch.no_grad():
        before = logits(base)
        model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], trainable_token_indices=ROWS))
        assert_close(logits(model), before)  # rows start as copies of the table's, LoRA's B as zeros
        table = model.get_base_model().model.embed_tokens
        delta = table.token_adapter.trainable_tokens_delta["default"]
        delta.add_(1.0)
        out = table(torch.arange(VOCAB))
        changed = (out != table.token_adapter.base_layer(torch.arange(VOCAB))).any(-1).nonzero().flatten()
        assert changed.tolist() == ROWS
        assert not torch.allclose(logits(model), before)


def test_saved_files_are_peft_files_both_ways(folder, tmp_path):
    theirs, ours = pair(folder)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    assert sum(DELTA in k for k in file_keys(tmp_path / "ours")) == 1  # tied: the head's rows are the embedding's
    with torch.no_grad():
        reference = logits(theirs)
        in_ours = PeftModel.from_pretrained(load_pretrained(folder), tmp_path / "theirs")
        assert_close(logits(in_ours), reference)
        hf = transformers.LlamaForCausalLM.from_pretrained(folder)
        assert_close(logits(peft.PeftModel.from_pretrained(hf, tmp_path / "ours")), reference)


def test_merge_equals_unmerged_and_unmerge_restores_the_table(folder):
    _, ours = pair(folder)
    table = ours.get_base_model().model.embed_tokens.token_adapter.base_layer.weight
    original = table.detach().clone()
    with torch.no_grad():
        unmerged = logits(ours)
        ours.merge_adapter()
        assert_close(logits(ours), unmerged)
        assert not torch.equal(table, original)
        ours.unmerge_adapter()
        assert torch.equal(table, original)
        plain = ours.merge_and_unload()
        assert type(plain.model.embed_tokens) is nn.Embedding and type(plain.lm_head) is nn.Linear
        assert_close(logits(plain), unmerged)


def test_named_tables_with_their_own_rows_as_in_peft(folder):
    theirs, ours = pair(folder, indices={"embed_tokens": [1, 2], "lm_head": [1, 2]})
    assert trainable(ours) == trainable(theirs)
    with torch.no_grad():
        assert_close(logits(ours), logits(theirs))


def test_two_adapters_with_disjoint_rows_run_together_and_in_a_mixed_batch(folder):
    model = get_peft_model(load_pretrained(folder), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[7]))
    rows = model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta
    with torch.no_grad():
        base = logits(model.get_base_model())
        for p in rows.values():
            p.add_(1.0)
        model.set_adapter(["default", "other"])
        both = logits(model)
        model.set_adapter("default")
        only_default = logits(model)
        model.eval()
        mixed = logits(model, adapter_names=["default", "__base__"])
    assert not torch.allclose(both, only_default)
    assert_close(mixed[0], only_default[0])
    assert_close(mixed[1], base[1])


def test_overlapping_rows_cannot_be_active_together(folder):
    model = get_peft_model(load_pretrained(folder), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 4]))
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="both train token 3"):
        logits(model)
    with pytest.raises(ValueError, match="both train token 3"):
        model.merge_adapter()
    assert not model.backend.is_merged()


@pytest.mark.parametrize("kwargs, error", [
    (dict(trainable_token_indices=[VOCAB]), "are not rows of a table of 101 tokens"),
    (dict(trainable_token_indices=[3, 3]), "repeat a token"),
    (dict(trainable_token_indices={"wte": [1]}), "matches no module; embeddings and linear layers are: "),
    (dict(trainable_token_indices={"q_proj": [1]}), "which LoRA adapts already"),
    (dict(trainable_token_indices={"embed_tokens": [1]}, modules_to_save=["embed_tokens"]), "pick one of the two"),
])
def test_bad_rows_are_one_line_errors(folder, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error) as e:
        get_peft_model(load_pretrained(folder), LoraConfig(target_modules=["q_proj"], **kwargs))
    assert "\n" not in str(e.value)


def test_peftcore_on_a_transformers_model_equals_peft(folder):
    theirs, _ = pair(folder)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder)
    ours = get_peft_model(hf, LoraConfig(target_modules=["q_proj"], r=2, trainable_token_indices=ROWS))
    ours.load_state_dict(theirs.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        assert_close(logits(ours), logits(theirs))


def test_loaded_for_inference_the_rows_are_frozen_and_weighted_combination_is_refused(folder, tmp_path):
    _, ours = pair(folder)
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_pretrained(folder), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    trained = PeftModel.from_pretrained(load_pretrained(folder), tmp_path, is_trainable=True)
    assert any(DELTA in n for n, p in trained.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="trains token rows"):
        trained.add_weighted_adapter(["default"], [1.0], "combined")


def test_safe_merge_refuses_rows_that_are_not_finite_and_merges_nothing(folder):
    _, ours = pair(folder)
    table = ours.get_base_model().model.embed_tokens.token_adapter
    original = table.base_layer.weight.detach().clone()
    with torch.no_grad():
        table.trainable_tokens_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
        ours.merge_adapter(safe_merge=True)
    assert not ours.backend.is_merged() and torch.equal(table.base_layer.weight, original)


@pytest.mark.parametrize("order", [("embed_tokens", "lm_head"), ("lm_head", "embed_tokens")])
def test_tied_tables_named_in_either_order_share_one_set_of_rows(folder, order, tmp_path):
    model = get_peft_model(load_pretrained(folder), LoraConfig(target_modules=["q_proj"],
                                                               trainable_token_indices={k: [1, 2] for k in order}))
    rows = [n for n, p in model.named_parameters() if DELTA in n]
    tied = load_pretrained(folder).config.tie_word_embeddings
    assert len(rows) == 1 if tied else len(rows) == 2
    model.save_pretrained(tmp_path)
    assert sum(DELTA in k for k in file_keys(tmp_path)) == len(rows)
    if tied:
        with pytest.raises(ValueError, match="tied tables need the same rows"):
            get_peft_model(load_pretrained(folder), LoraConfig(
                target_modules=["q_proj"], trainable_token_indices={order[0]: [1, 2], order[1]: [3]}))
