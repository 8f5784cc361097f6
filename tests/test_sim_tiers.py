"""The simulator's storage tiers (tiers.py): experts on disk under the device cache, with or without a
host-RAM tier between them.

- Two tiers: a disk replay equals a memory replay on the same device with the storage link's numbers in
  the host-to-device fields (counts equal, times within 1e-9; no read latency, which the storage link
  charges only to a read that starts the idle disk), and it reads what it copies.
- Three tiers: the host tier's misses equal a plain LRU of its size over the stream of device copies
  (no prefetch); every device miss is a host hit or a host miss; a host tier of every expert misses each
  expert once.
- Bad input: one line each (no storage link, half a storage link, a host budget over memory).
- ``moe-runtime profile --expert-source disk`` writes the storage link; ``moe-sim replay`` and sweeps take
  the tier options.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import yaml

from moe_runtime.core.expert_cache import access_sequence
from moe_runtime.core.errors import MoeError
from simulator.cost_model import CostModel
from simulator.device import device_from_dict, load_device
from simulator.replay import Replay, ReplayOptions, build_workload, load_inputs

REPO = Path(__file__).resolve().parent.parent
LAW = str(REPO / "traces/deepseek-v2-lite-law.npz")
COUNTS = ("accesses", "hits", "late", "misses", "evictions", "prefetch_issued", "prefetch_used", "prefetch_wasted",
          "prefetch_cancelled", "bytes_h2d")


@pytest.fixture(scope="module")
def law():
    return load_inputs(LAW, tokens=300)


def disk_device(**read):
    base = load_device("t4")
    fields = dict(read_bandwidth_gbps=1.4, read_latency_us=180.0, read_queue_depth=4) | read
    return dataclasses.replace(base, **fields)


@pytest.mark.parametrize("predictor,eviction,scope", [("none", "lru", "global"), ("history", "lfu", "per-layer"),
                                                      ("oracle", "belady", "global")])
def test_two_tiers_equal_a_memory_replay_over_the_storage_link(law, predictor, eviction, scope):
    trace, spec = law
    # no latency: the storage link charges it only to a read that starts the idle disk (reads queued behind
    # another are pipelined; tests/test_sim_analytic.py), a host-to-device link to every copy
    dev = disk_device(read_latency_us=0.0)
    as_h2d = dataclasses.replace(dev, h2d_bandwidth_gbps=dev.read_bandwidth_gbps, h2d_latency_us=0.0,
                                 copy_engines=1)
    opts = dict(predictor=predictor, eviction=eviction, scope=scope, budget="30%")
    a = Replay(trace, CostModel(spec, dev), ReplayOptions(expert_source="disk", **opts)).run()
    b = Replay(trace, CostModel(spec, as_h2d), ReplayOptions(**opts)).run()
    assert {k: a[k] for k in COUNTS} == {k: b[k] for k in COUNTS}
    assert a["total_s"] == pytest.approx(b["total_s"], rel=1e-9) and a["stall_s"] == pytest.approx(b["stall_s"], rel=1e-9)
    assert a["expert_source"] == "disk" and a["bytes_read"] == a["bytes_h2d"] > 0
    assert a["copy_s"] == pytest.approx(spec.expert_bytes / 1.4e9) and a["copy_idle_s"] == 0


def plain_two_level_lru(groups, device_slots, host_slots):
    """(device misses, host misses): a device LRU whose (step, layer) sets are pinned while served, above
    a host LRU that sees the device's misses in order."""
    device, host, dmiss, hmiss = OrderedDict(), OrderedDict(), 0, 0
    for group in groups:
        for k in group:
            if k in device:
                device.move_to_end(k)
                continue
            dmiss += 1
            if len(device) == device_slots:
                del device[next(x for x in device if x not in group)]
            device[k] = None
            if k in host:
                host.move_to_end(k)
            else:
                hmiss += 1
                host[k] = None
                if len(host) > host_slots:
                    host.popitem(last=False)
    return dmiss, hmiss


