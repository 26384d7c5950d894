"""
nanollm model: a modern decoder-only transformer in one file, bottom-up as in nanoGPT. Every variant is a `GPTConfig`
flag and one small class found by searching it, written plainly (fast paths in kernel.py): skip a flag, skip its code.

Dense baseline (Llama-style): pre-norm RMSNorm (Zhang & Sennrich 2019); RoPE (arXiv 2104.09864) with Llama 3.1 or
YaRN scaling (arXiv 2309.00071); GQA (`n_kv_head`; arXiv 2305.13245), QK-norm (arXiv 2302.05442), Qwen2's q/k/v
biases; SwiGLU (arXiv 2002.05202); tied embeddings; a static-shape KV cache for decode.py's left-padded batches.

DeepSeek family: latent attention (`attention='mla'`; DeepSeek-V2, arXiv 2405.04434 §2.1); mixture-of-experts
(`n_experts`; DeepSeekMoE arXiv 2401.06066, DeepSeek-V3 arXiv 2412.19437 §2.1.2) with shared experts, Llama 4
interleaving, softmax, sigmoid or group-limited routing, capacity, the balance losses of Switch (arXiv 2101.03961),
ST-MoE (arXiv 2202.08906) and DeepSeek-V3 or its loss-free bias; multi-token prediction (`mtp_depth`; V3 §2.2).

Attention family: spans (`attn_span`: full, sliding window (arXiv 2004.05150), block-sparse (arXiv 1904.10509),
MoBA (arXiv 2502.13189)); gated attention (`attn_gate`; arXiv 2505.06708); linear attention (`attention='linear'`:
elu + 1, arXiv 2006.16236; Gated DeltaNet, arXiv 2412.06464); hybrid layer patterns (`attn_pattern`).

Residual streams and memory: hyper-connections (`residual='hc'`; arXiv 2409.19606) and their manifold-constrained
form (`residual='mhc'`; arXiv 2512.24880); Engram's hashed n-gram memory (`engram_layers`; arXiv 2601.07372).

Speedrun candidates (modded-nanogpt's and nanochat's): the squared-ReLU MLP (`mlp='relu2'`; Primer, arXiv 2109.08668),
soft-capped logits (`logit_softcap`; Gemma 2, arXiv 2408.00118 §2), value residual (`value_residual`; arXiv
2410.17897) and value embeddings after it (`value_embeds`), embedding-skip mixing (`x0_mix`), U-net skips
(`unet_skips`) and zero-initialized output projections (`zero_init_proj`; as ReZero).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernel import (cross_entropy, eager, flex, gated_delta_rule_chunked, grouped_attention, grouped_mm,
                    grouped_mm_supported, linear_attention_chunked, max_attention_logits, moba_attention, permute,
                    static_block_mask)


@dataclass
class GPTConfig:
    # size
    block_size: int = 1024      # longest trained context (RoPE tables, decode cache)
    vocab_size: int = 8192      # embedding rows; >= the tokenizer's vocabulary
    n_layer: int = 12           # transformer blocks
    n_head: int = 12            # query heads
    n_embd: int = 768           # model width
    dropout: float = 0.0        # on attention probabilities and residual branches (0 for pretraining)
    norm_eps: float = 1e-6      # epsilon of every RMSNorm
    zero_init_proj: bool = False  # matrices writing into the residual stream start at zero (modded-nanogpt)
    # attention
    attention: str = "mha"      # sequence mixer: 'mha' (MHA/GQA/MQA through n_kv_head), 'mla' (latent) or 'linear'
    n_kv_head: int = 0          # key/value heads: 0 = n_head (MHA), 1 = MQA, a divisor of n_head = GQA
    head_dim: int = 0           # width of each query/key/value head; 0 = n_embd // n_head (Qwen3: 128 at any width)
    qkv_bias: bool = False      # q, k and v projection biases (Qwen2)
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2i/head_dim)
    rope_scaling: str = "none"  # longer context: 'none', 'llama3' (Llama 3.1) or 'yarn' (arXiv 2309.00071)
    rope_factor: float = 1.0    # rope_scaling: the context's growth factor over rope_original_len
    rope_original_len: int = 0  # rope_scaling: the pretraining context
    rope_low_rotations: float = 0.0  # dims turning fewer times over rope_original_len are stretched; 0 = 1
    rope_high_rotations: float = 0.0  # dims turning more times keep theirs; 0 = 4 (Llama 3.1), 32 (YaRN)
    yarn_mscale: float = 1.0    # YaRN attention temperature of the rotary dims: 0.1 * yarn_mscale * ln(rope_factor) + 1
    yarn_mscale_all_dim: float = 0.0  # MLA: the same on a head's whole logit, the rotary dims taking the ratio (V3)
    qk_norm: bool = False       # RMSNorm on each query and key head before RoPE
    attn_span: str = "full"     # keys a softmax query sees: 'full', 'sliding', 'sparse' (block-sparse) or 'moba'
    window: int = 1024          # sliding: keys per query, itself included (Gemma 3: 1024; Mistral 7B: 4096)
    sparse_block: int = 128     # sparse: block size of the pattern
    sparse_local: int = 4       # sparse: a query sees its own block and the sparse_local - 1 before it, ...
    sparse_stride: int = 8      # ... and every sparse_stride-th block from the first (block 0: a global sink)
    moba_block: int = 512       # moba: key block size (MoBA: 512 at 8k context)
    moba_topk: int = 3          # moba: key blocks per query, its own included (MoBA: 3)
    attn_gate: str = "none"     # sigmoid gate on softmax attention (Qwen): 'none', 'headwise' or 'elementwise'
    attn_gate_at: str = "output"  # attn_gate: on each head's 'output' (the paper's G1) or its 'value' (G2)
    linear_kind: str = "elu"    # attention='linear': 'elu' (Katharopoulos et al.) or 'gated_deltanet' (Qwen3-Next's)
    linear_chunk: int = 64      # attention='linear': chunk length of the training form
    attn_pattern: str = ""      # a letter per layer, repeated over depth: G full, S sliding, B block-sparse, M MoBA
                                # (softmax, `attention`'s projections), L linear; '' = `attention` and attn_span
    value_embeds: str = ""      # layers whose values add a per-token embedding of their own, e.g. '0,1'; '' = none
    value_residual: bool = False  # every layer's values after the first mix in the first layer's (ResFormer)
    # MLA (attention='mla')
    q_lora_rank: int = 0        # rank of the low-rank query projection; 0 = a full-rank query
    kv_lora_rank: int = 0       # width of the cached key/value latent; 0 = 4 * head_dim (DeepSeek-V2's ratio)
    qk_nope_head_dim: int = 0   # per-head query/key dims without RoPE; 0 = head_dim
    qk_rope_head_dim: int = 0   # rotary dims of each query head and of the one key all heads share; 0 = head_dim / 2
    v_head_dim: int = 0         # per-head value dims; 0 = head_dim
    # feed-forward
    mlp: str = "swiglu"         # dense feed-forward: 'swiglu' or 'relu2' (squared ReLU, Primer); experts stay SwiGLU
    mlp_hidden: int = 0         # its hidden width; 0 = 8/3 * n_embd up to a multiple of 64 (swiglu), 4 * n_embd (relu2)
    # MoE (n_experts > 0)
    n_experts: int = 0          # routed experts per MoE layer; 0 = a dense MLP (`mlp`) on every layer
    n_shared_experts: int = 0   # experts every token goes through, run as one SwiGLU n_shared_experts times as wide
    moe_topk: int = 2           # routed experts per token
    moe_hidden: int = 0         # hidden width of each expert; 0 = mlp_hidden
    moe_every: int = 1          # MoE on layers i with (i + 1) % moe_every == 0 (Llama 4 interleaving: 2), dense between
    moe_first_dense: int = 0    # the first layers stay dense (DeepSeek-V3: 3)
    router_scoring: str = "softmax"  # expert scores: 'softmax' over experts, or a 'sigmoid' each (DeepSeek-V3, Llama 4)
    router_renorm: bool = True  # the chosen experts' gates renormalized to sum 1 (off: the raw scores)
    moe_groups: int = 1         # routed experts fall into this many groups, ranked by their two best scores (V3: 8)
    moe_topk_groups: int = 1    # a token's experts come from its best moe_topk_groups groups only (V3: 4)
    routed_scaling: float = 1.0  # factor on the routed experts' gates (DeepSeek-V3: 2.5)
    aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss over the batch (Switch: 0.01)
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3's sequence-wise balance loss (V3: 1e-4)
    bias_update_rate: float = 0.0  # aux-loss-free balancing: step of the per-expert selection bias (V3: 1e-3); 0 = off
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss (ST-MoE: 1e-3)
    router_jitter: float = 0.0  # training only: router input times U(1 - eps, 1 + eps) (Switch: 0.01)
    capacity_factor: float = 0.0  # training only: experts take ceil(factor * tokens * topk / n_experts); 0 = dropless
    # MTP (mtp_depth > 0)
    mtp_depth: int = 0          # extra tokens predicted by sequential MTP modules (DeepSeek-V3: 1); training only
    mtp_lambda: float = 0.3     # weight of the MTP losses: lambda / depth * their sum (V3: 0.3, then 0.1)
    mtp_blocks: int = 1         # transformer blocks per MTP module
    # residual streams
    residual: str = "standard"  # 'standard' pre-norm residual, 'hc' hyper-connections, 'mhc' manifold-constrained HC
    hc_streams: int = 4         # hc/mhc: parallel residual streams (the papers' expansion rate n)
    hc_sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations making the stream-mixing matrix doubly stochastic
    x0_mix: bool = False        # before block i the stream becomes a_i x + b_i x0, x0 the embedding (modded-nanogpt)
    unet_skips: bool = False    # the last n_layer // 2 blocks' inputs add the first half's outputs, mirrored (U-net)
    # Engram memory (engram_layers != '')
    engram_layers: str = ""     # layers (from 0) with an Engram memory before their attention, e.g. '1,4'; '' = none
    engram_orders: str = "2,3"  # n-gram orders looked up, e.g. '2,3' (bigrams and trigrams)
    engram_heads: int = 4       # hash functions (each with its own rows) per order
    engram_table_size: int = 1 << 20  # table rows of one Engram layer, all orders and heads together
    engram_dim: int = 256       # width of the retrieved memory: all orders' and heads' rows concatenated
    # output
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c) with c this (Gemma 2: 30); 0 = off

    def __post_init__(self):
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_kv_head", "head_dim", "mlp_hidden"):
            least = 0 if key in ("n_kv_head", "head_dim", "mlp_hidden") else 1  # 0: derived from the others
            require(getattr(self, key) >= least, f"{key}={getattr(self, key)} must be {least} or more")
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.mlp_hidden:  # relu2's 2 matrices at 4 * n_embd hold as many weights as SwiGLU's 3 at 8/3 * n_embd
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "relu2" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if not self.head_dim:
            require(self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head (or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        if self.rope_scaling != "none":
            self.rope_low_rotations = self.rope_low_rotations or 1.0
            self.rope_high_rotations = self.rope_high_rotations or {"llama3": 4.0, "yarn": 32.0}.get(self.rope_scaling)
        self.kv_lora_rank = self.kv_lora_rank or 4 * self.head_dim
        self.qk_nope_head_dim = self.qk_nope_head_dim or self.head_dim
        self.qk_rope_head_dim = self.qk_rope_head_dim or self.head_dim // 2
        self.v_head_dim = self.v_head_dim or self.head_dim
        self.moe_hidden = self.moe_hidden or self.mlp_hidden
        mixers = {self.attn_span, *map(PATTERN_LETTERS.get, self.attn_pattern)}
        choices = {"attention": ("mha", "mla", "linear"), "attn_span": SPANS, "linear_kind": ("elu", "gated_deltanet"),
                   "rope_scaling": ("none", "llama3", "yarn"), "residual": RESIDUALS, "mlp": MLPS}  # the registries'
        for key, names in choices.items():
            require(getattr(self, key) in names, f"unknown {key} {getattr(self, key)!r} (choose {', '.join(names)})")
        require(set(self.attn_pattern) <= {*PATTERN_LETTERS}, f"attn_pattern letters are {', '.join(PATTERN_LETTERS)}")
        require(not (self.attention == "linear" and (self.attn_span != "full" or set(self.attn_pattern) - {"L"})),
                "linear attention has no span: set attention to mha or mla for the softmax layers of attn_pattern")
        require(self.dropout == 0 or mixers <= {"full", "linear"},
                "FlexAttention has no attention dropout: set dropout=0 with a sliding, sparse or moba span")
        require(self.rope_dim % 2 == 0, "RoPE needs an even number of rotary dimensions")
        require(self.rope_scaling == "none" or (self.rope_factor >= 1 and self.rope_original_len > 0
                                                and self.rope_low_rotations < self.rope_high_rotations),
                "rope_scaling needs rope_factor >= 1, rope_original_len > 0, rope_low_rotations < rope_high_rotations")
        require(self.yarn_mscale == 1 or self.rope_scaling == "yarn", "yarn_mscale is YaRN's: set rope_scaling='yarn'")
        self.engram_layer_list = int_list(self.engram_layers, "engram_layers")
        self.engram_order_list = int_list(self.engram_orders, "engram_orders")
        self.value_embed_list = int_list(self.value_embeds, "value_embeds")
        for part in (CausalSelfAttention, MLA, MaskedSpan, MoBASpan, LinearAttention, AttentionGate, ValueEmbedding,
                     ValueResidual, Router, HyperConnections, Engram, MTP, LogitSoftCap):  # each checks its own fields
            part.check(self)

    def layer_mixer(self, layer):
        """(mixer, span) of layer `layer`, MIXERS and SPANS keys, from attn_pattern, else attention/attn_span."""
        pattern = self.attn_pattern
        span = PATTERN_LETTERS[pattern[layer % len(pattern)]] if pattern else self.attn_span
        return (self.linear_kind, "full") if "linear" in (span, self.attention) else (self.attention, span)

    @property
    def rope_dim(self):  # rotary dims per head
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, layer):
        """Whether layer `layer` (from 0; the MTP modules' blocks after the main ones) has an MoE feed-forward."""
        return self.n_experts > 0 and layer >= self.moe_first_dense and (layer + 1) % self.moe_every == 0


PATTERN_LETTERS = {"G": "full", "S": "sliding", "B": "sparse", "M": "moba", "L": "linear"}  # attn_pattern's letters


def require(ok, message):
    """A config check: a ValueError, which a stage turns into a one-line error."""
    if not ok:
        raise ValueError(message)


def config_fields():
    """Every GPTConfig field with its default: the model's share of a stage's configuration."""
    return {f.name: f.default for f in fields(GPTConfig)}


def int_list(text, key):
    """A list-valued config string, '1,4', as a tuple of ints (1, 4); a ValueError naming the key otherwise."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"{key} must be comma-separated integers, e.g. '1,4' (got {text!r})") from None


# -----------------------------------------------------------------------------
# shared pieces

class RMSNorm(nn.Module):
    """y = g * x / sqrt(mean(x^2) + eps), in fp32 whatever the autocast dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def yarn_mscale(factor, mscale):
    """YaRN's attention temperature in DeepSeek's form (arXiv 2309.00071 §3.4): 0.1 * mscale * ln(factor) + 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_tables(config):
    """cos and sin of position * frequency theta^(-2i/d), (block_size, rope_dim/2) each, fp32. rope_scaling stretches
    them: dims turning more than rope_high_rotations times over rope_original_len tokens keep theirs, those under
    rope_low_rotations are divided by rope_factor, those between blend the two, linearly in turns (Llama 3.1) or in
    dim index (YaRN's "NTK-by-parts", arXiv 2309.00071 §3.2, which also scales both tables by its temperature)."""
    c, d = config, config.rope_dim
    freqs = c.rope_theta ** -(torch.arange(0, d, 2, dtype=torch.float32) / d)
    temperature = 1.0
    if c.rope_scaling == "llama3":
        turns = c.rope_original_len / (2 * math.pi / freqs)
        keep = ((turns - c.rope_low_rotations) / (c.rope_high_rotations - c.rope_low_rotations)).clamp(0, 1)
    elif c.rope_scaling == "yarn":
        def dim_turning(turns):  # the (fractional) pair index turning `turns` times over the original context
            return d * math.log(c.rope_original_len / (turns * 2 * math.pi)) / (2 * math.log(c.rope_theta))
        first = max(math.floor(dim_turning(c.rope_high_rotations)), 0)
        last = min(math.ceil(dim_turning(c.rope_low_rotations)), d - 1)
        keep = 1 - ((torch.arange(d // 2, dtype=torch.float32) - first) / max(last - first, 1e-3)).clamp(0, 1)
        temperature = yarn_mscale(c.rope_factor, c.yarn_mscale) / yarn_mscale(c.rope_factor, c.yarn_mscale_all_dim)
    if c.rope_scaling != "none":
        freqs = freqs / c.rope_factor * (1 - keep) + freqs * keep
    angles = torch.outer(torch.arange(c.block_size, dtype=torch.float32), freqs)
    return angles.cos() * temperature, angles.sin() * temperature


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) of x (B, T, heads, d) by cos/sin (T, d/2) or (B, T, d/2), in fp32 as Meta's
    Llama reference does (compiled, a bf16 rotation has a slower backward), in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class Context:
    """What a layer may need beyond its input x, shared by all layers of a forward pass."""
    cos: torch.Tensor                   # RoPE tables at each token's position: (T, d/2), decoding (B, T, d/2)
    sin: torch.Tensor
    cache_pos: torch.Tensor = None      # (T,) cache slots the new tokens are written to; None when training
    mask: torch.Tensor = None           # (B, 1, T, max_len) which cache slots each new token sees
    pad: torch.Tensor = None            # (B,) each row's first cache slot (left padding); None when training
    idx: torch.Tensor = None            # (B, T) token ids
    aux: dict = field(default_factory=dict)  # layers' side outputs (metrics, unweighted losses), for the logs
    losses: dict = field(default_factory=dict)  # weighted auxiliary losses, which training adds to its objective
    v1: torch.Tensor = None             # value_residual: the first layer's values (B, T, n_kv_head, head_dim)


# -----------------------------------------------------------------------------
# attention

# Spans: which keys a softmax query sees. Any projection (CausalSelfAttention, MLA) takes any span: the projection
# makes q, k, v and owns its cache layout; the span attends (SDPA or FlexAttention), decoding caches and masks slots.

class FullSpan:
    """Causal attention over every past position, through SDPA's fused kernels (is_causal)."""
    use_flex = None  # masked spans: None = FlexAttention on CUDA, masked SDPA elsewhere; True/False forces one
    rewinds = True  # a slot per position, masks hide later ones: decoding rewinds by position alone (rejected drafts)

    def __init__(self, config):
        self.config = config

    def cache_len(self, max_len):
        """Cache slots for a sequence of up to max_len tokens."""
        return max_len

    def new_cache(self, batch, max_len, device):
        """The span's own cache entries, beside the projection's."""
        return {}

    def update(self, cache, new, dim, ctx):
        """Decoding: write new's entries (name -> tensor, time along dim) into cache; return the cached tensors to
        attend over, in new's order, and the mask (B, 1, T, slots) of what each token sees."""
        for name, tensor in new.items():
            cache[name].index_copy_(dim, ctx.cache_pos, tensor)
        return [cache[name] for name in new], ctx.mask

    def attend(self, q, k, v, ctx, mask=None, scale=None, dropout=0.0):
        """q (B, n_head, T, d), k and v (B, key heads, S, d) -> (B, n_head, T, d_v); mask None = training."""
        # masked GQA, or fp32 on CUDA: SDPA's fp32 kernel rejects inductor's stride of a 1-token query's length-1 dim
        gqa = k.size(1) != q.size(1)
        if mask is not None and not dropout and (gqa and q.size(2) > 1 or q.is_cuda and q.dtype == torch.float32):
            return grouped_attention(q, k, v, mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              dropout_p=dropout, enable_gqa=gqa)

    def logit_mask(self, q, k):
        """For QK-Clip's largest logits: what each query sees in training; None = causal."""
        return None

    def keys_per_query(self, T):
        """Keys a query attends to, on average over T positions (FLOPs accounting)."""
        return (T + 1) / 2


class MaskedSpan(FullSpan):
    """A fixed causal pattern allowed(query position, key position); use_flex picks the kernel."""

    def __init__(self, config):
        super().__init__(config)
        import torch.nn.attention.flex_attention  # noqa: F401 (see kernel.py)

    @staticmethod
    def check(c):
        require(min(c.window, c.sparse_block, c.sparse_local, c.sparse_stride) >= 1,
                "window and sparse_* must be 1 or more")

    def attend(self, q, k, v, ctx, mask=None, scale=None, dropout=0.0):
        if mask is None and (q.is_cuda if self.use_flex is None else self.use_flex):  # skips empty 128 x 128 tiles
            return flex(q, k, v, static_block_mask(self.key, self.allowed, q.size(2), q.device), scale)
        return super().attend(q, k, v, ctx, self.logit_mask(q, k) if mask is None else mask, scale, dropout)

    def logit_mask(self, q, k):
        pos = torch.arange(q.size(2), device=q.device)
        return self.allowed(pos[:, None], pos[None, :])  # (T, T)

    def update(self, cache, new, dim, ctx):
        tensors, mask = super().update(cache, new, dim, ctx)
        # positions count from each row's first token (left padding), as in training
        q_pos = (ctx.cache_pos[None, :] - ctx.pad[:, None])[:, :, None]  # (B, T, 1)
        k_pos = (torch.arange(mask.size(-1), device=ctx.pad.device) - ctx.pad[:, None])[:, None, :]  # (B, 1, S)
        return tensors, mask & self.allowed(q_pos, k_pos).unsqueeze(1)


class SlidingSpan(MaskedSpan):
    """Sliding-window attention (Longformer, arXiv 2004.05150; Mistral 7B): a query sees the `window` latest
    positions, itself included. Decoding keeps a rolling cache of `window` slots (position p in slot p % window)."""
    rewinds = False  # a later position overwrites the slot of one the window still needs

    def __init__(self, config):
        super().__init__(config)
        self.window = config.window  # train.py's window_warmup narrows it

    @property
    def key(self):  # of its block mask's cache
        return "sliding", self.window

    def allowed(self, q_pos, k_pos):
        return (k_pos <= q_pos) & (q_pos - k_pos < self.window)

    def cache_len(self, max_len):
        return min(self.window, max_len)

    def new_cache(self, batch, max_len, device):
        return {"slot_pos": torch.full((self.cache_len(max_len),), -1, dtype=torch.long, device=device)}  # -1: empty

    def update(self, cache, new, dim, ctx):
        # attend over the cache and the new tokens, then keep the newest: each token of a long chunk sees its window
        slots, T = cache["slot_pos"].numel(), ctx.cache_pos.numel()
        k_slot = torch.cat([cache["slot_pos"], ctx.cache_pos])  # (slots + T,) cache slot (position + pad) of each key
        mask = (k_slot >= ctx.pad[:, None, None]) & self.allowed(ctx.cache_pos[:, None], k_slot)
        tensors = [torch.cat([cache[name], tensor], dim) for name, tensor in new.items()]
        keep = min(T, slots)
        rolling = ctx.cache_pos[T - keep:] % slots
        for name, tensor in new.items():
            cache[name].index_copy_(dim, rolling, tensor.narrow(dim, T - keep, keep))
        cache["slot_pos"].index_copy_(0, rolling, ctx.cache_pos[T - keep:])
        return tensors, mask.unsqueeze(1)  # (B, 1, T, slots + T)

    def keys_per_query(self, T):
        w = min(self.window, T)
        return (w * (w + 1) / 2 + (T - w) * w) / T


class BlockSparseSpan(MaskedSpan):
    """Block-sparse causal attention in blocks of sparse_block (Sparse Transformer, arXiv 1904.10509; BigBird's
    global block): a query sees its block, the sparse_local - 1 before it and every sparse_stride-th from block 0."""

    def __init__(self, config):
        super().__init__(config)
        self.block, self.local, self.stride = config.sparse_block, config.sparse_local, config.sparse_stride
        self.key = ("sparse", self.block, self.local, self.stride)

    def allowed(self, q_pos, k_pos):
        q_block, k_block = q_pos // self.block, k_pos // self.block
        return (k_pos <= q_pos) & ((q_block - k_block < self.local) | (k_block % self.stride == 0))

    def keys_per_query(self, T):  # the n queries of block i see a triangle of it and `whole` earlier blocks
        sizes = [min(self.block, T - i * self.block) for i in range(math.ceil(T / self.block))]
        whole = [sum(i - j < self.local or j % self.stride == 0 for j in range(i)) for i in range(len(sizes))]
        return sum(n * (n + 1) / 2 + n * w * self.block for n, w in zip(sizes, whole)) / T


class MoBASpan(FullSpan):
    """Mixture of Block Attention (MoBA, arXiv 2502.13189 §2.2): a query sees its own moba_block keys causally (their
    mean holds future keys) and the moba_topk - 1 earlier blocks of best q . mean(k) per head, with no parameters."""

    def __init__(self, config):
        super().__init__(config)
        import torch.nn.attention.flex_attention  # noqa: F401 (see kernel.py)
        self.block, self.topk = config.moba_block, config.moba_topk

    @staticmethod
    def check(c):
        require(min(c.moba_block, c.moba_topk) >= 1, "moba_block and moba_topk must be 1 or more")

    @torch.no_grad()
    def past_blocks(self, q, k, q_pos, k_pos):
        """The moba_topk - 1 earlier blocks whose mean keys score highest against each query, (B, n_head, T, m), and
        whether each is real (an early block has fewer before it); positions q_pos (B|1, T), k_pos (B|1, S)."""
        n = math.ceil(k.size(2) / self.block)
        # block sums by a matmul with the membership (B|1, blocks, S), not a contended scatter-add; padding: no block
        member = (k_pos // self.block)[:, None, :] == torch.arange(n, device=q.device)[:, None]
        means = (member[:, None].float() @ k.float() / self.block).repeat_interleave(q.size(1) // k.size(1), dim=1)
        q_block = (q_pos // self.block)[:, None, :, None]  # (B|1, 1, T, 1)
        scores = (q.float() @ means.mT).masked_fill(torch.arange(n, device=q.device) >= q_block, float("-inf"))
        m = min(self.topk - 1, n)  # the best m by repeated argmax: torch.compile fuses it, not topk (a library kernel)
        top = torch.empty(*q.shape[:3], 0, dtype=torch.long, device=q.device)
        for _ in range(m):
            best = scores.argmax(dim=-1, keepdim=True)
            top, scores = torch.cat([top, best], dim=-1), scores.scatter(-1, best, float("-inf"))
        return top, (torch.arange(m, device=q.device) < q_block).expand_as(top)

    def mask(self, q, k, q_pos, k_pos):
        """(B, n_head, T, S) whether each query sees each key: causally, in its own block or one of its past_blocks."""
        top, real = self.past_blocks(q, k, q_pos, k_pos)
        blocks = torch.arange(math.ceil(k.size(2) / self.block), device=q.device)
        own = blocks == (q_pos // self.block)[:, None, :, None]
        chosen = own | ((top[..., None] == blocks) & real[..., None]).any(dim=-2)
        k_block = (k_pos // self.block).clamp(min=0)[:, None, None, :].expand(*chosen.shape[:3], -1)
        return chosen.gather(-1, k_block) & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])

    def attend(self, q, k, v, ctx, mask=None, scale=None, dropout=0.0):
        if mask is not None:  # decoding: positions count from each row's first token
            k_pos = torch.arange(k.size(2), device=q.device)[None, :] - ctx.pad[:, None]
            mask = mask & self.mask(q, k, ctx.cache_pos[None, :] - ctx.pad[:, None], k_pos)
        elif q.is_cuda if self.use_flex is None else self.use_flex:  # training, block by block (kernel.py)
            pos = torch.arange(q.size(2), device=q.device)[None]
            return moba_attention(q, k, v, *self.past_blocks(q, k, pos, pos), self.block, scale)
        return super().attend(q, k, v, ctx, self.logit_mask(q, k) if mask is None else mask, scale, dropout)

    def logit_mask(self, q, k):
        pos = torch.arange(q.size(2), device=q.device)[None]
        return self.mask(q, k, pos, pos)

    def keys_per_query(self, T):  # the n queries of block c see a triangle of it and min(topk - 1, c) earlier blocks
        sizes = [min(self.block, T - c * self.block) for c in range(math.ceil(T / self.block))]
        return sum(n * (n + 1) / 2 + n * min(self.topk - 1, c) * self.block for c, n in enumerate(sizes)) / T


SPANS = {"full": FullSpan, "sliding": SlidingSpan, "sparse": BlockSparseSpan, "moba": MoBASpan}  # config.attn_span


class AttentionGate(nn.Module):
    """Gated attention (Qwen, arXiv 2505.06708): y * sigmoid(x W), x the layer's input, a gate per head or channel, on
    head outputs (G1, the paper's best) or values (G2). No bias: W ~ N(0, 0.02) starts the gates near 0.5."""

    def __init__(self, config, heads, head_dim):
        super().__init__()
        self.proj = nn.Linear(config.n_embd, heads * (head_dim if config.attn_gate == "elementwise" else 1), bias=False)

    def forward(self, x, y):
        """x (B, T, n_embd), y (B, T, heads, head_dim) -> y gated."""
        return y * torch.sigmoid(self.proj(x)).view(*y.shape[:3], -1)

    @staticmethod
    def check(c):
        require(c.attn_gate in ("none", "headwise", "elementwise"), f"unknown attn_gate '{c.attn_gate}'")
        require(c.attn_gate_at in ("output", "value"), f"unknown attn_gate_at '{c.attn_gate_at}'")


class ValueEmbedding(nn.Module):
    """Value embeddings (modded-nanogpt, Keller Jordan et al. 2024; after value residual learning, arXiv 2410.17897),
    value_embeds: a layer's own table gives each token ve, and its values (B, T, n_kv_head, head_dim) become
    v + scale * ve, which the cache keeps; scale: 1 at init (plain addition), a gain free of the table's decay."""

    def __init__(self, config):
        super().__init__()
        self.table = nn.Embedding(config.vocab_size, config.n_kv_head * config.head_dim)
        self.scale = nn.Parameter(torch.ones(1))  # 1-D: AdamW's, no weight decay (optim.py)

    @staticmethod
    def check(c):
        layers = c.value_embed_list
        require(all(0 <= i < c.n_layer for i in layers), "value_embeds must be layers within 0..n_layer-1")
        require(all(c.layer_mixer(i)[0] == "mha" for i in layers), "value_embeds needs softmax attention='mha' layers")

    def forward(self, v, idx):
        return v + (self.scale * self.table(idx)).view_as(v).type_as(v)


class ValueResidual(nn.Module):
    """Value residual learning (ResFormer, arXiv 2410.17897: U_n = A_n (V_n + V_1) / 2), value_residual: layer 0 hands
    its values v1 on, later layers' become a v + b v1, a, b learned from the paper's 0.5 each; the cache keeps them."""

    def __init__(self, layer):
        super().__init__()
        self.mix = nn.Parameter(torch.full((2,), 0.5)) if layer else None  # 1-D: AdamW's, no weight decay

    @staticmethod
    def check(c):
        require(not c.value_residual or all(c.layer_mixer(i)[0] == "mha" for i in range(c.n_layer)),
                "value_residual needs softmax attention='mha' in every layer")

    def forward(self, v, ctx):
        if self.mix is None:
            ctx.v1 = v
            return v
        return self.mix[0] * v + self.mix[1] * ctx.v1


class CausalSelfAttention(nn.Module):
    """Attention with n_kv_head key/value heads (MHA, GQA, MQA), RoPE, optional QK-norm and gate, over its span."""

    def __init__(self, config, span="full"):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k, v fused: one big matmul beats three small ones; Muon (optim.py) orthogonalizes the three apart
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.qkv_bias)
        self.qkv.weight.logical_rows = (self.n_head * self.head_dim,) + 2 * (self.n_kv_head * self.head_dim,)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.proj.weight.writes_residual = True  # a depth-scaled init (GPT)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.span, self.dropout = SPANS[span](config), config.dropout
        self.track_max_logits = False  # QK-Clip (optim.py) switches this on to read each head's largest logit
        self.gate_at = config.attn_gate_at if config.attn_gate != "none" else None
        gate_heads = self.n_kv_head if self.gate_at == "value" else self.n_head
        self.gate = AttentionGate(config, gate_heads, self.head_dim) if self.gate_at else None
        self.value_embed = self.value_residual = None  # Block sets them under value_embeds and value_residual

    @staticmethod
    def check(c):
        require(c.n_head % c.n_kv_head == 0, "n_head must be a multiple of n_kv_head")

    def new_cache(self, batch, max_len, dtype, device):
        k = torch.zeros(batch, self.n_kv_head, self.span.cache_len(max_len), self.head_dim, dtype=dtype, device=device)
        return {"k": k, "v": torch.zeros_like(k), **self.span.new_cache(batch, max_len, device)}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, self.head_dim).split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        q = apply_rope(self.q_norm(q), ctx.cos, ctx.sin)
        k = apply_rope(self.k_norm(k), ctx.cos, ctx.sin)
        v = v if self.value_embed is None else self.value_embed(v, ctx.idx)
        v = v if self.value_residual is None else self.value_residual(v, ctx)
        if self.gate_at == "value":  # gated values are what the cache keeps
            v = self.gate(x, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if cache is not None:  # decoding: the span caches the new keys and values, says what each token sees
            (k, v), mask = self.span.update(cache, {"k": k, "v": v}, 2, ctx)
        elif self.track_max_logits:
            ctx.aux.setdefault("max_logits", []).append(max_attention_logits(q, k, self.span.logit_mask(q, k)))
        y = self.span.attend(q, k, v, ctx, mask, dropout=self.dropout if self.training else 0.0).transpose(1, 2)
        if self.gate_at == "output":
            y = self.gate(x, y)
        return F.dropout(self.proj(y.reshape(B, T, -1)), self.dropout, self.training)  # (B, T, n_head * head_dim)

    def attention_flops(self, T):
        """Forward FLOPs per token of q.k and the weighted sum of values: 2 * 2 * head_dim per head and key seen."""
        return 2 * self.n_head * 2 * self.head_dim * self.span.keys_per_query(T)

    @torch.no_grad()
    def qk_clip(self, max_logits, tau):
        """QK-Clip (Kimi K2, arXiv 2507.20534 §2.1), after a step: a head whose largest logit passed tau scales its
        logits by gamma = tau / max_logit, sqrt(gamma) to query and own key (MHA), else all to query; RoPE commutes."""
        assert isinstance(self.q_norm, nn.Identity), "QK-norm normalizes away any scaling of the q and k weights"
        gamma = (max_logits.new_tensor(tau) / max_logits.clamp(min=tau))[:, None, None]  # x / x: 1 exactly
        own_keys = self.n_kv_head == self.n_head
        for rows in (self.qkv.weight, self.qkv.bias[:, None]) if self.qkv.bias is not None else (self.qkv.weight,):
            q, k, _ = rows.split(self.qkv.weight.logical_rows)  # a bias (qkv_bias) scales with its rows
            for w in (q, k) if own_keys else (q,):
                w.view(self.n_head, self.head_dim, -1).mul_(gamma.sqrt() if own_keys else gamma)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 §2.1): a token caches one latent, up-projected to all
    heads' keys and values, and one shared rotary key (decoupled RoPE: a rotation can't fold into the up-projection)."""

    def __init__(self, config, span="full"):
        super().__init__()
        self.n_head, self.rank, self.v_dim = config.n_head, config.kv_lora_rank, config.v_head_dim
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        d, q_rank = config.n_embd, config.q_lora_rank
        self.q_a = (nn.Sequential(nn.Linear(d, q_rank, bias=False), RMSNorm(q_rank, config.norm_eps)) if q_rank
                    else nn.Identity())
        self.q_b = nn.Linear(q_rank or d, self.n_head * (self.nope + self.rope), bias=False)
        self.kv_a = nn.Linear(d, self.rank + self.rope, bias=False)  # the latent and, from x itself, the rotary key
        self.kv_a.weight.logical_rows = (self.rank, self.rope)  # two matrices for Muon (optim.py)
        self.kv_norm = RMSNorm(self.rank, config.norm_eps)
        # per head: W_UK's rows (latent -> key), then W_UV's (latent -> value)
        self.kv_b = nn.Linear(self.rank, self.n_head * (self.nope + self.v_dim), bias=False)
        self.proj = nn.Linear(self.n_head * self.v_dim, d, bias=False)
        self.proj.weight.writes_residual = True
        # a query-key dot product spans both parts; under YaRN, DeepSeek sharpens the whole logit by its temperature
        self.scale = (self.nope + self.rope) ** -0.5 * yarn_mscale(config.rope_factor, config.yarn_mscale_all_dim) ** 2
        self.span, self.dropout = SPANS[span](config), config.dropout
        self.absorb = True  # decode in the weight-absorbed form; False: the expanded one (the tests compare them)
        self.track_max_logits = False  # QK-Clip, as in CausalSelfAttention
        self.gate = AttentionGate(config, self.n_head, self.v_dim) if config.attn_gate != "none" else None  # output

    @staticmethod
    def check(c):
        mla = c.attention == "mla"
        require(not (mla and c.attn_gate != "none" and c.attn_gate_at == "value"),
                "MLA caches a latent, not values: attn_gate_at='value' needs attention='mha'")
        require(not (mla and c.qk_norm), "MLA's absorbed decoding has no per-head keys to normalize")
        require(not (mla and c.qkv_bias), "MLA has no q, k, v projections to bias: qkv_bias needs attention='mha'")
        require(not (mla and c.n_kv_head != c.n_head), "MLA's latent serves all heads: n_kv_head needs attention='mha'")
        require(c.yarn_mscale_all_dim == 0 or (mla and c.rope_scaling == "yarn"),
                "yarn_mscale_all_dim is MLA's softmax temperature under rope_scaling='yarn' (DeepSeek)")

    def new_cache(self, batch, max_len, dtype, device):
        slots = self.span.cache_len(max_len)
        return {"latent": torch.zeros(batch, slots, self.rank, dtype=dtype, device=device),
                "k_rope": torch.zeros(batch, slots, self.rope, dtype=dtype, device=device),
                **self.span.new_cache(batch, max_len, device)}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q_nope, q_rope = self.q_b(self.q_a(x)).view(B, T, self.n_head, -1).split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, ctx.cos, ctx.sin)
        latent, k_rope = self.kv_a(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_norm(latent)  # (B, T, kv_lora_rank)
        k_rope = apply_rope(k_rope.unsqueeze(2), ctx.cos, ctx.sin).squeeze(2)  # (B, T, qk_rope_head_dim)
        mask = None
        if cache is not None:  # decoding: the span caches the new latents and keys, says what each token sees
            (latent, k_rope), mask = self.span.update(cache, {"latent": latent, "k_rope": k_rope}, 1, ctx)
        attend = self.absorbed if cache is not None and self.absorb else self.expanded
        y = attend(q_nope, q_rope, latent, k_rope, ctx, mask).transpose(1, 2)  # (B, T, n_head, v_head_dim)
        if self.gate is not None:
            y = self.gate(x, y)
        return F.dropout(self.proj(y.reshape(B, T, -1)), self.dropout, self.training)

    def attention_flops(self, T):
        """Forward FLOPs per token of q.k (nope + rope dims) and the weighted sum of values, per head and key seen."""
        return 2 * self.n_head * (self.nope + self.rope + self.v_dim) * self.span.keys_per_query(T)

    def expanded(self, q_nope, q_rope, latent, k_rope, ctx, mask):
        """Training form: per-head keys and values up-projected from the S latents, then fused SDPA."""
        B, S, _ = latent.shape
        k_nope, v = self.kv_b(latent).view(B, S, self.n_head, -1).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, n_head, T, nope + rope)
        k_rope = k_rope.unsqueeze(2).expand(B, S, self.n_head, self.rope)  # the one rotary key, seen by every head
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # (B, n_head, S, nope + rope)
        if self.track_max_logits and mask is None:  # at the softmax's scale (YaRN's temperature in it)
            logits = max_attention_logits(q, k, self.span.logit_mask(q, k), self.scale)
            ctx.aux.setdefault("max_logits", []).append(logits)
        return self.span.attend(q, k, v.transpose(1, 2), ctx, mask, self.scale, self.dropout if self.training else 0.0)

    def absorbed(self, q_nope, q_rope, latent, k_rope, ctx, mask):
        """Decoding form (DeepSeek-V2 §2.1.2): q^C . (W_UK c) = (W_UK^T q^C) . c, so W_UK folds into the query and W_UV
        applies after attention over the cached latents: one key head for all (MQA), the latent its value."""
        w_uk, w_uv = self.kv_b.weight.view(self.n_head, -1, self.rank).split([self.nope, self.v_dim], dim=1)
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # (B, n_head, T, kv_lora_rank)
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)  # (B, n_head, T, rank + rope)
        k = torch.cat([latent, k_rope], dim=-1).unsqueeze(1)  # (B, 1, S, rank + rope)
        y = self.span.attend(q, k, latent.unsqueeze(1), ctx, mask, self.scale)  # (B, n_head, T, rank)
        return torch.einsum("bhtr,hvr->bhtv", y, w_uv)

    @torch.no_grad()
    def qk_clip(self, max_logits, tau):
        """QK-Clip for MLA: head h's logit is q^C.k^C + q^R.k^R, k^R shared by all heads. q^C and k^C (head h's rows
        of q_b, kv_b) take sqrt(gamma) each, q^R all of gamma, k^R (kv_a) nothing: no other head's logits change."""
        gamma = (max_logits.new_tensor(tau) / max_logits.clamp(min=tau))[:, None, None]  # (n_head, 1, 1)
        q_nope, q_rope = self.q_b.weight.view(self.n_head, self.nope + self.rope, -1).split([self.nope, self.rope], 1)
        k_nope = self.kv_b.weight.view(self.n_head, self.nope + self.v_dim, -1)[:, :self.nope]
        for w in (q_nope, k_nope):
            w.mul_(gamma.sqrt())
        q_rope.mul_(gamma)


# -----------------------------------------------------------------------------
# linear attention: a recurrent state instead of a KV cache

def linear_attention_recurrent(q, k, v, state):
    """Causal linear attention o_t = q_t S_t, S_t = S_{t-1} + k_t v_t^T, token by token (decoding; the reference of
    kernel.linear_attention_chunked): q, k (B, H, T, d_k), v (B, H, T, d_v), state (B, H, d_k, d_v) -> o, state."""
    outputs = []
    for t in range(q.size(2)):
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, None, :] @ state).squeeze(2))
    return torch.stack(outputs, dim=2), state


