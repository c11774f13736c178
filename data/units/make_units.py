"""Generate the `units` conversion task: a quantity in one unit -> the same quantity in another,
as a number and its unit.

    python data/units/make_units.py          # rewrites train/val/test.jsonl here, byte for byte

Each question asks to convert a quantity drawn by a fixed seed; the answer is the exact result,
written with at most two decimals and the target unit's symbol ("12.5 km"). Conversions 0-7 make
the train and validation splits; conversions 8-9 appear only in the test split.
"""
import json
import random
from pathlib import Path

SEED = 4321
N_TRAIN, N_VAL, N_TEST = 400, 40, 60
# (from, to, factor, name of from, symbol of to): value in `to` = value in `from` x factor
CONVERSIONS = [
    ("m", "cm", 100, "metres", "cm"),
    ("km", "m", 1000, "kilometres", "m"),
    ("kg", "g", 1000, "kilograms", "g"),
    ("cm", "mm", 10, "centimetres", "mm"),
    ("L", "mL", 1000, "litres", "mL"),
    ("h", "min", 60, "hours", "min"),
    ("min", "s", 60, "minutes", "s"),
    ("g", "mg", 1000, "grams", "mg"),
    # held out: only in the test split
    ("days", "h", 24, "days", "h"),
    ("t", "kg", 1000, "tonnes", "kg"),
]
TEMPLATES = ["Convert {value} {name} to {to}.", "How many {to} is {value} {name}?",
             "Express {value} {name} in {to}.", "{value} {name} is how many {to}?"]
TRAIN, TEST = range(0, 8), range(8, 10)
INSTRUCTION = "Answer with the number and its unit only.\n"


def number(x):
    """At most two decimals, no trailing zeros: 12.5, 3, 0.25."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def make_example(rng, conv):
    _, to, factor, name, symbol = CONVERSIONS[conv]
    value = rng.choice([rng.randint(1, 99), round(rng.uniform(0.1, 20), 1), round(rng.uniform(0.05, 5), 2)])
    question = rng.choice(TEMPLATES).format(value=number(value), name=name, to=symbol)
    return {"prompt": INSTRUCTION + question[0].upper() + question[1:],
            "response": f"{number(value * factor)} {symbol}", "template": conv}


def make_split(rng, n, conversions):
    return [make_example(rng, rng.choice(list(conversions))) for _ in range(n)]


def main(out=Path(__file__).parent):
    rng = random.Random(SEED)
    splits = {"train": make_split(rng, N_TRAIN, TRAIN), "val": make_split(rng, N_VAL, TRAIN),
              "test": make_split(rng, N_TEST, TEST)}
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{split}: {len(rows)} examples")


if __name__ == "__main__":
    main()
