"""train.py end to end on the CPU: learning, checkpoints, resume, DDP, exact evaluation, sampling, bad input."""
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_resume_reproduces, read_log, run_stage, run_train
from model import GPT, GPTConfig

TINY = ["--device=cpu", "--n_layer=2", "--n_embd=32", "--n_head=4", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3"]


def train(data, out, *args, **kwargs):
    return run_stage("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *args, **kwargs)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One short training run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    result = train(tiny_data, out, "--max_iters=40", "--eval_interval=20")
    return out, result


def test_training_loss_falls_and_outputs_are_written(trained):
    out, result = trained
    rows = read_log(out)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < 0.6 * evals[0]["val_loss"]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    for name in ("ckpt.pt", "tokenizer.model", "loss.png", "log.jsonl"):
        assert (out / name).exists(), name
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 40 and checkpoint["model_config"]["n_layer"] == 2
    assert "exact val bits per byte" in result.stdout


def test_run_manifest_describes_the_run_and_its_id_is_on_every_log_row(trained, tiny_data):
    out, _ = trained
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["n_layer"] == 2 and manifest["config"]["data_dir"] == str(tiny_data)
    assert manifest["torch"] == torch.__version__ and manifest["device"] == "cpu" and manifest["world_size"] == 1
    assert len(manifest["git_commit"]) == 40 and isinstance(manifest["git_dirty"], bool)  # tests run in the repo
    assert manifest["data_meta_sha256"] == hashlib.sha256((tiny_data / "meta.json").read_bytes()).hexdigest()
    assert {row["run_id"] for row in read_log(out)} == {manifest["run_id"]}


def test_exact_bits_per_byte_equals_a_hand_computation(trained, tiny_data):
    out, result = trained
    final = [r for r in read_log(out) if "exact_val_bpb" in r][0]["exact_val_bpb"]
    evaluated = train(tiny_data, out, "--eval_only=True")
    assert f"exact val bits per byte: {final:.4f}" in evaluated.stdout
    # by hand: every val token after an end-of-document token, predicted in windows of block_size, one at a time
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    meta = json.loads((tiny_data / "meta.json").read_text())
    stream = np.fromfile(tiny_data / "val_000.bin", dtype=meta["dtype"]).astype(np.int64)
    stream = torch.from_numpy(np.concatenate([[meta["eos_id"]], stream]))
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, 32):
            x, y = stream[s:s + 32], stream[s + 1:s + 33]
            logits = model(x[None, :len(y)], y[None])[0]
            nats += F.cross_entropy(logits[0], y, reduction="sum").item()
    assert math.isclose(final, nats / meta["splits"]["val"]["bytes"] / math.log(2), rel_tol=1e-5)


def test_eval_file_bits_per_byte(trained, tiny_data, tmp_path):
    out, _ = trained
    text = tmp_path / "held_out.txt"
    text.write_text("alice reads 3 books.\ndef reads_books(n):\n    return n * 2\n")
    result = train(tiny_data, out, "--eval_only=True", f"--eval_file={text}")
    line = [l for l in result.stdout.splitlines() if "held_out.txt" in l][0]
    assert 0 < float(line.split(":")[-1]) < 8


def test_sample_streams_text(trained):
    out, _ = trained
    greedy = [run_stage("sample.py", f"--out_dir={out}", "--start=alice", "--num_samples=1", "--max_new_tokens=20",
                        "--temperature=0", "--device=cpu", f"--stream={stream}") for stream in (True, False)]
    assert greedy[0].stdout.startswith("alice")  # printed as it came, or when done: the same text
    assert greedy[1].stdout == greedy[0].stdout[:-1] + "\n---\n"
    assert len(greedy[0].stdout) > len("alice") + 5
    assert "tokens/s" in greedy[0].stderr
    long_prompt = run_stage("sample.py", f"--out_dir={out}", "--start=" + "bob reads 2 lines. " * 40, "--num_samples=1",
                            "--max_new_tokens=5", "--device=cpu")
    assert "keeping the last 31" in long_prompt.stderr


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    args = ["--eval_interval=5", "--dropout=0.1"]

    def kill(out):
        """Kill the run hard once it has saved a checkpoint; it resumes with the same command."""
        cmd = [sys.executable, "train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, *args,
               "--max_iters=30"]
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        while not (out / "ckpt.pt").exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.005)
        process.kill()
        process.wait()
        assert 5 <= torch.load(out / "ckpt.pt", weights_only=True)["step"] < 30

    _, killed = assert_resume_reproduces(lambda out, *more: train(tiny_data, out, *args, *more), tmp_path, 30, kill,
                                         tol=1e-6)
    assert len({row["run_id"] for row in read_log(killed)}) == 1  # the resumed run goes on as the same run


def test_two_process_ddp_equals_one_process(tiny_data, tmp_path):
    args = ["--max_iters=6", "--eval_interval=6", "--batch_size=2", "--gradient_accumulation_steps=4",
            "--sampler=epoch"]
    train(tiny_data, tmp_path / "one", *args)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                    f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'two'}", *TINY, *args], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), name
    assert abs(read_log(tmp_path / "one")[-2]["val_loss"] - read_log(tmp_path / "two")[-2]["val_loss"]) < 1e-5


def test_epoch_sampler_visits_every_window_once_per_epoch(tiny_data, tmp_path, monkeypatch):
    train_py = run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TINY, "--max_iters=0",
                         "--sampler=epoch", "--batch_size=3")
    n, per_step = train_py["n_windows"], train_py["windows_per_step"]
    steps_per_epoch = n // per_step
    seen = [tuple(w) for step in range(steps_per_epoch) for w in zip(*train_py["training_windows"](step))]
    assert len(seen) == len(set(seen)) == steps_per_epoch * per_step  # no window twice within the epoch
    assert all(offset % 32 == 0 for _, offset in seen)  # non-overlapping windows
    next_epoch = [tuple(w) for w in zip(*train_py["training_windows"](n))]  # step n starts well into later epochs
    assert len(next_epoch) == per_step


def one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_bad_inputs_give_one_line_errors(trained, tiny_data, tmp_path):
    """End to end through train.py; the other bad inputs are checked in-process in test_configurator.py."""
    out, _ = trained
    one_line_error(train(tiny_data, tmp_path, "--no_such_key=3", check=False), "no_such_key")
    one_line_error(train(tmp_path / "missing", tmp_path, check=False), "prepare.py")
    one_line_error(train(tiny_data, tmp_path, "--n_head=5", check=False), "n_embd must be a multiple of n_head")
    one_line_error(train(tiny_data, out, "--init_from=resume", "--n_layer=3", check=False), "n_layer")
    diverged = train(tiny_data, tmp_path / "nan", "--learning_rate=1e30", "--warmup_iters=0", "--max_iters=20",
                     "--grad_clip=0", "--eval_interval=100", check=False)
    one_line_error(diverged, "at step")
