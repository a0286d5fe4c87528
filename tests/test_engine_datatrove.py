"""The datatrove engine (local executors) writes the same bytes as the process-pool engine."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from levante.data.engine import executors  # noqa: E402
from levante.data.prepare import PrepareConfig, prepare  # noqa: E402
from test_prepare import DE, EN, FR, IT, NEAR_EN  # noqa: E402


@pytest.fixture()
def inputs(tmp_path) -> Path:
    import json

    root = tmp_path / "in"
    root.mkdir()
    for i, texts in enumerate([[EN, DE], [FR, EN.lower()], [IT, NEAR_EN], [DE + " Ende gut."]]):
        (root / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and (p.suffix == ".zst" or p.name == "report.json")}


def test_datatrove_engines_match_the_pool(inputs, tmp_path):
    cfg = PrepareConfig(shard_docs=2)
    base = prepare([inputs], tmp_path / "pool", cfg, workers=1)
    assert base["duplicates"] == 3 and base["kept"] == 4  # a lower-cased copy and two small edits
    prepare([inputs], tmp_path / "dt", cfg, workers=2, engine="datatrove")
    s1, s2 = executors([str(inputs)], tmp_path / "two_stage", cfg, tasks=3)
    assert s2.depends is s1
    s2.run()  # runs stage 1 (3 tasks) first, then the single global dedup + write task
    want = _files(tmp_path / "pool")
    assert want and _files(tmp_path / "dt") == want
    assert _files(tmp_path / "two_stage") == want
    assert not (tmp_path / ".two_stage.staging").exists()
