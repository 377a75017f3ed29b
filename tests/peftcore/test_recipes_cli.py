"""`peftcore recipes` (list / cp) and `peftcore train NAME`: the shipped recipes, found from any folder."""
import dataclasses
from pathlib import Path

import pytest

from peftcore.cli import main, recipe_summary
from peftcore.jobs import train as train_job
from peftcore.jobs.recipe import DEFAULT_RECIPE_NAME, EXAMPLES_DIR, SECTIONS, RecipeError, load_recipe

SHIPPED = sorted(p.stem for p in EXAMPLES_DIR.glob("*.toml"))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def path_values(recipe) -> list[str]:
    """Every path field's value (the fields with metadata path), multi-task sections included."""
    sections = [getattr(recipe, name) for name in SECTIONS if name != "adapter"] + list(recipe.tasks.values())
    return [getattr(section, f.name) for section in sections for f in dataclasses.fields(section)
            if f.metadata.get("path") and getattr(section, f.name)  # (a multi-task [data] train is "")
            and not getattr(section, f.name).startswith("pip:")]


def test_the_list_has_one_line_per_shipped_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any folder
    code, out, err = run(capsys, "recipes")
    assert code == 0 and not err
    lines = out.splitlines()
    assert SHIPPED and [line.split()[0] for line in lines[:-1]] == SHIPPED
    assert all(len(line.split(None, 1)) == 2 for line in lines[:-1])  # a name and a description
    default = Path(DEFAULT_RECIPE_NAME).stem
    assert [line.split()[0] for line in lines if "[the default job]" in line] == [default]
    assert "peftcore recipes cp NAME DEST" in lines[-1]
    assert run(capsys, "recipes", "ls")[1] == out


def test_a_summary_is_the_comments_first_sentence_without_asides():
    assert recipe_summary((EXAMPLES_DIR / "support_dora.toml").read_text()) == (
        "DoRA on the built-in tiny Llama's q_proj / v_proj.")
    lora = recipe_summary((EXAMPLES_DIR / "support_lora.toml").read_text())
    assert lora.startswith("LoRA on the built-in tiny model")
    assert recipe_summary("# The default job: this.\n#\n# What it is.\n[model]\n") == "What it is."  # marked apart
    assert recipe_summary("# One (with an (inner) aside); more.\n# Next line.\n\n[model]\n") == "One"
    assert recipe_summary("[model]\n") == ""
    assert len(recipe_summary("# " + "word " * 100)) <= 100


@pytest.mark.parametrize("name", SHIPPED)
def test_a_copy_validates_and_means_the_same_recipe(capsys, tmp_path, monkeypatch, name):
    """What `peftcore train COPY --max-steps 1` validates, without training: the copy's data paths are
    absolute, exist, and the recipe equals the shipped one."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "recipes", "cp", name, "mine")
    copy = tmp_path / "mine"
    assert code == 0 and not err and f"peftcore train {copy.name}" in out
    recipe = load_recipe(copy, ["train.max_steps=1"])
    assert recipe.train.max_steps == 1
    assert path_values(recipe) and all(Path(p).is_absolute() and Path(p).exists() for p in path_values(recipe))
    assert recipe.to_dict() == load_recipe(EXAMPLES_DIR / f"{name}.toml", ["train.max_steps=1"]).to_dict()
    text = copy.read_text()
    assert text.startswith("# A copy of peftcore's shipped recipe") and "data paths are\n# absolute" in text
    assert (EXAMPLES_DIR / f"{name}.toml").read_text() in text.replace(str(EXAMPLES_DIR) + "/", "")  # comments kept


def test_dest_a_folder_or_a_file_name_with_or_without_toml(capsys, tmp_path):
    assert run(capsys, "recipes", "cp", "support_dora.toml", str(tmp_path))[0] == 0
    assert (tmp_path / "support_dora.toml").is_file()
    assert run(capsys, "recipes", "cp", "support_dora", str(tmp_path / "new") + "/")[0] == 0  # a folder to make
    assert (tmp_path / "new" / "support_dora.toml").is_file()
    assert run(capsys, "recipes", "cp", "multitask", str(tmp_path / "a" / "b.toml"))[0] == 0
    assert load_recipe(tmp_path / "a" / "b.toml").tasks.keys() == {"intent", "support"}


def test_an_existing_file_is_never_overwritten(capsys, tmp_path):
    dest = tmp_path / "support_dora.toml"
    dest.write_text("mine")
    for target in (dest, tmp_path):
        code, out, err = run(capsys, "recipes", "cp", "support_dora", str(target))
        assert code == 2 and not out
        assert err == f"peftcore recipes: error: {dest} exists; not overwriting it: delete it or pick another DEST\n"
    assert dest.read_text() == "mine"


def test_an_unknown_name_lists_the_shipped_ones_closest_first(capsys, tmp_path):
    code, out, err = run(capsys, "recipes", "cp", "suport_dora", str(tmp_path))
    assert code == 2 and not list(tmp_path.iterdir())
    assert err.startswith("peftcore recipes: error: suport_dora: no such recipe file; shipped recipes: support_dora, ")
    assert err.count("\n") == 1 and all(name in err for name in SHIPPED)


def test_train_finds_a_shipped_recipe_by_name_from_any_folder(capsys, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_job, "run_train", lambda recipe, output_dir, **_: seen.update(recipe=recipe))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "support_dora", "--max-steps", "1", "--output-dir", "run")
    assert code == 0, err
    assert seen["recipe"].adapter.method == "dora" and seen["recipe"].train.max_steps == 1
    assert Path(seen["recipe"].data.train) == EXAMPLES_DIR / "data" / "support_train.jsonl"


def test_train_with_an_unknown_name_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "support_dorra")
    assert code == 2
    assert err.startswith("peftcore train: error: support_dorra: no such recipe file; shipped recipes: support_dora, ")
    assert err.count("\n") == 1


def test_load_recipe_by_name_and_a_local_file_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("support_prefix.toml").adapter.method == "prefix"
    assert load_recipe("support_prefix").adapter.method == "prefix"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (tmp_path / "support_prefix.toml").write_text('[model]\nbuiltin = "tiny-llama"\n[data]\ntrain = "data/t.jsonl"\n')
    assert load_recipe("support_prefix.toml").adapter.method == "lora"  # the file here, not the shipped one
    with pytest.raises(RecipeError, match="no such recipe file$"):
        load_recipe(Path("sub") / "support_prefix.toml")  # a path, not a name: no shipped fallback
