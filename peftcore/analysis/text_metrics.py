"""Text metrics for judging a fine-tune's generations: corpus BLEU and chrF (numerically equal to
sacrebleu 2.x defaults), glossary adherence and repetition signals.

Plain Python on purpose: the scores must not depend on which metric package a user has installed,
and sacrebleu stays a test oracle only. The tokenizer and smoothing rules below reproduce
sacrebleu's `13a`, `char` and `none` tokenizers and its BLEU / chrF formulas exactly, because a
BLEU number is only comparable with another BLEU number computed under the same rules.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# ---- tokenizers ------------------------------------------------------------------------------

# mteval-v13a splits off every printable ASCII symbol except the four that need context:
# apostrophe (kept inside words: "don't"), comma / period (kept inside numbers: "1,000.5") and
# hyphen (kept inside words: "e-mail"). Space is in the class too; doubled spaces vanish later.
_13A_SYMBOLS = "".join(
    c for c in map(chr, range(0x20, 0x7F)) if not c.isalnum() and c not in "',-."
)
_13A_RULES = [
    (re.compile(f"([{re.escape(_13A_SYMBOLS)}])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma not preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma not followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # hyphen after a digit ("1990-2000")
]
_HTML_ENTITIES = [("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")]


def tokenize_13a(line: str) -> list[str]:
    """WMT's mteval-v13a tokenization (sacrebleu's default), as a token list."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _HTML_ENTITIES:  # order matters: "&amp;lt;" -> "&lt;", not "<"
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:  # sequential, non-overlapping: same as mteval
        line = pattern.sub(replacement, line)
    return line.split()


def tokenize_char(line: str) -> list[str]:
    """Every non-space character is a token: BLEU for Japanese / Chinese without a segmenter."""
    return [c for c in line if not c.isspace()]


def tokenize_none(line: str) -> list[str]:
    """Whitespace split only: for text that is already tokenized."""
    return line.split()


TOKENIZERS = {"13a": tokenize_13a, "char": tokenize_char, "none": tokenize_none}


