"""
Hugging Face interop: a Llama, Qwen2, Qwen3, Qwen3-MoE or DeepSeek-V3 folder in, ours out, each family being our model
with other names (_layout, _interleaved_rows). config.json is read as transformers reads it, a field left out taking
its default there; a field or tensor that we cannot place or whose math we do not model, or a damaged file, raises a
one-line ValueError rather than loading an approximation. Needs safetensors, not transformers.

    model = from_hf("path/to/Qwen3-0.6B")            # config.json + model.safetensors (or its shards, or .bin)
    to_hf(model, "out/run_hf", eos_id=0, bos_id=0)    # config.json, model.safetensors, generation_config.json
    model, tokenizer_path, checkpoint = load_model("out/run")   # or load_model("hf:~/models/Qwen3-0.6B")
"""
import glob
import json
import math
import os
from dataclasses import fields, replace

import torch

from configurator import load_checkpoint, write_json
from model import GPT, GPTConfig, Router, rope_tables, yarn_mscale

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
# transformers' defaults (models/<family>/configuration_<family>.py), so that a field left out of config.json means
# what it means there: None is required (the shapes) or derived (NULLABLE); integers are >= 0, POSITIVE ones >= 1
SHAPES = dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
NULLABLE = {"num_key_value_heads", "head_dim", "q_lora_rank"}  # null: n_head, hidden_size / n_head, a full-rank query
POSITIVE = {*SHAPES, "max_position_embeddings", "decoder_sparse_step", "n_group"}
QWEN = dict(max_position_embeddings=32768, num_key_value_heads=32, max_window_layers=28)
DEFAULTS = {family: {**SHAPES, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": None, "rope_theta": 1e4,
                     "use_sliding_window": False, "layer_types": [], **extra} for family, extra in {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None),
    "qwen2": QWEN, "qwen3": dict(QWEN, head_dim=128),
    "qwen3_moe": dict(QWEN, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      decoder_sparse_step=1, norm_topk_prob=False, mlp_only_layers=[]),
    "deepseek_v3": dict(max_position_embeddings=4096, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                        num_experts_per_tok=8, moe_intermediate_size=2048, n_shared_experts=1, first_k_dense_replace=3,
                        norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        rope_interleave=True)}.items()}
ALIASES = {"num_local_experts": {"qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}}  # attribute_map
KINDS = {int: "a non-negative integer", float: "a number", bool: "true or false", list: "a list"}
# config.json fields that do not change the forward pass: bookkeeping, token ids, training-only losses and dropout,
# and fields that only matter when another field (checked below) switches them on
IGNORED = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
           "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "attention_dropout",
           "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "ep_size", "qk_head_dim",
           "num_nextn_predict_layers", "num_mtp_layers", "sliding_window", "rope_scaling", "rope_parameters",
           "is_llama_config", "_attn_implementation_autoset"}  # nanotron's (SmolLM2) and transformers 4.48's marks
# fields that must hold the value our model computes with, where present
FIXED = {"hidden_act": "silu", "pretraining_tp": 1, "mlp_bias": False, "attention_bias": False, "use_mrope": False,
         "moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleaved": False}
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
             "partial_rotary_factor"}
