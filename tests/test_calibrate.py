"""Calibration of aligned adapters: the file loads for its model only, and the adapter beats the identity."""

import pytest
import torch

from moe_runtime.cli.predictors import make_provider
from moe_runtime.predictors.calibrate import Reservoir, calibrate, forward_chunks, load_adapters_for, router_digest
from moe_runtime.model.checkpoint import load_model
from moe_runtime.cli.runtime import main
from moe_runtime.core.errors import MoeError
from moe_runtime.predictors.text_data import load_tokens, token_chunks
from moe_runtime.model.tiny import write_tiny_checkpoint

D = 2


@pytest.fixture(scope="module")
def adapters_file(mixtral4, tmp_path_factory):
    out = tmp_path_factory.mktemp("ad") / "mix4.adapters"
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(mixtral4), "--random-tokens", "192", "--seq-len", "64", "--lookahead", str(D),
              "--rank", "8", "--device", "cpu", "--out", str(out)])
    assert e.value.code == 0
    return out


def test_calibrate_cli_writes_a_file_that_loads_for_its_model(mixtral4, adapters_file):
    ad = load_adapters_for(mixtral4, adapters_file, D)  # by directory: shape fingerprint
    assert (ad.n_moe_layers, ad.hidden, ad.lookahead, ad.rank) == (4, 64, D, 8)
    assert ad.pairs() == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]
    # 3 chunks of 64: two fit the adapters, the last (--holdout 0.25) validates them
    assert ad.metadata["tokens"] == 128 and ad.metadata["heldout_tokens"] == 64 and len(ad.metadata["explained"]) == 5
    model, _ = load_model(mixtral4)
    assert load_adapters_for(model, adapters_file, 1).metadata["router_digest"] == router_digest(model)
    with pytest.raises(MoeError, match="lookahead 3 is needed"):
        load_adapters_for(model, adapters_file, 3)


def test_other_models_adapters_are_refused_in_one_line(adapters_file, tmp_path, run_cli):
    wider = write_tiny_checkpoint("mixtral", tmp_path / "wide", num_hidden_layers=4, hidden_size=32)
    code, out, err = run_cli(["eval-predictors", "--model", str(wider), "--adapters", str(adapters_file),
                          "--random-tokens", "8", "--lookahead", "1", "--device", "cpu"])
    assert code == 2 and "fitted for another model" in err and len(err.strip().splitlines()) == 1
    # same shape, other weights: caught by the router digest
    reseeded = write_tiny_checkpoint("mixtral", tmp_path / "seed1", seed=1, num_hidden_layers=4)
    code, out, err = run_cli(["eval-predictors", "--model", str(reseeded), "--adapters", str(adapters_file),
                          "--random-tokens", "8", "--lookahead", "1", "--device", "cpu"])
    assert code == 2 and "other router weights" in err and "Traceback" not in err


def test_adapter_predicts_later_residual_better_than_identity(mixtral4):
    model, store = load_model(mixtral4)
    provider = make_provider(model, store, "cpu")
    chunks = token_chunks(load_tokens(mixtral4, model.cfg.vocab_size, random_tokens=256, seed=3), 64)
    cal = calibrate(model, provider, chunks, lookahead=D, rank=64, ridge=1e-4, holdout=0)  # the fit alone
    assert cal.tokens == 256 and all(v > 0.5 for v in cal.explained.values())
    for _, hidden in forward_chunks(model, provider, chunks[:1]):
        for l, d in cal.adapters.pairs():
            target = hidden[l + d]
            err_id = (hidden[l] - target).norm()
            err_ad = (cal.adapters.apply(l, d, hidden[l]) - target).norm()
            assert err_ad < 0.7 * err_id, (l, d, float(err_ad / err_id))


