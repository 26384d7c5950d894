"""
Plumbing shared by every stage: configuration, device and precision, checkpoints and what lies beside them.

Configuration works like nanoGPT's: a stage keeps its defaults as plain module-level assignments, then calls
`config = parse_config(defaults, sys.argv[1:])`. Positional arguments are config files (plain Python files of
assignments, e.g. config/quickstart.py), applied in order; `--key=value` arguments override them. A key the stage
does not know, or a value whose type does not match the default's, stops the program with a one-line error.

torch is imported only inside the functions that use it, so that prepare.py runs a process per core without it.
"""
import ast
import dataclasses
import errno
import hashlib
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import time
import traceback
import types
import uuid
from contextlib import contextmanager, nullcontext


def fail(message):
    """Stop with a one-line error (SystemExit prints it to stderr and exits with status 1)."""
    raise SystemExit(f"error: {message}")


def one_line(e):
    """An exception as 'Type: the first line of its message' (at most 120 characters of it)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _check_type(key, value, default):
    """Return value converted to the default's type (an int where a float is due; a bool is no number), or stop."""
    if default is None:  # a typed key takes no None: it would fail later, in a traceback
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool):
        return value
    fail(f"config key '{key}' expects {type(default).__name__}, got {type(value).__name__} {value!r}")


COMMAND_LINE = "the command line"  # where a --key=value came from


def parse_config(defaults, argv, other_stage_keys_in_files=False, with_given=False):
    """Apply config files and --key=value overrides to a dict of defaults; returns the new dict. With
    other_stage_keys_in_files, a stage that reads another stage's config files (bench.py reads train.py's) skips the
    keys it does not know in those files (not on its command line). with_given: return (config, given), given mapping
    each key that a file or the command line set (even to the default's value) to its source: the file's path, or
    COMMAND_LINE (a resumed run checks those keys against its checkpoint; a step count on the command line wins)."""
    config, given = dict(defaults), {}

    def update(key, value, source):
        if key not in defaults:
            if other_stage_keys_in_files and source != COMMAND_LINE:
                return
            fail(f"unknown config key '{key}' (from {source})")
        config[key] = _check_type(key, value, defaults[key])
        given[key] = source

    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq and key in defaults and not isinstance(defaults[key], bool):  # a bare --flag: a boolean on
                fail(f"config key '{key}' needs a value: --{key}=...")
            try:  # strings stay raw, everything else is a literal; a bare word stays a string for the type check
                value = raw if isinstance(defaults.get(key), str) else ast.literal_eval(raw if eq else "True")
            except (ValueError, SyntaxError):
                value = raw
            update(key, value, COMMAND_LINE)
        else:
            for key, value in _run_config_file(arg).items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, types.ModuleType):
                    update(key, value, arg)
    return (config, given) if with_given else config


def _run_config_file(path):
    if not os.path.isfile(path):
        fail(f"config file {path} not found")
    try:
        return runpy.run_path(path)
    except SyntaxError as e:
        fail(f"config file {path}, line {e.lineno}: {e.msg}")
    except Exception as e:
        line = next((frame.lineno for frame in reversed(traceback.extract_tb(e.__traceback__))
                     if frame.filename == path), "?")
        fail(f"config file {path}, line {line}: {one_line(e)}")


def refuse_changed(keys, given, config, saved, path):
    """Stop in one line at a setting of `keys` that a config file or the command line gives and that differs from the
    one the checkpoint at `path` trained with (`saved`: its config): the optimizer's state keeps its own, which win."""
    for key in keys:
        if key in given and key in saved and config[key] != saved[key]:
            fail(f"checkpoint {path} was trained with {key}={saved[key]!r}, but the config says {key}={config[key]!r}, "
                 "which the optimizer's state would override: resume with the checkpoint's value, or start a new run "
                 "in another --out_dir")


def check_settings(config, positive=(), non_negative=(), fractions=(), choices=None):
    """Stop with one line at the first setting that breaks its rule below, or that choices[key] does not list."""
    rules = (((*positive, *non_negative, *fractions), "must be a finite number",
              lambda v: not isinstance(v, float) or math.isfinite(v)),
             (positive, "must be positive", lambda v: v > 0), (non_negative, "must not be negative", lambda v: v >= 0),
             (fractions, "must lie between 0 and 1", lambda v: 0 <= v <= 1))
    for keys, rule, ok in rules:
        for key in keys:
            if not ok(config[key]):
                fail(f"{key}={config[key]!r} {rule}")
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            fail(f"unknown {key} '{config[key]}' (choose {', '.join(allowed)})")


