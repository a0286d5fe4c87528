"""A `levante` model for lm-evaluation-harness, and `run_tasks` behind `levante eval --tasks`.

Importing this module registers the model, so `lm_eval.simple_evaluate(model="levante",
model_args="pretrained=CKPT")` works. Text is encoded as documents are in training: `<|bos|>` then
the text, so a context of "" is just `<|bos|>`. Loglikelihoods come from full forwards of
right-padded batches (causal attention: padding after a row changes nothing before it);
generation runs through the continuous-batching engine.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval fills its registry only when empty: load its own models first
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from levante.errors import LevanteError
from levante.infer.batch import Engine
from levante.infer.engine import SamplingParams

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"  # the example tasks shipped with Levante


@register_model("levante")
class LevanteLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, device: str = "auto",
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256, **_):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise LevanteError("the levante lm-eval model needs pretrained=CHECKPOINT")
            from levante.infer.load import load_for_inference

            model, tokenizer, _ = load_for_inference(pretrained, device=device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device_ = next(model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = min(int(max_length or 1 << 30), model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # an empty context is the start of a document

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode_prompt(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start:start + self.batch_size]
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in batch]
            width = max(map(len, rows))
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
            logprobs = self.model(ids.to(self.device_)).logits.float().log_softmax(-1).cpu()
            for i, ((_, cont), r) in enumerate(zip(batch, rows, strict=True)):
                n = len(cont)
                lp = logprobs[i, len(r) - n: len(r)]
                target = torch.tensor(cont)
                out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tokenizer.encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            results.append(sum(lp for lp, _ in self._score(windows)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        engine = Engine(self.model, self.tokenizer, max_batch=self.batch_size)
        reqs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(engine.max_len - max_new):]
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, stop=tuple(s for s in until if s))
            reqs.append(engine.submit(ids, params))
        return [r.result() for r in reqs]


def run_tasks(checkpoint, tasks: list[str], device: str = "auto", batch_size: int = 8, limit: int | None = None,
              num_fewshot: int | None = None, include_path: Path | None = None) -> dict:
    """lm-eval `simple_evaluate` of a checkpoint on `tasks` (the shipped examples always findable)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path is not None else [])
    manager = TaskManager(include_path=paths, include_defaults=False)  # indexing lm-eval's own takes long
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LevanteError(f"unknown lm-eval task(s): {', '.join(unknown)} (the example task is levante_mc)")
    lm = LevanteLM(pretrained=str(checkpoint), device=device, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False)
    return {"results": out["results"], "n_samples": out.get("n-samples", {})}
