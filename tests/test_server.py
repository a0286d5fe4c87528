"""`levante serve` driven over HTTP with the official openai client, against full-forward oracles."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import httpx
import openai
import pytest
import torch

from _serving import free_port, live_server, save_tiny_checkpoint
from levante.infer.batch import Engine
from levante.infer.engine import SamplingParams
from levante.infer.load import load_for_inference
from levante.infer.server import Limits, create_app
from levante.tokenizer.chat import render_chat

KEY = "test-key-123"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_workspace):
    run = save_tiny_checkpoint(tmp_path_factory.mktemp("serve"), tiny_workspace)
    model, tok, _ = load_for_inference(run, device="cpu")
    return run, model, tok


@pytest.fixture(scope="module")
def server(loaded):
    _, model, tok = loaded
    engine = Engine(model, tok, max_batch=8).start()
    app = create_app(engine, "tiny", limits=Limits(max_tokens=64, max_body_bytes=20_000, max_concurrent=100))
    with live_server(app) as url:
        yield url, engine
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def oracle_greedy(model, ids, n, stop_ids):
    """Greedy continuation by repeated full forwards (no cache), stopping at a stop token."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if t in stop_ids:
                break
            ids.append(t)
            out.append(t)
    return out


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_completion_is_the_greedy_continuation(client, loaded):
    _, model, tok = loaded
    r = client.completions.create(model="tiny", prompt="Das Wetter ist", max_tokens=12, temperature=0)
    ids = tok.encode_prompt("Das Wetter ist")
    expected = oracle_greedy(model, ids, 12, {tok.eos_id})
    assert r.choices[0].text == tok.decode(expected)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")


def test_echo_logprobs_score_the_prompt_as_lm_eval_needs(client, loaded):
    """What lm-eval's local-completions sends: token ids, echo, logprobs=1, max_tokens=1."""
    _, model, tok = loaded
    ids = tok.encode_prompt("Hello world, this is a test")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    # the one generated token is the greedy one, with its logprob
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert r.choices[0].text.startswith(tok.decode(ids))


def test_chat_stream_equals_chat_and_reports_usage(client, loaded):
    _, model, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour !"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    ids = render_chat(tok, messages)
    expected = oracle_greedy(model, ids, 10, {tok.eos_id, tok.end_id})
    assert full.choices[0].message.content == tok.decode(expected)
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == len(expected)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(expected) and not chunks[-1].choices


def test_sse_stream_ends_with_done(server):
    with httpx.stream("POST", server[0] + "/v1/completions",
                      json={"prompt": "Hola", "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_strings_cut_the_answer(client):
    base = client.completions.create(model="tiny", prompt="Ciao", max_tokens=12, temperature=0).choices[0].text
    assert len(base) > 4
    stop = base[2:4]
    cut = client.completions.create(model="tiny", prompt="Ciao", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    args = dict(model="tiny", prompt="Hej", max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


def test_64_concurrent_streaming_clients_get_their_own_greedy_output(server, loaded):
    _, model, tok = loaded
    prompts = [f"Sentence {i} says" for i in range(64)]
    expected = Engine(model, tok, max_batch=16).generate([tok.encode_prompt(p) for p in prompts],
                                                         SamplingParams(max_new_tokens=6, temperature=0))
    aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(p):
        stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    got = asyncio.run(main())
    assert got == [tok.decode(e) for e in expected]


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body["message"]


BAD = {
    "malformed_json": ("/v1/completions", b'{"prompt": "x", ', 400),
    "max_tokens_wrong_type": ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400),
    "prompt_wrong_type": ("/v1/completions", {"prompt": {"a": 1}}, 400),
    "negative_max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
    "huge_max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400),
    "long_prompt": ("/v1/completions", {"prompt": [5] * 300, "max_tokens": 1}, 400),
    "token_out_of_vocab": ("/v1/completions", {"prompt": [5, 10**6], "max_tokens": 1}, 400),
    "temperature_out_of_range": ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    "empty_messages": ("/v1/chat/completions", {"messages": []}, 400),
    "unknown_role": ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    "messages_wrong_type": ("/v1/chat/completions", {"messages": "hello"}, 400),
    "body_too_large": ("/v1/completions", {"prompt": "x" * 30_000}, 413),
    "no_such_route": ("/v1/nothing", {}, 404),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_lives(server, case):
    url, engine = server
    path, body, status = BAD[case]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    _error(httpx.post(url + path, **kw), status)
    assert httpx.get(url + "/health").status_code == 200
    m = engine.metrics()
    assert m["running"] == 0 and m["waiting"] == 0


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=3)


def _wait_idle(url):
    deadline = time.monotonic() + 120  # a liveness guard, not a speed claim
    while time.monotonic() < deadline:
        m = httpx.get(url + "/metrics").json()
        if m["running"] == 0 and m["queue_length"] == 0 and m["in_flight"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"slots never freed: {m}")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(loaded, stream):
    _, model, tok = loaded
    engine = Engine(model, tok, max_batch=2)
    decode = engine._decode

    def slow_decode(reqs):  # slow enough that the client is gone long before 64 tokens are done
        time.sleep(0.05)
        decode(reqs)

    engine._decode = slow_decode
    engine.start()
    try:
        with live_server(create_app(engine, "tiny")) as url:
            body = {"prompt": "Once", "max_tokens": 64, "temperature": 0, "stream": stream}
            if stream:
                with httpx.stream("POST", url + "/v1/completions", json=body) as r:
                    for i, _ in enumerate(r.iter_lines()):
                        if i == 2:
                            break  # leave after a few events
            else:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url + "/v1/completions", json=body, timeout=0.3)
            m = _wait_idle(url)
            assert m["engine"]["cancelled"] == 1 and m["engine"]["free_slots"] == 2
            assert m["engine"]["generated_tokens"] < 64
            r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 200
    finally:
        engine.stop()


def test_api_key_guards_every_route_but_health(loaded):
    _, model, tok = loaded
    engine = Engine(model, tok, max_batch=2).start()
    try:
        with live_server(create_app(engine, "tiny", api_key=KEY)) as url:
            assert httpx.get(url + "/health").status_code == 200
            for path in ("/v1/models", "/metrics", "/"):
                _error(httpx.get(url + path), 401)
                _error(httpx.get(url + path, headers={"Authorization": "Bearer wrong"}), 401)
            _error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 401)
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
            ok = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
            assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason
            assert httpx.get(url + f"/?key={KEY}").status_code == 200
    finally:
        engine.stop()


def test_concurrency_limit_answers_429(loaded):
    _, model, tok = loaded
    engine = Engine(model, tok, max_batch=1)  # not started yet: the first request stays in flight
    try:
        with live_server(create_app(engine, "tiny", limits=Limits(max_concurrent=1))) as url:
            with httpx.stream("POST", url + "/v1/completions",
                              json={"prompt": "a", "max_tokens": 100, "stream": True}) as r:
                assert r.status_code == 200
                _error(httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 2}), 429)
            engine.start()
            _wait_idle(url)
            assert httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 2}).status_code == 200
    finally:
        engine.stop()


