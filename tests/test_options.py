"""One options definition: both CLIs list the same flags for the shared options, old spellings still run,
and the dataclass's validation is the one every command gets."""

import re

import pytest

from moe_runtime.core.options import OffloadOptions
from moe_runtime.cli.runtime import build_parser as runtime_parser
from moe_runtime.core.errors import MoeError
from simulator.cli import build_parser as sim_parser
from simulator.replay import ReplayOptions

SHARED = ["--expert-budget", "--eviction", "--cache-scope", "--predictor", "--lookahead", "--prefetch-width",
          "--max-inflight"]


def _help(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def _flags(text):
    return set(re.findall(r"^\s+(--[a-z-]+)", text, flags=re.M))


def test_shared_flags_are_named_alike_and_aliases_hidden():
    gen, rep = _help(runtime_parser(), "generate"), _help(sim_parser(), "replay")
    assert set(SHARED) <= _flags(gen) and set(SHARED) <= _flags(rep)
    assert "--budget" not in _flags(gen) | _flags(rep) and "--policy" not in _flags(gen)
    for text in (gen, rep):  # help lists come from the registries
        assert "layer-cyclic" in text and "noisy-oracle" in text


def test_old_spellings_still_parse():
    args = sim_parser().parse_args(["replay", "--trace", "t", "--device", "d", "--budget", "10%", "--policy", "lfu"])
    assert (args.budget, args.eviction) == ("10%", "lfu")


def test_defaults_are_the_dataclass_ones():
    assert ReplayOptions().budget == "fit" and OffloadOptions().budget is None
    args = sim_parser().parse_args(["replay", "--trace", "t", "--device", "d"])
    assert (args.eviction, args.max_inflight, args.lookahead) == ("lru", 4, 1)


@pytest.mark.parametrize("kw,word", [({"eviction": "mru"}, "eviction"), ({"scope": "pool"}, "scope"),
                                     ({"predictor": "psychic"}, "predictor"), ({"lookahead": 0}, "lookahead"),
                                     ({"max_inflight": True}, "max-inflight")])
def test_validation_names_the_field(kw, word):
    with pytest.raises(MoeError, match=word):
        OffloadOptions(**kw)


def test_simulator_refuses_router_predictors_and_long_lookahead():
    with pytest.raises(MoeError, match="only in the executor"):
        ReplayOptions(predictor="gate")
    with pytest.raises(MoeError, match="below the number of MoE layers"):
        OffloadOptions(predictor="history", lookahead=2).check_model(2)
