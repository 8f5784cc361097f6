"""Importers on the real data in shared/data, and their refusals."""

import json
from pathlib import Path

import numpy as np
import pytest

from moe_runtime.core.errors import MoeError
from moe_runtime.core.shapes import load_model_spec
from moe_runtime.traces import PHASE_DECODE, PHASE_PREFILL, load_trace, save_trace
from moe_runtime.traces.importers import import_routing

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
ESFT = DATA / "deepseek-v2-lite-esft"
VLLM = DATA / "mixtral-8x7b-vllm"
need_data = pytest.mark.skipif(not ESFT.is_dir() or not VLLM.is_dir(), reason="shared/data not present")


@pytest.fixture(scope="module")
def mixtral():
    return load_model_spec("mixtral-8x7b")


@need_data
def test_esft_law_ranked_and_positioned(tmp_path):
    r = import_routing(ESFT / "law.npz", load_model_spec("deepseek-v2-lite"))
    t = r.trace
    assert (r.source_format, r.dropped_tokens, t.n_tokens, t.n_layers, t.top_k) == ("esft-npz", 0, 8327, 26, 6)
    with np.load(ESFT / "law.npz", allow_pickle=False) as d:
        raw_ids, raw_w, seq_lens = d["expert_ids"], d["gate_weights"], d["seq_lens"]
    # token 0, model layer 1: weights in rank order, same (id, weight) pairs as recorded
    order = np.argsort(-raw_w[0, 0].astype(np.float32), kind="stable")
    np.testing.assert_array_equal(t.expert_ids[0, 0], raw_ids[0, 0][order])
    np.testing.assert_array_equal(t.weights[0, 0], raw_w[0, 0][order].astype(np.float32))
    assert np.all(np.diff(t.weights, axis=-1) <= 0)
    np.testing.assert_array_equal(np.sort(t.expert_ids, -1), np.sort(raw_ids.transpose(1, 0, 2), -1))
    seqs = t.sequences()
    assert len(seqs) == 33 and [b - a for _, a, b in seqs] == seq_lens.tolist()
    assert t.position[seqs[1][1]] == 0 and t.position[seqs[1][1] - 1] == seq_lens[0] - 1
    assert np.all(t.phase == PHASE_PREFILL)
    assert t.meta.expert_bytes == 17_301_504 and t.meta.extra["model_layers"] == list(range(1, 27))
    save_trace(t, tmp_path / "law.npz")
    np.testing.assert_array_equal(load_trace(tmp_path / "law.npz").expert_ids, t.expert_ids)


@need_data
@pytest.mark.parametrize("name, total, kept, dropped", [
    ("humaneval_2_routing.jsonl", 338, 333, [(0, 81, 31), (0, 82, 25), (1, 252, 31), (1, 253, 24), (1, 254, 12)]),
    ("gsm8k_2_routing.jsonl", 247, 244, [(0, 166, 31), (0, 167, 23), (1, 78, 27)]),
])
def test_vllm_jsonl_drops_incomplete_tokens(mixtral, name, total, kept, dropped):
    r = import_routing(VLLM / name, mixtral)
    t = r.trace
    assert t.n_tokens == kept and r.dropped_tokens == total - kept
    assert list(r.dropped) == dropped
    assert t.meta.extra["dropped_tokens"] == total - kept
    assert np.all(t.phase == PHASE_DECODE) and np.all(np.diff(t.weights, axis=-1) <= 0)
    rows = [json.loads(line) for line in open(VLLM / name)]
    first = {r["layer"]: r for r in rows if r["problem_id"] == 0 and r["token_idx"] == 0}
    for layer in (0, 17, 31):
        row = first[layer]
        order = np.argsort(-np.array(row["gating_probs"]), kind="stable")
        assert t.expert_ids[0, layer].tolist() == np.array(row["experts"])[order].tolist()
    # positions are the recorded token indices; a dropped token leaves a gap, not a shift
    seq0 = t.position[t.seq_id == 0]
    assert seq0[0] == 0 and seq0.tolist() == sorted(seq0.tolist())


def _spec_yaml(tmp_path, **over):
    base = dict(name="m", n_layers=32, first_moe_layer=0, n_experts=8, top_k=2, hidden_size=64,
                moe_intermediate_size=32, n_heads=4, vocab_size=10, dtype="bfloat16")
    base.update(over)
    p = tmp_path / "m.yaml"
    p.write_text("\n".join(f"{k}: {v}" for k, v in base.items()))
    return load_model_spec(p)


