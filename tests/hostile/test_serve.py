"""Hostile requests to `moe-runtime serve`: each gets a 4xx with OpenAI's error JSON and the server keeps
serving; a decode that fails ends that request with 500 and leaves the others running (and exact); a full
queue answers 429 at once; a draining server answers 503 while its running requests finish."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import Solo, metric, serving, url  # noqa: E402

import httpx  # noqa: E402

from moe_runtime.model.tiny import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("serve-hostile"), seed=3)


@pytest.fixture(scope="module")
def server(tiny):
    with serving(tiny, max_batch=4, max_queue=8, api_key="sekret") as s:
        yield s


AUTH = {"Authorization": "Bearer sekret"}
OK = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}


def _refused(server, path: str, status: int, word: str, *, json=None, content=None, headers=AUTH) -> None:
    r = httpx.post(url(server) + path, json=json, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert word in err["message"] and err["type"], err
    # and the server still answers everyone else
    r = httpx.post(url(server) + "/v1/completions", json=OK, headers=AUTH, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3


@pytest.mark.parametrize("content, word", [
    (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON"), (b"", "JSON")])
def test_malformed_json(server, content, word):
    _refused(server, "/v1/completions", 400, word, content=content)


@pytest.mark.parametrize("body, word", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": "x", "stop": 7}, "stop"),
    ({"prompt": "x", "bogus_field": 1}, "bogus_field"),
    ({"prompt": "x", "n": 2}, "n > 1"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": ["a", "b"]}, "one prompt"),
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_wrong_types_and_unsupported_values(server, body, word):
    _refused(server, "/v1/completions", 400, word, json=body)


def test_a_body_over_the_limit_is_413(server):
    from moe_runtime.serve.app import MAX_BODY
    r = httpx.post(url(server) + "/v1/completions", content=b" " * (MAX_BODY + 1), headers=AUTH, timeout=30)
    err = r.json()["error"]
    assert (r.status_code, err["type"]) == (413, "invalid_request_error") and str(MAX_BODY) in err["message"], err
    r = httpx.post(url(server) + "/v1/completions", json=OK, headers=AUTH, timeout=30)  # still serving
    assert r.status_code == 200


@pytest.mark.parametrize("field, value", [("temperature", "hot"), ("top_p", [1]), ("max_tokens", "5")])
def test_a_wrong_type_names_the_field_alone(server, field, value):
    """A union's member ("temperature.int") is pydantic's detail, not the request's parameter."""
    r = httpx.post(url(server) + "/v1/completions", json={"prompt": "x", field: value}, headers=AUTH, timeout=30)
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["type"]) == (400, field, "invalid_request_error"), err
    assert err["message"].startswith(field + ": "), err


@pytest.mark.parametrize("max_tokens, word", [(-1, "at least 1"), (0, "at least 1"), (10**12, "exceeds"),
                                              (2**70, "max_tokens")])
def test_negative_or_huge_max_tokens(server, max_tokens, word):
    _refused(server, "/v1/completions", 400, word, json={"prompt": "x", "max_tokens": max_tokens})


def test_prompt_longer_than_the_context(server):
    _refused(server, "/v1/completions", 400, "context", json={"prompt": "y" * 500, "max_tokens": 1})
    _refused(server, "/v1/completions", 400, "context", json={"prompt": [5] * 95, "max_tokens": 5})


@pytest.mark.parametrize("prompt, word", [([100], "outside the vocabulary"), ([-1], "outside the vocabulary"),
                                          ([5, 10**6], "outside the vocabulary"), ([], "empty"), ("", "empty")])
def test_token_ids_outside_the_vocabulary_and_empty_prompts(server, prompt, word):
    _refused(server, "/v1/completions", 400, word, json={"prompt": prompt})


@pytest.mark.parametrize("messages, word", [
    ([], "empty"), ([{"role": "wizard", "content": "x"}], "role"), ([{"role": "user"}], "content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text parts"),
    ("hello", "messages"), ([{"role": "user", "content": "x" * 300}], "context")])
def test_bad_chat_messages(server, messages, word):
    _refused(server, "/v1/chat/completions", 400, word, json={"messages": messages, "max_tokens": 2})


def test_chat_accepts_the_fields_real_clients_send(server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2,
            "stream_options": None, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u", "n": 1,
            "store": False, "metadata": {"k": "v"}, "parallel_tool_calls": True, "tool_choice": "none",
            "response_format": {"type": "text"}, "top_logprobs": 2, "logprobs": True, "seed": 3}
    r = httpx.post(url(server) + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


@pytest.mark.parametrize("path, body", [("/v1/completions", OK),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                  "max_tokens": 2})])
def test_another_model_is_404_model_not_found(server, tiny, path, body):
    """A "model" other than the one /v1/models lists: 404 with OpenAI's code; the served id, "" and no
    model field are this server's model."""
    for other in ("gpt-4o", tiny.name + "x", "m" * 10_000):
        r = httpx.post(url(server) + path, json={**body, "model": other}, headers=AUTH, timeout=30)
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert (err["code"], err["type"], err["param"]) == ("model_not_found", "invalid_request_error", "model")
        assert other[:100] in err["message"] and tiny.name in err["message"] and len(err["message"]) < 300
    for same in ({"model": tiny.name}, {"model": ""}, {}):
        r = httpx.post(url(server) + path, json={**body, **same}, headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == tiny.name, r.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}])
