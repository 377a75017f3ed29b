"""peftcore.analysis.perplexity: perplexity against transformers and a direct computation; BLEU / chrF
against sacrebleu (the oracle, imported only here); glossary and repetition on hand-computed
examples."""
import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given
from hypothesis import strategies as st
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_char import TokenizerChar
from torch import nn

from peftcore.analysis.perplexity import (
    bleu,
    chrf,
    glossary_adherence,
    load_terms,
    perplexity,
    repetition,
    sliding_windows,
    token_nll,
    tokenize_13a,
    tokenize_char,
)
from peftcore.analysis.text_metrics import contains_term, has_phrase_loop
from peftcore.models import load_pretrained

EXACT = 1e-9  # same formulas in the same order: only float noise may differ (the brief allows 0.01)

# ---- tokenizers ------------------------------------------------------------------------------

TRICKY = [
    "Mr. Smith paid $1,000.50 on 1990-2000 e-mail.", "don't stop, (really)!", "a.b,c 3.14 ,5 5, .",
    "&quot;quoted&quot; &amp;lt; &lt;tag&gt;", "line one-\nline two\nthree <skipped> end", "naïve café — 東京。",
    "U.S.A... wait,,, 1.2.3", "  spaces\tand\ttabs  ", "", "x/y{z}~`^_|@#%", "10-20-30 -5 5- -",
]
# pieces, not characters: HTML entities and "<skipped>" must appear whole to exercise their rules
TEXT = st.lists(st.sampled_from(list("ab1 .,-'&;<>/()\"$%\n\tqt:?!é東。") + ["&amp;", "&quot;", "<skipped>", "-\n"]),
                max_size=30).map("".join)


@pytest.mark.parametrize("line", TRICKY)
def test_13a_matches_sacrebleu_on_tricky_lines(line):
    assert tokenize_13a(line) == Tokenizer13a()(line).split()


@given(TEXT)
def test_13a_and_char_match_sacrebleu(line):
    assert tokenize_13a(line) == Tokenizer13a()(line).split()
    assert tokenize_char(line) == TokenizerChar()(line).split()


# ---- BLEU / chrF against sacrebleu -----------------------------------------------------------

# "-\n" at a line end survives only because sacrebleu strips trailing whitespace before 13a
WORDS = ["the", "cat", "sat", "on", "mat", "Mr.", "3.14", "1,000", "e-mail", "don't", "(hello)", "naïve",
         "東京", "&amp;", "U.S.A.", ",", ".", "!", "\"quoted\"", "2020-2021", "café", "—", "$5", "a/b", "The",
         "-\n"]


@st.composite
def corpora(draw, max_streams=3):
    """(hypotheses, reference streams): hypotheses are edited references (words dropped, words
    added) or unrelated, so every n-gram order sees both matches and misses."""
    n, n_streams = draw(st.integers(1, 6)), draw(st.integers(1, max_streams))
    sentence = st.lists(st.sampled_from(WORDS), max_size=12)
    streams = [[" ".join(draw(sentence)) for _ in range(n)] for _ in range(n_streams)]
    hyps = []
    for ref in streams[0]:
        words = ref.split()
        kept = [w for w, keep in zip(words, draw(st.lists(st.booleans(), min_size=len(words), max_size=len(words))))
                if keep]
        hyps.append(draw(st.sampled_from([" ".join(kept + draw(sentence)[:3]), " ".join(draw(sentence)), ref])))
    return hyps, streams


HAND_HYPS = ["The cat sat on the mat.", "It costs $1,000.50 (roughly).", "", "naïve café in 東京 , yes",
             "a well-\n", "1990-2000 &amp; e-mail"]
HAND_REFS = ["The cat is on the mat.", "The price is $1,000.50, roughly.", "Nothing here.",
             "a naïve café in 東京, yes!",
             "a well", "1990 - 2000 & e-mail"]


