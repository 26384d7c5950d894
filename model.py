"""
nanollm model: a modern decoder-only transformer in one file. Every architecture variant sits
behind a flag of `GPTConfig`; a reader who ignores a flag never reads its code path.

Dense baseline (Llama-style):
- pre-norm blocks with RMSNorm (Zhang & Sennrich 2019, `norm_eps`), no biases but Qwen2's optional q/k/v ones
  (`qkv_bias`)
- rotary position embeddings, half-split pairing (`rope_theta`; Su et al. 2021, RoFormer), stretched for a longer
  context by Llama 3.1's or YaRN's scaling (`rope_scaling`; arXiv 2309.00071)
- a head width of its own (`head_dim`; Qwen3), n_embd / n_head by default
- grouped-query attention through `n_kv_head`: MHA (= n_head), GQA, MQA (= 1) (Ainslie et al. 2023)
- optional RMSNorm on queries and keys per head (`qk_norm`; Dehghani et al. 2023, used by Qwen3)
- SwiGLU feed-forward (`mlp_hidden`; Shazeer 2020)
- tied input/output embeddings (`tie_embeddings`)
- a preallocated, static-shape KV cache for decoding (left-padded batches of prompts), a decode step that
  captures as one CUDA graph, and self-speculative decoding with the MTP module as the draft (Leviathan et al.
  2023, arXiv 2211.17192)

DeepSeek family (DeepSeek-V3 in miniature: `config/deepseek_small.py`):
- multi-head latent attention, `attention='mla'` (`q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`,
  `qk_rope_head_dim`, `v_head_dim`): keys and values from a small cached latent, decoupled RoPE, weight-absorbed
  decoding (DeepSeek-V2, arXiv 2405.04434 §2.1)
- mixture-of-experts feed-forward, `n_experts > 0`: routed fine-grained experts plus shared ones (DeepSeekMoE,
  arXiv 2401.06066), on every `moe_every`-th layer after `moe_first_dense` dense ones (Llama 4 interleaving;
  DeepSeek's first dense layers), softmax or sigmoid scores (`router_scoring`, DeepSeek-V3 arXiv 2412.19437
  §2.1.2) with its group-limited routing (`moe_groups`), capacity and token dropping (`capacity_factor`), router
  jitter (`router_jitter`) and the load-balancing loss (`aux_loss_coef`) of Switch (arXiv 2101.03961), the router z-loss (`router_z_loss_coef`; ST-MoE, arXiv
  2202.08906), DeepSeek-V3's sequence-wise balance loss (`seq_aux_loss_coef`) and auxiliary-loss-free bias
  balancing (`bias_update_rate`)
- multi-token prediction, `mtp_depth > 0` (`mtp_lambda`, `mtp_blocks`): sequential modules that predict tokens
  further ahead during training, left out at inference (DeepSeek-V3 §2.2)

Attention family (a hybrid in miniature: `config/hybrid_small.py`):
- spans, which keys a softmax query sees, for MHA and MLA alike (`attn_span`): full causal, sliding window
  (`window`; Longformer arXiv 2004.05150, Mistral 7B) with a rolling decode cache, block-sparse local + strided
  blocks (`sparse_block`, `sparse_local`, `sparse_stride`; Sparse Transformer arXiv 1904.10509), MoBA
  (`moba_block`, `moba_topk`; arXiv 2502.13189); FlexAttention block masks on CUDA
- gated attention (`attn_gate`, `attn_gate_at`): a sigmoid gate on each head's output or values (Qwen, arXiv
  2505.06708)
- linear attention, `attention='linear'` (`linear_kind`, `linear_chunk`): elu + 1 features (Katharopoulos et al.,
  arXiv 2006.16236) or Gated DeltaNet (arXiv 2412.06464), chunked for training, a fixed-size state for decoding
- hybrid layer patterns (`attn_pattern`): e.g. 'SSSG' (Gemma's local/global), 'LLLG' (Qwen3-Next)

Residual streams and memory:
- hyper-connections, `residual='hc'` (`hc_streams`): n residual streams with static and dynamic mixing (arXiv
  2409.19606); `residual='mhc'` (`hc_sinkhorn_iters`): the stream mixing made doubly stochastic by Sinkhorn-Knopp
  (DeepSeek mHC, arXiv 2512.24880)
- Engram memory (`engram_layers`, `engram_orders`, `engram_heads`, `engram_table_size`, `engram_dim`): hashed n-gram
  lookup gated by the hidden state, its tables trained by sparse rows (DeepSeek Engram, arXiv 2601.07372)

The order below is bottom-up, as in nanoGPT: config, shared pieces, attention, feed-forward, residual and memory,
block, the model, decoding, accounting.
"""
import collections
import functools
import math
import re
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    # size
    block_size: int = 1024      # longest context the model is trained for (RoPE tables, decode cache)
    vocab_size: int = 8192      # rows of the embedding; >= the tokenizer's vocabulary
    n_layer: int = 12           # transformer blocks
    n_head: int = 12            # query heads
    n_embd: int = 768           # model width
    dropout: float = 0.0        # dropout on attention probabilities and residual branches (0 for pretraining)
    norm_eps: float = 1e-6      # epsilon of every RMSNorm
    # attention
    attention: str = "mha"      # sequence mixer: 'mha' (MHA/GQA/MQA through n_kv_head), 'mla' (latent) or 'linear'
    n_kv_head: int = 0          # key/value heads: 0 = n_head (MHA), 1 = MQA, a divisor of n_head = GQA
    head_dim: int = 0           # width of each query/key/value head; 0 = n_embd // n_head (Qwen3: 128 at any width)
    qkv_bias: bool = False      # biases on the q, k and v projections (Qwen2)
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2i/head_dim)
    rope_scaling: str = "none"  # longer context: 'none', 'llama3' (Llama 3.1) or 'yarn' (arXiv 2309.00071)
    rope_factor: float = 1.0    # rope_scaling: the context grows this many times over rope_original_len
    rope_original_len: int = 0  # rope_scaling: the context the model was pretrained at
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
    attn_gate_at: str = "output"  # attn_gate: on each head's attention 'output' (the paper's G1) or its 'value' (G2)
    linear_kind: str = "elu"    # attention='linear': 'elu' (Katharopoulos et al.) or 'gated_deltanet' (Qwen3-Next's)
    linear_chunk: int = 64      # attention='linear': chunk length of the chunked training form
    attn_pattern: str = ""      # mixer per layer, one letter each, repeated over depth: G full, S sliding,
                                # B block-sparse, M MoBA (softmax, `attention`'s projections), L linear;
                                # '' = every layer `attention` and attn_span
    # MLA (attention='mla')
    q_lora_rank: int = 0        # rank of the low-rank query projection; 0 = a full-rank query
    kv_lora_rank: int = 0       # width of the cached key/value latent; 0 = 4 * head_dim (DeepSeek-V2's ratio)
    qk_nope_head_dim: int = 0   # per-head query/key dims without RoPE; 0 = head_dim
    qk_rope_head_dim: int = 0   # rotary dims of each query head and of the one key all heads share; 0 = head_dim / 2
    v_head_dim: int = 0         # per-head value dims; 0 = head_dim
    # feed-forward
    mlp_hidden: int = 0         # SwiGLU hidden width; 0 = 8/3 * n_embd rounded up to a multiple of 64
    # MoE (n_experts > 0)
    n_experts: int = 0          # routed experts per MoE layer; 0 = a dense SwiGLU on every layer
    n_shared_experts: int = 0   # experts every token goes through, run as one SwiGLU n_shared_experts times as wide
    moe_topk: int = 2           # routed experts per token
    moe_hidden: int = 0         # hidden width of each expert; 0 = mlp_hidden
    moe_every: int = 1          # MoE on layers i with (i + 1) % moe_every == 0 (Llama 4 interleaving: 2), dense between
    moe_first_dense: int = 0    # the first layers stay dense (DeepSeek-V3: 3)
    router_scoring: str = "softmax"  # expert scores: 'softmax' over experts, or a 'sigmoid' each (DeepSeek-V3, Llama 4)
    router_renorm: bool = True  # the chosen experts' gates are renormalized to sum 1 (off: the raw scores)
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
    mtp_blocks: int = 1         # transformer blocks in each MTP module
    # residual streams
    residual: str = "standard"  # 'standard' pre-norm residual, 'hc' hyper-connections, 'mhc' manifold-constrained HC
    hc_streams: int = 4         # hc/mhc: parallel residual streams (the papers' expansion rate n)
    hc_sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations that make the stream-mixing matrix doubly stochastic
    # Engram memory (engram_layers != '')
    engram_layers: str = ""     # layers (from 0) with an Engram memory before their attention, e.g. '1,4'; '' = none
    engram_orders: str = "2,3"  # n-gram orders looked up, e.g. '2,3' (bigrams and trigrams)
    engram_heads: int = 4       # hash functions (each with its own rows) per order
    engram_table_size: int = 1 << 20  # table rows of one Engram layer, all orders and heads together
    engram_dim: int = 256       # width of the retrieved memory: all orders' and heads' rows concatenated
    # output
    tie_embeddings: bool = True  # the output head shares the token embedding matrix

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.mlp_hidden == 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError("n_embd must be a multiple of n_head (or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        if self.rope_scaling != "none":
            self.rope_low_rotations = self.rope_low_rotations or 1.0
            self.rope_high_rotations = self.rope_high_rotations or {"llama3": 4.0, "yarn": 32.0}.get(self.rope_scaling)
        self.kv_lora_rank = self.kv_lora_rank or 4 * self.head_dim
        self.qk_nope_head_dim = self.qk_nope_head_dim or self.head_dim
        self.qk_rope_head_dim = self.qk_rope_head_dim or self.head_dim // 2
        self.v_head_dim = self.v_head_dim or self.head_dim
        self.moe_hidden = self.moe_hidden or self.mlp_hidden
        layers, orders = self.engram_layer_list, self.engram_order_list
        checks = [
            (self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"),
            (self.attention in ("mha", "mla", "linear"),
             f"unknown attention '{self.attention}' (choose mha, mla or linear)"),
            (self.attn_span in SPANS, f"unknown attn_span '{self.attn_span}' (choose {', '.join(SPANS)})"),
            (min(self.window, self.sparse_block, self.sparse_local, self.sparse_stride, self.moba_block, self.moba_topk,
                 self.linear_chunk) >= 1, "window, sparse_*, moba_* and linear_chunk must be 1 or more"),
            (self.attn_gate in ("none", "headwise", "elementwise"), f"unknown attn_gate '{self.attn_gate}'"),
            (self.attn_gate_at in ("output", "value"), f"unknown attn_gate_at '{self.attn_gate_at}'"),
            (not (self.attention == "mla" and self.attn_gate != "none" and self.attn_gate_at == "value"),
             "MLA caches a latent, not values: attn_gate_at='value' needs attention='mha'"),
            (self.linear_kind in ("elu", "gated_deltanet"), f"unknown linear_kind '{self.linear_kind}'"),
            (set(self.attn_pattern) <= set(PATTERN_LETTERS), f"attn_pattern letters are {', '.join(PATTERN_LETTERS)}"),
            (not (self.attention == "linear" and (self.attn_span != "full" or set(self.attn_pattern) - {"L"})),
             "linear attention has no span: set attention to mha or mla for the softmax layers of attn_pattern"),
            (self.dropout == 0 or {self.attn_span, *map(PATTERN_LETTERS.get, self.attn_pattern)} <= {"full", "linear"},
             "FlexAttention has no attention dropout: set dropout=0 with a sliding, sparse or moba span"),
            (not (self.attention == "mla" and self.qk_norm), "MLA's absorbed decoding has no per-head keys to normalize"),
            (self.rope_dim % 2 == 0, "RoPE needs an even number of rotary dimensions"),
            (self.rope_scaling in ("none", "llama3", "yarn"), f"unknown rope_scaling '{self.rope_scaling}'"),
            (self.rope_scaling == "none" or (self.rope_factor >= 1 and self.rope_original_len > 0
                                             and self.rope_low_rotations < self.rope_high_rotations),
             "rope_scaling needs rope_factor >= 1, rope_original_len > 0 and rope_low_rotations < rope_high_rotations"),
            (self.yarn_mscale_all_dim == 0 or (self.attention == "mla" and self.rope_scaling == "yarn"),
             "yarn_mscale_all_dim is MLA's softmax temperature under rope_scaling='yarn' (DeepSeek)"),
            (self.router_scoring in ("softmax", "sigmoid"), f"unknown router_scoring '{self.router_scoring}'"),
            (self.n_experts == 0 or 1 <= self.moe_topk <= self.n_experts, "moe_topk must be within 1..n_experts"),
            (self.moe_groups == 1 or (self.n_experts % self.moe_groups == 0 and self.n_experts >= 2 * self.moe_groups
                                      and 1 <= self.moe_topk_groups <= self.moe_groups
                                      and self.moe_topk <= self.moe_topk_groups * self.n_experts // self.moe_groups),
             "moe_groups must divide n_experts into groups of 2 or more, and moe_topk_groups of them must hold moe_topk"),
            (self.residual in ("standard", "hc", "mhc"), f"unknown residual '{self.residual}' (choose standard, hc or mhc)"),
            (self.hc_streams >= 2 and self.hc_sinkhorn_iters >= 1, "hc_streams must be 2 or more, hc_sinkhorn_iters 1 or more"),
            (len(set(layers)) == len(layers) and all(0 <= i < self.n_layer for i in layers),
             "engram_layers must be distinct layers within 0..n_layer-1"),
            (not layers or (orders and min(orders) >= 2 and len(set(orders)) == len(orders)),
             "engram_orders must be distinct n-gram orders of 2 or more"),
            (not layers or (self.engram_heads >= 1 and self.engram_dim % (len(orders) * self.engram_heads) == 0
                            and self.engram_table_size >= 2 * len(orders) * self.engram_heads),
             "engram_dim must be a multiple of (orders x engram_heads), and engram_table_size at least twice that"),
        ]
        for ok, message in checks:  # a ValueError, so that a stage can turn it into a one-line error
            if not ok:
                raise ValueError(message)

    def layer_mixer(self, layer):
        """(mixer, span) of layer `layer`: attn_pattern's letter for it (repeated over depth), else attention/attn_span.
        The mixer names a MIXERS entry: 'mha', 'mla', or linear_kind for linear layers."""
        span = PATTERN_LETTERS[self.attn_pattern[layer % len(self.attn_pattern)]] if self.attn_pattern else self.attn_span
        linear = span == "linear" or self.attention == "linear"
        return (self.linear_kind, "full") if linear else (self.attention, span)

    @property
    def rope_dim(self):
        """Rotary dims per head: all of head_dim, or MLA's decoupled rotary part."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def engram_layer_list(self):
        return int_list(self.engram_layers, "engram_layers")

    @property
    def engram_order_list(self):
        return int_list(self.engram_orders, "engram_orders")

    def is_moe_layer(self, layer):
        """Whether layer `layer` (counted from 0, the MTP modules' blocks after the main ones) has an MoE feed-forward."""
        return self.n_experts > 0 and layer >= self.moe_first_dense and (layer + 1) % self.moe_every == 0


PATTERN_LETTERS = {"G": "full", "S": "sliding", "B": "sparse", "M": "moba", "L": "linear"}  # attn_pattern's letters


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
    """y = g * x / sqrt(mean(x^2) + eps), computed in fp32 whatever the autocast dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def yarn_mscale(factor, mscale):
    """YaRN's attention temperature in DeepSeek's form (arXiv 2309.00071 §3.4): 0.1 * mscale * ln(factor) + 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_tables(config):
    """
    cos and sin of position * frequency, (block_size, rope_dim/2) each, in fp32. The frequencies theta^(-2i/d) are
    stretched for a longer context by rope_scaling: dims that turn more than rope_high_rotations times over
    rope_original_len tokens keep theirs, those turning fewer than rope_low_rotations times are divided by rope_factor,
    and those between blend the two, linearly in turns (Llama 3.1's low/high_freq_factor) or in dimension index
    (YaRN's "NTK-by-parts", arXiv 2309.00071 §3.2, which also scales both tables, and so the logits, by its temperature).
    """
    c, d = config, config.rope_dim
    freqs = c.rope_theta ** -(torch.arange(0, d, 2, dtype=torch.float32) / d)
    temperature = 1.0
    if c.rope_scaling == "llama3":
        turns = c.rope_original_len / (2 * math.pi / freqs)
        keep = ((turns - c.rope_low_rotations) / (c.rope_high_rotations - c.rope_low_rotations)).clamp(0, 1)
    elif c.rope_scaling == "yarn":
        def dim_turning(turns):  # the (fractional) pair index whose frequency turns `turns` times over the original context
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
    """
    Rotate pairs (x_i, x_{i+d/2}) of x (B, T, heads, d) by their angles; cos/sin are (T, d/2) or (B, T, d/2). In fp32,
    cast back to x's dtype: compiled on an H200, the same rotation in bf16 made a GPT-2-small training step about 10%
    slower (through a slower backward kernel; README, "RoPE in bf16, and back") and MoBA's at 1 x 32768 2% faster.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def cross_entropy(logits, targets):
    """
    Mean of -log softmax(logits)[target] over the rows whose target is not -1, in fp32: F.cross_entropy with
    ignore_index=-1, written as logsumexp minus the target's logit, picked by a comparison instead of a gather, so
    that torch.compile reads the logits (N, V) once forward and once backward (softmax minus one-hot) and never
    keeps an fp32 copy of them (1.3% of a GPT-2-small training step on an H200).
    """
    logits = logits.float()
    is_target = torch.arange(logits.size(-1), device=logits.device) == targets[:, None]  # (N, V)
    losses = logits.logsumexp(dim=-1) - torch.where(is_target, logits, 0.0).sum(dim=-1)
    keep = targets != -1
    return (losses * keep).sum() / keep.sum()


class Permute(torch.autograd.Function):
    """
    x[order] for a permutation `order` of x's rows, with inverse = its inverse: the backward is the gather
    grad[inverse], where autograd's own backward of x[order] is a scatter-add with atomics that first sorts the
    indices (5 of 57 ms per step at the Qwen3-MoE bench shape on an H200). MoBA's pairs and MoE's tokens use it.
    """

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x[order]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


permute = Permute.apply


@dataclass
class Context:
    """What a layer may need beyond its input x, shared by all layers of one forward pass."""
    cos: torch.Tensor                   # RoPE tables at each token's position: (T, d/2), or (B, T, d/2) when decoding
    sin: torch.Tensor
    cache_pos: torch.Tensor = None      # (T,) cache slots the new tokens are written to; None when training
    mask: torch.Tensor = None           # (B, 1, T, max_len) which cache slots each new token may attend to
    pad: torch.Tensor = None            # (B,) each row's first cache slot (left padding); None when training
    tokens: torch.Tensor = None         # Engram: (B, P + T) the token ids, after the P = max order - 1 before them
    aux: dict = field(default_factory=dict)  # side outputs of layers (auxiliary losses, metrics)


# -----------------------------------------------------------------------------
# attention

@torch.no_grad()
def max_attention_logits(q, k, mask=None, chunk=256):
    """
    Each head's largest pre-softmax logit q.k / sqrt(head_dim) under the causal mask, over the whole batch: what
    scaled_dot_product_attention computes from q (B, n_head, T, d) and k (B, n_kv_head, T, d) but never exposes.
    A span's mask, (T, T) or (B, n_head, T, T), replaces the causal one: only the logits its queries see count.
    For QK-Clip (optim.py). Returns (n_head,) in fp32; chunked over queries, so that at most B*n_head*chunk*T
    logits exist at once.
    """
    B, H, T, d = q.shape
    q = q.unflatten(1, (k.size(1), H // k.size(1)))  # (B, n_kv_head, group, T, d): heads sharing a key head
    k = k.unsqueeze(2)  # (B, n_kv_head, 1, T, d)
    if mask is not None:
        mask = mask.expand(B, H, T, T).unflatten(1, (k.size(1), H // k.size(1)))
    best = torch.full((H,), float("-inf"), device=q.device)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        logits = q[..., start:end, :] @ k[..., :end, :].mT  # (B, n_kv_head, group, end - start, end)
        hidden = (torch.ones(end - start, end, dtype=torch.bool, device=q.device).triu(start + 1) if mask is None
                  else ~mask[..., start:end, :end])
        best = torch.maximum(best, logits.masked_fill(hidden, float("-inf")).amax(dim=(0, 3, 4)).float().flatten())
    return best / math.sqrt(d)


def grouped_attention(q, k, v, mask, scale=None):
    """
    Softmax attention of q (B, n_head, T, d) over k and v (B, n_kv_head, S, d), fewer key heads than query heads,
    under a boolean mask (T, S), (B|1, 1, T, S) or (B, n_head, T, S): the query heads that share a key head are rows
    of one matmul against it, in the input dtype with the softmax in fp32. SDPA with enable_gqa and a mask takes its
    math fallback on CUDA (the efficient kernel has no GQA), which copies the keys and values once per query head and
    multiplies in fp32. Used from two query tokens on: a speculative round of a trained deepseek_small on an H200
    took 816 against 981 us of kernels with it; at one token, where inductor turns the fallback into fused
    reductions, a decode step took 588 against 513 us with it.
    """
    B, H, T, d = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    scores = (q.reshape(B, kv_heads, -1, d) @ k.mT).float() * (d ** -0.5 if scale is None else scale)
    allowed = mask.expand(B, H, T, S).unflatten(1, (kv_heads, -1)).flatten(2, 3)  # (B, n_kv_head, group * T, S)
    # a query that sees no key (left padding) gets zeros, as from SDPA, not the NaNs of an empty softmax
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).masked_fill(~allowed, 0.0).type_as(v)
    return (weights @ v).view(B, H, T, -1)


# Spans: which keys each softmax query sees. Any projection (CausalSelfAttention, MLA) runs with any span: the
# projection makes q, k and v and owns its cache layout; the span attends (training: SDPA's fused causal kernels for
# 'full', FlexAttention block masks on CUDA or a boolean mask for SDPA elsewhere for the others) and, when decoding,
# stores the new tokens' cache entries and says which cached slots each new token sees.

# FlexAttention (torch.nn.attention.flex_attention) is imported by the spans that use it, when one is built: importing
# it loads torch._dynamo, seconds at every program start. Nothing here imports or compiles while torch.compile traces.
compiled_flex_attention = None


def flex(q, k, v, block_mask, scale, return_lse=False):
    """
    FlexAttention: its fused kernel on CUDA (eager FlexAttention would materialize every score), eager elsewhere.
    return_lse=True also returns each query's log-sum-exp of its scores (B, n_head, T), which gradients flow through.
    """
    global compiled_flex_attention
    # on the CPU, inside a compiled model, inductor's FlexAttention lowering miscomputed the transposed views of q, k
    # and v this file makes (0.4 off in the logits with torch 2.13), so it gets contiguous copies. On CUDA the views
    # give masked SDPA's loss and gradients and save MoBA 1.5% of its step at 32k (README, spans at long context).
    if not q.is_cuda:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    attend = torch.nn.attention.flex_attention.flex_attention  # inside a compiled model, inductor fuses it
    if q.is_cuda and not torch.compiler.is_compiling():  # an eager model on CUDA: FlexAttention compiled alone
        compiled_flex_attention = compiled_flex_attention or torch.compile(attend, dynamic=False)
        attend = compiled_flex_attention
    return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.size(1) != q.size(1), return_lse=return_lse)


STATIC_BLOCK_MASKS = {}  # shared by every layer with the same pattern


def static_block_mask(key, allowed, T, device):
    """The BlockMask of allowed(query position, key position) over T tokens, built once per key, T and device."""
    key = (key, T, str(device))
    if key not in STATIC_BLOCK_MASKS:
        STATIC_BLOCK_MASKS[key] = torch.nn.attention.flex_attention.create_block_mask(
            lambda b, h, q, k: allowed(q, k), None, None, T, T, device=device)
    return STATIC_BLOCK_MASKS[key]


class FullSpan:
    """Causal attention over every past position, through SDPA's fused kernels (is_causal)."""
    flex = None  # the masked spans: None = FlexAttention on CUDA, masked SDPA elsewhere; True/False forces one (tests)
    # each position's cache entries sit in their own slot and masks hide the later slots, so that decoding rewinds by
    # its position alone (speculative decoding's rejected drafts); a mixer without the attribute is taken not to
    rewinds = True

    def __init__(self, config):
        self.config = config

    def cache_len(self, max_len):
        """Cache slots a sequence of up to max_len tokens needs."""
        return max_len

    def new_cache(self, batch, max_len, device):
        """The span's own cache entries, beside the projection's."""
        return {}

    def update(self, cache, new, dim, ctx):
        """
        Decoding: write the new tokens' cache entries (name -> tensor, time along dim) into cache; return the cached
        tensors to attend over, in the order of new, and the mask (B, 1, T, slots) of what each new token sees.
        """
        for name, tensor in new.items():
            cache[name].index_copy_(dim, ctx.cache_pos, tensor)
        return [cache[name] for name in new], self.decode_mask(ctx)

    def decode_mask(self, ctx):
        return ctx.mask

    def attend(self, q, k, v, ctx, mask=None, scale=None, dropout=0.0):
        """q (B, n_head, T, d), k and v (B, key heads, S, d) -> (B, n_head, T, d_v); mask None = training."""
        if mask is not None and k.size(1) != q.size(1) and q.size(2) > 1 and not dropout:
            return grouped_attention(q, k, v, mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              dropout_p=dropout, enable_gqa=k.size(1) != q.size(1))

    def logit_mask(self, q, k):
        """For QK-Clip's largest logits: what each query sees in training; None = causal."""
        return None

    def keys_per_query(self, T):
        """Keys a query attends to, averaged over a sequence of T (FLOPs accounting)."""
        return (T + 1) / 2


class MaskedSpan(FullSpan):
    """A fixed pattern allowed(query position, key position), causal: FlexAttention on CUDA, masked SDPA elsewhere."""

    def __init__(self, config):
        super().__init__(config)
        import torch.nn.attention.flex_attention  # noqa: F401 (see flex)

    def allowed(self, q_pos, k_pos):
        raise NotImplementedError

    def attend(self, q, k, v, ctx, mask=None, scale=None, dropout=0.0):
        if mask is None and (q.is_cuda if self.flex is None else self.flex):
            # FlexAttention skips the tiles of 128 x 128 the pattern leaves empty
            return flex(q, k, v, static_block_mask(self.key, self.allowed, q.size(2), q.device), scale)
        return super().attend(q, k, v, ctx, self.logit_mask(q, k) if mask is None else mask, scale, dropout)

    def logit_mask(self, q, k):
        pos = torch.arange(q.size(2), device=q.device)
        return self.allowed(pos[:, None], pos[None, :])  # (T, T)

    def decode_mask(self, ctx):
        # positions count from each row's first token (left padding), as in training
        q_pos = (ctx.cache_pos[None, :] - ctx.pad[:, None])[:, :, None]  # (B, T, 1)
        k_pos = (torch.arange(ctx.mask.size(-1), device=ctx.pad.device) - ctx.pad[:, None])[:, None, :]  # (B, 1, S)
        return ctx.mask & self.allowed(q_pos, k_pos).unsqueeze(1)


class SlidingSpan(MaskedSpan):
    """
    Sliding-window attention (Longformer, arXiv 2004.05150; Mistral 7B): a query sees the `window` latest positions,
    itself included. Decoding keeps a rolling cache of `window` slots (position p in slot p % window): memory
    O(window), not O(context).
    """
    rewinds = False  # a later position overwrites the slot of one the window still needs

    def __init__(self, config):
        super().__init__(config)
        self.window = config.window
        self.key = ("sliding", self.window)

    def allowed(self, q_pos, k_pos):
        return (k_pos <= q_pos) & (q_pos - k_pos < self.window)

    def cache_len(self, max_len):
        return min(self.window, max_len)

    def new_cache(self, batch, max_len, device):
        return {"slot_pos": torch.full((self.cache_len(max_len),), -1, dtype=torch.long, device=device)}  # -1: empty

    def update(self, cache, new, dim, ctx):
        # attend over the rolling cache and the new tokens together, then keep the newest: a chunk longer than the
        # window still sees, at each token, its own window (part of which it overwrites)
        slots, T = cache["slot_pos"].numel(), ctx.cache_pos.numel()
        k_slot = torch.cat([cache["slot_pos"], ctx.cache_pos])  # (slots + T,) cache slot (position + pad) of each key
        q_slot = ctx.cache_pos[:, None]
        mask = (k_slot >= ctx.pad[:, None, None]) & (k_slot <= q_slot) & (q_slot - k_slot < self.window)
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
    """
    Block-sparse causal attention (Sparse Transformer, arXiv 1904.10509, at block granularity; BigBird's global
    block): positions fall in blocks of sparse_block; a query sees, causally, its own block and the sparse_local - 1
    before it, plus every sparse_stride-th block counted from the first (block 0 doubles as an attention sink).
    """

    def __init__(self, config):
        super().__init__(config)
        self.block, self.local, self.stride = config.sparse_block, config.sparse_local, config.sparse_stride
        self.key = ("sparse", self.block, self.local, self.stride)

    def allowed(self, q_pos, k_pos):
        q_block, k_block = q_pos // self.block, k_pos // self.block
        return (k_pos <= q_pos) & ((q_block - k_block < self.local) | (k_block % self.stride == 0))

    def keys_per_query(self, T):
        total = 0
        for i in range(math.ceil(T / self.block)):  # the queries of block i see a triangle of it and whole blocks j
            n = min(self.block, T - i * self.block)
            blocks = sum(1 for j in range(i) if i - j < self.local or j % self.stride == 0)
            total += n * (n + 1) / 2 + n * blocks * self.block
        return total / T


class MoBASpan(FullSpan):
    """
    Mixture of Block Attention (MoBA, Lu et al. 2025, arXiv 2502.13189 §2.2): keys fall in blocks of moba_block; a
    query sees its own block causally, plus the moba_topk - 1 earlier blocks whose mean-pooled keys score highest
    against it (q . mean(k), per query head, no parameters). Its own block is always chosen: its mean would hold
    future keys. The choice passes no gradient. Decoding scores the block means of the cached keys.
    """

    def __init__(self, config):
        super().__init__(config)
        import torch.nn.attention.flex_attention  # noqa: F401 (see flex)
        self.block, self.topk = config.moba_block, config.moba_topk

    @torch.no_grad()
    def past_blocks(self, q, k, q_pos, k_pos):
        """
        The moba_topk - 1 earlier complete blocks whose mean keys score highest against each query, (B, n_head, T, m)
        indices, and whether each is real (a query in an early block has fewer blocks before it); positions q_pos
        (B|1, T), k_pos (B|1, S).
        """
        B, H, T, _ = q.shape
        n = math.ceil(k.size(2) / self.block)
        # each block's keys summed by a matmul with the block membership (B|1, blocks, S), where a scatter-add would
        # have all of a block's keys add into the same addresses; left padding (negative positions) is in no block
        member = (k_pos // self.block)[:, None, :] == torch.arange(n, device=q.device)[:, None]
        means = (member[:, None].float() @ k.float() / self.block).repeat_interleave(H // k.size(1), dim=1)
        q_block = (q_pos // self.block)[:, None, :, None]  # (B|1, 1, T, 1)
        scores = (q.float() @ means.mT).masked_fill(torch.arange(n, device=q.device) >= q_block, float("-inf"))
        # the best m by repeated argmax, which torch.compile fuses, where topk is a library kernel: 16 of 103 ms per
        # training step at 1 x 32768 on an H200; the i-th pick is real when the query has more than i past blocks
        m = min(self.topk - 1, n)
        top = torch.empty(B, H, T, 0, dtype=torch.long, device=q.device)
        for _ in range(m):
            best = scores.argmax(dim=-1, keepdim=True)
            top, scores = torch.cat([top, best], dim=-1), scores.scatter(-1, best, float("-inf"))
        return top, (torch.arange(m, device=q.device) < q_block).expand_as(top)

    def chosen_blocks(self, q, k, q_pos, k_pos):
        """(B, n_head, T, blocks) whether each query sees each key block: its own, and its past_blocks."""
        top, real = self.past_blocks(q, k, q_pos, k_pos)
        n = math.ceil(k.size(2) / self.block)
        own = torch.arange(n, device=q.device) == (q_pos // self.block)[:, None, :, None]
        return own | ((top[..., None] == torch.arange(n, device=q.device)) & real[..., None]).any(dim=-2)

    def mask(self, chosen, q_pos, k_pos):
        """(B, n_head, T, S) boolean mask from the chosen blocks: causal, within them."""
        k_block = (k_pos // self.block).clamp(min=0)[:, None, None, :].expand(*chosen.shape[:3], -1)
        return chosen.gather(-1, k_block) & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])

    def attend(self, q, k, v, ctx, mask=None, scale=None, dropout=0.0):
        if mask is None:  # training: positions 0..T-1
            pos = torch.arange(q.size(2), device=q.device)[None]
            if q.is_cuda if self.flex is None else self.flex:
                return self.attend_by_block(q, k, v, *self.past_blocks(q, k, pos, pos), scale)
            mask = self.mask(self.chosen_blocks(q, k, pos, pos), pos, pos)
        else:  # decoding: positions count from each row's first token
            q_pos = ctx.cache_pos[None, :] - ctx.pad[:, None]
            k_pos = torch.arange(k.size(2), device=q.device)[None, :] - ctx.pad[:, None]
            mask = mask & self.mask(self.chosen_blocks(q, k, q_pos, k_pos), q_pos, k_pos)
        return super().attend(q, k, v, ctx, mask, scale, dropout)

    def attend_by_block(self, q, k, v, top, real, scale):
        """
        Training through FlexAttention as MoBA computes it (§2.3): every query attends its own block causally, and
        apart, each earlier block it chose; the partial results then merge by their log-sum-exps into the one softmax
        over all of them. For the second part the (query, chosen block) pairs are sorted by block, so that a tile of
        128 pairs meets a block or two; tiles of the queries themselves would meet the union of all their choices.
        """
        B, H, T, d = q.shape
        own = static_block_mask(("moba", self.block), lambda q_pos, k_pos: (k_pos <= q_pos) &
                                (k_pos // self.block == q_pos // self.block), T, q.device)
        y_own, lse_own = flex(q, k, v, own, scale, return_lse=True)
        m = top.size(-1)
        if m == 0:  # a single block: nothing before it
            return y_own
        block = torch.where(real, top, -1).flatten(2)  # (B, H, P = T * m) each pair's block; -1 = none (masked out)
        P = block.size(-1)
        # the block numbers as 16-bit keys where they fit: a radix sort then passes over 16 bits, not 64
        order = (block.to(torch.int16) if k.size(2) // self.block < 2 ** 15 else block).argsort(dim=-1, stable=True)
        inverse = torch.empty_like(order).scatter_(-1, order, torch.arange(P, device=q.device).expand_as(order))
        block = block.gather(-1, order)
        # the sorts as permutations of all B * H * P pair rows, so that their backward is a gather too
        offset = torch.arange(B * H, device=q.device).view(B, H, 1) * P
        order, inverse = (order + offset).flatten(), (inverse + offset).flatten()
        pairs = permute(q.repeat_interleave(m, dim=2).flatten(0, 2), order, inverse).view(B, H, P, d)
        y, lse = flex(pairs, k, v, self.pair_block_mask(block, k.size(2)), scale, return_lse=True)
        y = permute(y.flatten(0, 2), inverse, order).view(B, H, T, m, -1)
        lse = permute(lse.flatten(), inverse, order).view(B, H, T, m)
        # softmax over the parts' log-sum-exps: each part's share of the whole softmax (an empty part's lse is -inf)
        share = torch.softmax(torch.cat([lse_own[..., None], lse], dim=-1), dim=-1)
        return (share[..., :1] * y_own + (share[..., 1:, None] * y).sum(dim=3)).type_as(y_own)

    def pair_block_mask(self, block, S):
        """
        The BlockMask of the sorted pairs, block (B, H, P) each pair's key block (-1: none), over S keys: a tile of 128
        pairs visits the key tiles from its first block's to its last's; the mask_mod keeps each pair's own block.
        Built from both sides at once: BlockMask.from_kv_blocks would find the pair tiles visiting each key tile (for
        the backward) by sorting a dense tile map, 4 of 89 ms per training step at 1 x 32768 on an H200.
        """
        B, H, P = block.shape
        tile, key_tiles = 128, math.ceil(S / 128)  # FlexAttention's default BLOCK_SIZE
        tiles = F.pad(block, (0, (-P) % tile), value=-1).view(B, H, -1, tile)
        pair_tiles = tiles.size(2)
        last = tiles.amax(dim=-1)  # -1: a tile of no pair
        first = torch.where(tiles >= 0, tiles, last[..., None]).amin(dim=-1).clamp(min=0)
        first_tile = first * self.block // tile
        last_tile = (((last + 1) * self.block - 1) // tile).clamp(max=key_tiles - 1)
        count = torch.where(last >= 0, last_tile - first_tile + 1, 0)
        # a tile whose pairs all chose one block sees all of each key tile of it (when blocks are whole key tiles):
        # FlexAttention then skips the mask_mod there, which is most tiles, since a block is chosen by many pairs
        whole = (tiles.amin(dim=-1) == last) & (last >= 0) & (self.block % tile == 0)
        # the other side, for the backward: the tiles of no pair sort first and the others' key tile ranges only move
        # forward, so the pair tiles visiting key tile j are one run lo..hi
        j = torch.arange(key_tiles, device=block.device)[:, None]
        empty = (count == 0)[..., None, :]  # (B, H, 1, pair tiles)
        lo = (empty | (last_tile[..., None, :] < j)).sum(dim=-1)  # (B, H, key tiles)
        hi = (empty | (first_tile[..., None, :] <= j)).sum(dim=-1) - 1

        def indices(start, n):
            return (start[..., None] + torch.arange(n, device=block.device)).clamp(0, n - 1).int()

        if self.block % tile:  # blocks within key tiles: every visit needs the mask_mod
            part_count, full_count = hi - lo + 1, torch.zeros_like(lo)
            part_indices = full_indices = indices(lo, pair_tiles)
        else:  # only the run's ends can be partial: a tile strictly inside it holds pairs of j's block alone
            lo_part = ((hi >= lo) & ~whole.gather(-1, lo.clamp(max=pair_tiles - 1))).long()
            hi_part = ((hi > lo) & ~whole.gather(-1, hi.clamp(min=0))).long()
            part_count = lo_part + hi_part
            first_end = torch.arange(pair_tiles, device=block.device) < lo_part[..., None]  # lo listed before hi
            part_indices = torch.where(first_end, lo[..., None], hi[..., None]).clamp(min=0).int()
            full_count, full_indices = hi - hi_part - lo - lo_part + 1, indices(lo + lo_part, pair_tiles)

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx // self.block == block[b, h, q_idx]

        kv_indices = indices(first_tile, key_tiles)  # partial and full tiles alike: a run from the first
        return torch.nn.attention.flex_attention.BlockMask(
            seq_lengths=(P, S), BLOCK_SIZE=(tile, tile), mask_mod=mask_mod,
            kv_num_blocks=torch.where(whole, 0, count).int(), kv_indices=kv_indices,
            full_kv_num_blocks=torch.where(whole, count, 0).int(), full_kv_indices=kv_indices,
            q_num_blocks=part_count.clamp(min=0).int(), q_indices=part_indices,
            full_q_num_blocks=full_count.clamp(min=0).int(), full_q_indices=full_indices)

    def logit_mask(self, q, k):
        pos = torch.arange(q.size(2), device=q.device)[None]
        return self.mask(self.chosen_blocks(q, k, pos, pos), pos, pos)

    def keys_per_query(self, T):
        total = 0
        for c in range(math.ceil(T / self.block)):  # queries of block c: a triangle of it, min(topk - 1, c) blocks
            n = min(self.block, T - c * self.block)
            total += n * (n + 1) / 2 + n * min(self.topk - 1, c) * self.block
        return total / T


SPANS = {"full": FullSpan, "sliding": SlidingSpan, "sparse": BlockSparseSpan, "moba": MoBASpan}  # config.attn_span


class AttentionGate(nn.Module):
    """
    Gated attention (Qiu et al. 2025, Qwen, arXiv 2505.06708): y * sigmoid(x W), x the layer's input, one gate per
    head ('headwise') or per channel ('elementwise'), on each head's attention output (G1, the paper's best) or on its
    values (G2). No bias: at initialization the gate is sigmoid(x W) with W ~ N(0, 0.02), about 0.5 everywhere, so
    the gated layer starts at about half the ungated one's output (exactly half with W = 0).
    """

    def __init__(self, config, heads, head_dim):
        super().__init__()
        self.proj = nn.Linear(config.n_embd, heads * (head_dim if config.attn_gate == "elementwise" else 1), bias=False)

    def forward(self, x, y):
        """x (B, T, n_embd), y (B, T, heads, head_dim) -> y gated."""
        return y * torch.sigmoid(self.proj(x)).view(*y.shape[:3], -1)


class CausalSelfAttention(nn.Module):
    """
    Multi-head attention with n_kv_head key/value heads (MHA, GQA, MQA), RoPE, optional QK-norm and gate, over the
    keys its span (SPANS) lets each query see.
    """

    def __init__(self, config, span="full"):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v come from one fused matrix: one big matmul is faster than three small ones
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.qkv_bias)
        # Muon (optim.py) orthogonalizes q, k and v as the three matrices they are, not as one block
        self.qkv.weight.logical_rows = (self.n_head * self.head_dim,) + 2 * (self.n_kv_head * self.head_dim,)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self.track_max_logits = False  # QK-Clip (optim.py) switches this on to read each head's largest logit
        self.span = SPANS[span](config)
        self.gate_at = config.attn_gate_at if config.attn_gate != "none" else None
        gate_heads = self.n_kv_head if self.gate_at == "value" else self.n_head
        self.gate = AttentionGate(config, gate_heads, self.head_dim) if self.gate_at else None

    def new_cache(self, batch, max_len, dtype, device):
        shape = (batch, self.n_kv_head, self.span.cache_len(max_len), self.head_dim)
        return {"k": torch.zeros(shape, dtype=dtype, device=device),
                "v": torch.zeros(shape, dtype=dtype, device=device), **self.span.new_cache(batch, max_len, device)}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rope(self.q_norm(q.view(B, T, self.n_head, self.head_dim)), ctx.cos, ctx.sin)
        k = apply_rope(self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)), ctx.cos, ctx.sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.gate_at == "value":  # gated values are what the cache keeps
            v = self.gate(x, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if cache is not None:  # decoding: the span stores the new keys and values, and says what each token sees
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
        """
        QK-Clip (Kimi K2, arXiv 2507.20534 §2.1), after an optimizer step: each head whose largest logit
        max_logits (n_head,) exceeded tau gets its logits scaled by gamma = tau / max_logit. A key head of its own
        (MHA) and the query head take sqrt(gamma) each; a key head shared by a group (GQA, MQA) stays untouched and
        the query head takes all of gamma, so that the group's other heads keep their logits. RoPE is a rotation:
        it commutes with the scaling.
        """
        assert isinstance(self.q_norm, nn.Identity), "QK-norm normalizes away any scaling of the q and k weights"
        gamma = (max_logits.new_tensor(tau) / max_logits.clamp(min=tau))[:, None, None]  # x / x: 1 exactly
        if self.n_kv_head == self.n_head:
            gamma = gamma.sqrt()
        for rows in (self.qkv.weight, self.qkv.bias[:, None]) if self.qkv.bias is not None else (self.qkv.weight,):
            q, k, _ = rows.split(self.qkv.weight.logical_rows)  # a bias (qkv_bias) scales with its rows
            if self.n_kv_head == self.n_head:
                k.view(self.n_head, self.head_dim, -1).mul_(gamma)
            q.view(self.n_head, self.head_dim, -1).mul_(gamma)


class MLA(nn.Module):
    """
    Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 §2.1): each token leaves one small latent, from which
    every head's keys and values are up-projected, plus one rotary key shared by all heads (decoupled RoPE: a
    rotation cannot be folded through the up-projection, so position rides on separate dims). The cache holds only
    the normalized latent and the rotated shared key: kv_lora_rank + qk_rope_head_dim numbers per token and layer.
    Any span (SPANS) decides which cached tokens each query sees; an attn_gate gates each head's output.
    """

    def __init__(self, config, span="full"):
        super().__init__()
        self.n_head, self.rank, self.v_dim = config.n_head, config.kv_lora_rank, config.v_head_dim
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        d, q_rank = config.n_embd, config.q_lora_rank
        # the query: low rank (down-projection, RMSNorm, up-projection) or one full-rank matrix
        self.q_a = (nn.Sequential(nn.Linear(d, q_rank, bias=False), RMSNorm(q_rank, config.norm_eps)) if q_rank
                    else nn.Identity())
        self.q_b = nn.Linear(q_rank or d, self.n_head * (self.nope + self.rope), bias=False)
        # one down-projection gives the latent and the rotary key: the key comes from x, not from the latent
        self.kv_a = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a.weight.logical_rows = (self.rank, self.rope)  # two matrices for Muon (optim.py)
        self.kv_norm = RMSNorm(self.rank, config.norm_eps)
        # per head: the rows of W_UK (latent -> key) and then those of W_UV (latent -> value)
        self.kv_b = nn.Linear(self.rank, self.n_head * (self.nope + self.v_dim), bias=False)
        self.proj = nn.Linear(self.n_head * self.v_dim, d, bias=False)
        # a query-key dot product spans both parts; under YaRN, DeepSeek sharpens the whole logit by its temperature
        self.scale = (self.nope + self.rope) ** -0.5 * yarn_mscale(config.rope_factor, config.yarn_mscale_all_dim) ** 2
        self.dropout = config.dropout
        self.absorb = True  # decode in the weight-absorbed form; False: the expanded one (the tests compare them)
        self.track_max_logits = False  # QK-Clip (optim.py) switches this on to read each head's largest logit
        self.span = SPANS[span](config)
        self.gate = AttentionGate(config, self.n_head, self.v_dim) if config.attn_gate != "none" else None  # output

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
        if cache is not None:  # decoding: the span stores the new latents and keys, and says what each token sees
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
        """Training form: per-head keys and values up-projected from the S latents, then the fused SDPA kernels."""
        B, S, _ = latent.shape
        k_nope, v = self.kv_b(latent).view(B, S, self.n_head, -1).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, n_head, T, nope + rope)
        k_rope = k_rope.unsqueeze(2).expand(B, S, self.n_head, self.rope)  # the one rotary key, seen by every head
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # (B, n_head, S, nope + rope)
        if self.track_max_logits and mask is None:
            ctx.aux.setdefault("max_logits", []).append(max_attention_logits(q, k, self.span.logit_mask(q, k)))
        return self.span.attend(q, k, v.transpose(1, 2), ctx, mask, self.scale,
                                self.dropout if self.training else 0.0)

    def absorbed(self, q_nope, q_rope, latent, k_rope, ctx, mask):
        """
        Decoding form (DeepSeek-V2 §2.1.2): q^C . (W_UK c) = (W_UK^T q^C) . c, so W_UK folds into the query and
        W_UV applies after attention, which then runs over the cached latents themselves: one key head of
        kv_lora_rank + rope dims shared by all query heads (MQA), with the latent as its value.
        """
        w_uk, w_uv = self.kv_b.weight.view(self.n_head, -1, self.rank).split([self.nope, self.v_dim], dim=1)
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # (B, n_head, T, kv_lora_rank)
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)  # (B, n_head, T, rank + rope)
        k = torch.cat([latent, k_rope], dim=-1).unsqueeze(1)  # (B, 1, S, rank + rope)
        y = self.span.attend(q, k, latent.unsqueeze(1), ctx, mask, self.scale)  # (B, n_head, T, rank)
        return torch.einsum("bhtr,hvr->bhtv", y, w_uv)

    @torch.no_grad()
    def qk_clip(self, max_logits, tau):
        """
        QK-Clip (Kimi K2, arXiv 2507.20534 §2.1) for MLA: head h's logit is q^C.k^C + q^R.k^R, where the rotary key
        k^R is shared by all heads. q^C and k^C (head h's rows of q_b and kv_b) take sqrt(gamma) each, q^R all of
        gamma, and k^R (in kv_a) stays untouched, so that both parts of head h's logits scale by gamma = tau / max_logit
        and no other head's change.
        """
        gamma = (max_logits.new_tensor(tau) / max_logits.clamp(min=tau))[:, None, None]  # (n_head, 1, 1)
        q_nope, q_rope = self.q_b.weight.view(self.n_head, self.nope + self.rope, -1).split([self.nope, self.rope], 1)
        k_nope = self.kv_b.weight.view(self.n_head, self.nope + self.v_dim, -1)[:, :self.nope]
        q_nope.mul_(gamma.sqrt())
        k_nope.mul_(gamma.sqrt())
        q_rope.mul_(gamma)


# -----------------------------------------------------------------------------
# linear attention: a recurrent state instead of a KV cache

def linear_attention_chunked(q, k, v, state, chunk):
    """
    Causal linear attention o_t = q_t S_t, S_t = S_{t-1} + k_t v_t^T, in chunks: inside a chunk the quadratic form
    (q k^T, causal) v, across chunks the state before each chunk (an exclusive cumsum of the chunks' k^T v).
    q, k (B, H, T, d_k), v (B, H, T, d_v), state (B, H, d_k, d_v) -> o (B, H, T, d_v), the state after the last token.
    """
    T = q.size(2)
    q, k, v = (F.pad(t, (0, 0, 0, -T % chunk)).unflatten(2, (-1, chunk)) for t in (q, k, v))  # (B, H, n, C, d)
    kv = k.mT @ v  # (B, H, n, d_k, d_v): each chunk's sum of k v^T (zero-padded keys add nothing)
    before = state[:, :, None] + kv.cumsum(dim=2) - kv  # the state entering each chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    o = q @ before + ((q @ k.mT) * causal) @ v
    return o.flatten(2, 3)[:, :, :T], before[:, :, -1] + kv[:, :, -1]


def linear_attention_recurrent(q, k, v, state):
    """The same, one token at a time: what decoding runs."""
    outputs = []
    for t in range(q.size(2)):
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, None, :] @ state).squeeze(2))
    return torch.stack(outputs, dim=2), state


def gated_delta_rule_chunked(q, k, v, beta, g, state, chunk):
    """
    The gated delta rule (Gated DeltaNet, arXiv 2412.06464 §3) S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,
    o_t = S_t^T q_t, with a_t = exp(g_t), in chunks (the paper's §3.3 WY form): inside a chunk the sequential writes
    become one unit-triangular solve, T_c = (I - A)^-1 with A_ij = -b_i (k_i . k_j) exp(G_i - G_j) for j < i, G the
    cumulative log-decay; pseudo-values U = T_c (b v) and decayed keys W = T_c (b exp(G) k) then carry the chunk as
    v_new = U - W S, o = (q exp(G)) S + (q k^T * exp(G_i - G_j), causal) v_new,
    S <- exp(G_C) S + (k exp(G_C - G))^T v_new.
    That last step is an affine map of S per chunk, so the states entering the chunks come from a parallel scan of
    the maps (log2(chunks) batched steps, no loop over chunks to unroll under torch.compile).
    q, k (B, H, T, d_k), v (B, H, T, d_v), beta and g (B, H, T), state (B, H, d_k, d_v); fp32.
    """
    T, pad = q.size(2), -q.size(2) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, chunk)) for t in (q, k, v))  # (B, H, n, C, d)
    beta, g = (F.pad(t, (0, pad)).unflatten(2, (-1, chunk)) for t in (beta, g))  # (B, H, n, C); padding: k = g = 0
    G = g.cumsum(dim=-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, n, C, C); mask first
    A = -(beta[..., None] * (k @ k.mT) * decay).tril(-1)
    eye = torch.eye(chunk, device=q.device)
    T_c = torch.linalg.solve_triangular(eye - A, eye.expand_as(A), upper=False, unitriangular=True)
    U, W = T_c @ (beta[..., None] * v), T_c @ ((beta * G.exp())[..., None] * k)
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # each key decayed to the chunk's end
    # chunk i maps the state entering it to M_i S + N_i; an inclusive scan makes (M, N) the maps of chunks 0..i
    M = G[..., -1, None, None].exp() * torch.eye(k.size(-1), device=q.device) - k_to_end.mT @ W  # (B, H, n, d_k, d_k)
    N = k_to_end.mT @ U  # (B, H, n, d_k, d_v)
    step = 1
    while step < M.size(2):  # Hillis-Steele: compose each map with the one `step` chunks before it
        earlier_M = torch.cat([torch.eye(M.size(-1), device=q.device).expand_as(M[:, :, :step]), M[:, :, :-step]], 2)
        earlier_N = torch.cat([torch.zeros_like(N[:, :, :step]), N[:, :, :-step]], dim=2)
        M, N = M @ earlier_M, M @ earlier_N + N
        step *= 2
    after = M @ state[:, :, None] + N  # the state after each chunk
    states = torch.cat([state[:, :, None], after[:, :, :-1]], dim=2)  # ... and entering each chunk
    new_values = U - W @ states
    o = (q * G.exp()[..., None]) @ states + ((q @ k.mT) * decay) @ new_values
    return o.flatten(2, 3)[:, :, :T], after[:, :, -1]


def gated_delta_rule_recurrent(q, k, v, beta, g, state):
    """The same, one token at a time: decay, read what k_t retrieves, write the difference (what decoding runs)."""
    outputs = []
    for t in range(q.size(2)):
        state = state * g[:, :, t, None, None].exp()
        k_t = k[:, :, t]
        update = beta[:, :, t, None] * (v[:, :, t] - (k_t[:, :, None, :] @ state).squeeze(2))  # (B, H, d_v)
        state = state + k_t[..., :, None] * update[..., None, :]
        outputs.append((q[:, :, t, None, :] @ state).squeeze(2))
    return torch.stack(outputs, dim=2), state


class LinearAttention(nn.Module):
    """
    Causal linear attention (Katharopoulos et al. 2020, arXiv 2006.16236 §3.2): softmax(q . k) becomes
    phi(q) . phi(k) with phi = elu + 1 > 0, so attention is a running sum, o_t = phi(q_t) S_t / (phi(q_t) . z_t) with
    S_t = sum phi(k_j) v_j^T, z_t = sum phi(k_j) (carried as one more value column of ones). Trained in chunks,
    decoded with the state (n_head x head_dim x (head_dim + 1) fp32 numbers, whatever the context). No RoPE.
    """

    def __init__(self, config, span="full"):  # span: linear attention sees every past token, through its state
        super().__init__()
        self.n_head, self.head_dim, self.chunk = config.n_head, config.head_dim, config.linear_chunk
        inner = self.n_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=False)
        self.qkv.weight.logical_rows = (inner,) * 3  # three matrices for Muon (optim.py)
        self.proj = nn.Linear(inner, config.n_embd, bias=False)
        self.dropout = config.dropout

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
            if T == 1:
                o, state = linear_attention_recurrent(q, k, v, state)
            else:
                o, state = linear_attention_chunked(q, k, v, state, self.chunk)
            if cache is not None:
                cache["state"].copy_(state)
            y = o[..., :-1] / (o[..., -1:] + 1e-6)  # (B, H, T, head_dim)
        y = y.type_as(x).transpose(1, 2).reshape(B, T, -1)
        return F.dropout(self.proj(y), self.dropout, self.training)

    def attention_flops(self, T):
        """Forward FLOPs per token of the recurrent form: write k v^T and read q S, per head."""
        return self.n_head * 4 * self.head_dim * (self.head_dim + 1)


class GatedDeltaNet(nn.Module):
    """
    Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv 2412.06464, ICLR 2025; the linear layers of Qwen3-Next): per head
    a d_k x d_v state that decays by a_t = exp(g_t) and is corrected by the delta rule toward v_t at key k_t with
    strength b_t. q, k, v come through a causal depthwise convolution (kernel 4) and SiLU, q and k L2-normalized;
    g_t = -exp(A_log) softplus(a_t + dt_bias) (Mamba-2's parametrization), b_t = sigmoid; the output is RMS-normalized
    per head and gated by SiLU(z). Decoding keeps the state and the convolution's last 3 inputs, whatever the context.
    """
    conv_size = 4

    def __init__(self, config, span="full"):  # span: the state sees every past token
        super().__init__()
        self.n_head, self.head_dim, self.chunk = config.n_head, config.head_dim, config.linear_chunk
        H, inner = self.n_head, self.n_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=False)
        self.qkv.weight.logical_rows = (inner,) * 3  # three matrices for Muon (optim.py)
        self.conv = nn.Parameter(torch.empty(3 * inner, self.conv_size).uniform_(-0.5, 0.5))  # nn.Conv1d's init
        self.gates = nn.Linear(config.n_embd, inner + 2 * H, bias=False)  # output gate z, decay input a, write b
        self.gates.weight.logical_rows = (inner, H, H)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()  # softplus(dt_bias) in [1e-3, 1e-1]
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.norm = RMSNorm(self.head_dim, config.norm_eps)
        self.proj = nn.Linear(inner, config.n_embd, bias=False)
        self.dropout = config.dropout

    def new_cache(self, batch, max_len, dtype, device):
        return {"state": torch.zeros(batch, self.n_head, self.head_dim, self.head_dim, device=device),
                "conv": torch.zeros(batch, 3 * self.n_head * self.head_dim, self.conv_size - 1, dtype=dtype,
                                    device=device)}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        H, d = self.n_head, self.head_dim
        if cache is not None:  # left padding: a padded slot's input is zero, which leaves conv and state untouched
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
            if T == 1:
                o, state = gated_delta_rule_recurrent(q, k, v.float(), beta, g, state)
            else:
                o, state = gated_delta_rule_chunked(q, k, v.float(), beta, g, state, self.chunk)
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
        self.hidden = hidden or config.mlp_hidden
        self.gate_up = nn.Linear(config.n_embd, 2 * self.hidden, bias=False)  # gate and up fused into one matmul
        self.gate_up.weight.logical_rows = (self.hidden, self.hidden)  # two matrices for Muon (optim.py)
        self.down = nn.Linear(self.hidden, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, ctx=None):
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return F.dropout(self.down(F.silu(gate) * up), self.dropout, self.training)


