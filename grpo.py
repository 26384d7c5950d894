"""
Post-training on verifiable tasks: supervised fine-tuning (SFT) and GRPO, from a checkpoint of train.py or grpo.py,
or a Hugging Face folder.

    python grpo.py --mode=tasks --task=addition                            # write the task files (train + held-out)
    python grpo.py config/grpo_addition.py --init_from=out/addition_pretrain  # GRPO
    python grpo.py --mode=sft --init_from=out/base --sft_data=data/tasks/addition_train.jsonl --chat=True
    python grpo.py --mode=eval --init_from=out/grpo_addition                # greedy pass@1, sampled pass@k (held-out)
    torchrun --standalone --nproc_per_node=2 grpo.py config/grpo_addition.py  # DDP
    torchrun --standalone --nproc_per_node=2 grpo.py config/grpo_addition.py --fsdp=True  # FSDP2, as train.py's

GRPO's objective and its pieces are in rl.py (DeepSeekMath, arXiv 2402.03300 §4.1). Every default below can be
changed by a config file and --key=value, as in train.py. One run owns its out_dir: a second run there is refused,
and so is a fresh run into a folder that holds one unless overwrite=True. Ctrl-C stops at the end of the step with a
checkpoint that --init_from=resume continues exactly.
"""
import copy
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict

# Ctrl-C outside the steps (which save a checkpoint on it) stops in one line: every file is written whole (atomic)
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit("error: interrupted outside the training steps: "
                                                            "no step was lost"))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import (all_reduce_sum, atomic_write, autocast, average_table_grads, check_fsdp, check_settings,
                          checkpoint_blocks, claim_out_dir, copy_tokenizer, end_processes, fail, finite_weights,
                          gathered, init_processes, parse_config, pick_device, pick_dtype, print0, read_log,
                          refuse_changed, restore_rng, rng_states, save_checkpoint, save_plot, shard_model,
                          trim_log)
from evaluate import token_logprobs
from hf import load_model
from model import Block
from optim import clip_grad_norm_, configure_optimizers, full_state, load_state
from rl import (ANSWER_MARKER, TASKS, extract_answer, group_advantages, has_format, layout, load_reward, policy_loss,
                problems, sample_completions)
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# defaults
# what to do
mode = "grpo"                 # 'grpo'; 'sft' (on sft_data); 'eval' (held-out pass@1, pass@k); 'tasks' (write task files)
init_from = "out"             # a folder (or ckpt.pt) of train.py or grpo.py, 'resume' (continue out_dir), or 'hf:FOLDER'
out_dir = "out/grpo"          # checkpoint, log.jsonl and grpo.png go here
overwrite = False             # a fresh run replaces the run (ckpt.pt, log.jsonl) that out_dir holds; else it stops
tokenizer = ""                # tokenizer.model, 'gpt2' or a HF folder; '' = the one beside the checkpoint (hf: the folder's)
block_size = 1024             # init_from='hf:...': the context the model is loaded with (0 = the folder's own), as sample.py
# task and reward
task = "addition"             # 'addition' (two operands of 1 to 3 digits) or 'reverse' (a list of 3 to 6 letters)
chat = False                  # prompts in the chat template (<|user|> ... <|end|><|assistant|>), completions end at <|end|>
reward = ""                   # 'module:function' (prompt, completion) -> float instead of the task's exact match
format_reward = 0.0           # added to the reward of a completion that is exactly '#### <answer-shaped text>'
n_eval = 500                  # held-out prompts in each evaluation (0: none, e.g. SFT on your own data)
eval_k = 8                    # sampled pass@k in mode 'eval': k completions per prompt at `temperature`
eval_batch_size = 512         # prompts per generate call when evaluating
task_dir = "data/tasks"       # mode 'tasks' writes <task>_train.jsonl and <task>_held_out.jsonl here
n_task_examples = 100000      # mode 'tasks': rows of <task>_train.jsonl
# rollouts
prompts_per_step = 32         # prompts per optimizer step, over all processes
group_size = 8                # G: completions sampled per prompt
max_completion_length = 16    # new tokens per completion at most
temperature = 1.0             # sampling temperature; the log-probs divide the logits by it too
# objective
loss_agg = "dapo"             # 'grpo' (completion means, then their mean), 'dapo' (token mean), 'dr_grpo' (see policy_loss)
mu = 1                        # inner iterations: optimizer steps over the same rollouts
eps = 0.2                     # clip range below (and above, unless eps_high)
eps_high = 0.0                # DAPO's separate upper clip (e.g. 0.28); 0 = eps
beta = 0.0                    # weight of the k3 KL to the frozen reference; 0 = no reference model at all
micro_batch_size = 0          # rollouts per forward/backward (gradients accumulate); 0 = all at once
# SFT
sft_data = ""                 # JSONL of {"prompt": ..., "response": ...} rows; the loss is on the response tokens only
batch_size = 32               # SFT: pairs per optimizer step, over all processes
# optimizer and schedule
optimizer = "adamw"           # 'adamw' or 'muon' (optim.py, as in train.py)
learning_rate = 1e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0               # clip the global gradient norm to this (0 = off)
warmup_iters = 10             # linear warmup, then constant
max_iters = 500               # optimizer steps (GRPO: rollout batches; SFT: batches of pairs)
max_minutes = 0.0             # GRPO: also stop (evaluate and save) after this many minutes; 0 = no limit
eval_interval = 50            # evaluate on the held-out split and save a checkpoint every this many steps
log_interval = 1
# system
device = "auto"
dtype = "auto"
seed = 1337
fsdp = False                  # under torchrun: FSDP2 instead of DDP, as in train.py (the policy and its reference)
activation_checkpointing = False  # each block's activations recomputed in the backward pass, as in train.py
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, (int, float, bool, str))}
config, given = parse_config(defaults, sys.argv[1:], with_given=True)
globals().update(config)
EVAL_SEED = 0  # the held-out prompts of every evaluation, whatever the run's seed
# every setting in its range before anything is loaded or written (0 stays valid where it means none or all)
check_settings(config, positive=("eval_batch_size", "prompts_per_step", "group_size", "max_completion_length", "mu",
                                 "batch_size", "eval_interval", "log_interval"),
               non_negative=("n_eval", "eval_k", "n_task_examples", "block_size", "temperature", "eps_high", "beta",
                             "micro_batch_size", "learning_rate", "weight_decay", "grad_clip", "warmup_iters",
                             "max_iters", "max_minutes", "format_reward"),
               fractions=("beta1", "beta2", "eps"),  # eps > 1: a lower clip 1 - eps below 0, which clips nothing
               choices={"mode": ("grpo", "sft", "eval", "tasks"), "task": tuple(TASKS),
                        "loss_agg": ("grpo", "dapo", "dr_grpo")})
