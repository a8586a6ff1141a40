"""A run's configuration: the data section of older configs still read."""

from __future__ import annotations

from pathlib import Path

import yaml

from lit_llmtime.app.run import resolve_run

QUICKSTART = str(Path(__file__).parents[2] / "configs/quickstart.yaml")


def test_a_config_naming_the_old_data_class_path_still_runs(tmp_path, capsys):
    old = {"class_path": "lit_llmtime.data.LotkaVolterraDataModule", "init_args": {"batch_size": 3}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"data": old}))
    config = resolve_run(["fit", "--config", QUICKSTART, "--config", str(tmp_path / "old.yaml")])
    assert config.data.batch_size == 3 and config.data.context_length == 1024  # the rest from the quickstart
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert "data.class_path lit_llmtime.data.LotkaVolterraDataModule is deprecated" in line
    new = {"class_path": "lit_llmtime.data.SeriesDataModule", "init_args": {"batch_size": 5}}
    (tmp_path / "new.yaml").write_text(yaml.safe_dump({"data": new}))
    assert resolve_run(["fit", f"--config={QUICKSTART}", f"--config={tmp_path / 'new.yaml'}"]).data.batch_size == 5
    assert "deprecated" not in capsys.readouterr().err
