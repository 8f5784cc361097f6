"""Early-aligned residual adapters: fit, refine, apply, save and load (torch only).

For MoE layer ``l`` (index among the model's MoE layers) and distance ``d``, the
adapter maps the residual stream ``h`` entering layer l's MoE block to a guess of
the residual entering layer ``l+d``'s MoE block:

    h' = h + U V^T n(h),   n(h) = h / sqrt(mean(h^2) + eps)   (RMSNorm, no weight)

with ``U, V`` of shape [H, r]. Row-vector form, used everywhere below:
``h' = h + n(h) @ V @ U.T``, i.e. the full-rank map is ``B_r = V U^T`` [H, H].

Fitting (``fit_reduced_rank_ridge`` / ``RidgeAccumulator``): with rows
``X = n(h_l)`` and ``Y = h_{l+d} - h_l`` [N, H], closed-form reduced-rank ridge
regression (RRR):

    B   = (X^T X + lam I)^-1 X^T Y            ridge solution [H, H]
    W_r = top-r eigenvectors of B^T X^T X B   (= top-r right singular vectors
                                               of the fitted values X B)
    B_r = B W_r W_r^T,  so  V = B W_r,  U = W_r

``lam = ridge * mean(diag(X^T X))``: the ridge is relative to the input scale,
so the same value works for any N. Only X^T X and X^T Y are needed, so
calibration streams hidden states in chunks into a ``RidgeAccumulator``
(float64); Y^T Y is kept too, for the explained-variance report.

``refine_kl`` optionally fine-tunes U, V by gradient steps on
KL(softmax(router(h_true)) || softmax(router(h'))), the router being a callable
(norm + gate of layer l+d) supplied by the caller.

This module knows nothing about the model: the caller decides where the hidden
states come from and supplies the router. ``model_fingerprint`` ties an adapter
file to a model shape (see its docstring for what it does not distinguish).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import check_output, write_atomic

FORMAT = "moe-offload/aligned-adapters"
VERSION = "1"
FINGERPRINT_FIELDS = ("model_type", "vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                      "head_dim", "n_experts", "top_k", "moe_intermediate_size", "moe_layers")


def rms_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without a weight over the last dim, computed in float32, returned in h's dtype."""
    x = h.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


class RidgeAccumulator:
    """Sufficient statistics of one regression Y ~ X B, accumulated in float64.

    ``add(X, Y)`` takes chunks of rows X = n(h_l), Y = h_{l+d} - h_l, both [n, H];
    adding chunks in any split gives the same statistics as adding all rows once.
    """

    def __init__(self, hidden: int) -> None:
        if not isinstance(hidden, int) or hidden <= 0:
            raise MoeError(f"RidgeAccumulator: hidden must be a positive integer, got {hidden!r}")
        self.hidden = hidden
        self.n = 0
        self.xtx = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.xty = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.yty = torch.zeros(hidden, hidden, dtype=torch.float64)

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Accumulate rows; X and Y [n, H] (any float dtype/device; moved to CPU float64)."""
        H = self.hidden
        if X.dim() != 2 or Y.dim() != 2 or X.shape != Y.shape or X.shape[1] != H:
            raise MoeError(f"RidgeAccumulator.add: X and Y must both be [n, {H}], got "
                           f"{list(X.shape)} and {list(Y.shape)}")
        x, y = X.detach().to("cpu", torch.float64), Y.detach().to("cpu", torch.float64)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise MoeError("RidgeAccumulator.add: hidden states contain NaN or Inf")
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += y.T @ y
        self.n += x.shape[0]

    def solve(self, rank: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced-rank ridge fit; returns float32 (U [H, r], V [H, r]) with B_r = V U^T.

        Column signs of U are fixed (largest-magnitude entry positive) so the
        result is deterministic; B_r itself does not depend on them.
        """
        H = self.hidden
        if not isinstance(rank, int) or not 1 <= rank <= H:
            raise MoeError(f"adapter rank must be an integer in 1..{H}, got {rank!r}")
        if not ridge >= 0:
            raise MoeError(f"ridge must be >= 0, got {ridge!r}")
        if self.n == 0:
            raise MoeError("cannot fit an adapter from zero calibration rows")
        lam = ridge * float(self.xtx.diagonal().mean())
        A = self.xtx + lam * torch.eye(H, dtype=torch.float64)
        try:
            B = torch.linalg.solve(A, self.xty)  # [H, H]
        except RuntimeError:  # singular: ridge 0 with too few or degenerate rows
            B = torch.linalg.pinv(A) @ self.xty
        fitted_cov = B.T @ self.xtx @ B  # [H, H] = (X B)^T (X B)
        fitted_cov = 0.5 * (fitted_cov + fitted_cov.T)
        _, vecs = torch.linalg.eigh(fitted_cov)  # ascending eigenvalues
        W = vecs[:, -rank:].flip(-1)  # [H, r], largest first
        lead = W[W.abs().argmax(0), torch.arange(rank)]  # [r] largest-magnitude entry per column
        W = W * torch.where(lead < 0, -1.0, 1.0).to(W.dtype)
        return W.float().contiguous(), (B @ W).float().contiguous()

    def explained(self, U: torch.Tensor, V: torch.Tensor) -> float:
        """Fraction of sum(Y^2) explained by Y ~ X V U^T over the accumulated rows (1 - RSS/TSS)."""
        Bd = V.double() @ U.double().T
        tss = float(self.yty.trace())
        rss = tss - 2 * float((Bd * self.xty).sum()) + float((Bd * (self.xtx @ Bd)).sum())
        return 1.0 - rss / tss if tss > 0 else 0.0


