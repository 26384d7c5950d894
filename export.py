"""
Export a checkpoint written by train.py as a Hugging Face model folder: Llama, Qwen2 (qkv_bias), Qwen3 (qk_norm),
Qwen3-MoE (softmax-routed MoE) or DeepSeek-V3 (MLA, sigmoid-routed MoE), whichever computes exactly what it does:

    python export.py --out_dir=out/quickstart --hf_dir=out/quickstart_hf

transformers then loads it with AutoModelForCausalLM.from_pretrained('out/quickstart_hf'). A model with no such
family (MoBA, sliding or sparse spans, linear attention, hyper-connections, Engram, ...) stops with a one-line error.
"""
import sys

from configurator import copy_tokenizer, fail, parse_config
from hf import load_model, to_hf

# -----------------------------------------------------------------------------
out_dir = "out"               # folder holding ckpt.pt (and tokenizer.model) written by train.py
hf_dir = ""                   # the folder to write; '' = out_dir + '_hf'
# -----------------------------------------------------------------------------
config = parse_config({"out_dir": out_dir, "hf_dir": hf_dir}, sys.argv[1:])
out_dir, hf_dir = config["out_dir"], config["hf_dir"] or config["out_dir"].rstrip("/") + "_hf"

try:
    model, tokenizer_path, checkpoint = load_model(out_dir)
    family = to_hf(model, hf_dir, eos_id=checkpoint["eos_id"])
except (ValueError, ImportError) as e:
    fail(str(e))
copy_tokenizer(tokenizer_path, hf_dir)  # its files as they are
if model.config.mtp_depth:
    print(f"note: the {model.config.mtp_depth} MTP module(s) are training-only and left out")
print(f"wrote {hf_dir} ({family})")