def assert_bleu_equal(ours, theirs):
    assert ours.score == pytest.approx(theirs.score, abs=EXACT)
    assert (ours.counts, ours.totals, ours.hyp_len, ours.ref_len) == (theirs.counts, theirs.totals, theirs.sys_len,
                                                                      theirs.ref_len)
    assert ours.precisions == pytest.approx(theirs.precisions, abs=EXACT)
    assert (ours.bp, ours.ratio) == pytest.approx((theirs.bp, theirs.ratio), abs=EXACT)


def test_bleu_hand_corpus_matches_sacrebleu():
    ours = bleu(HAND_HYPS, HAND_REFS)
    assert 0 < ours.score < 100  # a corpus that exercises matches, misses and the brevity penalty
    assert_bleu_equal(ours, sacrebleu.corpus_bleu(HAND_HYPS, [HAND_REFS]))


@given(corpora())
def test_bleu_matches_sacrebleu(corpus):
    hyps, streams = corpus
    assert_bleu_equal(bleu(hyps, streams), sacrebleu.corpus_bleu(hyps, streams))


@pytest.mark.parametrize("smooth_method", ["exp", "none", "floor", "add-k"])
@pytest.mark.parametrize("effective_order", [False, True])
@given(corpus=corpora(max_streams=2))
def test_bleu_options_match_sacrebleu(corpus, smooth_method, effective_order):
    hyps, streams = corpus
    ours = bleu(hyps, streams, smooth_method=smooth_method, effective_order=effective_order, lowercase=True)
    theirs = sacrebleu.corpus_bleu(hyps, streams, smooth_method=smooth_method, use_effective_order=effective_order,
                                   lowercase=True)
    assert ours.score == pytest.approx(theirs.score, abs=EXACT)


JA_HYPS = ["モデルを量子化して学習した。", "LoRAのランクは8です", "今日は晴れ"]
JA_REFS = ["モデルを量子化してから学習しました。", "LoRA のランクは 8 です。", "明日は雨"]


@pytest.mark.parametrize("tokenize", ["char", "none", "13a"])
def test_bleu_japanese_matches_sacrebleu(tokenize):
    ours = bleu(JA_HYPS, JA_REFS, tokenize=tokenize)
    assert_bleu_equal(ours, sacrebleu.corpus_bleu(JA_HYPS, [JA_REFS], tokenize=tokenize))


def test_char_tokenizer_is_what_makes_japanese_bleu_meaningful():
    # without spaces a whole Japanese sentence is one 13a token, so a near-miss scores 0
    assert bleu(JA_HYPS[:1], JA_REFS[:1], tokenize="13a").score == 0.0
    assert bleu(JA_HYPS[:1], JA_REFS[:1], tokenize="char").score > 40


JA_TEXT = st.text(alphabet="日本語のテキストですはがをモデル学習、。 ab", max_size=15)


@given(st.lists(st.tuples(JA_TEXT, JA_TEXT), min_size=1, max_size=5))
def test_bleu_char_and_chrf_match_sacrebleu_on_japanese(pairs):
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    assert_bleu_equal(bleu(hyps, refs, tokenize="char"), sacrebleu.corpus_bleu(hyps, [refs], tokenize="char"))
    assert chrf(hyps, refs).score == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=EXACT)


def test_bleu_edge_cases():
    assert bleu(["a b c d e"], ["a b c d e"]).score == pytest.approx(100.0)
    empty = bleu(["", ""], ["some words", "more"])
    assert (empty.score, empty.bp, empty.hyp_len) == (0.0, 0.0, 0)
    assert_bleu_equal(empty, sacrebleu.corpus_bleu(["", ""], [["some words", "more"]]))


def test_chrf_hand_corpus_matches_sacrebleu():
    ours = chrf(HAND_HYPS, HAND_REFS)
    assert 0 < ours.score < 100
    assert ours.score == pytest.approx(sacrebleu.corpus_chrf(HAND_HYPS, [HAND_REFS]).score, abs=EXACT)
    assert chrf(["same text"], ["same  text"]).score == pytest.approx(100.0)  # chrF ignores spaces