def test_kl_refinement_runs_on_a_bounded_sample(mixtral4):
    model, store = load_model(mixtral4)
    chunks = token_chunks(load_tokens(mixtral4, model.cfg.vocab_size, random_tokens=96, seed=4), 32)
    cal = calibrate(model, make_provider(model, store, "cpu"), chunks, lookahead=1, rank=4, refine_steps=20,
                    refine_samples=40, refine_lr=1e-4)
    assert set(cal.kl) == set(cal.adapters.pairs())
    for before, after in cal.kl.values():
        assert after <= before + 1e-6


def test_reservoir_is_bounded_uniform_and_seeded():
    def run(seed):
        r = Reservoir(10, seed)
        for c in range(10):  # 10 chunks of 10 tokens; token value = its index
            r.add([torch.arange(c * 10, c * 10 + 10, dtype=torch.float32)[:, None].expand(10, 3)])
        return r

    a, b = run(0), run(0)
    assert a.sample().shape == (10, 1, 3) and a.seen == 100
    assert torch.equal(a.sample(), b.sample())
    assert a.sample()[:, 0, 0].max() >= 10  # later tokens replace early ones


def test_bad_requests_are_one_line_errors(mixtral4, tmp_path, run_cli):
    base = ["calibrate", "--model", str(mixtral4), "--rank", "4", "--device", "cpu", "--out", str(tmp_path / "a")]
    code, _, err = run_cli(base + ["--random-tokens", "16", "--lookahead", "4"])
    assert code == 2 and "--lookahead must be in 1..3" in err
    code, _, err = run_cli(base + ["--data", str(tmp_path / "none.txt"), "--lookahead", "1"])
    assert code == 2 and "data file not found" in err
    code, _, err = run_cli(["eval-predictors", "--model", str(mixtral4), "--adapters", str(tmp_path / "missing"),
                        "--random-tokens", "8", "--lookahead", "1", "--device", "cpu"])
    assert code == 2 and "adapter file not found" in err


def test_offloaded_experts_calibrate_like_resident_ones(mixtral4):
    model, store = load_model(mixtral4)
    chunks = token_chunks(load_tokens(mixtral4, model.cfg.vocab_size, random_tokens=64, seed=5), 32)
    resident = calibrate(model, make_provider(model, store, "cpu"), chunks, lookahead=1, rank=4).adapters
    offloaded = calibrate(model, make_provider(model, store, "cpu", slots=12), chunks, lookahead=1, rank=4).adapters
    for pair in resident.pairs():
        assert torch.allclose(resident.U[pair], offloaded.U[pair], atol=1e-5)
        assert torch.allclose(resident.V[pair], offloaded.V[pair], atol=1e-5)
    with pytest.raises(MoeError, match="cannot hold one layer's 8 experts"):
        make_provider(model, store, "cpu", slots=11)


def test_aligned_never_predicts_worse_than_the_gate(mixtral4):
    """Held-out validation keeps the zero adapter (the plain gate) wherever the fitted one is not better:
    aligned >= gate on the held-out split at every pair, and within 0.005 of gate (or above) on other text."""
    from moe_runtime.predictors.evaluate import evaluate

    model, store = load_model(mixtral4)
    provider = make_provider(model, store, "cpu")
    calib = load_tokens(mixtral4, model.cfg.vocab_size, random_tokens=4096, seed=1)
    cal = calibrate(model, provider, token_chunks(calib, 256), 3, 8, holdout=0.25)
    assert cal.heldout_tokens == 1024 and len(cal.recall) == len(cal.adapters.pairs())
    for pair, (gate, aligned) in cal.recall.items():
        after = gate if pair in cal.fallback else aligned
        assert after >= gate
        if pair in cal.fallback:
            assert torch.count_nonzero(cal.adapters.U[pair]) == 0
    other = load_tokens(mixtral4, model.cfg.vocab_size, random_tokens=2048, seed=2)
    res = evaluate(model, provider, token_chunks(other, 256), ["gate", "aligned"], 3, cal.adapters)
    for g, a in zip(res.metric("recall", "gate"), res.metric("recall", "aligned")):
        assert a >= g - 0.005, (g, a)
