"""Where data comes from: "auto" (embedded stand-in), "hub" (Hugging Face datasets), or a local file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.hub import hub_host, hub_offline, hub_reachable

SOURCES = ("auto", "hub")
SPLIT_PREFIX = "split:"  # "split:FILE": divide one local file into train and validation (SQuAD: by passage)


class HubUnavailableError(ConnectionError):
    """The Hugging Face hub could not be reached (offline flags set, or no network)."""


def resolve_source(source: str | os.PathLike) -> str:
    """'auto', 'hub', the absolute path of an existing file, or "split:" + that path; anything else raises
    ValueError."""
    if isinstance(source, str) and source in SOURCES:
        return source
    if isinstance(source, str) and source.startswith(SPLIT_PREFIX):
        return SPLIT_PREFIX + resolve_source(source[len(SPLIT_PREFIX):])
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(
            f"source must be 'auto' (embedded offline data), 'hub' (Hugging Face datasets), the path of an "
            f"existing local file, or 'split:' and that path; {str(source)!r} is none of these"
        )
    return str(path.resolve())


def split_file(src: str) -> tuple[str, bool]:
    """(path, whether "split:" asked to divide it) of a resolved local-file source."""
    return (src[len(SPLIT_PREFIX):], True) if src.startswith(SPLIT_PREFIX) else (src, False)


def hub_load(name: str, *args: Any, fallback: str, **kwargs: Any) -> Any:  # noqa: ANN401 - a datasets object
    """`datasets.load_dataset(name, *args, **kwargs)`, with a clear error when the hub is out of reach.

    `fallback` names the embedded stand-in that source="auto" gives instead.
    """
    hint = f'use source="auto" for the embedded offline stand-in ({fallback}), or pass a local file as source'
    if hub_offline():
        raise HubUnavailableError(
            f"the Hugging Face hub is not reachable: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so {name!r} "
            f"cannot be downloaded; {hint}"
        )
    if not hub_reachable():
        raise HubUnavailableError(
            f"the Hugging Face hub is not reachable: cannot connect to {hub_host()} for {name!r}; {hint}"
        )
    import datasets  # heavy import, only for hub sources

    try:
        return datasets.load_dataset(name, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here means "could not get it from the hub"
        raise HubUnavailableError(
            f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); the hub may not be "
            f"reachable from this machine; {hint}"
        ) from exc


def read_json_rows(path: str, what: str) -> Any:  # noqa: ANN401 - parsed JSON
    """Parse a .json file (one document) or a .jsonl file (one object per line); errors name the file and line."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl") or (not text.lstrip().startswith(("[", "{")) or _looks_like_jsonl(text)):
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {i} is not valid JSON ({exc.msg}); expected {what}") from exc
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg}); expected {what}") from exc


def _looks_like_jsonl(text: str) -> bool:
    """Several JSON objects, one per line (a .json file written as JSON lines)."""
    lines = [ln for ln in text.splitlines()[:3] if ln.strip()]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(json.loads(ln), dict) for ln in lines)
    except json.JSONDecodeError:
        return False
