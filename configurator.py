"""
Plumbing shared by every stage: configuration, device and precision, checkpoints and what lies beside them.

Configuration works like nanoGPT's: each stage keeps its defaults as plain module-level
assignments, then calls

    config = parse_config(defaults, sys.argv[1:])

Positional arguments are config files (plain Python files of assignments, e.g. config/quickstart.py),
applied in order; `--key=value` arguments override them. A key the stage does not know, or a value
whose type does not match the default's, stops the program with a one-line error naming the key.
"""
import ast
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from contextlib import nullcontext

import torch
import torch.distributed as dist


def fail(message):
    """Stop with a one-line error (SystemExit prints it to stderr and exits with status 1)."""
    raise SystemExit(f"error: {message}")


def _check_type(key, value, default):
    """Return value converted to the default's type, or stop naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, type(default)):
        return value
    fail(f"config key '{key}' expects {type(default).__name__}, got {type(value).__name__} {value!r}")


def _parse_value(raw, default):
    """A command-line string becomes a Python value: strings stay raw, everything else is a literal."""
    if isinstance(default, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: the type check reports it


def parse_config(defaults, argv, other_stage_keys_in_files=False):
    """
    Apply config files and --key=value overrides to a dict of defaults; returns the new dict.
    other_stage_keys_in_files: a stage that reads another stage's config files (bench.py reads train.py's)
    skips the keys it does not know in those files; on its command line they still stop it.
    """
    config = dict(defaults)

    def update(key, value, source):
        if key not in defaults:
            if other_stage_keys_in_files and source != "the command line":
                return
            fail(f"unknown config key '{key}' (from {source})")
        config[key] = _check_type(key, value, defaults[key])

    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:  # a bare --flag switches a boolean on
                if not isinstance(defaults.get(key), bool):
                    fail(f"config key '{key}' needs a value: --{key}=...")
                raw = "True"
            update(key, _parse_value(raw, defaults.get(key)), "the command line")
        else:
            if not os.path.isfile(arg):
                fail(f"config file {arg} not found")
            namespace = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    update(key, value, arg)
    return config


# -----------------------------------------------------------------------------
# device and precision

def pick_device(device="auto"):
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    return device


def init_processes(device):
    """
    Under torchrun (RANK set): join the process group (NCCL on GPUs, gloo on CPUs) and take this process's GPU.
    Returns (ddp, rank, world_size, device); one process alone gets (False, 0, 1, device).
    """
    if "RANK" not in os.environ:
        return False, 0, 1, device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def pick_dtype(device, dtype="auto"):
    """bf16 where the GPU has it, fp16 on older GPUs (train.py then adds a GradScaler), fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def nominal_peak_flops(device):
    """Dense bf16 tensor-core peak from the data sheets, for MFU; 0 where unknown (CPUs, other GPUs)."""
    if not device.startswith("cuda"):
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in {"H100": 989e12, "H200": 989e12, "A100": 312e12}.items() if gpu in name), 0.0)


def autocast(device, dtype):
    """The autocast context for a device and dtype name; a no-op in fp32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# checkpoints: only tensors and plain Python values, so they load with weights_only=True

CHECKPOINT_FORMAT = "nanollm-1"


def save_checkpoint(path, checkpoint):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint (a file, or a folder's ckpt.pt), or raise ValueError saying in one line what is wrong."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, ...
        raise ValueError(f"checkpoint {path} is corrupt or truncated "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a nanollm checkpoint")
    return checkpoint


def write_manifest(out_dir, config, device, meta_path, run_id=None):
    """
    out_dir/run.json: what it takes to reproduce the run, with a run id that every log.jsonl row repeats (a resumed
    run keeps its id: pass the checkpoint's). Holds the fully resolved config, the code's git commit and whether
    the tree had uncommitted changes, torch and CUDA versions, the device, and a hash of the dataset's meta.json
    (which records its tokenizer, shards and token counts). Returns the run id.
    """
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    with open(meta_path, "rb") as f:
        meta_hash = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "run_id": run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "config": config, "git_commit": commit or None,
        "git_dirty": bool(git("status", "--porcelain")) if commit else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "data_meta": os.path.abspath(meta_path), "data_meta_sha256": meta_hash,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "run.json"))
    return manifest["run_id"]


def is_master():
    """True on the process that logs and saves (rank 0, or the only process)."""
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(*values, device="cpu"):
    """The sums of plain numbers over all processes (the numbers themselves in a single process), as a list."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# outputs beside a checkpoint: the tokenizer, the log, the plots

def copy_tokenizer(path, out_dir):
    """Copy the files of Tokenizer.load(path) into out_dir, where the next stages look: none for 'gpt2', a HF
    tokenizer.json with its tokenizer_config.json (its special tokens), or tokenizer.model; returns that name."""
    if path == "gpt2":
        return "gpt2"
    hf = os.path.isdir(path) or path.endswith("tokenizer.json")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    files = ({name: os.path.join(folder, name) for name in ("tokenizer.json", "tokenizer_config.json")} if hf
             else {"tokenizer.model": path})
    for name, source in files.items():
        target = os.path.join(out_dir, name)
        if os.path.isfile(source) and not (os.path.exists(target) and os.path.samefile(source, target)):
            shutil.copyfile(source, target)
    return "tokenizer.json" if hf else "tokenizer.model"


def trim_log(path, step, keep):
    """A run resumed at `step` forgets what the interrupted one logged after its checkpoint: of the rows at `step` it
    keeps those where keep(row) (not the evaluation it redoes). A fresh run (step 0) starts an empty log."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in map(json.loads, f) if r["step"] < step or (r["step"] == step and keep(r))]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def save_plot(path, title, panels):
    """Line plots side by side in one png (needs matplotlib). panels: (x label, y label, lines) each, a line being
    (label, [(x, y), ...], matplotlib style keywords); a line with no points is left out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 5 * len(panels), 4.5), squeeze=False)
    for ax, (x_label, y_label, lines) in zip(axes[0], panels):
        for label, points, style in lines:
            if points:
                ax.plot(*zip(*points), label=label, **style)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print0(f"wrote {path}")
