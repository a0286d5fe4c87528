"""The `levante` command line as users run it (subprocesses of the installed console script).

Bad input: non-zero exit, exactly one stderr line `error: <reason>`, never a traceback.
Happy path: tokenizer train -> tokenize -> train -> eval --json -> generate -> export hf, and the
export loads in transformers with the same logits.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from levante.cli import app

# ------------------------------------------------------------------------------------------ helpers


def assert_clean_error(result, *fragments: str) -> str:
    """Non-zero exit, stderr is exactly one non-empty line starting with 'error:' naming `fragments`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"exit 0 on bad input; stdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), f"stderr is not one 'error:' line:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from: {lines[0]}"
    return lines[0]


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and command group of the Typer app, as argv prefixes."""
    import typer.main

    paths = []

    def walk(command, prefix):
        paths.append(prefix)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*prefix, name))

    walk(typer.main.get_command(app), ())
    return paths


COMMAND_PATHS = _command_paths()
# The verbs of the design's flow that exist today must all stay reachable.
EXPECTED_VERBS = {("tokenizer", "train"), ("tokenize",), ("train",), ("eval",), ("generate",), ("export", "hf"),
                  ("import", "hf"), ("plan",), ("quickstart",)}


# ---------------------------------------------------------------------------------------- --help


def test_every_expected_verb_is_registered():
    assert EXPECTED_VERBS <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "levante")
def test_help(path, run_levante):
    result = run_levante(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "Traceback" not in result.stderr
    assert not result.stderr.strip(), result.stderr


# ------------------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _not_a_checkpoint(tmp: Path) -> Path:
    d = tmp / "notackpt"
    d.mkdir()
    _write(d / "notes.txt", "just some notes\n")
    return d


def _foreign_shards_config(tmp: Path, ws) -> Path:
    """A config whose shards were tokenized with another tokenizer than data.tokenizer."""
    from levante.tokenizer import LevanteTokenizer, train_tokenizer

    other = train_tokenizer([ws.corpus_train], tmp / "other_tok", vocab_size=400, seed=1)
    assert other.sha256 != LevanteTokenizer(ws.tokenizer).sha256
    return ws.write_config(tmp / "cfg.toml", data={"tokenizer": str(other.path)})


def _untrained_run(tmp: Path, ws) -> Path:
    """A run directory holding one checkpoint of the untrained tiny model (no training needed)."""
    import levante
    from levante.checkpoint import save_checkpoint
    from levante.config import TrainConfig

    cfg = TrainConfig.from_dict(ws.config_dict())
    save_checkpoint(tmp / "run", 0, levante.Transformer(cfg.model), None, {}, keep_last=1,
                    tokenizer_path=ws.tokenizer, config_text=cfg.dumps())
    return tmp / "run"


def _previous_quickstart(tmp: Path) -> Path:
    from levante.quickstart import MARKER

    d = tmp / "qs"
    d.mkdir()
    _write(d / MARKER, "written by levante quickstart\n")
    _write(d / "metrics.jsonl", '{"step": 1}\n')
    return d


# name -> (tmp, workspace) -> (argv, fragments the one-line error must contain)
BAD_INPUT = {
    "train_missing_config": lambda t, ws: (["train", t / "nope.toml", "--out", t / "run"], ["nope.toml"]),
    "train_invalid_toml": lambda t, ws: (["train", _write(t / "c.toml", "[run\nsteps = 3\n"), "--out", t / "run"],
                                         ["c.toml", "TOML"]),
    "train_unknown_key": lambda t, ws: (["train", _write(t / "c.toml", "[run]\nstpes = 3\n"), "--out", t / "run"],
                                        ["run.stpes", "steps"]),
    "train_unknown_section": lambda t, ws: (
        ["train", _write(t / "c.toml", "[rnu]\nsteps = 3\n"), "--out", t / "run"], ["rnu", "run"]),
    "train_topk_group_gt_n_group": lambda t, ws: (
        ["train", _write(t / "c.toml", "[model]\npreset = \"tiny\"\nn_group = 2\ntopk_group = 3\n"),
         "--out", t / "run"], ["topk_group", "n_group"]),
    "train_wrong_type": lambda t, ws: (
        ["train", _write(t / "c.toml", "[run]\nsteps = \"many\"\n"), "--out", t / "run"], ["run.steps"]),
    "train_foreign_shards": lambda t, ws: (["train", _foreign_shards_config(t, ws), "--out", t / "run"],
                                           [str(ws.train_shards), "tokenizer"]),
    "tokenizer_train_empty_corpus": lambda t, ws: (
        ["tokenizer", "train", _write(t / "en.jsonl", ""), "--out", t / "tok"], ["no documents"]),
    "tokenizer_train_vocab_too_small": lambda t, ws: (
        ["tokenizer", "train", ws.corpus_train, "--out", t / "tok", "--vocab-size", "100"], ["100"]),
    "tokenizer_train_missing_input": lambda t, ws: (
        ["tokenizer", "train", t / "missing.jsonl", "--out", t / "tok"], ["missing.jsonl"]),
    "tokenize_missing_input": lambda t, ws: (
        ["tokenize", t / "missing.jsonl", "-t", ws.tokenizer, "-o", t / "shards"], ["missing.jsonl"]),
    "tokenize_missing_tokenizer": lambda t, ws: (
        ["tokenize", ws.corpus_valid, "-t", t / "nope.json", "-o", t / "shards"], ["nope.json"]),
    "eval_missing_checkpoint": lambda t, ws: (
        ["eval", t / "nockpt", "--data", ws.valid_shards, "--seq-len", "32"], ["nockpt"]),
    "eval_not_a_checkpoint": lambda t, ws: (
        ["eval", _not_a_checkpoint(t), "--data", ws.valid_shards, "--seq-len", "32"], ["notackpt"]),
    "generate_missing_checkpoint": lambda t, ws: (["generate", t / "nockpt", "-p", "Hello"], ["nockpt"]),
    "generate_not_a_checkpoint": lambda t, ws: (["generate", _not_a_checkpoint(t), "-p", "Hello"], ["notackpt"]),
    "import_hf_without_config_json": lambda t, ws: (
        ["import", "hf", _not_a_checkpoint(t), t / "imported"], ["notackpt", "config.json"]),
    "export_hf_not_a_checkpoint": lambda t, ws: (
        ["export", "hf", _not_a_checkpoint(t), t / "exported"], ["notackpt"]),
    "export_hf_missing_checkpoint": lambda t, ws: (["export", "hf", t / "nockpt", t / "exported"], ["nockpt"]),
    "train_seq_len_over_max_positions": lambda t, ws: (
        ["train", ws.write_config(t / "c.toml", data={"seq_len": 128}), "--out", t / "run"],
        ["data.seq_len (128)", "max_position_embeddings (64)"]),
    "train_resume_and_overwrite": lambda t, ws: (
        ["train", ws.write_config(t / "c.toml"), "--out", t / "run", "--resume", "--overwrite"], ["--resume"]),
    "tokenizer_train_over_an_existing_tokenizer": lambda t, ws: (
        ["tokenizer", "train", ws.corpus_train, "--out", ws.tokenizer.parent, "--vocab-size", "400"],
        ["tokenizer.json exists", "--overwrite"]),
    "quickstart_over_a_previous_quickstart": lambda t, ws: (
        ["quickstart", "--out", _previous_quickstart(t), "--steps", "1"], ["previous quickstart", "--overwrite"]),
    "generate_on_absent_cuda": lambda t, ws: (
        ["generate", _untrained_run(t, ws), "-p", "Hi", "--device", "cuda:0"] if not torch.cuda.is_available()
        else ["generate", t / "nockpt", "-p", "Hi"], ["cuda" if not torch.cuda.is_available() else "nockpt"]),
    "eval_unknown_device": lambda t, ws: (
        ["eval", _untrained_run(t, ws), "--data", ws.valid_shards, "--device", "tpu"], ["'tpu'"]),
    "plan_unknown_preset": lambda t, ws: (["plan", "nosuchpreset"], ["nosuchpreset", "tiny"]),
    # The reason is printed literally: brackets in a message are text, not console markup.
    "plan_toml_without_model_table": lambda t, ws: (["plan", _write(t / "m.toml", "x = 1\n")], ["[model]"]),
    "plan_value_looks_like_markup": lambda t, ws: (
        ["plan", _write(t / "m.toml", "[model]\nhidden_size = \"[/x]\"\n")], ["[/x]"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gives_one_line_error(case, tmp_path, tiny_workspace, run_levante):
    argv, fragments = BAD_INPUT[case](tmp_path, tiny_workspace)
    result = run_levante(*argv, cwd=tmp_path)
    assert_clean_error(result, *fragments)


def test_failed_tokenize_leaves_no_output(tmp_path, tiny_workspace, run_levante):
    out = tmp_path / "shards"
    result = run_levante("tokenize", _write(tmp_path / "en.jsonl", ""), "-t", tiny_workspace.tokenizer, "-o", out)
    assert_clean_error(result, "empty corpus")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["en.jsonl"]


# ------------------------------------------------------------------------------------ happy path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_workspace, run_levante):
    """tokenizer train -> tokenize (train with 2 workers, valid) -> train, all through the CLI."""
    root = tmp_path_factory.mktemp("cli_run")
    ws = tiny_workspace
    steps = [
        ("tokenizer", "train", ws.corpus_train, "--out", root / "tok", "--vocab-size", "512",
         "--eval", ws.corpus_valid),
        ("tokenize", ws.corpus_train, "-t", root / "tok" / "tokenizer.json", "-o", root / "shards" / "train",
         "--workers", "2"),
        ("tokenize", ws.corpus_valid, "-t", root / "tok" / "tokenizer.json", "-o", root / "shards" / "valid"),
    ]
    for argv in steps:
        result = run_levante(*argv)
        assert result.returncode == 0, f"levante {argv[0]} failed:\n{result.stderr}"
        assert "Traceback" not in result.stderr
    cfg = ws.write_config(root / "cfg.toml",
                          data={"tokenizer": str(root / "tok" / "tokenizer.json"),
                                "train": str(root / "shards" / "train"), "valid": str(root / "shards" / "valid")},
                          run={"steps": 6, "ckpt_every": 3})
    result = run_levante("train", cfg, "--out", root / "run")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return root


def test_cli_tokenize_and_train_outputs(cli_run, tiny_workspace):
    from levante.data.shards import open_shards
    from levante.tokenizer import LevanteTokenizer

    tok = LevanteTokenizer(cli_run / "tok" / "tokenizer.json")
    assert tok.vocab_size <= 512
    for split in ("train", "valid"):
        shards = open_shards(cli_run / "shards" / split, expected_tokenizer_sha256=tok.sha256)
        assert sorted(shards.langs) == sorted(tiny_workspace.langs)
    final = cli_run / "run" / "checkpoints" / "step_00000006"
    assert {"model.safetensors", "optimizer.safetensors", "trainer.json", "tokenizer.json", "config.toml",
            "checksums.json"} <= {p.name for p in final.iterdir()}
    steps = [json.loads(line)["step"] for line in (cli_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None][:6] == [1, 2, 3, 4, 5, 6]


def test_cli_eval_json(cli_run, tiny_workspace, run_levante):
    result = run_levante("eval", cli_run / "run", "--data", cli_run / "shards" / "valid", "--seq-len", "32",
                         "--batch-size", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["per_language"]) == sorted(tiny_workspace.langs)
    for lang, r in report["per_language"].items():
        assert math.isfinite(r["bpb"]) and r["bpb"] > 0, (lang, r)
        assert r["tokens"] > 0 and r["bytes"] > 0
    assert math.isfinite(report["bpb"]) and report["bpb"] > 0
    # Raw corpus files give the same numbers as the shards made from them.
    raw = run_levante("eval", cli_run / "run", "--data", tiny_workspace.corpus_valid,
                      "--seq-len", "32", "--batch-size", "4", "--json")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["per_language"] == report["per_language"]


def test_cli_generate_greedy_is_deterministic(cli_run, run_levante):
    argv = ("generate", cli_run / "run", "--prompt", "The old library", "--temperature", "0", "-n", "5")
    first, second = run_levante(*argv), run_levante(*argv)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    # What it printed after the prompt is the library's greedy continuation on the same checkpoint.
    from levante.infer.engine import SamplingParams, generate_ids
    from levante.infer.load import load_for_inference

    model, tok, _ = load_for_inference(cli_run / "run", device="cpu")
    new = list(generate_ids(model, tok.encode_prompt("The old library"), SamplingParams(5, temperature=0),
                            eos_id=tok.eos_id))
    assert new, "greedy decoding stopped at once: nothing to compare"
    assert first.stdout == "The old library" + tok.decode(new) + "\n"


def test_cli_export_hf_matches_transformers(cli_run, run_levante, tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    import levante
    from levante.tokenizer import LevanteTokenizer

    dst = tmp_path / "hf"
    result = run_levante("export", "hf", cli_run / "run", dst)
    assert result.returncode == 0, result.stderr
    ours = levante.from_pretrained(cli_run / "run")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.shape == b.shape == (2, 24, ours.config.vocab_size)
    assert (a - b).abs().max().item() < 1e-4

    text = "Der Markt öffnet um sechs. Η θάλασσα."
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert hf_tok.encode(text) == LevanteTokenizer(cli_run / "tok" / "tokenizer.json").encode_prompt(text)

    # Generation is conditioned as training was: transformers' greedy `generate` on the export, fed
    # through AutoTokenizer, continues exactly as `levante generate` (latent cache, absorbed MLA).
    # A model trained for 6 steps soon predicts <|eos|>: both sides are told to go on past it.
    assert theirs.generation_config.eos_token_id == [1, 6]  # end of document, end of chat turn
    theirs.generation_config.eos_token_id = None
    for prompt in ("The old library", "Η θάλασσα"):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = theirs.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=hf_tok.pad_token_id)
        assert out.shape[1] - ids.shape[1] == 32
        expected = hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        result = run_levante("generate", cli_run / "run", "--prompt", prompt, "--temperature", "0", "-n", "32",
                             "--ignore-eos", "--device", "cpu")
        assert result.returncode == 0, result.stderr
        assert result.stdout == prompt + expected + "\n"
