"""Loader for the levante_mc example task: the jsonl beside this file, no hub access."""

import json
from pathlib import Path


def load_levante_mc(**_):
    import datasets

    path = Path(__file__).with_name("levante_mc.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
