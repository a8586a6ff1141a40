import ast

import numpy as np
import pytest

from lit_llmtime.app.cli import main
from lit_llmtime.data.module import load_trajectories
from lit_llmtime.text.codec import encode


def test_simulate_then_encode(tmp_path, capsys, tokenizer):
    path = tmp_path / "lv.h5"
    main(["simulate", "--out", str(path), "--n", "12", "--seed", "2"])
    trajectories, _ = load_trajectories(path)
    assert trajectories.shape == (12, 100, 2)
    capsys.readouterr()
    main(["encode", "--index", "5", "--data", str(path)])
    header, text, ids = capsys.readouterr().out.strip().split("\n")
    expected_text, alpha = encode(trajectories[5])
    assert header.startswith(f"sample 5: alpha {alpha:.6g}")
    assert text == expected_text
    assert ast.literal_eval(ids) == tokenizer(expected_text, add_special_tokens=False)["input_ids"]


def test_encode_steps_keeps_the_whole_sample_alpha(tmp_path, capsys):
    path = tmp_path / "lv.h5"
    main(["simulate", "--out", str(path), "--n", "3"])
    capsys.readouterr()
    main(["encode", "--index", "1", "--data", str(path), "--steps", "3"])
    _, text, _ = capsys.readouterr().out.strip().split("\n")
    trajectories, _ = load_trajectories(path)
    full, _ = encode(trajectories[1])
    assert text == ";".join(full.split(";")[:3])
    assert np.isfinite(float(text.split(",")[0]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encode", "--index", "0", "--data", "absent.h5"], "absent.h5: data file not found"),
        (["encode", "--index", "99", "--data", "lv.h5"], "sample index 99 out of range"),
    ],
)
def test_user_mistakes_exit_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    main(["simulate", "--out", "lv.h5", "--n", "3"])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert message in str(exit_info.value)


def test_encode_check_writes_figure_one(small_h5, tmp_path, capsys):
    out = tmp_path / "check.png"
    main(["encode-check", "--index", "3", "--data", str(small_h5), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "max |decoded - original|" in capsys.readouterr().out


def test_encode_check_states_the_bound_of_each_transform(small_h5, tmp_path, capsys):
    import re

    errors = {}
    for transform in ("none", "log"):
        main(["encode-check", "--index", "3", "--data", str(small_h5), "--out", str(tmp_path / f"{transform}.png"),
              "--decimals", "1", "--transform", transform])  # fmt: skip
        line = capsys.readouterr().out.splitlines()[0]
        error, bound = map(float, re.search(r"original\| ([\d.e-]+) \(bound ([\d.e-]+)\)", line).groups())
        assert 0 < error <= bound
        errors[transform] = error, bound
    assert errors["log"][1] > errors["none"][1]  # a relative half step of the log: larger at the peaks


def test_a_checkpoint_from_before_a_setting_existed_keeps_that_settings_default(tmp_path):
    import torch
    from jsonargparse import Namespace

    from lit_llmtime.app.run import adopt_checkpoint

    old = {"decimals": 1, "scale_from": "dataset", "prompt_steps": 50}  # saved before encoding.transform existed
    torch.save({"hyper_parameters": {"encoding": old}, "state_dict": {}}, tmp_path / "old.ckpt")
    encoding = {**old, "transform": "log"}
    config = Namespace(ckpt_path=str(tmp_path / "old.ckpt"), data=Namespace(encoding=dict(encoding)),
                       model=Namespace(encoding=dict(encoding)))  # fmt: skip
    adopt_checkpoint(config)
    assert config.data.encoding["transform"] == config.model.encoding["transform"] == "none"
