"""Post-training data: chat conversations (SFT) and preference pairs (DPO) from jsonl, checked,
tokenized with the one chat format (tokenizer/chat.py) and batched resumably.

Chat record:       {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "lang": "de"}
Preference record: {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str, "lang": ...}
(`chosen` / `rejected` may also be one {"role": "assistant", "content": ...} message; `lang` is optional.)

Rules. A conversation is an optional system message, then user and assistant turns alternating,
starting with a user turn and ending with an assistant answer; no turn is empty or whitespace.
A record that breaks a rule is rejected and counted under its reason (REASONS); nothing is dropped
silently. Over-long rule: a conversation (or prompt + answer) longer than seq_len tokens is
rejected as `too_long`, never truncated, so the model never learns an answer cut off before its
`<|end|>`.

SFT packing: conversations, in a seeded order, are packed greedily into rows of seq_len tokens, each
conversation its own document (document_ids), the rest of a row padded. The target of a token is
the next token when that one is part of an assistant answer (its text and its <|end|>), else -100.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from levante.errors import LevanteError
from levante.model.transformer import IGNORE_INDEX
from levante.tokenizer.chat import chat_segments, render_chat

log = logging.getLogger("levante")

REASONS = ("not_json", "not_an_object", "bad_messages", "wrong_roles", "empty_turn", "too_long")
UNKNOWN_LANG = "und"


@dataclass
class ReadReport:
    """What reading a post-training file kept and rejected (reason -> count)."""

    path: str
    records_in: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": self.path, "records_in": self.records_in, "kept": self.kept, "rejected": self.rejected}

    def log(self) -> None:
        if self.rejected:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
            log.warning("%s: kept %d of %d records; rejected: %s", self.path, self.kept, self.records_in, detail)
        else:
            log.info("%s: kept all %d records", self.path, self.records_in)


class Rejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Conversation:
    ids: list[int]
    answer: list[bool]  # per token: part of an assistant answer (trained on)
    lang: str


@dataclass
class Pair:
    prompt: list[int]  # rendered prompt ending with <|assistant|>
    chosen: list[int]  # answer text + <|end|>
    rejected: list[int]
    lang: str


def jsonl_files(path: str | Path) -> list[Path]:
    """A .jsonl file, or every *.jsonl in a directory (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if files:
            return files
        raise LevanteError(f"{path}: no *.jsonl files")
    raise LevanteError(f"post-training data not found: {path}")


def _records(path: str | Path, report: ReadReport):
    for file in jsonl_files(path):
        with open(file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                report.records_in += 1
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    yield Rejected("not_json")
                    continue
                yield rec if isinstance(rec, dict) else Rejected("not_an_object")


def check_turns(messages, need_answer: bool = True) -> list[dict]:
    """The conversation rules above; raises Rejected(reason)."""
    if not isinstance(messages, list) or not messages:
        raise Rejected("bad_messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise Rejected("bad_messages")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or (turns[-1] != "assistant") == need_answer:
        raise Rejected("wrong_roles")
    if any(not m["content"].strip() for m in messages):
        raise Rejected("empty_turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _lang(rec: dict) -> str:
    lang = rec.get("lang")
    return lang if isinstance(lang, str) and lang else UNKNOWN_LANG


def _finish(report: ReadReport, reasons: Counter, kind: str) -> None:
    report.rejected = dict(reasons)
    report.log()
    if report.kept == 0:
        raise LevanteError(f"{report.path}: no usable {kind} records ({report.records_in} read, rejected: "
                           f"{report.rejected or 'none'})")


def read_conversations(path: str | Path, tokenizer, seq_len: int) -> tuple[list[Conversation], ReadReport]:
    report, reasons, out = ReadReport(str(path)), Counter(), []
    for rec in _records(path, report):
        try:
            if isinstance(rec, Rejected):
                raise rec
            messages = check_turns(rec.get("messages"))
            ids, answer = [], []
            for piece, is_answer in chat_segments(tokenizer, messages):
                ids += piece
                answer += [is_answer] * len(piece)
            if len(ids) > seq_len:
                raise Rejected("too_long")
        except Rejected as r:
            reasons[r.reason] += 1
            continue
        out.append(Conversation(ids, answer, _lang(rec)))
        report.kept += 1
    _finish(report, reasons, "chat")
    return out, report


def _answer_text(value) -> str:
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    if not isinstance(value, str):
        raise Rejected("bad_messages")
    if not value.strip():
        raise Rejected("empty_turn")
    return value


def read_pairs(path: str | Path, tokenizer, seq_len: int) -> tuple[list[Pair], ReadReport]:
    report, reasons, out = ReadReport(str(path)), Counter(), []
    for rec in _records(path, report):
        try:
            if isinstance(rec, Rejected):
                raise rec
            prompt = render_chat(tokenizer, check_turns(rec.get("prompt"), need_answer=False))
            chosen, rejected = (tokenizer.encode(_answer_text(rec.get(k))) + [tokenizer.end_id]
                                for k in ("chosen", "rejected"))
            if len(prompt) + max(len(chosen), len(rejected)) > seq_len:
                raise Rejected("too_long")
        except Rejected as r:
            reasons[r.reason] += 1
            continue
        out.append(Pair(prompt, chosen, rejected, _lang(rec)))
        report.kept += 1
    _finish(report, reasons, "preference")
    return out, report


# ------------------------------------------------------------------------------------ SFT batches


@dataclass
class PackedRows:
    inputs: torch.Tensor  # [N, T] int64
    targets: torch.Tensor  # [N, T] int64, -100 where not trained
    document_ids: torch.Tensor  # [N, T] int64
    target_lang: torch.Tensor  # [N, T] int64 index into langs of each target's conversation
    langs: list[str]


def conversation_targets(ids: list[int], answer: list[bool]) -> list[int]:
    """Target at t is token t+1 when that is an answer token (text or <|end|>), else -100; the last
    position has none (the next token belongs to another document)."""
    return [ids[t + 1] if answer[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def pack_conversations(convs: list[Conversation], seq_len: int, pad_id: int, seed: int) -> PackedRows:
    order = np.random.default_rng([seed, 2]).permutation(len(convs))
    langs = sorted({c.lang for c in convs})
    rows: list[list[int]] = [[]]
    used = 0  # tokens in the newest row
    for i in order:
        if used + len(convs[i].ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += len(convs[i].ids)
    n = len(rows)
    inputs = torch.full((n, seq_len), pad_id, dtype=torch.int64)
    targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.int64)
    doc = torch.zeros((n, seq_len), dtype=torch.int64)
    lang = torch.zeros((n, seq_len), dtype=torch.int64)
    for r, members in enumerate(rows):
        pos = 0
        for d, i in enumerate(members):
            c = convs[i]
            end = pos + len(c.ids)
            ids = torch.tensor(c.ids)
            inputs[r, pos:end] = ids
            targets[r, pos:end] = torch.tensor(conversation_targets(c.ids, c.answer))
            doc[r, pos:end] = d
            lang[r, pos:end] = langs.index(c.lang)
            pos = end
        doc[r, pos:] = len(members)  # padding is a document of its own
    return PackedRows(inputs, targets, doc, lang, langs)


class EpochCycle:
    """Batches of item indices; every epoch visits the items in an order drawn from (seed, epoch), so
    the state is (epoch, position) and a resumed run sees exactly the batches it would have seen.
    Under data parallelism, as for token windows, each call takes the next batch_size * world_size
    items of that one stream and rank r keeps rows [r * batch_size, (r + 1) * batch_size): the same
    global batch trains the same items whatever the world size."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = 0, 1
        self.epoch, self.position = 0, 0
        self.last = np.zeros(0, dtype=np.int64)

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def next_indices(self) -> np.ndarray:
        parts, need = [], self.batch_size * self.world_size
        while need:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            take = order[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        self.last = np.concatenate(parts)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.last

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ChatLoader(EpochCycle):
    """SFT batches of packed rows."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int):
        super().__init__(rows.inputs.shape[0], batch_size, seed)
        self.rows, self.langs = rows, rows.langs

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (inputs, targets, document_ids), int64 [batch_size, seq_len]."""
        idx = torch.from_numpy(self.next_indices())
        return self.rows.inputs[idx], self.rows.targets[idx], self.rows.document_ids[idx]

    def label_lang_ids(self) -> torch.Tensor:
        return self.rows.target_lang[torch.from_numpy(self.last)]


# ------------------------------------------------------------------------------------ DPO batches


def pair_batch(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [2P, L], answer mask [2P, L]): rows 0..P-1 prompt+chosen, rows P..2P-1 prompt+rejected,
    right-padded; the mask marks the answer tokens whose log-probabilities DPO sums."""
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    length = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for r, (prompt, answer) in enumerate(seqs):
        ids[r, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[r, len(prompt) : len(prompt) + len(answer)] = True
    return ids, mask


class PairLoader(EpochCycle):
    """DPO batches of preference pairs."""

    def __init__(self, pairs: list[Pair], batch_size: int, seed: int, pad_id: int):
        super().__init__(len(pairs), batch_size, seed)
        self.pairs, self.pad_id = pairs, pad_id
        self.langs = sorted({p.lang for p in pairs})

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_batch([self.pairs[i] for i in self.next_indices()], self.pad_id)


def bundled_post_corpus(kind: str, split: str) -> Path:
    """The bundled CC0 post-training set: kind "chat" or "prefs", split "train" or "valid"."""
    return Path(__file__).resolve().parent.parent / "post_corpus" / f"{kind}.{split}.jsonl"