# -----------------------------------------------------------------------------
# device and precision

def pick_device(device="auto"):
    """'auto' picks CUDA, then Apple MPS, then the CPU; a device that is not here stops with one line."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, colon, index = device.partition(":")  # an index as torch.device takes it: 'cuda:1', not 'cuda:' or 'cuda:01'
    if kind not in ("cpu", "cuda", "mps") or (colon and not (kind == "cuda" and index.isdecimal()
                                                             and str(int(index)) == index)):
        fail(f"unknown device '{device}' (choose auto, cpu, cuda, cuda:N or mps)")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"device='{device}', but this machine has no CUDA GPU that torch can use: use --device=cpu or "
             "--device=auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        fail(f"device='{device}', but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        fail("device='mps', but Apple's MPS is not available here: use --device=cpu or --device=auto")
    return device


def init_processes(device):
    """Under torchrun: join the process group, take this process's GPU; returns (ddp, rank, world_size, device)."""
    import torch
    import torch.distributed as dist
    if "RANK" not in os.environ:
        return False, 0, 1, device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def end_processes(code):
    """Leave a torchrun process with exit code `code` once every process is done with its collectives (none exits,
    which makes torchrun stop the others, before process 0 has saved). os._exit, not a return: FSDP2's device mesh
    keeps the gloo process group alive past destroy_process_group, and a gloo thread that drops a collective's tensor
    while the interpreter finalizes, when it can no longer take the GIL, aborts the process (pytorch/pytorch#179291)."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_dtype(device, dtype="auto"):
    """bf16 where the GPU has it, fp16 on older GPUs (train.py then adds a GradScaler), fp32 elsewhere. Any other name
    (float64 among them) stops: autocast computes in bf16 or fp16 or not at all, so it would be recorded, not used."""
    import torch
    if dtype not in DTYPES:
        fail(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})")
    if dtype != "auto":
        return dtype
    return ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.startswith("cuda") else "float32"


def nominal_peak_flops(device):
    """Dense bf16 tensor-core peak from the data sheets, for MFU; 0 where unknown (CPUs, other GPUs)."""
    import torch
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((flops for gpu, flops in {"H100": 989e12, "H200": 989e12, "A100": 312e12}.items() if gpu in name), 0.0)


def autocast(device, dtype):
    import torch
    return nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], getattr(torch, dtype))


# -----------------------------------------------------------------------------
# FSDP2: the model sharded over the processes (torch.distributed.fsdp.fully_shard, the engine of torchtitan)

def check_fsdp(ddp, dtype):
    """What --fsdp=True needs (torch >= 2.6, torchrun, no GradScaler), or stop with one line."""
    import torch
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        fail(f"--fsdp=True needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch {torch.__version__}")
    if not ddp:
        fail(f"--fsdp=True runs under torchrun, on one GPU too: torchrun --standalone --nproc_per_node=1 "
             f"{os.path.basename(sys.argv[0])} ...")
    if dtype == "float16":
        fail("--fsdp=True trains in bfloat16 or float32: dtype='float16' would need a GradScaler over sharded "
             "gradients")


def checkpoint_blocks(blocks):
    """Activation checkpointing: each block keeps only its input for the backward pass, which runs the block's forward
    again (torch.utils.checkpoint, non-reentrant, the random state kept: the same dropout): a block's activations for
    a third more compute. MoE routers then count their load twice, which the sign-based bias update ignores."""
    import functools
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def context_view(module, args):
    """A block's Context (a dataclass) as a namespace of the same objects: fully_shard (torch 2.13) rebuilds each
    dataclass and dict among a module's inputs that holds a tensor needing a gradient (to hook its backward), and the
    block would write into a copy of the forward's dicts (MoE's balance losses, after the first MoE layer's). A
    block reads the Context's fields and writes into its dicts, never rebinding them, so the namespace serves."""
    return tuple(types.SimpleNamespace(**vars(a)) if dataclasses.is_dataclass(a) else a for a in args)