class Router(nn.Module):
    """
    Token-choice top-k routing in fp32 (DeepSeek-V3, arXiv 2412.19437 §2.1.2): softmax or sigmoid affinities; the
    experts are chosen by affinity plus a balancing bias, the gates come from the affinities alone.
    """

    def __init__(self, config):
        super().__init__()
        self.topk, self.scoring, self.renorm = config.moe_topk, config.router_scoring, config.router_renorm
        self.scaling, self.jitter = config.routed_scaling, config.router_jitter
        self.groups, self.topk_groups = config.moe_groups, config.moe_topk_groups
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        # aux-loss-free balancing: the bias steers selection only; it moves outside the gradient (update_router_biases)
        self.register_buffer("bias", torch.zeros(config.n_experts))
        self.register_buffer("load", torch.zeros(config.n_experts), persistent=False)  # slots since the last update

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
    """
    n_experts SwiGLU FFNs with stacked (n_experts, out, in) weights, run on token rows sorted by expert: one grouped
    GEMM per matrix (torch._grouped_mm) where supported, else one matmul per expert on its contiguous slice.
    """

    def __init__(self, config):
        super().__init__()
        E, d, self.hidden = config.n_experts, config.n_embd, config.moe_hidden
        self.gate_up = nn.Parameter(torch.empty(E, 2 * self.hidden, d))  # gate and up fused, as in SwiGLU
        self.gate_up.logical_rows = (self.hidden, self.hidden)  # two matrices per expert for Muon (optim.py)
        self.down = nn.Parameter(torch.empty(E, d, self.hidden))
        self.grouped = None  # None: the grouped GEMM where grouped_mm_supported; True or False forces a path

    def forward(self, x, counts):
        """x (M, d) rows grouped by expert, counts (n_experts,) rows per expert -> (M, d)."""
        grouped = grouped_mm_supported(x, self.gate_up) if self.grouped is None else self.grouped
        if grouped:
            ends = counts.cumsum(0).to(torch.int32)  # each expert's group ends at this row
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

            def matmul(a, w):
                return torch._grouped_mm(a.to(dtype), w.to(dtype).mT, offs=ends)
        else:
            sizes = counts.tolist()  # one host sync per layer (a graph break under torch.compile)

            def matmul(a, w):
                return torch.cat([a_e @ w_e.T for a_e, w_e in zip(a.split(sizes), w)])
        gate, up = matmul(x, self.gate_up).chunk(2, dim=-1)
        return matmul(F.silu(gate) * up, self.down)


