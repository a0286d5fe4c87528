"""How well a model chats, on held-out prompts: greedy answers, end-of-turn rate, answer-language rate,
and the preference accuracy on held-out pairs. Used by `levante quickstart --chat`.

The answer language is guessed by a character n-gram classifier (1- to 3-grams, add-one smoothed
log-likelihood) trained on the bundled sample corpus: enough to tell the quickstart's 8 languages
apart on a sentence, not a general language-ID tool.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import torch

from levante.data.chat_data import Pair, pair_batch
from levante.data.readers import bundled_corpus
from levante.infer.engine import SamplingParams, generate_ids
from levante.tokenizer.chat import render_chat
from levante.train.dpo import answer_logps


def _grams(text: str) -> list[str]:
    t = f" {text.lower()} "
    return [t[i:i + n] for n in (1, 2, 3) for i in range(len(t) - n + 1)]


class LanguageGuesser:
    def __init__(self, langs: list[str]):
        self.counts, self.totals = {}, {}
        for path in bundled_corpus("train"):
            lang = path.name.split(".")[0]
            if lang not in langs:
                continue
            c = Counter()
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    c.update(_grams(json.loads(line)["text"]))
            self.counts[lang], self.totals[lang] = c, sum(c.values())
        self.vocab = len(set().union(*self.counts.values()))

    def guess(self, text: str) -> str | None:
        grams = _grams(text)
        if not text.strip():
            return None

        def score(lang):
            c, total = self.counts[lang], self.totals[lang] + self.vocab
            return sum(math.log((c.get(g, 0) + 1) / total) for g in grams)
        return max(self.counts, key=score)


def greedy_answer(model, tokenizer, messages, max_new_tokens: int = 32) -> tuple[str, bool]:
    """(answer text, whether it ended with <|end|> within max_new_tokens)."""
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    new, ended = [], False
    for tid in generate_ids(model, prompt, params, eos_id=None):
        if tid == tokenizer.end_id:
            ended = True
            break
        new.append(tid)
    return tokenizer.decode(new), ended


def answer_metrics(model, tokenizer, prompts: list[tuple[str, list[dict]]], guesser: LanguageGuesser,
                   max_new_tokens: int = 32) -> dict:
    """prompts: (lang, messages) -> {end_of_turn_rate, same_language_rate, answers: [...]}."""
    answers, ended, same = [], 0, 0
    for lang, messages in prompts:
        text, done = greedy_answer(model, tokenizer, messages, max_new_tokens)
        answers.append(text)
        ended += done
        same += guesser.guess(text) == lang
    n = max(len(prompts), 1)
    return {"end_of_turn_rate": ended / n, "same_language_rate": same / n, "answers": answers}


@torch.no_grad()
def logp_accuracy(model, pairs: list[Pair], pad_id: int, batch_size: int = 8) -> float:
    """Fraction of held-out pairs where log p(chosen) > log p(rejected) under the model."""
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    for i in range(0, len(pairs), batch_size):
        ids, answer = (t.to(device) for t in pair_batch(pairs[i:i + batch_size], pad_id))
        logp = answer_logps(model(ids).logits, ids, answer)
        p = ids.shape[0] // 2
        wins += int((logp[:p] > logp[p:]).sum())
    return wins / max(len(pairs), 1)
