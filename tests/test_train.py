"""train.py end to end on the CPU: learning, checkpoints, resume, DDP, exact evaluation, a target to stop at, sampling,
bad input, and what it refuses or survives (other datasets, occupied folders, damaged data, divergence, full disks,
Ctrl-C)."""
import dataclasses
import errno
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import configurator
from conftest import ROOT, assert_resume_reproduces, read_log, run_stage, run_train
from evaluate import exact_bits_per_byte
from model import GPT, GPTConfig

TINY = ["--device=cpu", "--n_layer=2", "--n_embd=32", "--n_head=4", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3"]


def train(data, out, *args, **kwargs):
    """train.py in a process of its own: fresh, or with warm=warm_python forked from a warm one (a fresh one spends
    seconds importing)."""
    return run_stage("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *args, **kwargs)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory, warm_python):
    """One short training run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    result = train(tiny_data, out, "--max_iters=40", "--eval_interval=20", warm=warm_python)
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


def test_exact_bits_per_byte_equals_a_hand_computation(trained, tiny_data, warm_python):
    out, result = trained
    final = [r for r in read_log(out) if "exact_val_bpb" in r][0]["exact_val_bpb"]
    evaluated = train(tiny_data, out, "--eval_only=True", warm=warm_python)
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


def test_exact_bits_per_byte_reads_a_val_shard_too_short_for_a_window(trained, tiny_data, tmp_path, warm_python):
    """The last val shard holds 10 tokens, fewer than a window of block_size + 1: no sampled window comes from it, and
    the exact evaluation still reads it (meta.json's byte count counts its bytes)."""
    out, _ = trained
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    stream = np.fromfile(data / "val_000.bin", dtype=meta["dtype"])
    stream[:-10].tofile(data / "val_000.bin")
    stream[-10:].tofile(data / "val_001.bin")
    meta["splits"]["val"]["shards"] = ["val_000.bin", "val_001.bin"]
    (data / "meta.json").write_text(json.dumps(meta))
    result = train(data, out, "--eval_only=True", warm=warm_python)
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    shards = [np.fromfile(data / name, dtype=meta["dtype"]) for name in meta["splits"]["val"]["shards"]]
    expected = exact_bits_per_byte(model.eval(), shards, meta["splits"]["val"]["bytes"], meta["eos_id"], 4)
    assert f"exact val bits per byte: {expected:.4f}" in result.stdout, result.stdout


def test_a_resume_refuses_optimizer_settings_its_state_would_override(trained, tiny_data, tmp_path, monkeypatch):
    """The optimizer's state holds its settings (weight decay, betas, Muon's): a resume that asks for others stops in
    one line instead of dropping them, and the folder is as it was."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.name != ".lock"}
    with pytest.raises(SystemExit, match="^error: .* trained with weight_decay=0.1, but the config says "
                                         "weight_decay=0.0, which the optimizer's state would override"):
        run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={run}", *TINY, "--init_from=resume",
                  "--max_iters=41", "--weight_decay=0.0")
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.name != ".lock"} == before


def test_eval_file_bits_per_byte(trained, tiny_data, tmp_path, warm_python):
    out, _ = trained
    text = tmp_path / "held_out.txt"
    text.write_text("alice reads 3 books.\ndef reads_books(n):\n    return n * 2\n")
    result = train(tiny_data, out, "--eval_only=True", f"--eval_file={text}", warm=warm_python)
    line = [l for l in result.stdout.splitlines() if "held_out.txt" in l][0]
    assert 0 < float(line.split(":")[-1]) < 8


def test_sample_streams_text(trained, warm_python):
    out, _ = trained
    greedy = [run_stage("sample.py", f"--out_dir={out}", "--start=alice", "--num_samples=1", "--max_new_tokens=20",
                        "--temperature=0", "--device=cpu", f"--stream={stream}", warm=warm_python)
              for stream in (True, False)]
    assert greedy[0].stdout.startswith("alice")  # printed as it came, or when done: the same text
    assert greedy[1].stdout == greedy[0].stdout[:-1] + "\n---\n"
    assert len(greedy[0].stdout) > len("alice") + 5
    assert "tokens/s" in greedy[0].stderr
    long_prompt = run_stage("sample.py", f"--out_dir={out}", "--start=" + "bob reads 2 lines. " * 40, "--num_samples=1",
                            "--max_new_tokens=5", "--device=cpu", warm=warm_python)
    assert "keeping the last 31" in long_prompt.stderr


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path, warm_python):
    """The killed run is a fresh process (a SIGKILL reaches it, not a shim); the others warm ones."""
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

    _, killed = assert_resume_reproduces(lambda out, *more: train(tiny_data, out, *args, *more, warm=warm_python),
                                         tmp_path, 30, kill, tol=1e-6)
    assert len({row["run_id"] for row in read_log(killed)}) == 1  # the resumed run goes on as the same run


def test_a_muonclip_run_resumed_between_its_clip_steps_logs_the_last_max_logit(tiny_data, tmp_path, monkeypatch,
                                                                               one_thread):
    """qk_clip_interval=3 measures the logits at steps 0, 3, 6: the rows of steps 5 and 6 give step 3's, resumed at
    step 4 too (wsd without its decay: the part stopped at max_iters=4 trains as the whole run)."""
    args = [f"--data_dir={tiny_data}", *TINY, "--eval_interval=1000", "--lr_schedule=wsd", "--decay_frac=0.0",
            "--optimizer=muonclip", "--qk_clip_interval=3", "--qk_clip_tau=0.05"]
    whole, part = assert_resume_reproduces(lambda out, *more: run_train(monkeypatch, *args, f"--out_dir={out}", *more),
                                           tmp_path, 6, 4)
    expected, resumed = ([row.get("max_logit") for row in read_log(out) if "loss" in row] for out in (whole, part))
    assert None not in expected and resumed == expected


def test_two_process_ddp_equals_one_process(tiny_data, tmp_path, warm_python):
    """In warm processes (a fresh one spends seconds importing): torchrun's workers still processes of their own."""
    args = ["--max_iters=6", "--eval_interval=6", "--batch_size=2", "--gradient_accumulation_steps=4",
            "--sampler=epoch", "--target_bpb=0.01", "--target_interval=3"]
    train(tiny_data, tmp_path / "one", *args, warm=warm_python)
    subprocess.run([warm_python["python"], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                    f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'two'}", *TINY, *args], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1", **warm_python["env"]}, timeout=300)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), name
    for key, steps in (("val_loss", [0, 6]), ("check_bpb", [3, 6])):  # and the target's checks, summed over the ranks
        one, two = ([(r["step"], r[key]) for r in read_log(tmp_path / run) if key in r] for run in ("one", "two"))
        assert [step for step, _ in one] == [step for step, _ in two] == steps, key
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one, two)), key


