"""A sweep's output folder: locked while a sweep runs, one journal line per finished point, results at the end.

Contract (``SweepStore(out_dir, experiment, fingerprint)``):
- ``open()`` takes an exclusive lock on the folder (``flock`` on the folder
  itself, released by the kernel when the process ends however it ends); a
  second sweep into a folder in use is refused with one line. It removes
  temporary files of killed writers, and returns the finished rows of an
  earlier run of the same experiment: ``results.json`` plus the journal
  ``results.jsonl`` (a line cut short by a kill is dropped). Every stored row
  is validated (schema and ranges, ``bad_row``) and a folder holding another
  experiment's results (another name or fingerprint) is refused. When rows
  were found, ``results.json`` and ``results.csv`` are written again at once
  (a missing CSV is rebuilt) and the journal restarts empty.
- ``record(row)`` appends one JSON line to the journal (one ``os.write``): the
  cost of a finished point does not grow with the number of points before it.
- ``finish(rows)`` writes ``results.json`` and ``results.csv`` atomically and
  removes the journal; ``close()`` releases the lock.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from pathlib import Path

from moe_runtime.core.config_files import short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import remove_stale_temps, write_json_atomic, write_text_atomic

JOURNAL = "results.jsonl"
CSV_COLUMNS = ("key", "trace", "device", "scope", "budget", "eviction", "predictor", "lookahead", "miss_policy",
               "host_profile", "n_host_layers", "n_slots", "budget_fraction", "accesses", "hits", "late", "misses",
               "host_computed", "fills", "prefetch_issued", "prefetch_used", "prefetch_wasted", "bytes_h2d",
               "bytes_read", "compute_s", "stall_s", "host_s", "total_s", "tokens_per_s", "all_resident_tokens_per_s",
               "best_tokens_per_s", "best_hybrid_tokens_per_s", "wall_s", "error")
_COUNTS = ("n_slots", "accesses", "hits", "late", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted",
           "bytes_h2d", "bytes_read")
_SECONDS = ("compute_s", "stall_s", "total_s", "wall_s")
_RATES = ("tokens_per_s", "best_tokens_per_s", "all_resident_tokens_per_s")


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def bad_row(r) -> str | None:
    """Why a stored row cannot be trusted (a tampered, foreign or torn file), or None."""
    if not isinstance(r, dict):
        return "not a mapping"
    for k in ("key", "device", "scope", "budget", "eviction", "predictor"):
        if not isinstance(r.get(k), str):
            return f"{k} is {short(r.get(k), 40)}, not a string"
    if r.get("error") is not None:
        return None if isinstance(r["error"], str) else "error is not a string"
    v = r.get("lookahead")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f"lookahead is {short(v, 40)}, not an integer >= 1"
    for k in _RATES:
        if not _number(r.get(k)) or r[k] <= 0:
            return f"{k} is {short(r.get(k), 40)}, not a finite number > 0"
    if not _number(r.get("budget_fraction")) or r["budget_fraction"] < 0:
        return f"budget_fraction is {short(r.get('budget_fraction'), 40)}, not a finite number >= 0"
    for k in _COUNTS:
        if k in r and (isinstance(r[k], bool) or not isinstance(r[k], int) or r[k] < 0):
            return f"{k} is {short(r[k], 40)}, not a count"
    for k in _SECONDS:
        if k in r and (not _number(r[k]) or r[k] < 0):
            return f"{k} is {short(r[k], 40)}, not a time"
    if all(k in r for k in ("hits", "late", "misses", "accesses")) and r["hits"] + r["late"] + r["misses"] > r[
            "accesses"]:
        return "hits + late + misses exceed the accesses"
    return None


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    wr.writeheader()
    wr.writerows(rows)
    return buf.getvalue()


class SweepStore:
    def __init__(self, out_dir: Path, experiment: dict, fingerprint: str) -> None:
        self.out, self.experiment, self.fingerprint = Path(out_dir), experiment, fingerprint
        self._lock = self._journal = None
        self.removed_temps = 0

    # -- lock -------------------------------------------------------------------------------------------
    def open(self) -> dict:
        """Lock the folder, and return {key: row} of the points an earlier run finished (validated)."""
        self._lock = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            self._lock = None
            raise MoeError(f"{self.out} is in use by another sweep running now; wait for it to finish or use "
                           "another --out") from None
        try:
            self.removed_temps = remove_stale_temps(self.out)  # left by a run killed while writing
            rows = self._load_results()
            rows.update(self._load_journal())
            if rows:
                self.finish(rows, keep_journal=True)  # on resume: results written, a missing CSV rebuilt
            self._start_journal()
        except BaseException:
            self.close()
            raise
        return rows

    def close(self) -> None:
        for fd in (self._journal, self._lock):
            if fd is not None:
                os.close(fd)
        self._journal = self._lock = None

    # -- rows -------------------------------------------------------------------------------------------
    def record(self, row: dict) -> None:
        """One line appended to the journal: O(1) per finished point."""
        os.write(self._journal, (json.dumps(row) + "\n").encode())

    def finish(self, rows: dict, keep_journal: bool = False) -> None:
        ordered = [rows[k] for k in sorted(rows)]
        write_json_atomic(self.out / "results.json", {"experiment": self.experiment,
                                                      "fingerprint": self.fingerprint, "results": ordered})
        write_text_atomic(self.out / "results.csv", csv_text(ordered))
        if not keep_journal:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None
            try:
                os.unlink(self.out / JOURNAL)
            except FileNotFoundError:
                pass

    # -- reading what an earlier run left ---------------------------------------------------------------
    def _check_owner(self, where: Path, name, fp) -> None:
        if fp != self.fingerprint or (name is not None and name != self.experiment["name"]):
            other = f" ({short(name, 60)})" if isinstance(name, str) and name != self.experiment["name"] else ""
            raise MoeError(f"{self.out} holds results of a different experiment{other} (name, trace, model, tokens "
                           f"or fixed options differ, {where.name}); use another --out or delete it")

    def _rows(self, where: Path, rows) -> dict:
        for i, r in enumerate(rows):
            why = bad_row(r)
            if why:
                raise MoeError(f"{where}: result {i} is not a sweep result ({why}); delete the file or use "
                               "another --out")
        return {r["key"]: r for r in rows}

    def _load_results(self) -> dict:
        path = self.out / "results.json"
        if not os.path.lexists(path):
            return {}
        try:
            if not path.is_file():
                raise TypeError("not a regular file")
            prev = json.loads(path.read_text())
            rows, fp = prev["results"], prev["fingerprint"]
            name = prev.get("experiment", {}).get("name") if isinstance(prev.get("experiment"), dict) else None
            if not isinstance(rows, list):
                raise TypeError("'results' is not a list")
        except KeyError as e:  # str() of a KeyError is the key's repr in quotes
            raise MoeError(f"{path}: not a sweep results file (no {e.args[0]!r} field); delete it or use another "
                           "--out") from None
        except (ValueError, TypeError, RecursionError, OSError, AttributeError) as e:
            raise MoeError(f"{path}: not a sweep results file ({short(str(e), 80)}); delete it or use another "
                           "--out") from None
        self._check_owner(path, name, fp)
        return self._rows(path, rows)

    def _load_journal(self) -> dict:
        path = self.out / JOURNAL
        if not os.path.lexists(path):
            return {}
        if not path.is_file():
            raise MoeError(f"{path}: not a sweep journal (not a regular file); delete it or use another --out")
        lines = path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        parsed = []
        for i, line in enumerate(lines):
            try:
                parsed.append(json.loads(line))
            except (ValueError, RecursionError):
                if i == len(lines) - 1:  # the line a kill cut short: that point runs again
                    break
                raise MoeError(f"{path}: line {i + 1} is not JSON; delete the file or use another --out") from None
        if not parsed:
            return {}
        head = parsed[0]
        if not isinstance(head, dict) or "fingerprint" not in head:
            raise MoeError(f"{path}: not a sweep journal (no header line); delete it or use another --out")
        self._check_owner(path, head.get("name"), head["fingerprint"])
        return self._rows(path, parsed[1:])

    def _start_journal(self) -> None:
        fd = os.open(self.out / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        os.write(fd, (json.dumps({"fingerprint": self.fingerprint, "name": self.experiment["name"]}) + "\n").encode())
        self._journal = fd
