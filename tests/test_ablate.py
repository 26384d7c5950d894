"""Fixed-compute accounting and ablations: FLOPs by hand, budgets, the sweep runner, the task scorer."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, read_log, run_stage, run_train
from model import GPT, GPTConfig

TINY = "--device=cpu --n_layer=2 --n_embd=32 --n_head=4 --block_size=32 --batch_size=4 --eval_iters=2 --log_interval=2"


def test_dense_flops_per_token_equal_a_hand_count():
    c = GPTConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=100, block_size=16, mlp_hidden=96)
    d, T = 64, 16
    per_layer = 4 * d * d + 3 * d * 96  # q, k, v, output projection; gate, up, down
    matmul = 3 * per_layer + 100 * d  # + the output head
    attention = 3 * 2 * 4 * (16 + 16) * (T + 1) / 2  # per layer: 2 FLOPs x heads x (qk + v dims) x mean keys
    assert GPT(c).flops_per_token(T) == 3 * (2 * matmul + attention)


def test_moe_active_flops_scale_with_topk_not_with_experts():
    def flops(**moe):
        with torch.device("meta"):
            model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=16, moe_hidden=16, **moe))
        return model.flops_breakdown()
    base = flops(n_experts=4, moe_topk=1)
    expert = 3 * 2 * 3 * 32 * 16 * 2  # one more expert per token: 3 matrices in each of 2 layers
    for moe, extra in [(dict(n_experts=16, moe_topk=1), 3 * 2 * 2 * 32 * (16 - 4)),  # only the 2 routers grow
                       (dict(n_experts=4, moe_topk=2), expert)]:
        parts = flops(**moe)
        assert parts["moe"] - base["moe"] == extra and {**parts, "moe": 0} == {**base, "moe": 0}  # the MoE part alone


def test_flops_budget_sets_the_steps_within_one_percent(tiny_data, tmp_path, monkeypatch, one_thread):
    budget = 2.3e9  # about 61 steps of 128 tokens
    run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TINY.split(), f"--train_flops={budget}",
              "--eval_interval=1000")
    rows = read_log(tmp_path)
    head, final = rows[0], rows[-1]
    assert abs(final["tokens"] * head["flops_per_token"] - budget) / budget < 0.01


def test_wall_clock_budget_times_the_first_steps_then_fixes_the_count(tiny_data, tmp_path, monkeypatch, capsys,
                                                                     one_thread):
    """In this process (a new one costs seconds of imports), on one thread as a stage's process would be."""
    run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TINY.split(), "--train_minutes=0.05",
              "--eval_interval=1000", "--warmup_iters=2")
    stdout = capsys.readouterr().out
    steps = int(stdout.split("ms/step: ")[1].split()[0])  # '... 0.05 min at 9 ms/step: 270 steps'
    assert steps > 12 and [r for r in read_log(tmp_path) if "exact_val_bpb" in r][0]["step"] == steps
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["timed_max_iters"] == steps  # what a resume keeps
    seconds = float(stdout.split(" tokens in ")[1].split()[0])  # the steps, the first and last evaluations
    assert 0.5 * 3 < seconds < 3 * 3, seconds