if mode == "grpo" and group_size < 2:
    fail(f"GRPO compares the completions of each prompt: group_size={group_size} must be at least 2")
if mode == "grpo" and temperature <= 0:
    fail(f"GRPO samples its groups: temperature={temperature} must be above 0")
if mode == "eval" and not n_eval:
    fail("mode='eval' scores held-out prompts: n_eval must be at least 1")
if mode == "eval" and eval_k and temperature <= 0:  # k greedy copies of one completion: pass@k would be pass@1
    fail(f"sampled pass@{eval_k} samples at temperature={temperature}: it must be above 0, or eval_k=0 for none")
eps_high = eps_high or eps

try:  # the held-out prompts of every evaluation, and mode 'tasks''s training rows, before anything is written
    eval_problems = problems(task, True, EVAL_SEED, n_eval)
    train_problems = problems(task, False, seed, n_task_examples) if mode == "tasks" else None
except ValueError as e:
    fail(str(e))

if mode == "tasks":
    # one file per side of the split; a row's "text" (prompt + response) is what prepare.py --input reads, its
    # "prompt" and "response" what --mode=sft reads
    for side, drawn in (("train", train_problems), ("held_out", eval_problems)):
        path = os.path.join(task_dir, f"{task}_{side}.jsonl")
        pairs = [(prompt, f"{ANSWER_MARKER} {answer}") for prompt, answer in drawn]
        rows = "".join(json.dumps({"prompt": p, "response": r, "text": p + r}) + "\n" for p, r in pairs)
        try:
            os.makedirs(task_dir, exist_ok=True)
            atomic_write(path, lambda f: f.write(rows.encode()))
        except OSError as e:
            fail(str(e))
        print(f"wrote {len(pairs):,} {task} problems to {path}")
    raise SystemExit

# -----------------------------------------------------------------------------
# processes, device, precision

ddp, rank, world_size, device = init_processes(pick_device(device))  # ddp: under torchrun, with DDP or FSDP
device_type = device.split(":")[0]
master = rank == 0