def test_metrics_count_requests_and_tokens(server, client):
    before = httpx.get(server[0] + "/metrics").json()
    client.completions.create(model="tiny", prompt="Tak", max_tokens=3, temperature=0)
    after = httpx.get(server[0] + "/metrics").json()
    assert after["engine"]["requests"] == before["engine"]["requests"] + 1
    assert after["engine"]["generated_tokens"] > before["engine"]["generated_tokens"]
    assert {"queue_length", "running", "completion_tokens"} <= set(after)
    assert after["engine"]["decode_tokens_per_s"] > 0


def test_levante_serve_command(loaded, popen_levante, tmp_path):
    run = loaded[0]
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = popen_levante("serve", str(run), "--port", str(port), "--api-key", KEY, "--device", "cpu",
                         stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # liveness guard for the start-up (torch import, model load)
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert client.models.list().data[0].id == "run"
        r = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4
        _error(httpx.get(url + "/v1/models"), 401)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_levante_serve_refuses_bad_options(run_levante, loaded):
    r = run_levante("serve", str(loaded[0]), "--port", "0")
    assert r.returncode == 2 and "error: --port" in r.stderr


def test_levante_chat_keeps_history_and_obeys_commands(loaded):
    """`levante chat` with piped stdin: greedy answers equal the oracle's for the growing history,
    /reset forgets, /temp changes the temperature (and refuses a negative one)."""
    from conftest import _subprocess_env, levante_command

    run, model, tok = loaded
    stop = {tok.eos_id, tok.end_id}

    def answer(history):
        return tok.decode(oracle_greedy(model, render_chat(tok, history), 8, stop))

    a1 = answer([{"role": "user", "content": "Hallo"}])
    stdin = "Hallo\n/temp 0\nWie geht's?\n/reset\n/temp -1\n/bogus\nHallo\n"
    r = subprocess.run([*levante_command(), "chat", str(run), "--temperature", "0.9", "-n", "8", "--device", "cpu"],
                       input=stdin, capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    banner = "Levante chat: /reset starts over, /temp X sets the temperature, /quit leaves.\n"
    # the first answer is sampled at 0.9; after /temp 0 the rest are greedy
    lines = r.stdout[len(banner):]
    first, rest = lines.split("(temperature 0.0)\n", 1)
    assert r.stdout.startswith(banner) and first.endswith("\n")
    sampled = first[:-1]
    a2 = answer([{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": sampled},
                 {"role": "user", "content": "Wie geht's?"}])
    assert rest == (f"{a2}\n(conversation cleared)\n(usage: /temp X with X >= 0)\n"
                    f"(unknown command /bogus; /reset, /temp X, /quit)\n{a1}\n")


def test_speculative_server_answers_like_the_plain_one(loaded, client):
    _, model, tok = loaded
    engine = Engine(model, tok, max_batch=4, speculative=True).start()
    try:
        with live_server(create_app(engine, "tiny")) as url:
            spec = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for prompt in ("Der Zug", "El tren"):
                args = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
                assert spec.completions.create(**args).choices[0].text == \
                    client.completions.create(**args).choices[0].text
            assert httpx.get(url + "/metrics").json()["engine"]["drafted"] > 0
    finally:
        engine.stop()
