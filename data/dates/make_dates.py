"""Generate the `dates` normalisation task: a sentence that mentions a date -> that date in ISO 8601.

    python data/dates/make_dates.py          # rewrites train/val/test.jsonl here, byte for byte

The sentences are made by filling templates with dates drawn by a fixed seed; each template writes
the date its own way (day first, month first, month names, abbreviations). Templates 0-7 make the
train and validation splits; templates 8-9 (and their date formats) appear only in the test split.
"""
import json
import random
from datetime import date, timedelta
from pathlib import Path

SEED = 2024
N_TRAIN, N_VAL, N_TEST = 400, 40, 60
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
EVENTS = ["the meeting", "the concert", "the exam", "the launch", "the wedding", "the audit", "the trip",
          "the match", "the interview", "the festival", "the deadline", "the workshop"]


def ordinal(n):
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


FORMATS = [
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                      # 7 March 2023
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                     # March 7, 2023
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",                          # 07/03/2023 (day first)
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",      # the 7th of March 2023
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",                  # Mar 7 2023
    lambda d: f"{d.day}.{d.month}.{d.year}",                                  # 7.3.2023
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",            # March 7th, 2023
    lambda d: f"{d.year}/{d.month}/{d.day}",                                  # 2023/3/7
    # held out: only in the test split
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3]}-{d.year}",                  # 7-Mar-2023
    lambda d: f"{ordinal(d.day)} {MONTHS[d.month - 1]}, {d.year}",            # 7th March, 2023
]
TEMPLATES = ["{event} is on {date}.", "We moved {event} to {date}.", "Please note: {event}, {date}.",
             "{event} took place on {date}.", "Save the date for {event}: {date}."]
TRAIN_FORMATS, TEST_FORMATS = range(0, 8), range(8, 10)
INSTRUCTION = "Write the date in this text in ISO 8601 (YYYY-MM-DD).\nText: "


def make_example(rng, fmt):
    d = date(1990, 1, 1) + timedelta(days=rng.randrange(365 * 45))
    text = rng.choice(TEMPLATES).format(event=rng.choice(EVENTS), date=FORMATS[fmt](d))
    return {"prompt": INSTRUCTION + text[0].upper() + text[1:], "response": d.isoformat(), "template": fmt}


def make_split(rng, n, formats):
    return [make_example(rng, rng.choice(list(formats))) for _ in range(n)]


def main(out=Path(__file__).parent):
    rng = random.Random(SEED)
    splits = {"train": make_split(rng, N_TRAIN, TRAIN_FORMATS), "val": make_split(rng, N_VAL, TRAIN_FORMATS),
              "test": make_split(rng, N_TEST, TEST_FORMATS)}
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{split}: {len(rows)} examples")


if __name__ == "__main__":
    main()
