"""Generate the forgetting probe: general questions that the *base* SmolLM2-135M-Instruct answers right.

    python data/probe/make_probe.py       # needs labkit and the offline model; about 1 minute on a CPU

Each candidate below has a keyword; an answer counts as right when it contains the keyword (case
insensitive, as a whole word). The base model answers every candidate greedily (the same settings
as lk.data.probe_score's callers: 24 new tokens, the workbook's chat template), and only the
questions it gets right are written to questions.jsonl. So the probe starts at 100% for the base
model by construction, and a fine-tuned model's score measures what it forgot.
"""
import json
from pathlib import Path

CANDIDATES = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the closest star to Earth?", "Sun"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the boiling point of water in degrees Celsius at sea level?", "100"),
    ("How many days are there in a week?", "seven|7"),
    ("How many legs does a spider have?", "eight|8"),
    ("How many continents are there on Earth?", "seven|7"),
    ("What is 2 plus 2?", "four|4"),
    ("What is 10 times 10?", "100|hundred"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color are bananas when they are ripe?", "yellow"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the longest river in Africa?", "Nile"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo|Vinci"),
    ("Who developed the theory of relativity?", "Einstein"),
    ("What is the freezing point of water in degrees Celsius?", "0|zero"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the largest mammal on Earth?", "whale"),
    ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"),
    ("What is the main language spoken in Brazil?", "Portuguese"),
    ("What currency is used in Japan?", "yen"),
    ("How many hours are there in a day?", "24|twenty-four"),
    ("What is the square root of 81?", "9|nine"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("What is the hardest natural substance?", "diamond"),
    ("In which country are the pyramids of Giza?", "Egypt"),
]


def main(out=Path(__file__).parent):
    import labkit as lk
    model, tok = lk.load_model("smollm2")
    rows = [{"prompt": q, "answer": a} for q, a in CANDIDATES]
    answers = lk.text.generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=24)
    right = lk.data.probe_correct(answers, rows)
    kept = [r for r, ok in zip(rows, right) if ok]
    with open(out / "questions.jsonl", "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    print(f"kept {len(kept)} of {len(rows)} questions (the base model answered the others wrongly)")
    for r, a, ok in zip(rows, answers, right):
        if not ok:
            print(f"  dropped: {r['prompt']!r} -> {a[:60]!r}")


if __name__ == "__main__":
    main()
