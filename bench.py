"""
Benchmark a model configuration: training throughput and MFU, the GPU's bf16 matmul ceiling, decode speed,
and optionally a transformers reference model of the same shape, timed in the same run.

    python bench.py                                                    # default GPTConfig, auto device
    python bench.py config/gpt2_124m.py --batch_size=16 --compile=True # a train.py config (training keys skipped)
    python bench.py config/gpt2_124m.py --reference=hf_llama           # + LlamaForCausalLM of the same shape
    python bench.py --block_size=32768 --batch_size=1 --attn_span=sliding --reference=full --decode_context=32000
    python bench.py --n_layer=4 --device=cpu --decode=False
    python bench.py --flops config/deepseek_small.py                  # parameters, FLOPs by part, KV cache: no timing
    python bench.py config/gpt2_124m.py --compile=True --profile=True # + where the step's time goes, kernel by kernel

Training steps run on random tokens (no dataset needed) exactly as in train.py: autocast, AdamW from optim.py
(fused on CUDA), gradient clipping at 1.0. Decoding is greedy through decode.generate, timed end to end (prefill
included) at batch 1 and decode_batch: plain, fast (the step in CUDA graphs) and speculative (with MTP); with
decode_context, the steps alone at that context, with the cache's memory. A table is printed at the end and every
figure is written to json_out. With --flops, only the accounting, from the shapes alone (no device, no weights).
"""
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from configurator import (autocast, check_settings, fail, nominal_peak_flops, parse_config, pick_device, pick_dtype,
                          print0)
from decode import generate
from model import GPT, GPTConfig, config_fields
from optim import QKClip, clip_grad_norm_, configure_optimizers

# -----------------------------------------------------------------------------
# defaults
batch_size = 16               # sequences of block_size random tokens per micro-step
gradient_accumulation_steps = 1  # micro-steps per optimizer step (as in train.py, on one process)
optimizer = "adamw"           # 'adamw', 'muon' or 'muonclip' (QK-Clip's logit pass included), as in train.py
device = "auto"               # 'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                # 'auto' (bf16 on GPUs that have it, else fp16; fp32 on CPU), or a torch dtype name
compile = False               # torch.compile the model (and the reference)
warmup = 3                    # untimed steps first; at least 10 with compile (compilation happens there)
steps = 10                    # training steps per timed repeat
repeats = 3                   # timed repeats; the median is reported
decode = True                 # also time decoding with decode.generate
decode_batch = 1              # prompts decoded together (batch 1 is timed too; e.g. 64 for throughput)
prompt_len = 16               # tokens per random prompt
decode_tokens = 256           # new tokens per prompt
decode_context = 0            # > 0: time decode_tokens steps after a random context of this many tokens instead (its
                              # prefill untimed, in chunks of 2048) and report the cache's memory; needs block_size
                              # >= decode_context + decode_tokens
reference = ""                # '' or a reference of the same shape: 'hf_llama', 'hf_qwen3_moe' (need transformers), or
                              # 'full' (ours on full causal attention, decoded too: the baseline of attn_span/pattern)
reference_compile = True      # with compile=True, compile the reference too (False: time it eager)
peak_flops = 0.0              # nominal per-device peak for the second MFU; 0 = a known datasheet figure for the GPU
json_out = "out/bench/bench.json"  # every figure, the resolved config, device and torch version
seed = 1337                   # model init, random tokens and prompts
flops = False                 # only print the accounting (parameters, FLOPs per token by part, KV cache, training
                              # FLOPs) from the model's shapes, then exit: nothing is timed and no device is needed
flops_tokens = 0.0            # with flops: training FLOPs for this many tokens; 0 = the config's run, max_iters steps
                              # of gradient_accumulation_steps x batch_size x block_size tokens (1e9 without max_iters)
max_iters = 0                 # train.py's optimizer steps, read from its config files for flops_tokens = 0
profile = False               # after timing ours, profile a few more training steps: the kernels (CPU: the ops) that
                              # took the most time, largest first (torch.profiler)
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
defaults.update(config_fields())
config = parse_config(defaults, sys.argv[1:], other_stage_keys_in_files=True)
check_settings(config, non_negative=("warmup", "decode_context", "peak_flops", "flops_tokens"),
               positive=("batch_size", "gradient_accumulation_steps", "steps", "repeats", "decode_batch", "prompt_len",
                         "decode_tokens"))
globals().update(config)
# -----------------------------------------------------------------------------
# model shape, accounting (--flops), device, precision, reference

try:
    model_config = GPTConfig(**{k: config[k] for k in config_fields()})