def rounded_up(name, value):
    """Each process takes whole groups (GRPO) or pairs (SFT): a count that is not a multiple of the processes is
    rounded up to one, with a note, as train.py rounds gradient_accumulation_steps, so that a config runs anywhere."""
    rounded = -(-value // world_size) * world_size
    if rounded != value:
        print0(f"{name}={value} rounded up to {rounded}, a multiple of the {world_size} processes (each takes "
               f"{rounded // world_size})")
    return rounded


if mode == "grpo":
    prompts_per_step = rounded_up("prompts_per_step", prompts_per_step)
elif mode == "sft":
    batch_size = rounded_up("batch_size", batch_size)
dtype = pick_dtype(device, dtype)
if fsdp:
    check_fsdp(ddp, dtype)
amp = autocast(device, dtype)
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True

# -----------------------------------------------------------------------------
# out_dir: this run's alone

resume = init_from == "resume"
checkpoint_path = os.path.join(out_dir, "ckpt.pt")
log_path = os.path.join(out_dir, "log.jsonl")
if mode != "eval" and master:  # out_dir is held until the process ends, however it ends
    try:
        claim_out_dir(out_dir, resume, overwrite)
    except (ValueError, OSError) as e:
        fail(str(e))

# -----------------------------------------------------------------------------
# the policy: a checkpoint of train.py or grpo.py, this run's own checkpoint, or a Hugging Face folder

try:
    policy, tokenizer_path, checkpoint = load_model(checkpoint_path if resume else init_from, block_size)
    made = checkpoint["config"].get("mode") if resume else mode  # train.py's config has no mode
    if made != mode and mode != "eval":
        raise ValueError(f"{checkpoint_path} is not a grpo.py --mode={mode} run: " + (
            f"resume it with --mode={made}" if made else f"train.py wrote it; start from it with --init_from={out_dir} "
            "and another out_dir, or resume it with train.py"))
    start_from = checkpoint["config"]["init_from"] if resume else init_from  # the reference model is this one
    tokenizer_path = tokenizer or tokenizer_path
    tok = Tokenizer.load(tokenizer_path)
    reference = load_model(start_from, block_size)[0] if mode == "grpo" and beta > 0 and resume else None
except (ValueError, ImportError) as e:
    fail(str(e))
if tok.vocab_size > policy.config.vocab_size:
    fail(f"the tokenizer's {tok.vocab_size} ids do not fit the model's vocab_size={policy.config.vocab_size}")
if chat and tok.special["user"] is None:
    fail(f"chat=True needs nanollm's chat markers, which the tokenizer {tokenizer_path} does not have")
stop_id = tok.special["end"] if chat else tok.eos_id
# documents follow an end-of-document token in our shards; a Hugging Face model's begin with its bos, if any
first = tok.bos_id if tok.kind == "hf" else tok.eos_id
# In GRPO the policy stays in eval mode: no dropout, so that the update's log-probs are those of sampling, and
# dropless MoE layers (their balance losses and the MTP modules play no part in GRPO). SFT trains in train mode.
if mode == "grpo" and beta > 0:
    reference = (reference or copy.deepcopy(policy)).eval().requires_grad_(False)
for net in (policy, reference) if reference is not None else (policy,):
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    if activation_checkpointing and net is policy:
        checkpoint_blocks(blocks)
    if fsdp:  # the reference too: its forwards come in the same number on every process (see the micro-batches)
        shard_model(net, blocks, device, dtype)
    else:
        net.to(device)
policy.eval()


def encode_prompt(text, generated=True):
    """Prompt ids: a document's first token, then the text (inside the chat markers with chat=True); a prompt to
    generate from leaves room for max_completion_length tokens (an SFT pair's length is checked whole instead)."""
    ids = [] if first is None else [first]
    if chat:
        ids += [tok.special["user"], *tok.encode(text), tok.special["end"], tok.special["assistant"]]
    else:
        ids += tok.encode(text)
    if generated and len(ids) + max_completion_length > policy.config.block_size:
        fail(f"a prompt of {len(ids)} tokens plus max_completion_length={max_completion_length} exceeds the "
             f"model's block_size={policy.config.block_size}")
    return ids


eval_prompts = [encode_prompt(p) for p, _ in eval_problems]  # and so their lengths are checked before the run
try:
    user_reward = load_reward(reward) if reward else None
except ValueError as e:
    fail(str(e))

# SFT's pairs, read whole before anything is written
if mode == "sft":
    if not os.path.isfile(sft_data):
        fail(f"sft_data {sft_data!r} not found: give a JSONL file of {{\"prompt\": ..., \"response\": ...}} rows")
    pairs, held_out = [], {prompt for prompt, _ in eval_problems}  # what the held-out accuracy scores
    with open(sft_data, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                if not all(isinstance(row[key], str) for key in ("prompt", "response")):
                    raise TypeError
                pairs.append((encode_prompt(row["prompt"], generated=False), tok.encode(row["response"]) + [stop_id]))
            except UnicodeDecodeError:
                fail(f"{sft_data} line {number} is not UTF-8 text: save the file as UTF-8")
            except (ValueError, KeyError, TypeError):
                fail(f"{sft_data} line {number} is not a JSON object with 'prompt' and 'response' strings")
            if row["prompt"] in held_out:
                fail(f"{sft_data} line {number} holds the held-out prompt {row['prompt']!r}, which the held-out "
                     f"accuracy would score after training on it: train on {task}_train.jsonl, or give n_eval=0")
            tokens = sum(map(len, pairs[-1]))  # a row of layout()'s, of at most block_size + 1
            if tokens - 1 > policy.config.block_size:
                fail(f"{sft_data} line {number}: prompt and response hold {tokens} tokens, more than the model's "
                     f"block_size={policy.config.block_size} + 1")
    if not pairs:
        fail(f"{sft_data} holds no prompt/response pair")


def score(prompt, completion, answer):
    """(reward, correct) of one completion (ids); the stop token is cut off before its text is scored, and so are
    ids past the tokenizer's (the model's vocabulary is rounded up), which are no text."""
    text = tok.decode([i for i in completion if i != stop_id and i < tok.vocab_size])
    correct = extract_answer(text) == answer
    try:
        r = user_reward(prompt, text) if reward else float(correct)
    except ValueError as e:  # not a finite number: the run stops before it trains on it
        fail(str(e))
    return r + format_reward * has_format(text, task), correct


@torch.no_grad()
@gathered(policy)  # FSDP: each process generates its own share, and generation stops early: no collectives inside
def evaluate(k=0):
    """Greedy pass@1 on the held-out prompts, and with k > 0 sampled pass@k (one of k completions correct)."""
    generator = torch.Generator(device).manual_seed(seed + rank)
    mine, mine_prompts = eval_problems[rank::world_size], eval_prompts[rank::world_size]
    greedy = sampled = 0
    for start in range(0, len(mine), eval_batch_size):
        chunk, prompts = mine[start:start + eval_batch_size], mine_prompts[start:start + eval_batch_size]
        with amp:
            best = sample_completions(policy, prompts, 1, max_completion_length, 0.0, stop_id)
            tries = sample_completions(policy, prompts, k, max_completion_length, temperature, stop_id,
                                       generator) if k else []
        greedy += sum(score(p, c, a)[1] for (p, a), c in zip(chunk, best))
        sampled += sum(any(score(p, c, a)[1] for c in tries[i * k:(i + 1) * k]) for i, (p, a) in enumerate(chunk))
    greedy, sampled = all_reduce_sum(greedy, sampled, device=device)
    name = f"pass@{k}" if k > 1 else "sampled pass@1"  # k = 1: not the greedy pass@1's key, which it would replace
    return {"pass@1": greedy / n_eval, **({name: sampled / n_eval} if k else {})}


if mode == "eval":
    result = evaluate(eval_k)
    print0(f"{task} held-out, {n_eval} prompts: " + ", ".join(f"{k} {value:.4f}" for k, value in result.items()))
    raise SystemExit

# -----------------------------------------------------------------------------
# optimizer, logs, checkpoints

if optimizer == "muonclip":
    fail("optimizer='muonclip' is train.py's (QK-Clip needs its logit measurements): use 'adamw' or 'muon'")
try:
    optim = configure_optimizers(policy, optimizer, learning_rate, weight_decay, (beta1, beta2), device_type)
except ValueError as e:
    fail(str(e))
iter_num = 0
if resume:
    refuse_changed(("weight_decay", "beta1", "beta2"), given, config, checkpoint["config"], checkpoint_path)
    try:
        load_state(optim, checkpoint["optimizer"])  # any world size's, with or without FSDP
    except (ValueError, KeyError, IndexError) as e:
        fail(f"the optimizer state in {checkpoint_path} does not fit optimizer={optimizer} ({e}): resume with the "
             "run's own settings")
    iter_num = checkpoint["step"]
    restore_rng(checkpoint.get("rng"), rank, world_size, device_type)
model = DDP(policy, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
            broadcast_buffers=False) if ddp and not fsdp else policy

if master:
    try:
        if overwrite and not resume and os.path.exists(checkpoint_path):
            os.remove(checkpoint_path)  # the replaced run's (its log is emptied below): the folder holds one run
        saved_tokenizer = copy_tokenizer(tok.path, out_dir)  # sample.py and grpo.py find it beside the checkpoint
        trim_log(log_path, iter_num, lambda row: "eval_accuracy" not in row)
    except (ValueError, OSError) as e:
        fail(str(e))


def diverged(what):
    """Stop before a NaN or an infinity is logged or saved: the last checkpoint stays as it was."""
    kept = f"{checkpoint_path} is kept as it was" if os.path.exists(checkpoint_path) else "nothing was saved"
    fail(f"{what} at step {iter_num}: training diverged; {kept} (lower learning_rate, or look at the reward)")


def log(row):
    """Append a row to log.jsonl on process 0; every process stops at a non-finite value (they all have it)."""
    bad = [key for key, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        diverged(f"{bad[0]} is {row[bad[0]]}")
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def check_weights():
    """Every process checks its replica (under FSDP its shards, agreeing): all of them stop together."""
    if not finite_weights(policy, device=device):
        diverged("a weight is not finite")


def save():
    """This step's checkpoint, atomically, of finite weights only; at step 0 the model is init_from's own."""
    if iter_num == 0:
        return
    check_weights()
    rngs = rng_states(device_type)  # the dropout streams of SFT, which trains in train mode
    model_state, optim_state = full_state(policy, optim, master)  # FSDP: gathered whole, by every process
    if master:
        try:
            save_checkpoint(checkpoint_path, {
                "model": model_state, "optimizer": optim_state, "model_config": asdict(policy.config),
                "config": {**config, "init_from": start_from}, "step": iter_num, "eos_id": tok.eos_id,
                "tokenizer": saved_tokenizer, "rng": rngs})
        except OSError as e:
            fail(str(e))


def evaluate_and_save():
    if iter_num > 0:
        check_weights()  # before the evaluation of a diverged model is logged
    if n_eval:
        accuracy = evaluate()["pass@1"]
        print0(f"step {iter_num}: held-out greedy accuracy {accuracy:.4f}")
        log({"step": iter_num, "eval_accuracy": accuracy})
    save()


interrupts = []  # Ctrl-C (SIGINT) was pressed: the run stops at the end of the step, with a checkpoint


def interrupted():
    """Whether any process had a Ctrl-C: every process asks at the same step boundary, so they all stop there."""
    return all_reduce_sum(float(bool(interrupts)), device=device)[0] > 0


def step_boundary(due, last):
    """Between steps: evaluate and save when due; returns (the run ends here, by a Ctrl-C). The Ctrl-C is asked
    after the evaluation, as train.py does: one pressed amid it trains no further step."""
    if due:
        evaluate_and_save()
    if last:
        return True, False
    if interrupted():
        if not due:
            save()
        return True, True
    return False, False


def finish(stopped):
    """The last line of an interrupted run, and the process group's end."""
    if stopped:
        print0(f"interrupted at step {iter_num}: " + (f"saved {checkpoint_path}; resume with --init_from=resume"
               if iter_num else "no step trained, so nothing to save"), file=sys.stderr)
    if ddp:
        end_processes(130 if stopped else 0)
    raise SystemExit(130 if stopped else 0)  # 130: the shell's code for a Ctrl-C


def plot():
    """out_dir/grpo.png: each step's mean reward (or SFT loss) and the held-out accuracy."""
    rows = read_log(log_path)
    lines = [(label, [(r["step"], r[key]) for r in rows if key in r], {"marker": "o"} if key == "eval_accuracy" else {})
             for key, label in (("reward", "mean reward of the rollouts"), ("loss", "SFT loss"),
                                ("eval_accuracy", "held-out greedy accuracy"))]
    save_plot(os.path.join(out_dir, "grpo.png"), f"{mode} on {task}: {out_dir}", [("step", "", lines)])


def optimizer_step(step):
    """Linear warmup, then a constant learning rate."""
    for group in optim.param_groups:
        group["lr"] = learning_rate * min(1.0, (step + 1) / (warmup_iters + 1)) * group.get("lr_ratio", 1.0)
    if fsdp:
        average_table_grads(policy)
    if grad_clip > 0:
        clip_grad_norm_(model.parameters(), grad_clip)  # optim.py's: Engram tables have sparse gradients
    optim.step()
    optim.zero_grad(set_to_none=True)


signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))

# -----------------------------------------------------------------------------
# SFT: the next-token loss on the response tokens (and the stop token) of prompt/response pairs

if mode == "sft":
    epoch_orders = {}

    def pair(i):
        """The run's i-th pair: every epoch is a seeded shuffle, so no world size or resume changes the order."""
        epoch = i // len(pairs)
        if epoch not in epoch_orders:
            epoch_orders[epoch] = random.Random(seed + epoch).sample(range(len(pairs)), len(pairs))
        return pairs[epoch_orders[epoch][i % len(pairs)]]

    per_process = batch_size // world_size
    t_last = time.time()
    while True:
        done, stopped = step_boundary(iter_num % eval_interval == 0 or iter_num == max_iters, iter_num >= max_iters)
        if done:
            break
        offset = iter_num * batch_size + rank * per_process
        batch = [pair(i) for i in range(offset, offset + per_process)]
        idx, targets = layout([p for p, _ in batch], [r for _, r in batch], tok.pad_id)
        policy.train()
        # the mean over this process's response tokens, weighted by their share of the step's, so that the processes'
        # average (DDP's, FSDP's) is the step's token mean, as one process computes it
        mine = int((targets >= 0).sum())
        share = mine * world_size / all_reduce_sum(mine, device=device)[0]
        with amp:
            loss = model(idx.to(device), targets.to(device))[1] * share
        loss.backward()
        optimizer_step(iter_num)
        policy.eval()
        iter_num += 1
        if iter_num % log_interval == 0 or iter_num == max_iters:
            loss = all_reduce_sum(loss.item(), device=device)[0] / world_size
            dt = (time.time() - t_last) / log_interval
            print0(f"step {iter_num}: loss {loss:.4f}, {dt * 1000:.0f} ms/step")
            log({"step": iter_num, "loss": loss, "step_s": dt})
            t_last = time.time()
    if master and not stopped:
        plot()
    finish(stopped)

# -----------------------------------------------------------------------------
# GRPO

per_process = prompts_per_step // world_size
print0(f"GRPO on {task}: {policy.num_params() / 1e6:.2f}M parameters, {prompts_per_step} prompts x {group_size} "
       f"completions per step, {max_iters} steps, loss_agg={loss_agg}, beta={beta}, {world_size} process(es) on "
       f"{device} in {dtype}")
t_start = time.time()
while True:
    # with max_minutes, every process stops at the first step where process 0 has run out of time
    over = float(master and time.time() - t_start > 60 * max_minutes)
    out_of_time = max_minutes > 0 and all_reduce_sum(over, device=device)[0]
    last = iter_num >= max_iters or out_of_time
    done, stopped = step_boundary(iter_num % eval_interval == 0 or last, last)
    if done:
        break

    # rollouts: this process's share of the step's prompts (drawn from the step number: the same on resume)
    t0 = time.time()
    batch = problems(task, False, seed * 1_000_003 + iter_num, prompts_per_step)[rank * per_process:][:per_process]
    prompts = [encode_prompt(p) for p, _ in batch]
    generator = torch.Generator(device).manual_seed((seed * 1_000_003 + iter_num) * world_size + rank)
    with amp, gathered(policy):  # FSDP: the whole policy on every process while it generates
        completions = sample_completions(policy, prompts, group_size, max_completion_length, temperature,
                                         stop_id, generator)
    rollout_time = time.time() - t0  # the completions are on the host: the device is done, so this is real time
    scored = [score(batch[i // group_size][0], c, batch[i // group_size][1]) for i, c in enumerate(completions)]
    rewards = torch.tensor([r for r, _ in scored])
    # a group whose completions all scored alike has no advantage: it is skipped (and counted)
    advantages, zero_variance = group_advantages(rewards, group_size, scale=loss_agg != "dr_grpo")
    keep = (~zero_variance).repeat_interleave(group_size).nonzero().flatten().tolist()
    lengths = [len(c) for c in completions]
    n_completions, n_tokens = all_reduce_sum(len(keep), sum(lengths[i] for i in keep), device=device)

    t1 = time.time()
    kl_sum = clip_sum = 0.0
    if n_completions > 0:
        # a process left with no rollout still joins DDP's gradient all-reduce: one rollout, weighted 0
        rows, weight = (keep, 1.0) if keep else ([0], 0.0)
        size = micro_batch_size or len(rows)
        micro = []  # per micro-batch: idx, targets, advantages, reference log-probs, old log-probs, weight
        for start in range(0, len(rows), size):
            part = rows[start:start + size]
            idx, targets = layout([prompts[i // group_size] for i in part], [completions[i] for i in part],
                                  tok.pad_id)
            micro.append([idx.to(device), targets.to(device), advantages[part].to(device), None, None, weight])
        if fsdp:  # each forward and backward gathers the shards: every process takes as many, its extra ones weighted 0
            t = torch.tensor([len(micro)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            micro += [[*micro[0][:3], None, None, 0.0] for _ in range(int(t) - len(micro))]
        if reference is not None:
            for m in micro:
                with torch.no_grad(), amp:
                    m[3] = token_logprobs(reference, m[0], m[1], temperature)
        for _ in range(mu):
            for m, (idx, targets, adv, ref_logprobs, old_logprobs, weight) in enumerate(micro):
                if ddp and not fsdp:  # all-reduce the gradients once, after the last micro-batch
                    model.require_backward_grad_sync = m == len(micro) - 1
                with amp:
                    logprobs = token_logprobs(model, idx, targets, temperature)
                if old_logprobs is None:
                    # pi_old is the policy before the step's first update, so at the first inner iteration it is
                    # this very forward (rho = 1 exactly); the later iterations reuse it
                    old_logprobs = micro[m][4] = logprobs.detach()
                loss, kl, clipped = policy_loss(logprobs, old_logprobs, ref_logprobs, adv, (targets >= 0).float(),
                                                eps, eps_high, beta, loss_agg, n_completions, n_tokens,
                                                max_completion_length)
                (loss * weight * world_size).backward()  # DDP averages over processes; the normalizers are global
                kl_sum += kl.item() * weight / mu
                clip_sum += clipped.item() * weight / mu
            optimizer_step(iter_num)
    update_time = time.time() - t1
    iter_num += 1

    if iter_num % log_interval == 0 or iter_num == max_iters:
        n = prompts_per_step * group_size
        totals = all_reduce_sum(rewards.sum().item(), rewards.square().sum().item(), sum(c for _, c in scored),
                                sum(lengths), zero_variance.sum().item(), kl_sum, clip_sum, rollout_time,
                                update_time, device=device)
        reward_sum, reward_sq, correct, tokens, n_zero, kl_sum, clip_sum, rollout_time, update_time = totals
        mean = reward_sum / n
        row = {"step": iter_num, "reward": mean, "reward_std": math.sqrt(max(0.0, reward_sq / n - mean**2)),
               "accuracy": correct / n, "kl": kl_sum / max(1.0, n_tokens),
               "clip_frac": clip_sum / max(1.0, n_tokens),
               "completion_len": tokens / n, "zero_variance_groups": int(n_zero),
               "rollout_s": rollout_time / world_size, "update_s": update_time / world_size,
               "rollout_tokens_per_s": tokens / rollout_time * world_size}
        print0(f"step {iter_num}: reward {mean:.3f} ± {row['reward_std']:.3f}, accuracy {row['accuracy']:.3f}, "
               f"kl {row['kl']:.4f}, clip {row['clip_frac']:.3f}, length {row['completion_len']:.1f}, "
               f"zero-variance groups {int(n_zero)}, rollout {row['rollout_s'] * 1000:.0f} ms "
               f"({row['rollout_tokens_per_s']:,.0f} tokens/s), update {row['update_s'] * 1000:.0f} ms")
        log(row)
if master and not stopped:
    rows = read_log(log_path)
    accuracy = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    speed = [r["rollout_tokens_per_s"] for r in rows if "rollout_tokens_per_s" in r]
    print(f"done: step {iter_num} after {time.time() - t_start:.0f} s of GRPO"
          + (f"; held-out greedy accuracy {accuracy[0]:.4f} -> {accuracy[-1]:.4f}" if accuracy else "")
          + (f"; rollouts {sum(speed) / len(speed):,.0f} tokens/s (mean over steps)" if speed else ""))
    plot()
finish(stopped)