def grouped_mm_supported(x, w):
    """torch._grouped_mm (PyTorch >= 2.8): bf16 on CUDA GPUs of compute capability 9.0 and up, 16-byte aligned rows."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and dtype == torch.bfloat16 and w.size(-1) % 8 == 0
            and w.size(-2) % 8 == 0 and torch.cuda.get_device_properties(x.device).major >= 9)  # constant to compile


class MoE(nn.Module):
    """
    Mixture-of-experts feed-forward: n_shared_experts that every token goes through, plus moe_topk of n_experts
    fine-grained routed experts per token (DeepSeekMoE, arXiv 2401.06066), with the balancing losses of Switch
    (arXiv 2101.03961), ST-MoE (arXiv 2202.08906) and DeepSeek-V3 (arXiv 2412.19437 §2.1.2), and Switch's capacity.
    Writes its metrics and losses to ctx.aux under "moe<layer>/".
    """

    def __init__(self, config, layer):
        super().__init__()
        self.name, self.capacity_factor, self.dropout = f"moe{layer}", config.capacity_factor, config.dropout
        self.count_load = config.bias_update_rate > 0
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
        # token n's j-th choice is slot n * k + j; sort the slots by expert, and within an expert by falling score,
        # then by position, so that capacity cuts each expert's tail: its lowest-scored, then latest, slots
        slot_expert, slot_score = experts.flatten(), scores.gather(1, experts).flatten()
        by_score = slot_score.argsort(descending=True, stable=True)
        order = by_score[slot_expert[by_score].argsort(stable=True)]  # (N * k,) slots in expert order
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        # (E,) slots per expert, counted by a comparison: compiled for CUDA, index_add_ became a sorted index_put
        # that adds each expert's thousands of slots one after another (7 of 55 ms per step at the Qwen3-MoE shape)
        counts = (slot_expert[:, None] == torch.arange(E, device=x.device)).sum(dim=0)
        dropped = torch.zeros((), device=x.device)
        if self.training and self.capacity_factor > 0:  # evaluation and decoding stay dropless
            capacity = math.ceil(self.capacity_factor * tokens.size(0) * k / E)
            rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[slot_expert[order]]
            kept = rank < capacity  # in expert order; a dropped slot adds nothing: the residual carries its token
            gates, dropped = gates * kept[inverse].view_as(gates), 1 - kept.float().mean()
        # each token copied to its k slots, the slots into expert order, through the experts, and back
        routed = self.experts(permute(tokens.repeat_interleave(k, dim=0), order, inverse), counts)  # (N * k, d)
        routed = permute(routed, inverse, order).view(-1, k, d)  # (N, k, d) in token order
        y = (routed * gates.unsqueeze(-1)).sum(dim=1).type_as(x).view(B, T, d)
        self.record(ctx.aux, logits, scores, experts, counts, dropped, B)
        if self.training and self.count_load:
            self.router.load += counts
        y = F.dropout(y, self.dropout, self.training)
        return y if self.shared is None else y + self.shared(x)

    def record(self, aux, logits, scores, experts, counts, dropped, B):
        """Balance losses (the weighted ones added to aux['moe_loss']) and expert-usage metrics into aux."""
        (N, k), E = experts.shape, scores.size(1)
        T = N // B
        probs = scores / scores.sum(dim=-1, keepdim=True)  # (N, E): affinities as a distribution over experts
        load = counts.float() / (N * k)  # (E,) share of the routed slots: f_i below, a constant
        per_sequence = (experts.view(B, T * k, 1) == torch.arange(E, device=experts.device)).sum(dim=1)  # (B, E)
        losses = {
            # Switch/GShard: E * sum_i f_i P_i, f_i the share of slots, P_i the mean probability: 1 when balanced
            "aux_loss": E * (load * probs.mean(dim=0)).sum(),
            # DeepSeek-V3 eq. 17-20, per sequence: f_i = E / (k T) * its slots of expert i, P_i the sequence's mean
            # probability of i; the mean over sequences, 1 when balanced
            "seq_aux_loss": (E / (k * T) * per_sequence * probs.view(B, T, E).mean(dim=1)).sum(dim=1).mean(),
            # ST-MoE: the squared log-partition of the router logits keeps them small
            "z_loss": logits.logsumexp(dim=-1).square().mean(),
        }
        for name, value in losses.items():
            aux[f"{self.name}/{name}"] = value.detach()
            if self.coefs[name]:
                aux["moe_loss"] = aux.get("moe_loss", 0.0) + self.coefs[name] * value
        aux[f"{self.name}/load"] = load
        aux[f"{self.name}/load_entropy"] = -(load * load.clamp(min=1e-12).log()).sum() / math.log(E)  # 1 = uniform
        aux[f"{self.name}/load_max_mean"] = load.max() * E
        aux[f"{self.name}/dropped"] = dropped


# -----------------------------------------------------------------------------
# residual and memory

class Residual(nn.Module):
    """The standard pre-norm residual around a sublayer: x + f(x), f holding the sublayer's own norm. No parameters."""

    def __init__(self, config, sublayer):
        super().__init__()

    def forward(self, x, f):
        return x + f(x)