except ValueError as e:
    fail(f"model config: {e}")
T = model_config.block_size
if decode and decode_context and decode_context + decode_tokens > T:  # before anything is timed
    fail(f"decode_context + decode_tokens must fit in block_size ({T})")
if decode and not decode_context and prompt_len >= T:
    fail(f"prompt_len={prompt_len} must be below block_size ({T}): decoding continues a prompt within the context")

if flops:  # on the meta device: shapes without weights, so that even a large config takes no memory and no time
    with torch.device("meta"):
        model = GPT(model_config)
    params = {"total": model.num_params(), "active": model.num_params(active=True),
              "non-embedding": model.num_params(embedding=False),
              "embedding": model.num_params() - model.num_params(embedding=False),
              "MTP modules": sum(p.numel() for p in model.mtp.parameters()),  # training only: not in the total
              "Engram tables": model.table_params()}  # looked up, not multiplied: not in the total
    parts = model.flops_breakdown(T)
    total = sum(parts.values())
    # the cache as a GPU keeps it, unless --dtype says otherwise (a name pick_dtype refuses stops here as well)
    kv_dtype = "bfloat16" if dtype == "auto" else pick_dtype("cpu", dtype)
    kv_cache_bytes = model.kv_cache_bytes(T, getattr(torch, kv_dtype)) / T
    tokens = flops_tokens or max_iters * gradient_accumulation_steps * batch_size * T or 1e9
    print0(f"{model_config.n_layer} layers x {model_config.n_embd}, vocabulary {model_config.vocab_size}, "
           f"{T} tokens per sequence")
    print0("parameters (of the inference model: a tied head once; MTP modules and Engram tables apart)")
    for name, n in params.items():
        if n:
            print0(f"  {name:<24}{n / 1e6:>12,.2f}M")
    print0(f"training FLOPs per token (3 x forward) at {T} tokens")
    for name, n in parts.items():
        if n:
            print0(f"  {name:<24}{n / 1e6:>12,.2f}M{n / total:>8.1%}")
    print0(f"  {'total':<24}{total / 1e6:>12,.2f}M")
    print0(f"KV cache: {kv_cache_bytes:,.0f} bytes per token in {kv_dtype}, all {model_config.n_layer} layers together")
    origin = ("" if flops_tokens else f" ({max_iters} steps of {gradient_accumulation_steps} x {batch_size} x {T})"
              if max_iters else " (no max_iters in the config; --flops_tokens=N to choose)")
    print0(f"training: {total * tokens:.3g} FLOPs for {tokens:,.0f} tokens{origin}")
    os.makedirs(os.path.dirname(json_out) or ".", exist_ok=True)
    with open(json_out, "w") as f:
        json.dump({"config": config, "model_config": asdict(model_config), "params": params,
                   "flops_breakdown": parts, "flops_per_token": total, "kv_cache_bytes_per_token": kv_cache_bytes,
                   "kv_cache_dtype": kv_dtype, "tokens": tokens, "training_flops": total * tokens}, f, indent=2)
    print0(f"wrote {json_out}")
    sys.exit()

device = pick_device(device)
device_type = device.split(":")[0]
dtype = pick_dtype(device, dtype)
amp = autocast(device, dtype)
torch.backends.cuda.matmul.allow_tf32 = True  # as train.py does
if compile:
    warmup = max(warmup, 10)
cuda = device_type == "cuda"
device_name = torch.cuda.get_device_name(device) if cuda else device_type
torch.manual_seed(seed)


# the flags neither transformers model has a counterpart for, at their off values: with any of them on, the reference
# would train another model than ours (and be credited with our FLOPs per token)
NOT_IN_HF = dict(logit_softcap=0.0, value_embeds="", value_residual=False, x0_mix=False, unet_skips=False,
                 attn_span="full", attn_pattern="", attn_gate="none", qkv_bias=False, mtp_depth=0,
                 residual="standard", engram_layers="")


def refuse_unmatched(name, cfg, off):
    """Stop in one line, naming the flags to set, when the config uses one the reference cannot build."""
    on = [f"--{k}={v if v != '' else repr(v)}" for k, v in {**off, **NOT_IN_HF}.items() if getattr(cfg, k) != v]
    if on:
        fail(f"{name} cannot match this config: set {' '.join(on)}")


