"""Golden Gate on the embedded model: clamp the "weather" feature and watch unrelated replies turn to the weather.

Feature 3731 of the default pack's layer-15 SAE fires on « weather», « Hurricane»,
« storm» (``featurewatch inspect 3731``). Clamping it to 5× its max activation at
every position — with the SAE's error term kept, so nothing else in the
residual changes — bends replies to unrelated prompts toward the weather (2 of
3 at 5×, 1 of 3 at 4×); at 10× the 135M model falls apart
(``featurewatch steer --feature 3731``, numbers in benchmarks/RESULTS.md).

Run:  python examples/golden_gate.py [--strength 5] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import re

from featurewatch import Intervention, Monitor

FEATURE = 3731
WEATHER_WORDS = r"weather|rain|sunny|sunshine|forecast|storm|cloud|snow|temperature|humid|umbrella|wind|hurricane"
PROMPTS = [
    "Write a short note to a colleague about tomorrow's meeting.",
    "Give me three tips for staying focused while studying.",
    "Describe your ideal weekend.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strength", type=float, default=5.0, help="clamp value, × the feature's max activation")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    monitor = Monitor.default(detectors=[])
    clamp = Intervention(feature=FEATURE, mode="clamp", value=args.strength)
    try:
        plain = monitor.generate_batch(PROMPTS, max_new_tokens=args.max_new_tokens)
        steered = monitor.generate_batch(PROMPTS, max_new_tokens=args.max_new_tokens, interventions=[clamp])
    finally:
        monitor.detach()
    for prompt, a, b in zip(PROMPTS, plain, steered):
        print(f"\n▶ {prompt}")
        print(f"  plain:            {' '.join(a.text.split())}")
        print(f"  weather × {args.strength:<5g}  {' '.join(b.text.split())}")
    hits = [bool(re.search(WEATHER_WORDS, r.text, re.I)) for r in (*plain, *steered)]
    n = len(PROMPTS)
    print(f"\nmentions the weather: plain {sum(hits[:n])}/{n}, clamped {sum(hits[n:])}/{n}")


if __name__ == "__main__":
    main()
