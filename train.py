"""
Train a model on token shards written by prepare.py. One process:

    python train.py config/quickstart.py --max_iters=200

Several GPUs (or CPU processes) on one machine, through torchrun and DDP, or FSDP2 for a model too large for DDP:

    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --fsdp=True

Every setting below can be changed by a config file (config/*.py, plain assignments) and then by
--key=value on the command line; so can every field of GPTConfig in model.py.

One run owns its out_dir: a fresh run into a folder that holds a run stops, unless --init_from=resume continues it
or --overwrite=True replaces it. Every setting and the whole dataset are checked before out_dir changes; Ctrl-C
saves a checkpoint at the end of the step, from which --init_from=resume continues exactly.
"""
import filecmp
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import asdict

# Ctrl-C outside the steps (which save a checkpoint on it) stops in one line: every file is written whole (atomic)
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit("error: interrupted outside the training steps: "
                                                            "no step was lost"))

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import (COMMAND_LINE, all_reduce_sum, autocast, average_table_grads, check_fsdp, check_settings,
                          checkpoint_blocks, claim_out_dir, copy_tokenizer, end_processes, fail, finite_weights,
                          gathered, init_processes, nominal_peak_flops, parse_config, pick_device, pick_dtype, print0,
                          read_log, read_text, refuse_changed, restore_rng, rng_states, save_checkpoint, save_plot,
                          shard_model, trim_log, write_manifest)
from evaluate import exact_bits_per_byte, read_tasks, task_accuracy
from hf import TRAINING_ONLY, load_model
from model import PATTERN_LETTERS, GPT, Block, GPTConfig, SlidingSpan, config_fields, update_router_biases
from optim import (MUON_LR_SCALES, NEWTON_SCHULZ, OPTIMIZERS, QKClip, clip_grad_norm_, configure_optimizers,
                   full_state, load_state)
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# defaults
# I/O
out_dir = "out"               # checkpoints, log.jsonl and plots go here
data_dir = "data/pystdlib"    # a folder written by prepare.py (meta.json + .bin shards)
init_from = "scratch"         # 'scratch', 'resume' (continue the run saved in out_dir/ckpt.pt) or 'hf:FOLDER'
overwrite = False             # a fresh run may replace the run that out_dir holds (else it stops, saying so)
eval_interval = 250           # evaluate and save a checkpoint every this many steps
eval_iters = 20               # batches per split in each periodic evaluation
log_interval = 10             # print the training loss every this many steps
eval_only = False             # evaluate the checkpoint in out_dir and exit
eval_file = ""                # with eval_only: also exact bits per byte of this UTF-8 text file
eval_tasks = ""               # with eval_only: also accuracy on these multiple-choice JSONL files (comma-separated)
plot = False                  # only draw out_dir/loss.png from out_dir/log.jsonl, then exit
wandb_log = False             # also log to Weights & Biases (pip install wandb)
wandb_project = "nanollm"
wandb_run_name = ""
# data
batch_size = 16               # sequences per micro-step per process
sampler = "random"            # 'random': windows at random offsets (nanoGPT); 'epoch': every window once per epoch
epochs = 0.0                  # > 0 sets max_iters to this many passes over the training windows
gradient_accumulation_steps = 1  # micro-steps per optimizer step, summed over all processes (rounded up to a multiple
                                 # of them: each process takes at least one)
# optimizer
optimizer = "adamw"           # 'adamw'; 'muon': Muon on the hidden matrices, AdamW on the rest; 'muonclip': muon + QK-Clip
learning_rate = 6e-4          # peak lr of AdamW, and of Muon too under muon_lr_scale='moonshot'
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # clip the global gradient norm to this (0 = off)
muon_lr = 0.0                 # Muon's peak lr; 0 = learning_rate under 'moonshot', 0.02 under 'shape'
muon_momentum = 0.95          # Muon's Nesterov momentum
muon_lr_scale = "moonshot"    # Muon's update scale: 'moonshot' (AdamW's update RMS, Moonlight) or 'shape' (modded-nanogpt)
muon_momentum_warmup = 0      # > 0: Muon's momentum rises linearly from 0.85 to muon_momentum over this many steps
                              # (modded-nanogpt: 300)
embed_lr = 0.0                # > 0: the peak lr of the embedding tables (AdamW, no weight decay); 0 = learning_rate
head_lr = 0.0                 # > 0: the same for an untied output head (tie_embeddings=False)
muon_schedule = "jordan"      # Newton-Schulz coefficients: 'jordan' (Muon's) or 'polar_express' (arXiv 2505.16932)
normuon_beta2 = 0.0           # > 0: NorMuon (arXiv 2510.05491): each update row divided by its RMS's EMA (0.95)
cautious_wd = False           # Muon's weight decay only where the update moves the weight towards 0 (arXiv 2510.12402)
qk_clip_tau = 100.0           # muonclip: a head whose largest attention logit exceeds this is scaled back to it
qk_clip_interval = 1          # muonclip: measure the logits and clip every this many steps
# schedule
max_iters = 5000              # optimizer steps
train_flops = 0.0             # > 0 sets max_iters so that the run spends this many training FLOPs (fixed-compute runs)
train_tokens = 0              # > 0 sets max_iters so that the run trains on this many tokens
train_minutes = 0.0           # > 0: a wall-clock budget: max_iters is set from the time of steps 3 to 12 so that the
                              # training steps end after about this many minutes (evaluations come on top)
target_bpb = 0.0              # > 0: stop once the exact val bits per byte (the whole val split) is at or below this
target_interval = 0           # steps between the checks of target_bpb; 0 = eval_interval
lr_schedule = "cosine"        # 'cosine', or 'wsd' (warmup-stable-decay: constant, then a linear decay)
warmup_iters = 100
decay_frac = 0.2              # wsd: the final fraction of steps that decays the learning rate
min_lr_frac = 0.1             # the learning rate at the end, as a fraction of learning_rate
seq_warmup = 0.0              # > 0: the first this fraction of the steps cut each window into shorter sequences, ...
seq_warmup_min = 128          # ... this many tokens, doubling at equal intervals up to block_size (arXiv 2108.06084)
window_warmup = 0.0           # > 0, with sliding-window layers: over the first this fraction of the steps, their ...
window_warmup_min = 128       # ... window grows from this, doubling at equal intervals up to `window` (modded-nanogpt)
batch_warmup = 0.0            # > 0: over the first this fraction of the steps, an update after every 1, 2, 4...
                              # micro-steps, up to gradient_accumulation_steps: fewer tokens per update first