def hf_llama(cfg):
    refuse_unmatched("hf_llama", cfg, dict(qk_norm=False, dropout=0.0, mlp="swiglu", attention="mha", n_experts=0))
    from transformers import LlamaConfig, LlamaForCausalLM  # after the refusal: importing transformers takes seconds
    hf = LlamaConfig(hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                     num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                     vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta,
                     rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
                     mlp_bias=False, attn_implementation="sdpa", use_cache=False)  # no KV cache to build while training
    # HF shifts the labels inside, so labels = the inputs is the same work as our shifted targets
    return lambda: LlamaForCausalLM(hf), lambda model, x: model(input_ids=x, labels=x).loss


def hf_qwen3_moe(cfg):
    if not cfg.n_experts:
        fail("hf_qwen3_moe has routed experts on every layer: set --n_experts")
    refuse_unmatched("hf_qwen3_moe", cfg, dict(n_shared_experts=0, moe_every=1, moe_first_dense=0, attention="mha"))
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # after the refusal: importing transformers takes seconds
    hf = Qwen3MoeConfig(hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, moe_intermediate_size=cfg.moe_hidden,
                        num_experts=cfg.n_experts, num_experts_per_tok=cfg.moe_topk, norm_topk_prob=cfg.router_renorm,
                        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                        head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
                        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                        decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                        attn_implementation="sdpa", use_cache=False)  # Qwen3 always has QK-norm: compare with --qk_norm
    return lambda: Qwen3MoeForCausalLM(hf), lambda model, x: model(input_ids=x, labels=x).loss


def full_attention(cfg):
    """Our model with every layer on full causal attention (SDPA's fused kernels): what the spans and linear
    attention are measured against, decoding included."""
    attention = "mha" if cfg.attention == "linear" else cfg.attention
    full = replace(cfg, attn_span="full", attn_pattern="", attention=attention)
    return lambda: GPT(full), lambda model, x: model(x, x)[1]


# a reference: name -> function(GPTConfig) returning (build(), loss_of(model, tokens)); the hf_ ones need
# transformers. It is called before anything is timed, so that a shape it cannot match stops the run at once.
references = {"hf_llama": hf_llama, "hf_qwen3_moe": hf_qwen3_moe, "full": full_attention}
if reference:
    if reference not in references:
        fail(f"unknown reference '{reference}' (choose {', '.join(references)})")
    if reference.startswith("hf_") and importlib.util.find_spec("transformers") is None:
        fail(f"--reference={reference} needs transformers: pip install transformers")
    build_reference, reference_loss = references[reference](model_config)