class HyperConnections(nn.Module):
    """
    Hyper-connections around one sublayer (Zhu et al., ICLR 2025, arXiv 2409.19606), residual='hc': the residual is
    n = hc_streams streams H (B, T, n, d); the sublayer reads h = sum_j pre_j H_j and the streams become
    H'_i = sum_j res_ij H_j + post_i f(h). Each of pre, post and res is a static learned value plus a dynamic one,
    gain * tanh(norm(H_j) W), computed from each stream j (the paper's DHC). The init (pre one-hot on stream
    sublayer mod n, res = I, post = 1, W = 0) gives every stream the same x + f(x): the standard pre-norm residual,
    exactly (GPT reads out the mean of the streams).
    """
    # the dynamic part's scale: the papers' s_alpha, s_beta (mHC: alpha) start at 0.01 and are learned; times weights
    # that start at zero, a learned scale gets no gradient at step 0, so the scale stays fixed and the weights learn
    gain = 0.01

    def __init__(self, config, sublayer):
        super().__init__()
        self.n, self.d, self.eps = config.hc_streams, config.n_embd, config.norm_eps
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        static, dynamic_shape = self.initial_mappings(config.n_embd, sublayer)
        # pre, post and res (n, n, n*n) in one vector: as with other biases, no weight decay pulls them from their init
        self.static = nn.Parameter(static)
        self.dynamic = nn.Parameter(torch.zeros(dynamic_shape))

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
        """H (B, T, n, d) -> the streams after the sublayer f, which maps (B, T, d) to (B, T, d)."""
        with torch.autocast(H.device.type, enabled=False):  # the mixing weights in fp32, as routers are
            pre, post, res = self.mappings(H.float())
        y = f((pre.unsqueeze(-1) * H).sum(dim=-2))  # (B, T, d)
        # elementwise, not a matmul: autocast would round the residual streams to bf16 (and TF32) at every layer
        mixed = sum(res[..., j, None] * H[..., j, None, :] for j in range(self.n))  # (B, T, n, d)
        return mixed + post.unsqueeze(-1) * y.unsqueeze(-2)

    def flops_per_token(self):
        """Forward FLOPs per token: the dynamic projections, then reading h, mixing the streams and adding post * y."""
        n, d = self.n, self.d
        projections = n * d // self.dynamic.size(0)  # HC projects each stream, mHC all of them at once
        return 2 * projections * self.dynamic.numel() + 2 * d * (n * n + 2 * n)


