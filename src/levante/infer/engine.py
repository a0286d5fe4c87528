"""Autoregressive generation with the MLA latent cache, sampling and streaming text out.

Prefill runs the prompt once through the expanded attention path while filling the latent cache;
each decode step then runs one token through the absorbed path against the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from levante.errors import LevanteError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop_at_eos: bool = True
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the prompt or output
    stop: tuple[str, ...] = field(default_factory=tuple)  # generation ends before any of these strings

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise LevanteError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LevanteError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LevanteError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LevanteError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise LevanteError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LevanteError("stop strings must be non-empty strings")
        return self


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]: greedy, or temperature with optional top-k / nucleus filtering."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], params: SamplingParams, eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt."""
    params.validate()
    if not prompt_ids:
        raise LevanteError("the prompt is empty: give at least one token")
    model.eval()
    device = next(model.parameters()).device
    max_len = len(prompt_ids) + params.max_new_tokens
    limit = model.config.max_position_embeddings
    if max_len > limit:
        raise LevanteError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                           f"exceeds the model's max_position_embeddings ({limit})")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = model.new_cache(1, max_len)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache).logits[:, -1]
    for _ in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)
        tid = int(token)
        if params.stop_at_eos and eos_id is not None and tid == eos_id:
            return
        yield tid
        logits = model(token.view(1, 1), cache=cache).logits[:, -1]


def generate_text(model, tokenizer, prompt: str, params: SamplingParams,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of `prompt`, calling `on_text` with each new piece of text as it forms.

    Byte-level BPE can split one character over several tokens, so text is emitted only once it
    decodes cleanly (no trailing replacement character).
    """
    ids = tokenizer.encode_prompt(prompt)  # `<|bos|> prompt`: documents start so in training
    new: list[int] = []
    shown = ""
    for tid in generate_ids(model, ids, params, eos_id=tokenizer.eos_id):
        new.append(tid)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            if on_text is not None:
                on_text(text[len(shown):])
            shown = text
    text = tokenizer.decode(new)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