# system
device = "auto"               # 'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                # 'auto' (bf16 on GPUs that have it, else fp16; fp32 on CPU), float32, bfloat16, float16
compile = False               # torch.compile the model
fsdp = False                  # under torchrun: FSDP2 (each process keeps 1/N of the weights, gradients and optimizer
                              # state) instead of DDP (each keeps them all)
activation_checkpointing = False  # each block's activations recomputed in the backward pass: less memory, more compute
seed = 1337
peak_flops = 0.0              # per-device peak for MFU; 0 = a known figure for the GPU, none on CPU
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
defaults.update(config_fields())
defaults["vocab_size"] = 0    # 0 = the dataset's vocabulary, rounded up to a multiple of 64
config, given = parse_config(defaults, sys.argv[1:], with_given=True)
# -----------------------------------------------------------------------------
# every setting is checked before anything is read or written

check_settings(config,
               positive=("batch_size", "gradient_accumulation_steps", "eval_iters", "eval_interval", "log_interval",
                         "qk_clip_tau", "qk_clip_interval", "seq_warmup_min", "window_warmup_min"),
               non_negative=("max_iters", "warmup_iters", "epochs", "train_flops", "train_tokens", "train_minutes",
                             "target_bpb", "target_interval", "learning_rate", "weight_decay", "grad_clip", "muon_lr",
                             "muon_momentum_warmup", "embed_lr", "head_lr", "peak_flops", "vocab_size",
                             "seed"),  # the samplers' numpy generators take no negative seed
               fractions=("beta1", "beta2", "muon_momentum", "decay_frac", "min_lr_frac", "normuon_beta2",
                          "seq_warmup", "window_warmup", "batch_warmup"),
               choices={"sampler": ("random", "epoch"), "lr_schedule": ("cosine", "wsd"), "optimizer": OPTIMIZERS,
                        "muon_lr_scale": tuple(MUON_LR_SCALES), "muon_schedule": tuple(NEWTON_SCHULZ)})


def check_warmups():
    """The warm-ups against the model's block_size, window and spans in config: a fresh model's, checked at once, or
    (resumed, from hf:) the loaded one's, checked once config holds them."""
    for warmup, smallest, largest in (("seq_warmup", "seq_warmup_min", "block_size"),
                                      ("window_warmup", "window_warmup_min", "window")):
        pieces = config[largest] // config[smallest]
        if config[warmup] and (config[largest] % config[smallest] or pieces & (pieces - 1)):
            fail(f"{smallest}={config[smallest]} must be {largest}={config[largest]} divided by a power of two")
    span_kinds = {config["attn_span"], *map(PATTERN_LETTERS.get, config["attn_pattern"])}
    if config["window_warmup"] and "sliding" not in span_kinds:
        fail("window_warmup grows sliding windows: set attn_span='sliding' (or S layers in attn_pattern)")


if config["init_from"] == "scratch":
    check_warmups()
# the number of steps: max_iters, or a budget that sets it. One given on the command line wins over a config file's
# budget (the benchmark configs train an epoch; --max_iters=2 tries one out); two given there contradict each other
budgets = ("epochs", "train_flops", "train_tokens", "train_minutes")
steps_given = [key for key in ("max_iters", *budgets)
               if given.get(key) == COMMAND_LINE and (key == "max_iters" or config[key] > 0)]


def setting(key):
    """key=value as one types it: train_flops=3.1e+15, not 3100000000000000.0."""
    return f"{key}={config[key]:.12g}" if isinstance(config[key], float) else f"{key}={config[key]}"


if len(steps_given) > 1:
    fail(" and ".join(f"--{setting(key)}" for key in steps_given) + " each set the number of steps: give one of them")
for key in budgets:
    if steps_given and key not in steps_given and config[key] > 0:
        print0(f"--{setting(steps_given[0])} overrides {setting(key)} from {given[key]}")
        config[key] = defaults[key]
globals().update(config)
if init_from not in ("scratch", "resume") and not init_from.startswith("hf:"):
    fail(f"unknown init_from '{init_from}' (choose scratch, resume or hf:FOLDER)")
if eval_only and init_from.startswith("hf:"):  # eval_only reads out_dir's checkpoint: it would score that one instead
    fail(f"eval_only=True evaluates the checkpoint in out_dir, not init_from='{init_from}': leave init_from out, or "
         "run it for --max_iters=0, which ends with its exact val bits per byte")
if not eval_only and (eval_file or eval_tasks):  # a training run reads neither
    fail(f"{'eval_file' if eval_file else 'eval_tasks'} is read by eval_only=True alone: add --eval_only=True")
if wandb_log:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb, or leave wandb_log off")
checkpoint_path = os.path.join(out_dir, "ckpt.pt")
log_path = os.path.join(out_dir, "log.jsonl")


def plot_log():
    """out_dir/loss.png: train and val loss against steps and against tokens."""
    rows = read_log(log_path)
    if not rows:
        raise ValueError(f"no log at {log_path} to plot: train a run there first, or set --out_dir")
    series = (("loss", "train (each logged step)", {}), ("val_loss", "val", {"marker": "o"}))
    save_plot(os.path.join(out_dir, "loss.png"), out_dir, [
        (x, "loss (nats/token)", [(label, [(r[x], r[key]) for r in rows if key in r], style)
                                  for key, label, style in series]) for x in ("step", "tokens")])


if plot:
    try:
        plot_log()
    except (ValueError, OSError) as e:
        fail(str(e))
    raise SystemExit
if eval_only:  # its inputs are read now: a bad file stops the run before the model is evaluated
    try:
        eval_text = read_text(eval_file, "eval_file") if eval_file else None
        tasks = {path: read_tasks(path) for path in filter(None, eval_tasks.split(","))}
    except (ValueError, OSError) as e:
        fail(str(e))
    if eval_text == "":
        fail(f"eval_file {eval_file} is empty")
# -----------------------------------------------------------------------------
# processes, device, precision

