"""
Fixed-compute ablations: one train.py process per (run, seed), every run at the same budget, then a table.

    python ablate.py config/sweep_gutenberg.py                 # the variants at equal training FLOPs
    python ablate.py config/sweep_gutenberg.py --parallel=3    # three runs at a time on one GPU
    python ablate.py config/sweep_gutenberg.py --gpus=0,1      # split the runs over two GPUs

A sweep is a list of runs, each a label and train.py's command-line arguments; ablate.py adds the budget
(--train_flops, --train_tokens or --train_minutes: train.py picks the number of steps from it), the seed and the
out_dir <out_dir>/<label>-s<seed>. A run whose log.jsonl already holds its final exact val bits per byte is not run
again, so an interrupted sweep continues where it stopped (an unfinished run resumes from its checkpoint), on
this machine or on another one that has the sweep's out_dir. The results, <out_dir>/results.md and val.png, are
made from the runs' log.jsonl files alone; a run that failed is named, with its train.log, and ablate.py exits 1.

Stopping ablate.py (Ctrl-C, a kill, a time limit, on Linux even SIGKILL) sends each run a SIGINT: it saves a
checkpoint at the end of its step and stops. A run that outlives it all the same holds its out_dir's lock, so that
the sweep run again cannot start a second writer there.
"""
import ctypes
import math
import os
import re
import signal
import subprocess
import sys
import time

from configurator import atomic_write, check_settings, fail, lock_folder, parse_config, read_log, save_plot

# -----------------------------------------------------------------------------
# defaults
out_dir = "out/sweep"         # every run's folder, results.md and val.png go here
runs = []                     # "label: train.py arguments", e.g. "muon: config/gutenberg_small.py --optimizer=muon"
common = ""                   # arguments added to every run (e.g. "--compile=True --eval_interval=100")
train_flops = 0.0             # the budget of every run in training FLOPs (equal compute) ...
train_tokens = 0              # ... or in tokens (equal data) ...
train_minutes = 0.0           # ... or in minutes of training steps (equal wall time); none: each run's own max_iters
seeds = [1337]                # every run, once per seed
repeat_best = 0               # then run the first run and the best repeat_best others again ...
repeat_seeds = [1338]         # ... with these seeds, so that the table shows the noise between seeds
parallel = 1                  # runs at once per GPU (small models share one well), or CPU processes at once
gpus = ""                     # GPU ids to split the runs over, e.g. "0,1" (CUDA_VISIBLE_DEVICES per run)
report_only = False           # only rewrite results.md and val.png from the logs
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}
config = parse_config(defaults, sys.argv[1:])
# before any run starts: a negative budget would fail every run, one at a time; repeat_best=-1 would repeat all but one
check_settings(config, non_negative=("train_flops", "train_tokens", "train_minutes", "repeat_best"))
given_budgets = [key for key in ("train_flops", "train_tokens", "train_minutes") if config[key]]
if len(given_budgets) > 1:  # as train.py refuses two step counts: the table would name only the first
    fail(f"{' and '.join(given_budgets)} each set every run's budget: give one of them")
globals().update(config)
# a seed listed twice is one run: two processes of it would share (and contend for) its folder
seeds, repeat_seeds = list(dict.fromkeys(seeds)), list(dict.fromkeys(repeat_seeds))

sweep = os.path.basename(os.path.normpath(out_dir))
jobs = {}  # label -> train.py arguments
for run in runs:
    label, sep, args = run.partition(":")
    if not sep or not re.fullmatch(r"[\w.+-]+", label.strip()) or label.strip() in jobs:
        fail(f"each run must be 'label: train.py arguments' with a label of its own (letters, digits, _.+-), got {run!r}")
    words = common.split() + args.split()  # config files first, then flags: of a key set twice, the run's own wins
    jobs[label.strip()] = [w for w in words if not w.startswith("--")] + [w for w in words if w.startswith("--")]
if not jobs:
    fail("no runs: set runs = ['label: config/x.py --key=value', ...] in a sweep config")
if parallel < 1:
    fail(f"parallel={parallel} must be at least 1 (runs at once per GPU)")
budget = ([f"--train_flops={train_flops}"] if train_flops else [f"--train_tokens={train_tokens}"] if train_tokens
          else [f"--train_minutes={train_minutes}"] if train_minutes else [])


def run_dir(label, seed):
    return os.path.join(out_dir, f"{label}-s{seed}")


def run_log(label, seed):
    try:  # a last line cut short by a crash is left out; a damaged one stops the sweep, naming it
        return read_log(os.path.join(run_dir(label, seed), "log.jsonl"))
    except ValueError as e:
        fail(str(e))


