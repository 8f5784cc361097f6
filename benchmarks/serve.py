"""`moe-runtime serve` under load: aggregate tokens/s and latencies at 1, 4 and 16 concurrent clients, and
one client against `generate()`.

The server runs in-process on 127.0.0.1 (uvicorn on its thread, the model on the engine's worker thread)
over a make-tiny checkpoint (``--family``, ``--layers``, ``--hidden``: the default is a small mixtral, its
shape printed), resident and offloaded at ``--budget`` (LRU, no predictor). The clients run in a second
process (asyncio + httpx); each sends ``--requests`` streaming completions one after another (greedy, up to
``--new-tokens`` each; the tokens counted are those returned). Per run: aggregate tokens/s (every streamed
token over the run's wall time), p50/p99 time to first token (request sent -> first token received) and
inter-token latency (gaps between a stream's tokens), and the 16-vs-1 ratio.

Single client against generate(), like for like (``single_client``): the same prompt and the same tokens
(checked), warm-ups excluded, in turn ``--repeats`` times: generate()'s tokens over its prefill + decode
time against one request's tokens over the time from sending it to its last token, streamed and plain.

    python benchmarks/serve.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from moe_runtime.core.options import OffloadOptions  # noqa: E402
from moe_runtime.model.device import use_cpu_threads  # noqa: E402
from moe_runtime.model.generate import generate, load_tokenizer  # noqa: E402
from moe_runtime.model.tiny import write_tiny_checkpoint  # noqa: E402
from moe_runtime.offload.session import load_run  # noqa: E402
from moe_runtime.serve.server import Server, ServeOptions  # noqa: E402
from moe_runtime.serve.text import ChatTemplate  # noqa: E402

PROMPT = "Offloading experts to host memory"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def client(base: str, ids: list[int], n_requests: int, new_tokens: int, ttft: list, itl: list) -> int:
    got = 0
    async with httpx.AsyncClient(base_url=base, timeout=300) as c:
        for _ in range(n_requests):
            t0 = time.perf_counter()
            last = None
            body = {"prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    n = len(json.loads(line[6:])["choices"][0]["token_ids"])
                    if not n:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.append(now - last)
                    last = now
                    got += n
    return got


def measure(server: Server, ids: list[int], clients: int, n_requests: int, new_tokens: int, pool) -> dict:
    """The clients run in another process (``pool``), as real clients would: not on the server's GIL."""
    return pool.apply(_measure, (server.port, ids, clients, n_requests, new_tokens))


def _measure(port: int, ids: list[int], clients: int, n_requests: int, new_tokens: int) -> dict:
    base = f"http://127.0.0.1:{port}"
    ttft, itl = [], []

    async def run():
        return await asyncio.gather(*(client(base, ids, n_requests, new_tokens, ttft, itl) for _ in range(clients)))

    t0 = time.perf_counter()
    tokens = sum(asyncio.run(run()))
    wall = time.perf_counter() - t0
    return {"clients": clients, "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * pct(ttft, 0.5), 2), "ttft_p99_ms": round(1e3 * pct(ttft, 0.99), 2),
            "itl_p50_ms": round(1e3 * pct(itl, 0.5), 2), "itl_p99_ms": round(1e3 * pct(itl, 0.99), 2)}


_CLIENT = None  # the single-client process's connection, kept across its requests as a client keeps it