def get_tokenizer(name: str):
    if name not in TOKENIZERS:
        hint = " (for Japanese without MeCab use 'char')" if "mecab" in name else ""
        raise ValueError(f"unknown tokenize={name!r}{hint}; choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]


# ---- corpus plumbing -------------------------------------------------------------------------

def reference_streams(hypotheses: Sequence[str], references) -> list[Sequence[str | None]]:
    """Accept one stream (list of str) or several (list of lists, as sacrebleu); check lengths.

    sacrebleu silently zips, so a reference file one line short scores the wrong pairs; here
    it is an error. A None entry means "this segment has fewer references" (sacrebleu's rule).
    """
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be lists of strings, not a single string")
    if len(hypotheses) == 0:
        raise ValueError("empty corpus: no hypotheses to score")
    streams = [references] if references and isinstance(references[0], (str, type(None))) else list(references)
    if not streams:
        raise ValueError("no references given")
    for i, stream in enumerate(streams):
        if len(stream) != len(hypotheses):
            raise ValueError(
                f"{len(hypotheses)} hypotheses but reference stream {i} has {len(stream)} segments; "
                "every stream needs one reference per hypothesis (use None for a missing one)"
            )
    return streams


def segment_references(streams, index: int) -> list[str]:
    refs = [stream[index] for stream in streams if stream[index] is not None]
    if not refs:
        raise ValueError(f"segment {index} has no reference in any stream")
    return refs


# ---- BLEU ------------------------------------------------------------------------------------

@dataclass
class BleuScore:
    score: float  # 0..100
    counts: list[int]  # matched n-grams per order (clipped by reference counts)
    totals: list[int]  # hypothesis n-grams per order
    precisions: list[float]  # percent, after smoothing
    bp: float  # brevity penalty
    ratio: float  # hyp_len / ref_len
    hyp_len: int
    ref_len: int


def word_ngrams(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length nearest the hypothesis; ties go to the shorter (mteval's rule)."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def bleu_segment_stats(hyp: list[str], refs: list[list[str]], max_order: int) -> tuple[int, int, list[int], list[int]]:
    """(hyp_len, ref_len, matches per order, hyp n-grams per order) for one segment."""
    ref_max = Counter()  # an n-gram may be matched as often as the most generous reference has it
    for ref in refs:
        ref_max |= word_ngrams(ref, max_order)
    matches, totals = [0] * max_order, [0] * max_order
    for ngram, count in word_ngrams(hyp, max_order).items():
        totals[len(ngram) - 1] += count
        matches[len(ngram) - 1] += min(count, ref_max[ngram])
    return len(hyp), closest_ref_len(len(hyp), [len(r) for r in refs]), matches, totals


def bleu_precisions(counts, totals, smooth_method: str, smooth_value: float | None) -> tuple[list[float], int]:
    """Smoothed percent precisions and the number of leading orders that had any n-gram."""
    precisions, orders_seen, exp_denominator = [0.0] * len(counts), 0, 1.0
    for n, (correct, total) in enumerate(zip(counts, totals)):
        if smooth_method == "add-k" and n > 0:  # add-k leaves unigrams alone (Chen & Cherry 2014)
            correct, total = correct + smooth_value, total + smooth_value
        if total == 0:
            break
        orders_seen += 1
        if correct > 0:
            precisions[n] = 100.0 * correct / total
        elif smooth_method == "exp":  # NIST: each further zero order gets half the previous credit
            exp_denominator *= 2
            precisions[n] = 100.0 / (exp_denominator * total)
        elif smooth_method == "floor":
            precisions[n] = 100.0 * smooth_value / total
    return precisions, orders_seen


def bleu_from_stats(counts, totals, hyp_len, ref_len, smooth_method="exp", smooth_value=None,
                    effective_order=False) -> BleuScore:
    defaults = {"exp": None, "none": None, "floor": 0.1, "add-k": 1}
    if smooth_method not in defaults:
        raise ValueError(f"unknown smooth_method={smooth_method!r}; choose one of {sorted(defaults)}")
    smooth_value = defaults[smooth_method] if smooth_value is None else smooth_value
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    ratio = hyp_len / ref_len if ref_len else 0.0
    if not any(counts):  # no match at all: 0 whatever the smoothing would say
        return BleuScore(0.0, list(counts), list(totals), [0.0] * len(counts), bp, ratio, hyp_len, ref_len)
    precisions, orders_seen = bleu_precisions(counts, totals, smooth_method, smooth_value)
    # effective_order averages only over orders the hypotheses reach (sentence-level BLEU)
    used = precisions[:orders_seen] if effective_order else precisions
    score = bp * math.exp(sum(math.log(p) for p in used) / len(used)) if all(p > 0 for p in used) else 0.0
    return BleuScore(score, list(counts), list(totals), precisions, bp, ratio, hyp_len, ref_len)


def bleu(hypotheses: Sequence[str], references, tokenize: str = "13a", lowercase: bool = False,
         smooth_method: str = "exp", smooth_value: float | None = None, max_ngram_order: int = 4,
         effective_order: bool = False) -> BleuScore:
    """Corpus BLEU; equals `sacrebleu.corpus_bleu(hypotheses, streams, ...)` for the same options.

    `references` is one list of strings (one reference per hypothesis) or a list of such streams.
    """
    streams, tok = reference_streams(hypotheses, references), get_tokenizer(tokenize)

    def prep(s: str) -> list[str]:  # sacrebleu strips trailing whitespace before tokenizing
        return tok((s.lower() if lowercase else s).rstrip())

    hyp_len = ref_len = 0
    counts, totals = [0] * max_ngram_order, [0] * max_ngram_order
    for i, hyp in enumerate(hypotheses):
        refs = [prep(r) for r in segment_references(streams, i)]
        h_len, r_len, seg_counts, seg_totals = bleu_segment_stats(prep(hyp), refs, max_ngram_order)
        hyp_len, ref_len = hyp_len + h_len, ref_len + r_len
        counts = [a + b for a, b in zip(counts, seg_counts)]
        totals = [a + b for a, b in zip(totals, seg_totals)]
    return bleu_from_stats(counts, totals, hyp_len, ref_len, smooth_method, smooth_value, effective_order)


# ---- chrF ------------------------------------------------------------------------------------

@dataclass
class ChrfScore:
    score: float  # 0..100
    precision: float  # percent, averaged over the n-gram orders both sides have
    recall: float
    char_order: int
    word_order: int
    beta: float


_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def chrf_words(sentence: str) -> list[str]:
    """chrF++'s word split: one leading or trailing ASCII punctuation mark becomes its own word."""
    words = []
    for w in sentence.split():
        if len(w) > 1 and w[-1] in _PUNCTUATION:  # checked first, so "(hi)" -> "(hi", ")"
            words += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in _PUNCTUATION:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return words


def chrf_ngrams(sentence: str, char_order: int, word_order: int) -> list[Counter]:
    """Char n-gram counters (spaces removed) for orders 1..char_order, then word ones."""
    chars = "".join(sentence.split())
    out = [Counter(chars[i:i + n] for i in range(len(chars) - n + 1)) for n in range(1, char_order + 1)]
    words = chrf_words(sentence) if word_order else []
    out += [Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, word_order + 1)]
    return out


def chrf_match_stats(hyp: list[Counter], ref: list[Counter]) -> list[int]:
    """Flat [hyp n-grams, ref n-grams, matches] per order."""
    stats = []
    for h, r in zip(hyp, ref):
        matches = sum(min(c, r[g]) for g, c in h.items() if g in r)
        # an order the reference lacks does not count against the hypothesis (sacrebleu's rule)
        stats += [sum(h.values()) if r else 0, sum(r.values()), matches]
    return stats


def chrf_precision_recall(stats: list[int]) -> tuple[float, float]:
    """Precision and recall averaged over the orders where both hypothesis and reference have n-grams."""
    precisions, recalls = [], []
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i:i + 3]
        if n_hyp > 0 and n_ref > 0:
            precisions.append(n_match / n_hyp)
            recalls.append(n_match / n_ref)
    if not precisions:
        return 0.0, 0.0
    return sum(precisions) / len(precisions), sum(recalls) / len(recalls)


def f_beta(precision: float, recall: float, beta: float) -> float:
    if precision + recall == 0:
        return 0.0
    # sacrebleu's operation order, so equal statistics give bit-equal scores (and equal tie-breaks)
    score = (1 + beta**2) * precision * recall
    score /= beta**2 * precision + recall
    return 100 * score


def chrf(hypotheses: Sequence[str], references, char_order: int = 6, word_order: int = 0,
         beta: float = 2, lowercase: bool = False) -> ChrfScore:
    """Corpus chrF (chrF++ with word_order=2); equals `sacrebleu.corpus_chrf` for the same options.

    With several reference streams each segment keeps the reference that gives it the best F.
    """
    streams = reference_streams(hypotheses, references)
    prep = (lambda s: s.lower()) if lowercase else (lambda s: s)
    totals = [0] * (3 * (char_order + word_order))
    for i, hyp in enumerate(hypotheses):
        hyp_ngrams = chrf_ngrams(prep(hyp), char_order, word_order)
        best, best_f = None, -1.0
        for ref in segment_references(streams, i):
            stats = chrf_match_stats(hyp_ngrams, chrf_ngrams(prep(ref), char_order, word_order))
            f = f_beta(*chrf_precision_recall(stats), beta)
            if f > best_f:  # strict: the first of equally good references wins
                best, best_f = stats, f
        totals = [a + b for a, b in zip(totals, best)]
    precision, recall = chrf_precision_recall(totals)
    return ChrfScore(f_beta(precision, recall, beta), 100 * precision, 100 * recall, char_order, word_order, beta)


# ---- glossary adherence ----------------------------------------------------------------------

def _is_cjk(ch: str) -> bool:
    """Han, kana and Hangul: scripts written without spaces, where words have no visible edge."""
    o = ord(ch)
    return (0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF
            or 0xF900 <= o <= 0xFAFF or 0xAC00 <= o <= 0xD7AF or 0xFF66 <= o <= 0xFF9F)


def mostly_cjk(texts: list[str]) -> bool:
    """More than half the non-space characters CJK: texts to score by characters, not words."""
    chars = [c for t in texts for c in t if not c.isspace()]
    return bool(chars) and sum(map(_is_cjk, chars)) > len(chars) / 2


def _is_word_char(ch: str) -> bool:
    """A character that continues a Latin-script word. CJK letters do not: in "LoRAを使う" the
    term "LoRA" is a whole word, although Python's regex \\w would call "を" a word character."""
    return (ch.isalnum() or ch == "_") and not _is_cjk(ch)


def normalize_text(text: str) -> str:
    """NFKC folds full-width Latin ("ＬｏＲＡ") and half-width kana to their usual forms; casefold
    makes matching case-insensitive (and also folds "ß" to "ss")."""
    return unicodedata.normalize("NFKC", text).casefold()


def contains_term(text: str, term: str) -> bool:
    """Both normalized. Whole-word at each edge of the term that is a Latin word character,
    plain substring at a CJK edge (no word boundaries to check there)."""
    start = text.find(term)
    while start != -1:
        end = start + len(term)
        left_ok = not _is_word_char(term[0]) or start == 0 or not _is_word_char(text[start - 1])
        right_ok = not _is_word_char(term[-1]) or end == len(text) or not _is_word_char(text[end])
        if left_ok and right_ok:
            return True
        start = text.find(term, start + 1)
    return False


def glossary_adherence(generations: Sequence[str], references: Sequence[str], terms: Sequence[str]) -> dict:
    """Of the glossary terms each reference uses, the share its paired generation uses too.

    -> {"adherence": matched / required (None when no reference contains any term),
        "required": int, "matched": int, "misses": {term: times missed}, most missed first}.
    A term counts once per segment however often it occurs: the question is "did the model use
    the domain word where it was expected", not how often.
    """
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references; they are paired")
    normalized = {normalize_text(t).strip(): t for t in terms}
    normalized.pop("", None)
    required = matched = 0
    misses: Counter = Counter()
    for gen, ref in zip(generations, references):
        gen, ref = normalize_text(gen), normalize_text(ref)
        for key, term in normalized.items():
            if contains_term(ref, key):
                required += 1
                if contains_term(gen, key):
                    matched += 1
                else:
                    misses[term] += 1
    adherence = matched / required if required else None
    return {"adherence": adherence, "required": required, "matched": matched, "misses": dict(misses.most_common())}


def load_terms(path) -> list[str]:
    """One term per line; blank lines and lines starting with '#' are skipped. A '#' inside a
    term ("C#") is kept, so comments are whole lines only. Errors name file:line."""
    path = Path(path)
    terms, first_seen = [], {}
    # utf-8-sig: glossaries exported from spreadsheet tools often start with a BOM
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        term = raw.strip()
        if not term or term.startswith("#"):
            continue
        if "\t" in term:
            raise ValueError(f"{path}:{lineno}: tab in {term!r}; one term per line (a source<TAB>target "
                             "pair is not a term list; keep the target-language column only)")
        key = normalize_text(term)
        if key in first_seen:
            raise ValueError(f"{path}:{lineno}: {term!r} repeats the term on line {first_seen[key]} "
                             "(matching ignores case and full-width forms); remove one")
        first_seen[key] = lineno
        terms.append(term)
    if not terms:
        raise ValueError(f"{path}: no terms (only blank or '#' lines)")
    return terms


# ---- repetition ------------------------------------------------------------------------------

def ngram_list(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def has_phrase_loop(tokens: list[str], min_repeats: int = 3) -> bool:
    """True if some phrase occurs `min_repeats` times back to back ("no no no", "I think I think I think").

    A span of min_repeats copies of a length-L phrase is exactly a span where every token equals
    the one L positions later for (min_repeats - 1) * L consecutive positions, so one pass per L
    suffices instead of comparing slices.
    """
    for length in range(1, len(tokens) // min_repeats + 1):
        run = 0
        for i in range(len(tokens) - length):
            run = run + 1 if tokens[i] == tokens[i + length] else 0
            if run >= (min_repeats - 1) * length:
                return True
    return False


def repetition(texts: Sequence[str], n: int = 3, tokenize: str = "13a", min_repeats: int = 3) -> dict:
    """Signals of degenerate generation, over a corpus of texts.

    -> {"distinct_1", "distinct_2": unique / total n-grams pooled over the corpus (low = bland,
        repetitive vocabulary), "repeated_ngram_rate": share of n-grams that occur more than once
        within their own text, "phrase_loop_rate": share of texts where one phrase repeats
        >= min_repeats times in a row, "texts": count}. Rates over zero n-grams are None.
    Use tokenize="char" for Japanese / Chinese text.
    """
    tok = get_tokenizer(tokenize)
    token_lists = [tok(t) for t in texts]
    out = {}
    for k in (1, 2):
        pooled = [g for tokens in token_lists for g in ngram_list(tokens, k)]
        out[f"distinct_{k}"] = len(set(pooled)) / len(pooled) if pooled else None
    repeated = total = 0
    for tokens in token_lists:
        counts = Counter(ngram_list(tokens, n))
        total += sum(counts.values())
        repeated += sum(c for c in counts.values() if c > 1)
    out["repeated_ngram_rate"] = repeated / total if total else None
    loops = sum(has_phrase_loop(tokens, min_repeats) for tokens in token_lists)
    out["phrase_loop_rate"] = loops / len(texts) if texts else None
    out["texts"] = len(texts)
    return out
