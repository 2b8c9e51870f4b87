"""The bundled ``arithmetic`` prompts: a generated data set (no package ships it) for ``task: grpo``.

2,000 questions such as ``What is 17 + 25? Answer with the number only.``, each with its ``answer`` (``42``)
and its ``operation`` (``+`` or ``-``): sums of two numbers from 0 to 99, and differences of two such numbers
whose result is not negative. The draw is seeded (:data:`ARITHMETIC_SEED`) and no question repeats, so the file
is the same on every machine. A reward function checks an answer against the ``answer`` column (the built-in
``exact_answer`` reward), so a model can be tuned by reinforcement without any reference text to imitate.

A small, honest demo of learning from a checkable reward, not a benchmark of arithmetic.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lmtune.data.files import write_jsonl

# Seed and size of the draw: fixed, so the bundled file never changes.
ARITHMETIC_SEED = 14
ARITHMETIC_SIZE = 2000
# Operands are drawn from 0 .. ARITHMETIC_MAX.
ARITHMETIC_MAX = 99


def arithmetic_records(n: int = ARITHMETIC_SIZE, seed: int = ARITHMETIC_SEED) -> list[dict[str, Any]]:
    """``n`` distinct questions (``prompt``, ``answer``, ``operation``) drawn with ``seed``; see the module docstring."""
    span = ARITHMETIC_MAX + 1
    possible = span * span + span * (span + 1) // 2  # ordered sums, and differences a - b with a >= b
    if n > possible:
        raise ValueError(f"at most {possible} distinct questions, asked for {n}")
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    records: list[dict[str, Any]] = []
    while len(records) < n:
        a, b = rng.randint(0, ARITHMETIC_MAX), rng.randint(0, ARITHMETIC_MAX)
        operation = rng.choice("+-")
        if operation == "-" and b > a:
            a, b = b, a  # differences are never negative
        if (a, operation, b) in seen:
            continue
        seen.add((a, operation, b))
        answer = a + b if operation == "+" else a - b
        records.append({"prompt": f"What is {a} {operation} {b}? Answer with the number only.",
                        "answer": str(answer), "operation": operation})
    return records


def write_arithmetic(source: Path, out: Path) -> None:
    """Write the bundled questions to ``out`` (JSON Lines); ``source`` (the registry's marker file) is not read."""
    write_jsonl(out, arithmetic_records())
