"""A sweep on a local Ray instance writes the rows the local backend writes (wall-clock columns aside),
over two traces, and records a point whose task fails instead of losing it. Skipped without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from simulator import ray_backend, sweep  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXP = {"name": "ray-small", "traces": [str(REPO / "traces/mixtral-8x7b-humaneval.npz"),
                                       str(REPO / "traces/deepseek-v2-lite-law.npz")],
       "tokens": 30, "budgets": ["5%", "12%"], "evictions": ["lru"], "predictors": ["none", "history"],
       "lookaheads": [1], "devices": ["t4"]}
WALL = ("wall_s", "accesses_per_wall_s")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (starting one costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(out: Path) -> dict:
    rows = json.loads((out / "results.json").read_text())["results"]
    for r in rows:
        r.pop("wall_s", None)
        for k in WALL:
            r.get("report", {}).pop(k, None)
    return {r["key"]: r for r in rows}


def test_ray_rows_equal_local_rows(local_ray, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(EXP))
    assert sweep.run_experiment(exp, out=str(tmp_path / "local"), workers=1) == 0
    assert sweep.run_experiment(exp, out=str(tmp_path / "ray"), backend="ray") == 0
    local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(local) == 2 * 2 * 2 and local == remote
    assert {r["trace"] for r in local.values()} == set(EXP["traces"])
    assert all(k.startswith(("mixtral-8x7b-humaneval.npz|", "deepseek-v2-lite-law.npz|")) for k in local)


def test_a_failing_point_is_recorded(local_ray, tmp_path):
    """A point that fails in its worker (here its trace is missing there) comes back as a row with its error."""
    exp = sweep.experiment_from_dict({**EXP, "traces": EXP["traces"][:1], "predictors": ["none"]})
    key, _, dev, opts = exp.points()[0]
    rows = list(ray_backend.ray_rows([(key, str(tmp_path / "gone.npz"), dev, opts)], exp, 2, None))
    assert len(rows) == 1 and rows[0]["key"] == key and "gone.npz" in rows[0]["error"]