def gated_delta_rule_recurrent(q, k, v, beta, g, state):
    """The gated delta rule (Gated DeltaNet, arXiv 2412.06464 §3), token by token: decoding's form and the reference
    of kernel.gated_delta_rule_chunked: S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t,
    a_t = exp(g_t). Shapes as linear_attention_recurrent's, beta and g (B, H, T); fp32."""
    outputs = []
    for t in range(q.size(2)):
        state = state * g[:, :, t, None, None].exp()
        k_t = k[:, :, t]
        update = beta[:, :, t, None] * (v[:, :, t] - (k_t[:, :, None, :] @ state).squeeze(2))  # (B, H, d_v)
        state = state + k_t[..., :, None] * update[..., None, :]
        outputs.append((q[:, :, t, None, :] @ state).squeeze(2))
    return torch.stack(outputs, dim=2), state


class LinearAttention(nn.Module):
    """Causal linear attention (Katharopoulos et al. 2020, arXiv 2006.16236 §3.2): softmax(q . k) becomes
    phi(q) . phi(k), phi = elu + 1 > 0, a running sum o_t = phi(q_t) S_t / (phi(q_t) . z_t), S_t = sum phi(k_j)
    v_j^T, z_t = sum phi(k_j) (a value column of ones). Trained in chunks, decoded with the state. No RoPE."""

    def __init__(self, config, span="full"):  # span: the state sees every past token
        super().__init__()
        self.n_head, self.head_dim, self.chunk = config.n_head, config.head_dim, config.linear_chunk
        inner = self.n_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=False)
        self.qkv.weight.logical_rows = (inner,) * 3  # three matrices for Muon (optim.py)
        self.proj = nn.Linear(inner, config.n_embd, bias=False)
        self.proj.weight.writes_residual = True
        self.dropout = config.dropout

    @staticmethod
    def check(c):
        require(c.linear_chunk >= 1, "linear_chunk must be 1 or more")
        require(c.attention != "linear" and set(c.attn_pattern) != {"L"} or c.attn_gate == "none" and not c.qk_norm
                and not c.qkv_bias, "attn_gate, qk_norm and qkv_bias act on softmax layers: every layer here is linear")

    def new_cache(self, batch, max_len, dtype, device):
        return {"state": torch.zeros(batch, self.n_head, self.head_dim, self.head_dim + 1, device=device)}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).transpose(1, 3).unbind(2)  # (B, H, T, d)
        with torch.autocast(x.device.type, enabled=False):  # sums over the whole context: fp32
            q, k = F.elu(q.float()) + 1, F.elu(k.float()) + 1
            if cache is not None:  # left padding: a padded slot writes nothing into the state
                k = k * (ctx.cache_pos[None, :] >= ctx.pad[:, None])[:, None, :, None]
            v = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], dim=-1)  # + the normalizer
            state = cache["state"] if cache is not None else q.new_zeros(B, self.n_head, k.size(-1), v.size(-1))
            o, state = (linear_attention_recurrent(q, k, v, state) if T == 1
                        else linear_attention_chunked(q, k, v, state, self.chunk))
            if cache is not None:
                cache["state"].copy_(state)
            y = o[..., :-1] / (o[..., -1:] + 1e-6)  # (B, H, T, head_dim)
        return F.dropout(self.proj(y.type_as(x).transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)

    def attention_flops(self, T):
        """Forward FLOPs per token of the recurrent form: write k v^T and read q S, per head."""
        return self.n_head * 4 * self.head_dim * (self.head_dim + 1)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (arXiv 2412.06464; Qwen3-Next's linear layers): per head a d_k x d_v state decays by a_t =
    exp(g_t) and moves by the delta rule toward v_t at key k_t, strength b_t. q, k, v: causal depthwise conv, SiLU;
    q, k L2-normalized; g_t = -exp(A_log) softplus(a_t + dt_bias) (Mamba-2), b_t = sigmoid; out: RMSNorm * SiLU(z)."""
    conv_size = 4

    def __init__(self, config, span="full"):  # span: the state sees every past token
        super().__init__()
        self.n_head, self.head_dim, self.chunk = config.n_head, config.head_dim, config.linear_chunk
        H, inner = self.n_head, self.n_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=False)
        self.qkv.weight.logical_rows = (inner,) * 3
        self.conv = nn.Parameter(torch.empty(3 * inner, self.conv_size).uniform_(-0.5, 0.5))  # nn.Conv1d's init
        self.conv.muon = False  # depthwise filters, channels x 4: AdamW's (optim.py)
        self.gates = nn.Linear(config.n_embd, inner + 2 * H, bias=False)  # output gate z, decay input a, write b
        self.gates.weight.logical_rows = (inner, H, H)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()  # softplus(dt_bias) in [1e-3, 1e-1]
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.norm = RMSNorm(self.head_dim, config.norm_eps)
        self.proj = nn.Linear(inner, config.n_embd, bias=False)
        self.proj.weight.writes_residual = True
        self.dropout = config.dropout

    def new_cache(self, batch, max_len, dtype, device):
        conv = torch.zeros(batch, 3 * self.n_head * self.head_dim, self.conv_size - 1, dtype=dtype, device=device)
        return {"state": torch.zeros(batch, self.n_head, self.head_dim, self.head_dim, device=device), "conv": conv}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        H, d = self.n_head, self.head_dim
        if cache is not None:  # left padding: a padded slot's zero input leaves conv and state untouched
            x = x * (ctx.cache_pos[None, :] >= ctx.pad[:, None])[..., None]
        qkv = self.qkv(x).mT  # (B, 3 * inner, T)
        history = cache["conv"] if cache is not None else qkv.new_zeros(B, qkv.size(1), self.conv_size - 1)
        qkv = torch.cat([history.type_as(qkv), qkv], dim=2)  # causal: each output sees its 3 predecessors
        if cache is not None:
            cache["conv"].copy_(qkv[:, :, -(self.conv_size - 1):])
        qkv = F.silu(F.conv1d(qkv, self.conv.unsqueeze(1).type_as(qkv), groups=qkv.size(1)))  # (B, 3 * inner, T)
        q, k, v = qkv.view(B, 3, H, d, T).transpose(3, 4).unbind(1)  # (B, H, T, d)
        z, a, b = self.gates(x).split([H * d, H, H], dim=-1)
        with torch.autocast(x.device.type, enabled=False):  # decays, sums and the triangular solve in fp32
            g = (-self.A_log.exp() * F.softplus(a.float() + self.dt_bias)).mT  # (B, H, T), <= 0
            beta = b.float().sigmoid().mT
            q = F.normalize(q.float(), dim=-1, eps=1e-6) * d ** -0.5
            k = F.normalize(k.float(), dim=-1, eps=1e-6)
            state = cache["state"] if cache is not None else q.new_zeros(B, H, d, d)
            args = (q, k, v.float(), beta, g, state)
            o, state = gated_delta_rule_recurrent(*args) if T == 1 else gated_delta_rule_chunked(*args, self.chunk)
            if cache is not None:
                cache["state"].copy_(state)
        y = self.norm(o.type_as(x).transpose(1, 2)) * F.silu(z.view(B, T, H, d))  # (B, T, H, d)
        return F.dropout(self.proj(y.reshape(B, T, -1)), self.dropout, self.training)

    def attention_flops(self, T):
        """Forward FLOPs per token of the recurrent form, per head: decay, read S^T k, write, read S^T q."""
        return self.n_head * 7 * self.head_dim * self.head_dim


# -----------------------------------------------------------------------------
# feed-forward

class SwiGLU(nn.Module):
    """FFN(x) = W_down(SiLU(W_gate x) * W_up x), Shazeer 2020."""

    def __init__(self, config, hidden=None):
        super().__init__()
        self.hidden, self.dropout = hidden or config.mlp_hidden, config.dropout
        self.gate_up = nn.Linear(config.n_embd, 2 * self.hidden, bias=False)  # gate and up fused: one matmul
        self.gate_up.weight.logical_rows = (self.hidden, self.hidden)  # two matrices for Muon (optim.py)
        self.down = nn.Linear(self.hidden, config.n_embd, bias=False)
        self.down.weight.writes_residual = True

    def forward(self, x, ctx=None):
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return F.dropout(self.down(F.silu(gate) * up), self.dropout, self.training)

    def flops(self):
        return {"mlp": matmul_flops(self)}


class ReLUSquared(nn.Module):
    """FFN(x) = W_down(ReLU(W_up x)^2), mlp='relu2': Primer's squared ReLU (So et al., arXiv 2109.08668), the MLP of
    modded-nanogpt and nanochat. No gate: two matrices, mlp_hidden = 4 * n_embd by default."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.down.weight.writes_residual = True
        self.dropout = config.dropout

    def forward(self, x, ctx=None):
        return F.dropout(self.down(F.relu(self.up(x)).square()), self.dropout, self.training)

    flops = SwiGLU.flops


MLPS = {"swiglu": SwiGLU, "relu2": ReLUSquared}  # config.mlp: the dense feed-forward


class Router(nn.Module):
    """Token-choice top-k routing in fp32 (DeepSeek-V3, arXiv 2412.19437 §2.1.2): softmax or sigmoid affinities;
    experts chosen by affinity plus a balancing bias, gates from the affinities alone."""

    def __init__(self, config):
        super().__init__()
        self.topk, self.scoring, self.renorm = config.moe_topk, config.router_scoring, config.router_renorm
        self.scaling, self.jitter, self.bias_rate = config.routed_scaling, config.router_jitter, config.bias_update_rate
        self.groups, self.topk_groups = config.moe_groups, config.moe_topk_groups
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.gate.weight.muon = False  # a tiny, skinny map: AdamW's (optim.py)
        self.register_buffer("bias", torch.zeros(config.n_experts))  # aux-loss-free balancing: selection only
        self.register_buffer("load", torch.zeros(config.n_experts), persistent=False)  # slots since the last update

    @staticmethod
    def check(c):
        require(c.router_scoring in ("softmax", "sigmoid"), f"unknown router_scoring '{c.router_scoring}'")
        require(c.n_experts == 0 or 1 <= c.moe_topk <= c.n_experts, "moe_topk must be within 1..n_experts")
        require(c.moe_every >= 1 and c.moe_first_dense >= 0, "moe_every must be >= 1 and moe_first_dense >= 0")
        require(c.moe_groups == c.moe_topk_groups == 1 or (c.moe_groups >= 2 and c.n_experts % c.moe_groups == 0
                and c.n_experts >= 2 * c.moe_groups and 1 <= c.moe_topk_groups <= c.moe_groups
                and c.moe_topk <= c.moe_topk_groups * c.n_experts // c.moe_groups),
                "moe_groups must divide n_experts into groups of 2 or more, and moe_topk_groups of them hold moe_topk")

    def forward(self, x):
        """x (N, d) -> chosen experts (N, topk), their gates (N, topk), router logits and affinities (N, n_experts)."""
        if self.training and self.jitter:  # Switch: multiplicative noise on the router input
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):  # a bf16 router makes near-ties flip choices
            logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores + self.bias
        if self.groups > 1:  # group-limited routing (DeepSeek-V3 §2.1.2): only experts of the best groups compete
            grouped = choice.unflatten(1, (self.groups, -1))  # (N, groups, experts per group)
            best = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            kept = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~kept[..., None], float("-inf")).flatten(1)
        experts = choice.topk(self.topk, dim=-1).indices
        gates = scores.gather(1, experts)
        if self.renorm:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return experts, gates * self.scaling, logits, scores


class Experts(nn.Module):
    """n_experts SwiGLU FFNs, weights stacked (n_experts, out, in), on token rows sorted by expert: one grouped GEMM
    per matrix (torch._grouped_mm) where supported, else one matmul per expert on its slice."""

    def __init__(self, config):
        super().__init__()
        E, d, self.hidden, self.topk = config.n_experts, config.n_embd, config.moe_hidden, config.moe_topk
        self.gate_up = nn.Parameter(torch.empty(E, 2 * self.hidden, d).normal_(std=0.02))  # gate and up fused
        self.gate_up.logical_rows = (self.hidden, self.hidden)  # two matrices per expert for Muon (optim.py)
        self.down = nn.Parameter(torch.empty(E, d, self.hidden).normal_(std=0.02))
        self.down.writes_residual = True
        self.grouped = None  # None: grouped GEMM where grouped_mm_supported; True/False forces a path

    def forward(self, x, counts):
        """x (M, d) rows grouped by expert, counts (n_experts,) rows per expert -> (M, d)."""
        grouped = grouped_mm_supported(x, self.gate_up) if self.grouped is None else self.grouped
        sizes = None if grouped else counts.tolist()  # one host sync per layer (a graph break under torch.compile)

        def matmul(a, w):
            return grouped_mm(a, w, counts) if grouped else torch.cat([s @ e.T for s, e in zip(a.split(sizes), w)])
        gate, up = matmul(x, self.gate_up).chunk(2, dim=-1)
        return matmul(F.silu(gate) * up, self.down)

    def active_params(self):
        """The weights one token goes through: those of moe_topk of the n_experts."""
        return (self.gate_up.numel() + self.down.numel()) // self.gate_up.size(0) * self.topk

    def idle_params(self):
        return self.gate_up.numel() + self.down.numel() - self.active_params()


class MoE(nn.Module):
    """Mixture-of-experts feed-forward (DeepSeekMoE, arXiv 2401.06066): n_shared_experts for every token, moe_topk of
    n_experts fine-grained routed ones; the balancing losses of Switch (arXiv 2101.03961), ST-MoE (arXiv 2202.08906)
    and DeepSeek-V3 (§2.1.2), and Switch's capacity. Metrics go to ctx.aux under "moe<layer>/"."""

    def __init__(self, config, layer):
        super().__init__()
        self.name, self.capacity_factor, self.dropout = f"moe{layer}", config.capacity_factor, config.dropout
        self.coefs = {"aux_loss": config.aux_loss_coef, "seq_aux_loss": config.seq_aux_loss_coef,
                      "z_loss": config.router_z_loss_coef}
        self.router = Router(config)
        self.experts = Experts(config)
        self.shared = SwiGLU(config, config.n_shared_experts * config.moe_hidden) if config.n_shared_experts else None

    def forward(self, x, ctx):
        B, T, d = x.shape
        tokens = x.reshape(-1, d)  # (N, d)
        experts, gates, logits, scores = self.router(tokens)  # (N, k), (N, k), (N, E), (N, E)
        k, E = experts.size(1), scores.size(1)
        # slot n * k + j is token n's j-th choice; sorted by expert, falling score, position: capacity cuts the tail
        slot_expert, slot_score = experts.flatten(), scores.gather(1, experts).flatten()
        by_score = slot_score.argsort(descending=True, stable=True)
        order = by_score[slot_expert[by_score].argsort(stable=True)]  # (N * k,) slots in expert order
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        # (E,) slots per expert by a comparison: compiled for CUDA, index_add_ would add each slot one after another
        counts = (slot_expert[:, None] == torch.arange(E, device=x.device)).sum(dim=0)
        dropped = torch.zeros((), device=x.device)
        if self.training and self.capacity_factor > 0:  # evaluation and decoding stay dropless
            capacity = math.ceil(self.capacity_factor * tokens.size(0) * k / E)
            rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[slot_expert[order]]
            kept = rank < capacity  # in expert order; a dropped slot adds nothing: the residual carries its token
            gates, dropped = gates * kept[inverse].view_as(gates), 1 - kept.float().mean()
        routed = self.experts(permute(tokens.repeat_interleave(k, dim=0), order, inverse), counts)  # (N * k, d)
        routed = permute(routed, inverse, order).view(-1, k, d)  # (N, k, d) in token order
        y = (routed * gates.unsqueeze(-1)).sum(dim=1).type_as(x).view(B, T, d)
        self.record(ctx, logits, scores, experts, counts, dropped, B)
        if self.training and self.router.bias_rate > 0:
            self.router.load += counts
        y = F.dropout(y, self.dropout, self.training)
        return y if self.shared is None else y + self.shared(x)

    def flops(self):
        return {"moe": matmul_flops(self) + 2 * self.experts.active_params()}

    def record(self, ctx, logits, scores, experts, counts, dropped, B):
        """Balance losses (the weighted ones added to ctx.losses['moe_loss']) and expert-usage metrics into ctx.aux."""
        (N, k), E = experts.shape, scores.size(1)
        T = N // B
        probs = scores / scores.sum(dim=-1, keepdim=True)  # (N, E): affinities as a distribution over experts
        load = counts.float() / (N * k)  # (E,) share of the routed slots: f_i below, a constant
        per_sequence = (experts.view(B, T * k, 1) == torch.arange(E, device=experts.device)).sum(dim=1)  # (B, E)
        losses = {
            # Switch/GShard: E * sum_i f_i P_i, f_i the share of slots, P_i the mean probability: 1 when balanced
            "aux_loss": E * (load * probs.mean(dim=0)).sum(),
            # DeepSeek-V3 eq. 17-20 per sequence (f_i = E / (k T) * slots of i, P_i its mean probability), averaged
            "seq_aux_loss": (E / (k * T) * per_sequence * probs.view(B, T, E).mean(dim=1)).sum(dim=1).mean(),
            "z_loss": logits.logsumexp(dim=-1).square().mean(),  # ST-MoE: keeps the router logits small
        }
        for name, value in losses.items():
            ctx.aux[f"{self.name}/{name}"] = value.detach()
            if self.coefs[name]:
                ctx.losses["moe_loss"] = ctx.losses.get("moe_loss", 0.0) + self.coefs[name] * value
        entropy = -(load * load.clamp(min=1e-12).log()).sum() / math.log(E)  # 1 = uniform
        metrics = {"load": load, "load_entropy": entropy, "load_max_mean": load.max() * E, "dropped": dropped}
        ctx.aux.update({f"{self.name}/{name}": value for name, value in metrics.items()})


@torch.no_grad()
def update_router_biases(model):
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2), after each optimizer step: each router's bias moves by
    bias_update_rate, down above the mean load, up below, by the step's slots summed over DDP ranks (replicas agree)."""
    routers = [m for m in model.modules() if isinstance(m, Router) and m.bias_rate]
    if not routers:
        return
    loads = torch.stack([router.load for router in routers])  # (MoE layers, n_experts)
    if dist.is_initialized():
        dist.all_reduce(loads)
    for router, load in zip(routers, loads):
        router.bias += router.bias_rate * torch.sign(load.mean() - load)
        router.load.zero_()