def test_torchrun_on_more_processes_than_accumulation_steps_rounds_them_up(tiny_data, tmp_path, monkeypatch, capsys,
                                                                           one_thread, warm_python):
    """The quickstart config under torchrun on 2 (warm) processes, its gradient_accumulation_steps=1 being fewer: one
    micro-step each, and the run equals one process's with gradient_accumulation_steps=2 (the same windows)."""
    args = [f"--data_dir={tiny_data}", *TINY, "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]
    # a short monitor interval: torchrun notices at once that its processes are done
    two = subprocess.run([warm_python["python"], "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.05",
                          "--nproc_per_node=2", "train.py", "config/quickstart.py", f"--out_dir={tmp_path / 'two'}",
                          *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **warm_python["env"]}, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    # 2 micro-steps of 4 windows of 32 tokens
    assert "gradient_accumulation_steps=1 rounded up to 2, a multiple of the 2 processes: 256 tokens per step\n" \
        in two.stdout
    run_train(monkeypatch, "config/quickstart.py", f"--out_dir={tmp_path / 'one'}", *args,
              "--gradient_accumulation_steps=2")
    assert "rounded up" not in capsys.readouterr().out
    assert read_log(tmp_path / "two")[0]["tokens_per_step"] == read_log(tmp_path / "one")[0]["tokens_per_step"] == 256
    one, two = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"] for run in ("one", "two"))
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), name


def test_a_wall_clock_budget_under_torchrun_gives_every_process_one_step_count(tiny_data, tmp_path):
    """Each process measured the time left on its own clock, so that the counts could differ by a step or more (rank 0
    starts its clock later, after writing the run's files): the processes then parted at the end and crashed. Here
    rank 1's clock runs 4 times as fast."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '1':\n    real, start = time.time, time.time()\n"
        "    time.time = lambda: start + 4 * (real() - start)\n")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.05",
                          "--nproc_per_node=2", "train.py", f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'run'}",
                          *TINY, "--train_minutes=0.02", "--eval_interval=1000", "--log_interval=1000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)})
    assert two.returncode == 0, two.stderr[-3000:]
    steps = int(two.stdout.split("wall-clock budget of 0.02 min at ")[1].split(": ")[1].split()[0])
    assert f"done: {steps} steps" in two.stdout
    assert len(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["rng"]) == 2


def test_epoch_sampler_visits_every_window_once_per_epoch(tiny_data, tmp_path, monkeypatch, capsys):
    train_py = run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TINY, "--max_iters=0",
                         "--sampler=epoch", "--batch_size=3")
    assert "no step trained, so no checkpoint" in capsys.readouterr().out and not (tmp_path / "ckpt.pt").exists()
    n, per_step = train_py["n_windows"], train_py["windows_per_step"]
    steps_per_epoch = n // per_step
    seen = [tuple(w) for step in range(steps_per_epoch) for w in zip(*train_py["training_windows"](step))]
    assert len(seen) == len(set(seen)) == steps_per_epoch * per_step  # no window twice within the epoch
    assert all(offset % 32 == 0 for _, offset in seen)  # non-overlapping windows
    next_epoch = [tuple(w) for w in zip(*train_py["training_windows"](n))]  # step n starts well into later epochs
    assert len(next_epoch) == per_step


def test_seq_warmup_cuts_the_windows_into_doubling_lengths_on_the_same_tokens(tiny_data, tmp_path, monkeypatch):
    import model
    seen = []  # (input, target) of each training forward
    forward = model.GPT.forward
    monkeypatch.setattr(model.GPT, "forward", lambda self, idx, targets=None, *a, **k: (
        seen.append((idx, targets)) if self.training else None, forward(self, idx, targets, *a, **k))[1])
    args = (f"--data_dir={tiny_data}", *TINY[1:], "--max_iters=8", "--sampler=epoch", "--eval_interval=100")
    train_py = run_train(monkeypatch, f"--out_dir={tmp_path / 'warm'}", *args, "--seq_warmup=0.5", "--seq_warmup_min=8")
    assert [idx.shape for idx, _ in seen] == [(16, 8)] * 2 + [(8, 16)] * 2 + [(4, 32)] * 4
    assert [train_py["doubling"](step, 0.5, 8, 32) for step in (0, 1, 2, 3, 4, 100)] == [8, 8, 16, 16, 32, 32]
    pieces, seen[:] = seen[:], []
    run_train(monkeypatch, f"--out_dir={tmp_path / 'plain'}", *args)
    assert all(torch.equal(a.reshape(4, 32), b[0]) and torch.equal(c.reshape(4, 32), b[1])
               for (a, c), b in zip(pieces, seen))  # the same tokens and targets, in the same order


def test_window_warmup_narrows_the_sliding_windows_first(tiny_data, tmp_path, monkeypatch):
    import model
    windows, evaluated = [], []  # each training forward's windows, layer by layer, and each evaluation's
    forward = model.GPT.forward
    monkeypatch.setattr(model.GPT, "forward", lambda self, idx, targets=None, *a, **k: (
        (windows if self.training else evaluated).append([b.attn.span.window for b in self.blocks]),
        forward(self, idx, targets, *a, **k))[1])
    train_py = run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TINY[1:], "--max_iters=8",
                         "--attn_span=sliding", "--window=32", "--window_warmup=0.5", "--window_warmup_min=8",
                         "--eval_interval=2")
    assert windows == [[8, 8]] * 2 + [[16, 16]] * 2 + [[32, 32]] * 4
    assert evaluated and all(w == [32, 32] for w in evaluated)  # the model's own window, as a resume evaluates
    # a narrowed span computes what a model built with that window does
    trained = train_py["raw_model"].eval()
    narrow = GPT(dataclasses.replace(trained.config, window=8))
    narrow.load_state_dict(trained.state_dict())
    idx = torch.randint(0, trained.config.vocab_size, (2, 32))
    wide = trained(idx)[0]
    for span in train_py["sliding"]:
        span.window = 8
    assert torch.equal(trained(idx)[0], narrow.eval()(idx)[0]) and not torch.equal(trained(idx)[0], wide)


def test_batch_warmup_updates_after_each_micro_step_first(tiny_data, tmp_path, monkeypatch):
    constant = (f"--data_dir={tiny_data}", *TINY[1:], "--sampler=epoch", "--warmup_iters=0", "--lr_schedule=wsd",
                "--decay_frac=0", "--eval_interval=100")  # a constant lr: the step count changes no lr
    doubled = run_train(monkeypatch, f"--out_dir={tmp_path / 'doubled'}", *constant, "--gradient_accumulation_steps=4",
                        "--max_iters=4", "--batch_warmup=0.5")
    p = next(doubled["raw_model"].parameters())
    assert doubled["optim"].state[p]["step"] == 4 + 2 + 1 + 1  # updates after 1, 2, then all 4 micro-steps
    # a step split into updates after each micro-step is two steps of half the windows
    split = run_train(monkeypatch, f"--out_dir={tmp_path / 'split'}", *constant, "--gradient_accumulation_steps=2",
                      "--max_iters=3", "--batch_warmup=1")
    half = run_train(monkeypatch, f"--out_dir={tmp_path / 'half'}", *constant, "--max_iters=6")
    for a, b in zip(split["raw_model"].parameters(), half["raw_model"].parameters()):
        assert torch.equal(a, b)


def one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_bad_inputs_give_one_line_errors(tiny_data, run_copy, tmp_path, monkeypatch):
    """One end to end through a train.py process (the line on stderr, exit 1), the others in this process; more bad
    inputs are checked in-process in test_configurator.py and below."""
    one_line_error(train(tiny_data, tmp_path, "--no_such_key=3", check=False), "no_such_key")
    assert "prepare.py" in stops(monkeypatch, f"--data_dir={tmp_path / 'missing'}", f"--out_dir={tmp_path}")
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--n_head=5")
    assert "n_embd must be a multiple of n_head" in message
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume", "--n_layer=3")
    assert "n_layer" in message
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'nan'}", "--learning_rate=1e30",
                    "--warmup_iters=0", "--max_iters=20", "--grad_clip=0", "--eval_interval=100")
    assert "at step" in message


# -----------------------------------------------------------------------------
# nothing lost: every refusal is one line, before anything in out_dir changes (in this process where no real signal
# or second process is needed)

QUICK = ["--batch_size=4", "--eval_iters=1", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3"]


@pytest.fixture(scope="module")
def small_run(tiny_data, tmp_path_factory):
    """A 2-step run with its checkpoint at step 2; tests change copies of it (run_copy)."""
    out = tmp_path_factory.mktemp("small_run")
    with pytest.MonkeyPatch.context() as mp:
        run_train(mp, f"--data_dir={tiny_data}", f"--out_dir={out}", *QUICK, "--max_iters=2", "--eval_interval=2")
    return out


@pytest.fixture
def run_copy(small_run, tmp_path):
    return shutil.copytree(small_run, tmp_path / "run")


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def stops(monkeypatch, *args):
    """train.py in this process stops with one line 'error: ...': returns it."""
    with pytest.raises(SystemExit) as e:
        run_train(monkeypatch, *QUICK, *args)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_a_resume_on_another_dataset_stops_before_the_folder_changes(tiny_data, run_copy, tmp_path, monkeypatch):
    other = shutil.copytree(tiny_data, tmp_path / "other")  # another tokenizer's dataset: a larger vocabulary
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "vocab_size": 512}))
    before = snapshot(run_copy)
    message = stops(monkeypatch, f"--data_dir={other}", f"--out_dir={run_copy}", "--init_from=resume", "--max_iters=4")
    assert f"was trained on the dataset in {tiny_data} (a vocabulary of 400" in message
    assert f"resume with --data_dir={tiny_data}" in message
    assert snapshot(run_copy) == before  # its log, tokenizer and checkpoint as they were
    # the same data prepared again (only meta.json's creation time differs) is the same dataset
    (other / "meta.json").write_text(json.dumps({**meta, "created": "2000-01-01T00:00:00+00:00"}))
    run_train(monkeypatch, *QUICK, f"--data_dir={other}", f"--out_dir={run_copy}", "--init_from=resume",
              "--max_iters=3")
    assert torch.load(run_copy / "ckpt.pt", weights_only=True)["step"] == 3


def test_a_diverging_run_never_saves_non_finite_weights(tiny_data, run_copy, monkeypatch):
    # the evaluation at step 4 is not a logged step: the weights are checked there all the same
    before = (run_copy / "ckpt.pt").read_bytes()
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume",
                    "--learning_rate=1e38", "--warmup_iters=0", "--grad_clip=0", "--max_iters=6", "--eval_interval=4",
                    "--log_interval=100")
    assert "became non-finite at step 4" in message and f"{run_copy / 'ckpt.pt'} keeps step 2" in message
    assert (run_copy / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("bad, words", [
    ("--lr_schedule=cosin", "unknown lr_schedule 'cosin' (choose cosine, wsd)"),
    ("--sampler=epochs", "unknown sampler 'epochs' (choose random, epoch)"),
    ("--wandb_log=True", "wandb_log=True needs wandb: pip install wandb"),
    ("--batch_size=0", "batch_size=0 must be positive"),
    ("--gradient_accumulation_steps=-2", "gradient_accumulation_steps=-2 must be positive"),
    ("--eval_iters=0", "eval_iters=0 must be positive"),
    ("--eval_interval=-1", "eval_interval=-1 must be positive"),
    ("--log_interval=0", "log_interval=0 must be positive"),
    ("--target_bpb=-1.5", "target_bpb=-1.5 must not be negative"),
    ("--target_interval=-10", "target_interval=-10 must not be negative"),
    ("--seq_warmup=0.3 --seq_warmup_min=12", "seq_warmup_min=12 must be block_size=32 divided by a power of two"),
    ("--window_warmup=0.3", "window_warmup grows sliding windows: set attn_span='sliding'"),
    ("--batch_warmup=0.3", "batch_warmup needs 2, 4, 8... micro-steps per process, not 1"),
    ("--device=cuda", "no CUDA GPU that torch can use: use --device=cpu"),
    ("--dtype=fp16", "unknown dtype 'fp16' (choose auto, float32, bfloat16, float16)"),
    ("--dtype=float64", "unknown dtype 'float64' (choose auto, float32, bfloat16, float16)"),
    ("--n_layer=12", "trained with n_layer=2, but the config says n_layer=12"),  # the default's value, given
    ("--init_from=scratch", "holds a run (ckpt.pt): continue it with --init_from=resume, replace it with --overwrite"),
    ("--seed=-1", "seed=-1 must not be negative"),  # the samplers' generators refused it mid-run, in a traceback
    ("--eval_file=README.md", "eval_file is read by eval_only=True alone: add --eval_only=True"),  # else trained on
    # eval_only reads out_dir's checkpoint: it would score that one, not the folder
    ("--eval_only=True --init_from=hf:elsewhere", "eval_only=True evaluates the checkpoint in out_dir, not init_from"),
])
def test_bad_settings_stop_before_the_folder_changes(tiny_data, run_copy, monkeypatch, bad, words):
    if bad == "--wandb_log=True" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    if bad == "--device=cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    before = snapshot(run_copy)
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume",
                    "--max_iters=4", *bad.split())
    assert words in message, message
    assert snapshot(run_copy) == before


def test_a_resume_checks_the_warm_ups_against_the_checkpoints_model(tiny_data, run_copy, tmp_path, monkeypatch,
                                                                    one_thread):
    """A resume that leaves the model flags out takes the checkpoint's block_size, window and spans: the warm-ups are
    checked against those, not against the defaults."""
    monkeypatch.chdir(ROOT)
    resume = ["train.py", "--device=cpu", f"--data_dir={tiny_data}", *QUICK, "--init_from=resume", "--max_iters=4",
              "--eval_interval=100"]
    monkeypatch.setattr(sys, "argv", [*resume, f"--out_dir={run_copy}", "--seq_warmup=0.5"])  # block_size=32 there
    with pytest.raises(SystemExit, match=r"^error: seq_warmup_min=128 must be block_size=32 divided by a power of two"):
        runpy.run_path(os.path.join(ROOT, "train.py"))
    sliding = tmp_path / "sliding"  # a sliding model resumed with a window warm-up, attn_span left out
    run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={sliding}", *QUICK, "--attn_span=sliding",
              "--window=32", "--max_iters=2", "--eval_interval=2")
    monkeypatch.setattr(sys, "argv", [*resume, f"--out_dir={sliding}", "--window_warmup=0.5", "--window_warmup_min=8"])
    runpy.run_path(os.path.join(ROOT, "train.py"))
    assert torch.load(sliding / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_float16_resume_of_a_float32_run_starts_its_scaler_afresh(tiny_data, run_copy, monkeypatch, one_thread):
    """A run saved without float16 has an empty scaler state, which GradScaler refuses to load (a traceback)."""
    run_train(monkeypatch, *QUICK, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume",
              "--max_iters=3", "--dtype=float16")
    checkpoint = torch.load(run_copy / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["scaler"]["scale"] > 0


def test_a_wall_clock_budget_resumed_before_its_count_keeps_the_time_spent(tiny_data, run_copy, monkeypatch, capsys,
                                                                          one_thread):
    """A run killed before steps 3 to 12 fixed its count resumes to time them again: the training time its earlier
    starts spent comes off the budget, which would otherwise start whole again."""
    checkpoint = torch.load(run_copy / "ckpt.pt", weights_only=True)
    torch.save({**checkpoint, "train_seconds": 1000.0}, run_copy / "ckpt.pt")  # more than the budget's 3 s
    train_py = run_train(monkeypatch, *QUICK, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume",
                         "--train_minutes=0.05", "--eval_interval=1000", "--log_interval=1000")
    assert train_py["iter_num"] == 2 + 12 and ": 14 steps\n" in capsys.readouterr().out  # the timed steps, no more


def test_a_resumed_run_that_reached_its_target_stays_there(tiny_data, tmp_path, monkeypatch, one_thread):
    """The same command resumed after the run stopped at its target (e.g. interrupted before its last rows) ends at
    that step, as the run did, instead of training past it to the next check."""
    args = [f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TARGET_RUN, "--eval_interval=100", "--target_bpb=100",
            "--target_interval=2", "--max_iters=10"]
    run_train(monkeypatch, *args)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    finished = [r for r in read_log(tmp_path) if "params" not in r]
    train_py = run_train(monkeypatch, *args, "--init_from=resume")
    assert train_py["iter_num"] == 2 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert [r for r in read_log(tmp_path) if "params" not in r] == finished  # its rows again, the same


def test_a_fresh_run_into_a_run_replaces_it_only_when_asked(tiny_data, run_copy, tmp_path, monkeypatch):
    log_only = shutil.copytree(run_copy, tmp_path / "log_only")  # a run that stopped before its first checkpoint
    (log_only / "ckpt.pt").unlink()
    assert "holds the log.jsonl of a run that saved no checkpoint: replace it with --overwrite=True" in stops(
        monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={log_only}")
    old_id = read_log(run_copy)[0]["run_id"]
    run_train(monkeypatch, *QUICK, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--max_iters=1",
              "--eval_interval=5", "--overwrite=True")  # refused without --overwrite=True (the test above)
    rows = read_log(run_copy)
    assert rows[0]["run_id"] != old_id and {row["run_id"] for row in rows} == {rows[0]["run_id"]}
    assert torch.load(run_copy / "ckpt.pt", weights_only=True)["step"] == 1


def damage(folder, how):
    """Damage a copy of a dataset folder as a crash, a disk or a hand would."""
    meta = json.loads((folder / "meta.json").read_text())
    shard = folder / "train_000.bin"
    if how == "odd-sized shard":
        shard.write_bytes(shard.read_bytes() + b"\0")
    elif how == "empty shard":
        (folder / "val_000.bin").write_bytes(b"")
    elif how == "missing shard":
        shard.unlink()
    elif how == "missing tokenizer":
        (folder / "tokenizer.model").unlink()
    elif how == "invalid meta.json":
        (folder / "meta.json").write_text('{"vocab_size": 400,')
    elif how == "incomplete meta.json":
        del meta["splits"]["val"]["bytes"]
        (folder / "meta.json").write_text(json.dumps(meta))
    elif how == "token counts":
        meta["splits"]["train"]["tokens"] += 1
        (folder / "meta.json").write_text(json.dumps(meta))
    elif how == "eos_id beyond the vocabulary":
        meta["eos_id"] = 500
        (folder / "meta.json").write_text(json.dumps(meta))
    elif how == "no val bytes":
        meta["splits"]["val"]["bytes"] = 0
        (folder / "meta.json").write_text(json.dumps(meta))
    elif how == "id beyond the vocabulary":
        ids = np.fromfile(shard, dtype=np.uint16)
        ids[len(ids) // 2] = 4000
        ids.tofile(shard)


@pytest.mark.parametrize("how, words", [
    ("odd-sized shard", "train_000.bin holds 2 * N + 1 bytes, not a whole number of uint16 tokens"),
    ("empty shard", "val_000.bin is empty: the dataset is damaged; run prepare.py again"),
    ("missing shard", "train_000.bin is missing: the dataset is damaged; run prepare.py again"),
    ("missing tokenizer", "tokenizer.model, the tokenizer that meta.json names, is missing"),
    ("invalid meta.json", "meta.json is damaged (Expecting"),
    ("incomplete meta.json", "meta.json is incomplete or damaged (splits.val.bytes is None)"),
    ("token counts", "the train shards of"),
    ("eos_id beyond the vocabulary", "meta.json is damaged (eos_id 500, not an id of its vocabulary of 400)"),
    ("no val bytes", "meta.json is damaged (splits.val.bytes is 0, not positive)"),
    ("id beyond the vocabulary", "train_000.bin holds token id 4000, beyond the vocabulary of 400 in meta.json"),
])
def test_a_damaged_dataset_stops_before_training_and_before_out_dir_exists(tiny_data, tmp_path, monkeypatch, how,
                                                                              words):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    damage(data, how)
    if how == "odd-sized shard":
        words = words.replace("2 * N + 1", str((data / "train_000.bin").stat().st_size))
    message = stops(monkeypatch, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}")
    assert words in message, message
    assert not (tmp_path / "out").exists()


class FullDisk(io.FileIO):
    """A file on a disk that fills up after its first 1000 bytes."""
    def write(self, data):
        data, room = bytes(data), 1000 - self.tell()
        if len(data) > room:
            super().write(data[:max(0, room)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_stops_the_run_and_keeps_the_checkpoint(tiny_data, run_copy, monkeypatch):
    real_open = open
    monkeypatch.setattr(configurator, "open", lambda path, mode="r", *args, **kwargs: FullDisk(path, "w")
                        if ".tmp." in str(path) and "ckpt.pt" in str(path) else real_open(path, mode, *args, **kwargs),
                        raising=False)
    before = (run_copy / "ckpt.pt").read_bytes()
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume",
                    "--max_iters=3", "--eval_interval=3")
    assert message == f"error: could not write {run_copy / 'ckpt.pt'} (the disk is full); the previous file is kept"
    assert (run_copy / "ckpt.pt").read_bytes() == before and not list(run_copy.glob("*.tmp*"))


def test_a_partial_last_log_line_does_not_block_a_resume(tiny_data, run_copy, monkeypatch):
    with open(run_copy / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')  # a crash during an append
    run_train(monkeypatch, *QUICK, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume",
              "--max_iters=3")
    assert [row["step"] for row in read_log(run_copy) if "loss" in row] == [1, 2, 3]


def test_an_out_dir_that_cannot_be_written_stops_in_one_line(tiny_data, tmp_path, monkeypatch):
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    assert "a_file is a file, not a folder" in stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={taken}")
    assert taken.read_text() == "not a folder"
    read_only = tmp_path / "read_only"
    read_only.mkdir()  # tests run as root, whom chmod does not stop: the file system refuses instead
    real_open = open

    def refuse(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(read_only)) and set(mode) & set("wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(configurator, "open", refuse, raising=False)
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={read_only}")
    assert f"cannot write in {read_only} (Read-only file system)" in message
    assert not list(read_only.iterdir())


def test_other_kinds_of_misuse_stop_in_one_line(tiny_data, run_copy, tmp_path, monkeypatch):
    assert f"no log at {tmp_path / 'log.jsonl'} to plot" in stops(monkeypatch, f"--out_dir={tmp_path}", "--plot=True")
    nowhere = tmp_path / "nowhere"
    assert f"no checkpoint at {nowhere / 'ckpt.pt'} to resume" in stops(monkeypatch, f"--data_dir={tiny_data}",
                                                                        f"--out_dir={nowhere}", "--init_from=resume")
    assert not nowhere.exists()
    # epochs that make less than one step: the run would end at once, trained on nothing
    before = snapshot(run_copy)
    message = stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--init_from=resume",
                    "--epochs=0.001")
    assert re.search(r"epochs=0.001 of the \d+ training windows is less than one step of 4 windows: raise", message)
    assert snapshot(run_copy) == before
    # a grpo.py folder (its checkpoint's config has grpo.py's mode)
    grpo = shutil.copytree(run_copy, tmp_path / "grpo")
    checkpoint = torch.load(grpo / "ckpt.pt", weights_only=True)
    configurator.save_checkpoint(str(grpo / "ckpt.pt"),
                                 {**checkpoint, "config": {**checkpoint["config"], "mode": "grpo"}})
    assert "was written by grpo.py" in stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={grpo}",
                                             "--init_from=resume")
    # eval_only's inputs: a file that is not UTF-8, task lines that are not JSON or whose answer is not a choice
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    evaluate = [f"--data_dir={tiny_data}", f"--out_dir={run_copy}", "--eval_only=True"]
    assert f"eval_file {latin} line 1 is not UTF-8 text (byte 0xe9)" in stops(monkeypatch, *evaluate,
                                                                               f"--eval_file={latin}")
    tasks = tmp_path / "tasks.jsonl"
    for line, words in [('{"context": "a", "choices": ["b", "c"], "answer": 2}', "line 2: answer 2 is not the index"),
                        ('{"context": "a", "choices": ["b"', "line 2 is not JSON")]:
        tasks.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n' + line + "\n")
        assert f"{tasks} {words}" in stops(monkeypatch, *evaluate, f"--eval_tasks={tasks}")
    # a dataset of another tokenizer: its ids are not the ones the model learned
    other = shutil.copytree(tiny_data, tmp_path / "retokenized")
    with open(other / "tokenizer.model", "ab") as f:
        f.write(b"\0")
    assert "was trained with another tokenizer" in stops(monkeypatch, f"--data_dir={other}", *evaluate[1:])


@pytest.mark.parametrize("in_file, on_command_line, steps", [
    ("epochs=1", "--max_iters=2", 2), ("train_flops=1e+15", "--max_iters=3", 3),
    ("train_tokens=1000000", "--max_iters=2", 2), ("train_minutes=0.5", "--max_iters=2", 2),
    ("epochs=1", "--train_tokens=384", 3),  # 3 steps of 4 x 32 tokens
])
def test_a_step_count_on_the_command_line_wins_over_a_config_files_budget(tiny_data, tmp_path, monkeypatch, capsys,
                                                                          one_thread, in_file, on_command_line, steps):
    config_file = tmp_path / "budget.py"
    config_file.write_text(f"sampler = 'epoch'\n{in_file}\n")
    train_py = run_train(monkeypatch, str(config_file), f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}",
                         *QUICK, on_command_line, "--eval_interval=1000")
    assert f"{on_command_line} overrides {in_file} from {config_file}\n" in capsys.readouterr().out
    key = in_file.split("=")[0]
    assert train_py["max_iters"] == train_py["iter_num"] == steps and train_py["config"][key] == 0
    assert read_log(tmp_path / "out")[-1]["step"] == steps


def test_two_step_counts_on_the_command_line_stop_in_one_line(tiny_data, tmp_path, monkeypatch):
    assert stops(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--max_iters=2", "--epochs=1") == \
        "error: --max_iters=2 and --epochs=1 each set the number of steps: give one of them"
    assert "--train_flops=1e+15 and --train_minutes=2 each set" in stops(
        monkeypatch, f"--data_dir={tiny_data}", "--train_flops=1e15", "--train_minutes=2")
    assert not any(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# target_bpb: training until the exact val bits per byte reaches a value

TARGET_RUN = [*QUICK, "--lr_schedule=wsd", "--decay_frac=0.0"]  # the lr does not depend on max_iters


@pytest.fixture(scope="module")
def unreached(tiny_data, tmp_path_factory):
    """A 10-step run whose target is out of reach, checked every eval_interval = 5 steps: its folder and output."""
    out, capture, threads = tmp_path_factory.mktemp("unreached"), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread does
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdout", capture)
            run_train(mp, f"--data_dir={tiny_data}", f"--out_dir={out}", *TARGET_RUN, "--eval_interval=5",
                      "--target_bpb=0.01", "--max_iters=10")
    finally:
        torch.set_num_threads(threads)
    return out, capture.getvalue()


def test_an_unreachable_target_runs_to_max_iters_and_says_so(unreached):
    out, stdout = unreached
    rows = read_log(out)
    checks = {r["step"]: r["check_bpb"] for r in rows if "check_bpb" in r}
    assert list(checks) == [5, 10] and checks[5] > checks[10]  # every eval_interval, and at the last step
    seconds = torch.load(out / "ckpt.pt", weights_only=True)["train_seconds"]
    assert 0 < seconds == rows[-1]["train_seconds"]
    assert rows[-2]["exact_val_bpb"] == checks[10]  # the last check is the final evaluation
    assert {k: v for k, v in rows[-1].items() if k != "run_id"} == {
        "step": 10, "tokens": 1280, "target_bpb": 0.01, "target_reached": False, "best_bpb": checks[10],
        "train_seconds": seconds}
    assert (f"target_bpb=0.01 not reached in 10 steps: 1,280 tokens, {seconds:.1f} s of training steps; the best "
            f"exact val bits per byte was {checks[10]:.4f}\n") in stdout


def test_a_resumed_run_keeps_checking_its_target_and_counting_the_training_time(tiny_data, unreached, tmp_path,
                                                                                monkeypatch, capsys, one_thread):
    out = shutil.copytree(unreached[0], tmp_path / "run")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    counted = checkpoint["train_seconds"] + 1000  # the time counted so far is the checkpoint's, whatever it is
    checkpoint.update(train_seconds=counted, best_bpb=0.02)
    torch.save(checkpoint, out / "ckpt.pt")
    started = time.time()
    run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={out}", *TARGET_RUN, "--eval_interval=5",
              "--target_bpb=0.01", "--max_iters=20", "--init_from=resume")
    elapsed = time.time() - started
    rows = read_log(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    checks = [r for r in rows if "check_bpb" in r]
    assert [r["step"] for r in checks] == [5, 10, 15, 20]  # step 10's check was done before its checkpoint
    assert counted < checks[2]["train_seconds"] < checks[3]["train_seconds"] < counted + elapsed
    assert torch.load(out / "ckpt.pt", weights_only=True)["train_seconds"] == checks[3]["train_seconds"]
    assert rows[-1]["target_reached"] is False and rows[-1]["best_bpb"] == 0.02  # the checkpoint's best is kept
    assert "the best exact val bits per byte was 0.0200" in capsys.readouterr().out


def test_a_target_stops_the_run_at_the_first_check_at_or_below_it(tiny_data, unreached, tmp_path, monkeypatch,
                                                                  capsys, one_thread):
    """Between the unreached run's values at steps 5 and 10, checked every 5 steps: the same run stops at step 10,
    with its checkpoint there. Each exact evaluation takes 1000 s by the clock: neither ms/step nor the training
    time counts them."""
    import evaluate
    checks = {r["step"]: r["check_bpb"] for r in read_log(unreached[0]) if "check_bpb" in r}
    target = (checks[5] + checks[10]) / 2
    real_time, real_bpb, offset = time.time, evaluate.exact_bits_per_byte, [0.0]

    def slow_bpb(*args, **kwargs):
        offset[0] += 1000
        return real_bpb(*args, **kwargs)

    monkeypatch.setattr(evaluate, "exact_bits_per_byte", slow_bpb)
    monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])
    train_py = run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TARGET_RUN,
                         "--eval_interval=100", f"--target_bpb={target}", "--target_interval=5", "--max_iters=20")
    rows = read_log(tmp_path)
    assert train_py["iter_num"] == 10 and offset[0] == 2000  # two checks; the final evaluation is the last one's
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert min(r["tokens_per_s"] for r in rows if "loss" in r) > 128 / 100  # no step took 1000 s
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 10]  # evaluated and saved as at the end of a run
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    seconds = checkpoint["train_seconds"]
    assert checkpoint["step"] == 10 and 0 < seconds < 1000
    bpb = [r["check_bpb"] for r in rows if "check_bpb" in r]
    assert len(bpb) == 2 and abs(bpb[0] - checks[5]) < 1e-6 and abs(bpb[1] - checks[10]) < 1e-6
    assert {k: v for k, v in rows[-1].items() if k != "run_id"} == {
        "step": 10, "tokens": 1280, "target_bpb": target, "target_reached": True, "best_bpb": bpb[1],
        "train_seconds": seconds}
    assert (f"target_bpb={target:g} reached at step 10: 1,280 tokens, {seconds:.1f} s of training steps; exact val "
            f"bits per byte {bpb[1]:.4f}\n") in capsys.readouterr().out


def test_a_missing_dataset_names_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no dataset is
    for folder, command in [("data/pystdlib", "python prepare.py"),
                            ("data/gutenberg", "python prepare.py --dataset=gutenberg"),
                            ("data/tinystories/", "python prepare.py --dataset=tinystories"),
                            ("elsewhere/gutenberg", "python prepare.py --dataset=gutenberg --out_root=elsewhere"),
                            ("data/books", "python prepare.py --input=path/to/your/text --name=books"),
                            ("books", "python prepare.py --input=path/to/your/text --name=books --out_root=.")]:
        monkeypatch.setattr(sys, "argv", ["train.py", "--device=cpu", f"--data_dir={folder}"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "train.py"))
        assert str(e.value.code) == (f"error: no dataset in {folder} (meta.json missing): make it with `{command}`, "
                                     "or set --data_dir")


# -----------------------------------------------------------------------------
# real signals to real processes: Ctrl-C, and a second run on a folder in use

# wsd without its decay: the lr does not depend on max_iters, so that a run stopped early trains as the whole one
SIGINT_RUN = ["--batch_size=4", "--eval_iters=1", "--log_interval=1", "--eval_interval=1000", "--warmup_iters=2",
              "--learning_rate=3e-3", "--lr_schedule=wsd", "--decay_frac=0.0", "--dropout=0.1"]


def wait_for(path, text, process):
    while not (path.exists() and text in path.read_text()):
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)


def test_ctrl_c_saves_at_the_step_boundary_and_the_resume_continues_exactly(tiny_data, tmp_path, monkeypatch,
                                                                            one_thread):
    args = [f"--data_dir={tiny_data}", *SIGINT_RUN]

    def interrupt(out):
        process = subprocess.Popen([sys.executable, "train.py", *TINY[:5], *args, f"--out_dir={out}",
                                    "--max_iters=10000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wait_for(out / "log.jsonl", "params", process)  # it holds out_dir: a second run there stops (even asked to
        manifest = (out / "run.json").read_text()        # replace it), and changes nothing
        with pytest.raises(SystemExit, match=f"^error: {out} is in use by another run: wait for it to end"):
            run_train(monkeypatch, *args, f"--out_dir={out}", "--overwrite=True")
        assert (out / "run.json").read_text() == manifest
        wait_for(out / "log.jsonl", '"loss"', process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
        assert process.returncode == 130 and 1 <= step < 12
        assert stderr == f"interrupted at step {step}: saved {out / 'ckpt.pt'}; resume with --init_from=resume\n"
        assert [row["step"] for row in read_log(out) if "loss" in row][-1] == step

    assert_resume_reproduces(lambda out, *more: run_train(monkeypatch, *args, f"--out_dir={out}", *more), tmp_path,
                             12, interrupt)


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    torchrun = subprocess.Popen(  # in a session of its own: Ctrl-C signals the whole group, as a terminal does
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY[:5],
         f"--data_dir={tiny_data}", *SIGINT_RUN, "--gradient_accumulation_steps=2", f"--out_dir={out}",
         "--max_iters=10000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    wait_for(out / "log.jsonl", '"loss"', torchrun)
    os.killpg(torchrun.pid, signal.SIGINT)
    _, stderr = torchrun.communicate(timeout=60)
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    step = checkpoint["step"]
    assert len(checkpoint["rng"]) == 2  # both ranks took part in the save: they stopped at the same step
    assert stderr.count(f"interrupted at step {step}: saved {out / 'ckpt.pt'}; resume with --init_from=resume") == 1
    assert 'train.py", line' not in stderr  # no traceback of a rank (torchrun prints its own, being signalled too)
    assert [row["step"] for row in read_log(out) if "loss" in row] == list(range(1, step + 1))