def fit_reduced_rank_ridge(X: torch.Tensor, Y: torch.Tensor, rank: int,
                           ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot RRR of Y [N, H] on X [N, H]; returns (U, V) [H, r] with Y ~ X V U^T. See module doc."""
    if X.dim() != 2:
        raise MoeError(f"fit_reduced_rank_ridge: X must be [N, H], got {list(X.shape)}")
    acc = RidgeAccumulator(X.shape[1])
    acc.add(X, Y)
    return acc.solve(rank, ridge)


def refine_kl(adapter_params: tuple[torch.Tensor, torch.Tensor],
              batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              router_fn_target: Callable[[torch.Tensor], torch.Tensor],
              steps: int = 100, lr: float = 1e-3, eps: float = 1e-6,
              ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Fine-tune (U, V) to minimise KL(p_true || p_pred) of the target layer's router.

    ``batches``: a non-empty sequence of (h_src [n, H], h_tgt [n, H]), cycled for
    ``steps`` Adam steps; ``router_fn_target(h) -> logits [n, E]`` must be
    differentiable in h (its own parameters are not updated). Returns new
    float32 (U, V) and the mean KL (nats/token) over all batches before the first
    step and after the last, as a 2-list [before, after]. Inputs are not modified.
    The KL is measured on the same batches it is minimised on: keep ``lr`` small
    against the size of U's entries (~1/sqrt(H)) and check on held-out text.
    """
    if not batches:
        raise MoeError("refine_kl: no calibration batches")
    if not isinstance(steps, int) or steps < 0:
        raise MoeError(f"refine_kl: steps must be a non-negative integer, got {steps!r}")
    U0, V0 = adapter_params
    U = U0.detach().float().clone().requires_grad_(True)
    V = V0.detach().float().clone().requires_grad_(True)
    with torch.no_grad():
        prepared = [(rms_normalize(s.float(), eps), s.float(),
                     torch.log_softmax(router_fn_target(t.float()).float(), dim=-1)) for s, t in batches]

    def kl(i: int) -> torch.Tensor:
        n, s, logp_true = prepared[i]
        logq = torch.log_softmax(router_fn_target(s + n @ V @ U.T).float(), dim=-1)
        return (logp_true.exp() * (logp_true - logq)).sum(-1).mean()

    def mean_kl() -> float:
        with torch.no_grad():
            return sum(float(kl(i)) for i in range(len(prepared))) / len(prepared)

    history = [mean_kl()]
    with torch.enable_grad():
        opt = torch.optim.Adam([U, V], lr=lr)
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            kl(step % len(prepared)).backward()
            opt.step()
    history.append(mean_kl())
    return U.detach(), V.detach(), history


def model_fingerprint(config: Any, extra: str | None = None) -> str:
    """sha256 hex of the canonical JSON of a model's shape-relevant config fields.

    ``config``: a ``ModelConfig``, a dict of its fields, or a Hugging Face
    config.json dict (parsed with ``ModelConfig.from_hf_dict`` so that both give
    the same fingerprint). Fields: ``FINGERPRINT_FIELDS``. Two checkpoints of the
    same shape but different weights get the same fingerprint unless the caller
    passes something weight-dependent as ``extra`` (e.g. a digest of the routers).
    """
    if is_dataclass(config) and not isinstance(config, type):
        d: Mapping[str, Any] = asdict(config)
    elif isinstance(config, Mapping):
        d = config
        if "n_layers" not in d and "num_hidden_layers" in d:
            from moe_runtime.core.model_config import ModelConfig
            d = asdict(ModelConfig.from_hf_dict(dict(d)))
    else:
        raise MoeError(f"model_fingerprint: expected a model config or dict, got {type(config).__name__}")
    missing = [k for k in FINGERPRINT_FIELDS if k not in d]
    if missing:
        raise MoeError(f"model_fingerprint: config lacks {', '.join(missing)}")
    canon = {k: list(d[k]) if isinstance(d[k], (tuple, list)) else d[k] for k in FINGERPRINT_FIELDS}
    if extra is not None:
        canon["extra"] = str(extra)
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


class AlignedAdapters:
    """U, V [H, r] for every (l, d) with 1 <= d <= lookahead and l + d < n_moe_layers.

    ``l`` indexes MoE layers 0..n_moe_layers-1. Built empty; ``set`` fills pairs;
    ``save`` requires all pairs. Tensors are float32 on CPU until ``to``.
    """

    def __init__(self, n_moe_layers: int, hidden: int, lookahead: int, rank: int, eps: float = 1e-6) -> None:
        for name, v in (("n_moe_layers", n_moe_layers), ("hidden", hidden), ("lookahead", lookahead), ("rank", rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise MoeError(f"adapters: {name} must be a positive integer, got {v!r}")
        if rank > hidden:
            raise MoeError(f"adapters: rank {rank} exceeds hidden size {hidden}")
        self.n_moe_layers, self.hidden, self.lookahead = n_moe_layers, hidden, lookahead
        self.rank, self.eps = rank, eps
        self.U: dict[tuple[int, int], torch.Tensor] = {}
        self.V: dict[tuple[int, int], torch.Tensor] = {}
        self.metadata: dict[str, Any] = {}  # user metadata read back by load()

    def pairs(self) -> list[tuple[int, int]]:
        """All (l, d) this set covers, layer-major."""
        return [(l, d) for l in range(self.n_moe_layers) for d in range(1, self.lookahead + 1)
                if l + d < self.n_moe_layers]

    def _check_pair(self, l: int, d: int) -> None:
        if not (0 <= l and 1 <= d <= self.lookahead and l + d < self.n_moe_layers):
            raise MoeError(f"adapters: no adapter for layer {l} distance {d} "
                           f"(n_moe_layers {self.n_moe_layers}, lookahead {self.lookahead})")

    def set(self, l: int, d: int, U: torch.Tensor, V: torch.Tensor) -> None:
        self._check_pair(l, d)
        want = (self.hidden, self.rank)
        if tuple(U.shape) != want or tuple(V.shape) != want:
            raise MoeError(f"adapters: U and V for ({l}, {d}) must be {list(want)}, "
                           f"got {list(U.shape)} and {list(V.shape)}")
        self.U[(l, d)], self.V[(l, d)] = U.detach().float().cpu(), V.detach().float().cpu()

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "AlignedAdapters":
        """Move (and cast) every U, V in place; returns self."""
        for k in self.U:
            self.U[k] = self.U[k].to(device=device, dtype=dtype)
            self.V[k] = self.V[k].to(device=device, dtype=dtype)
        return self

    def apply(self, l: int, d: int, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] entering layer l's MoE block -> predicted residual of layer l+d, same shape/dtype.

        U, V are cast to h's device/dtype on each call if they differ; call ``to`` once to avoid that.
        """
        key = (l, d)
        if key not in self.U:
            self._check_pair(l, d)
            raise MoeError(f"adapters: ({l}, {d}) was never fitted")
        U, V = self.U[key], self.V[key]
        if U.device != h.device or U.dtype != h.dtype:
            U, V = U.to(h.device, h.dtype), V.to(h.device, h.dtype)
        return h + (rms_normalize(h, self.eps) @ V) @ U.T  # [..., H] + ([..., r] @ [r, H])

    def save(self, path: str, fingerprint: str, metadata: Mapping[str, Any] | None = None) -> None:
        """Write all pairs to a safetensors file atomically, with the model fingerprint and shape."""
        from safetensors.torch import save

        missing = [p for p in self.pairs() if p not in self.U]
        if missing:
            raise MoeError(f"adapters: cannot save, {len(missing)} pairs unfitted (first: {missing[0]})")
        tensors = {}
        for l, d in self.pairs():
            tensors[f"U.{l}.{d}"] = self.U[(l, d)].float().cpu().contiguous()
            tensors[f"V.{l}.{d}"] = self.V[(l, d)].float().cpu().contiguous()
        meta = {"format": FORMAT, "version": VERSION, "fingerprint": str(fingerprint),
                "lookahead": str(self.lookahead), "rank": str(self.rank), "n_layers": str(self.n_moe_layers),
                "hidden": str(self.hidden), "eps": repr(float(self.eps)),
                "metadata_json": json.dumps(dict(metadata or {}), sort_keys=True)}
        data = save(tensors, metadata=meta)  # bytes: the adapters are small
        check_output(path, "adapters")  # creates missing folders; one line where it cannot
        write_atomic(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str, expected_fingerprint: str, needed_lookahead: int) -> "AlignedAdapters":
        """Read a file written by ``save``; MoeError if missing, malformed, for another model,
        or fitted with a lookahead smaller than ``needed_lookahead``. ``.metadata`` holds the user metadata."""
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise MoeError(f"adapter file not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise MoeError(f"{path} is not an aligned-adapters file (format {meta.get('format')!r})")
                if meta.get("version") != VERSION:
                    raise MoeError(f"{path}: unsupported adapters version {meta.get('version')!r}")
                fp = meta.get("fingerprint", "")
                if fp != expected_fingerprint:
                    raise MoeError(f"{path} was fitted for another model (fingerprint {fp[:12]}, "
                                   f"this model {str(expected_fingerprint)[:12]})")
                try:
                    # the file's key stays "n_layers" (format of files already written): MoE layers
                    n_moe_layers, hidden, D, rank = (int(meta[k]) for k in ("n_layers", "hidden", "lookahead",
                                                                            "rank"))
                    eps = float(meta.get("eps", "1e-6"))
                    user = json.loads(meta.get("metadata_json", "{}"))
                except (KeyError, ValueError) as e:
                    raise MoeError(f"{path}: malformed adapters metadata ({e})") from None
                if D < needed_lookahead:
                    raise MoeError(f"{path} has adapters up to distance {D}, but lookahead {needed_lookahead} "
                                   "is needed; recalibrate with a larger lookahead")
                ad = cls(n_moe_layers, hidden, D, rank, eps)
                keys = set(f.keys())
                for l, d in ad.pairs():
                    if f"U.{l}.{d}" not in keys or f"V.{l}.{d}" not in keys:
                        raise MoeError(f"{path}: missing adapter tensors for layer {l} distance {d}")
                    U, V = f.get_tensor(f"U.{l}.{d}"), f.get_tensor(f"V.{l}.{d}")
                    if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
                        raise MoeError(f"{path}: adapter for layer {l} distance {d} has NaN or Inf")
                    ad.set(l, d, U, V)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise MoeError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        ad.metadata = user
        return ad