# -----------------------------------------------------------------------------
# residual and memory

class Residual(nn.Module):
    """The standard pre-norm residual x + f(x), f holding the sublayer's norm. A residual class also expands the
    embedding into its streams and reduces them to the last hidden state: here the one stream is x itself."""

    def __init__(self, config, sublayer):
        super().__init__()

    def forward(self, x, f):
        return x + f(x)

    @staticmethod
    def expand(x, config):
        return x

    @staticmethod
    def reduce(x):
        return x

    def flops(self):
        return {}


class HyperConnections(nn.Module):
    """Hyper-connections (Zhu et al., ICLR 2025, arXiv 2409.19606), residual='hc': n = hc_streams streams
    H (B, T, n, d); the sublayer reads h = sum_j pre_j H_j, the streams become H'_i = sum_j res_ij H_j + post_i f(h).
    pre, post and res are each a static learned value plus a dynamic one, gain * tanh(norm(H_j) W), from each stream
    j (DHC). The init (pre one-hot on stream sublayer mod n, res = I, post = 1, W = 0) is the standard residual."""
    gain = 0.01  # the papers learn it (s_alpha, s_beta; mHC's alpha); times zero-init weights it gets no gradient

    def __init__(self, config, sublayer):
        super().__init__()
        self.n, self.d, self.eps = config.hc_streams, config.n_embd, config.norm_eps
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        static, dynamic_shape = self.initial_mappings(config.n_embd, sublayer)
        # pre, post and res (n, n, n*n) in one vector: as with other biases, no weight decay pulls them from their init
        self.static, self.dynamic = nn.Parameter(static), nn.Parameter(torch.zeros(dynamic_shape))
        self.dynamic.muon = False  # a tiny, skinny map: AdamW's (optim.py)

    @staticmethod
    def check(c):
        require(c.hc_streams >= 2 and c.hc_sinkhorn_iters >= 1,
                "hc_streams must be 2 or more, hc_sinkhorn_iters 1 or more")

    def initial_mappings(self, d, sublayer):
        n = self.n
        pre = F.one_hot(torch.tensor(sublayer % n), n).float()  # layers read different streams: they diverge
        return torch.cat([pre, torch.ones(n), torch.eye(n).flatten()]), (d, n + 2)  # W: per stream, pre, post, res row

    def mappings(self, H):
        """pre (B, T, n), post (B, T, n) and res (B, T, n, n) from the streams H (B, T, n, d)."""
        n = self.n
        pre, post, res = self.static.split([n, n, n * n])
        dynamic = self.gain * torch.tanh(F.rms_norm(H, (H.size(-1),), eps=self.eps) @ self.dynamic.type_as(H))
        # stream j's own row of dynamic weights says how much of it goes into each new stream: column j of res
        return pre + dynamic[..., 0], post + dynamic[..., 1], res.view(n, n) + dynamic[..., 2:].mT

    def forward(self, H, f):
        """H (B, T, n, d) -> the streams after the sublayer f, (B, T, d) -> (B, T, d)."""
        with torch.autocast(H.device.type, enabled=False):  # the mixing weights in fp32, as routers are
            pre, post, res = self.mappings(H.float())
        y = f((pre.unsqueeze(-1) * H).sum(dim=-2))  # (B, T, d)
        # elementwise, not a matmul: autocast would round the residual streams to bf16 (and TF32) at every layer
        mixed = sum(res[..., j, None] * H[..., j, None, :] for j in range(self.n))  # (B, T, n, d)
        return mixed + post.unsqueeze(-1) * y.unsqueeze(-2)

    @staticmethod
    def expand(x, config):
        return x.unsqueeze(-2).expand(*x.shape[:-1], config.hc_streams, x.size(-1))

    @staticmethod
    def reduce(x):
        return x.mean(dim=-2)

    def flops(self):
        """Forward FLOPs per token: the dynamic projections, then reading h, mixing the streams and adding post * y."""
        n, d = self.n, self.d
        projections = n * d // self.dynamic.size(0)  # HC projects each stream, mHC all of them at once
        return {"hyper-connections": 2 * projections * self.dynamic.numel() + 2 * d * (n * n + 2 * n)}


