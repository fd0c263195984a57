"""slm-serve through the entry points users use: the command (a real process on a free
loopback port), the official ``openai`` client, and raw HTTP for what a client library
would not send. Greedy answers are compared with ``generate.py --greedy`` for the same
prompt alone."""

from __future__ import annotations

import contextlib
import io
import json
import random
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the serving tests need the test extra (openai)")
httpx = pytest.importorskip("httpx", reason="the serving tests need the test extra (httpx)")
pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The little dog saw a big red ball in the park and", "One day,",
           "Lily and Tom went to the park to play with a big red ball. They",
           "There was a tiny frog who lived in a pond near a very old tree. He liked to",
           "Mom said"]


NO_EOT = {"50256": -100}  # the briefly trained model ends its stories soon: go on past them


def cli_greedy(export, prompt: str, new_tokens: int) -> str:
    """What ``generate.py --backend ort --greedy --logit-bias 50256=-100`` prints for ``prompt``
    alone, less the prompt."""
    from slm_export.cli.generate import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--backend", "ort", "--model", str(export), "--prompt", prompt, "--greedy",
                     "--max-new-tokens", str(new_tokens), "--logit-bias", "50256=-100",
                     "--no-stream", "--device", "cpu"]) == 0
    text = out.getvalue()
    assert text.startswith(prompt) and text.endswith("\n")
    return text[len(prompt):-1]


