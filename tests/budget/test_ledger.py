"""The ledger never loses a byte and never believes an impossible number; its mistakes are one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from lit_llmtime.app.cli import main
from lit_llmtime.budget.ledger import Budget, Ledger, LedgerError

QUICKSTART = str(Path(__file__).parents[2] / "configs/quickstart.yaml")
MANUAL = {"event": "charge", "run_id": "manual", "kind": "train", "flops": 5e16, "steps": 1}


def test_a_last_line_without_newline_that_parses_is_a_record_and_gets_its_newline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path("lightning_logs/quickstart/flop_ledger.jsonl")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"event": "charge", "run_id": "a", "kind": "train", "flops": 1.0}) + "\n")
    path.write_text(path.read_text() + json.dumps(MANUAL))  # a hand edit: no newline
    before = path.read_bytes()
    assert Ledger(path).total() == 5e16 + 1.0
    with pytest.raises(SystemExit) as refused:  # the repro: the fit must be refused
        main(["fit", "--config", QUICKSTART, "--flop_budget.budget=5e16"])
    assert "FLOP budget: one training step of this run needs" in str(refused.value)
    assert path.read_bytes() == before  # refused before writing anything
    assert Budget(str(path), 1e17).charge("b", 2.0, "train")
    assert path.read_bytes().startswith(before + b"\n")  # the fragment's line is finished, not cut
    assert [r["flops"] for r in Ledger(path).records()] == [1.0, 5e16, 2.0]


def test_an_unparsable_last_line_is_moved_aside_not_dropped(tmp_path):
    path = tmp_path / "l.jsonl"
    whole = json.dumps({"event": "charge", "run_id": "a", "kind": "train", "flops": 3.0}) + "\n"
    path.write_text(whole + '{"event": "charge", "run_id": "dead", "fl')  # a writer killed mid-line
    assert Ledger(path).total() == 3.0  # an unfinished line may still be being written: not counted
    with pytest.warns(UserWarning, match=r"l.jsonl: its last line had no newline and is not a record; moved to"):
        assert Budget(str(path), 10.0).charge("b", 4.0, "train")
    (sidecar,) = tmp_path.glob("l.jsonl.fragment-*")
    assert sidecar.read_text() == '{"event": "charge", "run_id": "dead", "fl'
    assert path.read_text().startswith(whole) and Ledger(path).total() == 7.0


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ({"event": "charge", "run_id": "x", "kind": "train", "flops": -math.inf}, "flops must be a finite number"),
        ({"event": "charge", "run_id": "x", "kind": "train", "flops": math.nan}, "flops must be a finite number"),
        ({"event": "charge", "run_id": "x", "kind": "train", "flops": -2.0}, "a refund of 2.0000e+00 FLOPs exceeds"),
        ({"event": "run", "run_id": "x", "flops": math.inf}, "flops must be a finite number"),
        ({"event": "reserve", "run_id": "x", "flops": -1.0, "host": "h", "pid": 1}, "negative reservation"),
    ],
)
def test_impossible_numbers_are_refused_with_their_line(tmp_path, line, why):
    path = tmp_path / "l.jsonl"
    charge = {"event": "charge", "run_id": "x", "kind": "train", "flops": 1.0}
    path.write_text(json.dumps(charge) + "\n" + json.dumps(line) + "\n")  # json writes -Infinity, NaN
    with pytest.raises(LedgerError, match=rf"l.jsonl, line 2: not a ledger record \({re.escape(why)}"):
        Budget(str(path), 1e17).available()


def test_a_refund_of_what_was_charged_is_allowed(tmp_path):
    budget = Budget(str(tmp_path / "l.jsonl"), 10.0)
    assert budget.charge("x", 4.0, "predict")
    budget.refund("x", 4.0, "predict")
    assert Ledger(tmp_path / "l.jsonl").total() == 0.0


def test_a_ledger_that_is_a_folder_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("folder").mkdir()
    for command in (["ledger", "--path", "folder"], ["fit", "--config", QUICKSTART, "--flop_budget.ledger=folder"]):
        with pytest.raises(SystemExit) as failed:
            main(command)
        assert str(failed.value) == (
            "lit-llmtime: error: folder is a folder, not a ledger file: name a file, e.g. folder/flop_ledger.jsonl"
        )


def test_a_ledger_that_cannot_be_written_is_one_clear_line(tmp_path):
    Path(tmp_path / "file").write_text("")  # a parent that is a file: as unwritable as a read-only folder
    why = r"lock file .*file/l.jsonl.lock \(File exists\): choose a writable --flop_budget.ledger$"
    with pytest.raises(LedgerError, match=why):
        Budget(str(tmp_path / "file/l.jsonl"), 1.0).charge("x", 0.5, "train")
