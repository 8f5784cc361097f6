"""Predictor evaluation: the counting kernel by hand, and eval-predictors' JSON on a tiny checkpoint."""

import json

import numpy as np
import pytest

from moe_runtime.cli import main
from moe_runtime.predictor_eval import EvalResult, match_counts
from moe_runtime.tiny import write_tiny_checkpoint


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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mix4"), seed=0, num_hidden_layers=4)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_eval_predictors_json(ckpt, tmp_path, capsys):
    plot = tmp_path / "recall.png"
    code, out, err = run_cli(["eval-predictors", "--model", str(ckpt), "--data", str(ckpt / "config.json"),
                              "--seq-len", "48", "--max-tokens", "150", "--lookahead", "2", "--device", "cpu",
                              "--predictors", "gate,history,popularity,oracle", "--json", "--plot", str(plot)],
                             capsys)
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


def test_eval_predictors_refuses_aligned_without_adapters_and_unknown_names(ckpt, capsys):
    base = ["eval-predictors", "--model", str(ckpt), "--random-tokens", "8", "--lookahead", "1", "--device", "cpu"]
    code, _, err = run_cli(base + ["--predictors", "aligned"], capsys)
    assert code == 2 and "needs adapters" in err
    code, _, err = run_cli(base + ["--predictors", "gate,psychic"], capsys)
    assert code == 2 and "unknown predictor 'psychic'" in err
