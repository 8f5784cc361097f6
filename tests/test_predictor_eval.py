"""Predictor evaluation: the counting kernel by hand, and eval-predictors' JSON on a tiny checkpoint."""

import json

import numpy as np

from moe_runtime.predictors.evaluate import EvalResult, match_counts


def test_match_counts_hand_worked():
    pred = [[3, 1, 0, 2],  # top-2 {3,1}: hits 1;  top-4 adds 2: hits 2
            [5, 4, -1, -1],  # top-2 {5,4}: hits 1;  nothing more predicted
            [7, -1, -1, -1]]  # one prediction, a miss
    true = [[1, 2], [4, 6], [0, 1]]
    assert match_counts(np.array(pred), np.array(true), k=2) == (2, 3, 5)


def test_metrics_from_counts():
    # one layer pair, 10 tokens, k = 2: 15 hits of 20 in top-2, 18 in top-4, 19 predicted
    c = np.zeros((4, 2, 1), dtype=np.int64)
    c[:, 0, 0] = (15, 18, 19, 10)
    res = EvalResult(["x"], n_layers=2, top_k=2, lookahead=1, tokens=10, counts={"x": c})
    assert res.metric("recall", "x") == [0.75]
    assert res.metric("precision", "x") == [round(15 / 19, 6)]
    assert res.metric("recall_at_2k", "x") == [0.9]
    assert res.metric("recall", "x", per_layer=True) == [[0.75, None]]


def test_eval_predictors_json(mixtral4, tmp_path, run_cli):
    plot = tmp_path / "recall.png"
    code, out, err = run_cli(["eval-predictors", "--model", str(mixtral4), "--data", str(mixtral4 / "config.json"),
                              "--seq-len", "48", "--max-tokens", "150", "--lookahead", "2", "--device", "cpu",
                              "--predictors", "gate,history,popularity,oracle", "--json", "--plot", str(plot)])
    assert code == 0, err
    res = json.loads(out)
    assert res["tokens"] == 150 and res["top_k"] == 2 and res["distances"] == [1, 2]
    for metric in ("recall", "precision", "recall_at_2k"):
        assert set(res[metric]) == {"gate", "history", "popularity", "oracle"}
        for name, values in res[metric].items():
            assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values), (metric, name)
        per = res["per_layer"][metric]["gate"]
        assert len(per) == 2 and len(per[0]) == 4 and per[0][3] is None and per[1][2] is None
    assert res["recall"]["oracle"] == [1.0, 1.0] and res["precision"]["oracle"] == [1.0, 1.0]
    # every predictor ranks all experts, so precision@k equals recall@k
    assert res["precision"]["gate"] == res["recall"]["gate"]
    for name in res["recall"]:
        assert all(r2 >= r for r, r2 in zip(res["recall"][name], res["recall_at_2k"][name]))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_predictors_refuses_aligned_without_adapters_and_unknown_names(mixtral4, run_cli):
    base = ["eval-predictors", "--model", str(mixtral4), "--random-tokens", "8", "--lookahead", "1", "--device", "cpu"]
    code, _, err = run_cli(base + ["--predictors", "aligned"])
    assert code == 2 and "needs adapters" in err
    code, _, err = run_cli(base + ["--predictors", "gate,psychic"])
    assert code == 2 and "unknown predictor 'psychic'" in err