def _one_request(port: int, ids: list[int], new_tokens: int, stream: bool = True) -> tuple[list[int], float]:
    """One greedy completion, streamed or plain: (token ids, seconds from sending it to its last token)."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    body = {"prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        got = _CLIENT.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
        return got, time.perf_counter() - t0
    got, last = [], 0.0
    with _CLIENT.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                new = json.loads(line[6:])["choices"][0]["token_ids"]
                if new:
                    got += new
                    last = time.perf_counter()
    return got, last - t0


def single_client(server: Server, gen_run, ids: list[int], new_tokens: int, repeats: int, pool) -> dict:
    """Like for like: ``generate()`` on the prompt (its prefill + decode time), one streamed request and one
    plain request for the same tokens (sent -> last token received, in the client process), in turn
    ``repeats`` times after one warm-up of each, so that the shared machine's load falls on all alike. A
    ratio is the median of each turn's ratio (robust to load that changes between turns); the tokens/s are
    medians. All must give the same tokens."""
    eos = gen_run.model.cfg.eos_token_ids
    gen, served, plain = [], [], []
    for i in range(repeats + 1):
        res = generate(gen_run.model, gen_run.provider, ids, new_tokens, eos_ids=eos)
        for stream, out in ((True, served), (False, plain)):
            got, seconds = pool.apply(_one_request, (server.port, ids, new_tokens, stream))
            if got != res.token_ids:
                raise SystemExit(f"the server's tokens {got} differ from generate's {res.token_ids}")
            if i:  # the first of each is the warm-up
                out.append(len(got) / seconds)
        if i:
            gen.append(len(got) / (res.prefill_s + res.decode_s))
    med = statistics.median
    return {"tokens": len(got), "generate_tokens_per_s": round(med(gen), 1),
            "server_tokens_per_s": round(med(served), 1),
            "single_client_vs_generate": round(med(s / g for s, g in zip(served, gen)), 3),
            "plain_tokens_per_s": round(med(plain), 1),
            "plain_vs_generate": round(med(p / g for p, g in zip(plain, gen)), 3)}


def http_stack() -> str:
    """What uvicorn's "auto" picks: httptools and uvloop (the serve extra's uvicorn[standard]) when installed."""
    import importlib.util

    have = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    return f"{'httptools' if have('httptools') else 'h11'} + {'uvloop' if have('uvloop') else 'asyncio'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="mixtral")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny model")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny model")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--budget", default="50%")
    p.add_argument("--repeats", type=int, default=15,
                   help="alternate generate() and one request this many times for the single-client ratio")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    use_cpu_threads("cpu")
    levels = [int(c) for c in args.clients.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    model_dir = write_tiny_checkpoint(args.family, tmp.name, seed=0, num_hidden_layers=args.layers,
                                      hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_local_experts=8)
    tok = load_tokenizer(model_dir)
    ids = tok.encode(PROMPT).ids
    max_len = len(ids) + args.new_tokens + 1
    rows = []
    for mode, opts in (("resident", None),
                       (f"offloaded {args.budget}", OffloadOptions(budget=args.budget, eviction="lru"))):
        gen_run = load_run(model_dir, opts, device="cpu", prompt_lens=len(ids), max_new_tokens=args.new_tokens)
        sopts = ServeOptions(port=0, max_batch=max(levels), max_queue=4 * max(levels))
        run = load_run(model_dir, opts, device="cpu", prompt_lens=[1] * sopts.max_batch)
        server = Server(model_dir, run, sopts, tokenizer=tok, template=ChatTemplate.load(model_dir), max_len=max_len)
        server.start_background()
        try:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                single = single_client(server, gen_run, ids, args.new_tokens, args.repeats, pool)
                measure(server, ids, 1, 1, args.new_tokens, pool)  # warm-up
                res = [measure(server, ids, c, args.requests, args.new_tokens, pool) for c in levels]
        finally:
            server.stop()
            gen_run.finish()
        one = next(r for r in res if r["clients"] == 1)
        rows.append({"mode": mode, "runs": res, **single,
                     "ratio_16_vs_1": round(res[-1]["tokens_per_s"] / one["tokens_per_s"], 2)})
    out = {"model": f"{args.family} tiny: {args.layers} layers, hidden {args.hidden}, 8 experts top-2",
           "http_stack": http_stack(),
           "new_tokens": args.new_tokens, "requests_per_client": args.requests, "prompt_tokens": len(ids),
           "results": rows}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['model']}; uvicorn with {out['http_stack']}")
    for row in rows:
        print(f"{row['mode']}: generate {row['generate_tokens_per_s']} tok/s on {row['tokens']} tokens; one client "
              f"streaming the same tokens {row['server_tokens_per_s']} tok/s ({row['single_client_vs_generate']}x "
              f"generate), plain {row['plain_tokens_per_s']} tok/s ({row['plain_vs_generate']}x); "
              f"{levels[-1]} vs 1 clients {row['ratio_16_vs_1']}x")
        for r in row["runs"]:
            print(f"  {r['clients']:>3} clients: {r['tokens_per_s']:>8} tok/s  TTFT p50/p99 {r['ttft_p50_ms']}/"
                  f"{r['ttft_p99_ms']} ms  ITL p50/p99 {r['itl_p50_ms']}/{r['itl_p99_ms']} ms")


if __name__ == "__main__":
    main()
