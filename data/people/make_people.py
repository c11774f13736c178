"""Generate the `people` extraction task: a sentence about a person -> that person as JSON.

    python data/people/make_people.py        # rewrites train/val/test.jsonl here, byte for byte
                                             # (and test_large.jsonl)

Every name, city and job below was written for this workbook; the sentences are made by filling
templates with a fixed seed. Templates 0-7 make the train and validation splits; templates 8-9
appear only in the test split, so the test score measures generalisation to unseen phrasings.

test_large.jsonl (300 rows, templates 8-9 as well) is drawn afterwards by a generator of its own
seed, so the three splits above are the same as before it existed; a row whose prompt is already
in test.jsonl, or earlier in test_large.jsonl, is drawn again, so the two test sets are disjoint.
Chapter 8's comparison (scripts/run_peft_fair.py) scores on it: one example is 0.33 points of
exact match there, against 1.7 on the 60-row test split.
"""
import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN, N_VAL, N_TEST = 400, 40, 60
SEED_LARGE, N_TEST_LARGE = 5678, 300

FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tomas", "Fatima", "Liam",
         "Sofia", "Kwame", "Elena", "Hiro", "Nadia", "Peter", "Amara", "Jonas", "Mei", "Rafael",
         "Ingrid", "Diego", "Zara", "Mateo", "Chloe", "Arjun", "Olga", "Samuel", "Yara", "Felix"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Novak", "Silva", "Sharma", "Berg", "Okafor", "Walsh",
        "Rossi", "Mensah", "Petrova", "Sato", "Karimi", "Muller", "Diallo", "Larsen", "Chen", "Costa",
        "Hansen", "Ortiz", "Ali", "Garcia", "Martin", "Patel", "Ivanova", "Cohen", "Nunes", "Weber"]
CITIES = ["Lisbon", "Toronto", "Osaka", "Cairo", "Prague", "Lima", "Mumbai", "Oslo", "Lagos", "Dublin",
          "Milan", "Accra", "Sofia", "Kyoto", "Tehran", "Munich", "Dakar", "Bergen", "Taipei", "Porto"]
JOBS = ["nurse", "teacher", "engineer", "chef", "pilot", "lawyer", "farmer", "architect", "baker",
        "dentist", "journalist", "plumber", "librarian", "pharmacist", "electrician", "translator"]

TEMPLATES = [
    "{name}, {age}, works as a {job} in {city}.",
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}: {job}, {age} years old, based in {city}.",
    "In {city}, {name} ({age}) has a job as a {job}.",
    "At {age}, {name} earns a living as a {job} in {city}.",
    "{name} lives in {city}. {name_first} is {age} and works as a {job}.",
    "Our new {job} from {city} is {name}, aged {age}.",
    "Born {age} years ago, {name} now works in {city} as a {job}.",
    # held out: only in the test split
    "Profile -- name: {name}; home: {city}; occupation: {job}; age: {age}.",
    "The {job} {name}, who is {age}, moved to {city} last year.",
]
TRAIN_TEMPLATES, TEST_TEMPLATES = range(0, 8), range(8, 10)
INSTRUCTION = ("Extract the person from the text as JSON with the keys name, age, city and job.\n"
               "Text: ")


def make_example(rng, template_id):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    person = {"name": f"{first} {last}", "age": rng.randint(19, 74),
              "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    text = TEMPLATES[template_id].format(name_first=first, **person)
    return {"prompt": INSTRUCTION + text, "response": json.dumps(person), "template": template_id}


def make_split(rng, n, templates):
    return [make_example(rng, rng.choice(list(templates))) for _ in range(n)]


def make_large_test(rng, n, test):
    """n held-out-template rows, none with a prompt of `test` or a repeated one."""
    seen, rows = {r["prompt"] for r in test}, []
    while len(rows) < n:
        row = make_example(rng, rng.choice(list(TEST_TEMPLATES)))
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def main(out=Path(__file__).parent):
    rng = random.Random(SEED)
    splits = {"train": make_split(rng, N_TRAIN, TRAIN_TEMPLATES),
              "val": make_split(rng, N_VAL, TRAIN_TEMPLATES),
              "test": make_split(rng, N_TEST, TEST_TEMPLATES)}
    splits["test_large"] = make_large_test(random.Random(SEED_LARGE), N_TEST_LARGE, splits["test"])
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{split}: {len(rows)} examples")


if __name__ == "__main__":
    main()
