"""Masking time for adversarial texts of 1 to 64 KB: it must grow linearly with the size.

`python -m bench.masking`. Writes bench/results/masking-<date>.json. For each kind of text that made backtracking
patterns quadratic (a long run without spaces, thousands of `@`, a digit run glued to a word, spaced digits, a
domain without a dot or made of dots), the best of five timings at each size, and the growth: time at 64 KB over
time at 1 KB, divided by 64. Linear is about 1 (whatever the machine); quadratic would be about 64.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench import record
from shared.redact import mask

SIZES_KB = (1, 2, 4, 8, 16, 32, 64)
KINDS: dict[str, Callable[[int], str]] = {
    "run without spaces": lambda n: "a" * n,
    "at signs": lambda n: "a@" * (n // 2),
    "digit run glued to a word": lambda n: "1" * n + "x",
    "spaced digits": lambda n: "1 " * (n // 2) + "x",
    "domain without a dot": lambda n: "a@" + "b-" * (n // 2),
    "domain of dots": lambda n: "a@" + "a." * (n // 2),
    "json body with emails": lambda n: ('{"email": "ann.smith@clinic.example", "id": "cus_1"}, ' * n)[:n],
}


def best_of(text: str, rounds: int = 5) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        mask(text)
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    kinds: dict[str, dict[str, object]] = {}
    growths: list[float] = []
    for name, make in KINDS.items():
        seconds = {kb: best_of(make(kb * 1024)) for kb in SIZES_KB}
        growth = round(seconds[SIZES_KB[-1]] / seconds[SIZES_KB[0]] / (SIZES_KB[-1] / SIZES_KB[0]), 2)
        growths.append(growth)
        kinds[name] = {"ms_by_kb": {kb: round(s * 1000, 3) for kb, s in seconds.items()}, "growth": growth}
    record("masking", {"kinds": kinds, "worst_growth": max(growths)})


if __name__ == "__main__":
    main()
