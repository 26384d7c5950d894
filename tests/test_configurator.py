"""Config parsing and checkpoint loading: every bad input stops with one line naming what is wrong."""
import pytest
import torch

from configurator import (COMMAND_LINE, check_settings, load_checkpoint, lock_folder, parse_config, pick_device,
                          pick_dtype, save_checkpoint)

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