@pytest.mark.parametrize("device_budget,host_budget", [("10%", "20%"), ("25%", "25%"), ("25%", "60%")])
def test_host_tier_counts_equal_a_plain_two_level_lru(law, device_budget, host_budget):
    trace, spec = law
    rep = Replay(trace, CostModel(spec, disk_device()),
                 ReplayOptions(budget=device_budget, expert_source="disk", host_budget=host_budget)).run()
    w = build_workload(trace, 1)
    groups = [[(l, e) for e in ids] for step in w.ids for l, ids in enumerate(step)]
    assert access_sequence(w.ids) == [k for g in groups for k in g]
    dmiss, hmiss = plain_two_level_lru(groups, rep["n_slots"], rep["host_slots"])
    assert rep["misses"] == dmiss and rep["host_misses"] == hmiss
    assert rep["host_hits"] + rep["host_misses"] == rep["misses"]
    assert rep["bytes_read"] == hmiss * spec.expert_bytes


def test_a_host_tier_of_every_expert_reads_each_once(law):
    trace, spec = law
    used = len({(l, int(e)) for l in range(trace.n_layers) for e in trace.expert_ids[:, l].ravel()})
    for pred in ("none", "oracle"):
        rep = Replay(trace, CostModel(spec, disk_device()),
                     ReplayOptions(budget="25%", predictor=pred, expert_source="disk", host_budget="100%")).run()
        assert rep["host_misses"] == used
        mem = Replay(trace, CostModel(spec, disk_device()), ReplayOptions(budget="25%", predictor=pred)).run()
        assert rep["misses"] == mem["misses"] and rep["total_s"] > mem["total_s"]  # the cold reads cost time


def test_tier_errors_are_one_line(law):
    trace, spec = law
    with pytest.raises(MoeError, match="storage link; t4 has none"):
        Replay(trace, CostModel(spec, load_device("t4")), ReplayOptions(expert_source="disk"))
    with pytest.raises(MoeError, match="needs all of .*missing read_latency_us, read_queue_depth"):
        device_from_dict({**dataclasses.asdict(load_device("t4")), "read_bandwidth_gbps": 1.0,
                          "read_latency_us": None, "read_queue_depth": None})
    with pytest.raises(MoeError, match="read_queue_depth"):
        disk_device(read_queue_depth=0)
    with pytest.raises(MoeError, match="--host-budget sizes the host tier"):
        ReplayOptions(host_budget="10%")
    with pytest.raises(MoeError, match="--expert-source must be memory, disk or disk:FILE"):
        ReplayOptions(expert_source="ssd")
    with pytest.raises(MoeError, match="analytic copies only"):
        Replay(trace, CostModel(spec, disk_device()), ReplayOptions(expert_source="disk", host_budget="10%"),
               copies="event")