device = pick_device(device)
dtype = pick_dtype(device, dtype)
ddp, rank, world_size, device = init_processes(device)  # ddp: under torchrun, with DDP or FSDP
if fsdp:
    check_fsdp(ddp, dtype)
device_type = device.split(":")[0]
gradient_accumulation_steps = -(-gradient_accumulation_steps // world_size)  # per process, rounded up
if batch_warmup and (gradient_accumulation_steps < 2
                     or gradient_accumulation_steps & (gradient_accumulation_steps - 1)):
    fail(f"batch_warmup needs 2, 4, 8... micro-steps per process, not {gradient_accumulation_steps}: e.g. "
         "--batch_size=8 --gradient_accumulation_steps=4 for 32 sequences per step")
master = rank == 0
amp = autocast(device, dtype)
# DDP broadcasts rank 0's model; FSDP keeps each process's rows of its own copy, so every process builds rank 0's
torch.manual_seed(seed if fsdp else seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
# the processes' agreements (an error of the master, Ctrl-C) go through the CPU: a gloo group beside NCCL's, so that
# they never wait for the GPU's queue
control = dist.new_group(backend="gloo") if ddp and device_type == "cuda" else None


def on_master(action):
    """action() on the master alone (it writes out_dir): its result there; its one-line error stops every process."""
    error = result = None
    if master:
        try:
            result = action()
        except (ValueError, OSError) as e:
            error = str(e)
    if ddp:
        errors = [error]
        dist.broadcast_object_list(errors, src=0, group=control)
        error = errors[0]
    if error:
        fail(error)
    return result


# -----------------------------------------------------------------------------
# the dataset written by prepare.py, checked whole: meta.json, every shard's size, every token id

DATASETS = ("gutenberg", "tinyshakespeare", "tinystories", "fineweb_edu")  # what prepare.py --dataset=NAME downloads


def prepare_command(folder):
    """The prepare.py command that writes a dataset into folder: by name for pystdlib and the DATASETS, else from
    the user's own text."""
    root, name = os.path.split(os.path.normpath(folder))
    out_root = "" if root == "data" else f" --out_root={root or '.'}"
    if name == "pystdlib":
        return f"python prepare.py{out_root}"
    if name in DATASETS:
        return f"python prepare.py --dataset={name}{out_root}"
    return f"python prepare.py --input=path/to/your/text --name={name}{out_root}"


meta_path = os.path.join(data_dir, "meta.json")
if not os.path.isfile(meta_path):
    fail(f"no dataset in {data_dir} (meta.json missing): make it with `{prepare_command(data_dir)}`, or set "
         "--data_dir")
try:
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
except ValueError as e:  # not JSON, or not UTF-8
    fail(f"{meta_path} is damaged ({e}): run prepare.py again")
meta_types = {"tokenizer": str, "tokenizer_path": str, "vocab_size": int, "eos_id": int, "dtype": str,
              **{f"splits.{split}.{field}": kind for split in ("train", "val")
                 for field, kind in (("shards", list), ("tokens", int), ("bytes", int))}}
for key, kind in meta_types.items():
    value = meta
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        fail(f"{meta_path} is incomplete or damaged ({key} is {value!r}): run prepare.py again")
if meta["dtype"] not in ("uint16", "uint32"):
    fail(f"{meta_path} is damaged (dtype {meta['dtype']!r}, not uint16 or uint32): run prepare.py again")
# the exact evaluation starts each stream with eos_id and divides by the val bytes
if not 0 <= meta["eos_id"] < meta["vocab_size"]:
    fail(f"{meta_path} is damaged (eos_id {meta['eos_id']}, not an id of its vocabulary of {meta['vocab_size']}): "
         "run prepare.py again")
if meta["splits"]["val"]["bytes"] <= 0:
    fail(f"{meta_path} is damaged (splits.val.bytes is {meta['splits']['val']['bytes']}, not positive): run "
         "prepare.py again")
tokenizer_path = "gpt2" if meta["tokenizer"] == "gpt2" else os.path.join(data_dir, meta["tokenizer_path"])
if tokenizer_path != "gpt2" and not os.path.exists(tokenizer_path):
    fail(f"{tokenizer_path}, the tokenizer that meta.json names, is missing: run prepare.py again")
itemsize = np.dtype(meta["dtype"]).itemsize
shard_paths = []
for split in ("train", "val"):
    tokens = 0
    for name in meta["splits"][split]["shards"]:
        path = os.path.join(data_dir, str(name))
        size = os.path.getsize(path) if os.path.isfile(path) else None
        problem = ("is missing" if size is None else "is empty" if size == 0 else
                   f"holds {size} bytes, not a whole number of {meta['dtype']} tokens" if size % itemsize else "")
        if problem:
            fail(f"{path} {problem}: the dataset is damaged; run prepare.py again")
        tokens += size // itemsize
        shard_paths.append(path)
    if tokens != meta["splits"][split]["tokens"]:
        fail(f"the {split} shards of {data_dir} hold {tokens} tokens, meta.json says "
             f"{meta['splits'][split]['tokens']}: the dataset is damaged; run prepare.py again")


def largest_id(path, chunk=1 << 24):
    """The largest token id of a shard, read in chunks of its memory map: memory stays flat however large it is."""
    shard = np.memmap(path, dtype=meta["dtype"], mode="r")
    return max(int(shard[i:i + chunk].max()) for i in range(0, len(shard), chunk))


# each process reads its share of the shards: one process finds a shard's largest id, the others add 0
for path, top in zip(shard_paths, all_reduce_sum(*[largest_id(path) if i % world_size == rank else 0
                                                    for i, path in enumerate(shard_paths)], group=control)):
    if top >= meta["vocab_size"]:
        fail(f"{path} holds token id {int(top)}, beyond the vocabulary of {meta['vocab_size']} in meta.json: the "
             "shards and meta.json do not belong together; run prepare.py again")
# the dataset's identity goes into the checkpoint, so that a resume on another one stops: meta.json records the
# tokenizer, the shards and their token counts; its creation time is left out, so that the same data prepared
# again is the same dataset
dataset = {"sha256": hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "created"},
                                               sort_keys=True).encode()).hexdigest(),
           "vocab_size": meta["vocab_size"], "data_dir": os.path.abspath(data_dir)}
if vocab_size == 0:
    vocab_size = 64 * math.ceil(meta["vocab_size"] / 64)