class ManifoldHyperConnections(HyperConnections):
    """
    Manifold-constrained hyper-connections (DeepSeek mHC, arXiv 2512.24880), residual='mhc': the mappings come from
    all streams at once, x = RMSNorm(vec H) (n*d); pre = sigmoid(.), post = 2 sigmoid(.), and res is made doubly
    stochastic (entries >= 0, rows and columns summing to 1) by hc_sinkhorn_iters Sinkhorn-Knopp iterations. Why:
    HC's unconstrained res matrices multiply over depth, and their product can grow or shrink the signal without bound
    (the paper measures gains of thousands); doubly stochastic matrices are closed under products, have spectral norm
    <= 1 and keep the streams' mean, so the residual path stays bounded at any depth. At init (W = 0; pre summing to 1,
    weighted toward stream sublayer mod n; post = 1; res near I) every stream carries the standard residual.
    """

    def initial_mappings(self, d, sublayer):
        n = self.n
        pre = torch.full((n,), 0.5 / (n - 1))
        pre[sublayer % n] = 0.5
        res = torch.full((n, n), -8.0).fill_diagonal_(0.0)  # exp: near I, so that streams keep what they carry
        return torch.cat([torch.logit(pre), torch.zeros(n), res.flatten()]), (n * d, n * n + 2 * n)

    def mappings(self, H):
        n = self.n
        x = F.rms_norm(H.flatten(-2), (H.size(-2) * H.size(-1),), eps=self.eps)  # (B, T, n d)
        pre, post, res = (self.gain * (x @ self.dynamic.type_as(x)) + self.static).split([n, n, n * n], dim=-1)
        return pre.sigmoid(), 2 * post.sigmoid(), sinkhorn(res.unflatten(-1, (n, n)), self.sinkhorn_iters)