def timed(fn, n):
    """Seconds for n calls of fn: CUDA events on the GPU (no host sync in between), perf_counter elsewhere."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device_type == "mps":  # MPS runs asynchronously too
        torch.mps.synchronize()
    return time.perf_counter() - t0


def median_time(fn, n):
    """Median over `repeats` timed runs of n calls, per call."""
    return statistics.median(timed(fn, n) for _ in range(repeats)) / n


def print_profile(step, n=3):
    """The kernels (on the CPU, the ops) that took the most time over n more training steps, largest first."""
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        timed(step, n)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print0(f"profile of {n} training steps, by {sort_by}:")
    print0(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=90))


def measure(name, model, loss_of, with_decode):
    """One row of the table: train the model on random tokens, then (with_decode) decode with it."""
    model.to(device)
    optim = configure_optimizers(model, "adamw" if name != "ours" else optimizer.replace("muonclip", "muon"),
                                 device_type=device_type)  # the step's cost does not depend on the learning rate
    qk_clip = QKClip(model, tau=100.0) if optimizer == "muonclip" and name == "ours" else None
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # fp16 needs loss scaling, as in train.py
    train_model = torch.compile(model) if compile and (name == "ours" or reference_compile) else model
    x = torch.randint(model_config.vocab_size, (batch_size, T), device=device)

    def step():
        if qk_clip:
            qk_clip.track(True)
        for _ in range(gradient_accumulation_steps):
            with amp:
                if qk_clip:  # QK-Clip reads each head's largest logit from the forward's aux
                    _, loss, aux = train_model(x, x)
                    qk_clip.observe(aux)
                else:
                    loss = loss_of(train_model, x)
            scaler.scale(loss / gradient_accumulation_steps).backward()
        if qk_clip:
            qk_clip.track(False)
        scaler.unscale_(optim)
        clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optim)
        scaler.update()
        optim.zero_grad(set_to_none=True)
        if qk_clip:
            qk_clip.clip()

    tables = model.table_params() if isinstance(model, GPT) else 0  # Engram's lookup tables, counted apart
    print0(f"{name}: {(sum(p.numel() for p in model.parameters()) - tables) / 1e6:.2f}M parameters"
           + (f" + {tables / 1e6:.2f}M in Engram tables" if tables else "") + f", {warmup} warm-up steps"
           + (" (compiling)" if compile else ""))
    timed(step, warmup)
    tokens = batch_size * T * gradient_accumulation_steps
    print0(f"{name}: timing {repeats} x {steps} training steps of {gradient_accumulation_steps} x {batch_size} x {T} tokens")
    seconds = median_time(step, steps)
    row = {"tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds,
           "tflops": (model.flops_per_token(T) if isinstance(model, GPT) else flops_per_token) * tokens / seconds / 1e12,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
           "decode_tokens_per_s": None}
    print0(f"{name}: {row['tokens_per_s']:,.0f} tokens/s, {row['ms_per_step']:.1f} ms/step")
    if profile and name == "ours":
        print_profile(step)
    if with_decode:
        del optim, train_model  # decoding needs neither optimizer state nor the compiled graph
        model.eval()
        if dtype != "float32" and isinstance(model, GPT):  # decode as sample.py does: weights in the autocast dtype
            model.cast_parameters(getattr(torch, dtype))
        if decode_context:
            decode_steps, row["cache_gib"] = decode_at_context(model)
            print0(f"{name}: decoding {decode_batch} x {decode_tokens} tokens at a context of {decode_context:,}")
            decode_steps()  # warm-up
            row["decode_tokens_per_s"] = decode_batch * decode_tokens / median_time(decode_steps, 1)
        else:
            row["decode"] = decode_speeds(name, model)
            row["decode_tokens_per_s"] = row["decode"][f"plain x{decode_batch}"]
        print0(f"{name}: {row['decode_tokens_per_s']:,.1f} decode tokens/s")
    return row


@torch.no_grad()
def decode_speeds(name, model):
    """
    Greedy decoding tokens/s of decode_tokens new tokens after random prompt_len-token prompts (prefill included), at
    batch 1 and decode_batch: 'plain' (the decode step eager), 'fast' (captured in CUDA graphs: CUDA only) and
    'speculative' (drafts from the MTP module, compiled on CUDA: mtp_depth > 0); its acceptance rate beside it.
    """
    modes = {"plain": {}, **({"fast": dict(compiler="inductor")} if cuda else {}),
             **({"speculative": dict(compiler="inductor" if cuda else None, speculative=True)} if model.mtp else {})}
    speeds = {}
    for batch in sorted({1, decode_batch}):
        prompts = torch.randint(model_config.vocab_size, (batch, prompt_len)).tolist()
        for mode, options in modes.items():
            stats, tokens = {}, []

            def decode_all(n):
                tokens.clear()
                with amp:
                    for token in generate(model, prompts, n, temperature=0.0, stats=stats, **options):
                        tokens.append(token)

            print0(f"{name}: decoding {batch} x {decode_tokens} tokens after {prompt_len}-token prompts, {mode}")
            # warm-up at the timed length: the cache is sized to prompt and continuation, so a shorter warm-up would
            # leave the compiled step of the timed cache shape to be compiled inside the timing
            decode_all(decode_tokens)
            stats.clear()
            speeds[f"{mode} x{batch}"] = batch * decode_tokens / median_time(lambda: decode_all(decode_tokens), 1)
            accepted = f", {stats['accepted'] / stats['drafted']:.1%} of drafts accepted" if stats else ""
            if stats:
                speeds[f"{mode} x{batch} acceptance"] = stats["accepted"] / stats["drafted"]
            # greedy tokens equal to the plain path's: all in fp32; in bf16, kernels that differ can flip near-ties
            greedy = torch.stack(tokens, dim=1).cpu()
            if mode == "plain":
                plain = greedy
            else:  # speculative rounds may end one token past decode_tokens
                speeds[f"{mode} x{batch} match"] = (greedy[:, :decode_tokens] == plain).float().mean().item()
            match = f", greedy match with plain {speeds[f'{mode} x{batch} match']:.1%}" if mode != "plain" else ""
            print0(f"{name}: {speeds[f'{mode} x{batch}']:,.1f} decode tokens/s{accepted}{match}")
    return speeds


def decode_at_context(model):
    """
    A block_size cache holding decode_context random tokens (prefilled in chunks, untimed), its size in GiB, and a
    function that decodes the next decode_tokens tokens through it, one step each (the same slots at every call).
    """
    cache = model.new_cache(decode_batch, T, getattr(torch, dtype))
    tokens = torch.randint(model_config.vocab_size, (decode_batch, decode_context + decode_tokens), device=device)
    with amp, torch.no_grad():  # no graph: the cache would otherwise chain every chunk's activations together
        for start in range(0, decode_context, 2048):
            end = min(start + 2048, decode_context)
            model(tokens[:, start:end], cache=cache, cache_pos=torch.arange(start, end, device=device))
    slots = torch.arange(decode_context, decode_context + decode_tokens, device=device)[:, None]

    @torch.no_grad()
    def decode_steps():
        with amp:
            for t in range(decode_tokens):
                model(tokens[:, decode_context + t, None], cache=cache, cache_pos=slots[t])

    tensors = [t for layer in cache["layers"] for t in layer.values() if torch.is_tensor(t)]
    return decode_steps, sum(t.numel() * t.element_size() for t in tensors) / 2**30


def free_memory():
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -----------------------------------------------------------------------------
# measurements: the ceiling first, then our model, then the reference, one at a time in this process

ceiling = None
if cuda:  # what this GPU's bf16 tensor cores sustain: the honest denominator for MFU
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmuls = 50  # enough for the clocks to settle during warm-up and for event timing to be precise
    print0(f"ceiling: timing {repeats} x {matmuls} bf16 matmuls of {n} x {n} x {n}")
    timed(lambda: a @ b, matmuls)
    ceiling = 2 * n**3 / median_time(lambda: a @ b, matmuls)
    del a, b
    free_memory()
peak_flops = peak_flops or nominal_peak_flops(device)

model = GPT(model_config)
flops_per_token = model.flops_per_token(T)  # the reference has the same shape, so the same FLOPs
kv_cache_bytes = model.kv_cache_bytes(T, getattr(torch, dtype)) / T  # what decoding keeps per token
# targets = inputs: random tokens either way, the same work as shifted targets
rows = {"ours": measure("ours", model, lambda model, x: model(x, x)[1], decode)}
del model
free_memory()
if reference:
    rows[reference] = measure(reference, build_reference(), reference_loss, with_decode=decode and reference == "full")
    free_memory()
if ceiling:
    rows["ceiling"] = {"tflops": ceiling / 1e12}
for row in rows.values():
    row["mfu"] = row["tflops"] * 1e12 / ceiling if ceiling else None
    row["mfu_nominal"] = row["tflops"] * 1e12 / peak_flops if peak_flops else None

# -----------------------------------------------------------------------------
# report

columns = [("tokens/s", "tokens_per_s", "{:,.0f}"), ("ms/step", "ms_per_step", "{:.2f}"), ("TFLOP/s", "tflops", "{:.3g}"),
           ("MFU", "mfu", "{:.1%}"), ("MFU nominal", "mfu_nominal", "{:.1%}"),
           ("peak GiB", "peak_mem_gib", "{:.2f}"), ("decode tok/s", "decode_tokens_per_s", "{:,.1f}"),
           ("cache GiB", "cache_gib", "{:.4f}")]
print0(f"\n{device_name}, {dtype}, compile={compile}, torch {torch.__version__}"
       + ("; MFU against the measured ceiling" if ceiling else "")
       + (f", MFU nominal against {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else ""))
print0(f"{'':<10}" + "".join(f"{title:>14}" for title, _, _ in columns))
for name, row in rows.items():
    print0(f"{name:<10}" + "".join(f"{fmt.format(row[key]) if row.get(key) is not None else '-':>14}"
                                   for _, key, fmt in columns))
ratio = rows["ours"]["tokens_per_s"] / rows[reference]["tokens_per_s"] if reference else None
if reference:
    print0(f"ours / {reference}: {ratio:.3f}x training tokens/s")
print0(f"KV cache: {kv_cache_bytes:,.0f} bytes per token in {dtype}, all {model_config.n_layer} layers together")
if rows["ours"].get("decode"):  # greedy, decode_tokens new tokens per row, prefill included
    print0("decode: " + ", ".join(f"{key} {value:.1%}" if key.endswith(("acceptance", "match"))
                                  else f"{key} {value:,.1f} tokens/s" for key, value in rows["ours"]["decode"].items()))
os.makedirs(os.path.dirname(json_out) or ".", exist_ok=True)
with open(json_out, "w") as f:
    json.dump({"device_name": device_name, "torch_version": torch.__version__,
               "config": {**config, "device": device, "dtype": dtype, "warmup": warmup},
               "model_config": asdict(model_config), "flops_per_token": flops_per_token,
               "kv_cache_bytes_per_token": kv_cache_bytes,
               "ceiling_flops": ceiling, "nominal_peak_flops": peak_flops or None, "rows": rows,
               "ratio_ours_to_reference": ratio}, f, indent=2)
print0(f"wrote {json_out}")
