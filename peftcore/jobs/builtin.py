"""The built-in base model of the default job (`[model] builtin = "tiny-llama"`), made in code.

Nothing is downloaded: a byte-level BPE tokenizer is trained on the bundled support data, a small
Llama is initialised from a fixed seed and then briefly pre-trained (a full fine-tune through
`peftcore.training.loop.train`, no adapter) on generic text: the *prompts* of the support data (the
rendered instruction + input, or the system / user turns of a chat, never an answer) and the
intent-classification messages. So the LoRA fine-tune afterwards adapts a model that knows the
prompt format and the languages, and what it learns about the answers comes from the fine-tune.

The result is an ordinary Hugging Face checkpoint folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) cached under `$PEFTCORE_CACHE` (default
`~/.cache/peftcore`) as `builtin-<name>-<hash>`; the hash covers the spec, the corpus files and
BUILD_VERSION, so a change to any of them builds afresh, and an unchanged one is never rebuilt.
The build is seeded end to end: the same spec on the same machine gives the same weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when the build procedure changes: old caches are then ignored


def find_examples() -> Path:
    """examples/ beside the package in a source checkout (an editable install), else the copy a wheel
    installs as peftcore/examples (pyproject's package-data): the default job runs from either."""
    here = Path(__file__).resolve().parents[1]  # the peftcore package folder (this is peftcore/jobs/builtin.py)
    for folder in (here.parent / "examples", here / "examples"):
        if (folder / "data").is_dir():
            return folder
    raise FileNotFoundError(f"peftcore's examples/ (the default recipe and its data) are neither in {here.parent} "
                            f"nor in {here}: reinstall peftcore")


EXAMPLES_DIR = find_examples()
DATA_DIR = EXAMPLES_DIR / "data"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class BuiltinSpec:
    vocab_size: int = 1536
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    pretrain_steps: int = 120
    pretrain_batch_size: int = 16
    pretrain_length: int = 128  # packed rows of this many tokens
    pretrain_learning_rate: float = 3e-3
    seed: int = 0
    threads: int = 1  # the matrices are small: one thread is faster than two on a busy 2-core machine
    tokenizer_corpus: str = "support_train.jsonl"  # its prompt texts (see train_tokenizer)
    pretrain_corpus: tuple[str, ...] = ("support_train.jsonl", "intent_train.jsonl")


# Tests swap in a smaller spec (monkeypatch this dict) to build in a second or two.
BUILTINS: dict[str, BuiltinSpec] = {"tiny-llama": BuiltinSpec()}


class BuiltinError(ValueError):
    """An unknown built-in name, or an installation without the bundled data."""


def cache_root() -> Path:
    if os.environ.get("PEFTCORE_CACHE"):
        return Path(os.environ["PEFTCORE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftcore"


def spec_for(name: str) -> BuiltinSpec:
    if name not in BUILTINS:
        raise BuiltinError(f"unknown builtin model {name!r}; available: {', '.join(sorted(BUILTINS))}")
    return BUILTINS[name]


def corpus_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise BuiltinError(f"the built-in model is made from {path}, which this installation lacks "
                           "(install peftcore from a source checkout, or set [model] path to a checkpoint)")
    return path


def cache_dir(name: str) -> Path:
    spec = spec_for(name)
    digest = hashlib.sha256(json.dumps({"spec": asdict(spec), "version": BUILD_VERSION}, sort_keys=True).encode())
    for file in sorted({spec.tokenizer_corpus, *spec.pretrain_corpus}):
        digest.update(corpus_file(file).read_bytes())
    return cache_root() / f"builtin-{name}-{digest.hexdigest()[:12]}"


def ensure_builtin(name: str = "tiny-llama") -> Path:
    """The checkpoint folder of built-in `name`, built (once) if the cache lacks it."""
    folder = cache_dir(name)
    if (folder / "model.safetensors").is_file():
        return folder
    spec = spec_for(name)
    log.info(f"building the built-in base model {name!r} (once; cached in {folder})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(spec, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same build first: keep theirs
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# -- the text -----------------------------------------------------------------------------
def prompt_texts(path: Path) -> list[str]:
    """What customers and briefs say, as plain documents: instructions, inputs, system and user turns
    and classification texts; never an output or an assistant turn. Each distinct text once.

    Plain text, not the prompt template: a base that had seen "### Response:" followed by the end
    of a document would have learnt that nothing follows it, the opposite of what fine-tuning wants.
    """
    from peftcore.data.records import read_records

    texts = []
    for record, _ in read_records(path):
        texts += [record[key] for key in ("instruction", "input", "text") if isinstance(record.get(key), str)]
        texts += [m["content"] for m in record.get("messages", []) if m.get("role") in ("system", "user")]
    return list(dict.fromkeys(t for t in texts if t.strip()))


def pretraining_texts(spec: BuiltinSpec) -> list[str]:
    return [text for name in spec.pretrain_corpus for text in prompt_texts(corpus_file(name))]


def train_tokenizer(spec: BuiltinSpec, folder: Path) -> None:
    """Byte-level BPE (GPT-2's pre-tokenizer and decoder), `<s>` prepended by the post-processor.

    Trained on the same prompt texts the model is pre-trained on: a token that only the answers
    use would keep a random embedding and an untrained output row, which LoRA (adapting the
    attention projections) cannot teach; with byte-level BPE every answer still encodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # one pass, ties broken by pair order: the same texts always give the same merges
    tokenizer.train_from_iterator(prompt_texts(corpus_file(spec.tokenizer_corpus)), trainer)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]),
    ])
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {**special, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec.max_position_embeddings,
              "clean_up_tokenization_spaces": False, "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build(spec: BuiltinSpec, folder: Path) -> None:
    from peftcore.data.records import IGNORE_INDEX, TokenizedExample, pack
    from peftcore.models import LlamaConfig, from_config, load_tokenizer, save_pretrained
    from peftcore.training.config import TrainConfig
    from peftcore.training.loop import train

    train_tokenizer(spec, folder)
    tokenizer = load_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        torch.manual_seed(spec.seed)
        model = from_config(config)
        rows = []
        for text in pretraining_texts(spec):
            ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
            rows.append(TokenizedExample("pretrain", ids, [IGNORE_INDEX, *ids[1:]]))
        packed = [row for row in pack(rows, spec.pretrain_length) if len(row.input_ids) > 1]
        n_params = sum(p.numel() for p in model.parameters())
        log.info(f"  tokenizer: byte-level BPE, {len(tokenizer)} tokens; model: Llama, "
                 f"{n_params / 1e6:.2f}M parameters; pre-training on {sum(len(r.input_ids) for r in packed):,} "
                 f"tokens of prompt text for {spec.pretrain_steps} steps")
        train_config = TrainConfig(learning_rate=spec.pretrain_learning_rate, batch_size=spec.pretrain_batch_size,
                                   max_steps=spec.pretrain_steps, warmup_steps=max(1, spec.pretrain_steps // 10),
                                   eval_every=0, patience=0, seed=spec.seed, progress=True)
        with tempfile.TemporaryDirectory() as work:
            train(model, packed, [], train_config, work, tokenizer.pad_token_id,
                  save_adapter=lambda out: None)  # the checkpoint is the model itself, saved below
            losses = [json.loads(line)["loss"] for line in (Path(work) / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.set_num_threads(threads)
    model.eval()
    save_pretrained(model, folder)
    record = {"spec": asdict(spec), "version": BUILD_VERSION, "pretrain_loss_first": losses[0],
              "pretrain_loss_last": sum(losses[-5:]) / len(losses[-5:])}
    (folder / "builtin.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(f"  pre-training loss {losses[0]:.2f} -> {record['pretrain_loss_last']:.2f}")