@pytest.mark.parametrize("word_order,beta,lowercase", [(0, 2, False), (2, 2, False), (0, 1, True), (2, 3, True)])
@given(corpus=corpora())
def test_chrf_matches_sacrebleu(corpus, word_order, beta, lowercase):
    hyps, streams = corpus
    theirs = sacrebleu.metrics.CHRF(word_order=word_order, beta=beta, lowercase=lowercase).corpus_score(hyps, streams)
    ours = chrf(hyps, streams, word_order=word_order, beta=beta, lowercase=lowercase)
    assert ours.score == pytest.approx(theirs.score, abs=EXACT)


def test_corpus_errors_are_clear():
    with pytest.raises(ValueError, match="2 hypotheses but reference stream 1 has 1"):
        bleu(["a", "b"], [["a", "b"], ["a"]])
    with pytest.raises(ValueError, match="2 hypotheses but reference stream 0 has 3"):
        chrf(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="empty corpus"):
        bleu([], [])
    with pytest.raises(ValueError, match="'char'"):
        bleu(["a"], ["a"], tokenize="ja-mecab")
    with pytest.raises(ValueError, match="segment 0 has no reference"):
        bleu(["a"], [[None]])


def test_missing_reference_in_one_stream_uses_the_others():
    hyps, streams = ["the cat sat", "a dog ran"], [["the cat sat", "one dog ran"], [None, "a dog ran"]]
    assert_bleu_equal(bleu(hyps, streams), sacrebleu.corpus_bleu(hyps, streams))


# ---- perplexity ------------------------------------------------------------------------------

VOCAB = 53


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny random transformers Llama and ours loaded from its save_pretrained folder."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # random init is near-uniform; perturb so context matters
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path)
    return hf, load_pretrained(path)


@torch.no_grad()
def guide_perplexity(hf_model, ids: torch.Tensor, max_length: int, stride: int, verbatim: bool = False) -> float:
    """transformers' perplexity guide loop, with labels and the model's own loss; each window's
    mean loss is weighted by the number of labels the shifted loss really uses.

    verbatim=True weights as the guide's text does, by num_valid_tokens - batch_size. That assumes
    the first label of every window is scored; from the second window on it is context (-100), so
    the guide under-counts each later window by one token and its result is a slightly mis-weighted
    mean (measured: relative 5e-4 for 45 tokens at max_length 16 / stride 5, 5e-3 for 200 tokens at
    64 / 32).
    Both weightings agree when windows do not overlap (stride == max_length)."""
    seq_len, nll_sum, n_tokens, prev_end = ids.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        loss = hf_model(window, labels=labels).loss
        n = (labels[:, 1:] != -100).sum().item() if not verbatim else (labels != -100).sum().item() - labels.size(0)
        nll_sum, n_tokens, prev_end = nll_sum + loss.item() * n, n_tokens + n, end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("max_length,stride", [(16, 5), (16, 15), (12, 12)])
def test_perplexity_matches_transformers_guide(llama_pair, max_length, stride):
    hf, ours = llama_pair
    ids = torch.randint(0, VOCAB, (1, 45))
    expected = guide_perplexity(hf, ids, max_length, stride)
    assert perplexity(ours, ids, max_length, stride) == pytest.approx(expected, rel=1e-4)
    assert perplexity(hf, ids[0], max_length, stride, batch_size=3) == pytest.approx(expected, rel=1e-4)
    if stride == max_length:  # no overlap: the guide's own weighting, to the letter, gives the same number
        assert perplexity(ours, ids, max_length, stride) == pytest.approx(
            guide_perplexity(hf, ids, max_length, stride, verbatim=True), rel=1e-4)


@torch.no_grad()
def test_one_window_equals_direct_full_sequence(llama_pair):
    _, ours = llama_pair
    ids = torch.randint(0, VOCAB, (1, 30))
    logits = ours(ids)[0]
    direct = math.exp(F.cross_entropy(logits[:-1], ids[0, 1:]).item())
    for max_length in (30, 64):
        assert perplexity(ours, ids, max_length, stride=max_length) == pytest.approx(direct, rel=1e-5)


