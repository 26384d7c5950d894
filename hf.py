"""
Hugging Face interop: load a Llama, Qwen2, Qwen3, Qwen3-MoE or DeepSeek-V3 checkpoint folder into our GPT, and write
ours in their format.

    model = from_hf("path/to/Qwen3-0.6B")            # config.json + *.safetensors (or pytorch_model*.bin)
    to_hf(model, "out/run_hf", eos_id=0)              # config.json, model.safetensors, generation_config.json
    model, tokenizer_path, checkpoint = load_model("out/run")   # or load_model("hf:path/to/Qwen3-0.6B")

Every family is our model with other names: q, k and v (our fused qkv rows, Qwen2's biases included), gate and up
(our fused gate_up rows; stacked per routed expert), pre-norm RMSNorms, SwiGLU, RoPE with the half-split pairing of
HF's rotate_half (their q and k weights are already permuted for it), QK-norm for Qwen3, MLA and a sigmoid-scored MoE
with shared experts and a selection bias for DeepSeek-V3, whose interleaved rotary rows we reorder on the way in and
out. Any config.json field or tensor that we cannot place, or that would change the math in a way we do not model
(sliding windows, other RoPE scalings, biases elsewhere, ...), raises a one-line ValueError rather than loading an
approximation. transformers itself is not needed; safetensors is.
"""
import glob
import json
import os
from dataclasses import fields, replace

import torch

from configurator import load_checkpoint
from model import GPT, GPTConfig, Router, rope_tables

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
# config.json fields that do not change the forward pass: bookkeeping, token ids, training-only losses and dropout,
# and fields that only matter when another field (checked below) switches them on
IGNORED = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
           "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "attention_dropout",
           "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "ep_size", "qk_head_dim",
           "num_nextn_predict_layers", "sliding_window", "max_window_layers", "rope_theta", "rope_scaling",
           "rope_parameters", "rope_interleave", "head_dim"}
# fields that must hold the value our model computes with, where present
FIXED = {"hidden_act": "silu", "pretraining_tp": 1, "mlp_bias": False, "attention_bias": False,
         "use_sliding_window": False, "use_mrope": False, "moe_layer_freq": 1, "scoring_func": "sigmoid",
         "topk_method": "noaux_tc"}
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
             "partial_rotary_factor"}
# GPTConfig fields that some HF family expresses, and those that only shape training: any other field away from its
# default has no HF equivalent
EXPRESSED = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "norm_eps", "attention", "n_kv_head",
             "head_dim", "qkv_bias", "rope_theta", "qk_norm", "mlp_hidden", "tie_embeddings", "rope_scaling",
             "rope_factor", "rope_original_len", "rope_low_rotations", "rope_high_rotations", "yarn_mscale",
             "yarn_mscale_all_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
             "v_head_dim", "n_experts", "n_shared_experts", "moe_topk", "moe_hidden", "moe_every", "moe_first_dense",
             "router_scoring", "router_renorm", "routed_scaling", "moe_groups", "moe_topk_groups"}
TRAINING_ONLY = {"dropout", "aux_loss_coef", "seq_aux_loss_coef", "bias_update_rate", "router_z_loss_coef",
                 "router_jitter", "capacity_factor", "mtp_depth", "mtp_lambda", "mtp_blocks"}