class ManifoldHyperConnections(HyperConnections):
    """Manifold-constrained hyper-connections (DeepSeek mHC, arXiv 2512.24880), residual='mhc': mappings from all
    streams at once, x = RMSNorm(vec H) (n*d); pre = sigmoid(.), post = 2 sigmoid(.), res doubly stochastic
    (Sinkhorn-Knopp): HC's free res matrices multiply over depth and can grow or shrink the signal without bound;
    doubly stochastic ones are closed under products, have spectral norm <= 1 and keep the streams' mean. Init (W = 0,
    pre toward stream sublayer mod n, res near I): the standard residual."""

    def initial_mappings(self, d, sublayer):
        n = self.n
        pre = torch.full((n,), 0.5 / (n - 1))
        pre[sublayer % n] = 0.5
        res = torch.full((n, n), -8.0).fill_diagonal_(0.0)  # exp: near I, so streams keep what they carry
        return torch.cat([torch.logit(pre), torch.zeros(n), res.flatten()]), (n * d, n * n + 2 * n)

    def mappings(self, H):
        n = self.n
        x = F.rms_norm(H.flatten(-2), (H.size(-2) * H.size(-1),), eps=self.eps)  # (B, T, n d)
        pre, post, res = (self.gain * (x @ self.dynamic.type_as(x)) + self.static).split([n, n, n * n], dim=-1)
        return pre.sigmoid(), 2 * post.sigmoid(), sinkhorn(res.unflatten(-1, (n, n)), self.sinkhorn_iters)