def finished(label, seed):
    return any("exact_val_bpb" in row for row in run_log(label, seed))


def arguments(label, seed):
    """train.py's arguments for a run, but for how it starts (fresh or resumed)."""
    return [*jobs[label], *budget, f"--seed={seed}", f"--out_dir={run_dir(label, seed)}"]


def check_finished(label, seed):
    """A finished run is not run again: it must be the one this sweep asks for (its first line in train.log), or
    the table would show it under a budget or settings it did not train with."""
    path = os.path.join(run_dir(label, seed), "train.log")
    if not os.path.isfile(path):  # not a run of ablate.py's
        return
    with open(path) as f:  # ablate.py's command lines, each ending in how it started, among train.py's output
        commands = [line.split(" train.py ", 1)[1].split()[:-1] for line in f
                    if " train.py " in line and line.split()[-1] in ("--init_from=resume", "--overwrite=True")]
    # the last start is the one that finished: an earlier one may have failed on settings the sweep has since fixed
    started = commands[-1] if commands else []
    if started != arguments(label, seed):
        fail(f"{run_dir(label, seed)} finished a run of other arguments than this sweep gives it ({' '.join(started)}"
             f"): give its settings back, or choose another out_dir")


SWEEP_PID = os.getpid()
try:
    PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: a run outlives a SIGKILL of the sweep (its lock still holds)
    PRCTL = None


def start_run():
    """preexec_fn of every run: a process group of its own, so that a Ctrl-C reaches it once (through ablate.py), and
    on Linux a SIGINT from the kernel when ablate.py dies, even of a SIGKILL (prctl PR_SET_PDEATHSIG)."""
    os.setpgid(0, 0)
    if PRCTL is not None:
        PRCTL(1, int(signal.SIGINT))  # 1: PR_SET_PDEATHSIG
        if os.getppid() != SWEEP_PID:  # ablate.py died before that
            os._exit(1)


def run_all(pairs):
    """Run train.py for each (label, seed) not finished yet, up to parallel x GPUs at a time."""
    from tqdm import tqdm
    todo = [(label, seed) for label, seed in pairs if not finished(label, seed)]
    for label, seed in set(pairs) - set(todo):
        check_finished(label, seed)
    devices = gpus.split(",") if gpus else [None]
    slots = [device for device in devices for _ in range(parallel)]
    running = {}  # slot index -> (process, label, seed)
    bar = tqdm(total=len(todo), desc=f"{sweep}: runs", unit="run")
    try:
        while todo or running:
            for slot, device in enumerate(slots):
                if slot not in running and todo:
                    label, seed = todo.pop(0)
                    folder = run_dir(label, seed)
                    os.makedirs(folder, exist_ok=True)
                    # a run continues from its checkpoint; one that saved none starts over
                    saved = os.path.exists(os.path.join(folder, "ckpt.pt"))
                    resume = ["--init_from=resume"] if saved else ["--overwrite=True"]
                    command = [sys.executable, "train.py", *arguments(label, seed), *resume]
                    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": device} if device is not None else {}))
                    with open(os.path.join(folder, "train.log"), "a") as log:
                        log.write(" ".join(command) + "\n")
                        log.flush()
                        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   preexec_fn=start_run)
                    running[slot] = (process, label, seed)
            time.sleep(0.2)
            for slot, (process, label, seed) in list(running.items()):
                if process.poll() is not None:
                    del running[slot]
                    bar.update()
                    if process.returncode != 0:
                        tqdm.write(f"{label} seed {seed} failed (exit {process.returncode}): "
                                   f"see {os.path.join(run_dir(label, seed), 'train.log')}")
    finally:  # stopped (Ctrl-C, a kill, a time limit): each run saves a checkpoint, stops, and resumes next time
        for process, _, _ in running.values():
            process.send_signal(signal.SIGINT)
        for process, _, _ in running.values():
            process.wait()
    bar.close()


