"""Continuous-batching generation over one preallocated MLA latent cache, with MTP speculation.

The cache has `max_batch` slots; each holds, per layer, only the normalised kv latent and the rope
key of every position (`LatentCache`). A request takes a free slot, is prefilled alone, then joins
the running decode batch; every step runs all running rows together, each at its own position
(`RowSlots`), and a row leaves as soon as it finishes, freeing its slot for the next request. The
running rows are kept packed in slots 0..B-1, so a step reads the cache in place.

Speculative mode (a model with MTP modules): after each step the first MTP module drafts the token
after next from the main model's last hidden state; the next step feeds [token, draft] and the main
model verifies the draft. A draft is kept only when the token the main model itself picks there
(greedy, or sampled with the request's own settings) equals it, so the output is exactly what plain
decoding gives: greedy output is identical, sampled output has the same distribution.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from levante.errors import LevanteError
from levante.infer.cpu import PackedLinear, column_major_linears
from levante.infer.engine import SamplingParams, sample_next
from levante.model.attention import LatentCache, RowSlots
from levante.model.rope import rope_cos_sin

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """What one request gained in one step: new text (held back while it may still become a stop
    string or an incomplete character), the new token ids, and the finish reason once it is done."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    # (token id, its logprob, {id: logprob} of the top ones) per chosen token, a stop token included
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already seen: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


