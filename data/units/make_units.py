"""Generate the `units` conversion task: a quantity in one metric unit -> the same quantity in
another, as a number and its unit.

    python data/units/make_units.py          # rewrites train/val/test.jsonl here, byte for byte

Each question asks to convert a whole quantity drawn by a fixed seed (1 to 999); the answer is
the exact result with the target unit's symbol ("4000 g"). Every factor is a power of ten, so the
answer appends zeros: a skill a 135M model learns in a few steps, where multiplying by 24 or 60,
or moving a decimal point, is not (a first version, with decimals and days -> h, scored 0% after
chapter 9's 20 steps; one with powers of ten and decimals, 50%). Conversions
0-6 make the train and validation splits; the test split holds 30 questions on the held-out
conversion 7 (tonnes -> kg: its unit names are held out, not its factor, x1000, which five of the
seven training conversions use) and 30 new questions on conversions 0-6.
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
    ("g", "mg", 1000, "grams", "mg"),
    ("m", "mm", 1000, "metres", "mm"),
    # held out: only in the test split
    ("t", "kg", 1000, "tonnes", "kg"),
]
TEMPLATES = ["Convert {value} {name} to {to}.", "How many {to} is {value} {name}?",
             "Express {value} {name} in {to}.", "{value} {name} is how many {to}?"]
TRAIN, HELD_OUT = range(0, 7), range(7, 8)
INSTRUCTION = "Answer with the number and its unit only.\n"


def number(x):
    """No trailing zeros: 12.5, 3, 4700 (the values are whole, so are the answers)."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def make_example(rng, conv):
    _, to, factor, name, symbol = CONVERSIONS[conv]
    value = rng.randint(1, 999)
    question = rng.choice(TEMPLATES).format(value=number(value), name=name, to=symbol)
    return {"prompt": INSTRUCTION + question[0].upper() + question[1:],
            "response": f"{number(value * factor)} {symbol}", "template": conv}


def make_split(rng, n, conversions):
    return [make_example(rng, rng.choice(list(conversions))) for _ in range(n)]


def main(out=Path(__file__).parent):
    rng = random.Random(SEED)
    splits = {"train": make_split(rng, N_TRAIN, TRAIN), "val": make_split(rng, N_VAL, TRAIN),
              "test": make_split(rng, N_TEST // 2, HELD_OUT) + make_split(rng, N_TEST // 2, TRAIN)}
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{split}: {len(rows)} examples")


if __name__ == "__main__":
    main()