def shard_model(model, blocks, device, dtype):
    """FSDP2 in place: each block sharded, then the model (embeddings, head, norms), so that each process keeps its rows
    (Shard(0)) of every parameter, gradient and optimizer state; a block's weights are gathered for its forward and
    again for its backward. The model moves to device shard by shard: it never has to fit there whole. Sparse tables
    (Engram's) stay whole on every process (average_table_grads)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters()}  # Muon's logical_rows, ...
    tables = {m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse}
    # no cast of the blocks' inputs: they hold the Context, whose dicts the layers write into (their losses, the
    # logits for QK-Clip), and decoding's caches, which a cast would copy; autocast casts what the matmuls read
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=tables)
        block.register_forward_pre_hook(context_view, prepend=True)  # before FSDP's own
    # the model's own weights stay gathered from its forward to its backward, which begins with them
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=tables, reshard_after_forward=False)
    for name, p in model.named_parameters():
        vars(p).update(attributes[name])


@contextmanager
def gathered(model):
    """Forward passes with the whole model on every process: under FSDP2 one all-gather of every weight, then forwards
    without collectives, so that processes may run different numbers of them (generation's early stop, the
    evaluations' splits); the shards again after. Without FSDP2, nothing."""
    import torch
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, nothing sharded
        FSDPModule = ()
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield
        return
    model.set_reshard_after_forward(False)
    for m in modules:
        m.unshard()
    # FSDP makes the first module to run a forward its root, and decoding calls the blocks directly (decode.py): a
    # one-token forward of the model, in eval mode (no dropout, no MoE load counts), makes it the root first
    training, p = model.training, next(model.parameters())  # gathered: in the compute dtype
    with torch.no_grad(), torch.autocast(p.device.type, torch.bfloat16, enabled=p.dtype == torch.bfloat16):
        model.eval()(torch.zeros(1, 1, dtype=torch.long, device=p.device))
    model.train(training)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # as shard_model left it


def average_table_grads(model):
    """FSDP2 leaves the tables it ignores (Engram's, whole on every process) to us: their sparse gradients averaged over
    the processes, as DDP averages them (gloo: NCCL reduces no sparse tensors, which configure_optimizers refuses)."""
    import torch
    import torch.distributed as dist
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and m.sparse and m.weight.grad is not None:
            grad = m.weight.grad.coalesce()
            dist.all_reduce(grad)
            m.weight.grad = grad / dist.get_world_size()


def finite_weights(model, device="cpu", group=None):
    """Whether every floating-point weight of model is finite: under FSDP2 each process checks its own rows and the
    processes agree (a sum over them, on `device` or in `group`), so that all stop together; else this replica."""
    import torch
    weights = [t for t in model.state_dict().values() if t.is_floating_point()]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in weights]  # FSDP2's DTensors: this process's rows
    finite = bool(torch.stack([t.isfinite().all() for t in local]).all())
    if any(hasattr(t, "to_local") for t in weights):
        finite = all_reduce_sum(float(not finite), device=device, group=group)[0] == 0
    return finite


# -----------------------------------------------------------------------------
# checkpoints: only tensors and plain Python values, so they load with weights_only=True

CHECKPOINT_FORMAT = "nanollm-1"


def atomic_write(path, write):
    """write(f) into a temporary file of this process beside path, flushed to the disk, then renamed over path: a
    crash, a kill or a full disk mid-write leaves the previous file as it was and no temporary file behind. Raises
    OSError with one line that names the file (and the full disk, when that is why)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        # the full disk may lie under another error: torch.save's writer reports the failed write as its own
        chain, cause = [], e
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        full = any(getattr(c, "errno", None) == errno.ENOSPC or "No space left" in str(c) for c in chain)
        reason = "the disk is full" if full else one_line(e)
        error = OSError(f"could not write {path} ({reason}); the previous file is kept")
        error.errno = errno.ENOSPC if full else getattr(e, "errno", None)
        raise error from None
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:  # the rename itself reaches the disk
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path, value):
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def save_checkpoint(path, checkpoint):
    import torch
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, f))


def load_checkpoint(path):
    """Load a checkpoint (a file, or a folder's ckpt.pt), or raise ValueError saying in one line what is wrong."""
    import torch
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, ...
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({one_line(e)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a nanollm checkpoint")
    return checkpoint


def write_manifest(out_dir, config, device, meta_path, run_id=None):
    """out_dir/run.json: what it takes to reproduce the run, under a run id that every log.jsonl row repeats (a resumed
    run passes its checkpoint's); the hash of meta.json pins the tokenizer, shards and token counts. Returns the id."""
    import torch
    import torch.distributed as dist
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()  # no commit yet: 'HEAD', rc 128
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    with open(meta_path, "rb") as f:
        meta_hash = hashlib.sha256(f.read()).hexdigest()
    manifest = {"run_id": run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", "config": config,
                "git_commit": commit or None, "git_dirty": bool(git("status", "--porcelain")) if commit else None,
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "data_meta": os.path.abspath(meta_path), "data_meta_sha256": meta_hash,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "run.json"), manifest)
    return manifest["run_id"]


LOCKS = {}  # folder -> the open lock file of this process that holds it until the process ends


def lock_folder(folder):
    """One run owns a folder (out_dir): an exclusive lock on folder/.lock, held until this process ends (the system
    releases it when the process dies: a kill -9 leaves nothing to clean up before a resume); a process that holds it
    keeps it. Raises ValueError if another process holds it, OSError (one line) if the folder cannot be written."""
    import fcntl  # POSIX
    if os.path.realpath(folder) in LOCKS:
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file, not a folder: choose another folder")
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, ".lock"), "a")
    except OSError as e:
        raise OSError(f"cannot write in {folder} ({e.strerror or e}): choose a folder you can write to") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"{folder} is in use by another run: wait for it to end, or choose another out_dir") from None
    LOCKS[os.path.realpath(folder)] = f