class Request:
    """One generation: iterate it for `Delta`s, or call `result()`; `cancel()` frees its slot."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                 logprobs: int | None, on_delta=None):
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.on_delta = on_delta  # called from the engine thread instead of queueing (the server's event loop)
        self.stop_ids, self.logprobs = stop_ids, logprobs
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.events: queue.Queue[Delta] = queue.Queue()
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=engine.device).manual_seed(params.seed)
        self.cancelled = False
        self.slot: int | None = None
        self.pos = 0  # positions of this request already in the cache
        self.last: int | None = None  # newest token, not yet in the cache
        self.draft: int | None = None  # MTP's guess for the token after `last`
        self._sent = 0  # characters of decoded output already emitted
        self._stable_text, self._stable_ids = "", 0  # decoded output up to a character boundary, and its ids
        self._pending_ids: list[int] = []
        self._pending_lp: list = []
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True
        self.engine._wake()

    def __iter__(self):
        while True:
            try:
                delta = self.events.get(timeout=0.05 if self.engine.background else 0)
            except queue.Empty:
                if not self.engine.background:
                    self.engine.step()
                continue
            yield delta
            if delta.finish_reason is not None:
                return

    def result(self) -> str:
        return "".join(d.text for d in self)

    @property
    def text(self) -> str:
        return self.engine.tokenizer.decode(self.output_ids)

    # -- called from the engine's step ------------------------------------------------------
    def _accept(self, token: int, logits: torch.Tensor) -> None:
        """Record one chosen token (with its logprobs), finishing on a stop token or the length."""
        if self.logprobs is not None:
            lp = logits.float().log_softmax(-1)
            top = lp.topk(max(self.logprobs, 1))
            self._pending_lp.append((token, float(lp[token]),
                                     dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))))
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return
        self.output_ids.append(token)
        self._pending_ids.append(token)
        self.last = token
        if len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"

    def _flush(self) -> None:
        """Emit the text that can no longer change; on a stop string cut there and finish."""
        # Decode only the ids since the last clean character boundary (plus a few before it, for
        # decoders that treat a first token specially), not the whole output every step.
        decode, ids, stable = self.engine.tokenizer.decode, self.output_ids, self._stable_ids
        start = max(0, stable - 4)
        window, head = decode(ids[start:]), decode(ids[start:stable])
        text = self._stable_text + window[len(head):] if window.startswith(head) else decode(ids)
        if not text.endswith("\ufffd"):
            self._stable_text, self._stable_ids = text, len(ids)
        end = len(text)
        for stop in self.params.stop:
            idx = text.find(stop, max(0, self._sent - len(stop)))
            if idx != -1 and idx < end:
                end, self.finish_reason = idx, "stop"
        if self.finish_reason is None:
            while end > self._sent and text[end - 1] == "\ufffd":  # a character split over tokens
                end -= 1
            for stop in self.params.stop:  # hold back a tail that may grow into a stop string
                for k in range(min(len(stop) - 1, end - self._sent), 0, -1):
                    if text[end - k:end] == stop[:k]:
                        end -= k
                        break
        delta = Delta(text[self._sent:end], self._pending_ids, self.finish_reason, self._pending_lp)
        self._sent, self._pending_ids, self._pending_lp = end, [], []
        if delta.text or delta.token_ids or delta.finish_reason or delta.logprobs:
            (self.on_delta or self.events.put)(delta)


class Engine:
    """A model, its tokenizer and a latent cache of `max_batch` slots of `max_len` positions.

    Synchronous use: `submit` requests and iterate them (iterating drives `step`). Server use:
    `start()` runs the scheduler in a background thread; requests may be submitted from any thread.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_len: int | None = None,
                 speculative: bool = False, compile: bool = False):
        if max_batch < 1 or (max_len is not None and max_len < 2):
            raise LevanteError(f"the engine needs max_batch >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        model.eval()
        self.model, self.tokenizer, self.cfg = model, tokenizer, model.config
        self.max_batch = max_batch
        self.max_len = min(max_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        if speculative and not len(model.mtp):
            raise LevanteError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers >= 1)")
        self.speculative = speculative
        p = model.embed_tokens.weight
        self.device = p.device
        self._head = model.lm_head
        if self.device.type == "cpu":
            column_major_linears(model)
            if max_batch > 1 and PackedLinear.available(model.lm_head.weight):
                self._head = PackedLinear(model.lm_head.weight, rows_hint=max_batch)
        self.cache = [LatentCache(max_batch, self.max_len, self.cfg, p.device, p.dtype)
                      for _ in range(self.cfg.num_hidden_layers)]
        self.mtp_cache = LatentCache(max_batch, self.max_len, self.cfg, p.device, p.dtype) if speculative else None
        # rope cos/sin of every position, made once: each step only indexes them
        self._cos, self._sin = rope_cos_sin(model.inv_freq, model.rope_attention_factor,
                                            torch.arange(self.max_len, device=p.device))
        self._decode_forward, self._decode_draft = self._forward_at, self._draft_at
        if compile:
            # Decode steps only (prefill shapes vary too much): one graph for batch 1, one for any
            # other batch size, each built on first use (tens of seconds on CPU), so off by default.
            # Greedy output equals eager (tests/test_engine_batch.py, slow); speed in BENCHMARKS.md.
            # On CPU a C++ wrapper calls the kernels: Python's per-kernel cost is a large part of a step.
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            self._decode_forward = torch.compile(self._forward_at, dynamic=True, options=options)
            self._decode_draft = torch.compile(self._draft_at, dynamic=True, options=options)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.free = list(range(max_batch))
        self.lock = threading.RLock()  # guards the queues and every forward
        self._work = threading.Condition(self.lock)
        self.background = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"requests": 0, "finished": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "drafted": 0, "accepted": 0, "cancelled": 0,
                      "decode_seconds": 0.0}

    # -- public API ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int] | None = None,
               logprobs: int | None = None, on_delta=None) -> Request:
        params.validate()
        if not prompt_ids:
            raise LevanteError("the prompt is empty: give at least one token")
        need = len(prompt_ids) + params.max_new_tokens + (1 if self.speculative else 0)
        if need > self.max_len:
            raise LevanteError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_new_tokens}) "
                               f"exceeds the context length ({self.max_len})")
        if stop_ids is None:
            stop_ids = {self.tokenizer.eos_id} if params.stop_at_eos else set()
        req = Request(self, prompt_ids, params, set(stop_ids), logprobs, on_delta)
        with self.lock:
            self.waiting.append(req)
            self.stats["requests"] += 1
            self._work.notify()
        return req

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Token ids generated for each prompt, all run as one continuous batch."""
        reqs = [self.submit(p, params) for p in prompts]
        for r in reqs:
            for _ in r:
                pass
        return [r.output_ids for r in reqs]

    def start(self) -> Engine:
        self.background = True
        self._thread = threading.Thread(target=self._loop, name="levante-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()

    def metrics(self) -> dict:
        with self.lock:
            s = dict(self.stats)
            s.update(waiting=len(self.waiting), running=len(self.running), free_slots=len(self.free),
                     max_batch=self.max_batch)
        s["decode_tokens_per_s"] = s["generated_tokens"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
        s["acceptance_rate"] = s["accepted"] / s["drafted"] if s["drafted"] else None
        return s

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], top: int = 1) -> list[tuple[int, float, dict[int, float]]]:
        """Log-probability of every prompt token given the ones before (None for the first)."""
        with self.lock:
            logits = self.model(torch.tensor([ids], device=self.device)).logits[0].float()
        lp = logits.log_softmax(-1)
        out: list = [(ids[0], None, None)]  # nothing predicts the first token
        for i in range(1, len(ids)):
            t = lp[i - 1].topk(max(top, 1))
            out.append((ids[i], float(lp[i - 1, ids[i]]),
                        dict(zip(t.indices.tolist(), t.values.tolist(), strict=True))))
        return out

    # -- scheduling ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self.lock:
            self._work.notify()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.waiting and not self.running:
                    self._work.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # a broken step must not hang the requests in it
                log.exception("engine step failed")
                with self.lock:
                    for r in self.running + self.waiting:
                        r.finish_reason = "error"
                        r._flush()
                        self._release(r)
                    self.waiting.clear()

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.free.append(req.slot)
            req.slot = None
        self.stats["finished"] += 1

    def _pack_rows(self) -> None:
        """Keep the running rows in cache rows 0..B-1, in order, so that a decode step reads every
        layer's cache in place: a row past the front moves into a hole a finished request left."""
        n = len(self.running)
        holes = sorted(s for s in self.free if s < n)
        movers = sorted((r for r in self.running if r.slot >= n), key=lambda r: r.slot)
        caches = self.cache + ([self.mtp_cache] if self.mtp_cache is not None else [])
        for req, dst in zip(movers, holes, strict=True):
            for cache in caches:
                cache.move(req.slot, dst, req.pos)  # positions past pos are written before they are read
            self.free.remove(dst)
            self.free.append(req.slot)
            req.slot = dst
        self.running.sort(key=lambda r: r.slot)

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill), then one decode step for every running row."""
        with self.lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                r.finish_reason = "cancelled"
                r._flush()
                self.stats["cancelled"] += 1
            for r in [r for r in self.running if r.cancelled]:
                r.finish_reason = "cancelled"
                r._flush()
                self._release(r)
                self.stats["cancelled"] += 1
            admitted = []
            self.free.sort()  # the lowest free rows first: fewer rows to move in _pack_rows
            while self.waiting and self.free:
                req = self.waiting.pop(0)
                req.slot = self.free.pop(0)
                admitted.append(req)
            if admitted:
                self._prefill(admitted)
            for req in admitted:
                if req.finish_reason is None:
                    self.running.append(req)
                else:
                    self._release(req)
            if self.running:
                self._pack_rows()
                t0 = time.perf_counter()
                before = self.stats["generated_tokens"]
                self._decode(list(self.running))
                if self.stats["generated_tokens"] > before:
                    self.stats["decode_seconds"] += time.perf_counter() - t0
                for r in [r for r in self.running if r.finish_reason is not None]:
                    self._release(r)

    def _forward(self, ids: torch.Tensor, slots: RowSlots) -> torch.Tensor:
        """Main model over `ids` [B, T] at per-row positions -> final-normed hidden states."""
        m = self.model
        cos, sin = self._cos[slots.positions], self._sin[slots.positions]
        h = m.embed_tokens(ids)
        for layer, cache in zip(m.layers, self.cache, strict=True):
            h, _, _ = layer(h, cos, sin, cache, slots)
        return m.norm(h)

    def _forward_at(self, ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """A decode step over the running rows, which sit in cache rows 0..B-1 (`_pack_rows`)."""
        h = self._forward(ids, RowSlots(rows, positions, kv_len, leading=True))
        return h, self._head(h)

    def _draft(self, h: torch.Tensor, next_ids: torch.Tensor, slots: RowSlots, pick: torch.Tensor) -> torch.Tensor:
        """First MTP module: from h_i and token i+1, logits for token i+2 (filling its own cache at every
        position), at position `pick[b]` of each row b only -> [B, vocab]."""
        m, mtp = self.model, self.model.mtp[0]
        cos, sin = self._cos[slots.positions], self._sin[slots.positions]
        x = mtp.eh_proj(torch.cat((mtp.enorm(m.embed_tokens(next_ids)), mtp.hnorm(h)), dim=-1))
        x, _, _ = mtp.block(x, cos, sin, self.mtp_cache, slots)
        x = mtp.norm(x[torch.arange(x.shape[0], device=x.device), pick])
        return self._head(x)

    def _draft_at(self, h: torch.Tensor, next_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                  kv_len: int, pick: torch.Tensor) -> torch.Tensor:
        return self._draft(h, next_ids, RowSlots(rows, positions, kv_len, leading=True), pick)

    def _choose(self, req: Request, logits: torch.Tensor) -> int:
        p = req.params
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, req.prompt_ids + req.output_ids, p.repetition_penalty)
        return int(sample_next(logits[None], p, req.generator)[0])

    def _prefill(self, reqs: list[Request]) -> None:
        """All newly admitted prompts in one forward, right-padded. A pad token lands in its row's
        cache past the prompt, where the row's own next tokens overwrite it before anything reads it."""
        dev = self.device
        lens = [len(r.prompt_ids) for r in reqs]
        width = max(lens)
        ids = torch.zeros(len(reqs), width, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = torch.tensor(r.prompt_ids)
        positions = torch.arange(width, device=dev)[None].expand(len(reqs), width)
        slots = RowSlots(torch.tensor([r.slot for r in reqs], device=dev), positions, width)
        h = self._forward(ids.to(dev), slots)
        last = torch.tensor(lens, device=dev) - 1
        rows = torch.arange(len(reqs), device=dev)
        final = self._head(h[rows, last])  # only the last prompt position's logits are used
        for i, r in enumerate(reqs):
            self.stats["prompt_tokens"] += lens[i]
            r.pos = lens[i]
            r._accept(self._choose(r, final[i]), final[i])
            self.stats["generated_tokens"] += len(r._pending_ids)
        if self.speculative:
            nxt = torch.zeros_like(ids)
            for i, r in enumerate(reqs):
                nxt[i, : lens[i]] = torch.tensor(r.prompt_ids[1:] + [r.last or 0])  # None: already finished
            drafts = self._draft(h, nxt.to(dev), slots, last).argmax(-1).tolist()
            for r, d in zip(reqs, drafts, strict=True):
                r.draft = d
        for r in reqs:
            r._flush()

    def _decode(self, reqs: list[Request]) -> None:
        dev = self.device
        rows = torch.tensor([r.slot for r in reqs], device=dev)
        pos = torch.tensor([r.pos for r in reqs], device=dev)[:, None]
        if not self.speculative:
            _, logits = self._decode_forward(torch.tensor([[r.last] for r in reqs], device=dev), rows, pos,
                                             max(r.pos for r in reqs) + 1)
            greedy = None
            if all(r.params.temperature == 0 and r.params.repetition_penalty == 1.0 for r in reqs):
                greedy = logits[:, 0].argmax(-1).tolist()  # one device sync for the whole batch
            for i, r in enumerate(reqs):
                r._accept(greedy[i] if greedy is not None else self._choose(r, logits[i, 0]), logits[i, 0])
                r.pos += 1
                self.stats["generated_tokens"] += len(r._pending_ids)
                r._flush()
            return
        positions = torch.cat((pos, pos + 1), dim=1)
        kv_len = max(r.pos for r in reqs) + 2
        h, logits = self._decode_forward(torch.tensor([[r.last, r.draft] for r in reqs], device=dev), rows,
                                         positions, kv_len)
        kept, next_pairs = [], []
        for i, r in enumerate(reqs):
            draft = r.draft
            r._accept(self._choose(r, logits[i, 0]), logits[i, 0])
            t1 = r.last
            ok = r.finish_reason is None and t1 == draft
            self.stats["drafted"] += r.finish_reason is None  # a draft past the end is never checked
            if ok:
                self.stats["accepted"] += 1
                r._accept(self._choose(r, logits[i, 1]), logits[i, 1])
            r.pos += 1 + ok
            kept.append(int(ok))
            next_pairs.append([t1, r.last if ok else t1])
            self.stats["generated_tokens"] += len(r._pending_ids)
            r._flush()
        # MTP over the two verified positions; the draft comes from the last one that was kept.
        # A rejected row writes a throwaway entry at pos + 1, which its next step overwrites first.
        drafts = self._decode_draft(h, torch.tensor(next_pairs, device=dev), rows, positions, kv_len,
                                    torch.tensor(kept, device=dev)).argmax(-1).tolist()
        for r, d in zip(reqs, drafts, strict=True):
            r.draft = d
