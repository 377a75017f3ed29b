"""The `peftcore` command: train, eval, generate, predict, merge, export, inspect, inspect-model, recipes.

    peftcore train [CONFIG.toml | RECIPE_NAME] [--output-dir DIR] [--max-steps N] [--resume | --overwrite]
                   [--set section.key=value ...]
    peftcore eval --adapter DIR [--base PATH|builtin] [--data FILE] [--glossary FILE] [--output report.md]
    peftcore generate --adapter DIR [--base PATH] "prompt text"
    peftcore predict --adapter DIR [--task NAME] [--context TEXT] [--top-k K] INPUT ...
    peftcore predict --adapter DIR [--task NAME] --data FILE.jsonl [--output OUT.jsonl] [--batch-size N]
    peftcore merge --adapter DIR [--base PATH] --output OUT
    peftcore export --adapter DIR [--base PATH] --format gguf --output FILE.gguf [--outtype f32|f16]
    peftcore inspect ADAPTER_DIR [--base PATH] [--compare DIR] [--top-k K] [--output-dir DIR]
    peftcore inspect-model PATH
    peftcore recipes [cp NAME DEST | keys]

Exit codes: 0 done, 1 failed, 2 bad input (usage, recipe, data), 130 interrupted.

`inspect-model` never loads weights: it builds the model a config.json describes on the meta
device (shapes only) and reads just the headers of the safetensors files, so it describes a 70B
checkpoint as fast as a tiny one.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys
import textwrap
from pathlib import Path

from peftcore import __version__
from peftcore._logging import log_to_stdout
from peftcore.data.records import one_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftcore", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"peftcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect-model", help="describe a Hugging Face checkpoint folder without loading its weights"
    )
    inspect.add_argument("path", type=Path, help="folder with config.json (and model.safetensors or shards), "
                                                 "or builtin:tiny-llama / pip:<package>")
    inspect.set_defaults(run=inspect_model)
    add_job_commands(commands)
    add_predict_command(commands)
    add_export_command(commands)
    add_inspect_command(commands)
    add_recipes_command(commands)
    return parser


def add_inspect_command(commands) -> None:
    cmd = commands.add_parser("inspect", help="what an adapter learned: LoRA per layer (low-rank: no dense dW); "
                                              "LoHa / LoKr per layer (dense dW); AdaLoRA's ranks kept and over "
                                              "training; IA3 / VeRA vectors, OFT angles; prompt methods per virtual "
                                              "token (prefix: per layer)")
    cmd.add_argument("adapter", type=Path, help="adapter folder (peftcore's or HF PEFT's)")
    cmd.add_argument("--base", help="base checkpoint folder (or builtin:/pip: name): "
                                    "LoRA / LoHa / LoKr ||dW||/||W|| and amplification, prompts' nearest "
                                    "vocabulary tokens; "
                                    "default: the adapter's base_model_name_or_path")
    cmd.add_argument("--compare", type=Path, help="a second LoRA adapter: subspace similarity phi per shared module")
    cmd.add_argument("--top-k", type=int, default=5, help="prompt methods: nearest vocabulary tokens per virtual token")
    cmd.add_argument("--output-dir", type=Path,
                     help="where inspect.json and the PNG plots go (default: the adapter folder)")
    cmd.set_defaults(run=inspect_adapter_command)


def inspect_adapter_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.inspect import run_inspect

    run_inspect(args.adapter, args.base, args.compare, args.output_dir, args.top_k)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stdout()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"peftcore {args.command}: interrupted", file=sys.stderr)
        return 130
    except input_errors() as e:  # a bad recipe, data line or adapter folder: the user's to fix, no traceback
        print(f"peftcore {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except failures() as e:
        print(f"peftcore {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1


def input_errors() -> tuple[type[Exception], ...]:
    from peftcore.data.records import DataError
    from peftcore.jobs.bases import TaskError
    from peftcore.jobs.builtin import BuiltinError
    from peftcore.jobs.recipe import RecipeError
    from peftcore.jobs.run_folder import RunFolderError

    return RecipeError, DataError, TaskError, BuiltinError, RunFolderError


def failures() -> tuple[type[Exception], ...]:
    """What failed for a reason the message says (bad folders, JSON, headers, a full disk, a NaN run, a
    rank that died): one line, no traceback. CheckpointError is a ValueError."""
    from peftcore.training.distributed import DistributedError
    from peftcore.training.loop import TrainingError

    return OSError, ValueError, NotImplementedError, TrainingError, DistributedError


# ---- train / eval / generate / merge -------------------------------------------------------------

ADAPTER_HELP = "an adapter folder written by `peftcore train` (e.g. runs/<timestamp>/adapter)"
BASE_HELP = "base checkpoint folder, pip:<package> or builtin (default: the one the adapter records)"


def add_job_commands(commands) -> None:
    for add in (add_train_command, add_eval_command, add_generate_command, add_merge_command):
        add(commands)


def add_train_command(commands) -> None:
    train = commands.add_parser("train", help="fine-tune from a TOML recipe (none: the built-in default job)")
    train.add_argument("config", nargs="?", type=Path, help="recipe file, or a shipped recipe's name (`peftcore "
                                                             "recipes`; default: support_smollm2, embedded; with "
                                                             "--resume: the run's own recipe.json)")
    train.add_argument("--output-dir", type=Path,
                       help="where the run goes, an empty or new folder (default: runs/<timestamp>)")
    train.add_argument("--max-steps", type=int, help="shorthand for --set train.max_steps=N")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir (default: the latest in runs/) with the recipe it was "
                            "trained with (its recipe.json); a CONFIG or --set given must match it, but for max_steps")
    again.add_argument("--overwrite", action="store_true",
                       help="start a new run in an --output-dir that holds one: deletes that run's checkpoint/, best/, "
                            "adapter/, metrics and summary (other files stay)")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved recipe (after --set) as TOML and exit; `peftcore recipes keys`: "
                            "every key")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe value (a TOML literal, else a string); repeatable")
    train.set_defaults(run=train_command)


def add_eval_command(commands) -> None:
    evaluate = commands.add_parser("eval", help="score an adapter against its base (or a base alone): "
                                                "perplexity, BLEU/chrF, accuracy, ...")
    evaluate.add_argument("--adapter", type=Path, help=ADAPTER_HELP + "; none: the --base alone on --data")
    evaluate.add_argument("--base", help=BASE_HELP)
    evaluate.add_argument("--data", help="JSONL / JSON records (default: the recipe's [data] eval; "
                                         "a multi-task adapter: every [tasks.<name>] eval, one report section each)")
    evaluate.add_argument("--glossary",
                          help="terms file for glossary adherence (default: the recipe's [eval] glossary)")
    evaluate.add_argument("--output", type=Path, help="markdown report (default: report.md beside the adapter)")
    evaluate.add_argument("--max-records", type=int, help="generate for at most this many records")
    evaluate.set_defaults(run=eval_command)


def add_generate_command(commands) -> None:
    gen = commands.add_parser("generate", help="continue a prompt with an adapter (put in the training template), "
                                                "or with a base alone")
    gen.add_argument("prompt", help="the input text (rendered into the recipe's prompt template unless --raw)")
    gen.add_argument("--adapter", type=Path,
                     help=ADAPTER_HELP + " (default: none, the --base alone, in its chat template if any)")
    gen.add_argument("--base", help=BASE_HELP)
    gen.add_argument("--instruction", help="the template's {instruction} (default: the one the adapter's training "
                                           "records carried for the prompt's script, as its recipe record says)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the template")
    gen.add_argument("--chat", action="store_true",
                     help="for chat-trained adapters: the prompt as a user turn in the chat template "
                          "(--instruction: the system turn)")
    add_sampling_flags(gen)
    gen.add_argument("--seed", type=int, default=0, help="the sampling generator's seed, used when temperature > 0 "
                                                         "(default: 0)")
    gen.set_defaults(run=generate_command)


def add_merge_command(commands) -> None:
    merge = commands.add_parser("merge", help="fold a LoRA / DoRA adapter into its base: a plain checkpoint folder")
    merge.add_argument("--adapter", type=Path, required=True, help=ADAPTER_HELP)
    merge.add_argument("--base", help=BASE_HELP)
    merge.add_argument("--output", type=Path, required=True,
                       help="folder for config.json, model.safetensors, tokenizer")
    merge.add_argument("--into", choices=("original", "quantized"), default=None,
                       help="QLoRA adapters: merge into the base's original weights (default) or into the "
                            "dequantized weights the adapter trained against (LoftQ adapters: only these)")
    merge.set_defaults(run=merge_command)


def train_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.run_folder import recipe_for
    from peftcore.jobs.train import default_output_dir
    from peftcore.training import distributed

    overrides = list(args.overrides) + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    if args.print_config:  # the recipe a run would use, after --set, as TOML; nothing loads
        from peftcore.jobs.recipe_text import to_toml

        output_dir = (args.output_dir or default_output_dir(True)) if args.resume else None
        print(to_toml(recipe_for(args.config, output_dir, overrides).to_dict()), end="")
        return 0
    distributed.setup()  # under torchrun: join the group before the model loads (CUDA: pick this rank's GPU)
    try:
        # every rank writes into rank 0's run folder (their clocks could name different ones)
        output_dir = distributed.broadcast_object(args.output_dir or default_output_dir(args.resume))
        recipe = recipe_for(args.config, output_dir if args.resume else None, overrides)
        if distributed.is_main():
            print(f"recipe: {args.config or recipe.source}; run folder: {output_dir}")
        return train_until_done(args, recipe, output_dir)
    except RuntimeError as e:  # under torchrun: a collective that failed because another rank died
        failure = distributed.peer_failure(e)
        if failure is None:
            raise
        raise failure from e
    finally:
        distributed.teardown()


def train_until_done(args: argparse.Namespace, recipe, output_dir: Path) -> int:
    """run_train; Ctrl-C -> how to continue (from the last checkpoint, if one was written)."""
    from peftcore.jobs.train import run_train

    try:
        run_train(recipe, output_dir, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        hint = (f"; continue with: peftcore train --resume --output-dir {output_dir}"  # it reads the run's recipe
                if (output_dir / "checkpoint").is_dir() else
                " before the first checkpoint ([train] checkpoint_every); start again with --overwrite")
        print(f"peftcore train: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.eval import run_eval

    run_eval(args.adapter, args.base, args.data, args.glossary, args.output, args.max_records)
    return 0


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingOptions field (--max-new-tokens, --temperature, ...), its help the comment beside
    the field; unset ones keep the adapter's recorded [eval] values (a base alone: the field's default)."""
    from peftcore.jobs.recipe_text import field_comments
    from peftcore.models.generate import SamplingOptions

    meaning = field_comments(SamplingOptions)
    for f in dataclasses.fields(SamplingOptions):
        kind = float if "float" in str(f.type) else int
        default = "off" if f.default is None else f.default
        help_text = f"{meaning.get(f.name, '')} (default: the adapter's recipe [eval]; a base alone: {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, help=help_text.replace("%", "%%"))


