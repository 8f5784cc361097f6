"""``ReplayOptions``: one simulated configuration, the shared offloading options plus the replay's own
(flags and defaults of `moe-sim replay` and sweeps come from its fields)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_runtime.core.config_files import check_number
from moe_runtime.core.errors import MoeError
from moe_runtime.core.format_sizes import CODECS
from moe_runtime.core.options import (DEFAULT_BUDGET, HybridOptions, MemoryOptions, OffloadOptions, option,
                                      parse_expert_source)
from moe_runtime.core.predictors import PREDICTORS, ROUTER_BASED


@dataclass(frozen=True)
class ReplayOptions(MemoryOptions, HybridOptions, OffloadOptions):
    """One simulated configuration: the shared offloading options plus the replay's own.

    The CLI and the sweep take their flags and defaults from these fields; a budget left None
    is ``DEFAULT_BUDGET["replay"]``.
    """

    batch: int = option(1, "--batch", type=int, help="tokens per step, one from each of B sequences "
                                                     "decoded together")
    tokens: int | None = option(None, "--tokens", type=int, help="replay only the first N tokens of the trace")
    recall: float = option(0.9, "--recall", type=float, help="noisy-oracle recall")
    precision: float = option(0.9, "--precision", type=float, help="noisy-oracle precision")
    seed: int = option(0, "--seed", type=int, help="random seed (noisy-oracle)")
    expert_dtype: str | None = option(None, "--expert-dtype", choices=lambda: list(CODECS),
                                      help="how experts are stored and copied, which sets their bytes "
                                           "(default: the model's expert_dtype, else its dtype)")

    def __post_init__(self) -> None:
        if self.budget is None:
            object.__setattr__(self, "budget", DEFAULT_BUDGET["replay"])
        OffloadOptions.__post_init__(self)
        HybridOptions.__post_init__(self)
        MemoryOptions.__post_init__(self)
        if parse_expert_source(self.expert_source)[1] is not None:  # a file here would be read by nothing
            raise MoeError(f"--expert-source {self.expert_source}: the simulator reads no expert file (the device "
                           "profile's storage link models the reads); give --expert-source disk")
        name = self.predictor.split(":", 1)[0]
        if name in ROUTER_BASED or (name in PREDICTORS and PREDICTORS[name].needs_hidden):  # registered or not yet
            raise MoeError(f"predictor {self.predictor!r} reads hidden states, so it runs only in the executor; "
                           f"replay its recorded predictions instead with --predictor recorded:{self.predictor}")
        for f, lo in (("batch", 1), ("tokens", 1), ("seed", 0)):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise MoeError(f"{f} must be an integer >= {lo}, got {v!r}")
        check_number("batch", self.batch, lo=1, hi=1 << 16, integer=True)  # the sweep's cap: 10**9 lanes hang
        if self.expert_dtype is not None and self.expert_dtype not in CODECS:
            raise MoeError(f"expert_dtype must be one of {', '.join(CODECS)}, got {self.expert_dtype!r}")
        for f in ("recall", "precision"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise MoeError(f"{f} must be a number in [0, 1], got {v!r}")
