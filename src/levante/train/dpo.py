"""Direct Preference Optimization (Rafailov et al. 2023): what `[task] kind = "dpo"` changes.

For a prompt x with a chosen answer y_w and a rejected one y_l, with the policy π and a frozen
reference π_ref (the `task.init_from` model, usually the SFT checkpoint):

    r(y) = β (log π(y|x) − log π_ref(y|x))          the implicit reward
    L    = −log σ(r(y_w) − r(y_l))                   averaged over pairs

log π(y|x) sums the log-probabilities of the answer tokens (text + <|end|>). Evals on the held-out
pairs report the loss, the mean reward margin r(y_w) − r(y_l), the reward accuracy (margin > 0) and
the log-prob accuracy log π(y_w|x) > log π(y_l|x), which needs no reference and so also scores the
SFT model itself.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from levante.config import TrainConfig
from levante.data.chat_data import PairLoader, pair_batch, read_pairs
from levante.model.transformer import ModelOutput
from levante.parallel.fsdp import release_gathered


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs [P] each -> (mean loss, reward margins [P])."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin


def answer_logps(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Sum over each row's answer tokens of log p(token | everything before it): [R]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * answer[:, 1:]).sum(-1)


class DPOTask:
    kind = "dpo"

    def __init__(self, cfg: TrainConfig, tokenizer):
        seq = cfg.data.seq_len
        pairs, report = read_pairs(cfg.data.train, tokenizer, seq)
        self.reports = {"train": report.to_dict()}
        self.loader = PairLoader(pairs, cfg.run.micro_batch_size, cfg.run.seed, tokenizer.pad_id)
        self.langs = self.loader.langs
        self.valid = None
        if cfg.data.valid:
            self.valid, vreport = read_pairs(cfg.data.valid, tokenizer, seq)
            self.reports["valid"] = vreport.to_dict()
        self.beta, self.pad_id, self.batch_size = cfg.task.beta, tokenizer.pad_id, cfg.run.micro_batch_size
        self.reference = None

    def set_reference(self, model: torch.nn.Module) -> None:
        """Freeze a copy of the initial model (call before training changes it)."""
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def _logps(self, forward, ids, answer):
        out = forward(ids)
        with torch.no_grad():
            ref = answer_logps(self.reference(ids).logits, ids, answer)
        release_gathered(self.reference)
        return out, answer_logps(out.logits, ids, answer), ref

    def forward(self, forward, batch, device) -> tuple[ModelOutput, None]:
        ids, answer = (t.to(device) for t in batch)
        out, pol, ref = self._logps(forward, ids, answer)
        p = ids.shape[0] // 2
        loss, _ = dpo_loss(pol[:p], pol[p:], ref[:p], ref[p:], self.beta)
        return ModelOutput(logits=out.logits, loss=loss, expert_load=out.expert_load), None

    def loss_per_language(self, out, targets) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, model, device) -> dict:
        if not self.valid:
            return {}
        return preference_metrics(model, self.reference, self.valid, self.pad_id, self.beta, self.batch_size,
                                  device)


@torch.no_grad()
def preference_metrics(model, reference, pairs, pad_id: int, beta: float, batch_size: int = 8,
                       device="cpu") -> dict:
    """Held-out DPO loss, reward margin and accuracies (see the module docstring)."""
    was = model.training
    model.eval()
    margins, pol_gap = [], []
    for i in range(0, len(pairs), batch_size):
        ids, answer = (t.to(device) for t in pair_batch(pairs[i:i + batch_size], pad_id))
        p = ids.shape[0] // 2
        pol = answer_logps(model(ids).logits, ids, answer)
        ref = answer_logps(reference(ids).logits, ids, answer)
        margins.append(dpo_loss(pol[:p], pol[p:], ref[:p], ref[p:], beta)[1].cpu())
        pol_gap.append((pol[:p] - pol[p:]).cpu())
    model.train(was)
    release_gathered(reference)
    margin, gap = torch.cat(margins), torch.cat(pol_gap)
    return {"loss": float(-F.logsigmoid(margin).mean()), "reward_margin": float(margin.mean()),
            "reward_accuracy": float((margin > 0).float().mean()), "logp_accuracy": float((gap > 0).float().mean()),
            "pairs": len(pairs)}
