"""
Export a checkpoint written by train.py as a Hugging Face model folder: Llama, Qwen2 (qkv_bias), Qwen3 (qk_norm),
Qwen3-MoE (softmax-routed MoE) or DeepSeek-V3 (MLA, sigmoid-routed MoE), whichever computes exactly what it does:

    python export.py --out_dir=out/quickstart --hf_dir=out/quickstart_hf

transformers then loads it with AutoModelForCausalLM.from_pretrained('out/quickstart_hf'), and its tokenizer with
AutoTokenizer: our BPE and GPT-2 ones are written as a tokenizer.json that gives our ids for every text. A model with
no such family (MoBA, sliding or sparse spans, linear attention, hyper-connections, Engram, ...) stops with a one-line
error. The folder is written beside hf_dir first and moved in at the end, so that a failure leaves nothing
half-written.
"""
import math
import os
import re
import shutil
import sys

import torch

from configurator import DTYPES, check_settings, copy_tokenizer, fail, parse_config, write_json
from hf import load_model, to_hf
from tokenizer import CHAT_MARKERS, ESCAPE, SPACE_MARK, Tokenizer

# -----------------------------------------------------------------------------
out_dir = "out"               # folder holding ckpt.pt (and tokenizer.model) written by train.py
hf_dir = ""                   # the folder to write; '' = out_dir + '_hf'
dtype = "auto"                # the weights' dtype: 'auto' (as the checkpoint holds them), float32, bfloat16, float16
# -----------------------------------------------------------------------------
config = parse_config({"out_dir": out_dir, "hf_dir": hf_dir, "dtype": dtype}, sys.argv[1:])
check_settings(config, choices={"dtype": DTYPES})

# -----------------------------------------------------------------------------
# tokenizer.json of our own tokenizers, for the tokenizers package that AutoTokenizer runs: written as plain JSON,
# so that export needs no transformers

