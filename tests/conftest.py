"""Shared fixtures for the end-to-end tests: a tiny corpus / tokenizer / shard workspace and a way
to run the real `levante` command line as a subprocess.

Everything here is sized for a 2-core CPU: a 512-token tokenizer trained on a few documents of four
bundled languages, token shards of ~20k tokens, and a ~100k-parameter MoE (hidden 32, 2 layers,
4 routed experts) with seq_len 32 and micro batch 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

TINY_LANGS = ("bg", "de", "el", "en")  # two scripts (Cyrillic, Greek) and two Latin languages
TINY_DOCS = {"train": 6, "valid": 2}  # documents per language and split
TINY_VOCAB = 512

# The tiny model every end-to-end test trains: DeepSeek-V3 shape, every feature switched on at toy size.
TINY_MODEL = {
    "preset": "tiny",  # base preset + overrides, as a user would write it
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "first_k_dense_replace": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 1.5,
    "max_position_embeddings": 64,
}


def levante_command() -> list[str]:
    """The installed console script, or the module if the script is not on PATH."""
    exe = shutil.which("levante")
    return [exe] if exe else [sys.executable, "-m", "levante"]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("PYTHONWARNINGS", "FORCE_COLOR", "CLICOLOR_FORCE"):  # plain, parseable output
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def run_levante():
    """run_levante(*args, cwd=None, timeout=300) -> CompletedProcess with text stdout/stderr."""

    def run(*args, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*levante_command(), *map(str, args)], cwd=cwd, env=_subprocess_env(),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    return run


@pytest.fixture(scope="session")
def popen_levante():
    """popen_levante(*args, stdout=file, stderr=file) -> Popen of the `levante` CLI."""

    def start(*args, stdout, stderr) -> subprocess.Popen:
        return subprocess.Popen([*levante_command(), *map(str, args)], env=_subprocess_env(),
                                stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)

    return start


@dataclass
class TinyWorkspace:
    root: Path
    corpus_train: Path  # directory of <lang>.train.jsonl slices
    corpus_valid: Path
    tokenizer: Path  # tokenizer.json
    train_shards: Path
    valid_shards: Path
    langs: tuple[str, ...] = TINY_LANGS

    def config_dict(self, model: dict | None = None, run: dict | None = None, data: dict | None = None,
                    optim: dict | None = None, schedule: dict | None = None) -> dict:
        """A full TrainConfig table for the tiny model; the dicts override single keys."""
        return {
            "model": {**TINY_MODEL, **(model or {})},
            "data": {"tokenizer": str(self.tokenizer), "train": str(self.train_shards),
                     "valid": str(self.valid_shards), "seq_len": 32, **(data or {})},
            "optim": {"name": "muon", "lr": 3e-3, "muon_lr": 0.02, **(optim or {})},
            "schedule": {"name": "wsd", "warmup_steps": 2, "decay_fraction": 0.25, **(schedule or {})},
            "run": {"steps": 6, "micro_batch_size": 2, "grad_accum": 1, "seed": 7, "log_every": 1,
                    "eval_every": 0, "eval_batches": 1, "ckpt_every": 2, "keep_last": 2, "device": "cpu",
                    **(run or {})},
        }

    def write_config(self, path: Path, **overrides) -> Path:
        path.write_text(tomli_w.dumps(self.config_dict(**overrides)), encoding="utf-8")
        return path


def _write_slice(src: Path, dst: Path, n_docs: int) -> None:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()][:n_docs]
    assert len(lines) == n_docs, f"{src} has fewer than {n_docs} documents"
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    """{"train": dir, "valid": dir}: a few documents per language from the bundled sample corpus."""
    from levante.data.readers import bundled_corpus

    root = tmp_path_factory.mktemp("tiny_corpus")
    out = {}
    for split, n_docs in TINY_DOCS.items():
        folder = root / split
        folder.mkdir()
        by_lang = {p.name.split(".")[0]: p for p in bundled_corpus(split)}
        for lang in TINY_LANGS:
            _write_slice(by_lang[lang], folder / f"{lang}.{split}.jsonl", n_docs)
        out[split] = folder
    return out


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, tiny_corpus) -> TinyWorkspace:
    """Tokenizer (vocab 512) and train/valid token shards, built once per session with the library."""
    from levante.data.shards import tokenize_corpus
    from levante.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_workspace")
    report = train_tokenizer([tiny_corpus["train"]], root / "tokenizer", TINY_VOCAB, seed=0)
    assert report.vocab_size <= TINY_VOCAB
    for split in ("train", "valid"):
        tokenize_corpus([tiny_corpus[split]], report.path, root / "shards" / split)
    return TinyWorkspace(root, tiny_corpus["train"], tiny_corpus["valid"], report.path,
                         root / "shards" / "train", root / "shards" / "valid")