if vocab_size < meta["vocab_size"]:
    fail(f"vocab_size={vocab_size} is smaller than the dataset's vocabulary of {meta['vocab_size']}")

# -----------------------------------------------------------------------------
# out_dir: one run owns it, and a fresh run does not replace a run unless asked


try:
    model_args = asdict(GPTConfig(**{**{k: config[k] for k in config_fields()}, "vocab_size": vocab_size}))
except ValueError as e:
    fail(f"model config: {e}")
if init_from == "resume" and not eval_only and not os.path.isfile(checkpoint_path):
    fail(f"no checkpoint at {checkpoint_path} to resume: start the run without --init_from=resume, or set --out_dir")
if not eval_only:
    on_master(lambda: claim_out_dir(out_dir, init_from == "resume", overwrite))

# -----------------------------------------------------------------------------
# the model: from the config, from the checkpoint being resumed, or from a Hugging Face folder

checkpoint = None
try:
    if init_from == "resume" or eval_only:
        model, trained_tokenizer, checkpoint = load_model(checkpoint_path)
    elif init_from.startswith("hf:"):  # the folder's model, with this run's block_size and training-only settings
        model = load_model(init_from, block_size, **{key: config[key] for key in TRAINING_ONLY})[0].train()
    else:
        model = GPT(GPTConfig(**model_args))
except (ValueError, ImportError, OSError) as e:
    fail(str(e))
if init_from.startswith("hf:") and not checkpoint:
    # a model setting that a config file or the command line gives must be the folder's, but for block_size and the
    # training-only ones (balance losses, jitter, capacity, dropout, and MTP, whose modules start afresh)
    folder = asdict(model.config)
    for key in sorted(given.keys() & folder.keys() - TRAINING_ONLY - {"block_size"}):
        try:  # as GPTConfig resolves it: n_kv_head=0 is n_head, ...
            same = asdict(GPTConfig(**{**folder, key: {**config, "vocab_size": vocab_size}[key]}))[key] == folder[key]
        except ValueError:
            same = False
        if not same:
            fail(f"{init_from[3:]} has {key}={folder[key]!r}, but {given[key]} says {key}={config[key]!r}: a model "
                 "from hf: keeps the folder's settings (all but block_size and the training-only ones); leave it out")
    if model.config.vocab_size < meta["vocab_size"]:
        fail(f"{init_from[3:]} has {model.config.vocab_size} tokens, fewer than the dataset's {meta['vocab_size']}")


def same_tokenizer(a, b):
    """Whether Tokenizer.load paths a and b are one tokenizer: both 'gpt2', or files of the same bytes."""
    return a == b if "gpt2" in (a, b) else os.path.isfile(a) and filecmp.cmp(a, b, shallow=False)


if eval_only and not same_tokenizer(trained_tokenizer, tokenizer_path):  # else the scores would mean nothing
    fail(f"{checkpoint_path} was trained with another tokenizer ({trained_tokenizer}) than the dataset in {data_dir} "
         f"has ({tokenizer_path}): evaluate it on a dataset prepared with its tokenizer (--data_dir)")
if checkpoint and not eval_only:
    # the run continues its own checkpoint, on its own dataset, with its model (from scratch or from hf:): a model
    # setting that a config file or the command line gives must agree with it. Evaluating takes any checkpoint of the
    # dataset's tokenizer.
    if "mode" in checkpoint["config"]:
        fail(f"{checkpoint_path} was written by grpo.py, whose runs train.py does not continue: resume it with "
             "grpo.py --init_from=resume, or train in another --out_dir")
    trained_on = checkpoint.get("dataset")
    if trained_on and trained_on["sha256"] != dataset["sha256"]:
        fail(f"{checkpoint_path} was trained on the dataset in {trained_on['data_dir']} (a vocabulary of "
             f"{trained_on['vocab_size']}, meta.json sha256 {trained_on['sha256'][:12]}), not on {data_dir} (a "
             f"vocabulary of {meta['vocab_size']}, sha256 {dataset['sha256'][:12]}): resume with "
             f"--data_dir={trained_on['data_dir']}, or start a new run in another --out_dir")
    saved = checkpoint["model_config"]
    explicit = sorted(given.keys() & set(saved))
    try:
        wanted = asdict(GPTConfig(**{**saved, **{key: model_args[key] for key in explicit}}))
    except ValueError as e:
        fail(f"model config: {e}")
    for key in explicit:
        if wanted[key] != saved[key]:
            fail(f"checkpoint {checkpoint_path} was trained with {key}={saved[key]!r}, but the config says "
                 f"{key}={config[key]!r}: resume with the checkpoint's value, or start a new run in another --out_dir")
if fsdp and rank:  # and then takes a random stream of its own (dropout), rank 0 going on as one process does
    torch.manual_seed(seed + rank)
config.update(asdict(model.config))  # run.json and the checkpoint record the model that trains
if not eval_only:
    check_warmups()
T = model.config.block_size

# -----------------------------------------------------------------------------
# data: windows of block_size + 1 tokens from memory-mapped shards


def aux_metrics(aux):
    """
    The aux dict's tensors as plain numbers for a log (a float each, a list for each MoE layer's expert loads), and
    a one-line summary of the floats, each averaged over layers ('moe3/dropped' and 'moe5/dropped': 'moe/dropped').
    """
    metrics = {key: value.tolist() for key, value in aux.items() if torch.is_tensor(value)}
    by_name = {}
    for key, value in metrics.items():
        if isinstance(value, float):
            by_name.setdefault(re.sub(r"\d+/", "/", key), []).append(value)
    return metrics, ", ".join(f"{name} {sum(values) / len(values):.4g}" for name, values in by_name.items())


def open_shards(split):
    return [np.memmap(os.path.join(data_dir, name), dtype=meta["dtype"], mode="r")
            for name in meta["splits"][split]["shards"]]


def open_split(split):
    """The shards that hold a window of block_size + 1 tokens: those the samplers draw from."""
    shards = [s for s in open_shards(split) if len(s) > T]
    if not shards:
        fail(f"the {split} split of {data_dir} holds no window of block_size + 1 = {T + 1} tokens")
    return shards