def sinkhorn(logits, iters):
    """Sinkhorn-Knopp on exp(logits) (..., n, n): rows, then columns, scaled to sum 1, iters times, in log space so
    large logits cannot overflow. Columns sum to 1 exactly, rows nearly; gradients flow through the loop."""
    for _ in range(iters):
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
        logits = logits - logits.logsumexp(dim=-2, keepdim=True)
    return logits.exp()


RESIDUALS = {"standard": Residual, "hc": HyperConnections, "mhc": ManifoldHyperConnections}  # config.residual


ENGRAM_PAD = -1  # Engram's id for "no token": before a sequence's start and in a row's left padding


class Engram(nn.Module):
    """Conditional memory by hashed n-gram lookup (DeepSeek Engram, arXiv 2601.07372) on engram_layers. At position
    t, the n-gram of ids ending at t, for each n in engram_orders, is mixed into one int64 (the XOR of id_{t-m} times
    an odd multiplier c_m per offset m and layer, wrapping) and hashed by engram_heads functions, modulo a distinct
    prime each, into its own rows of one table; the rows found, concatenated (engram_dim), give a key and a value.
    The value enters each stream h before attention, gated by sigmoid(signed sqrt(norm(key) . norm(h) / sqrt(d))).
    Trained by sparse rows (optim.py). Left out: the tokenizer's id compression, the convolution after the gate, a
    key projection and norm per hyper-connection stream (one serves all)."""

    def __init__(self, config, layer):
        super().__init__()
        orders, heads = config.engram_order_list, config.engram_heads
        self.orders, self.context = orders, max(orders) - 1  # the context: ids before t that the longest n-gram reads
        self.streams = 1 if config.residual == "standard" else config.hc_streams
        seed = torch.Generator().manual_seed(2601 + 10007 * layer)  # the same rows in every run, on every machine
        multipliers = torch.randint(0, 2**61, (max(orders),), generator=seed) * 2 + 1  # odd, < 2^62
        primes, n = [], max(config.engram_table_size // (len(orders) * heads), 2)
        while len(primes) < len(orders) * heads:  # the smallest primes >= n; trial division: fast for billions of rows
            if all(n % f for f in range(2, math.isqrt(n) + 1)):
                primes.append(n)
            n += 1
        self.register_buffer("multipliers", multipliers, persistent=False)
        self.register_buffer("primes", torch.tensor(primes).view(len(orders), heads), persistent=False)
        offsets = torch.tensor([0] + primes[:-1]).cumsum(0)  # each head's first row in the one table
        self.register_buffer("offsets", offsets.view(len(orders), heads), persistent=False)
        self.table = nn.Embedding(sum(primes), config.engram_dim // (len(orders) * heads), sparse=True)
        self.key = nn.Linear(config.engram_dim, config.n_embd, bias=False)
        self.value = nn.Linear(config.engram_dim, config.n_embd, bias=False)
        self.key_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.query_norm = RMSNorm(config.n_embd, config.norm_eps)

    @staticmethod
    def check(c):
        layers, orders = c.engram_layer_list, c.engram_order_list
        require(len(set(layers)) == len(layers) and all(0 <= i < c.n_layer for i in layers),
                "engram_layers must be distinct layers within 0..n_layer-1")
        require(not layers or (orders and min(orders) >= 2 and len(set(orders)) == len(orders)),
                "engram_orders must be distinct n-gram orders of 2 or more")
        require(not layers or (c.engram_heads >= 1 and c.engram_dim % (len(orders) * c.engram_heads) == 0
                               and c.engram_table_size >= 2 * len(orders) * c.engram_heads),
                "engram_dim must be a multiple of (orders x engram_heads), and engram_table_size at least twice that")

    def new_cache(self, batch, max_len, dtype, device):
        return {"engram_tokens": torch.full((batch, self.context), ENGRAM_PAD, device=device)}  # no ids yet

    def window(self, idx, ctx=None, cache=None):
        """The ids idx (B, T) after the `context` ids before them, (B, context + T), ENGRAM_PAD where there are none;
        decoding reads the ids before from the cache and writes it."""
        if cache is None:
            return F.pad(idx, (self.context, 0), value=ENGRAM_PAD)
        idx = idx.masked_fill(ctx.cache_pos[None, :] < ctx.pad[:, None], ENGRAM_PAD)
        tokens = torch.cat([cache["engram_tokens"], idx], dim=1)
        cache["engram_tokens"].copy_(tokens[:, tokens.size(1) - self.context:])
        return tokens

    def rows(self, tokens):
        """The table rows (B, T, orders, heads) of the n-grams ending at each of the last T of tokens (B, P + T)."""
        P, T = self.context, tokens.size(1) - self.context
        mix, mixes = torch.zeros_like(tokens[:, P:]), []
        for m in range(P + 1):  # the n-gram of order n mixes offsets 0..n-1
            mix = mix ^ (tokens[:, P - m:P - m + T] * self.multipliers[m])
            if m + 1 in self.orders:
                mixes.append(mix)
        return torch.stack(mixes, dim=-1)[..., None] % self.primes + self.offsets  # remainder: >= 0

    def forward(self, x, ctx, cache=None):
        """x (B, T, d), or (B, T, n, d) streams -> x with the memory added, the same shape."""
        # inductor makes no sparse gradient: a lookup with gradients runs eager (a graph break), one without compiles
        rows = self.rows(self.window(ctx.idx, ctx, cache))
        lookup = eager(F.embedding) if torch.is_grad_enabled() else F.embedding
        memory = lookup(rows, self.table.weight, sparse=True).flatten(2)  # (B, T, engram_dim)
        shape = (*x.shape[:2], *(1,) * (x.dim() - 3), -1)  # one key and value for all streams
        key, value = self.key(memory).view(shape), self.value(memory).view(shape)
        score = (self.key_norm(key) * self.query_norm(x)).sum(dim=-1, keepdim=True) / math.sqrt(x.size(-1))
        return x + torch.sigmoid(score.sign() * score.abs().clamp(min=1e-6).sqrt()) * value

    def flops(self):
        """Forward FLOPs per token: the key and value projections, and each stream's gate (the lookups cost none)."""
        return {"engram": matmul_flops(self) + 4 * self.streams * self.key.weight.size(0)}


# -----------------------------------------------------------------------------
# block and model

# config.layer_mixer(layer) -> sequence mixer: softmax attention ('mha', 'mla') with a span, or linear_kind
MIXERS = {"mha": CausalSelfAttention, "mla": MLA, "elu": LinearAttention, "gated_deltanet": GatedDeltaNet}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the config picks both for layer `layer`,
    the residual around each (standard, or hyper-connections over streams), and a memory before them (Engram)."""

    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        mixer, span = config.layer_mixer(layer)
        self.attn = MIXERS[mixer](config, span)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config, layer) if config.is_moe_layer(layer) else MLPS[config.mlp](config)
        self.attn_residual = RESIDUALS[config.residual](config, 2 * layer)
        self.mlp_residual = RESIDUALS[config.residual](config, 2 * layer + 1)
        self.memory = Engram(config, layer) if layer in config.engram_layer_list else None
        if layer in config.value_embed_list:  # softmax MHA layers (ValueEmbedding.check), of the main stack only
            self.attn.value_embed = ValueEmbedding(config)
        if config.value_residual and layer < config.n_layer:  # every layer mha (ValueResidual.check)
            self.attn.value_residual = ValueResidual(layer)
        # rewinds by position alone (FullSpan.rewinds), unless Engram's window of the last ids holds a rejected draft
        self.rewinds = getattr(getattr(self.attn, "span", None), "rewinds", False) and self.memory is None

    def forward(self, x, ctx, cache=None):
        """x (B, T, d), or (B, T, streams, d) under a residual of several streams."""
        if self.memory is not None:
            x = self.memory(x, ctx, cache)
        x = self.attn_residual(x, lambda h: self.attn(self.attn_norm(h), ctx, cache))
        return self.mlp_residual(x, lambda h: self.mlp(self.mlp_norm(h), ctx))

    def new_cache(self, batch, max_len, dtype, device):
        memory = self.memory.new_cache(batch, max_len, dtype, device) if self.memory is not None else {}
        return {**self.attn.new_cache(batch, max_len, dtype, device), **memory}

    def flops(self, T):
        flops = {"attention projections": matmul_flops(self.attn), "attention scores": self.attn.attention_flops(T)}
        for part in (self.mlp, self.attn_residual, self.mlp_residual, self.memory):
            for name, n in (part.flops() if part is not None else {}).items():
                flops[name] = flops.get(name, 0) + n
        return flops


def matmul_flops(module):
    """Forward FLOPs per token of module's matrices (2-D weights): 2 per weight; a lookup table costs none."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return 2 * sum(p.numel() for p in module.parameters() if p.dim() == 2 and id(p) not in tables)


class MTP(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3, arXiv 2412.19437 §2.2): depth k - 1's hidden state at i and the
    embedding of token i + k, RMS-normed, concatenated, projected, then mtp_blocks blocks; wte and head shared."""

    def __init__(self, config, depth):
        super().__init__()
        self.hidden_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.embed_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.config, self.residual = config, RESIDUALS[config.residual]
        first = config.n_layer + (depth - 1) * config.mtp_blocks  # layer numbers go on past the main stack
        self.blocks = nn.ModuleList(Block(config, first + i) for i in range(config.mtp_blocks))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)  # before the shared output head

    @staticmethod
    def check(c):
        require(c.mtp_depth >= 0 and c.mtp_blocks >= 1, "mtp_depth must be 0 or more, mtp_blocks 1 or more")

    def forward(self, h, emb, ctx, cache=None):
        """cache: when drafting (speculative decoding), the blocks' caches, a list."""
        x = self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(emb)], dim=-1))  # (B, T, 2d) -> (B, T, d)
        x = self.residual.expand(x, self.config)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache[i])
        return self.residual.reduce(x)

    def draft(self, model, cache, hidden, tokens, cache_pos, last=1):
        """Speculative decoding's draft (decode.py), writing cache['mtp']: logits (B, last, V) at the last `last` of
        the slots cache_pos (T,), from the main model's hidden states there (B, T, n_embd) and next tokens (B, T)."""
        h = self(hidden, model.wte(tokens), model.decode_context(cache, cache_pos), cache["mtp"])
        return model.logits(h[:, -last:], self.norm)

    def flops(self, T):
        return matmul_flops(self.proj) + sum(sum(block.flops(T).values()) for block in self.blocks)


