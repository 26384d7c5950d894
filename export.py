"""
Export a checkpoint written by train.py as a Hugging Face model folder: Llama, Qwen2 (qkv_bias), Qwen3 (qk_norm),
Qwen3-MoE (softmax-routed MoE) or DeepSeek-V3 (MLA, sigmoid-routed MoE), whichever computes exactly what it does:

    python export.py --out_dir=out/quickstart --hf_dir=out/quickstart_hf

transformers then loads it with AutoModelForCausalLM.from_pretrained('out/quickstart_hf'). A model with no such
family (MoBA, sliding or sparse spans, linear attention, hyper-connections, Engram, ...) stops with a one-line error.
The folder is written beside hf_dir first and moved in at the end, so that a failure leaves nothing half-written.
"""
import os
import shutil
import sys

from configurator import copy_tokenizer, fail, parse_config
from hf import load_model, to_hf

# -----------------------------------------------------------------------------
out_dir = "out"               # folder holding ckpt.pt (and tokenizer.model) written by train.py
hf_dir = ""                   # the folder to write; '' = out_dir + '_hf'
# -----------------------------------------------------------------------------
config = parse_config({"out_dir": out_dir, "hf_dir": hf_dir}, sys.argv[1:])
out_dir, hf_dir = config["out_dir"], os.path.normpath(config["hf_dir"] or config["out_dir"].rstrip("/") + "_hf")
if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
    fail(f"hf_dir {hf_dir} is a file, not a folder: choose another hf_dir")
run = os.path.realpath(out_dir)
if os.path.realpath(hf_dir) == run or os.path.realpath(hf_dir).startswith(run + os.sep):
    fail(f"hf_dir {hf_dir} is inside the run folder {out_dir}: choose one outside it (by default {run}_hf)")

try:
    model, tokenizer_path, checkpoint = load_model(out_dir)
except (ValueError, ImportError) as e:
    fail(str(e))
tmp = f"{hf_dir}.tmp.{os.getpid()}"
try:
    family = to_hf(model, tmp, eos_id=checkpoint["eos_id"])
    copy_tokenizer(tokenizer_path, tmp)  # its files as they are
    if os.path.isdir(hf_dir):  # a previous export: each file replaced whole, any other file kept
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(hf_dir, name))
        os.rmdir(tmp)
    else:
        os.rename(tmp, hf_dir)
except (ValueError, ImportError, OSError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    fail(f"could not write {hf_dir} ({getattr(e, 'strerror', None) or e}); nothing was written"
         if isinstance(e, OSError) else str(e))
if model.config.mtp_depth:
    print(f"note: the {model.config.mtp_depth} MTP module(s) are training-only and left out")
print(f"wrote {hf_dir} ({family})")
