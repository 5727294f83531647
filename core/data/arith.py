"""Arithmetic (the MATH role): DeepMind's generator (embedded), deepmind/math_dataset (hub), or a local file."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from core.data.example import Example, in_validation, render_math_prompt, render_target
from core.data.sources import hub_load, read_json_rows
from core.mathgen import ARITHMETIC_MODULES, DIFFICULTIES, GENERATOR_VERSION, generate, resolve_modules

GENERATOR_LABEL = "DeepMind mathematics_dataset generator, arithmetic modules (same generator as MATH)"
HUB_NAME = "deepmind/math_dataset"
MATH_VALIDATION_FRACTION = 0.5  # local files only; the generator splits by question hash
# The default MATH task: one module with small integer answers (e.g. "Evaluate -3 - (1 + -4 + 5)." -> -5) at the
# generator's easiest third of its entropy range, a task a 135M model can learn; the nine modules mixed
# (surds, bases, 4-decimal operands) left its accuracy near 0. modules="all" mixes them; a list picks.
DEFAULT_MODULES = ("arithmetic__add_sub_multiple",)
DEFAULT_DIFFICULTY = "easy"


def resolve_task(modules: Sequence[str] | str | None, difficulty: str = DEFAULT_DIFFICULTY) -> tuple[list[str], str]:
    """(full module names, difficulty) of a MATH request: None -> the default task, "all" -> the nine modules."""
    if modules is None:
        modules = DEFAULT_MODULES
    elif modules == "all":
        modules = None
    return resolve_modules(modules), difficulty


def task_name(modules: Sequence[str] | str | None = None, difficulty: str = DEFAULT_DIFFICULTY) -> str:
    """A short, stable name of the MATH task for labels and cache keys: "add_sub_multiple@easy", "all@easy"."""
    names, level = resolve_task(modules, difficulty)
    short = "all" if names == list(ARITHMETIC_MODULES) else "+".join(n.removeprefix("arithmetic__") for n in names)
    return f"{short}@{level}"


def math_example(question: str, answer: str, source: str, **meta: object) -> Example:
    return Example(
        prompt=render_math_prompt(question), target=render_target(answer), answers=[answer],
        dataset="math", source=source, meta={"question": question, **meta},
    )


def generated_examples(
    n: int, split: str, seed: int, modules: Sequence[str] | str | None, difficulty: str
) -> list[Example]:
    return [
        math_example(p["question"], p["answer"], "auto", module=p["module"], difficulty=difficulty)
        for p in generate(n, split=split, seed=seed, modules=resolve_task(modules)[0], difficulty=difficulty)
    ]


def _clean(value: object) -> str:
    """The hub's rows hold text like "b'What is 2 + 3?\\n'" (bytes reprs); return the plain string."""
    text = str(value)
    if text.startswith(("b'", 'b"')) and text.endswith(("'", '"')):
        try:
            text = ast.literal_eval(text).decode("utf-8")
        except (ValueError, SyntaxError, UnicodeDecodeError):
            pass
    return text.strip()


def hub_examples(split: str, modules: Sequence[str] | str | None) -> list[Example]:
    """deepmind/math_dataset, one config per module; its "test" split serves as validation."""
    out = []
    for name in resolve_task(modules)[0]:
        ds = hub_load(HUB_NAME, name, split="train" if split == "train" else "test", fallback=GENERATOR_LABEL)
        out += [math_example(_clean(r["question"]), _clean(r["answer"]), "hub", module=name) for r in ds]
    return out


@lru_cache(maxsize=4)
def file_examples(path: str, stamp: tuple[int, int]) -> dict[str, list[Example]]:
    """A local .jsonl/.json of {"question", "answer"} objects, split by question hash."""
    del stamp
    doc = read_json_rows(path, 'objects with "question" and "answer"')
    rows = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ValueError(f'{path}: expected a list of objects with "question" and "answer"')
    by_split: dict[str, list[Example]] = {"train": [], "validation": []}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise ValueError(f'{path}: row {i + 1} lacks "question" or "answer"')
        ex = math_example(_clean(row["question"]), _clean(row["answer"]), path, module=str(row.get("module", "")))
        by_split["validation" if in_validation(ex.meta["question"], MATH_VALIDATION_FRACTION) else "train"].append(ex)
    return by_split


def generator_report() -> dict:
    return {
        "dataset": "math",
        "source": "auto",
        "label": GENERATOR_LABEL,
        "generator": GENERATOR_VERSION,
        "modules": list(ARITHMETIC_MODULES),
        "default_task": task_name(),
        "difficulties": list(DIFFICULTIES),
        "examples": {"train": "generated on demand", "validation": "generated on demand"},
        "notes": "splits never share a problem (md5 of the question, DeepMind's train_test_split); cached on disk",
    }


def file_report(path: str, by_split: dict[str, list[Example]]) -> dict:
    return {
        "dataset": "math", "source": path, "label": f"arithmetic file: {Path(path).name}",
        "examples": {s: len(v) for s, v in by_split.items()},
    }
