"""`moe-runtime serve` against 127.0.0.1: the official openai client on both endpoints, plain and streaming;
a bounded load test of continuous batching (32 concurrent clients, mixed streaming and plain, random
max_tokens, some disconnecting mid-stream): every completed answer equals its prompt decoded alone by
generate(), the batch really ran more than one sequence, and the metrics' counts add up; offloaded
serving gives the resident tokens; --config and the refusals of options that need the future."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from serve_helpers import Solo, metric, serving, url

import httpx  # noqa: E402  (serve_helpers skipped the module when the serve extra is missing)

from moe_runtime.core.options import OffloadOptions
from moe_runtime.model.tiny import write_tiny_checkpoint
from moe_runtime.serve.text import ChatTemplate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """make-tiny's mixtral (character tokenizer, chat template), 2 layers, 8 experts."""
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("serve-tiny"), seed=3)


@pytest.fixture(scope="module")
def solo(tiny):
    return Solo(tiny)


def test_openai_client_both_endpoints_plain_and_streaming(tiny, solo):
    openai = pytest.importorskip("openai")
    with serving(tiny, max_batch=4) as server:
        client = openai.OpenAI(base_url=url(server) + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [tiny.name]
        ids = server.engine.tokenizer.encode("Hello").ids
        want = solo(ids, 8)
        c = client.completions.create(model=tiny.name, prompt="Hello", max_tokens=8, temperature=0,
                                      presence_penalty=0, user="t", stream_options=None)
        assert c.choices[0].token_ids == want
        assert c.choices[0].text == server.engine.tokenizer.decode([t for t in want if t != 2])
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(ids), len(want))
        chunks = list(client.completions.create(model=tiny.name, prompt="Hello", max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
        assert chunks[-1].usage.completion_tokens == len(want)
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.choices[0].finish_reason

        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        prompt = ChatTemplate.load(tiny).render(msgs)
        assert prompt == "<s><|system|>Be brief.<|user|>Hi there<|assistant|>"
        chat_ids = server.engine.tokenizer.encode(prompt, add_special_tokens=False).ids
        r = client.chat.completions.create(model=tiny.name, messages=msgs, max_tokens=6, temperature=0, seed=1)
        assert r.choices[0].token_ids == solo(chat_ids, 6)
        assert r.choices[0].message.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model=tiny.name, messages=msgs, max_tokens=6, temperature=0, stream=True))
        assert text == r.choices[0].message.content
        # seeded sampling repeats; logprobs come back for the chosen tokens
        a, b = (client.completions.create(model=tiny.name, prompt="Hi", max_tokens=6, temperature=0.9, seed=7,
                                          logprobs=2) for _ in range(2))
        assert a.choices[0].token_ids == b.choices[0].token_ids
        assert len(a.choices[0].logprobs.token_logprobs) == len(a.choices[0].token_ids)
        assert all(lp <= 0 for lp in a.choices[0].logprobs.token_logprobs)
        # a stop string ends the text before it
        full = client.completions.create(model=tiny.name, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
        stop = full[3:5]
        s = client.completions.create(model=tiny.name, prompt="Hello", max_tokens=8, temperature=0, stop=[stop])
        assert s.choices[0].text == full[:full.find(stop)] and s.choices[0].finish_reason == "stop"


PROMPTS = ["The cat", "Once upon a time", "MoE", "Hello, world!", "abc", "Offloading experts",
           "zzz", "1 2 3 4 5 6", "Q: why?", "A long prompt about caches and copies"]


async def _client(base: str, i: int, ids: list[int], max_tokens: int, mode: str):
    """One client: ('done', token_ids, usage) or ('gone', token_ids received)."""
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": mode != "plain"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        if mode == "plain":
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            j = r.json()
            return "done", j["choices"][0]["token_ids"], j["usage"]["completion_tokens"]
        got = []
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done", got, len(got)
                got += json.loads(line[6:])["choices"][0]["token_ids"]
                if mode == "disconnect" and len(got) >= 2:
                    return "gone", got, len(got)  # leaving the block closes the connection mid-stream
    raise AssertionError("the stream ended without [DONE]")


def test_load_32_clients_continuous_batching_is_exact(tiny, solo):
    rng = random.Random(5)
    with serving(tiny, max_batch=8, max_queue=64) as server:
        tok = server.engine.tokenizer
        jobs = []
        for i in range(32):
            ids = tok.encode(PROMPTS[i % len(PROMPTS)] + "!" * (i // len(PROMPTS))).ids  # 32 distinct prompts
            mode = "disconnect" if i % 8 == 3 else rng.choice(["plain", "stream"])
            jobs.append((ids, rng.randint(4 if mode == "disconnect" else 1, 24), mode))

        async def all_clients():
            return await asyncio.gather(*(_client(url(server), i, *job) for i, job in enumerate(jobs)))

        results = asyncio.run(asyncio.wait_for(all_clients(), 90))
        completed = received_gone = 0
        for (ids, max_tokens, mode), (state, got, n) in zip(jobs, results):
            want = solo(ids, max_tokens)
            if state == "done":
                assert got == want, (ids, max_tokens, mode)  # exact, and no other sequence's tokens
                completed += n
            else:
                assert got == want[:len(got)]
                received_gone += len(got)
        assert sum(s == "done" for s, _, _ in results) == 28
        for _ in range(200):  # the disconnected clients' sequences leave at the next step
            if server.engine.idle():
                break
            asyncio.run(asyncio.sleep(0.02))
        page = httpx.get(url(server) + "/metrics").text
    steps = metric(page, "moe_batch_size_count")
    assert metric(page, 'moe_batch_size_bucket{le="1.0"}') < steps  # some decode step ran several sequences
    assert metric(page, "moe_batch_size_sum") / steps > 1
    assert metric(page, "moe_prompt_tokens_total") == sum(len(ids) for ids, _, _ in jobs)
    gone_max = sum(m for _, m, mode in jobs if mode == "disconnect")
    generated = metric(page, "moe_generated_tokens_total")
    assert completed + received_gone <= generated <= completed + gone_max
    assert metric(page, 'moe_requests_total{outcome="completed"}') == 28
    assert metric(page, 'moe_requests_total{outcome="cancelled"}') + metric(
        page, 'moe_requests_total{outcome="completed"}') == 32


def test_offloaded_serving_gives_the_resident_tokens_and_counts_experts(tiny, solo):
    opts = OffloadOptions(budget="50%", eviction="lru", predictor="none")
    with serving(tiny, opts, max_batch=4) as server:
        tok = server.engine.tokenizer

        async def four():
            async with httpx.AsyncClient(base_url=url(server), timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json={
                    "prompt": tok.encode(p).ids, "max_tokens": 10, "temperature": 0}) for p in PROMPTS[:4]))

        for p, r in zip(PROMPTS[:4], asyncio.run(four())):
            assert r.json()["choices"][0]["token_ids"] == solo(tok.encode(p).ids, 10)
        page = httpx.get(url(server) + "/metrics").text
    hits, misses = metric(page, "moe_expert_hits_total"), metric(page, "moe_expert_misses_total")
    assert misses > 0 and hits > 0
    assert metric(page, "moe_bytes_copied_total") > 0


def test_hybrid_serving_gives_the_resident_tokens_and_counts_host_experts(tiny, solo):
    """--miss-policy host with no predictor: every miss is computed on the host, nothing is copied, and the
    metrics say so (host-computed = misses)."""
    from moe_runtime.offload.session import ExecutorOptions

    opts = OffloadOptions(budget="50%", eviction="lru", predictor="none")
    with serving(tiny, opts, ExecutorOptions(miss_policy="host"), max_batch=2) as server:
        tok = server.engine.tokenizer
        for p in PROMPTS[:2]:
            r = httpx.post(url(server) + "/v1/completions", timeout=60,
                           json={"prompt": tok.encode(p).ids, "max_tokens": 8, "temperature": 0})
            assert r.json()["choices"][0]["token_ids"] == solo(tok.encode(p).ids, 8)
        page = httpx.get(url(server) + "/metrics").text
    misses = metric(page, "moe_expert_misses_total")
    assert misses > 0 and metric(page, "moe_expert_host_computed_total") == misses
    assert metric(page, "moe_bytes_copied_total") == 0


def test_cli_refuses_options_that_need_the_future(run_cli, tiny):
    for flags, word in ((["--eviction", "belady"], "belady"), (["--predictor", "oracle"], "oracle"),
                        (["--route-from-trace", "x.npz"], "route-from-trace")):
        code, out, err = run_cli(["serve", "--model", tiny, *flags])
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err


def test_config_file_values_and_flag_override(tmp_path, tiny):
    from moe_runtime.cli.runtime import build_parser
    from moe_runtime.cli import config_file

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model: {tiny}\nmax_batch: 3\nbudget: 50%\nport: 9001\n")
    parser = build_parser()
    args = config_file.parse_args(parser, ["serve", "--config", str(cfg), "--port", "9002"], parser.subcommands)
    assert (args.model, args.max_batch, args.budget, args.port) == (str(tiny), 3, "50%", 9002)


@pytest.mark.parametrize("text, word", [("max_batch: lots\n", "max_batch"), ("nonsense: 1\n", "unknown option"),
                                        ("eviction: nope\n", "eviction"), ("- 1\n", "mapping")])
def test_config_file_refused_in_one_line(run_cli, tmp_path, tiny, text, word):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, out, err = run_cli(["serve", "--model", tiny, "--config", cfg])
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err


def test_a_row_starts_over_and_clears_through_the_models_interface(tiny):
    """The engine resets a KV row through ``start_sequence`` and zeroes it through ``clear_row``, which both
    the plain Transformer and the offloading SteppedModel define: only that row changes."""
    import torch

    from moe_runtime.offload.session import load_run

    run = load_run(tiny, OffloadOptions(budget="50%", eviction="lru", predictor="none"), device="cpu",
                   prompt_lens=[1, 1])
    m = run.model
    m.setup_cache(16, batch=2)
    with torch.inference_mode():
        for row, n in ((0, 3), (1, 5)):
            m(torch.arange(10, 10 + n), torch.arange(n), run.provider, last_only=True, rows=row)
    assert m.pos == [3, 5]
    m.start_sequence(1)
    assert m.pos == [3, 0]
    attn = m.model.layers[0].self_attn
    assert attn.k_cache[1].abs().sum() > 0 and attn.k_cache[0].abs().sum() > 0
    m.clear_row(1)
    assert all(float(layer.self_attn.k_cache[1].abs().sum()) == 0 == float(layer.self_attn.v_cache[1].abs().sum())
               for layer in m.model.layers)
    assert attn.k_cache[0].abs().sum() > 0
    run.finish()


@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
def test_chunked_prefill_keeps_the_running_streaming_and_is_exact(tiny, offloaded):
    """--prefill-chunk 4: a 37-token prompt arriving while another sequence decodes is prefilled in 10
    forwards, one per turn, and the running sequence gets a token in every one of those turns; both give the
    tokens of generate() prefilling in the same chunks (resident and offloaded alike)."""
    import math

    import torch

    from moe_runtime.model.generate import load_tokenizer
    from moe_runtime.offload.session import load_run
    from moe_runtime.serve.engine import Engine, Request

    opts = OffloadOptions(budget="50%", eviction="lru", predictor="none") if offloaded else None
    run = load_run(tiny, opts, device="cpu", prompt_lens=[1, 1])
    tok = load_tokenizer(tiny)
    eng = Engine(run, tokenizer=tok, max_batch=2, max_len=96, max_queue=4, prefill_chunk=4)
    got: dict[str, list[int]] = {"short": [], "long": []}

    def request(name, ids, n):
        return Request(ids, n, lambda ev: got[name].extend(ev.token_ids), temperature=0)

    short, long = tok.encode("Hi").ids, tok.encode(PROMPTS[-1]).ids
    assert len(short) <= 4 and len(long) == 37
    with torch.inference_mode():
        eng.submit(request("short", short, 30))
        eng._step()
        assert len(got["short"]) == 2  # its prefill's token and one decode step's
        eng.submit(request("long", long, 8))
        turns = 0
        while not got["long"]:
            before = len(got["short"])
            eng._step()
            turns += 1
            assert len(got["short"]) == before + 1  # the running sequence streamed through the long prefill
        assert turns == math.ceil(len(long) / 4)
        while not eng.idle():
            eng._step()
    chunked = Solo(tiny, chunk=4)
    assert got["short"] == chunked(short, 30) and len(got["short"]) == 30
    assert got["long"] == chunked(long, 8)
    run.finish()

    with serving(tiny, max_batch=2, prefill_chunk=4) as server:  # the flag reaches the engine
        r = httpx.post(url(server) + "/v1/completions", json={"prompt": long, "max_tokens": 8, "temperature": 0})
        assert r.json()["choices"][0]["token_ids"] == chunked(long, 8)
        assert server.engine.prefill_chunk == 4


def test_a_request_cancelled_mid_prefill_frees_its_row(tiny):
    """A long prompt cancelled between its chunks leaves at the next turn: its row serves the next request,
    whose tokens are its solo decode."""
    import torch

    from moe_runtime.offload.session import load_run
    from moe_runtime.serve.engine import Engine, Request

    run = load_run(tiny, None, device="cpu", prompt_lens=[1])
    eng = Engine(run, tokenizer=None, max_batch=1, max_len=96, max_queue=4, prefill_chunk=4)
    got: list[int] = []
    long = Request(list(range(10, 40)), 5, lambda ev: got.extend(getattr(ev, "token_ids", [])), temperature=0)
    with torch.inference_mode():
        eng.submit(long)
        eng._step()
        eng._step()
        assert len(eng.prefilling) == 1 and not eng.free and not got
        long.cancel()
        eng._step()
        assert not eng.prefilling and eng.free == [0] and eng.idle()
        nxt = Request([20, 21, 22], 6, lambda ev: got.extend(ev.token_ids), temperature=0)
        eng.submit(nxt)
        while not eng.idle():
            eng._step()
    assert got == Solo(tiny)([20, 21, 22], 6)
    run.finish()
