"""BERT encoders: `BertModel` (hidden states, pooler, mean pooling) and `BertForSequenceClassification`.

Module names follow transformers (`embeddings.word_embeddings`, `encoder.layer.0.attention.self.query`,
...) so checkpoints load key for key and LoRA `target_modules` such as `["query", "value"]` mean
what they mean in HF PEFT.

Dropout follows transformers on the hidden states and before the classifier; the dropout on the
attention probabilities is not applied (the shared `attend` runs SDPA without it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attend, build_attention_mask
from .cache import KVCache

# Checkpoint keys that are not weights: old transformers saved these index buffers.
SKIPPED_KEYS = {"embeddings.position_ids", "embeddings.token_type_ids"}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1  # kept for config.json; see the module docstring
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in transformers
    problem_type: str | None = None  # one of PROBLEM_TYPES; None: inferred from the labels
    num_labels: int | None = None  # derived from id2label when that is given
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    architectures: list[str] | None = None  # set by the model class that holds the config
    model_type: str = "bert"
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back on save

    def __post_init__(self):
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (BERT uses exact 'gelu')")
        position_type = self.extra.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported; supported: 'absolute'")
        if self.extra.get("is_decoder") or self.extra.get("add_cross_attention"):
            raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        if self.problem_type not in (None, *PROBLEM_TYPES):
            raise ValueError(f"problem_type {self.problem_type!r} is unknown; supported: {', '.join(PROBLEM_TYPES)}")
        self._init_labels()

    def _init_labels(self):
        # transformers' rule: id2label decides num_labels unless an explicit num_labels disagrees.
        if self.id2label is not None:
            self.id2label = {int(i): label for i, label in self.id2label.items()}
        if self.id2label is None or (self.num_labels is not None and self.num_labels != len(self.id2label)):
            self.id2label = {i: f"LABEL_{i}" for i in range(2 if self.num_labels is None else self.num_labels)}
            self.label2id = None
        self.num_labels = len(self.id2label)
        if self.label2id is None:
            self.label2id = {label: i for i, label in self.id2label.items()}

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_hf(self) -> dict:
        d = {**self.extra, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}}
        d.pop("num_labels")  # transformers derives it from id2label
        d["id2label"] = {str(i): label for i, label in self.id2label.items()}  # JSON object keys are strings
        d["architectures"] = self.architectures or ["BertModel"]
        return d


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, H) -> (B, H): the mean over real tokens (sentence-transformers' pooling)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None]  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
        x = x + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h, n_head = config.hidden_size, config.num_attention_heads
        if h % n_head:
            raise ValueError(f"hidden_size {h} is not a multiple of num_attention_heads {n_head}")
        self.n_head, self.head_dim = n_head, h // n_head
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, mask, past_k=None, past_v=None):
        B, T, _ = x.shape
        heads = (B, T, self.n_head, self.head_dim)
        # each (B, n_head, T, hd)
        q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (self.query, self.key, self.value))
        if past_k is not None:  # a learned prefix (prefix tuning): every token attends to it too
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return attend(q, k, v, mask, causal=False), k, v  # (B, T, H)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): transformers' BertSelfOutput and BertOutput alike."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)  # transformers' name: keys read `attention.self.query`
        self.output = BertResidualOutput(config.hidden_size, config)

    def forward(self, x, mask, past_k=None, past_v=None):
        attended, k, v = self.self(x, mask, past_k, past_v)
        return self.output(attended, x), k, v


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) gelu, transformers' "gelu"


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, x, mask, past_k=None, past_v=None):
        x, k, v = self.attention(x, mask, past_k, past_v)
        return self.output(self.intermediate(x), x), k, v


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))  # the first ([CLS]) token, (B, H)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """transformers' BERT init: normal weights, zero biases, zero padding row, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def own_config(config: BertConfig, model: nn.Module) -> BertConfig:
    """A copy naming the model's class, so save_pretrained writes the right `architectures`."""
    return replace(config, architectures=[type(model).__name__], extra=dict(config.extra))


class BertModel(nn.Module):
    """Token ids (or embeddings) -> last hidden states (B, T, H); `pool` gives transformers' pooler_output."""

    config_class = BertConfig

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = own_config(config, self)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.gradient_checkpointing = False
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    def tie_weights(self):
        pass  # no tied parameters in the encoder or the classification head

    def init_buffers(self):
        pass  # positions come from arange at forward time: nothing derived to rebuild

    def checkpoint_key(self, key: str) -> str | None:
        key = key.removeprefix("bert.")  # checkpoints saved from a task model (BertForMaskedLM, ...)
        if key.startswith("cls.") or key in SKIPPED_KEYS:  # the MLM / NSP heads are not part of this model
            return None
        return key

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.pooler(hidden)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                cache=None):
        """`cache`: a KVCache holding a learned prefix; its positions come first (as in transformers)."""
        past_len = cache.seq_len if cache is not None else 0
        if position_ids is None and past_len:
            T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = torch.arange(past_len, past_len + T, device=self.pooler.dense.weight.device)[None]
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, H)
        mask = build_attention_mask(attention_mask, x.shape[1], past_len, False, x.device)
        for i, layer in enumerate(self.encoder.layer):
            past_k, past_v = cache.layer(i) if cache is not None else (None, None)
            if self.gradient_checkpointing and self.training:
                x, k, v = checkpoint(layer, x, mask, past_k, past_v, use_reentrant=False)
            else:
                x, k, v = layer(x, mask, past_k, past_v)
            if cache is not None:
                cache.store(i, k, v)
        return x

    def new_cache(self):
        return KVCache(self.config.num_hidden_layers)


class BertForSequenceClassification(nn.Module):
    """-> logits (B, num_labels) from the pooled first token, as transformers computes them."""

    config_class = BertConfig
    computes_causal_lm_loss = False  # a classifier: the training loop takes its logits (llama.computes_own_loss)

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = own_config(config, self)
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_bert_weights(self.classifier, config.initializer_range)

    def tie_weights(self):
        pass

    def init_buffers(self):
        pass

    def checkpoint_key(self, key: str) -> str | None:
        if key.startswith("classifier."):
            return key
        inner = self.bert.checkpoint_key(key)  # bare BertModel checkpoints load too (classifier then missing)
        return None if inner is None else "bert." + inner

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                cache=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cache)  # (B, T, H)
        return self.classifier(self.dropout(self.bert.pool(hidden)))  # (B, num_labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' loss for `problem_type` (inferred from num_labels and the labels' dtype when unset)."""
        n = self.config.num_labels
        problem = self.config.problem_type or infer_problem_type(n, labels)
        if problem == "regression":
            return F.mse_loss(logits.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, n), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    if num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"