def sinkhorn(logits, iters):
    """
    Sinkhorn-Knopp on exp(logits) (..., n, n): rows, then columns, scaled to sum 1, iters times; in log space (a
    logsumexp per row and column) so that large logits do not overflow. Columns sum to 1 exactly, rows nearly;
    gradients flow through the unrolled loop.
    """
    for _ in range(iters):
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
        logits = logits - logits.logsumexp(dim=-2, keepdim=True)
    return logits.exp()


RESIDUALS = {"standard": Residual, "hc": HyperConnections, "mhc": ManifoldHyperConnections}  # config.residual


def expand_streams(x, config):
    """Hyper-connections: the embedding x (B, T, d) copied into hc_streams streams (B, T, n, d); else x itself."""
    return x if config.residual == "standard" else x.unsqueeze(-2).expand(*x.shape[:-1], config.hc_streams, x.size(-1))


def reduce_streams(x, config):
    """Hyper-connections: the mean of the streams (B, T, n, d) -> (B, T, d), before the final norm; else x itself."""
    return x if config.residual == "standard" else x.mean(dim=-2)


ENGRAM_PAD = -1  # Engram's token id for "no token": before a sequence's start, and in a row's left padding


class Engram(nn.Module):
    """
    Conditional memory by hashed n-gram lookup (DeepSeek Engram, arXiv 2601.07372), on the layers in
    engram_layers. At position t, the n-gram of token ids ending at t, for each n in engram_orders, is mixed into one
    int64 (the XOR of id_{t-m} times an odd multiplier c_m per offset m and layer, wrapping) and hashed by
    engram_heads functions, modulo a distinct prime each, into its own rows of one table; the rows found, concatenated
    (engram_dim), give a key and a value. The value enters each residual stream h through a gate from the context,
    sigmoid(signed sqrt(norm(key) . norm(h) / sqrt(d))), before the block's attention. Only the current and earlier
    tokens are read. The table trains by sparse rows (optim.py), so that a step touches only the rows its batch looked
    up. Left out from the paper: the tokenizer's id compression and the short causal convolution after the gate.
    """

    def __init__(self, config, layer):
        super().__init__()
        orders, heads = config.engram_order_list, config.engram_heads
        self.orders, self.context = orders, max(orders) - 1  # the context: ids before t that the longest n-gram reads
        self.streams = 1 if config.residual == "standard" else config.hc_streams
        # deterministic from the layer alone: the same ids find the same rows in every run and on every machine
        seed = torch.Generator().manual_seed(2601 + 10007 * layer)
        multipliers = torch.randint(0, 2**61, (max(orders),), generator=seed) * 2 + 1  # odd, < 2^62
        primes = next_primes(config.engram_table_size // (len(orders) * heads), len(orders) * heads)
        self.register_buffer("multipliers", multipliers, persistent=False)
        self.register_buffer("primes", torch.tensor(primes).view(len(orders), heads), persistent=False)
        self.register_buffer("offsets", (torch.tensor([0] + primes[:-1]).cumsum(0)).view(len(orders), heads),
                             persistent=False)  # each head's first row in the one table
        self.table = nn.Embedding(sum(primes), config.engram_dim // (len(orders) * heads), sparse=True)
        self.key = nn.Linear(config.engram_dim, config.n_embd, bias=False)
        self.value = nn.Linear(config.engram_dim, config.n_embd, bias=False)
        self.key_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.query_norm = RMSNorm(config.n_embd, config.norm_eps)

    def rows(self, tokens):
        """The table rows (B, T, orders, heads) of the n-grams ending at each of the last T of tokens (B, P + T)."""
        P, T = self.context, tokens.size(1) - self.context
        mix, mixes = torch.zeros_like(tokens[:, P:]), []
        for m in range(P + 1):  # the n-gram of order n mixes offsets 0..n-1
            mix = mix ^ (tokens[:, P - m:P - m + T] * self.multipliers[m])
            if m + 1 in self.orders:
                mixes.append(mix)
        return torch.stack(mixes, dim=-1)[..., None] % self.primes + self.offsets  # remainder: >= 0

    def forward(self, x, ctx):
        """x (B, T, d), or (B, T, n, d) streams -> what the memory adds to it, the same shape."""
        # inductor cannot produce a sparse gradient: under torch.compile, a lookup with gradients runs eagerly (a graph
        # break); without (decoding, evaluation) it compiles with the rest, so that a decode step is one graph
        rows = self.rows(ctx.tokens)
        lookup = eager(F.embedding) if torch.is_grad_enabled() else F.embedding
        memory = lookup(rows, self.table.weight, sparse=True).flatten(2)  # (B, T, engram_dim)
        shape = (*x.shape[:2], *(1,) * (x.dim() - 3), -1)  # one key and value for all streams
        key, value = self.key(memory).view(shape), self.value(memory).view(shape)
        score = (self.key_norm(key) * self.query_norm(x)).sum(dim=-1, keepdim=True) / math.sqrt(x.size(-1))
        return torch.sigmoid(score.sign() * score.abs().clamp(min=1e-6).sqrt()) * value

    def flops_per_token(self):
        """Forward FLOPs per token: the key and value projections, and each stream's gate (the lookups cost none)."""
        return 2 * (self.key.weight.numel() + self.value.weight.numel()) + 4 * self.streams * self.key.weight.size(0)


@functools.cache
def eager(fn):
    """fn, run eagerly under torch.compile; made at first use: torch.compiler loads torch._dynamo (seconds)."""
    return torch.compiler.disable(fn)


def next_primes(start, count):
    """The `count` smallest primes >= start (trial division: tables of up to billions of rows)."""
    primes, n = [], max(start, 2)
    while len(primes) < count:
        if all(n % f for f in range(2, math.isqrt(n) + 1)):
            primes.append(n)
        n += 1
    return primes


def engram_tokens(idx, context, cache=None, cache_pos=None):
    """
    Engram's n-gram window: the ids idx (B, T) after the `context` ids before them, (B, context + T), with ENGRAM_PAD
    where there is none (a sequence start, a row's left padding). Decoding keeps the last `context` ids in the cache.
    """
    if cache is None:
        return F.pad(idx, (context, 0), value=ENGRAM_PAD)
    idx = idx.masked_fill(cache_pos[None, :] < cache["pad"][:, None], ENGRAM_PAD)
    tokens = torch.cat([cache["engram_tokens"], idx], dim=1)
    cache["engram_tokens"].copy_(tokens[:, tokens.size(1) - context:])
    return tokens


# -----------------------------------------------------------------------------
# block and model

# config.layer_mixer(layer) -> sequence mixer: softmax attention ('mha', 'mla') with a span, or linear_kind
MIXERS = {"mha": CausalSelfAttention, "mla": MLA, "elu": LinearAttention, "gated_deltanet": GatedDeltaNet}


class Block(nn.Module):
    """
    Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the config picks both for layer `layer`, the
    residual around each (standard, or hyper-connections over streams), and an Engram memory before them.
    """

    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        mixer, span = config.layer_mixer(layer)
        self.attn = MIXERS[mixer](config, span)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config, layer) if config.is_moe_layer(layer) else SwiGLU(config)
        self.attn_residual = RESIDUALS[config.residual](config, 2 * layer)
        self.mlp_residual = RESIDUALS[config.residual](config, 2 * layer + 1)
        self.engram = Engram(config, layer) if layer in config.engram_layer_list else None

    def forward(self, x, ctx, cache=None):
        """x (B, T, d), or hyper-connections' streams (B, T, hc_streams, d)."""
        if self.engram is not None:
            x = x + self.engram(x, ctx)
        x = self.attn_residual(x, lambda h: self.attn(self.attn_norm(h), ctx, cache))
        return self.mlp_residual(x, lambda h: self.mlp(self.mlp_norm(h), ctx))


class MTP(nn.Module):
    """
    One multi-token prediction depth (DeepSeek-V3, arXiv 2412.19437 §2.2): the previous depth's hidden state at
    position i and the embedding of token i + depth, each RMS-normalized, concatenated and projected back to
    n_embd, then mtp_blocks blocks of its own; the model's embedding and output head are shared.
    """

    def __init__(self, config, depth):
        super().__init__()
        self.hidden_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.embed_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.config = config
        first = config.n_layer + (depth - 1) * config.mtp_blocks  # layer numbers go on past the main stack
        self.blocks = nn.ModuleList(Block(config, first + i) for i in range(config.mtp_blocks))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)  # before the shared output head

    def forward(self, h, emb, ctx, cache=None):
        """cache: when drafting (speculative decoding), the blocks' caches, a list."""
        x = self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(emb)], dim=-1))  # (B, T, 2d) -> (B, T, d)
        x = expand_streams(x, self.config)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache[i])
        return reduce_streams(x, self.config)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.mtp = nn.ModuleList(MTP(config, depth) for depth in range(1, config.mtp_depth + 1))
        cos, sin = rope_tables(config)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        # matrices that write into the residual stream get a depth-scaled init (GPT-2 paper §2.3):
        # 2 * n_layer of them add up along the stream, so each gets std / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "down.weight", "experts.down")):  # + shared and routed experts
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:  # qkv_bias
            nn.init.zeros_(module.bias)
        if isinstance(module, Experts):
            for weight in (module.gate_up, module.down):
                nn.init.normal_(weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, cache_pos=None):
        """
        idx (B, T) token ids. Training: targets (B, T) with -1 where no loss is wanted.
        Decoding: cache from new_cache() and cache_pos (T,) the cache slots of these tokens.
        Returns logits (B, T, V) (only the last position when there are no targets), the mean loss
        (or None) and a dict of auxiliary losses and metrics that variants fill. In training mode the loss is the
        training objective: the next-token loss plus the MTP loss and the weighted router losses, each also in the
        dict (aux['lm_loss'] then holds the next-token loss alone); in eval mode it is the next-token loss only.
        """
        B, T = idx.shape
        if cache is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens exceeds block_size {self.config.block_size}"
            ctx = Context(cos=self.cos[:T], sin=self.sin[:T])
        else:
            ctx = self.decode_context(cache, cache_pos)
        h = self.hidden_states(idx, ctx, cache)  # MTP's input: the last hidden state before the final norm
        x = self.norm(h)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None, ctx.aux
        logits = self.lm_head(x)
        loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.training and self.mtp:
            ctx.aux["mtp_loss"] = self.mtp_loss(h, idx, targets, ctx)
        extra = [ctx.aux[key] for key in ("moe_loss", "mtp_loss") if key in ctx.aux] if self.training else []
        if extra:
            ctx.aux["lm_loss"] = loss.detach()
            loss = loss + sum(extra)
        return logits, loss, ctx.aux

    def hidden_states(self, idx, ctx, cache=None):
        """The last hidden state (B, T, n_embd) of tokens idx, before the final norm; decoding writes the cache."""
        if self.config.engram_layer_list:  # Engram hashes the ids before each token too
            ctx.tokens = engram_tokens(idx, max(self.config.engram_order_list) - 1, cache, ctx.cache_pos)
        x = expand_streams(self.drop(self.wte(idx)), self.config)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache["layers"][i])
        return reduce_streams(x, self.config)

    def decode_context(self, cache, cache_pos):
        """The Context of tokens at cache slots cache_pos (T,), computed on the device (no host sync)."""
        # left padding: row b starts at slot cache.pad[b]; its positions count from there
        pos = (cache_pos[None, :] - cache["pad"][:, None]).clamp(min=0)  # (B, T)
        slots = torch.arange(cache["max_len"], device=cache_pos.device)
        visible = (slots[None, None, :] <= cache_pos[None, :, None]) & (slots[None, None, :] >= cache["pad"][:, None, None])
        return Context(cos=self.cos[pos], sin=self.sin[pos], cache_pos=cache_pos, mask=visible.unsqueeze(1),
                       pad=cache["pad"])

    def mtp_loss(self, h, idx, targets, ctx):
        """
        (mtp_lambda / mtp_depth) * the sum over depths k of the loss of predicting token i + k + 1 at position i,
        from MTP module k's view of position i: depth k - 1's hidden state there and the embedding of token i + k
        (teacher forcing); one position shorter at each depth. Each depth's loss also goes to aux['mtp<k>/loss'].
        """
        total = 0.0
        for k, module in enumerate(self.mtp, start=1):
            T = idx.size(1) - k
            h = module(h[:, :T], self.wte(idx[:, k:]), Context(cos=ctx.cos[:T], sin=ctx.sin[:T], aux=ctx.aux))
            logits = self.lm_head(module.norm(h))  # (B, T, V)
            loss = cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten())
            ctx.aux[f"mtp{k}/loss"] = loss.detach()
            total = total + loss
        return self.config.mtp_lambda / len(self.mtp) * total

    # -------------------------------------------------------------------------
    # decoding

    def cast_parameters(self, dtype):
        """
        For inference in dtype (bf16 on a GPU): the parameters in place, ties kept; the buffers (RoPE tables, router
        state) stay fp32. Under autocast, fp32 weights are cast at every matmul of every decode step: at batch 1 that
        reads and writes more memory than the step's own work does.
        """
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    def new_cache(self, batch, max_len, dtype=None, mtp=False):
        """
        A static-shape cache for `batch` rows of up to `max_len` tokens (max_len <= block_size); mtp=True adds one for
        the first MTP module's blocks (speculative decoding's draft). Decoding writes it in place, so that its tensors
        keep their addresses, as a captured CUDA graph needs.
        """
        assert max_len <= self.config.block_size
        device = self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        cache = {"layers": [block.attn.new_cache(batch, max_len, dtype, device) for block in self.blocks],
                 "pad": torch.zeros(batch, dtype=torch.long, device=device), "max_len": max_len,
                 # Engram: the last max order - 1 token ids fed, for the n-grams of the next ones (none yet)
                 "engram_tokens": torch.full((batch, max(self.config.engram_order_list) - 1), ENGRAM_PAD,
                                             device=device)}
        if mtp:
            cache["mtp"] = [block.attn.new_cache(batch, max_len, dtype, device) for block in self.mtp[0].blocks]
        return cache

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, generator=None,
                 compile=False, speculative=False, stats=None, check_every=16):
        """
        Sample continuations of a batch of prompts (lists of token ids of any lengths) with the KV cache. Prompts are
        left-padded so that every row's next token lands in the same cache slot; one forward over them fills the cache
        (prefill), then decode_step feeds one token per row with fixed shapes and no host sync, so that compile=True
        compiles it and replays it as one CUDA graph on a GPU (compiled; a string names another torch.compile backend,
        e.g. 'aot_eager'). Yields a (B,) tensor of new tokens per step; a row that produced eos_id
        keeps yielding it, and generation stops once every row has, checked every check_every tokens (the loop's only
        host sync). When the cache is full, it restarts from the most recent half of the context.
        speculative=True drafts each next token with the first MTP module and verifies it (speculative_step); stats, a
        dict, then counts rounds, drafted and accepted tokens.
        """
        device, L, B = self.wte.weight.device, self.config.block_size, len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        assert 0 < lengths.min() and lengths.max() < L, "prompts must hold 1 to block_size - 1 tokens"
        assert self.mtp or not speculative, "speculative decoding drafts with the MTP modules: mtp_depth must be >= 1"
        history = torch.zeros(B, int(lengths.max()), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            history[row, history.size(1) - len(prompt):] = torch.as_tensor(prompt)
        history, pad = history.to(device), (history.size(1) - lengths).to(device)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        # a cache as long as the prompts and their continuations need (attention reads all of it at every step),
        # with one slot for a draft; block_size when they do not fit in it
        L = min(L, history.size(1) + max_new_tokens + 1)
        cache = self.new_cache(B, L, dtype, mtp=speculative)
        cache["pad"].copy_(pad)
        draws = 3 if speculative else 1  # Exp(1) noise per row and step: the draft, its replacement, the next token
        # what the steps read and write, in place: a CUDA graph replays them at fixed addresses
        state = {"token": torch.zeros(B, dtype=torch.long, device=device), "pos": torch.zeros(1, dtype=torch.long, device=device),
                 "done": torch.zeros(B, dtype=torch.bool, device=device),
                 "eos": torch.tensor(-1 if eos_id is None else eos_id, device=device),
                 "noise": torch.ones(B, draws, self.config.vocab_size, device=device) if temperature else None,
                 "uniform": torch.zeros(B, device=device)}  # speculative sampling: each draft's acceptance draw
        if speculative:  # the draft's logits for the token after the next
            state["draft"] = torch.zeros(B, self.config.vocab_size, device=device)

        def draw():  # outside the graph: the generator's random numbers for the next step
            if temperature:
                state["noise"].exponential_(generator=generator)
                state["uniform"].uniform_(generator=generator)

        def prefill(history):  # one forward over the context: the cache, and the next token from the last position
            h = self.hidden_states(history, self.decode_context(cache, torch.arange(history.size(1), device=device)), cache)
            draw()
            state["pos"].fill_(history.size(1))
            token = pick_token(self.lm_head(self.norm(h[:, -1])), state, temperature, top_k, top_p)
            if speculative:  # the draft over the whole context, for the token after the next
                next_tokens = torch.cat([history[:, 1:], token[:, None]], dim=1)
                state["draft"].copy_(self.draft_logits(cache, h, next_tokens, torch.arange(history.size(1), device=device))[:, -1])
            return token

        def all_done():  # every row has produced eos_id (a host sync)
            return eos_id is not None and bool(state["done"].all())

        def restart(history, new):  # the cache is full: start again from the most recent half of the context
            history = torch.cat([history, torch.stack(new, dim=1)], dim=1)
            shift = history.size(1) - L // 2
            for tensor, fresh in zip(cache_tensors(cache), cache_tensors(self.new_cache(B, L, dtype, speculative))):
                tensor.copy_(fresh)
            cache["pad"].copy_((pad - shift).clamp(min=0))
            return history[:, shift:]

        token = prefill(history)
        new = [token]  # the tokens after history; the last one is not in the cache yet
        # a CUDA graph cannot hold a host sync: MoE layers without the grouped GEMM read their row counts on the host
        graph = compile is True and device.type == "cuda" and all(
            grouped_mm_supported(self.wte.weight, module.gate_up) for module in self.modules() if isinstance(module, Experts))
        if not speculative:
            step = compiled(lambda: self.decode_step(cache, state, temperature, top_k, top_p), compile, graph)
            for i in range(max_new_tokens):
                if i and history.size(1) + len(new) > L:
                    history = restart(history, new)
                    token = prefill(history)
                    new = [token]
                elif i:
                    draw()
                    token = step().clone()  # the graph overwrites its output at the next step
                    new.append(token)
                yield token
                if i % check_every == check_every - 1 and all_done():
                    return
            return
        verify = compiled(lambda: self.speculative_step(cache, state, temperature, top_k, top_p), compile, graph)
        rewound = self.unrewound_tensors(cache)
        # rounds queued before the host reads the oldest one's outcome, so that the GPU need not wait for the host:
        # one, unless the host must undo rejected drafts from a copy (mixers that do not rewind) between rounds
        ahead = 0 if rewound else 1
        stats = {} if stats is None else stats
        yield token
        produced, finished, queue = 1, all_done(), collections.deque()
        while not finished and produced < max_new_tokens:
            room = history.size(1) + len(new) + 2 * len(queue) + 1 <= L  # for the last token, its draft, and the queue's
            if len(queue) <= ahead and room and produced + len(queue) < max_new_tokens:
                draw()
                saved = [tensor.clone() for tensor in rewound + [state["token"], state["pos"]]] if rewound else []
                tokens, summary = verify()
                out = torch.cat([tokens.flatten(), summary])  # a copy: the graph overwrites its outputs next round
                ready = torch.cuda.Event() if out.is_cuda else None
                queue.append((out, out.to("cpu", non_blocking=ready is not None), ready, saved))
                if ready is not None:
                    ready.record()
                continue
            if not queue:  # no room for a round: start again from the most recent half of the context
                history = restart(history, new)
                token = prefill(history)
                new, produced, finished = [token], produced + 1, all_done()
                yield token
                continue
            out, host, ready, saved = queue.popleft()
            if ready is not None:
                ready.synchronize()  # the round's outcome: the loop's one wait, with the next round already queued
            n, accepted, *done_after = host[2 * B:].tolist()
            tokens = out[:2 * B].view(B, 2)
            if n == 1 and saved:  # undo the draft where mixers do not rewind, then feed the first token alone
                *copies, token_before, pos_before = saved
                for tensor, copy in zip(rewound, copies):
                    tensor.copy_(copy)
                h = self.hidden_states(token_before[:, None], self.decode_context(cache, pos_before), cache)
                state["draft"].copy_(self.draft_logits(cache, h, tokens[:, :1], pos_before)[:, -1])
            finished = eos_id is not None and bool(done_after[n - 1])
            for key, value in (("rounds", 1), ("drafted", B), ("accepted", accepted)):
                stats[key] = stats.get(key, 0) + value
            for j in range(min(n, max_new_tokens - produced)):
                new.append(tokens[:, j])
                produced += 1
                yield tokens[:, j]

    def decode_step(self, cache, state, temperature=1.0, top_k=0, top_p=1.0):
        """
        One token per row, with fixed shapes and no host sync, so that it captures as one graph: feed each row's last
        token state['token'] (B,) at cache slot state['pos'] (1,), pick the next (pick_token) and advance the state.
        """
        logits = self(state["token"][:, None], cache=cache, cache_pos=state["pos"])[0][:, -1]
        state["pos"] += 1
        return pick_token(logits, state, temperature, top_k, top_p)

    def draft_logits(self, cache, hidden, tokens, cache_pos, last=1):
        """
        Speculative decoding's draft: the first MTP module (DeepSeek-V3 §2.2) at cache slots cache_pos (T,), from the
        main model's hidden states there (B, T, n_embd) and the token after each (B, T); writes its cache and returns
        its logits (B, last, V) for the tokens after the last `last` of them.
        """
        h = self.mtp[0](hidden, self.wte(tokens), self.decode_context(cache, cache_pos), cache["mtp"])
        return self.lm_head(self.mtp[0].norm(h[:, -last:]))

    def speculative_step(self, cache, state, temperature=1.0, top_k=0, top_p=1.0):
        """
        One round of self-speculative decoding, with fixed shapes and no host sync, so that it captures as one graph.
        Draft a token from the logits state['draft'] (B, V), and verify it with one forward of the main model over
        each row's last token and the draft, at slots state['pos'] and the next. Exact (Leviathan et al. 2023, arXiv
        2211.17192, §2.3): greedy, the draft is accepted when it is the main model's argmax; sampling, with
        probability min(1, p/q) (p the main model's distribution, q the draft's, both after temperature, top-k and
        top-p), and a rejected draft is replaced by a sample of max(0, p - q), so that every token is a sample of p.
        Every row keeps the first of the two tokens after its last one (the draft or its replacement), and all keep
        the second (a sample of p after the draft) when every row accepted (or is done). The MTP module then drafts
        after both positions at once: its draft after the first is the next round's if the rows keep one token, and
        the one after the second if they keep two; the cache entries of a position not kept are overwritten by the
        next round. The state advances on the device, so that the host can queue the next round before it reads
        this one's outcome. Returns the two tokens (B, 2) and, for the host, how many the rows keep (1 or 2), how
        many drafts were accepted, and whether every row is done after each of the two tokens (4,).
        """
        noise, draft_logits = state["noise"], state["draft"]
        if temperature == 0:
            draft = draft_logits.argmax(dim=-1)
        else:
            q = sampling_probs(draft_logits, temperature, top_k, top_p)  # (B, V)
            draft = exponential_race(q, noise[:, 0])
        pos = state["pos"] + torch.arange(2, device=draft.device)
        h = self.hidden_states(torch.stack([state["token"], draft], dim=1), self.decode_context(cache, pos), cache)
        logits = self.lm_head(self.norm(h))  # (B, 2, V)
        if temperature == 0:
            first, second = logits.argmax(dim=-1).unbind(1)
            accepted = draft == first
        else:
            p = sampling_probs(logits, temperature, top_k, top_p)  # (B, 2, V)
            p_draft, q_draft = p[:, 0].gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
            accepted = state["uniform"] * q_draft < p_draft
            first = torch.where(accepted, draft, exponential_race((p[:, 0] - q).clamp(min=0), noise[:, 1]))
            second = exponential_race(p[:, 1], noise[:, 2])
        first = torch.where(state["done"], state["eos"], first)
        done_first = state["done"] | (first == state["eos"])
        second = torch.where(done_first, state["eos"], second)
        done = torch.stack([done_first, done_first | (second == state["eos"])], dim=1)
        tokens = torch.stack([first, second], dim=1)
        both = (accepted | state["done"]).all()
        drafts = self.draft_logits(cache, h, tokens, pos, last=2)  # (B, 2, V)
        state["draft"].copy_(torch.where(both, drafts[:, 1], drafts[:, 0]))
        state["token"].copy_(torch.where(both, second, first))
        state["done"].copy_(torch.where(both, done[:, 1], done[:, 0]))
        state["pos"] += 1 + both.long()
        return tokens, torch.stack([1 + both.long(), accepted.sum(), *done.all(dim=0)]).long()

    def unrewound_tensors(self, cache):
        """The cache tensors that decoding cannot rewind by position alone (see FullSpan.rewinds): those of mixers
        that do not rewind (rolling windows, recurrent states), the MTP module's included, and Engram's last token
        ids."""
        pairs = [*zip(self.blocks, cache["layers"]), *(zip(self.mtp[0].blocks, cache["mtp"]) if "mtp" in cache else [])]
        layers = [layer for block, layer in pairs if not getattr(getattr(block.attn, "span", None), "rewinds", False)]
        return cache_tensors(layers) + (cache_tensors(cache["engram_tokens"]) if self.config.engram_layer_list else [])

    # -------------------------------------------------------------------------
    # accounting

    @torch.no_grad()
    def update_router_biases(self):
        """
        Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2), for the training loop to call after each optimizer step:
        every router's selection bias moves by bias_update_rate toward balance (down for the experts that got more
        than the mean load, up for the others), from the slots counted over the step's micro-batches and summed
        over DDP processes, so that every replica moves alike. Nothing to do when bias_update_rate = 0.
        """
        routers = [m for m in self.modules() if isinstance(m, Router)]
        if not routers or self.config.bias_update_rate == 0:
            return
        loads = torch.stack([router.load for router in routers])  # (MoE layers, n_experts)
        if dist.is_initialized():
            dist.all_reduce(loads)
        for router, load in zip(routers, loads):
            router.bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
            router.load.zero_()

    # -------------------------------------------------------------------------
    # accounting

    def num_params(self, embedding=True, active=False):
        """
        Parameter count of the model that runs at inference (a tied head counted once; the MTP modules, unused there,
        left out). embedding=False leaves out the token embedding (and an untied output head); active=True counts
        only the moe_topk of n_experts routed experts that one token goes through (DeepSeek-V3's "activated").
        The Engram tables, memory looked up rather than computed with, are counted apart: engram_table_params().
        """
        n = (sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.mtp.parameters())
             - self.engram_table_params())
        if not embedding:
            n -= self.wte.weight.numel() + (0 if self.config.tie_embeddings else self.lm_head.weight.numel())
        if active:
            routed, active_routed = self.routed_expert_weights(self.blocks)
            n -= routed - active_routed
        return n

    def engram_table_params(self):
        """Parameters of the Engram tables (each step reads and writes only the rows its batch looks up)."""
        return sum(m.table.weight.numel() for m in self.modules() if isinstance(m, Engram))

    def routed_expert_weights(self, module):
        """The routed experts' weights in module: all of them, and the share one token goes through."""
        n = sum(p.numel() for m in module.modules() if isinstance(m, Experts) for p in m.parameters())
        return n, n // max(1, self.config.n_experts) * self.config.moe_topk

    def flops_breakdown(self, seq_len=None):
        """
        Training FLOPs per token (forward + backward = 3 x forward) by part of the model: 2 per weight of every matmul
        a token goes through (of the routed experts, moe_topk), plus each mixer's attention_flops ('attention
        scores'): a softmax query takes 2 * (query-key dims) FLOPs per key for q.k and 2 * (value dims) for the
        weighted sum of values, over the keys its span lets it see (full causal attention: t + 1 keys at position t,
        (T + 1) / 2 on average; sliding, block-sparse, MoBA: only those), and linear attention its recurrent form's
        state reads and writes. Hyper-connections and Engram count their own (an Engram table is looked up, not
        multiplied); norms and biases are left out. 'head' is the output head, tied or not; 'mtp' is all the MTP
        modules' work, their pass through the shared head included. MTP depth k runs on T - k positions, counted as T.
        """
        T = seq_len or self.config.block_size

        def matmul(module):  # forward FLOPs of module's matrices; the routed experts' are 3-D, counted at moe_topk
            return 2 * (sum(p.numel() for p in module.parameters() if p.dim() == 2)
                        + self.routed_expert_weights(module)[1])

        def block_parts(block):
            return {"attention projections": matmul(block.attn), "attention scores": block.attn.attention_flops(T),
                    "moe" if isinstance(block.mlp, MoE) else "mlp": matmul(block.mlp),
                    "hyper-connections": sum(m.flops_per_token() for m in (block.attn_residual, block.mlp_residual)
                                             if isinstance(m, HyperConnections)),
                    "engram": block.engram.flops_per_token() if block.engram is not None else 0}

        parts = dict.fromkeys(["attention projections", "attention scores", "mlp", "moe", "hyper-connections",
                               "engram", "head", "mtp"], 0)
        for block in self.blocks:
            for part, flops in block_parts(block).items():
                parts[part] += flops
        parts["head"] = 2 * self.lm_head.weight.numel()
        parts["mtp"] = sum(matmul(m.proj) + sum(sum(block_parts(b).values()) for b in m.blocks) + parts["head"]
                           for m in self.mtp)
        return {part: 3 * flops for part, flops in parts.items()}

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token at seq_len (default block_size): the sum of flops_breakdown's parts."""
        return sum(self.flops_breakdown(seq_len).values())

    def kv_cache_bytes(self, context, dtype=torch.bfloat16):
        """
        Bytes of one sequence's decode cache at `context` tokens, all layers together, in dtype: per token and layer
        2 * n_kv_head * head_dim numbers for MHA, GQA and MQA, kv_lora_rank + qk_rope_head_dim for MLA, for at most
        `window` tokens on sliding layers; linear layers keep a state of fixed size (fp32), whatever the context.
        """
        caches = [block.attn.new_cache(1, context, dtype, "meta") for block in self.blocks]
        return sum(t.numel() * t.element_size() for cache in caches for t in cache.values() if t.is_floating_point())

    def kv_cache_bytes_per_token(self, dtype_bytes=2):
        """kv_cache_bytes at block_size, per token, at dtype_bytes per number (2: bf16)."""
        dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
        return self.kv_cache_bytes(self.config.block_size, dtype) / self.config.block_size