def test_sweep_runs_tabulates_and_resumes_without_redoing_finished_runs(tiny_data, tmp_path, warm_python):
    """ablate.py and its train.py runs in warm processes (a fresh one spends seconds importing): each run still a
    process of its own, started by ablate.py."""
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f"""
out_dir = {str(tmp_path / 'out')!r}
runs = ["narrow: --n_embd=16", "base: ", "deep: --n_layer=3"]
common = "--data_dir={tiny_data} {TINY} --eval_interval=4"
train_tokens = 1280
seeds = [1]
repeat_best = 1
repeat_seeds = [2]
parallel = 2
""")
    run_stage("ablate.py", str(sweep), warm=warm_python)
    out = tmp_path / "out"
    # every run once; the first run and the best of the others again with seed 2
    finished = sorted(p for p in os.listdir(out) if (out / p).is_dir() and any("exact_val_bpb" in r for r in read_log(out / p)))
    bpb = {p: next(r["exact_val_bpb"] for r in read_log(out / p) if "exact_val_bpb" in r) for p in finished}
    best = min(("base", "deep"), key=lambda label: bpb[f"{label}-s1"])
    assert finished == sorted(["narrow-s1", "base-s1", "deep-s1", "narrow-s2", f"{best}-s2"])
    shapes = {p: json.loads((out / p / "run.json").read_text())["config"] for p in ("narrow-s1", "deep-s1", "base-s1")}
    # a run's own settings win over common's (n_embd=32, n_layer=2)
    assert [(c["n_embd"], c["n_layer"]) for c in shapes.values()] == [(16, 2), (32, 3), (32, 2)]
    table = (out / "results.md").read_text()
    for label in ("narrow", "base", "deep"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert f"{bpb[f'{label}-s1']:.4f}" in row or label in ("narrow", best)  # two seeds: their mean
        assert "1,280" in row
    narrow = next(line for line in table.splitlines() if line.startswith("| narrow |"))
    mean = (bpb["narrow-s1"] + bpb["narrow-s2"]) / 2
    assert f"{mean:.4f} ± " in narrow and "(2 seeds)" in narrow
    assert (out / "val.png").exists()
    # interrupt: one run lost its final evaluation; running the sweep again redoes only that one (and another run's
    # log ends in a line cut short by a crash mid-append, which is left out)
    log = out / "deep-s1" / "log.jsonl"
    log.write_text("".join(line for line in log.read_text().splitlines(True) if "exact_val_bpb" not in line))
    with open(out / "narrow-s1" / "log.jsonl", "a") as f:
        f.write('{"step": 10, "lo')
    commands = {p: (out / p / "train.log").read_text().count("train.py") for p in finished}
    run_stage("ablate.py", str(sweep), warm=warm_python)
    for p in finished:
        assert (out / p / "train.log").read_text().count("train.py") == commands[p] + (p == "deep-s1")
    # another budget: the finished runs trained with the old one, and the table would show them under the new one
    other = run_stage("ablate.py", str(sweep), "--train_tokens=2560", check=False, warm=warm_python)
    assert other.returncode == 1 and "finished a run of other arguments than this sweep gives it" in other.stderr


def test_a_choice_longer_than_the_window_scores_every_target_it_keeps():
    from evaluate import batch_of
    x, y = batch_of([list(range(9)), [5, 6, 7]], 8, scored=[10, 1])  # the first row: the last 9 ids of a long choice
    assert y.tolist() == [list(range(1, 9)), [-1, 7] + [-1] * 6] and x[1].tolist() == [5, 6] + [0] * 6


def test_task_scorer_picks_the_most_likely_choice(tiny_data, tmp_path, monkeypatch, capsys):
    """Both runs of train.py in this process (a new one costs seconds of imports)."""
    run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", *TINY.split(), "--max_iters=2",
              "--eval_interval=1000")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    from tokenizer import Tokenizer
    tokenizer = Tokenizer.load(str(tmp_path / "tokenizer.model"))
    choices = [" reads 3 books.", " sorts 5 lines.", " keeps 9 files.", " counts 2 words."]

    def loglik(context, choice):  # the planted answer: the model's own most likely choice, scored by hand
        ids = [checkpoint["eos_id"]] + tokenizer.encode(context) + tokenizer.encode(choice)
        n = len(tokenizer.encode(choice))
        logits = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0][0]
        return logits.log_softmax(-1)[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum().item()
    tasks = []
    for context in ("alice", "bob writes 4", "def f(n):"):
        scores = [loglik(context, c) for c in choices]
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        tasks.append({"context": context, "choices": choices, "answer": best})
        tasks.append({"context": context, "choices": choices, "answer": worst})
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # eval_only's end: raise SystemExit, status 0
        run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--eval_only=True",
                  f"--eval_tasks={path}")
    assert stop.value.code is None
    assert f"{path}: accuracy 0.5000" in capsys.readouterr().out  # right on the 3 planted best, wrong on the 3 worst


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_sweep_stops_its_runs_at_a_checkpoint(tiny_data, tmp_path, stop):
    """SIGTERM: ablate.py passes a Ctrl-C on to its runs and waits for them; SIGKILL (the OOM killer, timeout -s KILL):
    the kernel sends it (Linux). Either way each run saves a checkpoint and stops."""
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f"""
out_dir = {str(tmp_path / 'out')!r}
runs = ["long: --data_dir={tiny_data} {TINY} --eval_interval=1000"]
train_tokens = 10_000_000
""")
    ablate = subprocess.Popen([sys.executable, "ablate.py", str(sweep)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "out" / "long-s1337" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and '"tokens_per_s":' in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)  # until the run is training
    assert log.exists(), "the run never started"

    def runs_alive():  # train.py processes of this sweep (Linux /proc)
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(tmp_path).encode() in f.read() and pid != str(ablate.pid):
                        alive.append(pid)
            except OSError:
                pass
        return alive

    assert runs_alive()
    ablate.send_signal(stop)
    assert ablate.wait(timeout=30) != 0
    deadline = time.time() + 30
    while runs_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not runs_alive()
    assert "interrupted at step" in (log.parent / "train.log").read_text()
    assert torch.load(log.parent / "ckpt.pt", weights_only=True)["step"] > 0


def test_a_sweep_whose_runs_all_fail_exits_1_naming_them(tiny_data, tmp_path, warm_python):
    """A typo'd key, and a run folder that another writer holds (a run that outlived a killed sweep): neither run
    starts, the previous table stays, and ablate.py exits 1 naming both and their logs. (In warm processes: a fresh
    one spends seconds importing.)"""
    out = tmp_path / "out"
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f"""
out_dir = {str(out)!r}
runs = ["typo: --n_layers=3", "held: "]
common = "--data_dir={tiny_data} {TINY}"
train_tokens = 1280
seeds = [1]
parallel = 2
""")
    (out / "held-s1").mkdir(parents=True)
    (out / "results.md").write_text("the previous table\n")
    with open(out / "held-s1" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_stage("ablate.py", str(sweep), check=False, warm=warm_python)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: 2 of 2 runs failed: typo-s1, held-s1; see "
                                                      f"{out / '<run>' / 'train.log'}")
    assert "unknown config key 'n_layers'" in (out / "typo-s1" / "train.log").read_text()
    assert "is in use by another run" in (out / "held-s1" / "train.log").read_text()
    assert (out / "results.md").read_text() == "the previous table\n"
    assert not (out / "held-s1" / "log.jsonl").exists()