def summarize(label, of_seeds=None):
    """One table row for a run: its seeds' (of_seeds': default, seeds and repeat_seeds) final exact val bits per
    byte, and their mean figures."""
    logs = [rows for seed in dict.fromkeys(of_seeds or seeds + repeat_seeds)  # a seed in both lists counts once
            if (rows := run_log(label, seed)) and finished(label, seed)]
    if not logs:
        return None
    head = next(row for row in logs[0] if "params" in row)
    final = [next(row for row in rows if "exact_val_bpb" in row) for rows in logs]
    # the first logged steps of each run include compiling
    speed = [row for rows in logs for row in [r for r in rows if "tokens_per_s" in r][1:]]
    bpb = [row["exact_val_bpb"] for row in final]
    mean = sum(bpb) / len(bpb)
    std = math.sqrt(sum((b - mean) ** 2 for b in bpb) / (len(bpb) - 1)) if len(bpb) > 1 else None
    return {"label": label, "params": head["params"], "active_params": head["active_params"],
            "flops": final[0]["tokens"] * head["flops_per_token"], "tokens": final[0]["tokens"], "bpb": mean, "std": std,
            "seeds": len(bpb), "tokens_per_s": sum(r["tokens_per_s"] for r in speed) / max(1, len(speed)),
            "mfu": sum(r["mfu"] for r in speed) / max(1, len(speed)), "device": head["device"],
            "peak_mem_gib": max((r.get("peak_mem_gib", 0.0) for rows in logs for r in rows), default=0.0)}


def write_results():
    """results.md and val.png of the finished runs (none: the previous ones stay); returns the table's rows."""
    rows = [row for label in jobs if (row := summarize(label))]
    if not rows:
        return rows
    per_run = (f"{train_flops:.3g} training FLOPs" if train_flops else f"{train_tokens:,} tokens" if train_tokens
               else f"{train_minutes} minutes of steps" if train_minutes else "each run its own")
    lines = [f"# {sweep}", "",
             f"Budget: {per_run} per run; device: {', '.join(sorted({row['device'] for row in rows}))}.", "",
             "| run | params (total / active) | training FLOPs | tokens | exact val bits per byte | tokens/s | MFU | peak memory |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["bpb"]):
        bpb = f"{r['bpb']:.4f}" + (f" ± {r['std']:.4f} ({r['seeds']} seeds)" if r["std"] is not None else "")
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"  # a run too short to log after compiling
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"  # no known peak (CPU)
        memory = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] else "-"  # measured on CUDA only
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M | {r['flops']:.3g} | "
                     f"{r['tokens']:,} | {bpb} | {speed} | {mfu} | {memory} |")
    table = "\n".join(lines) + "\n"
    atomic_write(os.path.join(out_dir, "results.md"), lambda f: f.write(table.encode()))
    print("\n".join(lines))
    plot_curves()
    return rows


def plot_curves():
    """<out_dir>/val.png: each run's val loss (first seed) against training FLOPs spent."""
    lines = []
    for i, label in enumerate(jobs):
        rows = next((rows for seed in seeds if (rows := run_log(label, seed))), [])
        head = next((row for row in rows if "params" in row), None)
        # from the first evaluation after training began: the untrained model's loss (the same for all) would
        # squeeze the differences that matter into the bottom of the plot
        points = [(row["tokens"] * head["flops_per_token"], row["val_loss"]) for row in rows
                  if "val_loss" in row and row["tokens"] > 0] if head else []
        # the default cycle has 10 colours: dashed lines after them
        lines.append((label, points, {"marker": "o", "linestyle": "-" if i < 10 else "--"}))
    save_plot(os.path.join(out_dir, "val.png"), sweep, [("training FLOPs", "val loss (nats/token)", lines)])


for stop in (signal.SIGINT, signal.SIGTERM):  # runs the finally above too
    signal.signal(stop, lambda signum, _: sys.exit(f"ablate.py: stopped by {signal.Signals(signum).name}; the same "
                                                   "command continues the sweep"))
started = []
if not report_only:
    try:  # one sweep at a time in out_dir (each run locks its own folder too)
        lock_folder(out_dir)
    except (ValueError, OSError) as e:
        fail(str(e))
    started = [(label, seed) for seed in seeds for label in jobs]
    run_all(started)
    if repeat_best:
        first, *others = jobs
        # ranked by seeds' runs alone: with the repeats a resumed sweep has finished, it could pick other runs
        scores = {label: row["bpb"] for label in others if (row := summarize(label, seeds))}
        best = sorted(scores, key=scores.get)
        again = [(label, seed) for seed in repeat_seeds for label in [first, *best[:repeat_best]]]
        run_all(again)
        started = list(dict.fromkeys(started + again))  # a seed in seeds and repeat_seeds: one run, counted once
try:
    rows = write_results()
except OSError as e:
    fail(str(e))
failed = [f"{label}-s{seed}" for label, seed in started if not finished(label, seed)]
if failed:
    fail(f"{len(failed)} of {len(started)} runs failed: {', '.join(failed)}; "
         f"see {os.path.join(out_dir, '<run>', 'train.log')}")
if not rows:
    fail(f"no run in {out_dir} has finished: nothing to report")