splits = {split: open_split(split) for split in ("train", "val")}
val_streams = open_shards("val")  # exact evaluation reads every token, as meta.json's byte count counts them
# the 'epoch' sampler numbers the non-overlapping windows of the training split: window i of a shard is
# tokens [i*T, i*T + T], so that every token but the first of each shard is a target exactly once
windows_per_shard = np.array([(len(s) - 1) // T for s in splits["train"]])
window_starts = np.concatenate([[0], np.cumsum(windows_per_shard)])
n_windows = int(window_starts[-1])
windows_per_step = batch_size * gradient_accumulation_steps * world_size
tokens_per_step = windows_per_step * T
if gradient_accumulation_steps * world_size != config["gradient_accumulation_steps"] and not eval_only:
    print0(f"gradient_accumulation_steps={config['gradient_accumulation_steps']} rounded up to "
           f"{gradient_accumulation_steps * world_size}, a multiple of the {world_size} processes: "
           f"{tokens_per_step:,} tokens per step")
if epochs > 0:
    max_iters = int(epochs * n_windows // windows_per_step)
    if max_iters == 0 and not eval_only:  # else the run would end at once, trained on nothing
        fail(f"epochs={epochs:g} of the {n_windows} training windows is less than one step of {windows_per_step} "
             "windows: raise epochs, or lower batch_size or gradient_accumulation_steps")
_epoch_orders = {}


def training_windows(step):
    """(shard, offset) of all windows_per_step windows of one optimizer step, the same whatever the world size."""
    if sampler == "random":
        return random_windows(splits["train"], np.random.default_rng([seed, step]), windows_per_step)
    first = step * windows_per_step  # 'epoch'
    ids = []
    for g in range(first, first + windows_per_step):
        epoch = g // n_windows
        if epoch not in _epoch_orders:
            _epoch_orders.clear()
            _epoch_orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n_windows)
        ids.append(_epoch_orders[epoch][g % n_windows])
    shard = np.searchsorted(window_starts, ids, side="right") - 1
    return shard, (np.array(ids) - window_starts[shard]) * T


def random_windows(shards, rng, n):
    """n windows at uniformly random offsets over all shards."""
    sizes = np.array([len(s) - T for s in shards])
    flat = rng.integers(0, sizes.sum(), size=n)
    shard = np.searchsorted(np.cumsum(sizes), flat, side="right")
    return shard, flat - np.concatenate([[0], np.cumsum(sizes)])[shard]


def load_batch(shards, shard_ids, offsets):
    """Stack windows into (x, y) on the device: pinned memory and a non-blocking copy on CUDA."""
    data = torch.from_numpy(np.stack([shards[s][o:o + T + 1].astype(np.int64) for s, o in zip(shard_ids, offsets)]))
    if device_type == "cuda":
        data = data.pin_memory().to(device, non_blocking=True)
    else:
        data = data.to(device)
    return data[:, :-1], data[:, 1:]


def get_batch(step, micro):
    """This process's share of micro-step `micro` of optimizer step `step`."""
    shard, offset = training_windows(step)
    first = (micro * world_size + rank) * batch_size
    return load_batch(splits["train"], shard[first:first + batch_size], offset[first:first + batch_size])


# -----------------------------------------------------------------------------
# optimizer

blocks = [m for m in model.modules() if isinstance(m, Block)]  # the MTP modules' too
sliding = [m.attn.span for m in blocks if isinstance(getattr(m.attn, "span", None), SlidingSpan)]  # window_warmup's
if activation_checkpointing:
    checkpoint_blocks(blocks)
if fsdp:  # before the optimizer, which then holds the sharded parameters
    shard_model(model, blocks, device, dtype)
else:
    model.to(device)
iter_num = checkpoint["step"] if checkpoint else 0
try:
    optim = configure_optimizers(model, optimizer, learning_rate, weight_decay, (beta1, beta2), device_type,
                                 muon_lr, muon_momentum, muon_lr_scale, embed_lr, head_lr, muon_schedule, normuon_beta2,
                                 cautious_wd)
except ValueError as e:
    fail(str(e))
if optimizer == "muonclip" and model.config.qk_norm:
    fail("optimizer='muonclip' scales q and k weights, which qk_norm normalizes away (QK-norm bounds the logits "
         "itself): use optimizer='muon'")
if optimizer == "muonclip" and not any(hasattr(m, "qk_clip") for m in model.modules()):
    fail("optimizer='muonclip' clips softmax attention logits, and this model has only linear attention: "
         "use optimizer='muon'")
qk_clip = QKClip(model, qk_clip_tau) if optimizer == "muonclip" else None
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
if checkpoint and not eval_only:
    if (checkpoint["config"]["optimizer"] == "adamw") != (optimizer == "adamw"):
        fail(f"checkpoint {checkpoint_path} holds the state of optimizer='{checkpoint['config']['optimizer']}', "
             f"which optimizer='{optimizer}' cannot continue")
    refuse_changed(("weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum", "muon_lr_scale", "embed_lr",
                    "head_lr", "muon_schedule", "normuon_beta2", "cautious_wd"), given, config, checkpoint["config"],
                   checkpoint_path)
    load_state(optim, checkpoint["optimizer"])  # any world size's, with or without FSDP
    if checkpoint["scaler"]:  # empty from a run without float16: a float16 resume starts its scaler afresh
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["rng"], rank, world_size, device_type)
raw_model = model
if compile:
    model = torch.compile(model, dynamic=False)  # the warm-ups' few shapes: a graph each, none slower for the others
if ddp and not fsdp:
    # broadcast_buffers=False: MoE routers count their experts' load in buffers, per process, until
    # update_router_biases sums them over processes; rank 0's counts must not overwrite the others' (torch's
    # deprecation warning says as much: its replacement still syncs buffers once, so it is silenced)
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                broadcast_buffers=False)
flops_per_token = raw_model.flops_per_token(T)
peak_flops = peak_flops or nominal_peak_flops(device)
# a budget picks the number of steps: the nearest whole step, within half a step of the budget
if train_flops > 0:
    max_iters = max(1, round(train_flops / (flops_per_token * tokens_per_step)))
elif train_tokens > 0:
    max_iters = max(1, round(train_tokens / tokens_per_step))