def test_a_seed_in_seeds_and_in_repeat_seeds_counts_once(tmp_path):
    """seeds = [1, 2] with repeat_seeds = [2]: the table's mean is over the two runs, not three."""
    for seed, bpb in ((1, 1.0), (2, 2.0)):
        (tmp_path / f"a-s{seed}").mkdir()
        (tmp_path / f"a-s{seed}" / "log.jsonl").write_text(
            '{"step": 0, "params": 1000, "active_params": 1000, "flops_per_token": 6000, "tokens_per_step": 10, '
            f'"max_iters": 1, "device": "cpu"}}\n{{"step": 1, "tokens": 10, "exact_val_bpb": {bpb}}}\n')
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f'out_dir = {str(tmp_path)!r}\nruns = ["a: "]\nseeds = [1, 2]\nrepeat_best = 0\n'
                     'repeat_seeds = [2]\n')
    result = run_stage("ablate.py", str(sweep), "--report_only=True")
    assert "1.5000 ± " in result.stdout and "(2 seeds)" in result.stdout, result.stdout


def finished_log(folder, bpb):
    """A finished run's log.jsonl, as train.py writes it: its head row and its final exact val bits per byte."""
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text(
        '{"step": 0, "params": 1000, "active_params": 1000, "flops_per_token": 6000, "tokens_per_step": 10, '
        f'"max_iters": 1, "device": "cpu"}}\n{{"step": 1, "tokens": 10, "exact_val_bpb": {bpb}}}\n')