def test_context_changes_perplexity(llama_pair):
    # guards the oracles above against a model whose windows would not matter
    _, ours = llama_pair
    ids = torch.randint(0, VOCAB, (60,))
    assert perplexity(ours, ids, 4, 4) != pytest.approx(perplexity(ours, ids, 60, 60), rel=1e-3)


def test_batch_size_does_not_change_result(llama_pair):
    _, ours = llama_pair
    ids = torch.randint(0, VOCAB, (41,))
    one = token_nll(ours, ids, 10, 3)
    for batch_size in (2, 5, 100):
        torch.testing.assert_close(token_nll(ours, ids, 10, 3, batch_size=batch_size), one, equal_nan=True,
                                   rtol=1e-5, atol=1e-6)


class Unigram(nn.Module):
    """Logits depend on the current token only, so any window plan that scores each position
    once must reproduce the full-sequence perplexity exactly."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids):
        return self.drop(self.table(ids))


@given(n=st.integers(2, 40), max_length=st.integers(2, 12), stride_gap=st.integers(1, 11),
       batch_size=st.integers(1, 4))
def test_each_token_scored_exactly_once(n, max_length, stride_gap, batch_size):
    stride = max(1, max_length - stride_gap)
    model = Unigram(11).eval()
    ids = torch.randint(0, 11, (n,), generator=torch.Generator().manual_seed(n))
    direct = math.exp(F.cross_entropy(model(ids)[:-1], ids[1:]).item())
    assert perplexity(model, ids, max_length, stride, batch_size) == pytest.approx(direct, rel=1e-6)
    nll = token_nll(model, ids, max_length, stride, batch_size)
    assert torch.isnan(nll[0]) and not torch.isnan(nll[1:]).any()


def test_disjoint_windows_leave_window_starts_unscored():
    scored = set()
    for begin, end, n_new in sliding_windows(20, 8, 8):
        scored |= set(range(max(begin + 1, end - n_new), end))
    assert scored == set(range(1, 20)) - {8, 16}
    assert sliding_windows(20, 8, 3) == [(0, 8, 8), (3, 11, 3), (6, 14, 3), (9, 17, 3), (12, 20, 3)]


def test_train_mode_model_is_scored_without_dropout_and_left_in_train_mode():
    model = Unigram(11)
    ids = torch.randint(0, 11, (30,))
    expected = perplexity(model.eval(), ids, 8, 4)
    model.train()
    assert perplexity(model, ids, 8, 4) == expected
    assert model.training


def test_plain_callable_and_errors():
    table = torch.randn(7, 7)
    ids = torch.randint(0, 7, (1, 20))
    direct = math.exp(F.cross_entropy(table[ids[0, :-1]], ids[0, 1:]).item())
    assert perplexity(lambda x: table[x], ids, 20, 20) == pytest.approx(direct, rel=1e-6)
    assert perplexity(lambda x: {"logits": table[x]}, ids, 20, 20) == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match="stride <= max_length"):
        perplexity(lambda x: table[x], ids, 4, 5)
    with pytest.raises(ValueError, match=r"\(N,\) or \(1, N\)"):
        perplexity(lambda x: table[x], ids.repeat(2, 1), 4, 2)
    with pytest.raises(TypeError, match="must return logits"):
        perplexity(lambda x: table[x][0], ids, 4, 2)


# ---- glossary adherence ----------------------------------------------------------------------

TERMS = ["LoRA", "adapter", "量子化", "rank", "C#"]


def test_glossary_adherence_hand_example():
    refs = [
        "LoRA adapters use a low rank update.",  # LoRA, rank ("adapters" is another word)
        "LoRAを量子化したモデルに適用する",  # LoRA (を is no Latin letter), 量子化
        "Write it in C# with an adapter.",  # C#, adapter
        "A frank discussion.",  # nothing: "rank" inside "frank" is not the term
    ]
    gens = [
        "lora uses a rank-8 update",  # both, case-insensitively
        "ＬｏＲＡを使う",  # full-width LoRA counts; 量子化 missed
        "Write it in C with an Adapter",  # C# missed; adapter used
        "",
    ]
    out = glossary_adherence(gens, refs, TERMS)
    assert out == {"adherence": 4 / 6, "required": 6, "matched": 4, "misses": {"量子化": 1, "C#": 1}}


def test_glossary_without_required_terms_and_errors():
    assert glossary_adherence(["x"], ["nothing relevant"], TERMS)["adherence"] is None
    with pytest.raises(ValueError, match="2 generations but 1 references"):
        glossary_adherence(["a", "b"], ["a"], TERMS)


@pytest.mark.parametrize("text,term,found", [
    ("use lora here", "lora", True), ("use qlora here", "lora", False), ("lora層を", "lora", True),
    ("lora_rank", "lora", False), ("f(lora)", "lora", True), ("学習率", "学習", True), ("c++ code", "c++", True),
    ("loralora lora", "lora", True),  # a failed first hit must not hide a later whole-word one
])
def test_contains_term(text, term, found):
    assert contains_term(text, term) is found


def test_load_terms(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("\ufeff# glossary\nLoRA\n\n  low-rank adapter  \nC#\n# end\n量子化\n", encoding="utf-8")
    assert load_terms(path) == ["LoRA", "low-rank adapter", "C#", "量子化"]


@pytest.mark.parametrize("text,message", [
    ("LoRA\nrank\nlora\n", r"terms.txt:3: 'lora' repeats the term on line 1"),
    ("LoRA\nLoRA\tローラ\n", r"terms.txt:2: tab"),
    ("# only comments\n\n", r"terms.txt: no terms"),
])
def test_load_terms_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "terms.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_terms(path)


# ---- repetition ------------------------------------------------------------------------------

def test_repetition_hand_example():
    out = repetition(["the cat sat on the mat", "no no no", "a b a b a"])
    # unigrams 6+3+5=14, unique {the cat sat on mat no a b}=8; bigrams 5+2+4=11, unique 5+1+2=8
    # trigrams 4+1+3=8, of which "a b a" occurs twice in text 3; only "no no no" loops 3 times
    assert out == {"distinct_1": 8 / 14, "distinct_2": 8 / 11, "repeated_ngram_rate": 2 / 8,
                   "phrase_loop_rate": 1 / 3, "texts": 3}


def test_repetition_char_tokens_and_empty():
    out = repetition(["はははは", "学習"], tokenize="char", n=2)
    # chars 4+2=6, unique {は 学 習}=3; bigrams 3+1=4, unique {はは 学習}=2; "はは" x3 repeats
    assert out == {"distinct_1": 3 / 6, "distinct_2": 2 / 4, "repeated_ngram_rate": 3 / 4,
                   "phrase_loop_rate": 1 / 2, "texts": 2}
    assert repetition([]) == {"distinct_1": None, "distinct_2": None, "repeated_ngram_rate": None,
                              "phrase_loop_rate": None, "texts": 0}


@pytest.mark.parametrize("text,loops", [
    ("no no no", True), ("no no", False), ("I think I think I think so", True), ("a b a b a", False),
    ("x a b c a b c a b c y", True), ("a b c a b c a b", False), ("", False),
])
def test_has_phrase_loop(text, loops):
    assert has_phrase_loop(text.split()) is loops


def test_one_window_perplexity_is_the_eval_perplexity_of_peftcore_eval(llama_pair):
    """One definition of perplexity: `peftcore eval` / training's evaluate() report exp of the summed
    next-token NLL over a record's trained tokens; a stream that fits one window (every token trained)
    gives the same number here. The two differ only in scope: records vs. a long stream."""
    from peftcore.data.records import TokenizedExample
    from peftcore.training.loop import evaluate

    _, ours = llama_pair
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    row = TokenizedExample("stream:1", ids, list(ids))  # every next token trained
    eval_ppl = evaluate(ours, [row], batch_size=1, pad_token_id=0)["eval_ppl"]
    assert perplexity(ours, ids, max_length=len(ids), stride=len(ids)) == pytest.approx(eval_ppl, rel=1e-6)
