"""
Sample from a trained model, streaming the text as it is produced.

    python sample.py --out_dir=out/quickstart --start="def "
    python sample.py --out_dir=out/quickstart --start=FILE:prompt.txt --num_samples=1 --temperature=0
    python sample.py --init_from=hf:path/to/Qwen3-0.6B --start="The capital of France is" --block_size=512
    python sample.py --out_dir=out/deepseek_small --prompts_file=prompts.txt --compile=True --speculative=True
"""
import sys
import time

import torch

from configurator import autocast, check_settings, fail, parse_config, pick_device, pick_dtype, read_text
from decode import generate
from hf import load_model
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
init_from = "resume"          # 'resume' (the checkpoint in out_dir) or 'hf:FOLDER' (a Hugging Face model folder)
out_dir = "out"               # folder holding ckpt.pt (and tokenizer.model) written by train.py
block_size = 1024             # hf: the longest context (RoPE tables and decode cache); 0 = the folder's own
start = ""                    # the prompt, or FILE:path to read it from a file
prompts_file = ""             # or a file of prompts, one per line, decoded together as one batch (printed when done)
num_samples = 3
max_new_tokens = 200
temperature = 0.8             # 0 = greedy
top_k = 200                   # keep the k most likely tokens (0 = all)
top_p = 1.0                   # nucleus sampling: keep the smallest set with this much probability (1.0 = all)
seed = 1337
device = "auto"
dtype = "auto"
compile = False               # capture the decode step as one CUDA graph (torch.compile); the first sample compiles it
speculative = False           # self-speculative decoding: the MTP module drafts, one forward verifies (mtp_depth >= 1)
stream = True                 # print a single prompt's text as it comes (a host sync per token); False: when done,
                              # so that tokens/s is the decoding's own (a batch of prompts always prints when done)
# -----------------------------------------------------------------------------
config = parse_config({k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))},
                      sys.argv[1:])
globals().update(config)
if init_from != "resume" and not init_from.startswith("hf:"):
    fail(f"unknown init_from '{init_from}' (choose resume or hf:FOLDER)")
# 0 stays valid for top_k (all tokens) and temperature (greedy); top_p is the share of probability kept
check_settings(config, positive=("num_samples", "max_new_tokens"), non_negative=("top_k", "block_size", "temperature"),
               fractions=("top_p",))

try:  # the prompts, before a model is loaded
    if start.startswith("FILE:"):
        start = read_text(start[5:], "prompt file")
    starts = [start]
    if prompts_file:
        starts = [line for line in read_text(prompts_file, "prompts file").split("\n") if line.strip()]
except ValueError as e:
    fail(str(e))
if not starts:
    fail(f"{prompts_file} holds no prompt")

device = pick_device(device)
dtype = pick_dtype(device, dtype)
amp = autocast(device, dtype)
try:  # a checkpoint and the tokenizer beside it, or a Hugging Face folder's model and its own tokenizer, as they are
    model, tokenizer_path, _ = load_model(out_dir if init_from == "resume" else init_from, block_size)
    tokenizer = Tokenizer.load(tokenizer_path)
except (ValueError, ImportError) as e:
    fail(str(e))
model.eval().to(device)
if dtype != "float32":  # weights in bf16/fp16: autocast would cast every matrix again at every decode step
    model.cast_parameters(getattr(torch, dtype))

if speculative and not model.config.mtp_depth:
    fail("--speculative=True drafts with the model's MTP modules: this model has mtp_depth=0")
# documents follow an end-of-document token in training, so a prompt begins a fresh document after one;
# a Hugging Face model's documents begin with its bos token, where it has one
first = tokenizer.bos_id if tokenizer.kind == "hf" else tokenizer.eos_id
limit = model.config.block_size - 1
prompts = []
for text in starts:
    prompt = ([] if first is None else [first]) + tokenizer.encode(text)
    if not prompt:
        fail("this tokenizer has no bos token to start from: give a prompt with --start")
    if len(prompt) > limit:
        print(f"warning: a prompt has {len(prompt)} tokens; keeping the last {limit} (block_size - 1)", file=sys.stderr)
        prompt = prompt[-limit:]
    prompts.append(prompt)

eos, stream = tokenizer.eos_id, stream and len(prompts) == 1
generator = torch.Generator(device).manual_seed(seed)
for i in range(num_samples):
    rows, shown, stats, steps = [[] for _ in prompts], "", {}, []
    t0 = time.time()
    if stream:
        print(starts[0], end="", flush=True)  # the one prompt, --start or a one-line prompts_file
    with amp:
        for tokens in generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos, generator,
                               compiler="inductor" if compile else None, speculative=speculative, stats=stats,
                               vocab_size=tokenizer.vocab_size):  # not the ids of the model's table rounded up
            if not stream:  # kept on the device until the end: no host sync per token
                steps.append(tokens)
                continue
            rows[0].append(tokens.item())
            if rows[0][-1] == eos:
                break
            text = tokenizer.decode(rows[0])
            if not text.endswith("\ufffd"):  # wait until a character's bytes are complete
                print(text[len(shown):], end="", flush=True)
                shown = text
    if not stream:
        rows = torch.stack(steps, dim=1).tolist()
    elapsed = time.time() - t0
    rows = [row[:row.index(eos)] if eos in row else row for row in rows]  # each row ends at its end of document
    if stream:
        print(tokenizer.decode(rows[0])[len(shown):], flush=True)  # before stderr's summary, also in a file
    else:
        for text, row in zip(starts, rows):
            print(text + tokenizer.decode(row), end="\n---\n", flush=True)
    count = sum(map(len, rows))
    drafts = f", {stats['accepted'] / stats['drafted']:.1%} of drafts accepted" if stats else ""
    print(f"--------------- sample {i + 1}/{num_samples}: {count} tokens in {len(rows)} rows, "
          f"{count / elapsed:.1f} tokens/s{drafts}", file=sys.stderr)
