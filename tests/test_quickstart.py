"""The main job end to end, short: every artefact is written and training lowers held-out bits-per-byte."""

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    proc = subprocess.run([sys.executable, "-m", "levante", "quickstart", "--out", str(out), "--steps", "40"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


def test_quickstart_writes_every_artefact(quickstart_dir):
    out, _ = quickstart_dir
    for name in ("config.toml", "metrics.jsonl", "eval.json", "samples.txt", "report.html",
                 "tokenizer/tokenizer.json", "data/train/index.json", "data/valid/index.json",
                 "prepared/train/report.json", "prepared/train/DATACARD.md", "prepared/valid/report.json"):
        assert (out / name).is_file(), name
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "model.safetensors").is_file() and (ckpts[-1] / "config.toml").is_file()
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2
    # the quickstart starts from raw text: what data prepare kept is what was tokenized
    prepared = json.loads((out / "prepared" / "train" / "report.json").read_text())
    index = json.loads((out / "data" / "train" / "index.json").read_text())
    assert prepared["kept"] == index["num_documents"] and "<h2>Data</h2>" in report
    assert prepared["documents_in"] == prepared["kept"] + sum(prepared["rejected"].values()) + prepared["duplicates"]


def test_quickstart_training_lowers_held_out_bpb_in_every_language(quickstart_dir):
    out, _ = quickstart_dir
    result = json.loads((out / "eval.json").read_text())
    before, after = result["untrained"], result["trained"]
    assert len(after["per_language"]) >= 8
    assert after["bpb"] < before["bpb"] - 0.3
    for lang, r in after["per_language"].items():
        assert r["bpb"] < before["per_language"][lang]["bpb"], lang


def test_quickstart_samples_continue_their_prompts(quickstart_dir):
    """Each sample is a header `[lang] prompt`, then the prompt and what the model wrote after it."""
    from levante.quickstart import PROMPTS

    out, _ = quickstart_dir
    text = (out / "samples.txt").read_text(encoding="utf-8")
    headers = [f"[{lang}] {prompt}\n" for lang, prompt in PROMPTS]
    starts = [text.index(h) for h in headers]
    assert starts == sorted(starts)
    continuations = []
    for (_, prompt), header, start, end in zip(PROMPTS, headers, starts, starts[1:] + [len(text)], strict=True):
        body = text[start + len(header):end].removesuffix("\n\n")
        assert body.startswith(prompt), body[:80]
        new = body[len(prompt):]
        assert new.strip(), f"no generated text after {prompt!r}"
        continuations.append(new)
    # Sampled with different seeds after different prompts: the model's outputs differ.
    assert len(set(continuations)) == len(PROMPTS)


def test_quickstart_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "levante", "quickstart", "--out", str(tmp_path), "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_quickstart_chat_post_trains_and_reports(tmp_path):
    """`levante quickstart --chat` (minutes on a CPU): SFT teaches the end-of-turn token and DPO raises
    held-out preference accuracy over the SFT model; report.html gains a chat section."""
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "levante", "quickstart", "--out", str(out), "--steps", "150",
                           "--chat"], capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr
    chat = json.loads((out / "chat.json").read_text())
    base, sft, dpo = (chat["models"][k] for k in ("base", "sft", "dpo"))
    assert sft["end_of_turn_rate"] >= 0.95 and base["end_of_turn_rate"] <= 0.05
    assert sft["same_language_rate"] > base["same_language_rate"]
    assert dpo["preference_accuracy"] > sft["preference_accuracy"]
    assert "<h2>Chat</h2>" in (out / "report.html").read_text()