@pytest.fixture(scope="module")
def server(trained_export, serving):
    with serving(trained_export, "--backend", "ort", "--max-batch", "16", "--max-queue", "32",
                 "--max-tokens", "256") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_plain_streaming_n_and_stop_through_the_openai_client(client, trained_export):
    want = cli_greedy(trained_export, PROMPTS[0], 40)
    plain = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPTS[0],
                                      max_tokens=40, temperature=0, logit_bias=NO_EOT)
    assert plain.choices[0].text == want and plain.choices[0].finish_reason == "length"
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (4, 40)
    chunks = list(client.completions.create(prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                            stream=True, model=plain.model, logit_bias=NO_EOT))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 20
    # usage on a stream (the bench counts tokens by it): what the whole answer reports, which
    # counts the tokens generated, fewer than max_tokens where the story ended first
    whole = client.completions.create(prompt=PROMPTS[1], max_tokens=120, temperature=0, model=plain.model)
    counted = list(client.completions.create(prompt=PROMPTS[1], max_tokens=120, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, model=plain.model))
    assert not counted[-1].choices and counted[-1].usage == whole.usage  # usage: the last chunk
    assert "".join(c.choices[0].text for c in counted[:-1]) == whole.choices[0].text
    assert (whole.usage.completion_tokens < 120) == (whole.choices[0].finish_reason == "stop")
    stop = want.split()[5]  # a word of the greedy text: the answer ends just before it
    cut = client.completions.create(prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "zz"],
                                    model=plain.model, logit_bias=NO_EOT)
    assert cut.choices[0].text == want[:want.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = client.completions.create(prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=20, n=3, seed=5,
                                        temperature=1.0, model=plain.model)
    assert [c.index for c in sampled.choices] == list(range(6))
    assert len({c.text for c in sampled.choices[:3]}) > 1  # n samples of one prompt differ
    again = client.completions.create(prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=20, n=3, seed=5,
                                      temperature=1.0, model=plain.model)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # a seed repeats


def test_concurrent_greedy_requests_each_get_their_cli_text(client, trained_export):
    """Requests of different prompts and lengths arriving at different moments share the
    batch (rows join and leave it) and cross the 128-token window: each gets exactly the
    text generate.py --greedy gives its prompt alone."""
    lengths = [150, 60, 140, 20, 100, 130]
    want = [cli_greedy(trained_export, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    got, errors = [None] * len(PROMPTS), []

    def ask(i):
        try:
            time.sleep(0.15 * i)
            stream = client.completions.create(model=client_model, prompt=PROMPTS[i], stream=True,
                                               max_tokens=lengths[i], temperature=0, logit_bias=NO_EOT)
            got[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except Exception as e:  # reported below
            errors.append(e)

    client_model = client.models.list().data[0].id
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"prompt {i}"


BAD = {  # body -> the param the error names (None: the body itself)
    "not json": ("{bad", None),
    "not an object": ("[1, 2]", None),
    "no prompt": (json.dumps({"max_tokens": 3}), "prompt"),
    "empty prompt": (json.dumps({"prompt": ""}), "prompt"),
    "prompt of the wrong type": (json.dumps({"prompt": 5}), "prompt"),
    "token id outside the vocabulary": (json.dumps({"prompt": [1, 99999]}), "prompt"),
    "max_tokens 0": (json.dumps({"prompt": "a", "max_tokens": 0}), "max_tokens"),
    "max_tokens past the limit": (json.dumps({"prompt": "a", "max_tokens": 257}), "max_tokens"),
    "max_tokens a string": (json.dumps({"prompt": "a", "max_tokens": "8"}), "max_tokens"),
    "negative temperature": (json.dumps({"prompt": "a", "temperature": -1}), "temperature"),
    "top_p 0": (json.dumps({"prompt": "a", "top_p": 0}), "top_p"),
    "top_p 1.5": (json.dumps({"prompt": "a", "top_p": 1.5}), "top_p"),
    "unknown model": (json.dumps({"prompt": "a", "model": "gpt-4"}), "model"),
    "n too large": (json.dumps({"prompt": "a", "n": 17}), "n"),
    "five stop strings": (json.dumps({"prompt": "a", "stop": list("abcde")}), "stop"),
    "logprobs": (json.dumps({"prompt": "a", "logprobs": 2}), "logprobs"),
    "presence_penalty 3": (json.dumps({"prompt": "a", "presence_penalty": 3}), "presence_penalty"),
    "logit_bias key": (json.dumps({"prompt": "a", "logit_bias": {"x": 1}}), "logit_bias"),
    "stream not a flag": (json.dumps({"prompt": "a", "stream": "yes"}), "stream"),
}


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for what, (body, param) in BAD.items():
            r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (what, r.status_code, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, what
            assert "\n" not in error["message"] and "Traceback" not in r.text, what
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "not a chat model" in r.json()["error"]["message"]
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) > 0


def test_models_health_info_and_metrics(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        info = http.get("/v1/info").json()
        assert (info["backend"], info["variant"], info["device"]) == ("ort", "fp32", "cpu")
        assert [m.id for m in client.models.list().data] == [info["model"]]
        text = http.get("/metrics").text
    for name in ("slm_requests_total", "slm_tokens_generated_total", "slm_time_to_first_token_seconds",
                 "slm_inter_token_latency_seconds", "slm_running_rows", "slm_queue_depth"):
        assert name in text, name
    assert 'slm_requests_total{outcome="ok"}' in text


def _metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        cancelled = _metric(http, 'slm_requests_total{outcome="cancelled"}')
        with http.stream("POST", "/v1/completions", json={
                "prompt": PROMPTS[1], "max_tokens": 250, "temperature": 0, "stream": True,
                "logit_bias": NO_EOT}) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(5)][0].startswith("data: ")
        deadline = time.monotonic() + 10
        while http.get("/health").json()["running_rows"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json()["running_rows"] == 0
        assert _metric(http, 'slm_requests_total{outcome="cancelled"}') == cancelled + 1
        generated = _metric(http, "slm_tokens_generated_total")
        time.sleep(0.5)
        assert _metric(http, "slm_tokens_generated_total") == generated  # nothing runs on


def test_access_limits_queue_and_shutdown(trained_export, serving):
    """An API key, a body limit, a full queue (429 with Retry-After; every request answered),
    and SIGTERM: the running stream ends cleanly and the process exits 0."""
    key = {"Authorization": "Bearer s3cret"}
    with serving(trained_export, "--backend", "ort", "--max-batch", "1", "--max-queue", "1",
                 "--api-key", "s3cret", "--max-body", "4096", "--shutdown-grace", "1") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"prompt": "Once upon a time", "max_tokens": 4}
        assert http.post("/v1/completions", json=body).status_code == 401
        r = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.post("/v1/completions", json=body, headers=key).status_code == 200
        r = http.post("/v1/completions", json={"prompt": "x" * 5000}, headers=key)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        answers = []

        def ask():
            r = http.post("/v1/completions", headers=key,
                          json={"prompt": "Once", "max_tokens": 120, "logit_bias": NO_EOT})
            answers.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        statuses = [status for status, _ in answers]
        assert sorted(statuses)[0] == 200 and 429 in statuses and len(statuses) == 5
        assert set(statuses) <= {200, 429} and all(r == "1" for s, r in answers if s == 429)
        with http.stream("POST", "/v1/completions", headers=key, json={
                "prompt": "Once", "max_tokens": 250, "stream": True, "logit_bias": NO_EOT}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.send_signal(15)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finishes[-1] in ("length", "stop")
        assert server.stop() == 0


def test_soak_mixed_clients_for_a_minute(server, trained_export):
    """16 clients for ~60 s: greedy requests of mixed lengths (each answer checked), streams
    dropped mid-way, bad requests; at the end no 5xx, every good answer right, RSS flat."""
    from slm_export.runtime import SamplingConfig, generate, load_backend
    from slm_export.tokenizer import decode, encode

    backend = load_backend("ort", trained_export)
    greedy = SamplingConfig(temperature=0, top_k=None, logit_bias=((50256, -100.0),))
    lengths = (8, 40, 140)
    want = {}
    for p in PROMPTS:
        for n in lengths:
            want[p, n] = decode(generate(backend, [encode(p)], max_new_tokens=n, sampling=greedy).tokens[0])
    failures, counts, lock = [], {"good": 0, "bad": 0, "dropped": 0}, threading.Lock()
    end = time.monotonic() + 60

    def client_loop(seed: int):
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while time.monotonic() < end:
                roll, prompt, n = rng.random(), rng.choice(PROMPTS), rng.choice(lengths)
                try:
                    if roll < 0.15:
                        r = http.post("/v1/completions", json={"prompt": prompt, "top_p": 2})
                        kind, ok = "bad", r.status_code == 400
                    elif roll < 0.3:
                        with http.stream("POST", "/v1/completions", json={
                                "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}) as r:
                            lines = r.iter_lines()
                            for _ in range(rng.randint(1, 6)):
                                next(lines)
                        kind, ok = "dropped", r.status_code == 200
                    else:
                        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": n,
                                                               "temperature": 0, "logit_bias": NO_EOT})
                        kind = "good"
                        ok = r.status_code == 200 and r.json()["choices"][0]["text"] == want[prompt, n]
                except Exception as e:  # a failure of the server, reported below
                    kind, ok = "exception", False
                    r = e
                with lock:
                    counts[kind] = counts.get(kind, 0) + 1
                    if not ok:
                        failures.append((kind, prompt, n, getattr(r, "status_code", r)))

    warm = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
    for t in warm:
        t.start()
    time.sleep(15)
    rss_start = server.rss_mb()
    for t in warm:
        t.join(timeout=200)
    rss_end = server.rss_mb()
    assert not failures, failures[:5]
    assert counts["good"] > 50 and counts["bad"] > 10 and counts["dropped"] > 10, counts
    assert rss_end - rss_start < 40, (rss_start, rss_end)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").json()["running_rows"] == 0
        assert 'outcome="error"' not in http.get("/metrics").text