# our GPTConfig fields -> the config.json fields that hold them: in every family, in each MoE family (MOE and its own)
# and in DeepSeek-V3's MLA (the same names); hf_config reads them, _hf_json writes them
NAMES = {"vocab_size": "vocab_size", "n_embd": "hidden_size", "mlp_hidden": "intermediate_size",
         "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "block_size": "max_position_embeddings",
         "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}
MOE = {"moe_topk": "num_experts_per_tok", "moe_hidden": "moe_intermediate_size", "router_renorm": "norm_topk_prob"}
QWEN3_MOE = {**MOE, "n_experts": "num_experts", "moe_every": "decoder_sparse_step"}
DEEPSEEK_MOE = {**MOE, "n_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
                "moe_first_dense": "first_k_dense_replace", "routed_scaling": "routed_scaling_factor",
                "moe_groups": "n_group", "moe_topk_groups": "topk_group"}
MLA = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# GPTConfig fields some HF family expresses, and the training-only ones: any other off its default has no HF equivalent
EXPRESSED = {*NAMES, *QWEN3_MOE, *DEEPSEEK_MOE, *MLA, "attention", "n_kv_head", "head_dim", "qkv_bias", "rope_theta",
             "qk_norm", "rope_scaling", "rope_factor", "rope_original_len", "rope_low_rotations",
             "rope_high_rotations", "yarn_mscale", "yarn_mscale_all_dim", "q_lora_rank", "router_scoring"}
TRAINING_ONLY = {"dropout", "aux_loss_coef", "seq_aux_loss_coef", "bias_update_rate", "router_z_loss_coef",
                 "router_jitter", "capacity_factor", "mtp_depth", "mtp_lambda", "mtp_blocks", "zero_init_proj"}


def _layout(c):
    """Each tensor of our model of config c -> the HF tensors it is made of: a list of names, whose rows it
    concatenates, or (routed experts) a list of such lists, one per expert, stacked."""
    names = {"wte.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not c.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        norms = ("q", "k") if c.qk_norm else ()
        parts = {"attn_norm": ["input_layernorm"], "attn.proj": ["self_attn.o_proj"],  # ours: the rows of theirs
                 "mlp_norm": ["post_attention_layernorm"], **{f"attn.{x}_norm": [f"self_attn.{x}_norm"] for x in norms}}
        if c.attention == "mla":
            parts.update({"attn.q_a.0": ["self_attn.q_a_proj"], "attn.q_a.1": ["self_attn.q_a_layernorm"],
                          "attn.q_b": ["self_attn.q_b_proj"]} if c.q_lora_rank else {"attn.q_b": ["self_attn.q_proj"]})
            parts.update({"attn.kv_a": ["self_attn.kv_a_proj_with_mqa"], "attn.kv_norm": ["self_attn.kv_a_layernorm"],
                          "attn.kv_b": ["self_attn.kv_b_proj"]})
        else:
            parts["attn.qkv"] = [f"self_attn.{x}_proj" for x in "qkv"]
        if c.qkv_bias:
            names[ours + "attn.qkv.bias"] = [theirs + f"self_attn.{x}_proj.bias" for x in "qkv"]
        ffns = {"mlp.": "mlp."}
        if c.is_moe_layer(i):
            parts["mlp.router.gate"] = ["mlp.gate"]
            if c.router_scoring == "sigmoid":
                names[ours + "mlp.router.bias"] = [theirs + "mlp.gate.e_score_correction_bias"]
            experts = [f"{theirs}mlp.experts.{e}." for e in range(c.n_experts)]
            names[ours + "mlp.experts.gate_up"] = [[e + "gate_proj.weight", e + "up_proj.weight"] for e in experts]
            names[ours + "mlp.experts.down"] = [[e + "down_proj.weight"] for e in experts]
            ffns = {"mlp.shared.": "mlp.shared_experts."} if c.n_shared_experts else {}
        for our_ffn, their_ffn in ffns.items():
            parts.update({our_ffn + "gate_up": [their_ffn + "gate_proj", their_ffn + "up_proj"],
                          our_ffn + "down": [their_ffn + "down_proj"]})
        names.update({f"{ours}{x}.weight": [f"{theirs}{y}.weight" for y in ys] for x, ys in parts.items()})
    return names


def _interleaved_rows(c, name):
    """DeepSeek checkpoints pair their rotary dims as (x0, x1), (x2, x3), ...; we pair x_i with x_{i + d/2} (split in
    halves). Taking the rotary rows of q and of the shared key in the order evens-then-odds turns one into the other;
    q.k is unchanged as both move alike. Returns that row order for our tensor `name` (MLA's q_b or kv_a), else None."""
    if c.attention != "mla" or not name.endswith(("attn.q_b.weight", "attn.kv_a.weight")):
        return None
    rope = torch.cat([torch.arange(0, c.qk_rope_head_dim, 2), torch.arange(1, c.qk_rope_head_dim, 2)])
    if name.endswith("kv_a.weight"):
        return torch.cat([torch.arange(c.kv_lora_rank), c.kv_lora_rank + rope])
    head = torch.cat([torch.arange(c.qk_nope_head_dim), c.qk_nope_head_dim + rope])
    return (torch.arange(c.n_head)[:, None] * head.numel() + head).flatten()


# -----------------------------------------------------------------------------
# import

def _read_json(path, name):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise ValueError(f"no Hugging Face model at {path} ({name} missing)")
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} is not a JSON object")
    return value


def _refuse(refused, before, after=" is not supported"):
    """A one-line ValueError, before + what + after, for the first of the (unsupported, what) pairs that holds."""
    what = next((what for unsupported, what in refused if unsupported), None)
    if what:
        raise ValueError(before + what + after)


def _rope_fields(path, c, mla):
    """Our RoPE fields, read as transformers 5 does: rope_scaling (the older name) replaces rope_parameters, rope_theta
    comes from the top level where that has none. With YaRN's m(x) = 0.1 x ln(factor) + 1, theirs scales the tables by
    m(mscale) / m(mscale_all_dim) (m(1) unless both are set; or attention_factor) and DeepSeek-V3's softmax by
    m(mscale_all_dim)^2, ours by m(yarn_mscale) / m(yarn_mscale_all_dim) and MLA's by m(yarn_mscale_all_dim)^2."""
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: config.json's rope_parameters is not an object")
    kind, unknown = rope.get("rope_type", rope.get("type", "default")), set(rope) - ROPE_KEYS
    text = {k for k, v in rope.items() if k not in ("rope_type", "type", "truncate") and type(v) not in (int, float)
            and (v is not None or k == "rope_theta")}  # null: the default, but rope_theta has none here
    _refuse([(kind not in ("default", "llama3", "yarn"), f"RoPE scaling '{kind}'"),
             (unknown, f"RoPE parameter {min(unknown, default='')}"),
             (text, f"RoPE parameter {min(text, default='')} that is not a number"),
             (rope.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor"),
             (rope.get("truncate", True) is not True, "YaRN without truncate"),
             (kind == "llama3" and not {"factor", "low_freq_factor", "high_freq_factor"} <= set(rope),
              "llama3 RoPE without factor, low_freq_factor and high_freq_factor")], f"{path}: ")
    out = {"rope_theta": float(rope.get("rope_theta", c["rope_theta"]))}
    if kind == "default":
        return out
    original = rope.get("original_max_position_embeddings") or c["max_position_embeddings"]
    f = float(rope.get("factor") or c["max_position_embeddings"] / original)
    out.update(rope_scaling=kind, rope_original_len=original, rope_factor=f)
    if kind == "llama3":
        return {**out, "rope_low_rotations": rope["low_freq_factor"], "rope_high_rotations": rope["high_freq_factor"]}
    mscale, all_dim, factor = (rope.get(k) for k in ("mscale", "mscale_all_dim", "attention_factor"))
    (top, bottom), ours_all = (mscale, all_dim) if mscale and all_dim else (1.0, 0.0), float(all_dim or 0) * mla
    _refuse([(factor is not None and f <= 1, f"attention_factor with factor {f}")], f"{path}: ")
    theirs = factor or yarn_mscale(f, top) / yarn_mscale(f, bottom)
    ours = top if factor is None and (bottom == ours_all or f <= 1) else \
        (theirs * yarn_mscale(f, ours_all) - 1) / (0.1 * math.log(f))
    return {**out, "rope_low_rotations": float(rope.get("beta_slow") or 1), "yarn_mscale_all_dim": ours_all,
            "rope_high_rotations": float(rope.get("beta_fast") or 32), "yarn_mscale": float(ours)}


def hf_config(path, block_size=0):
    """GPTConfig of the HF folder `path`; block_size=0 takes max_position_embeddings (a long context costs memory)."""
    raw = _read_json(path, "config.json")
    family = raw.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type '{family}' is not supported (supported: {', '.join(ARCHITECTURES)})")
    theirs = {ALIASES.get(key, {}).get(family, key): value for key, value in raw.items()}
    c = {**DEFAULTS[family], **theirs}
    for key, default in DEFAULTS[family].items():  # each field's type, as the code below takes it
        kind, value, least = int if default is None else type(default), c[key], 1 if key in POSITIVE else 0
        if not (value is None and key in NULLABLE or kind is float and type(value) is int or type(value) is kind
                and (kind is not int or value >= least)):
            need = "a positive integer" if key in POSITIVE else KINDS[kind]
            raise ValueError(f"{path}: config.json " + (f"has {key}={json.dumps(value)}, where {need} is needed"
                                                        if key in theirs else f"has no {key}"))
    heads, width, mla = c["num_attention_heads"], c["hidden_size"], family == "deepseek_v3"
    # Qwen2 and Qwen3 slide the window on the layers layer_types names, by default those from max_window_layers on
    windows = c["use_sliding_window"] and (family not in ("qwen2", "qwen3") or not c["layer_types"]
                                           and c["max_window_layers"] < c["num_hidden_layers"])
    dense, unknown = c.get("mlp_only_layers", []), sorted(set(theirs) - set(DEFAULTS[family]) - set(FIXED) - IGNORED)
    _refuse([*((key in c and c[key] != value, f"{key}={json.dumps(c.get(key))}") for key, value in FIXED.items()),
             (windows or any(t != "full_attention" for t in c["layer_types"]),
              "sliding windows (use_sliding_window, layer_types)"),
             (dense != list(range(len(dense))), f"mlp_only_layers={dense} (only the first layers may be dense)"),
             (mla and c["rms_norm_eps"] != 1e-6,  # transformers' latent norms (q_a, kv_a) keep 1e-6 whatever it says
              f"rms_norm_eps={c['rms_norm_eps']} (DeepSeek-V3's latent norms use 1e-6)"),
             (mla and c["num_key_value_heads"] not in (None, heads), "MLA with num_key_value_heads != heads"),
             (unknown, f"config field '{(unknown + [''])[0]}' ({len(unknown)} unknown)")], f"{path}: ")
    args = {ours: c[theirs] for ours, theirs in NAMES.items()}
    args.update(block_size=block_size or c["max_position_embeddings"], n_kv_head=c["num_key_value_heads"] or heads,
                head_dim=c["head_dim"] or width // heads, qk_norm=family in ("qwen3", "qwen3_moe"),
                qkv_bias=family == "qwen2", **_rope_fields(path, c, mla))
    if family == "qwen3_moe":
        args.update({ours: c[theirs] for ours, theirs in QWEN3_MOE.items()}, moe_first_dense=len(dense))
    if mla:  # MLA's head_dim only sets defaults; any value will do
        args.update({name: c[name] for name in MLA}, attention="mla", q_lora_rank=c["q_lora_rank"] or 0,
                    head_dim=width // heads if width % heads == 0 else c["v_head_dim"])
    if mla and c["first_k_dense_replace"] < c["num_hidden_layers"]:  # else dense layers only
        args.update({ours: c[theirs] for ours, theirs in DEEPSEEK_MOE.items()}, router_scoring="sigmoid",
                    routed_scaling=float(c["routed_scaling_factor"]))
    try:
        return GPTConfig(**args)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: config.json: {type(e).__name__} {e}") from None


def _safetensors():
    """safetensors' torch API, imported on first use: the rest of the codebase does not need it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("Hugging Face weights need the safetensors package: pip install safetensors") from None
    return safetensors.torch


def read_hf_tensors(path):
    """Every tensor in the files transformers reads (model.safetensors or its index's shards, else pytorch_model.bin or
    its shards, not a Trainer's training_args.bin), else in every *.safetensors; stops at a file missing or damaged."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        shards = {single: single} if os.path.isfile(os.path.join(path, single)) else \
            _read_json(path, index).get("weight_map") if os.path.isfile(os.path.join(path, index)) else None
        if shards is not None:
            if not isinstance(shards, dict) or not all(isinstance(name, str) for name in shards.values()):
                raise ValueError(f"{os.path.join(path, index)} has no weight_map of tensor names to files")
            files = [os.path.join(path, name) for name in sorted(set(shards.values()))]
            _refuse([(not os.path.isfile(file), os.path.basename(file)) for file in files], f"{path}: ",
                    f", a shard that {index} lists, is missing")
            break
    if not files:
        raise ValueError(f"no weights in {path} (model.safetensors, pytorch_model.bin or their shards)")
    tensors = {}
    for file in files:
        load = (_safetensors().load_file if file.endswith(".safetensors") else
                lambda f: torch.load(f, map_location="cpu", weights_only=True))
        try:
            shard = load(file)
        except Exception as e:  # truncated, empty, its header cut, not a weights file at all
            shard = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].split('. ')[0][:120]}"
        if not isinstance(shard, dict) or not all(torch.is_tensor(t) for t in shard.values()):
            raise ValueError(f"{file} is damaged ({shard if isinstance(shard, str) else 'not a dict of tensors'})")
        tensors.update(shard)
    return tensors


@torch.no_grad()
def load_hf_weights(model, path):
    """Copy the HF folder's tensors into model; stops on any tensor missing, misshapen or left unplaced."""
    tensors = read_hf_tensors(path)
    interleaved = _read_json(path, "config.json").get("rope_interleave", True)
    # old checkpoints store RoPE's frequencies, which we compute from the config, and some a tied head's copy;
    # DeepSeek-V3 with n_shared_experts=0 has shared experts of width 0, which hold nothing
    tensors = {name: t for name, t in tensors.items() if t.numel() and not name.endswith("rotary_emb.inv_freq")}
    head = tensors.get("lm_head.weight") if model.config.tie_embeddings else None
    if head is not None and torch.equal(head, tensors.get("model.embed_tokens.weight", head[:0])):
        del tensors["lm_head.weight"]
    ours_by_name = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for ours, theirs in _layout(model.config).items():
        stacked = isinstance(theirs[0], list)
        names = sum(theirs, []) if stacked else theirs
        _refuse([(name not in tensors, name) for name in names], f"{path}: tensor ", " is missing")
        _refuse([(not tensors[name].is_floating_point(), f"{name} has dtype {tensors[name].dtype}") for name in names],
                f"{path}: tensor ", ", not a float (quantized?)")  # copy_ would take its integers as weights
        value = (torch.stack([torch.cat([tensors.pop(name) for name in group]) for group in theirs]) if stacked
                 else torch.cat([tensors.pop(name) for name in theirs]))
        target = ours_by_name[ours]
        if value.shape != target.shape:
            what = f"{theirs[0][0]} ..." if stacked else " + ".join(theirs)
            raise ValueError(f"{path}: {what} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        order = _interleaved_rows(model.config, ours) if interleaved else None
        target.copy_(value if order is None else value[order])
    if tensors:
        raise ValueError(f"{path}: cannot place tensor {next(iter(tensors))} ({len(tensors)} unplaced)")


def from_hf(path, block_size=0, **training):
    """A GPT (fp32, eval mode) holding the HF checkpoint in folder `path`; training: TRAINING_ONLY fields to train it
    further with (dropout, balance losses, ...), mtp_depth adding freshly initialized MTP modules."""
    config = replace(hf_config(path, block_size), **training)
    with torch.device("cpu" if config.mtp_depth else "meta"):  # no random init unless new MTP modules need one
        model = GPT(config)
    if not config.mtp_depth:
        marks = {name: dict(p.__dict__) for name, p in model.named_parameters()}  # logical_rows (model.py)
        model.to_empty(device="cpu")  # new tensors: ties and marks are to be put back
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        for name, p in model.named_parameters():
            p.__dict__.update(marks[name])
        for name, buffer in model.named_buffers():  # RoPE's tables; zeros for the routers' selection bias and counts
            assert name in ("cos", "sin") or name.endswith(("router.bias", "router.load")), f"unexpected buffer {name}"
            buffer.zero_()
        model.cos, model.sin = rope_tables(config)
    load_hf_weights(model, path)
    return model.eval()


def load_model(source, block_size=0, **training):
    """The GPT of 'hf:FOLDER' (as from_hf; ~ expands) or of a checkpoint (a folder or its ckpt.pt), the path that
    Tokenizer.load takes for its tokenizer, and the checkpoint (None for a folder)."""
    if source.startswith("hf:"):
        folder = os.path.expanduser(source[3:])
        return from_hf(folder, block_size, **training), folder, None
    checkpoint = load_checkpoint(source)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    name = checkpoint["tokenizer"]
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    return model, name if name == "gpt2" else os.path.join(folder, name), checkpoint


# -----------------------------------------------------------------------------
# export

def hf_family(c):
    """The HF family that computes exactly what config `c` does, or a one-line error saying why none does."""
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
    _refuse(refused, "cannot export this model: ", "")
    return family


def _hf_json(c, family, dtype, eos_id, bos_id):
    """config.json of config c as HF `family`; max_position_embeddings is block_size, the context it trained at."""
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, "hidden_act": "silu", "head_dim": c.head_dim,
           "torch_dtype": str(dtype).removeprefix("torch."), "num_key_value_heads": c.n_kv_head, "eos_token_id": eos_id,
           "bos_token_id": bos_id, **{theirs: getattr(c, ours) for ours, theirs in NAMES.items()}}
    rope = {"rope_type": "default" if c.rope_scaling == "none" else c.rope_scaling, "rope_theta": c.rope_theta}
    if c.rope_scaling != "none":
        names = ("low_freq_factor", "high_freq_factor") if c.rope_scaling == "llama3" else ("beta_slow", "beta_fast")
        rope.update(zip(names, (c.rope_low_rotations, c.rope_high_rotations)), factor=c.rope_factor,
                    original_max_position_embeddings=c.rope_original_len)
    if c.rope_scaling == "yarn" and c.yarn_mscale_all_dim:
        rope.update(mscale=c.yarn_mscale, mscale_all_dim=c.yarn_mscale_all_dim)
    elif c.rope_scaling == "yarn" and c.yarn_mscale != 1:  # transformers reads mscale only beside mscale_all_dim
        rope.update(attention_factor=yarn_mscale(c.rope_factor, c.yarn_mscale))
    out.update(rope_theta=c.rope_theta, rope_parameters=rope)
    if family != "qwen2":
        out.update(attention_bias=False)
    if family == "qwen3_moe":
        out.update({theirs: getattr(c, ours) for ours, theirs in QWEN3_MOE.items()},
                   mlp_only_layers=list(range(c.moe_first_dense)))
    if family == "deepseek_v3":
        out.update({theirs: getattr(c, ours) for ours, theirs in DEEPSEEK_MOE.items()}, head_dim=c.qk_rope_head_dim,
                   **{name: getattr(c, name) for name in MLA}, q_lora_rank=c.q_lora_rank or None, rope_interleave=True,
                   num_key_value_heads=c.n_head, num_nextn_predict_layers=0)
        if not c.n_experts:  # a dense MLA model: every layer below first_k_dense_replace
            out.update(n_routed_experts=1, num_experts_per_tok=1, first_k_dense_replace=c.n_layer)
    return out


@torch.no_grad()
def to_hf(model, out_dir, eos_id=None, bos_id=None, dtype=None):
    """Write model as a HF folder of the family hf_family picks, loadable by transformers' AutoModelForCausalLM with no
    custom code, its parameters in dtype (None: theirs; buffers stay fp32). MTP modules (training only) are left out."""
    c = model.config
    family = hf_family(c)
    if family == "qwen3_moe" and any(m.bias.any() for m in model.modules() if isinstance(m, Router)):
        raise ValueError("cannot export this model: Qwen3-MoE has no router selection bias, "
                         "and this model's is not zero")
    params, dtype = dict(model.named_parameters()), dtype or model.wte.weight.dtype
    ours_by_name = {**params, **dict(model.named_buffers())}
    tensors = {}
    for ours, theirs in _layout(c).items():
        value = ours_by_name[ours].detach().to(dtype if ours in params else torch.float32)
        order = _interleaved_rows(c, ours)
        if order is not None:  # back to DeepSeek's interleaved rotary rows
            value = value[torch.argsort(order)]
        # fused matrices know their parts (model.py); a bias splits like its weight
        rows = getattr(ours_by_name.get(ours.replace(".bias", ".weight")), "logical_rows", None)
        for part, names in zip(value, theirs) if isinstance(theirs[0], list) else [(value, theirs)]:
            parts = part.split(rows) if len(names) > 1 else [part]
            tensors.update({name: t.contiguous().cpu() for name, t in zip(names, parts, strict=True)})
    os.makedirs(out_dir, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "config.json"), _hf_json(c, family, dtype, eos_id, bos_id))
    write_json(os.path.join(out_dir, "generation_config.json"), {"bos_token_id": bos_id, "eos_token_id": eos_id})
    return family
