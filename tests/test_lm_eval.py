"""The `levante` lm-eval model, the shipped example task, and lm-eval's own client against `levante serve`."""

from __future__ import annotations

import json

import pytest
import torch

from _serving import live_server, save_tiny_checkpoint

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from levante.infer.batch import Engine  # noqa: E402
from levante.infer.engine import SamplingParams  # noqa: E402
from levante.infer.load import load_for_inference  # noqa: E402
from levante.interop.lm_eval import TASKS_DIR, LevanteLM  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_workspace):
    run = save_tiny_checkpoint(tmp_path_factory.mktemp("lmeval"), tiny_workspace)
    model, tok, _ = load_for_inference(run, device="cpu")
    return run, model, tok


def _docs():
    return [json.loads(line) for line in (TASKS_DIR / "levante_mc.jsonl").read_text(encoding="utf-8").splitlines()]


def oracle_accuracy(model, tok) -> float:
    """Pick the choice with the highest log p(" " + choice | question), computed here from full forwards."""
    right = 0
    docs = _docs()
    for d in docs:
        ctx = [tok.bos_id, *tok.encode(d["question"])]
        scores = []
        for choice in d["choices"]:
            whole = [tok.bos_id, *tok.encode(d["question"] + " " + choice)]
            with torch.no_grad():
                lp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return right / len(docs)


def _acc(out) -> float:
    return out["results"]["levante_mc"]["acc,none"]


def test_example_task_scores_as_the_oracle_says(loaded):
    _, model, tok = loaded
    out = simple_evaluate(model=LevanteLM(model=model, tokenizer=tok, batch_size=3), tasks=["levante_mc"],
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    assert len(_docs()) == 28
    assert _acc(out) == pytest.approx(oracle_accuracy(model, tok))


def test_rolling_loglikelihood_and_generation(loaded):
    _, model, tok = loaded
    lm = LevanteLM(model=model, tokenizer=tok, batch_size=2)
    text = "Ein kurzer Satz auf Deutsch."
    ids = [tok.bos_id, *tok.encode(text)]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert lm.loglikelihood_rolling([req])[0] == pytest.approx(expected, abs=1e-4)
    # windows shorter than the text still score every token exactly once
    short = LevanteLM(model=model, tokenizer=tok, max_length=4)
    scored = []
    score = short._score
    short._score = lambda pairs: (scored.extend(len(c) for _, c in pairs), score(pairs))[1]
    assert short.loglikelihood_rolling([req])[0] < 0
    assert sum(scored) == len(tok.encode(text)) > 4 and len(scored) > 1

    prompts = ["Il était une fois", "Érase una vez"]
    plain = Engine(model, tok).generate([tok.encode_prompt(p) for p in prompts],
                                        SamplingParams(max_new_tokens=10, temperature=0))
    reqs = [Instance("generate_until", {}, (p, {"until": ["@@"], "max_gen_toks": 10}), i)
            for i, p in enumerate(prompts)]
    assert lm.generate_until(reqs) == [tok.decode(o) for o in plain]
    stop = tok.decode(plain[0])[3:5]
    cut = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": 10}), 0)])
    assert cut == [tok.decode(plain[0])[: tok.decode(plain[0]).find(stop)]]


def test_local_completions_against_levante_serve_scores_the_same(loaded, tmp_path):
    from levante.infer.server import create_app
    from levante.tokenizer.tokenizer import write_hf_tokenizer_files

    run, model, tok = loaded
    hf_tok = tmp_path / "hf_tokenizer"
    write_hf_tokenizer_files(run / "checkpoints" / next(p.name for p in (run / "checkpoints").iterdir())
                             / "tokenizer.json", hf_tok)
    direct = simple_evaluate(model=LevanteLM(model=model, tokenizer=tok), tasks=["levante_mc"],
                             task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    engine = Engine(model, tok, max_batch=4).start()
    try:
        with live_server(create_app(engine, "tiny")) as url:
            served = simple_evaluate(
                model="local-completions",
                model_args={"base_url": url + "/v1/completions", "model": "tiny", "tokenizer": str(hf_tok),
                            "tokenizer_backend": "huggingface", "add_bos_token": True, "max_length": 255,
                            "num_concurrent": 1, "max_retries": 1},
                tasks=["levante_mc"], task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    finally:
        engine.stop()
    assert _acc(served) == pytest.approx(_acc(direct))
    assert served["results"]["levante_mc"]["acc_norm,none"] == pytest.approx(direct["results"]["levante_mc"]
                                                                               ["acc_norm,none"])


def test_levante_eval_tasks_command(loaded, run_levante):
    run, model, tok = loaded
    r = run_levante("eval", run, "--tasks", "levante_mc", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)["results"]
    assert results["levante_mc"]["acc,none"] == pytest.approx(oracle_accuracy(model, tok))
    bad = run_levante("eval", run, "--tasks", "no_such_task", "--device", "cpu")
    assert bad.returncode == 2 and "unknown lm-eval task" in bad.stderr
    neither = run_levante("eval", run)
    assert neither.returncode == 2 and "--data" in neither.stderr
