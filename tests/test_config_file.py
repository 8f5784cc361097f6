"""`moe-runtime generate --config FILE`: a plan's options applied exactly, flags override, bad files refused."""

import json
from dataclasses import asdict

import pytest

from moe_runtime.cli import generate as generate_cli
from moe_runtime.cli import runtime
from moe_runtime.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("tiny") / "ckpt")


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        runtime.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def generate(tiny, cfg, capsys, *extra):
    return run(["generate", "--config", str(cfg), "--model", str(tiny), "--prompt-ids", "1,2,3",
                "--max-new-tokens", "3", "--json", *extra], capsys)


def test_file_values_run_and_flags_override(tiny, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("budget: '8'\neviction: fifo\nscope: global\npredictor: history\nlookahead: 1\n"
                   "expected: {tokens_per_s: 12.5, trace: x}\n")
    code, out, err = generate(tiny, cfg, capsys)
    rep = json.loads(out)
    assert code == 0 and (rep["budget_slots"], rep["policy"], rep["predictor"]) == (8, "fifo", "history")
    assert "from the file: budget=8 eviction=fifo scope=global predictor=history lookahead=1" in err
    code, out, err = generate(tiny, cfg, capsys, "--eviction", "lru", "--expert-budget", "10")
    rep = json.loads(out)
    assert code == 0 and (rep["budget_slots"], rep["policy"], rep["predictor"]) == (10, "lru", "history")
    assert "from the command line instead: budget=10 eviction=lru" in err


@pytest.mark.parametrize("text, words", [
    ("budget: '8'\nbatch_size: 4\n", "unknown option(s) batch_size"),
    ("lookahead: two\n", "lookahead must be an integer, got 'two'"),
    ("eviction: clairvoyant\n", "unknown eviction policy 'clairvoyant'"),
    ("- budget\n", "must be a mapping"),
    ("expected: 3\n", "expected must be a mapping"),
])
def test_bad_files_are_refused_in_one_line(tiny, tmp_path, capsys, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, out, err = generate(tiny, cfg, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("moe-runtime: error:")]
    assert code == 2 and out == "" and len(errors) == 1 and words in errors[0] and "Traceback" not in err, err


def test_a_missing_config_file_is_not_found(tiny, tmp_path, capsys):
    code, out, err = generate(tiny, tmp_path / "nope.yaml", capsys)
    assert code == 2 and out == "" and err.strip().endswith("nope.yaml: file not found"), err


def test_generate_runs_with_exactly_the_plans_options(tiny, tmp_path, capsys, monkeypatch):
    from simulator import cli as sim_cli
    plan = tmp_path / "plan.yaml"
    with pytest.raises(SystemExit) as e:
        sim_cli.main(["plan", "--model", str(tiny), "--device", "rtx-4060-8gb", "--device-memory", "0.0004",
                      "--workspace", "0", "--context", "64", "--host-ram", "1", "--tokens", "60", "--out", str(plan)])
    assert e.value.code == 0
    import yaml
    doc = yaml.safe_load(plan.read_text())
    expected = doc.pop("expected")
    assert expected["model"] == tiny.name and expected["trace"].startswith("synthetic")
    assert int(doc["budget"]) < 16  # 0.0004 GiB holds the dense weights and KV, and a few of the 16 experts
    parser = runtime.build_parser().subcommands["generate"]
    assert set(doc) <= {a.dest for a in parser._actions}  # every key of a plan is a generate option
    seen = {}
    real = generate_cli.load_run

    def spy(model, opts, xopts, **kw):
        seen.update(asdict(xopts), **asdict(opts), expert_dtype=kw["expert_dtype"])
        return real(model, opts, xopts, **kw)
    monkeypatch.setattr(generate_cli, "load_run", spy)
    code, out, err = run(["generate", "--config", str(plan), "--model", str(tiny), "--prompt-ids", "1,2,3",
                          "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert {k: seen[k] for k in doc} == doc