# the chat template of grpo.py --chat=True: a document's first token, then <|user|> ... <|end|><|assistant|>
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "{{ '<|assistant|>' if m['role'] == 'assistant' else '<|user|>' }}{{ m['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_chars():
    """GPT-2's printable character for each byte (bytes_to_unicode in openai/gpt-2 src/encoder.py, tokenizers'
    ByteLevel alphabet): a printable byte keeps its own, the others take 256, 257, ... in order."""
    own = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in own]
    return {**{b: chr(b) for b in own}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def tiktoken_bpe(ranks):
    """vocab and merges of tiktoken's ranks (bytes -> id): tiktoken merges the adjacent pair whose concatenation has
    the lowest rank, so a token's merge is the last pair that this leaves of its own bytes, ranked as the token."""
    chars = byte_chars()
    merges = []
    for token in sorted(ranks, key=ranks.get):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(["".join(chars[b] for b in part) for part in parts])
    return {"".join(chars[b] for b in token): i for token, i in ranks.items()}, merges


def sentencepiece_bpe(sp):
    """vocab and merges of a sentencepiece BPE, which merges any two adjacent pieces whose concatenation is a piece,
    the best-scored (lowest id) first (google/sentencepiece src/bpe_model.cc): every split of each piece into two
    pieces is a merge, in the pieces' order."""
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    normal = {p for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = [[p[:k], p[k:]] for p in pieces if p in normal for k in range(1, len(p))
              if p[:k] in normal and p[k:] in normal]
    return {p: i for i, p in enumerate(pieces)}, merges


def tokenizer_files(tok, block_size):
    """tokenizer.json and tokenizer_config.json of our tokenizer `tok` ('bpe' or 'gpt2'): the ids of tok.encode for
    every text, our special tokens and chat markers as special tokens (bos is eos: a document follows one)."""
    def replace(pattern, content):
        return {"type": "Replace", "pattern": {"String": pattern}, "content": content}
    if tok.kind == "gpt2":
        (vocab, merges), specials = tiktoken_bpe(tok.backend._mergeable_ranks), tok.backend._special_tokens
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        pipeline = {"normalizer": None, "pre_tokenizer": byte_level, "decoder": byte_level}
    else:  # tokenizer.py's escape of '▁' and sentencepiece's spaces; each newline alone, spelled as its byte
        (vocab, merges), sp = sentencepiece_bpe(tok.backend), tok.backend
        specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
        pipeline = {"normalizer": {"type": "Sequence", "normalizers": [
                        replace(ESCAPE, ESCAPE * 2), replace(SPACE_MARK, ESCAPE + "_"), replace(" ", SPACE_MARK)]},
                    "pre_tokenizer": {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Isolated",
                                      "invert": False},
                    "decoder": {"type": "Sequence", "decoders": [
                        replace(SPACE_MARK, " "), {"type": "ByteFallback"}, {"type": "Fuse"},
                        replace(ESCAPE + "_", SPACE_MARK), replace(ESCAPE * 2, ESCAPE)]}}
    bpe = {"type": "BPE", "dropout": None, "unk_token": "<unk>" if tok.kind == "bpe" else None,
           "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
           "byte_fallback": tok.kind == "bpe", "ignore_merges": False, "vocab": vocab, "merges": merges}
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for token, i in sorted(specials.items(), key=lambda item: item[1])]
    marker = {name: tok.decode([i]) for name, i in tok.special.items()}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": marker["eos"], "eos_token": marker["eos"],
                "pad_token": marker["pad"], "additional_special_tokens": [marker[name] for name in CHAT_MARKERS],
                "model_max_length": block_size, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    return ({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, **pipeline,
             "post_processor": None, "model": bpe}, settings)


# -----------------------------------------------------------------------------
# the checkpoint, then the folder beside hf_dir, moved in when whole

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")

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
try:
    tokenizer, missing = Tokenizer.load(tokenizer_path), None
except (ValueError, ImportError) as e:  # tiktoken's gpt2 files offline, a tokenizer.model removed: the model alone
    tokenizer, missing = None, str(e)
dtype = (getattr(torch, config["dtype"]) if config["dtype"] != "auto" else
         next(t.dtype for t in checkpoint["model"].values() if t.is_floating_point()))
tmp = f"{hf_dir}.tmp.{os.getpid()}"
try:
    # a document's first token, as sample.py takes it: the folder's bos, or ours, the end of the previous document
    first = tokenizer.bos_id if tokenizer and tokenizer.kind == "hf" else checkpoint["eos_id"]
    family = to_hf(model, tmp, eos_id=checkpoint["eos_id"], bos_id=first, dtype=dtype)
    copy_tokenizer(tokenizer_path, tmp)  # its files as they are
    if tokenizer and tokenizer.kind != "hf":
        for name, content in zip(("tokenizer.json", "tokenizer_config.json"),
                                 tokenizer_files(tokenizer, model.config.block_size)):
            write_json(os.path.join(tmp, name), content)
    if os.path.isdir(hf_dir):  # a previous export: each file replaced whole; weight and tokenizer files not written
        # now removed (loaders would take them for this model's: vLLM reads the shards an index names); others kept
        written = os.listdir(tmp)
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(hf_dir, name))
        for name in set(os.listdir(hf_dir)) - set(written):
            if name in TOKENIZER_FILES or re.fullmatch(r"(pytorch_)?model.*\.(safetensors|bin|index\.json)", name):
                os.remove(os.path.join(hf_dir, name))
        os.rmdir(tmp)
    else:
        os.rename(tmp, hf_dir)
except (ValueError, ImportError, OSError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    fail(f"could not write {hf_dir} ({getattr(e, 'strerror', None) or e}); nothing was written"
         if isinstance(e, OSError) else str(e))
if model.config.mtp_depth:
    print(f"note: the {model.config.mtp_depth} MTP module(s) are training-only and left out")
if missing:
    print(f"note: no tokenizer.json written: {missing}")
print(f"wrote {hf_dir} ({family})")