@need_data
def test_spec_must_match_data(tmp_path, mixtral):
    with pytest.raises(MoeError, match="law.npz: data has 26 MoE layers but model mixtral-8x7b has 32"):
        import_routing(ESFT / "law.npz", mixtral)
    with pytest.raises(MoeError, match="data has top-6 routing but model m has top_k=2"):
        import_routing(ESFT / "law.npz", _spec_yaml(tmp_path, n_layers=27, first_moe_layer=1,
                                                    dense_intermediate_size=8, n_experts=64))
    with pytest.raises(MoeError, match="outside model m's 4 experts"):
        import_routing(VLLM / "gsm8k_2_routing.jsonl", _spec_yaml(tmp_path, n_experts=4))
    with pytest.raises(MoeError, match="layer 16 is outside model olmoe-1b-7b's 16 MoE layers|top-2 routing"):
        import_routing(VLLM / "gsm8k_2_routing.jsonl", load_model_spec("olmoe-1b-7b"))
    with pytest.raises(MoeError, match="data has layers 0..31 \\(32 distinct\\) but model m has 40"):
        import_routing(VLLM / "gsm8k_2_routing.jsonl", _spec_yaml(tmp_path, n_layers=40))
    with pytest.raises(MoeError, match="layer_index .* differs"):
        import_routing(ESFT / "law.npz", _spec_yaml(tmp_path, n_layers=26, n_experts=64, top_k=6))


ROW = {"dataset": "d", "problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 0], "gating_probs": [0.3, 0.7]}


@pytest.mark.parametrize("lines, message", [
    (["{nope"], "line 1: not valid JSON"),
    ([json.dumps(ROW), "[1, 2]"], "line 2: expected a JSON object"),
    ([json.dumps({k: v for k, v in ROW.items() if k != "experts"})], "line 1: missing field\\(s\\) experts"),
    ([json.dumps(ROW), json.dumps(ROW)], "line 2: second row for problem 0 token 0 layer 0"),
    ([json.dumps({**ROW, "experts": [1, "a"]})], "line 1: experts and gating_probs must be lists"),
    ([json.dumps({**ROW, "experts": [1, 2, 3], "gating_probs": [1, 1, 1]})], "top-3 routing"),
    ([json.dumps({**ROW, "layer": -1})], "layer -1 is outside"),
    ([json.dumps({**ROW, "token_idx": "x"})], "must be integers"),
    ([json.dumps({**ROW, "problem_id": [1]})], "problem_id must be an integer or a string"),
    ([json.dumps({**ROW, "gating_probs": [0.5, -0.1]}), json.dumps({**ROW, "layer": 1})], "negative weight"),
])
def test_malformed_jsonl(tmp_path, lines, message):
    spec = _spec_yaml(tmp_path, n_layers=2)
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoeError, match=f"r.jsonl: .*{message}"):
        import_routing(p, spec)


def test_small_jsonl_sorted_and_grouped(tmp_path):
    spec = _spec_yaml(tmp_path, n_layers=2)
    rows = [dict(ROW, layer=l, token_idx=t, problem_id=p) for p in (7, 3) for t in (0, 1) for l in (1, 0)]
    rows = [r for r in rows if not (r["problem_id"] == 3 and r["token_idx"] == 1 and r["layer"] == 1)]
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = import_routing(p, spec)
    assert r.trace.seq_id.tolist() == [7, 7, 3] and r.trace.position.tolist() == [0, 1, 0]
    assert r.dropped == ((3, 1, 1),)
    assert r.trace.expert_ids[0].tolist() == [[0, 1], [0, 1]]  # 0.7 before 0.3
    np.testing.assert_allclose(r.trace.weights[0, 0], [0.7, 0.3])


def test_unrecognised_and_npz_refusals(tmp_path):
    spec = load_model_spec("deepseek-v2-lite")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(MoeError, match="x.txt: unrecognised routing format"):
        import_routing(tmp_path / "x.txt", spec)
    with pytest.raises(MoeError, match="source file not found"):
        import_routing(tmp_path / "absent.npz", spec)
    np.savez(tmp_path / "a.npz", expert_ids=np.zeros((26, 3, 6), np.int8))
    with pytest.raises(MoeError, match="a.npz: not a layer-major routing npz: missing key\\(s\\) gate_weights"):
        import_routing(tmp_path / "a.npz", spec)
    ids = np.tile(np.arange(6, dtype=np.int8), (26, 3, 1))
    np.savez(tmp_path / "b.npz", expert_ids=ids, gate_weights=np.ones(ids.shape, np.float16),
             seq_lens=np.array([2], np.int32), layer_index=np.arange(1, 27, dtype=np.int16))
    with pytest.raises(MoeError, match="seq_lens sum to 2 but the arrays have 3 tokens"):
        import_routing(tmp_path / "b.npz", spec)
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MoeError, match="c.npz: unreadable npz"):
        import_routing(tmp_path / "c.npz", spec)
