"""The FLOP ledger and the budget that guards it: one authority for every run that shares a ledger.

The ledger is an append-only JSON-lines file of events, each appended whole and fsynced under an
exclusive lock:

- ``charge``: FLOPs a run is about to compute (charged *before* the work, so after a crash the
  ledger is never below what was computed, and at most one charge above);
- ``reserve``: FLOPs a live process holds back for work it has promised (a final validation, a
  predict's generation); others cannot spend them, and the reservation of a dead process is
  ignored, so a crash frees it;
- ``run``: a run's description and status (name, stage, config, validation loss, ...).

``Ledger.records`` folds the events into one record per run, as the report's Table 6 lists them.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lit_llmtime.io import write_bytes_atomic

DEFAULT_LEDGER = "lightning_logs/flop_ledger.jsonl"
DEFAULT_BUDGET = 1e17  # FLOPs for all runs of a ledger together: the coursework's
STALE_AFTER = 24 * 3600.0  # a reservation from another machine counts as dead after this many silent seconds


class LedgerError(ValueError):
    """The ledger file cannot be read."""


class BudgetExhausted(ValueError):
    """Work was refused because the FLOP budget cannot pay for it."""


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"flops must be a finite number, got {value!r}")
    return number


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), so a reused pid is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


@functools.cache
def _process_by_pid(pid: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def _process() -> dict[str, Any]:
    """This process, as its reservations name it (read once per process: every charge asks)."""
    return _process_by_pid(os.getpid())


def _key(event: dict[str, Any]) -> tuple:
    return event["host"], int(event["pid"]), event.get("start")


def _alive(reservation: dict[str, Any], now: float) -> bool:
    """Whether the process holding ``reservation`` may still use it: on this machine, its pid runs
    and started when it did; elsewhere, it renewed the reservation within ``STALE_AFTER``."""
    if reservation["host"] != socket.gethostname():
        return now - reservation["time"] < STALE_AFTER
    if reservation.get("start") is not None and Path("/proc").is_dir():
        return _start_time(reservation["pid"]) == reservation["start"]
    try:
        os.kill(reservation["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class Ledger:
    """The events of one ledger file, folded into per-run records (in memory when ``path`` is None)."""

    def __init__(self, path: str | Path | None = DEFAULT_LEDGER) -> None:
        self.path = None if path is None else Path(path)
        self._offset, self._lines = 0, 0  # bytes and lines of the file already folded into the state below
        self._records: dict[str, dict[str, Any]] = {}
        self._reservations: dict[tuple, dict[str, Any]] = {}
        self._fragment = b""  # the last line, if it has no newline yet
        self._fragment_parses = False
        self._view = self._records, self._reservations  # the state with that line folded in, if it parses

    # -- reading -------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Fold the events appended since the last read (by any process).

        A last line without its newline is either being written right now or was left by a writer
        that died (or a hand edit): if it parses as an event it counts, else it waits (``append``
        moves it aside under the lock, where no one is writing)."""
        if self.path is None or not self._exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            self._fold_bytes(f.read())

    def _fold_bytes(self, data: bytes) -> None:
        """Fold ``data`` (the file's bytes from ``_offset``): its whole lines for good, an unfinished
        last line into a copy of the state if it parses."""
        end = data.rfind(b"\n") + 1
        for line in data[:end].split(b"\n")[:-1]:
            if line.strip():
                self._fold(line.decode(errors="replace"), self._lines + 1, self._records, self._reservations)
            self._offset, self._lines = self._offset + len(line) + 1, self._lines + 1  # folded once, even on error
        self._fragment = data[end:]
        self._view = self._records, self._reservations
        self._fragment_parses = self._fragment_event() is not None
        if self._fragment_parses:  # counted in a copy: the next read folds it again, whole
            self._view = copy.deepcopy(self._view)
            self._fold(self._fragment.decode(), self._lines + 1, *self._view)

    def _exists(self) -> bool:
        if self.path.is_dir():
            raise LedgerError(
                f"{self.path} is a folder, not a ledger file: name a file, e.g. {self.path}/flop_ledger.jsonl"
            )
        return self.path.is_file()

    def _fragment_event(self) -> dict[str, Any] | None:
        """The unfinished last line as an event, or None if it is empty or does not parse (yet)."""
        try:
            event = json.loads(self._fragment.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return event if isinstance(event, dict) else None

    def _fold(self, line: str, number: int, records: dict, reservations: dict) -> None:
        try:
            event = json.loads(line)
            kind = event.get("event", "run")
            run_id = event["run_id"]
            record = records.setdefault(run_id, {"run_id": run_id, "flops": 0.0, "steps": 0})
            flops = _finite(event.get("flops", 0.0))
            if kind == "charge":
                if flops < 0 and record["flops"] + flops < 1e-9 * flops:
                    raise ValueError(
                        f"a refund of {-flops:.4e} FLOPs exceeds the {record['flops']:.4e} {run_id!r} was charged"
                    )
                record["flops"] += flops
                record["steps"] += int(event.get("steps", 0))
            elif kind == "reserve":
                if flops < 0:
                    raise ValueError(f"negative reservation {flops}")
                reservations[_key(event)] = event
            elif kind == "run":  # also an older ledger's whole record, whose flops and steps are totals
                record.update({k: v for k, v in event.items() if k != "event"})
                record["flops"] = _finite(record["flops"])
            else:
                raise ValueError(f"unknown event {kind!r}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise LedgerError(f"{self.path}, line {number}: not a ledger record ({error})") from error

    def records(self) -> list[dict[str, Any]]:
        """One record per run, in the order the runs started."""
        self._refresh()
        return sorted(self._view[0].values(), key=lambda r: r.get("started", ""))

    def get(self, run_id: str) -> dict[str, Any] | None:
        self._refresh()
        return self._view[0].get(run_id)

    def total(self, exclude: str | None = None) -> float:
        """FLOPs charged by every run (but ``exclude``)."""
        self._refresh()
        return sum(r["flops"] for run_id, r in self._view[0].items() if run_id != exclude)

    def reserved_by_others(self) -> float:
        """FLOPs that live other processes hold back."""
        self._refresh()
        me, now = _key(_process()), time.time()
        return sum(r["flops"] for key, r in self._view[1].items() if key != me and r["flops"] > 0 and _alive(r, now))

    def my_reservation(self) -> dict[str, Any] | None:
        """This process's reservation event, if it holds one."""
        self._refresh()
        return self._view[1].get(_key(_process()))

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access for a read-check-append, across processes."""
        if self.path is None:
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(lock_path, "a")  # noqa: SIM115 (closed below, after the lock is let go)
        except OSError as error:
            raise LedgerError(
                f"cannot write the ledger's lock file {lock_path} ({error.strerror}): "
                "choose a writable --flop_budget.ledger"
            ) from error
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, *events: dict[str, Any]) -> None:
        """Append whole lines and fsync them (call under ``locked``); folded at once. Never drops
        a byte: an unfinished last line that parses gets its newline; one that does not is moved
        to a sidecar file first, with a warning naming it."""
        lines = "".join(json.dumps(event) + "\n" for event in events).encode()
        if self.path is None:
            self._fold_bytes(lines)
            return
        self._refresh()
        if self._fragment and self._fragment_parses:
            lines = b"\n" + lines
        elif self._fragment:
            self._set_aside()
        try:
            with open(self.path, "ab") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            raise LedgerError(f"cannot append to the ledger {self.path} ({error.strerror})") from error
        self._fold_bytes(self._fragment + lines)  # what the file now holds from _offset (under the lock)

    def _set_aside(self) -> None:
        """Move the unparsable last line into ``<ledger>.fragment-<offset>-<ns>`` and cut it from the ledger."""
        sidecar = self.path.with_name(f"{self.path.name}.fragment-{self._offset}-{time.time_ns()}")
        write_bytes_atomic(sidecar, self._fragment)
        warnings.warn(
            f"{self.path}: its last line had no newline and is not a record; moved to {sidecar}", stacklevel=3
        )
        with open(self.path, "rb+") as f:
            f.truncate(self._offset)
            os.fsync(f.fileno())
        self._fragment, self._fragment_parses, self._view = b"", False, (self._records, self._reservations)

    def update(self, run_id: str, **fields: Any) -> None:
        """Describe a run (name, stage, status, config, val_loss, ...)."""
        with self.locked():
            self.append({"event": "run", "run_id": run_id, **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def table(self, budget: float) -> str:
        """The ledger as the report's Table 6 (markdown)."""
        lines = [
            "| Experiment | Stage | Status | Training steps | Total FLOPs | % Budget used |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in self.records():
            lines.append(
                f"| {r.get('name', r['run_id'])} | {r.get('stage', '')} | {r.get('status', '')} | "
                f"{r.get('steps', 0)} | {float(r['flops']):.3e} | {100 * float(r['flops']) / budget:.4f}% |"
            )
        spent = self.total()
        lines.append(f"| **Total used** | | | | {spent:.3e} | **{100 * spent / budget:.4f}%** |")
        lines.append(f"| **Remaining** | | | | {budget - spent:.3e} | **{100 * (budget - spent) / budget:.4f}%** |")
        return "\n".join(lines) + "\n"


class Budget:
    """The one place that decides whether FLOPs may be spent: the CLI's pre-check, the callback's
    gate before every batch and generation, the sweep's plan and ``lit-llmtime flops`` all ask it.

    Args:
        ledger: the ledger every run shares (a path, a ``Ledger``, or None for this process only).
        budget: FLOPs allowed for all runs of the ledger together.
    """

    def __init__(self, ledger: str | Path | Ledger | None, budget: float) -> None:
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self.budget = float(budget)

    def spent(self) -> float:
        return self.ledger.total()

    def available(self) -> float:
        """What this process may still spend: the budget less every charge and every live
        reservation of other processes (its own reservation is its to spend)."""
        return self.budget - self.ledger.total() - self.ledger.reserved_by_others()

    def allow(self, cost: float) -> bool:
        return cost <= self.available()

    def refusal(self, what: str, cost: float) -> BudgetExhausted:
        """The one shape of every budget refusal: what was refused, what it needs, what is left."""
        where = f"ledger {self.ledger.path}" if self.ledger.path else "this process's budget"
        return BudgetExhausted(
            f"FLOP budget: {what} needs {cost:.3e} FLOPs; {self.available():.3e} of {self.budget:.3e} left ({where})"
        )

    def charge(self, run_id: str, cost: float, kind: str, steps: int = 0, reserve: float | None = None) -> bool:
        """Atomically: if ``cost`` (plus a new reservation of ``reserve`` for this process) fits,
        record it durably and return True; else record nothing and return False. Without
        ``reserve`` the charge is paid out of this process's reservation first."""
        with self.ledger.locked():
            mine = self.ledger.my_reservation()
            held = mine["flops"] if mine else 0.0
            keep = max(0.0, held - cost) if reserve is None else reserve
            if cost + keep > self.available():
                return False
            events = [{"event": "charge", "run_id": run_id, "kind": kind, "flops": cost, "steps": steps}]
            if keep != held or (keep and time.time() - mine["time"] > STALE_AFTER / 4):  # renewed: still alive
                events.append(self._reservation(run_id, keep))
            self.ledger.append(*events)
            return True

    def reserve(self, run_id: str, flops: float) -> bool:
        """Hold ``flops`` back for this process (0 releases); False (nothing changed) if they are not there."""
        with self.ledger.locked():
            mine = self.ledger.my_reservation()
            held = mine["flops"] if mine else 0.0
            if flops > held and flops > self.available():  # giving back is always allowed
                return False
            if flops != held:
                self.ledger.append(self._reservation(run_id, flops))
            return True

    def refund(self, run_id: str, flops: float, kind: str) -> None:
        """Give back FLOPs charged as an upper bound and not spent (e.g. generation that stopped early)."""
        if flops > 0:
            with self.ledger.locked():
                self.ledger.append({"event": "charge", "run_id": run_id, "kind": kind, "flops": -flops})

    @staticmethod
    def _reservation(run_id: str, flops: float) -> dict[str, Any]:
        return {"event": "reserve", "run_id": run_id, "flops": flops, "time": time.time(), **_process()}