# a wall-clock budget: the steps are counted once the first ones are timed (a resumed run keeps that count); until
# then max_iters is a placeholder far away, so that warmup and then the peak learning rate apply
time_steps = train_minutes > 0 and not (checkpoint and checkpoint.get("timed_max_iters"))
if train_minutes > 0:
    max_iters = 10**9 if time_steps else checkpoint["timed_max_iters"]


def get_lr(step):
    min_lr = learning_rate * min_lr_frac
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if lr_schedule == "wsd":
        decay_start = max(warmup_iters, int(max_iters * (1 - decay_frac)))
        if step < decay_start:
            return learning_rate
        return learning_rate - (learning_rate - min_lr) * (step - decay_start) / max(1, max_iters - decay_start)
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))  # 'cosine'
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def doubling(step, warmup, smallest, largest):
    """A warm-up of a size: smallest, doubling at equal intervals of the first `warmup` of the steps, then largest.
    Short contexts first, whose gradients vary less early on (Li et al. 2022, arXiv 2108.06084, who truncate the
    windows): seq_warmup cuts each training window into pieces instead, so the tokens and their order stay those of
    the run without it; window_warmup (modded-nanogpt's attention window warm-up) narrows the sliding windows.
    Small batches first, while the gradient noise scale, the batch size past which larger batches stop paying, is
    small (McCandlish et al. 2018, arXiv 1812.06162: it grows as the loss falls): batch_warmup updates after fewer of
    a step's micro-steps, the same tokens again in the same order."""
    warm = warmup * max_iters
    if step >= warm:
        return largest
    return smallest << int(step / warm * math.log2(largest // smallest))


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
@gathered(raw_model)  # FSDP: the processes run different numbers of batches
def estimate_loss():
    """Mean loss over eval_iters random batches per split; the same batches at every evaluation."""
    full_windows()
    model.eval()
    out = {}
    for split, shards in splits.items():
        shard, offset = random_windows(shards, np.random.default_rng([seed, 1]), eval_iters * batch_size)
        total = 0.0
        for k in range(rank, eval_iters, world_size):
            x, y = load_batch(shards, shard[k * batch_size:(k + 1) * batch_size], offset[k * batch_size:(k + 1) * batch_size])
            with amp:
                total += raw_model(x, y)[1].item()
        out[split] = all_reduce_sum(total, device=device)[0] / eval_iters
    model.train()
    return out


def full_windows():
    """Evaluations see the model's own window, as a resumed run's and --eval_only's do: not window_warmup's, which
    each training step sets again."""
    for span in sliding:
        span.window = raw_model.config.window


def bits_per_byte(streams, n_bytes):
    """evaluate.py's exact bits per byte of token streams, split over the processes (raw_model in eval mode)."""
    with gathered(raw_model):
        return exact_bits_per_byte(raw_model, streams, n_bytes, meta["eos_id"], batch_size, amp, rank, world_size)


if eval_only:
    raw_model.eval()
    print0(f"exact val bits per byte: {bits_per_byte(val_streams, meta['splits']['val']['bytes']):.4f}")
    if eval_text is not None or tasks:
        try:
            tokenizer = Tokenizer.load(tokenizer_path)
        except (ValueError, ImportError) as e:
            fail(str(e))
    if eval_text is not None:
        bpb = bits_per_byte([np.array(tokenizer.encode(eval_text))], len(eval_text.encode("utf-8")))
        print0(f"exact bits per byte of {eval_file}: {bpb:.4f}")
    for path, path_tasks in tasks.items():
        with gathered(raw_model):
            acc, acc_norm = task_accuracy(raw_model, path_tasks, tokenizer, meta["eos_id"], amp, rank, world_size)
        print0(f"{path}: accuracy {acc:.4f}, length-normalized {acc_norm:.4f} ({len(path_tasks)} tasks)")
    raise SystemExit

# -----------------------------------------------------------------------------
# logging and checkpoints: nothing is written before this point


def start_run():
    """The run's files in out_dir, where sample.py finds the tokenizer beside the checkpoint; returns the run id."""
    if init_from != "resume" and os.path.exists(checkpoint_path):  # --overwrite=True: the old run's must not pass
        os.remove(checkpoint_path)                                  # for this one's
    copy_tokenizer(tokenizer_path, out_dir)
    trim_log(log_path, iter_num, lambda row: "loss" in row or "check_bpb" in row)  # a resume redoes neither
    # out_dir/run.json: config, code version, software, device, dataset; a resumed run keeps its id
    return write_manifest(out_dir, config, device, meta_path, checkpoint.get("run_id") if checkpoint else None)


run_id = on_master(start_run)
if master and wandb_log:
    wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
saved_step = checkpoint["step"] if checkpoint else None  # the step that ckpt.pt holds
# the run's training time over its resumes (see pause_clock) and the best exact val bits per byte of its target checks
train_seconds = checkpoint.get("train_seconds", 0.0) if checkpoint else 0.0
best_bpb = checkpoint.get("best_bpb", math.inf) if checkpoint else math.inf


def log(row):
    if master:
        try:
            with open(log_path, "a") as f:
                f.write(json.dumps({**row, "run_id": run_id}) + "\n")
        except OSError as e:
            fail(f"could not append to {log_path} ({e.strerror})")
        if wandb_log:
            wandb.log(row, step=row["step"])


def check_finite(losses):
    """Nothing non-finite is saved: unless the losses and every weight are finite, the run stops, keeping ckpt.pt."""
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if not finite_weights(raw_model, group=control):
        bad.append("weights")
    if bad:
        kept = f"{checkpoint_path} keeps step {saved_step}" if saved_step is not None else "nothing was saved"
        fail(f"the {' and the '.join(bad)} became non-finite at step {iter_num}: {kept}; lower learning_rate, or "
             "raise warmup_iters")


def save():
    global saved_step
    rngs = rng_states(device_type)
    model_state, optim_state = full_state(raw_model, optim, master)  # FSDP: gathered whole, by every process
    on_master(lambda: save_checkpoint(checkpoint_path, {
        "model": model_state, "optimizer": optim_state, "scaler": scaler.state_dict(),
        "model_config": asdict(raw_model.config), "config": config, "step": iter_num, "rng": rngs,
        "tokenizer": meta["tokenizer_path"], "eos_id": meta["eos_id"], "run_id": run_id, "dataset": dataset,
        "timed_max_iters": max_iters if train_minutes > 0 and not time_steps else 0,
        "train_seconds": train_seconds, "best_bpb": best_bpb,
        "checked_bpb": val_bpb if bpb_step == iter_num else None,  # this step's target check, if it had one
        "max_logit": max_logit}))
    saved_step = iter_num


def evaluate_and_save():
    pause_clock()
    losses = estimate_loss()
    val_bpb = losses["val"] * meta["splits"]["val"]["tokens"] / meta["splits"]["val"]["bytes"] / math.log(2)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else 0.0
    print0(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, val bpb {val_bpb:.4f}"
           + (f", peak memory {peak_mem:.1f} GiB" if peak_mem else ""))
    check_finite({"val loss": losses["val"], "train loss": losses["train"]})
    log({"step": iter_num, "tokens": iter_num * tokens_per_step, "train_loss": losses["train"],
         "val_loss": losses["val"], "val_bpb": val_bpb, "peak_mem_gib": peak_mem})
    if iter_num > 0:
        save()


interrupted = done = False  # Ctrl-C (SIGINT) was pressed; the steps are done


def on_interrupt(signum, frame):
    """Ctrl-C: the run stops at the end of its step with a checkpoint; after the last step, at once."""
    global interrupted
    if done:
        kept = f"{checkpoint_path} holds step {saved_step}" if saved_step is not None else "nothing was trained"
        fail(f"interrupted after the last step ({kept}): the final exact val bits per byte was not computed; "
             "--eval_only=True computes it")
    interrupted = True


def interrupt_agreed():
    """Whether any process was interrupted: a sum over them at every step, so that all stop at the same step."""
    return all_reduce_sum(float(interrupted), group=control)[0] > 0 if ddp else interrupted


# the step clock: ms/step and the training time leave out evaluations, checkpoints and logs; the training time (over
# the run's resumes) also leaves out each start's first two steps, which compile and warm up
step_seconds, clock = 0.0, None  # this process's time in steps; (time, step) at which the clock last started


def pause_clock():
    """Stop the step clock once the device has done the steps queued since it started."""
    global step_seconds, train_seconds, clock
    if clock is not None:
        loss.item()  # the host runs ahead of the device: wait for it before reading the clock
        elapsed = time.time() - clock[0]
        step_seconds += elapsed
        if clock[1] >= first_iter + 2:
            train_seconds += elapsed
        clock = None


def optimizer_step():
    """One optimizer update from the gradients summed since the last."""
    if fsdp:
        average_table_grads(raw_model)
    if grad_clip > 0:
        scaler.unscale_(optim)
        clip_grad_norm_(model.parameters(), grad_clip)  # optim.py's: Engram tables have sparse gradients
    scaler.step(optim)
    scaler.update()
    optim.zero_grad(set_to_none=True)
    update_router_biases(raw_model)  # MoE aux-loss-free balancing, from this update's loads (else nothing)


def exact_val_bpb():
    """The exact val bits per byte over the whole val split, off the step clock; the same on every process. A plain
    float (not numpy's): the checkpoint keeps the best one."""
    pause_clock()
    full_windows()
    raw_model.eval()
    bpb = float(bits_per_byte(val_streams, meta["splits"]["val"]["bytes"]))
    model.train()
    return bpb


# -----------------------------------------------------------------------------
# training loop

n_active = raw_model.num_params(active=True)  # MoE: the parameters one token goes through
active = f", {n_active / 1e6:.2f}M active per token" if n_active < raw_model.num_params() else ""
n_engram = raw_model.table_params()  # Engram's lookup tables, counted apart
active += f"; + {n_engram / 1e6:.2f}M in Engram tables" if n_engram else ""
print0(f"{raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(embedding=False) / 1e6:.2f}M non-embedding{active}), "
       f"{n_windows} training windows of {T} tokens, {tokens_per_step} tokens per step, "
       + (f"{train_minutes} minutes of steps, " if time_steps else f"{max_iters} steps, ") +
       f"{world_size} process(es) on {device} in {dtype}")
log({"step": iter_num, "params": raw_model.num_params(), "active_params": n_active, "engram_table_params": n_engram,
     "flops_per_token": flops_per_token,
     "tokens_per_step": tokens_per_step, "max_iters": max_iters,
     "device": torch.cuda.get_device_name(device) if device_type == "cuda" else device_type})  # read by ablate.py
x, y = get_batch(iter_num, 0)
t0, steps_since_log, logged_seconds, first_iter = time.time(), 0, 0.0, iter_num
start_seconds = train_seconds  # the training time of the steps before this start
val_bpb = bpb_step = None  # the last exact val bits per byte, and its step
if checkpoint and checkpoint.get("checked_bpb") is not None:  # the resumed step's check: a target it reached ends
    val_bpb, bpb_step = checkpoint["checked_bpb"], iter_num     # the run there, as it ended the interrupted one
# muonclip: each layer's largest attention logit at the last measured step, which the log rows repeat until the next
# one (qk_clip_interval > 1): the checkpoint keeps it, so that a resume logs what the uninterrupted run does (muon
# resuming a muonclip run measures none)
max_logit = checkpoint.get("max_logit") if checkpoint and qk_clip is not None else None
stopped = False  # by Ctrl-C, at the step boundary the processes agreed on
previous_handler = signal.signal(signal.SIGINT, on_interrupt)
try:
    while True:
        lr = get_lr(iter_num)
        for group in optim.param_groups:  # Muon's peak lr may differ from AdamW's: lr_ratio keeps their ratio
            group["lr"] = lr * group.get("lr_ratio", 1.0)
        if muon_momentum_warmup and hasattr(optim, "muon"):  # a low momentum first: the early gradients change fast
            warm = min(1.0, iter_num / muon_momentum_warmup)
            optim.muon.param_groups[0]["momentum"] = 0.85 + warm * (muon_momentum - 0.85)
        # target_bpb is checked every target_interval steps and at the last; not at the step a run resumes from, whose
        # checkpoint comes after that step's check
        if target_bpb > 0 and iter_num > first_iter and (iter_num % (target_interval or eval_interval) == 0
                                                         or iter_num >= max_iters):
            val_bpb, bpb_step = exact_val_bpb(), iter_num
            best_bpb = min(best_bpb, val_bpb)
            print0(f"step {iter_num}: exact val bits per byte {val_bpb:.4f}, target {target_bpb:g}, "
                   f"best {best_bpb:.4f}")
            log({"step": iter_num, "tokens": iter_num * tokens_per_step, "check_bpb": val_bpb,
                 "train_seconds": train_seconds})
        reached = bpb_step == iter_num and val_bpb <= target_bpb
        if iter_num % eval_interval == 0 or iter_num == max_iters or reached:
            evaluate_and_save()
        if iter_num >= max_iters or reached:
            break
        if interrupt_agreed():
            if saved_step != iter_num and iter_num > first_iter:
                pause_clock()
                check_finite({"training loss": loss.item()})
                save()
            stopped = True
            break
        if clock is None:
            clock = (time.time(), iter_num)
        clip_step = qk_clip is not None and iter_num % qk_clip_interval == 0
        if clip_step:  # QK-Clip measures the logits of this step's own forward passes
            qk_clip.track(True)
        length = doubling(iter_num, seq_warmup, seq_warmup_min, T)
        for span in sliding:  # a new width is a new mask (and, compiled, one more graph)
            span.window = doubling(iter_num, window_warmup, window_warmup_min, raw_model.config.window)
        micro_per_update = doubling(iter_num, batch_warmup, 1, gradient_accumulation_steps)
        # DDP all-reduces the gradients once per update, after its last micro-step; FSDP reduce-scatters them after
        # each, since skipping that would keep every process's whole gradients until the last
        for micro in range(gradient_accumulation_steps):
            update = (micro + 1) % micro_per_update == 0  # an optimizer update after this micro-step
            if ddp and not fsdp:
                model.require_backward_grad_sync = update
            with amp:
                _, loss, aux = model(x.reshape(-1, length), y.reshape(-1, length))
            if clip_step:
                qk_clip.observe(aux)
            # fetch the next batch while the GPU works on this one
            x, y = get_batch(*((iter_num, micro + 1) if micro + 1 < gradient_accumulation_steps else (iter_num + 1, 0)))
            scaler.scale(loss / micro_per_update).backward()
            if update:
                optimizer_step()
                if clip_step:
                    max_logit = qk_clip.clip()
        if clip_step:
            qk_clip.track(False)
        iter_num += 1
        steps_since_log += 1
        if iter_num == first_iter + 2:  # the training time counts from here
            pause_clock()
        if time_steps and iter_num == first_iter + 12:  # every process takes the same count: the mean step time
            pause_clock()
            # the mean elapsed time too: each process's own clock could give it another count, and the processes
            # would part at the end
            spent, elapsed = (value / world_size for value in
                              all_reduce_sum(train_seconds - start_seconds, time.time() - t0, device=device))
            per_step = spent / 10
            # a run resumed before its count has spent its earlier starts' training time (start_seconds) already
            max_iters = iter_num + max(0, int((60 * train_minutes - start_seconds - elapsed) / per_step))
            time_steps = False
            print0(f"wall-clock budget of {train_minutes} min at {per_step * 1000:.0f} ms/step: {max_iters} steps")
        if iter_num % log_interval == 0 or iter_num == max_iters:
            pause_clock()
            train_loss = loss.item()  # the last micro-batch's
            check_finite({"training loss": train_loss})
            dt = step_seconds - logged_seconds
            tokens_per_s = steps_since_log * tokens_per_step / dt
            mfu = flops_per_token * tokens_per_s / world_size / peak_flops if peak_flops else 0.0
            metrics, summary = aux_metrics(aux)  # the last micro-batch's router metrics and losses, MTP losses
            print0(f"step {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, {dt / steps_since_log * 1000:.0f} ms/step, "
                   f"{tokens_per_s:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else "")
                   + (f", max logit {max(max_logit):.1f}" if max_logit else ""))
            log({"step": iter_num, "tokens": iter_num * tokens_per_step, "loss": train_loss, "lr": lr,
                 "tokens_per_s": tokens_per_s, "mfu": mfu, **({"max_logit": max_logit} if max_logit else {}),
                 **metrics})
            if summary:
                print0(f"    {summary}")
            logged_seconds, steps_since_log = step_seconds, 0
    if not stopped:
        done = True
        if bpb_step != iter_num:
            val_bpb = exact_val_bpb()
        log({"step": iter_num, "tokens": iter_num * tokens_per_step, "exact_val_bpb": val_bpb,
             "train_seconds": train_seconds})
        print0(f"done: {iter_num} steps, {iter_num * tokens_per_step:,} tokens in {time.time() - t0:.0f} s (training "
               f"time {train_seconds:.1f} s); exact val bits per byte {val_bpb:.4f}; "
               + (f"checkpoint {checkpoint_path}" if saved_step is not None else "no step trained, so no checkpoint"))
        if target_bpb > 0:
            best_bpb, reached = min(best_bpb, val_bpb), val_bpb <= target_bpb
            log({"step": iter_num, "tokens": iter_num * tokens_per_step, "target_bpb": target_bpb,
                 "target_reached": reached, "best_bpb": best_bpb, "train_seconds": train_seconds})
            print0(f"target_bpb={target_bpb:g} " + (f"reached at step {iter_num}" if reached else
                                                    f"not reached in {iter_num} steps")
                   + f": {iter_num * tokens_per_step:,} tokens, {train_seconds:.1f} s of training steps; "
                   + (f"exact val bits per byte {val_bpb:.4f}" if reached else
                      f"the best exact val bits per byte was {best_bpb:.4f}"))
        if master:
            plot_log()
except torch.OutOfMemoryError:
    fail(f"out of memory at step {iter_num}: lower batch_size and raise gradient_accumulation_steps to keep the tokens per step")
except (ValueError, OSError) as e:  # the plot
    fail(str(e))
finally:
    signal.signal(signal.SIGINT, previous_handler)
if master and wandb_log:
    wandb.finish()  # before end_processes, which skips the exit handlers that would finish it
if stopped:
    print0(f"interrupted at step {iter_num}: " + (f"saved {checkpoint_path}; resume with --init_from=resume"
           if saved_step == iter_num else "no step trained, so nothing to save"), file=sys.stderr)
if ddp:
    end_processes(130 if stopped else 0)
if stopped:
    raise SystemExit(130)