def _sim(capsys, *argv):
    from simulator.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_replay_and_sweep_take_the_tier_options(capsys, tmp_path):
    dev = tmp_path / "disk.yaml"
    dev.write_text(yaml.safe_dump(dataclasses.asdict(disk_device()) | {"name": "t4-disk"}))
    code, out, err = _sim(capsys, "replay", "--trace", LAW, "--device", dev, "--tokens", "40", "--expert-source",
                          "disk", "--host-budget", "30%", "--miss-policy", "copy", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["expert_source"] == "disk" and rep["host_misses"] > 0 and rep["bytes_read"] > 0
    code, _, err = _sim(capsys, "replay", "--trace", LAW, "--device", "t4", "--tokens", "40", "--expert-source",
                        "disk")
    assert code == 2 and err.count("\n") == 1 and "storage link" in err
    exp = tmp_path / "tiers.yaml"
    exp.write_text(yaml.safe_dump({"name": "tiers", "trace": LAW, "tokens": 30, "budgets": ["25%"],
                                   "evictions": ["lru"], "predictors": ["none"], "devices": [str(dev)],
                                   "expert_source": "disk", "host_budget": "50%", "out": str(tmp_path / "out"),
                                   "miss_policies": ["copy"]}))
    code, _, err = _sim(capsys, "sweep", exp, "--workers", "1")
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    row = rows[0] if isinstance(rows, list) else next(iter(rows.values()))
    assert row["bytes_read"] > 0 and row["report"]["host_misses"] > 0 and "error" not in row


def test_profile_measures_the_storage_link(run_cli, tiny_mixtral, tmp_path, monkeypatch):
    from moe_runtime.cli import profile

    measured = profile.measure_copy_slowdown
    links = []

    def slowdown(*a, link=None, **kw):  # the real measurement, noting which link ran beside the compute
        links.append(link)
        return measured(*a, link=link, rounds=1)
    monkeypatch.setattr(profile, "measure_copy_slowdown", slowdown)
    out = tmp_path / "prof.yaml"
    rc, _, err = run_cli(["profile", "--device", "cpu", "--model", tiny_mixtral, "--expert-source", "disk",
                          "--read-depth", "2", "--repeats", "2", "--out", out])
    assert rc == 0, err
    d = yaml.safe_load(out.read_text())
    assert d["read_bandwidth_gbps"] > 0 and d["read_latency_us"] >= 0 and d["read_queue_depth"] == 2
    # on a CPU measured once, beside the reader's reads (the link of a run from disk), not the copy thread
    assert len(links) == 1 and links[0] is not None and d["copy_slowdown"] >= 0
    assert "storage reads" in d["source"]
    assert device_from_dict(d).has_storage  # the simulator takes it as written


def test_experts_on_disk_are_copied_as_in_the_executor(capsys, tmp_path):
    """The executor's rule in the simulator: with experts on disk the commands' miss policy is copy, host
    compute is refused in one line (replay, sweep and code), and no hybrid bound is reported (a newcomer saw
    every miss 'computed on the host' with 0 GB read from storage)."""
    dev = tmp_path / "disk.yaml"
    dev.write_text(yaml.safe_dump(dataclasses.asdict(disk_device()) | {"name": "t4-disk"}))
    code, out, err = _sim(capsys, "replay", "--trace", LAW, "--device", dev, "--tokens", "30", "--expert-source",
                          "disk", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["miss_policy"] == "copy" and rep["host_computed"] == 0 and rep["bytes_read"] > 0
    assert "best_hybrid_tokens_per_s" not in rep["bounds"]
    for flags, cure in ((["--miss-policy", "host"], "give --miss-policy copy"),
                        (["--miss-policy", "auto"], "give --miss-policy copy"),
                        (["--miss-policy", "copy", "--n-host-layers", "2"], "give no --n-host-layers"),
                        (["--n-host-layers", "1"], "give no --n-host-layers")):  # the cause named, not copy again
        code, out, err = _sim(capsys, "replay", "--trace", LAW, "--device", dev, "--tokens", "30",
                              "--expert-source", "disk", *flags)
        assert code == 2 and out == "" and err.count("\n") == 1 and err.rstrip().endswith(cure), err
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"name": "e", "trace": LAW, "tokens": 30, "budgets": ["25%"], "evictions": ["lru"],
                                   "predictors": ["none"], "devices": [str(dev)], "expert_source": "disk",
                                   "out": str(tmp_path / "out"), "miss_policies": ["copy", "auto"]}))
    code, _, err = _sim(capsys, "sweep", exp, "--workers", "1")
    assert code == 2 and err.count("\n") == 1 and "give --miss-policy copy" in err
    assert not (tmp_path / "out" / "results.json").exists()
    trace, spec = load_inputs(LAW, tokens=30)
    with pytest.raises(MoeError, match="give --miss-policy copy"):
        Replay(trace, CostModel(spec, disk_device()), ReplayOptions(expert_source="disk", miss_policy="host"))
