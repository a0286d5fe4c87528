"""Distributed checkpoints: saved at N ranks, resumed at M, atomic and checksummed; consolidate ->
an ordinary checkpoint that from_pretrained and `export hf` (then transformers) load.

Reference: one uninterrupted run of STEPS steps saving at step SAVE. A copy of it cut back to the
step-SAVE checkpoint (later checkpoints removed, as after a crash) is resumed at another world size
with the same global batch; its steps after SAVE must match the reference's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_parallel import ENV, EXACT_OPTIM, RTOL, assert_close, steps_of, torchrun

STEPS, SAVE = 4, 2
GLOBAL_BATCH = 4


def cfg(ws, path: Path, world: int, ep: int = 1) -> Path:
    path = ws.write_config(path, model={"num_nextn_predict_layers": 1}, optim=EXACT_OPTIM,
                           run={"steps": STEPS, "micro_batch_size": GLOBAL_BATCH // world, "ckpt_every": SAVE,
                                "keep_last": 3, "eval_every": 0, "log_every": 1})
    path.write_text(path.read_text() + f"\n[parallel]\nep = {ep}\n")
    return path


def train(world: int, config: Path, out: Path, run_levante, *extra) -> list[int]:
    """Run training; -> the steps it logged on stdout (rank 0's lines only)."""
    if world == 1:
        result = run_levante("train", config, "--out", out, *extra)
    else:
        result = torchrun(world, "train", config, "--out", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("step ")]


def cut_back(run: Path, dst: Path) -> Path:
    """A copy of `run` whose newest checkpoint is step SAVE (later ones removed, as after a crash)."""
    shutil.copytree(run, dst)
    for step in range(SAVE + 1, STEPS + 1):
        shutil.rmtree(dst / "checkpoints" / f"step_{step:08d}", ignore_errors=True)
    return dst


@pytest.fixture(scope="module")
def runs(tiny_workspace, run_levante, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key, value in ENV.items():
        mp.setenv(key, value)
    root = tmp_path_factory.mktemp("dcp")
    out = {}
    for world, ep in ((1, 1), (2, 1), (2, 2)):
        key = world if ep == 1 else f"{world}ep{ep}"
        out[key] = root / f"w{key}"
        train(world, cfg(tiny_workspace, root / f"w{key}.toml", world, ep), out[key], run_levante)
    yield root, out
    mp.undo()


def assert_continues(reference: Path, resumed: Path) -> None:
    ref = {r["step"]: r for r in steps_of(reference)}
    got = {r["step"]: r for r in steps_of(resumed)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(SAVE + 1, STEPS + 1):
        for key in ("loss", "grad_norm", "load_max_over_mean"):
            assert_close(ref[step][key], got[step][key], f"step {step} {key}", RTOL)


def test_two_rank_checkpoint_is_dcp_and_checksummed(runs):
    _, out = runs
    step = out[2] / "checkpoints" / f"step_{SAVE:08d}"
    names = {p.name for p in step.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.json", "checksums.json", "config.toml",
            "tokenizer.json"} <= names
    listed = set(json.loads((step / "checksums.json").read_text())["files"])
    assert listed == names - {"checksums.json"}
    assert not [p for p in (out[2] / "checkpoints").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("saved, resumed, ep", [(2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 4, 1), (2, 2, 2), ("2ep2", 1, 1)])
def test_resume_at_another_world_size_continues_identically(runs, run_levante, tiny_workspace, saved, resumed, ep):
    """Also across expert parallelism: saved without EP resumed with ep = 2, and saved with it resumed
    in one process (expert stacks are saved whole)."""
    root, out = runs
    copy = cut_back(out[saved], root / f"resume_{saved}_to_{resumed}_ep{ep}")
    logged = train(resumed, cfg(tiny_workspace, root / f"r{saved}{resumed}{ep}.toml", resumed, ep), copy,
                   run_levante, "--resume")
    assert logged == list(range(SAVE + 1, STEPS + 1))
    assert_continues(out[saved], copy)


def test_corrupt_newest_shard_falls_back_to_the_previous_checkpoint(runs, tiny_workspace, run_levante):
    root, out = runs
    copy = root / "corrupt"
    shutil.copytree(out[2], copy)
    newest = copy / "checkpoints" / f"step_{STEPS:08d}"
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (copy / "checkpoints" / f"step_{STEPS + 1:08d}.tmp-dcp").mkdir()  # a save that crashed midway
    logged = train(2, cfg(tiny_workspace, root / "c.toml", 2), copy, run_levante, "--resume")
    assert logged == list(range(SAVE + 1, STEPS + 1))
    assert_continues(out[2], copy)  # resumed from step SAVE, not from the corrupt step STEPS


def test_consolidate_gives_an_ordinary_checkpoint_that_exports(runs, run_levante, tmp_path):
    import levante
    from levante.checkpoint.dcp import load_dcp
    from levante.model.transformer import Transformer

    _, out = runs
    dst = tmp_path / "merged"
    result = run_levante("checkpoint", "consolidate", out[2], dst)
    assert result.returncode == 0, result.stderr
    assert (dst / "model.safetensors").is_file() and (dst / "optimizer.safetensors").is_file()
    trainer = json.loads((dst / "trainer.json").read_text())
    assert trainer["step"] == STEPS

    model = levante.from_pretrained(dst)
    direct = Transformer(model.config)
    load_dcp(out[2] / "checkpoints" / f"step_{STEPS:08d}", direct, None)
    ids = torch.randint(2, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(ours, direct.eval()(ids).logits, rtol=0, atol=0)

    hf_dir = tmp_path / "hf"
    result = run_levante("export", "hf", dst, hf_dir)
    assert result.returncode == 0, result.stderr
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)

    # a non-empty OUT is refused with one line; a dir without DCP checkpoints too
    again = run_levante("checkpoint", "consolidate", out[2], dst)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--overwrite" in again.stderr
    none = run_levante("checkpoint", "consolidate", out[1], tmp_path / "x")
    assert none.returncode == 2 and "no distributed checkpoint" in none.stderr
    assert load_file(dst / "model.safetensors").keys() == direct.state_dict().keys()
