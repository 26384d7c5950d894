"""Config parsing and checkpoint loading: every bad input stops with one line naming what is wrong."""
import json
import shutil
import subprocess

import pytest
import torch

import configurator
from configurator import (COMMAND_LINE, check_settings, load_checkpoint, lock_folder, parse_config, pick_device,
                          pick_dtype, read_log, read_text, save_checkpoint, write_manifest)

DEFAULTS = {"n_layer": 12, "learning_rate": 6e-4, "compile": False, "out_dir": "out", "note": None}


def error_of(call, stop=SystemExit):
    """The one-line message of a config error (it stops the stage: 'error: ...') or of a checkpoint's ValueError."""
    with pytest.raises(stop) as e:
        call()
    message = str(e.value.code if stop is SystemExit else e.value)
    assert message.startswith("error:") == (stop is SystemExit) and "\n" not in message
    return message


def test_files_then_command_line(tmp_path):
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("import math\nn_layer = 4\nlearning_rate = math.sqrt(1e-6)\n_private = 3\n")
    second.write_text("n_layer = 6\nout_dir = 'out/b'\n")
    config = parse_config(DEFAULTS, [str(first), str(second), "--learning_rate=3", "--compile", "--out_dir=x y"])
    assert config == {"n_layer": 6, "learning_rate": 3.0, "compile": True, "out_dir": "x y", "note": None}
    assert isinstance(config["learning_rate"], float)


def test_unknown_keys_and_wrong_types(tmp_path):
    assert "'n_layers'" in error_of(lambda: parse_config(DEFAULTS, ["--n_layers=3"]))
    assert "'n_layer'" in error_of(lambda: parse_config(DEFAULTS, ["--n_layer=two"]))
    assert "'n_layer'" in error_of(lambda: parse_config(DEFAULTS, ["--n_layer=2.5"]))
    assert "'compile'" in error_of(lambda: parse_config(DEFAULTS, ["--compile=1"]))
    assert "'learning_rate'" in error_of(lambda: parse_config(DEFAULTS, ["--learning_rate"]))
    typo = tmp_path / "typo.py"
    typo.write_text("learning_rte = 1e-3\n")
    message = error_of(lambda: parse_config(DEFAULTS, [str(typo)]))
    assert "'learning_rte'" in message and "typo.py" in message
    assert "not found" in error_of(lambda: parse_config(DEFAULTS, [str(tmp_path / "missing.py")]))
    # another stage's keys in a config file are skipped when asked, but never on the command line
    assert parse_config(DEFAULTS, [str(typo)], other_stage_keys_in_files=True) == DEFAULTS
    assert "'learning_rte'" in error_of(lambda: parse_config(DEFAULTS, ["--learning_rte=1"], other_stage_keys_in_files=True))