def test_a_finished_run_is_checked_against_the_start_that_finished_it(tmp_path, warm_python):
    """A run that failed on a typo, then ran to the end once the sweep was fixed: its train.log's first command is
    the typo's, its last the one that trained, and the sweep run again takes the run as finished."""
    out = tmp_path / "out"
    finished_log(out / "a-s1", 1.0)
    start = f"{sys.executable} train.py {{}} --seed=1 --out_dir={out / 'a-s1'} --overwrite=True\n"
    (out / "a-s1" / "train.log").write_text(start.format("--n_layers=3")
                                            + "error: unknown config key 'n_layers' (from the command line)\n"
                                            + start.format("--n_layer=3") + "step 0: train loss 4.1\n")
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f'out_dir = {str(out)!r}\nruns = ["a: --n_layer=3"]\nseeds = [1]\n')
    result = run_stage("ablate.py", str(sweep), check=False, warm=warm_python)
    assert result.returncode == 0, result.stderr
    assert "| a | " in (out / "results.md").read_text()
    sweep.write_text(f'out_dir = {str(out)!r}\nruns = ["a: --n_layer=4"]\nseeds = [1]\n')  # other settings: refused
    result = run_stage("ablate.py", str(sweep), check=False, warm=warm_python)
    assert result.returncode == 1 and "finished a run of other arguments" in result.stderr


def test_repeat_best_ranks_the_runs_by_their_first_seeds_alone(tmp_path, warm_python):
    """A resumed sweep whose repeat of 'a' finished (a worse seed) repeats 'a' again, as the uninterrupted sweep did,
    not 'b', which now ranks above a's mean of two seeds. b would fail at once (a typo'd key) if it were started."""
    out = tmp_path / "out"
    for run, bpb in (("first-s1", 1.0), ("a-s1", 1.1), ("b-s1", 1.2), ("first-s2", 1.0), ("a-s2", 2.0)):
        finished_log(out / run, bpb)
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f'out_dir = {str(out)!r}\nruns = ["first: ", "a: ", "b: --n_layers=3"]\nseeds = [1]\n'
                     'repeat_best = 1\nrepeat_seeds = [2]\n')
    result = run_stage("ablate.py", str(sweep), check=False, warm=warm_python)
    assert result.returncode == 0, result.stderr
    assert not (out / "b-s2").exists()


def test_a_seed_listed_twice_is_one_run(tmp_path, warm_python):
    """seeds = [1, 1]: one train.py process (two would contend for one folder), and the failure named once."""
    out = tmp_path / "out"
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f'out_dir = {str(out)!r}\nruns = ["typo: --n_layers=3"]\nseeds = [1, 1]\n')
    result = run_stage("ablate.py", str(sweep), check=False, warm=warm_python)
    assert result.stderr.strip().splitlines()[-1] == (f"error: 1 of 1 runs failed: typo-s1; see "
                                                      f"{out / '<run>' / 'train.log'}")
    assert (out / "typo-s1" / "train.log").read_text().count(" train.py ") == 1


@pytest.mark.parametrize("bad, words", [
    (["--train_flops=1e9", "--train_tokens=1000"], "train_flops and train_tokens each set every run's budget"),
    (["--train_tokens=-1000"], "train_tokens=-1000 must not be negative"),
    (["--repeat_best=-1"], "repeat_best=-1 must not be negative")])
def test_bad_budgets_stop_before_any_run_starts(tmp_path, monkeypatch, bad, words):
    """In this process: ablate.py stops while it reads its settings (two budgets: the table would name the first
    alone; a negative one would fail every run, one after another)."""
    import runpy
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f'out_dir = {str(tmp_path / "out")!r}\nruns = ["a: --n_layers=3"]\n')
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["ablate.py", str(sweep), *bad])
    with pytest.raises(SystemExit) as e:
        runpy.run_path("ablate.py")
    assert str(e.value.code).startswith("error: ") and words in str(e.value.code), e.value.code
    assert not (tmp_path / "out").exists()
