"""`moe-runtime serve` on every family make-tiny writes: the official openai client's greedy completion
(plain) and chat (streaming, through the checkpoint's template) equal the prompt decoded alone by
generate() with every expert resident, while the server runs the offloading executor (half the experts
cached, LRU). One server per family (and gpt_oss with MXFP4 experts), shared by its tests."""

from __future__ import annotations

import pytest

from serve_helpers import Solo, serving, url

from moe_runtime.core.families import FAMILIES
from moe_runtime.core.options import OffloadOptions
from moe_runtime.model.tiny import write_tiny_checkpoint
from moe_runtime.serve.text import ChatTemplate

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module", params=[*FAMILIES, "gpt_oss:mxfp4"])
def served(request, tmp_path_factory):
    """(family, checkpoint, Solo, server, openai client) over that family's tiny checkpoint, offloaded at 50%."""
    family, _, expert_dtype = request.param.partition(":")
    model = write_tiny_checkpoint(family, tmp_path_factory.mktemp(f"serve-{family}"), seed=4,
                                  expert_dtype=expert_dtype or "auto")
    solo = Solo(model)
    with serving(model, OffloadOptions(budget="50%", eviction="lru", predictor="none"), max_batch=2) as server:
        client = openai.OpenAI(base_url=url(server) + "/v1", api_key="none", max_retries=0)
        yield family, model, solo, server, client


def test_completion_equals_solo_decode(served):
    family, model, solo, server, client = served
    ids = server.engine.tokenizer.encode("Experts on the host").ids
    c = client.completions.create(model=model.name, prompt="Experts on the host", max_tokens=6, temperature=0)
    want = solo(ids, 6)
    assert c.choices[0].token_ids == want, family
    assert c.usage.completion_tokens == len(want)
    assert c.choices[0].text == server.engine.tokenizer.decode([t for t in want if t not in server.engine.eos])


def test_streamed_chat_equals_solo_decode(served):
    family, model, solo, server, client = served
    msgs = [{"role": "user", "content": "Which expert?"}]
    prompt = ChatTemplate.load(model).render(msgs)
    ids = server.engine.tokenizer.encode(prompt, add_special_tokens=False).ids
    chunks = list(client.chat.completions.create(model=model.name, messages=msgs, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    got = [t for ch in chunks if ch.choices for t in (ch.choices[0].model_extra or {}).get("token_ids", [])]
    assert got == solo(ids, 5), family
    assert chunks[-1].usage.completion_tokens == len(got)
