"""Does the instruct model do better with its chat template? The no-prompt and text-prompt baselines, both ways.

Held-out MATH items (the default task, `arithmetic__add_sub_multiple@easy`), greedy
generation as core.evaluation does it: exact match and mean absolute error with 95%
bootstrap CIs over items, and the answer-token loss training minimises. "plain" is the
paper's "Question: ..\\nAnswer:"; "chat" puts the same text in the user turn of the
tokenizer's chat template. Baselines are cached on disk like a run's, so a second run is instant.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/chat_template.py --n 200   # ~5-10 min on 1 core
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="held-out items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute", default="fp32", help="auto, bf16 or fp32")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from core.data import load_examples
    from core.evaluation import evaluate_with_baselines
    from core.models import load_model

    lm = load_model(args.model, precision="fp32", device="cpu")
    examples = load_examples("math", split="validation", n=args.n, seed=args.seed)
    rows = {}
    for template in ("plain", "chat"):
        start = time.perf_counter()
        res = evaluate_with_baselines(lm, "math", examples, None, compute=args.compute, template=template)
        for kind in ("no_prompt", "text_prompt"):
            r = res[kind]
            rows[f"{template}/{kind}"] = {k: r[k] for k in ("n", "accuracy", "accuracy_ci", "mae", "mae_ci",
                                                            "mae_n", "n_unparsed", "answer_loss")}
            rows[f"{template}/{kind}"]["shown"] = [s["prediction"] for s in r["shown"][:4]]
        print(f"{template}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for name, r in rows.items():
        ci = r["accuracy_ci"] or [float("nan")] * 2
        mci = r["mae_ci"] or [float("nan")] * 2
        mae = float("nan") if r["mae"] is None else r["mae"]
        print(f"{name:22s} n={r['n']} EM={r['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]  MAE={mae:.2f} "
              f"[{mci[0]:.2f}, {mci[1]:.2f}] (unparsed {r['n_unparsed']})  answer loss={r['answer_loss']:.3f}  "
              f"e.g. {r['shown']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