def test_missing_or_wrong_api_key(server, headers):
    _refused(server, "/v1/completions", 401, "API key", json=OK, headers=headers)
    assert httpx.get(url(server) + "/v1/models", headers=headers).status_code == 401


def test_unknown_route_and_method(server):
    assert httpx.get(url(server) + "/v1/nothing").json()["error"]["message"]
    assert httpx.get(url(server) + "/v1/completions").status_code == 405


def test_chat_without_a_template_is_refused_completions_still_work(tmp_path):
    model = write_tiny_checkpoint("mixtral", tmp_path / "m", seed=3)
    (model / "tokenizer_config.json").unlink()
    with serving(model, max_batch=1) as s:
        r = httpx.post(url(s) + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert httpx.post(url(s) + "/v1/completions", json=OK).status_code == 200


def test_a_failing_decode_ends_that_request_only(tiny):
    """Token 99's embedding is NaN: a prompt holding it fails with 500; the requests beside it finish with
    their solo tokens, and the row it used serves the next request exactly."""
    solo = Solo(tiny)
    with serving(tiny, max_batch=2) as s:
        s.engine.model.embed_tokens.weight.data[99] = float("nan")
        results = {}

        def post(name, body):
            results[name] = httpx.post(url(s) + "/v1/completions", json=body, timeout=60)

        good = {"prompt": [10, 11, 12], "max_tokens": 20, "temperature": 0}
        threads = [threading.Thread(target=post, args=("good", good)),
                   threading.Thread(target=post, args=("bad", {"prompt": [10, 99], "max_tokens": 20}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["bad"].status_code == 500 and "non-finite" in results["bad"].json()["error"]["message"]
        assert results["good"].json()["choices"][0]["token_ids"] == solo([10, 11, 12], 20)
        for _ in range(2):  # both rows, the failed one included, decode exactly again
            r = httpx.post(url(s) + "/v1/completions", json={"prompt": [20, 21], "max_tokens": 8, "temperature": 0})
            assert r.json()["choices"][0]["token_ids"] == solo([20, 21], 8)
        stream = httpx.post(url(s) + "/v1/completions", json={"prompt": [99], "stream": True}).text
        assert '"error"' in stream and stream.rstrip().endswith("[DONE]")
        assert metric(httpx.get(url(s) + "/metrics").text, 'moe_requests_total{outcome="failed"}') == 2


def _slow(engine, seconds: float = 0.03) -> None:
    """Each decode step of ``engine`` takes ``seconds`` longer (a request stays running long enough to see)."""
    step = engine._decode

    def slow_step():
        time.sleep(seconds)
        step()
    engine._decode = slow_step


def _wait_busy(engine) -> None:
    t0 = time.monotonic()
    while engine.idle():
        assert time.monotonic() - t0 < 10, "the request never reached the engine"
        time.sleep(0.002)


def test_full_queue_answers_429_at_once(tiny):
    with serving(tiny, max_batch=1, max_queue=0) as s:
        _slow(s.engine)
        slow = threading.Thread(target=httpx.post, args=(url(s) + "/v1/completions",),
                                kwargs={"json": {"prompt": [5], "max_tokens": 40}, "timeout": 60})
        slow.start()
        _wait_busy(s.engine)
        t0 = time.monotonic()
        r = httpx.post(url(s) + "/v1/completions", json=OK)
        assert r.status_code == 429 and "queue" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 1.0
        slow.join()
        assert httpx.post(url(s) + "/v1/completions", json=OK).status_code == 200


def test_drain_finishes_running_requests_and_refuses_new_ones(tiny):
    solo = Solo(tiny)
    with serving(tiny, max_batch=2) as s:
        _slow(s.engine)
        out = {}
        running = threading.Thread(target=lambda: out.update(r=httpx.post(
            url(s) + "/v1/completions", json={"prompt": [7, 8], "max_tokens": 40, "temperature": 0}, timeout=60)))
        running.start()
        _wait_busy(s.engine)
        s.engine.drain()  # what SIGTERM does first
        r = httpx.post(url(s) + "/v1/completions", json=OK)
        assert r.status_code == 503 and httpx.get(url(s) + "/health").status_code == 503
        running.join()
        assert out["r"].json()["choices"][0]["token_ids"] == solo([7, 8], 40)
