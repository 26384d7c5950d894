"""
Export a checkpoint written by train.py as a Hugging Face model folder (Llama, or Qwen3 with qk_norm):

    python export.py --out_dir=out/quickstart --hf_dir=out/quickstart_hf

transformers then loads it with AutoModelForCausalLM.from_pretrained('out/quickstart_hf').
"""
import os
import sys

from configurator import load_checkpoint, parse_config
from hf import to_hf
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = "out"               # folder holding ckpt.pt (and tokenizer.model) written by train.py
hf_dir = ""                   # the folder to write; '' = out_dir + '_hf'
# -----------------------------------------------------------------------------
config = parse_config({"out_dir": out_dir, "hf_dir": hf_dir}, sys.argv[1:])
out_dir, hf_dir = config["out_dir"], config["hf_dir"] or config["out_dir"].rstrip("/") + "_hf"

checkpoint = load_checkpoint(out_dir)
model = GPT(GPTConfig(**checkpoint["model_config"]))
model.load_state_dict(checkpoint["model"])
tokenizer = os.path.join(out_dir, checkpoint["tokenizer"])  # 'gpt2' names tiktoken's encoding: nothing to copy
to_hf(model, hf_dir, eos_id=checkpoint["eos_id"], tokenizer_path=tokenizer if os.path.isfile(tokenizer) else None)
print(f"wrote {hf_dir}")
