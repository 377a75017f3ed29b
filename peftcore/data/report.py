"""A data-quality report before training: what a practitioner checks by eye, computed for them."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from peftcore.data.records import TokenizedExample

HISTOGRAM_BINS = 8


def length_histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[dict]:
    """Equal-width bins over [min, max] token length: [{"from", "to", "count"}]."""
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((n - lo) // width for n in lengths)
    return [{"from": lo + b * width, "to": lo + (b + 1) * width - 1, "count": counts.get(b, 0)}
            for b in range(-(-(hi - lo + 1) // width))]


def data_report(records: list, tokenized: list[TokenizedExample], max_length: int) -> dict:
    """`records`: peftcore.jobs.tasks.Record. Blank fields are found in what the user wrote (Record.texts),
    since the rendered prompt always holds the template; conflicts are shown by the user's input."""
    lengths = [len(t.input_ids) for t in tokenized]
    by_prompt, shown = defaultdict(set), {}
    pairs = Counter()
    empty = []
    for record in records:
        ex = record.example
        by_prompt[ex.prompt].add(ex.response)
        # the user's own input: the prompt's first 60 characters are the template's
        shown.setdefault(ex.prompt, record.shown)
        pairs[(ex.prompt, ex.response)] += 1
        if any(not text.strip() for text in record.texts):
            empty.append(ex.where)
    return {
        "records": len(records),
        "max_length": max_length,
        "truncated": [t.where for t in tokenized if t.truncated],
        "tokens": {"total": sum(lengths), "min": min(lengths), "max": max(lengths),
                   "mean": sum(lengths) / len(lengths)},
        "trained_tokens": sum(sum(1 for lab in t.labels if lab != -100) for t in tokenized),
        "length_histogram": length_histogram(lengths),
        "empty_fields": empty,
        "exact_duplicates": sum(count - 1 for count in pairs.values()),
        "conflicting_outputs": [shown[p][:60] for p, responses in by_prompt.items() if len(responses) > 1],
    }


def format_report(report: dict) -> str:
    t = report["tokens"]
    lines = [
        f"data: {report['records']} records, {t['total']:,d} tokens ({report['trained_tokens']:,d} trained), "
        f"length {t['min']}..{t['max']} (mean {t['mean']:.1f})",
    ]
    peak = max(b["count"] for b in report["length_histogram"]) or 1
    for b in report["length_histogram"]:
        lines.append(f"  {b['from']:>5}-{b['to']:<5} {'#' * round(30 * b['count'] / peak):<30} {b['count']}")
    checks = [
        ("truncated to max_length " + str(report["max_length"]), len(report["truncated"]), report["truncated"][:3]),
        ("with an empty input or output", len(report["empty_fields"]), report["empty_fields"][:3]),
        ("exact duplicates", report["exact_duplicates"], []),
        ("inputs with conflicting outputs", len(report["conflicting_outputs"]), report["conflicting_outputs"][:2]),
    ]
    for label, count, sample in checks:
        mark = "ok " if count == 0 else "!! "
        lines.append(f"  {mark}{count} {label}" + (f"  e.g. {', '.join(map(str, sample))}" if sample else ""))
    return "\n".join(lines)


def write_report(report: dict, folder: str | Path) -> Path:
    path = Path(folder) / "data_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
