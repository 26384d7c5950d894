"""
Hugging Face interop: load a Llama or Qwen3 (dense) checkpoint folder into our GPT, and write ours in their format.

    model = from_hf("path/to/Llama-3.2-1B")          # config.json + *.safetensors (or pytorch_model*.bin)
    to_hf(model, "out/run_hf", eos_id=0)              # config.json, model.safetensors, generation_config.json

Both families are our dense model with other names: q, k and v (our fused qkv rows), gate and up (our fused
gate_up rows), pre-norm RMSNorms, SwiGLU, RoPE with the half-split pairing of HF's rotate_half (their q and k
weights are already permuted for it), QK-norm per head for Qwen3. Anything that would change the math and that
we do not model (RoPE scaling, biases, sliding windows, a head_dim other than hidden/heads, ...) is refused in
one line rather than loaded approximately. transformers itself is not needed.
"""
import glob
import json
import os
import shutil

import torch

from configurator import fail
from model import GPT, GPTConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _layout(config):
    """Each of our parameters -> the HF tensors whose rows it concatenates, in order."""
    names = {"wte.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not config.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = [theirs + "input_layernorm.weight"]
        names[ours + "attn.qkv.weight"] = [theirs + f"self_attn.{x}_proj.weight" for x in "qkv"]
        names[ours + "attn.proj.weight"] = [theirs + "self_attn.o_proj.weight"]
        if config.qk_norm:
            names[ours + "attn.q_norm.weight"] = [theirs + "self_attn.q_norm.weight"]
            names[ours + "attn.k_norm.weight"] = [theirs + "self_attn.k_norm.weight"]
        names[ours + "mlp_norm.weight"] = [theirs + "post_attention_layernorm.weight"]
        names[ours + "mlp.gate_up.weight"] = [theirs + f"mlp.{x}_proj.weight" for x in ("gate", "up")]
        names[ours + "mlp.down.weight"] = [theirs + "mlp.down_proj.weight"]
    return names


# -----------------------------------------------------------------------------
# import

def hf_config(path, block_size=0):
    """GPTConfig of the HF folder `path`; block_size=0 takes max_position_embeddings (a long context costs memory)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        fail(f"no Hugging Face model at {path} (config.json missing)")
    with open(config_path) as f:
        c = json.load(f)
    family = c.get("model_type")
    if family not in ARCHITECTURES:
        fail(f"{path}: model_type '{family}' is not supported (supported: {', '.join(ARCHITECTURES)})")
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 / 4 spelling
    layer_types = c.get("layer_types") or []
    refused = [  # (unsupported, what): settings that change the math and have no GPTConfig field yet
        (c.get("hidden_act", "silu") != "silu", f"hidden_act={c.get('hidden_act')}"),
        (rope.get("rope_type", rope.get("type", "default")) != "default", f"RoPE scaling {rope}"),
        (c.get("attention_bias", False), "attention_bias=true"),
        (c.get("mlp_bias", False), "mlp_bias=true"),
        (c.get("head_dim") not in (None, hidden // heads), f"head_dim={c.get('head_dim')} != hidden_size/heads"),
        (c.get("pretraining_tp", 1) != 1, f"pretraining_tp={c.get('pretraining_tp')}"),
        (c.get("use_sliding_window", False) or any(t != "full_attention" for t in layer_types), "sliding windows"),
    ]
    for unsupported, what in refused:
        if unsupported:
            fail(f"{path}: {what} is not supported")
    try:
        return GPTConfig(
            block_size=block_size or c["max_position_embeddings"], vocab_size=c["vocab_size"],
            n_layer=c["num_hidden_layers"], n_head=heads, n_embd=hidden, norm_eps=c["rms_norm_eps"],
            n_kv_head=c.get("num_key_value_heads") or heads, qk_norm=family == "qwen3",
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), mlp_hidden=c["intermediate_size"],
            tie_embeddings=c.get("tie_word_embeddings", False))
    except (KeyError, ValueError) as e:
        fail(f"{path}: config.json: {type(e).__name__} {e}")


def _safetensors():
    """safetensors' torch API, imported on first use: the rest of the codebase does not need it."""
    try:
        import safetensors.torch
    except ImportError:
        fail("Hugging Face weights need the safetensors package: pip install safetensors")
    return safetensors.torch


def read_hf_tensors(path):
    """Every tensor of the folder's *.safetensors files, or of its *.bin files when there are none."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        shards = [_safetensors().load_file(f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.bin")))
        if not files:
            fail(f"no weights in {path} (*.safetensors or *.bin)")
        shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    return {name: tensor for shard in shards for name, tensor in shard.items()}


@torch.no_grad()
def load_hf_weights(model, path):
    """Copy the HF folder's tensors into model; stops on any tensor missing, misshapen or left unplaced."""
    tensors = read_hf_tensors(path)
    # old checkpoints store RoPE's frequencies; we compute them from rope_theta
    tensors = {name: t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    for ours, theirs in _layout(model.config).items():
        missing = [name for name in theirs if name not in tensors]
        if missing:
            fail(f"{path}: tensor {missing[0]} is missing")
        param, value = model.get_parameter(ours), torch.cat([tensors.pop(name) for name in theirs])
        if value.shape != param.shape:
            fail(f"{path}: {' + '.join(theirs)} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        param.copy_(value)
    if tensors:
        fail(f"{path}: cannot place tensor {next(iter(tensors))} ({len(tensors)} unplaced)")


def from_hf(path, block_size=0):
    """A GPT (fp32, eval mode) holding the HF checkpoint in folder `path`."""
    model = GPT(hf_config(path, block_size))
    load_hf_weights(model, path)
    return model.eval()


# -----------------------------------------------------------------------------
# export

@torch.no_grad()
def to_hf(model, out_dir, eos_id=None, tokenizer_path=None):
    """
    Write model as a HF folder: LlamaForCausalLM, or Qwen3ForCausalLM with qk_norm. MTP modules (training only) are
    left out; MLA and MoE have no equivalent in these families and are refused. tokenizer_path is copied as is.
    """
    c = model.config
    if c.attention != "mha" or c.n_experts:
        fail("only the dense model (attention='mha', n_experts=0) has a Hugging Face equivalent (Llama, Qwen3)")
    family = "qwen3" if c.qk_norm else "llama"
    config = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
        "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": str(model.wte.weight.dtype).removeprefix("torch."), "eos_token_id": eos_id,
    }
    tensors = {}
    for ours, theirs in _layout(c).items():
        param = model.get_parameter(ours)
        rows = getattr(param, "logical_rows", (param.size(0),))  # fused matrices know their parts (model.py)
        tensors.update({name: part.contiguous().cpu() for name, part in zip(theirs, param.split(rows))})
    os.makedirs(out_dir, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name, content in (("config.json", config), ("generation_config.json", {"eos_token_id": eos_id})):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
    if tokenizer_path:
        shutil.copy(tokenizer_path, out_dir)