def generate_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.generate import run_generate
    from peftcore.models.generate import SamplingOptions

    sampling = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingOptions)}
    print(run_generate(args.adapter, args.prompt, args.base, raw=args.raw, instruction=args.instruction, chat=args.chat,
                       sampling=sampling, seed=args.seed))
    return 0


def merge_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.merge import run_merge

    run_merge(args.adapter, args.output, args.base, into=args.into)
    return 0


def add_predict_command(commands) -> None:
    cmd = commands.add_parser("predict", help="a classification adapter's label or a qa adapter's answer span, "
                                              "for inputs given here or the records of a JSONL file")
    cmd.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="texts to classify, or (a qa task) questions about --context; or use --data")
    cmd.add_argument("--adapter", type=Path, required=True, metavar="DIR",
                     help="a classification, qa or multi-task adapter folder written by `peftcore train`")
    cmd.add_argument("--base", help="base checkpoint folder, pip:<package> or builtin "
                                    "(default: the one the adapter records)")
    cmd.add_argument("--task", metavar="NAME",
                     help="a multi-task adapter's task (default: its one classification / qa task)")
    cmd.add_argument("--context", metavar="TEXT", help="qa: the passage the INPUT questions are answered from "
                                                   "(default: none; required for qa inputs given here)")
    cmd.add_argument("--data", metavar="FILE",
                     help="JSONL / JSON records as the task's training data has them (\"text\"; qa: \"question\", "
                          "\"context\"); a record's \"label\" / \"answer\" is scored (default: none, the INPUTs)")
    cmd.add_argument("--output", type=Path, metavar="FILE",
                     help="with --data: the JSONL predictions, one line per record (default: stdout; the accuracy "
                          "line then goes to stderr)")
    cmd.add_argument("--top-k", type=int, default=3, metavar="K",
                     help="classification: the classes shown per input (default: 3)")
    cmd.add_argument("--batch-size", type=int, default=16, metavar="N", help="inputs per forward (default: 16)")
    cmd.set_defaults(run=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.predict import run_predict

    run_predict(args.adapter, args.inputs, args.data, args.output, task=args.task, context=args.context,
                top_k=args.top_k, batch_size=args.batch_size, base=args.base)
    return 0


def add_export_command(commands) -> None:
    export = commands.add_parser("export", help="write a LoRA adapter for another runtime: a llama.cpp "
                                                "LoRA-adapter GGUF (llama-cli -m BASE.gguf --lora FILE)")
    export.add_argument("--adapter", type=Path, required=True,
                        help="a LoRA adapter folder (peftcore's or HF PEFT's) over a Llama-family base")
    export.add_argument("--base", help="the base: a .gguf file, checkpoint folder or pip:<package> (default: the "
                                       "one the adapter records); gives the architecture and q/k head counts")
    export.add_argument("--format", choices=("gguf",), default="gguf", help="gguf: llama.cpp's LoRA adapter file")
    export.add_argument("--output", type=Path, required=True, help="the file to write, e.g. adapter.gguf")
    export.add_argument("--outtype", choices=("f32", "f16"), default="f32", help="tensor type of lora_a / lora_b")
    export.set_defaults(run=export_command)


def export_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.export import run_export

    run_export(args.adapter, args.output, args.format, args.base, outtype=args.outtype)
    return 0


# ---- recipes -------------------------------------------------------------------------------------

def add_recipes_command(commands) -> None:
    cmd = commands.add_parser("recipes", help="list the shipped recipes (examples/*.toml); "
                                              "`recipes cp NAME DEST` copies one to edit")
    actions = cmd.add_subparsers(dest="action", metavar="[ls | cp | keys]")
    actions.add_parser("ls", help="one line per shipped recipe (the default)")
    actions.add_parser("keys", help="every recipe key: type, default, meaning (from the dataclasses)")
    cp = actions.add_parser("cp", help="copy a shipped recipe; its data paths become absolute (the shipped files)")
    cp.add_argument("name", metavar="NAME", help="a name `peftcore recipes` lists, with or without .toml")
    cp.add_argument("dest", metavar="DEST", help="a folder (the copy keeps its name) or a file; never overwritten")
    cmd.set_defaults(run=recipes_command)


def recipes_command(args: argparse.Namespace) -> int:
    from peftcore.jobs.recipe import DEFAULT_RECIPE_NAME, EXAMPLES_DIR

    if args.action == "cp":
        return copy_recipe(args.name, args.dest)
    if args.action == "keys":
        from peftcore.jobs.recipe_text import key_reference

        print(key_reference(), end="")
        return 0
    files = sorted(EXAMPLES_DIR.glob("*.toml"))
    width = max((len(f.stem) for f in files), default=0)
    for file in files:
        default = " [the default job]" if file.name == DEFAULT_RECIPE_NAME else ""
        print(f"{file.stem:<{width}}  {recipe_summary(file.read_text(encoding='utf-8'))}{default}")
    print("train one from any folder: peftcore train NAME; edit a copy: peftcore recipes cp NAME DEST")
    return 0


def recipe_summary(text: str, width: int = 100) -> str:
    """The leading comment's first paragraph without its asides (parentheses), to its first sentence end.
    A paragraph starting "The default job" is skipped: the listing marks the default from DEFAULT_RECIPE_NAME."""
    comment = itertools.takewhile(lambda line: line.startswith("#"), text.splitlines())
    paragraphs = "\n".join(line.lstrip("#").strip() for line in comment).split("\n\n")
    summary = next((" ".join(p.split()) for p in paragraphs if p.strip() and not p.startswith("The default job")), "")
    while (shorter := re.sub(r"\s*\([^()]*\)", "", summary)) != summary:  # inner asides first
        summary = shorter
    summary = re.split(r"(?<=\.)\s|;\s", summary, maxsplit=1)[0]
    return textwrap.shorten(summary, width, placeholder=" ...")


def copy_recipe(name: str, dest_arg: str) -> int:
    """`peftcore recipes cp`: the copy names the shipped data by absolute path (a relative one would point
    beside the copy, where there is no data), and is validated as `peftcore train DEST` would before it is
    written; an existing file is never overwritten."""
    from peftcore.jobs.recipe import RecipeError, parse_recipe, shipped_recipe, tomllib

    source, dest = shipped_recipe(name), Path(dest_arg)
    if dest.is_dir() or dest_arg.endswith(("/", "\\")):  # (Path drops a trailing slash)
        dest = dest / source.name
    text = (f"# A copy of peftcore's shipped recipe {source.stem} (`peftcore recipes cp`): its data paths are\n"
            f"# absolute, the shipped files in {source.parent}; a relative path you write\n"
            "# is relative to this file.\n#\n"
            + absolute_paths(source.read_text(encoding="utf-8"), source.parent))
    parse_recipe(tomllib.loads(text), dest.name, dest.resolve().parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with dest.open("x", encoding="utf-8") as f:  # "x": refuse an existing file, even one made meanwhile
            f.write(text)
    except FileExistsError:
        raise RecipeError(f"{dest} exists; not overwriting it: delete it or pick another DEST") from None
    print(f"copied {source.stem} to {dest} (data paths made absolute: the shipped files); "
          f"train it: peftcore train {dest}")
    return 0


PATH_VALUE = re.compile(r"""^(\s*([\w-]+)\s*=\s*)(["'])([^"'\n]*)\3""")  # key = "value" (a TOML string)


def absolute_paths(text: str, base: Path) -> str:
    """Rewrite the recipe's relative path values (the fields with metadata path: [data] train, [eval] glossary,
    [tasks.<name>] train, ...) as base / value, line by line so the comments stay."""
    from peftcore.jobs.recipe import SECTIONS, TaskSection

    out, keys = [], set()
    for line in text.splitlines(keepends=True):
        if header := re.match(r"\s*\[([^\[\]]+)\]", line):
            name = header.group(1).strip()
            cls = TaskSection if name.startswith("tasks.") else SECTIONS.get(name)
            keys = {f.name for f in dataclasses.fields(cls) if f.metadata.get("path")} if cls else set()
        found = PATH_VALUE.match(line)
        if found and found.group(2) in keys and not found.group(4).startswith("pip:"):
            value = Path(found.group(4)).expanduser()
            if not value.is_absolute():  # json.dumps: a TOML basic string, escapes included
                line = found.group(1) + json.dumps(str(base / value)) + line[found.end():]
        out.append(line)
    return "".join(out)


# ---- inspect-model -------------------------------------------------------------------------------

def inspect_model(args: argparse.Namespace) -> int:
    from peftcore.jobs.inspect_model import describe_checkpoint

    for line in describe_checkpoint(args.path):
        print(line)
    return 0
