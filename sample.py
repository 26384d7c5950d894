"""
Sample from a trained model, streaming the text as it is produced.

    python sample.py --out_dir=out/quickstart --start="def "
    python sample.py --out_dir=out/quickstart --start=FILE:prompt.txt --num_samples=1 --temperature=0
"""
import os
import sys
import time

import torch

from configurator import autocast, fail, load_checkpoint, parse_config, pick_device, pick_dtype
from model import GPT, GPTConfig
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
out_dir = "out"               # folder holding ckpt.pt (and tokenizer.model) written by train.py
start = ""                    # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8             # 0 = greedy
top_k = 200                   # keep the k most likely tokens (0 = all)
top_p = 1.0                   # nucleus sampling: keep the smallest set with this much probability (1.0 = all)
seed = 1337
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
config = parse_config({k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))},
                      sys.argv[1:])
globals().update(config)
device = pick_device(device)
amp = autocast(device, pick_dtype(device, dtype))

checkpoint = load_checkpoint(out_dir)
model = GPT(GPTConfig(**checkpoint["model_config"]))
model.load_state_dict(checkpoint["model"])
model.eval().to(device)
tokenizer_path = checkpoint["tokenizer"] if checkpoint["tokenizer"] == "gpt2" else os.path.join(out_dir, checkpoint["tokenizer"])
tokenizer = Tokenizer.load(tokenizer_path)

if start.startswith("FILE:"):
    if not os.path.isfile(start[5:]):
        fail(f"prompt file {start[5:]} not found")
    with open(start[5:], encoding="utf-8") as f:
        start = f.read()
# documents follow an end-of-document token in training, so a prompt begins a fresh document after one
prompt = [tokenizer.eos_id] + tokenizer.encode(start)
limit = model.config.block_size - 1
if len(prompt) > limit:
    print(f"warning: the prompt has {len(prompt)} tokens; keeping the last {limit} (block_size - 1)", file=sys.stderr)
    prompt = prompt[-limit:]

generator = torch.Generator(device).manual_seed(seed)
for i in range(num_samples):
    new_tokens, shown = [], ""
    t0 = time.time()
    print(start, end="", flush=True)
    with amp:
        for token in model.generate([prompt], max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id, generator):
            if token.item() == tokenizer.eos_id:
                break
            new_tokens.append(token.item())
            text = tokenizer.decode(new_tokens)
            if not text.endswith("\ufffd"):  # wait until a character's bytes are complete
                print(text[len(shown):], end="", flush=True)
                shown = text
    elapsed = time.time() - t0
    print(tokenizer.decode(new_tokens)[len(shown):])
    print(f"--------------- sample {i + 1}/{num_samples}: {len(new_tokens)} tokens, "
          f"{len(new_tokens) / elapsed:.1f} tokens/s", file=sys.stderr)