def aux_metrics(aux):
    """
    The aux dict's tensors as plain numbers for a log (a float each, a list for each MoE layer's expert loads), and
    a one-line summary of the floats, each averaged over layers ('moe3/dropped' and 'moe5/dropped': 'moe/dropped').
    """
    metrics = {key: value.tolist() for key, value in aux.items() if torch.is_tensor(value)}
    by_name = {}
    for key, value in metrics.items():
        if isinstance(value, float):
            by_name.setdefault(re.sub(r"\d+/", "/", key), []).append(value)
    return metrics, ", ".join(f"{name} {sum(values) / len(values):.4g}" for name, values in by_name.items())


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, noise=None):
    """
    Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else top-k and nucleus sampling,
    drawn by the exponential race with Exp(1) noise (B, V): the generator's, or `noise` (a captured graph's input).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if noise is None:
        noise = torch.empty(logits.shape, device=logits.device).exponential_(generator=generator)
    return exponential_race(sampling_probs(logits, temperature, top_k, top_p), noise)


def sampling_probs(logits, temperature, top_k=0, top_p=1.0):
    """The distribution (..., V) that sampling draws from: softmax(logits / temperature), within top-k and top-p."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probabilities add up to top_p (Holtzman et al. 2019)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits.softmax(dim=-1)