def claim_out_dir(out_dir, resume, overwrite):
    """Lock out_dir for this run; ValueError if it holds a run that this one neither resumes nor may overwrite."""
    lock_folder(out_dir)
    if resume or overwrite:
        return
    if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        raise ValueError(f"{out_dir} holds a run (ckpt.pt): continue it with --init_from=resume, replace it with "
                         "--overwrite=True, or choose another --out_dir")
    log = os.path.join(out_dir, "log.jsonl")
    if os.path.isfile(log) and os.path.getsize(log):
        raise ValueError(f"{out_dir} holds the log.jsonl of a run that saved no checkpoint: replace it with "
                         "--overwrite=True, or choose another --out_dir")


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def rng_states(device_type):
    """Every process's random state (its dropout stream), a list by rank, for a checkpoint."""
    import torch
    import torch.distributed as dist
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
    rngs = [rng] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    return rngs


def restore_rng(rngs, rank, world_size, device_type):
    """Continue this process's random stream from a checkpoint's rng_states when the world size is the same (a
    checkpoint without them, or of another world size, leaves the stream as the seed set it)."""
    import torch
    if rngs and len(rngs) == world_size:
        torch.set_rng_state(rngs[rank]["cpu"])
        if device_type == "cuda" and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"])


def all_reduce_sum(*values, device="cpu", group=None):
    """The sums of plain numbers over all processes (the numbers themselves in a single process), as a list; group: a
    process group of its own (e.g. a gloo one on the CPU beside NCCL), whose backend takes tensors on `device`."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
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
    source = os.path.join(folder, "tokenizer.json") if hf else path
    target = os.path.join(out_dir, os.path.basename(source))
    if not os.path.isfile(source) or os.path.exists(target) and os.path.samefile(source, target):
        return os.path.basename(source)
    template = os.path.join(folder, "chat_template.jinja")  # transformers 5 saves a chat template there, apart
    for name in [source] + ([template] if hf and os.path.isfile(template) else []):
        with open(name, "rb") as f:  # atomically: a crash mid-copy leaves the previous tokenizer
            atomic_write(os.path.join(out_dir, os.path.basename(name)), lambda out: shutil.copyfileobj(f, out))
    if hf:  # Tokenizer.load_hf's special tokens: tokenizer_config.json's, over config.json's ids (Qwen3's bos)
        settings = {}
        for name in ("config.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(folder, name)):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    settings.update({k: v for k, v in json.load(f).items()
                                     if name == "tokenizer_config.json" or k.endswith("_token_id")})
        write_json(os.path.join(out_dir, "tokenizer_config.json"), settings)
    return os.path.basename(source)


def read_text(path, what="file"):
    """The text of a UTF-8 file, or ValueError saying in one line why not (what names the file's role: 'eval_file')."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(f"{what} {path} not found") from None
    except OSError as e:  # unreadable: permissions, an I/O error
        raise ValueError(f"cannot read {what} {path} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path} line {line} is not UTF-8 text (byte {data[e.start]:#04x})") from None


def read_log(path):
    """The rows of a log.jsonl (none if it is missing); a last line cut short by a crash mid-append is left out."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if line.strip() and number < len(lines):  # a line that a newline ends is whole: damaged, not cut
                raise ValueError(f"{path} line {number} is not JSON: the log is damaged") from None
    return rows


def trim_log(path, step, keep):
    """A run resumed at `step` forgets what the interrupted one logged after its checkpoint: of the rows at `step` it
    keeps those where keep(row) (not the evaluation it redoes). A fresh run (step 0) starts an empty log. Atomic."""
    rows = [r for r in read_log(path) if r["step"] < step or (r["step"] == step and keep(r))]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


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
        ax.set(xlabel=x_label, ylabel=y_label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    print0(f"wrote {path}")
