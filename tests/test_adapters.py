"""Early-aligned adapter math: RRR fit, streaming, KL refinement, file round trip and rejections."""

import json
import os

import pytest
import torch

from moe_runtime.core.errors import MoeError
from moe_runtime.predictors.adapters import (AlignedAdapters, RidgeAccumulator, fit_reduced_rank_ridge,
                                             model_fingerprint, refine_kl, rms_normalize)

H, R = 32, 4


def low_rank_data(n=4000, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, H, generator=g, dtype=torch.float64)
    A, B = torch.randn(H, R, generator=g, dtype=torch.float64), torch.randn(H, R, generator=g, dtype=torch.float64)
    M = A @ B.T / H ** 0.5  # true rank-R map [H, H]
    Y = X @ M + noise * torch.randn(n, H, generator=g, dtype=torch.float64)
    return X, Y, M


def test_fit_recovers_low_rank_map_and_rank_matters():
    X, Y, M = low_rank_data()
    U, V = fit_reduced_rank_ridge(X, Y, rank=R, ridge=1e-6)
    assert U.shape == V.shape == (H, R) and U.dtype == torch.float32
    Br = V.double() @ U.double().T
    assert torch.linalg.matrix_rank(Br).item() == R
    assert (torch.linalg.norm(Br - M) / torch.linalg.norm(M)).item() < 0.01
    # U has orthonormal columns (eigenvectors of the fitted-value covariance)
    assert torch.allclose(U.T @ U, torch.eye(R), atol=1e-5)

    acc = RidgeAccumulator(H)
    acc.add(X, Y)
    full = acc.explained(U, V)
    low = acc.explained(*acc.solve(R - 2, 1e-6))
    assert full > 0.999 and low < 0.85  # a rank-2 fit of a rank-4 map misses a lot (0.77)
    Xt = torch.randn(500, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Yt = Xt @ M  # fresh rows, noise-free target
    err = lambda u, v: torch.linalg.norm(Xt @ (v.double() @ u.double().T) - Yt).item()
    assert err(U, V) < 0.5 * err(*acc.solve(R - 2, 1e-6))


def test_streamed_chunks_equal_one_shot():
    X, Y, _ = low_rank_data(n=1000)
    one, chunked = RidgeAccumulator(H), RidgeAccumulator(H)
    one.add(X, Y)
    for i in range(0, 1000, 137):
        chunked.add(X[i:i + 137].float(), Y[i:i + 137].float())
    assert chunked.n == one.n == 1000
    assert torch.allclose(one.xtx, chunked.xtx, rtol=1e-5, atol=1e-4)
    assert torch.allclose(one.xty, chunked.xty, rtol=1e-5, atol=1e-4)
    U1, V1 = one.solve(R, 1e-3)
    U2, V2 = chunked.solve(R, 1e-3)
    assert torch.allclose(V1 @ U1.T, V2 @ U2.T, atol=1e-4)
    assert torch.allclose(U1, U2, atol=1e-4)  # signs are fixed, so the factors agree too


def test_bad_fit_inputs_raise():
    acc = RidgeAccumulator(H)
    with pytest.raises(MoeError, match="zero calibration rows"):
        acc.solve(R)
    with pytest.raises(MoeError, match=r"\[n, 32\]"):
        acc.add(torch.zeros(3, H), torch.zeros(3, H + 1))
    with pytest.raises(MoeError, match="NaN"):
        acc.add(torch.full((2, H), float("nan")), torch.zeros(2, H))
    acc.add(torch.randn(10, H), torch.randn(10, H))
    with pytest.raises(MoeError, match="rank"):
        acc.solve(H + 1)


def test_kl_refinement_lowers_router_kl():
    torch.manual_seed(0)
    E = 8
    gate = torch.randn(E, H) * 2.0  # toy router of the target layer: logits = n(h) @ gate^T
    router = lambda h: rms_normalize(h) @ gate.T
    M = torch.randn(H, H) * 0.3
    src = torch.randn(256, H)
    tgt = src + torch.tanh(rms_normalize(src) @ M)  # not exactly linear: RRR alone is imperfect
    U, V = fit_reduced_rank_ridge(rms_normalize(src), tgt - src, rank=4, ridge=1e-3)
    batches = [(src[i:i + 64], tgt[i:i + 64]) for i in range(0, 256, 64)]
    U2, V2, hist = refine_kl((U, V), batches, router, steps=150, lr=3e-3)
    assert hist[1] < 0.8 * hist[0]
    assert not torch.equal(U, U2)  # inputs untouched, new tensors returned
    with pytest.raises(MoeError, match="no calibration batches"):
        refine_kl((U, V), [], router)


def filled(n_layers=4, D=2, rank=R, seed=0):
    g = torch.Generator().manual_seed(seed)
    ad = AlignedAdapters(n_layers, H, D, rank)
    for l, d in ad.pairs():
        ad.set(l, d, torch.randn(H, rank, generator=g), torch.randn(H, rank, generator=g))
    return ad


def test_pairs_and_apply():
    ad = filled()
    assert ad.pairs() == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]
    h = torch.randn(3, H)
    expect = h + rms_normalize(h) @ ad.V[(1, 2)] @ ad.U[(1, 2)].T
    assert torch.allclose(ad.apply(1, 2, h), expect, atol=1e-6)
    assert ad.apply(0, 1, h.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(MoeError, match="layer 3 distance 1"):
        ad.apply(3, 1, h)


FP = model_fingerprint({"model_type": "mixtral", "vocab_size": 4096, "hidden_size": H, "n_layers": 4,
                        "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "n_experts": 16, "top_k": 2,
                        "moe_intermediate_size": 64, "moe_layers": [0, 1, 2, 3]})


def test_save_load_round_trip(tmp_path):
    ad = filled()
    p = str(tmp_path / "ad.safetensors")
    ad.save(p, FP, {"calib_tokens": 1234, "ridge": 1e-3})
    assert [f for f in os.listdir(tmp_path)] == ["ad.safetensors"]  # no temp file left behind
    back = AlignedAdapters.load(p, FP, needed_lookahead=2)
    assert (back.n_moe_layers, back.hidden, back.lookahead, back.rank) == (4, H, 2, R)
    assert back.metadata == {"calib_tokens": 1234, "ridge": 1e-3}
    for k in ad.pairs():
        assert torch.equal(back.U[k], ad.U[k]) and torch.equal(back.V[k], ad.V[k])
    assert AlignedAdapters.load(p, FP, needed_lookahead=1).lookahead == 2


def test_load_rejections(tmp_path):
    p = str(tmp_path / "ad.safetensors")
    filled().save(p, FP)
    with pytest.raises(MoeError, match="fitted for another model"):
        AlignedAdapters.load(p, "0" * 64, 2)
    with pytest.raises(MoeError, match="up to distance 2, but lookahead 3"):
        AlignedAdapters.load(p, FP, 3)
    with pytest.raises(MoeError, match="not found"):
        AlignedAdapters.load(str(tmp_path / "nope.safetensors"), FP, 1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not safetensors")
    with pytest.raises(MoeError, match="not a readable safetensors file"):
        AlignedAdapters.load(str(bad), FP, 1)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(open(p, "rb").read()[:-100])
    with pytest.raises(MoeError, match="trunc.safetensors"):
        AlignedAdapters.load(str(trunc), FP, 1)
    with pytest.raises(MoeError, match="unfitted"):
        AlignedAdapters(4, H, 2, R).save(str(tmp_path / "x.safetensors"), FP)


def test_fingerprint_hf_dict_matches_model_config():
    from moe_runtime.core.model_config import ModelConfig

    hf = {"model_type": "mixtral", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_local_experts": 16, "num_experts_per_tok": 2}
    fp = model_fingerprint(hf)
    assert len(fp) == 64 and fp == model_fingerprint(ModelConfig.from_hf_dict(hf))
    assert fp != model_fingerprint(dict(hf, num_local_experts=8))
    assert fp != model_fingerprint(hf, extra="router-digest")
    assert fp == model_fingerprint(json.loads(json.dumps(hf)))
    with pytest.raises(MoeError, match="lacks"):
        model_fingerprint({"n_layers": 2})