def exponential_race(weights, noise):
    """
    A sample of each row of weights (..., V) >= 0, proportionally, without torch.multinomial's host sync: with
    E_i ~ Exp(1) independent (noise), E_i / w_i ~ Exp(w_i), and the smallest is index i with probability
    w_i / sum(w), so argmax w_i / E_i is the sample (the Gumbel-max trick in another form). Zero weights never win.
    """
    return (weights / noise.clamp(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def pick_token(logits, state, temperature, top_k, top_p):
    """
    Decoding's next token of each row from its logits (B, V), with the noise state['noise'][:, 0]; a row that is done
    (state['done']) stays at state['eos'], and is done once it produces it. Written to state['token'] and returned.
    """
    token = sample_next(logits, temperature, top_k, top_p, noise=None if temperature == 0 else state["noise"][:, 0])
    token = torch.where(state["done"], state["eos"], token)
    state["done"] |= token == state["eos"]
    state["token"].copy_(token)
    return token


def cache_tensors(cache):
    """Every tensor of a decode cache (or of any nesting of dicts and lists), in a fixed order."""
    if torch.is_tensor(cache):
        return [cache]
    items = cache.values() if isinstance(cache, dict) else cache if isinstance(cache, list) else []
    return [tensor for item in items for tensor in cache_tensors(item)]


def compiled(fn, compile, graph):
    """
    fn, a function of no arguments with fixed shapes that reads and writes tensors in place, made fast: compile=True
    compiles it with inductor, tuning its kernels' tile sizes by coordinate descent (as gpt-fast; at batch 1 a decode
    step is many small matrix-vector products), and with graph=True (CUDA, no host sync in fn) replays it as one
    CUDA graph (cuda_graph); a string names another torch.compile backend ('aot_eager' in the CPU tests); False
    leaves fn as it is.
    """
    if not compile:
        return fn
    if compile is not True:
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=compile)
    fn = torch.compile(fn, fullgraph=True, dynamic=False, options={"coordinate_descent_tuning": True})
    return cuda_graph(fn) if graph else fn


def cuda_graph(fn):
    """
    fn replayed as one CUDA graph: a call is one launch, with no Python and no guard checks (torch.compile's own CUDA
    graphs, mode='reduce-overhead', spent more time on the host per step than the GPU spent on a GPT-2 small decode
    step at batch 1). Every call does fn's work once: the first runs fn (compiling it) on the side stream that the
    second captures fn on before replaying it. Returns fn's output, the graph's own tensors after the first call,
    overwritten by the next.
    """
    stream, graph, out, warm = torch.cuda.Stream(), None, None, False

    def call():
        nonlocal graph, out, warm
        if graph is not None:
            graph.replay()
            return out
        stream.wait_stream(torch.cuda.current_stream())
        if not warm:  # compile, and let cuBLAS set up its workspace for the stream
            with torch.cuda.stream(stream):
                out, warm = fn(), True
            torch.cuda.current_stream().wait_stream(stream)
            return out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = fn()
        graph.replay()
        return out

    return call