def _layout(config):
    """
    Each of our tensors -> the HF tensors it is made of: a list of names, whose rows it concatenates, or (routed
    experts) a list of such lists, one per expert, stacked.
    """
    c = config
    names = {"wte.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not c.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = [theirs + "input_layernorm.weight"]
        names[ours + "attn.proj.weight"] = [theirs + "self_attn.o_proj.weight"]
        if c.attention == "mla":
            if c.q_lora_rank:
                names[ours + "attn.q_a.0.weight"] = [theirs + "self_attn.q_a_proj.weight"]
                names[ours + "attn.q_a.1.weight"] = [theirs + "self_attn.q_a_layernorm.weight"]
                names[ours + "attn.q_b.weight"] = [theirs + "self_attn.q_b_proj.weight"]
            else:
                names[ours + "attn.q_b.weight"] = [theirs + "self_attn.q_proj.weight"]
            names[ours + "attn.kv_a.weight"] = [theirs + "self_attn.kv_a_proj_with_mqa.weight"]
            names[ours + "attn.kv_norm.weight"] = [theirs + "self_attn.kv_a_layernorm.weight"]
            names[ours + "attn.kv_b.weight"] = [theirs + "self_attn.kv_b_proj.weight"]
        else:
            names[ours + "attn.qkv.weight"] = [theirs + f"self_attn.{x}_proj.weight" for x in "qkv"]
            if c.qkv_bias:
                names[ours + "attn.qkv.bias"] = [theirs + f"self_attn.{x}_proj.bias" for x in "qkv"]
            if c.qk_norm:
                names[ours + "attn.q_norm.weight"] = [theirs + "self_attn.q_norm.weight"]
                names[ours + "attn.k_norm.weight"] = [theirs + "self_attn.k_norm.weight"]
        names[ours + "mlp_norm.weight"] = [theirs + "post_attention_layernorm.weight"]
        ffns = {"mlp.": "mlp."}
        if c.is_moe_layer(i):
            names[ours + "mlp.router.gate.weight"] = [theirs + "mlp.gate.weight"]
            if c.router_scoring == "sigmoid":
                names[ours + "mlp.router.bias"] = [theirs + "mlp.gate.e_score_correction_bias"]
            experts = [f"{theirs}mlp.experts.{e}." for e in range(c.n_experts)]
            names[ours + "mlp.experts.gate_up"] = [[e + "gate_proj.weight", e + "up_proj.weight"] for e in experts]
            names[ours + "mlp.experts.down"] = [[e + "down_proj.weight"] for e in experts]
            ffns = {"mlp.shared.": "mlp.shared_experts."} if c.n_shared_experts else {}
        for our_ffn, their_ffn in ffns.items():
            names[ours + our_ffn + "gate_up.weight"] = [theirs + their_ffn + f"{x}_proj.weight" for x in ("gate", "up")]
            names[ours + our_ffn + "down.weight"] = [theirs + their_ffn + "down_proj.weight"]
    return names


def _interleaved_rows(config, name):
    """
    DeepSeek checkpoints pair their rotary dims as (x0, x1), (x2, x3), ...; we pair x_i with x_{i + d/2} (half-split).
    Taking the rotary rows of q and of the shared key in the order evens-then-odds turns one into the other, and q.k
    is unchanged as both move alike. Returns that row order for our tensor `name` (MLA's q_b or kv_a), else None.
    """
    c = config
    if c.attention != "mla" or not name.endswith(("attn.q_b.weight", "attn.kv_a.weight")):
        return None
    rope = torch.cat([torch.arange(0, c.qk_rope_head_dim, 2), torch.arange(1, c.qk_rope_head_dim, 2)])
    if name.endswith("kv_a.weight"):
        return torch.cat([torch.arange(c.kv_lora_rank), c.kv_lora_rank + rope])
    head = torch.cat([torch.arange(c.qk_nope_head_dim), c.qk_nope_head_dim + rope])
    return (torch.arange(c.n_head)[:, None] * head.numel() + head).flatten()


# -----------------------------------------------------------------------------
# import

def _read_config(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no Hugging Face model at {path} (config.json missing)")
    with open(config_path) as f:
        return json.load(f)


def _rope_fields(path, c):
    """Our RoPE fields from config.json's rope_parameters (transformers 5) or rope_theta + rope_scaling (4)."""
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    unknown = set(rope) - ROPE_KEYS
    refused = [(kind not in ("default", "llama3", "yarn"), f"RoPE scaling '{kind}'"),
               (bool(unknown), f"RoPE parameter {sorted(unknown)[0] if unknown else ''}"),
               (rope.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor"),
               (rope.get("truncate", True) is not True, "YaRN without truncate"),
               (rope.get("mscale_all_dim") and not rope.get("mscale"), "mscale_all_dim without mscale")]
    for unsupported, what in refused:
        if unsupported:
            raise ValueError(f"{path}: {what} is not supported")
    out = {"rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    original = rope.get("original_max_position_embeddings") or c["max_position_embeddings"]
    out.update(rope_scaling=kind, rope_original_len=original,
               rope_factor=float(rope.get("factor") or c["max_position_embeddings"] / original))
    if kind == "llama3":
        return {**out, "rope_low_rotations": rope.get("low_freq_factor", 0),
                "rope_high_rotations": rope.get("high_freq_factor", 0)}
    both = bool(rope.get("mscale") and rope.get("mscale_all_dim"))  # transformers reads mscale only beside the other
    return {**out, "rope_low_rotations": float(rope.get("beta_slow") or 1),
            "rope_high_rotations": float(rope.get("beta_fast") or 32),
            "yarn_mscale": float(rope["mscale"]) if both else 1.0,
            "yarn_mscale_all_dim": float(rope.get("mscale_all_dim") or 0)}


def hf_config(path, block_size=0):
    """GPTConfig of the HF folder `path`; block_size=0 takes max_position_embeddings (a long context costs memory)."""
    c = _read_config(path)
    family = c.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type '{family}' is not supported (supported: {', '.join(ARCHITECTURES)})")
    for key, value in FIXED.items():
        if key in c and c[key] != value:
            raise ValueError(f"{path}: {key}={json.dumps(c[key])} is not supported")
    if any(t != "full_attention" for t in c.get("layer_types") or []):
        raise ValueError(f"{path}: sliding windows (layer_types) are not supported")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "rms_norm_eps", "max_position_embeddings"):
        if not isinstance(c.get(key), (int, float)):
            raise ValueError(f"{path}: config.json has no {key}")
    heads = c["num_attention_heads"]
    args = dict(block_size=block_size or c.get("max_position_embeddings"), vocab_size=c.get("vocab_size"),
                n_layer=c.get("num_hidden_layers"), n_head=heads, n_embd=c.get("hidden_size"),
                norm_eps=c.get("rms_norm_eps"), n_kv_head=c.get("num_key_value_heads") or heads,
                mlp_hidden=c.get("intermediate_size"), tie_embeddings=c.get("tie_word_embeddings", False),
                **_rope_fields(path, c))
    used = set(FIXED) | {"layer_types", "num_attention_heads", "max_position_embeddings", "vocab_size",
                         "num_hidden_layers", "hidden_size", "rms_norm_eps", "num_key_value_heads", "intermediate_size",
                         "tie_word_embeddings"}
    if family in ("qwen3", "qwen3_moe"):
        args.update(qk_norm=True)
    if family == "qwen2":
        args.update(qkv_bias=True)
    if family != "deepseek_v3":
        args.update(head_dim=c.get("head_dim") or c["hidden_size"] // heads)
    if family == "qwen3_moe":
        dense = c.get("mlp_only_layers") or []
        if dense != list(range(len(dense))):
            raise ValueError(f"{path}: mlp_only_layers={dense} is not supported (only the first layers may be dense)")
        args.update(n_experts=c.get("num_experts") or c.get("num_local_experts"), moe_topk=c.get("num_experts_per_tok"),
                    moe_hidden=c.get("moe_intermediate_size"), moe_every=c.get("decoder_sparse_step", 1),
                    moe_first_dense=len(dense), router_renorm=c.get("norm_topk_prob", False))
        used |= {"mlp_only_layers", "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "decoder_sparse_step", "norm_topk_prob"}
    if family == "deepseek_v3":
        if c.get("rms_norm_eps") != 1e-6:  # transformers' latent norms (q_a, kv_a) keep 1e-6 whatever it says
            raise ValueError(f"{path}: rms_norm_eps={c.get('rms_norm_eps')} is not supported "
                             "(DeepSeek-V3's latent norms use 1e-6)")
        if c.get("num_key_value_heads", heads) != heads:
            raise ValueError(f"{path}: num_key_value_heads != num_attention_heads is not supported for MLA")
        args.update(attention="mla", q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c.get("kv_lora_rank"),
                    qk_nope_head_dim=c.get("qk_nope_head_dim"), qk_rope_head_dim=c.get("qk_rope_head_dim"),
                    v_head_dim=c.get("v_head_dim"),  # MLA's head_dim only sets defaults; any value will do
                    head_dim=c["hidden_size"] // heads if c["hidden_size"] % heads == 0 else c.get("v_head_dim"))
        if c.get("first_k_dense_replace", 0) < c["num_hidden_layers"]:  # else dense layers only
            args.update(n_experts=c.get("n_routed_experts"), moe_topk=c.get("num_experts_per_tok"),
                        moe_hidden=c.get("moe_intermediate_size"), n_shared_experts=c.get("n_shared_experts") or 0,
                        moe_first_dense=c.get("first_k_dense_replace", 0), router_scoring="sigmoid",
                        router_renorm=c.get("norm_topk_prob", True), routed_scaling=c.get("routed_scaling_factor", 1.0),
                        moe_groups=c.get("n_group") or 1, moe_topk_groups=c.get("topk_group") or 1)
        used |= {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                 "first_k_dense_replace", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group"}
    unknown = sorted(set(c) - used - IGNORED)
    if unknown:
        raise ValueError(f"{path}: config field '{unknown[0]}' is not supported ({len(unknown)} unknown)")
    try:
        return GPTConfig(**args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: config.json: {type(e).__name__} {e}") from None


def _safetensors():
    """safetensors' torch API, imported on first use: the rest of the codebase does not need it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("Hugging Face weights need the safetensors package: pip install safetensors") from None
    return safetensors.torch


def read_hf_tensors(path):
    """Every tensor of the folder's *.safetensors files, or of its *.bin files when there are none."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        shards = [_safetensors().load_file(f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.bin")))
        if not files:
            raise ValueError(f"no weights in {path} (*.safetensors or *.bin)")
        shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    return {name: tensor for shard in shards for name, tensor in shard.items()}


@torch.no_grad()
def load_hf_weights(model, path):
    """Copy the HF folder's tensors into model; stops on any tensor missing, misshapen or left unplaced."""
    tensors = read_hf_tensors(path)
    interleaved = _read_config(path).get("rope_interleave", True)
    # old checkpoints store RoPE's frequencies, which we compute from the config, and some a tied head's copy
    tensors = {name: t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    head = tensors.get("lm_head.weight") if model.config.tie_embeddings else None
    if head is not None and torch.equal(head, tensors.get("model.embed_tokens.weight", head[:0])):
        del tensors["lm_head.weight"]
    ours_by_name = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for ours, theirs in _layout(model.config).items():
        stacked = isinstance(theirs[0], list)
        missing = [name for name in (sum(theirs, []) if stacked else theirs) if name not in tensors]
        if missing:
            raise ValueError(f"{path}: tensor {missing[0]} is missing")
        if stacked:
            value = torch.stack([torch.cat([tensors.pop(name) for name in group]) for group in theirs])
        else:
            value = torch.cat([tensors.pop(name) for name in theirs])
        target = ours_by_name[ours]
        if value.shape != target.shape:
            what = f"{theirs[0][0]} ..." if stacked else " + ".join(theirs)
            raise ValueError(f"{path}: {what} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        order = _interleaved_rows(model.config, ours) if interleaved else None
        target.copy_(value if order is None else value[order])
    if tensors:
        raise ValueError(f"{path}: cannot place tensor {next(iter(tensors))} ({len(tensors)} unplaced)")


def from_hf(path, block_size=0, dropout=0.0):
    """A GPT (fp32, eval mode) holding the HF checkpoint in folder `path` (dropout: for training it further)."""
    config = replace(hf_config(path, block_size), dropout=dropout)
    with torch.device("meta"):  # no random init: for a large model it takes longer than the load
        model = GPT(config)
    marks = {name: dict(p.__dict__) for name, p in model.named_parameters()}  # logical_rows (model.py)
    model.to_empty(device="cpu")  # new tensors: ties and marks are to be put back
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    for name, p in model.named_parameters():
        p.__dict__.update(marks[name])
    # buffers: RoPE's tables, and zeros for the routers' selection bias (unless the checkpoint has one) and counters
    for name, buffer in model.named_buffers():
        assert name in ("cos", "sin") or name.endswith(("router.bias", "router.load")), f"unexpected buffer {name}"
        buffer.zero_()
    model.cos, model.sin = rope_tables(config)
    load_hf_weights(model, path)
    return model.eval()


def load_model(source, block_size=0, dropout=0.0):
    """The GPT of 'hf:FOLDER' (as from_hf) or of a checkpoint (a folder or its ckpt.pt), the path Tokenizer.load takes
    for its tokenizer, and the checkpoint (None for a folder)."""
    if source.startswith("hf:"):
        return from_hf(source[3:], block_size, dropout), source[3:], None
    checkpoint = load_checkpoint(source)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    name = checkpoint["tokenizer"]
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    return model, name if name == "gpt2" else os.path.join(folder, name), checkpoint


# -----------------------------------------------------------------------------
# export

def hf_family(config):
    """The HF family that computes exactly what `config` does, or a one-line error saying why none does."""
    c = config
    defaults = GPTConfig(**{name: getattr(c, name) for name in EXPRESSED})  # the same, every other field at its default
    for f in fields(GPTConfig):  # MoBA, sliding or sparse spans, linear attention, hyper-connections, Engram, ...
        if f.name not in EXPRESSED | TRAINING_ONLY and getattr(c, f.name) != getattr(defaults, f.name):
            raise ValueError(f"{f.name}={getattr(c, f.name)!r} has no Hugging Face equivalent: "
                             "cannot export this model")
    if c.attention == "mla":
        refused = [(c.n_experts and c.router_scoring != "sigmoid", "DeepSeek-V3's router scores with a sigmoid"),
                   (c.n_experts and not c.n_shared_experts, "DeepSeek-V3's MoE layers have shared experts"),
                   (c.n_experts and c.moe_every != 1, "DeepSeek-V3 has MoE on every layer after the dense ones"),
                   (c.norm_eps != 1e-6, "transformers' DeepSeek-V3 keeps norm_eps=1e-6 in its latent norms")]
        family = "deepseek_v3"
    elif c.attention == "mha" and c.n_experts:
        refused = [(c.router_scoring != "softmax", "Qwen3-MoE's router scores with a softmax"),
                   (c.n_shared_experts, "Qwen3-MoE has no shared experts"),
                   (not c.qk_norm or c.qkv_bias, "Qwen3-MoE has qk_norm and no qkv_bias"),
                   (c.routed_scaling != 1 or c.moe_groups != 1, "Qwen3-MoE has no routed_scaling or moe_groups")]
        family = "qwen3_moe"
    elif c.attention == "mha":
        refused = [(c.qk_norm and c.qkv_bias, "no family has both qk_norm (Qwen3) and qkv_bias (Qwen2)")]
        family = "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias else "llama"
    else:
        refused, family = [(True, f"attention='{c.attention}' has no Hugging Face equivalent")], None
    for unsupported, why in refused:
        if unsupported:
            raise ValueError(f"cannot export this model: {why}")
    return family


def _hf_json(config, family, dtype, eos_id):
    """config.json of `config` as HF `family`."""
    c = config
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": c.vocab_size,
           "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
           "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
           "tie_word_embeddings": c.tie_embeddings, "torch_dtype": dtype, "eos_token_id": eos_id}
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling != "none":
        rope.update(rope_type=c.rope_scaling, factor=c.rope_factor,
                    original_max_position_embeddings=c.rope_original_len)
    if c.rope_scaling == "llama3":
        rope.update(low_freq_factor=c.rope_low_rotations, high_freq_factor=c.rope_high_rotations)
    if c.rope_scaling == "yarn":
        rope.update(beta_slow=c.rope_low_rotations, beta_fast=c.rope_high_rotations)
        if c.yarn_mscale_all_dim:
            rope.update(mscale=c.yarn_mscale, mscale_all_dim=c.yarn_mscale_all_dim)
    out.update(rope_theta=c.rope_theta, rope_parameters=rope)
    if family != "qwen2":
        out.update(attention_bias=False)
    if family == "qwen3_moe":
        out.update(num_experts=c.n_experts, num_experts_per_tok=c.moe_topk, moe_intermediate_size=c.moe_hidden,
                   decoder_sparse_step=c.moe_every, mlp_only_layers=list(range(c.moe_first_dense)),
                   norm_topk_prob=c.router_renorm)
    if family == "deepseek_v3":
        moe = c.n_experts > 0  # a dense MLA model: every layer below first_k_dense_replace
        out.update(q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                   qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, head_dim=c.qk_rope_head_dim,
                   num_key_value_heads=c.n_head, rope_interleave=True, num_nextn_predict_layers=0,
                   n_routed_experts=c.n_experts if moe else 1, num_experts_per_tok=c.moe_topk if moe else 1,
                   moe_intermediate_size=c.moe_hidden, n_shared_experts=c.n_shared_experts,
                   first_k_dense_replace=c.moe_first_dense if moe else c.n_layer, norm_topk_prob=c.router_renorm,
                   routed_scaling_factor=c.routed_scaling, n_group=c.moe_groups, topk_group=c.moe_topk_groups)
    return out


@torch.no_grad()
def to_hf(model, out_dir, eos_id=None):
    """
    Write model as a HF folder of the family hf_family picks, loadable by transformers' AutoModelForCausalLM with no
    custom code. MTP modules (training only) are left out.
    """
    c = model.config
    family = hf_family(c)
    if family == "qwen3_moe" and any(m.bias.any() for m in model.modules() if isinstance(m, Router)):
        raise ValueError("cannot export this model: Qwen3-MoE has no router selection bias, "
                         "and this model's is not zero")
    ours_by_name = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors = {}
    for ours, theirs in _layout(c).items():
        value = ours_by_name[ours].detach()
        order = _interleaved_rows(c, ours)
        if order is not None:  # back to DeepSeek's interleaved rotary rows
            value = value[torch.argsort(order)]
        # fused matrices know their parts (model.py); a bias splits like its weight
        rows = getattr(ours_by_name.get(ours.removesuffix(".bias") + ".weight") if ours.endswith("bias")
                       else ours_by_name[ours], "logical_rows", None)
        for part, names in zip(value, theirs) if isinstance(theirs[0], list) else [(value, theirs)]:
            parts = part.split(rows) if len(names) > 1 else [part]
            tensors.update({name: t.contiguous().cpu() for name, t in zip(names, parts, strict=True)})
    os.makedirs(out_dir, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    dtype = str(model.wte.weight.dtype).removeprefix("torch.")
    for name, content in (("config.json", _hf_json(c, family, dtype, eos_id)),
                          ("generation_config.json", {"eos_token_id": eos_id})):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
    return family