def test_checkpoints_round_trip_and_bad_files_stop_cleanly(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(str(path), {"model": {"w": torch.ones(3)}, "step": 7, "config": {"lr": 1e-3}})
    loaded = load_checkpoint(str(path.parent))  # a folder means its ckpt.pt
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert not (tmp_path / "run" / "ckpt.pt.tmp").exists()
    assert "no checkpoint" in error_of(lambda: load_checkpoint(str(tmp_path / "nowhere.pt")), ValueError)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    assert "corrupt or truncated" in error_of(lambda: load_checkpoint(str(truncated)), ValueError)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "corrupt or truncated" in error_of(lambda: load_checkpoint(str(garbage)), ValueError)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert "not a nanollm checkpoint" in error_of(lambda: load_checkpoint(str(foreign)), ValueError)


def test_given_keys_and_config_files_that_fail(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("n_layer = 12\n")  # the default's value, but given
    config, given = parse_config(DEFAULTS, [str(config_file), "--compile"], with_given=True)
    assert given == {"n_layer": str(config_file), "compile": COMMAND_LINE} and config["n_layer"] == 12
    _, given = parse_config(DEFAULTS, ["--n_layer=3", str(config_file)], with_given=True)  # the last one wins
    assert given == {"n_layer": str(config_file)}
    config_file.write_text("n_layer = 4\nlearning_rate = (1e-3\n")
    message = error_of(lambda: parse_config(DEFAULTS, [str(config_file)]))
    assert message.startswith(f"error: config file {config_file}, line 2:")
    config_file.write_text("n_layer = 4\nlearning_rate = lr / 10\n")
    assert error_of(lambda: parse_config(DEFAULTS, [str(config_file)])) == (
        f"error: config file {config_file}, line 2: NameError: name 'lr' is not defined")


def test_settings_out_of_range_devices_and_dtypes_stop_in_one_line():
    config = {"batch_size": 0, "seed": -1, "frac": 1.5, "schedule": "cosin"}
    assert error_of(lambda: check_settings(config, positive=["batch_size"])) == "error: batch_size=0 must be positive"
    assert "seed=-1 must not be negative" in error_of(lambda: check_settings(config, non_negative=["seed"]))
    assert "frac=1.5 must lie between 0 and 1" in error_of(lambda: check_settings(config, fractions=["frac"]))
    assert "unknown schedule 'cosin' (choose cosine, wsd)" in error_of(
        lambda: check_settings(config, choices={"schedule": ("cosine", "wsd")}))
    assert "unknown dtype 'fp16' (choose auto, float32, bfloat16, float16)" in error_of(
        lambda: pick_dtype("cpu", "fp16"))
    assert "unknown device 'gpu'" in error_of(lambda: pick_device("gpu"))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error_of(lambda: pick_device("cuda:0"))


def test_a_folder_lock_is_held_once_per_process_and_a_file_is_no_folder(tmp_path):
    lock_folder(str(tmp_path / "run"))
    lock_folder(str(tmp_path / "run"))  # this process holds it already
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in error_of(lambda: lock_folder(str(tmp_path / "file")), ValueError)


def test_none_is_no_value_of_a_typed_key_and_a_bare_typo_is_unknown(tmp_path):
    # None passes only where the default is None: a typed key set to None would fail later, in a traceback
    assert "'n_layer' expects int, got NoneType None" in error_of(lambda: parse_config(DEFAULTS, ["--n_layer=None"]))
    config_file = tmp_path / "c.py"
    config_file.write_text("learning_rate = None\n")
    assert "'learning_rate' expects float" in error_of(lambda: parse_config(DEFAULTS, [str(config_file)]))
    assert parse_config(DEFAULTS, ["--note=3"])["note"] == 3
    # a bare --flag that no default has is an unknown key (not a key that "needs a value")
    assert "unknown config key 'compil'" in error_of(lambda: parse_config(DEFAULTS, ["--compil"]))


def test_a_cuda_index_that_torch_would_refuse_stops_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == "cuda:1" and pick_device("cuda") == "cuda"
    for device in ("cuda:", "cuda:01", "cuda:\u00b2", "cpu:"):  # torch.device refuses the first two; '²' is no int
        assert f"unknown device '{device}'" in error_of(lambda: pick_device(device))


def test_a_damaged_last_row_is_no_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 1}\r\n{"step": 2}\n{"step": 3, "lo')  # a crash mid-append: no newline after it
    assert read_log(str(log)) == [{"step": 1}, {"step": 2}]
    log.write_bytes(b'{"step": 1}\n{"step": 2, "lo{"step": 3}\n')  # a whole line (it ends in a newline), damaged
    assert "line 2 is not JSON" in error_of(lambda: read_log(str(log)), ValueError)


def test_a_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert "prompt file" in error_of(lambda: read_text(str(tmp_path / "file" / "x"), "prompt file"), ValueError)
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(configurator, "open", unreadable, raising=False)  # root reads any file: open refuses here
    assert "Permission denied" in error_of(lambda: read_text(str(tmp_path / "file"), "eval_file"), ValueError)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_repository_without_commits_records_no_commit(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # `git rev-parse HEAD` prints 'HEAD' here
    monkeypatch.setattr(configurator, "__file__", str(tmp_path / "configurator.py"))
    (tmp_path / "meta.json").write_text("{}")
    write_manifest(str(tmp_path / "out"), {}, "cpu", str(tmp_path / "meta.json"))
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["git_commit"] is None and manifest["git_dirty"] is None
