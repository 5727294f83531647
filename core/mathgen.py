"""DeepMind's mathematics_dataset generator (the generator of the MATH dataset), arithmetic modules only.

mathematics-dataset 1.0.1 predates sympy >= 1.6 and numpy 2; `_install_shim`
makes it import and run: `base_solution_linear` moved to
`sympy.solvers.diophantine.diophantine` and modern `igcd` rejects numpy ints
(so the alias casts its arguments with int()), and `np.object` is gone.

    >>> problems = generate(100, split="validation", seed=0)
    >>> problems[0]["question"], problems[0]["answer"]

Determinism: the generator draws from the global `random` and `np.random`;
we seed both with a seed derived from (split, seed, modules, difficulty) and
restore the caller's RNG state afterwards. The two splits never share a
problem: a problem belongs to train or validation by the md5 hash of its
question (DeepMind's own `train_test_split.is_train`), so each split rejects
the other's half. Within a split, problems are distinct. Generated sets are
cached as JSON under `.cache/math/` (written to a temporary file, then renamed).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from core.paths import cache_subdir

ARITHMETIC_MODULES = (
    "arithmetic__add_or_sub",
    "arithmetic__add_or_sub_in_base",
    "arithmetic__add_sub_multiple",
    "arithmetic__div",
    "arithmetic__mixed",
    "arithmetic__mul",
    "arithmetic__mul_div_multiple",
    "arithmetic__nearest_integer_root",
    "arithmetic__simplify_surd",
)
# The generator's train regime in thirds of its entropy range, as in its generate.py
# (train-easy / -medium / -hard). "easy" gives the short arithmetic a small LM can attempt.
DIFFICULTIES = {"easy": 0, "medium": 1, "hard": 2}
GENERATOR_VERSION = "mathematics-dataset==1.0.1+shim1"  # part of every cache key


def _install_shim() -> None:
    """Make mathematics_dataset 1.0.1 importable with current sympy and numpy (idempotent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns on the probe of the removed np.object
        if not hasattr(np, "object"):
            np.object = object  # type: ignore[attr-defined]
    # `import sympy.solvers.diophantine as m` would bind sympy.solvers' function of that name.
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        from sympy.solvers.diophantine.diophantine import base_solution_linear

        def base_solution_linear_int(c, a, b, t=None):  # noqa: ANN001, ANN202 - mirrors sympy
            return base_solution_linear(int(c), int(a), int(b), t)

        package.base_solution_linear = base_solution_linear_int


@lru_cache(maxsize=3)
def _module_functions(difficulty: str) -> dict[str, Any]:
    """Problem samplers of the nine arithmetic modules at one difficulty."""
    _install_shim()
    from mathematics_dataset import generate as md_generate
    from mathematics_dataset.modules import arithmetic

    level = DIFFICULTIES[difficulty]
    functions = arithmetic.train(md_generate._make_entropy_fn(level, len(DIFFICULTIES)))
    return {f"arithmetic__{name}": fn for name, fn in functions.items()}


def resolve_modules(modules: Sequence[str] | str | None) -> list[str]:
    """Full module names ('arithmetic__mul'); accepts the short form ('mul'); None means all nine."""
    if modules is None:
        return list(ARITHMETIC_MODULES)
    if isinstance(modules, str):
        modules = [modules]
    out = []
    for name in modules:
        full = name if name.startswith("arithmetic__") else f"arithmetic__{name}"
        if full not in ARITHMETIC_MODULES:
            raise ValueError(f"unknown arithmetic module {name!r}; choose from {', '.join(ARITHMETIC_MODULES)}")
        if full not in out:
            out.append(full)
    if not out:
        raise ValueError(f"modules is empty; choose from {', '.join(ARITHMETIC_MODULES)} (or None for all)")
    return out


def _derived_seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def _is_train(question: str) -> bool:
    from mathematics_dataset.modules import train_test_split

    return train_test_split.is_train(question)


def generate(
    n: int,
    split: str = "validation",
    seed: int = 0,
    modules: Sequence[str] | str | None = None,
    difficulty: str = "easy",
    *,
    use_cache: bool = True,
) -> list[dict]:
    """`n` distinct problems `{"question", "answer", "module"}`, modules mixed uniformly at random.

    The same arguments give the same list in every process; a smaller `n` gives
    a prefix of a larger one.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; choose one of train, validation")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer number of problems, got {n!r}")
    names = resolve_modules(modules)
    key = {"version": GENERATOR_VERSION, "split": split, "seed": seed, "modules": names,
           "difficulty": difficulty, "n": n}
    path = cache_subdir("math") / f"{split}-{difficulty}-s{seed}-n{n}-{_derived_seed(key):08x}.json"
    if use_cache and path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["problems"]
    problems = _generate(n, split, seed, names, difficulty)
    if use_cache:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump({"key": key, "problems": problems}, fh)
        os.replace(tmp, path)
    return problems


def _generate(n: int, split: str, seed: int, names: list[str], difficulty: str) -> list[dict]:
    from mathematics_dataset.generate_settings import MAX_ANSWER_LENGTH, MAX_QUESTION_LENGTH

    functions = _module_functions(difficulty)
    want_train = split == "train"
    derived = _derived_seed("math", split, seed, tuple(names), difficulty)
    chooser = random.Random(derived)  # picks the module; separate from the generator's own draws
    saved = random.getstate(), np.random.get_state()
    random.seed(derived)
    np.random.seed(derived % 2**32)
    problems: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    try:
        while len(problems) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(
                    f"could not generate {n} distinct {split} problems from {names} at difficulty {difficulty!r} "
                    f"(got {len(problems)}); ask for fewer, or add modules / raise the difficulty"
                )
            name = chooser.choice(names)
            problem = functions[name]()
            question, answer = str(problem.question), str(problem.answer)
            # The generator's own length limits (its generate.sample_from_module drops these too).
            if len(question) > MAX_QUESTION_LENGTH or len(answer) > MAX_ANSWER_LENGTH:
                continue
            if _is_train(question) != want_train or question in seen:
                continue
            seen.add(question)
            problems.append({"question": question, "answer": answer, "module": name})
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return problems