def mtp_loss(model, h, idx, targets, ctx):
    """ctx.losses['mtp_loss'] = mtp_lambda / mtp_depth * the sum over depths k of the loss on token i + k + 1 at i from
    depth k - 1's hidden state h and token i + k's embedding (teacher forcing); each in ctx.aux['mtp<k>/loss']."""
    total = 0.0
    for k, module in enumerate(model.mtp, start=1):
        T = idx.size(1) - k
        sub = Context(cos=ctx.cos[:T], sin=ctx.sin[:T], aux=ctx.aux, losses=ctx.losses)
        h = module(h[:, :T], model.wte(idx[:, k:]), sub)
        loss = cross_entropy(model.logits(h, module.norm).flatten(0, 1), targets[:, k:].flatten())
        ctx.aux[f"mtp{k}/loss"] = loss.detach()
        total = total + loss
    ctx.losses["mtp_loss"] = model.config.mtp_lambda / len(model.mtp) * total


class LogitSoftCap(nn.Module):
    """Logit soft-capping (Gemma 2, arXiv 2408.00118 §2; modded-nanogpt): c * tanh(logits / c), c = logit_softcap,
    in fp32: near the identity for small logits, never past +-c; every path to the logits passes it (GPT.logits)."""

    def __init__(self, config):
        super().__init__()
        self.cap = config.logit_softcap

    @staticmethod
    def check(c):
        require(c.logit_softcap >= 0, "logit_softcap must be 0 (off) or positive")

    def forward(self, logits):
        return (self.cap * torch.tanh(logits.float() / self.cap)).type_as(logits)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.residual = RESIDUALS[config.residual]  # embedding into the residual streams, and back
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.softcap = LogitSoftCap(config) if config.logit_softcap else nn.Identity()  # no cap: nothing to compute
        if config.x0_mix:  # embedding skip (modded-nanogpt; nanochat's x0 lambdas), main stack only; init: the baseline
            self.x0_a, self.x0_b = nn.Parameter(torch.ones(config.n_layer)), nn.Parameter(torch.zeros(config.n_layer))
        if config.unet_skips:  # modded-nanogpt's encoder-decoder skips, one gain each (1 at init, as there)
            self.skip_gains = nn.Parameter(torch.ones(config.n_layer // 2))
        self.mtp = nn.ModuleList(MTP(config, depth) for depth in range(1, config.mtp_depth + 1))
        self.objectives = [mtp_loss] if config.mtp_depth else []  # beyond the next token's, adding to ctx.losses
        for name, table in zip(("cos", "sin"), rope_tables(config)):
            self.register_buffer(name, table, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 §2.3: the 2 * n_layer matrices writing into the residual stream add up, so each gets std / sqrt(that);
        # zero_init_proj: zeros (modded-nanogpt; as ReZero, arXiv 2003.04887), every block the identity at init
        for p in (p for p in self.parameters() if getattr(p, "writes_residual", False)):
            nn.init.zeros_(p) if config.zero_init_proj else nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:  # qkv_bias
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None, cache_pos=None):
        """idx (B, T) token ids; targets (B, T), -1 for no loss; decoding: cache (new_cache), the tokens'
        slots cache_pos (T,). Returns logits (B, T, V) (the last position only without targets), the loss (or None)
        and aux (metrics, auxiliary losses); training, the loss is aux['lm_loss'] (next token) plus ctx.losses."""
        B, T = idx.shape
        if cache is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens exceeds block_size {self.config.block_size}"
            ctx = Context(cos=self.cos[:T], sin=self.sin[:T])
        else:
            ctx = self.decode_context(cache, cache_pos)
        h = self.hidden_states(idx, ctx, cache)
        if targets is None:
            return self.logits(h[:, [-1], :]), None, ctx.aux
        logits = self.logits(h)
        loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.training:
            for objective in self.objectives:
                objective(self, h, idx, targets, ctx)
        ctx.aux.update(ctx.losses)
        if self.training and ctx.losses:
            ctx.aux["lm_loss"] = loss.detach()
            loss = loss + sum(ctx.losses.values())
        return logits, loss, ctx.aux

    def hidden_states(self, idx, ctx, cache=None):
        """The last hidden state (B, T, n_embd) of tokens idx, before the final norm; decoding writes the cache."""
        ctx.idx = idx
        x = x0 = self.residual.expand(self.drop(self.wte(idx)), self.config)
        half = self.config.n_layer // 2 if self.config.unet_skips else 0
        decoder, skips = len(self.blocks) - half, []  # unet_skips: block n-1-j gets block j's output
        for i, block in enumerate(self.blocks):
            x = self.x0_a[i] * x + self.x0_b[i] * x0 if self.config.x0_mix else x  # x0 as expanded: in every stream
            if i >= decoder:
                x = x + self.skip_gains[i - decoder] * skips.pop()
            x = block(x, ctx, None if cache is None else cache["layers"][i])
            if i < half:
                skips.append(x)
        return self.residual.reduce(x)

    def logits(self, h, norm=None):
        """Next-token logits (..., V) of hidden states h (..., n_embd): final norm (or MTP's `norm`), head, soft cap."""
        return self.softcap(self.lm_head((self.norm if norm is None else norm)(h)))

    # -------------------------------------------------------------------------
    # decoding (the loops are in decode.py)

    def decode_context(self, cache, cache_pos):
        """The Context of tokens at cache slots cache_pos (T,), on the device (no host sync)."""
        pad, slots = cache["pad"], torch.arange(cache["max_len"], device=cache_pos.device)
        pos = (cache_pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T): left padding, row b starts at slot pad[b]
        visible = (slots[None, None, :] <= cache_pos[None, :, None]) & (slots[None, None, :] >= pad[:, None, None])
        return Context(cos=self.cos[pos], sin=self.sin[pos], cache_pos=cache_pos, mask=visible.unsqueeze(1), pad=pad)

    def new_cache(self, batch, max_len, dtype=None, mtp=False):
        """A static-shape cache for `batch` rows of up to `max_len` <= block_size tokens, written in place (a CUDA
        graph needs fixed addresses); mtp=True adds the first MTP module's, speculative decoding's draft."""
        assert max_len <= self.config.block_size
        device, dtype = self.wte.weight.device, dtype or self.wte.weight.dtype
        cache = {"layers": [block.new_cache(batch, max_len, dtype, device) for block in self.blocks],
                 "pad": torch.zeros(batch, dtype=torch.long, device=device), "max_len": max_len}
        if mtp:
            cache["mtp"] = [block.new_cache(batch, max_len, dtype, device) for block in self.mtp[0].blocks]
        return cache

    def cast_parameters(self, dtype):
        """For inference in dtype (bf16 on a GPU): the parameters in place, ties kept, buffers (RoPE tables, router
        state) in fp32; under autocast, fp32 weights would be recast at every matmul of every decode step."""
        for p in self.parameters():
            p.data = p.data.to(dtype)

    # -------------------------------------------------------------------------
    # accounting

    def num_params(self, embedding=True, active=False):
        """Parameters of the model that runs at inference: a tied head once, no MTP modules, no sparse tables (apart:
        table_params). embedding=False leaves out the dense ones (token, value embeddings) and an untied head;
        active=True counts only the moe_topk of n_experts routed experts a token goes through (V3's "activated")."""
        n = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.mtp.parameters())
        n -= self.table_params()
        if not embedding:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding) and not m.sparse)
            n -= 0 if self.config.tie_embeddings else self.lm_head.weight.numel()
        if active:
            n -= sum(m.idle_params() for m in self.blocks.modules() if hasattr(m, "idle_params"))
        return n

    def table_params(self):
        """Parameters of the sparse lookup tables (Engram's): a step reads and writes only the rows it looks up."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse)

    def flops_breakdown(self, seq_len=None):
        """Training FLOPs per token (3 x forward) by part: 2 per weight of every matmul a token goes through (of the
        routed experts, moe_topk's), each mixer's attention_flops, the residual's and Engram's own; norms and biases
        left out. 'head': the output head, tied or not; 'mtp': MTP modules and head, depth k's T - k tokens as T."""
        T = seq_len or self.config.block_size
        parts = dict.fromkeys(["attention projections", "attention scores", "mlp", "moe", "hyper-connections",
                               "engram", "head", "mtp"], 0)
        for block in self.blocks:
            for part, flops in block.flops(T).items():
                parts[part] += flops
        parts["head"] = 2 * self.lm_head.weight.numel()
        parts["mtp"] = sum(m.flops(T) + parts["head"] for m in self.mtp)
        return {part: 3 * flops for part, flops in parts.items()}

    def flops_per_token(self, seq_len=None):
        return sum(self.flops_breakdown(seq_len).values())

    def kv_cache_bytes(self, context, dtype=torch.bfloat16):
        """Bytes of one sequence's decode cache at `context` tokens in dtype: per token and layer 2 * n_kv_head *
        head_dim or kv_lora_rank + qk_rope_head_dim (MLA), <= `window` tokens if sliding; linear: a fixed fp32 state."""
        caches = [block.attn.new_cache(1, context, dtype, "meta") for block in self.blocks]
        return sum(t.numel() * t.element_size() for cache in caches for t in cache.values() if t.is_floating_point())
