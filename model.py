"""
nanollm model: a modern decoder-only transformer in one file. Every architecture variant sits
behind a flag of `GPTConfig`; a reader who ignores a flag never reads its code path.

Dense baseline (Llama-style):
- pre-norm blocks with RMSNorm (Zhang & Sennrich 2019), no biases anywhere
- rotary position embeddings, half-split pairing (`rope_theta`; Su et al. 2021, RoFormer)
- grouped-query attention through `n_kv_head`: MHA (= n_head), GQA, MQA (= 1) (Ainslie et al. 2023)
- optional RMSNorm on queries and keys per head (`qk_norm`; Dehghani et al. 2023, used by Qwen3)
- SwiGLU feed-forward (`mlp_hidden`; Shazeer 2020)
- tied input/output embeddings (`tie_embeddings`)
- a preallocated, static-shape KV cache for decoding (left-padded batches of prompts)

DeepSeek family (DeepSeek-V3 in miniature: `config/deepseek_small.py`):
- multi-head latent attention, `attention='mla'` (`q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`,
  `qk_rope_head_dim`, `v_head_dim`): keys and values from a small cached latent, decoupled RoPE, weight-absorbed
  decoding (DeepSeek-V2, arXiv 2405.04434 §2.1)
- mixture-of-experts feed-forward, `n_experts > 0`: routed fine-grained experts plus shared ones (DeepSeekMoE,
  arXiv 2401.06066), on every `moe_every`-th layer after `moe_first_dense` dense ones (Llama 4 interleaving;
  DeepSeek's first dense layers), softmax or sigmoid scores (`router_scoring`, DeepSeek-V3 arXiv 2412.19437
  §2.1.2), capacity and token dropping (`capacity_factor`), router jitter (`router_jitter`) and the load-balancing
  loss (`aux_loss_coef`) of Switch (arXiv 2101.03961), the router z-loss (`router_z_loss_coef`; ST-MoE, arXiv
  2202.08906), DeepSeek-V3's sequence-wise balance loss (`seq_aux_loss_coef`) and auxiliary-loss-free bias
  balancing (`bias_update_rate`)
- multi-token prediction, `mtp_depth > 0` (`mtp_lambda`, `mtp_blocks`): sequential modules that predict tokens
  further ahead during training, left out at inference (DeepSeek-V3 §2.2)

The order below is bottom-up, as in nanoGPT: config, shared pieces, attention, feed-forward,
block, the model, decoding, accounting.
"""
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
    attention: str = "mha"      # sequence mixer: 'mha' (MHA/GQA/MQA through n_kv_head) or 'mla' (latent attention)
    n_kv_head: int = 0          # key/value heads: 0 = n_head (MHA), 1 = MQA, a divisor of n_head = GQA
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2i/head_dim)
    qk_norm: bool = False       # RMSNorm on each query and key head before RoPE
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
    # output
    tie_embeddings: bool = True  # the output head shares the token embedding matrix

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.mlp_hidden == 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        self.kv_lora_rank = self.kv_lora_rank or 4 * self.head_dim
        self.qk_nope_head_dim = self.qk_nope_head_dim or self.head_dim
        self.qk_rope_head_dim = self.qk_rope_head_dim or self.head_dim // 2
        self.v_head_dim = self.v_head_dim or self.head_dim
        self.moe_hidden = self.moe_hidden or self.mlp_hidden
        checks = [
            (self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head"),
            (self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"),
            (self.attention in ("mha", "mla"), f"unknown attention '{self.attention}' (choose mha or mla)"),
            (not (self.attention == "mla" and self.qk_norm), "MLA's absorbed decoding has no per-head keys to normalize"),
            (self.rope_dim % 2 == 0, "RoPE needs an even number of rotary dimensions"),
            (self.router_scoring in ("softmax", "sigmoid"), f"unknown router_scoring '{self.router_scoring}'"),
            (self.n_experts == 0 or 1 <= self.moe_topk <= self.n_experts, "moe_topk must be within 1..n_experts"),
        ]
        for ok, message in checks:  # a ValueError, so that a stage can turn it into a one-line error
            if not ok:
                raise ValueError(message)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def rope_dim(self):
        """Rotary dims per head: all of head_dim, or MLA's decoupled rotary part."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, layer):
        """Whether layer `layer` (counted from 0, the MTP modules' blocks after the main ones) has an MoE feed-forward."""
        return self.n_experts > 0 and layer >= self.moe_first_dense and (layer + 1) % self.moe_every == 0


def config_fields():
    """Every GPTConfig field with its default: the model's share of a stage's configuration."""
    return {f.name: f.default for f in fields(GPTConfig)}


# -----------------------------------------------------------------------------
# shared pieces

class RMSNorm(nn.Module):
    """y = g * x / sqrt(mean(x^2) + eps), computed in fp32 whatever the autocast dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps).type_as(x)


def rope_tables(head_dim, max_len, theta):
    """cos and sin of position * frequency, (max_len, head_dim/2) each, in fp32."""
    freqs = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) of x (B, T, heads, d) by their angles; cos/sin are (T, d/2) or (B, T, d/2)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class Context:
    """What a layer may need beyond its input x, shared by all layers of one forward pass."""
    cos: torch.Tensor                   # RoPE tables at each token's position: (T, d/2), or (B, T, d/2) when decoding
    sin: torch.Tensor
    cache_pos: torch.Tensor = None      # (T,) cache slots the new tokens are written to; None when training
    mask: torch.Tensor = None           # (B, 1, T, max_len) which cache slots each new token may attend to
    aux: dict = field(default_factory=dict)  # side outputs of layers (auxiliary losses, metrics)


# -----------------------------------------------------------------------------
# attention

@torch.no_grad()
def max_attention_logits(q, k, chunk=256):
    """
    Each head's largest pre-softmax logit q.k / sqrt(head_dim) under the causal mask, over the whole batch: what
    scaled_dot_product_attention computes from q (B, n_head, T, d) and k (B, n_kv_head, T, d) but never exposes.
    For QK-Clip (optim.py). Returns (n_head,) in fp32; chunked over queries, so that at most B*n_head*chunk*T
    logits exist at once.
    """
    B, H, T, d = q.shape
    q = q.unflatten(1, (k.size(1), H // k.size(1)))  # (B, n_kv_head, group, T, d): heads sharing a key head
    k = k.unsqueeze(2)  # (B, n_kv_head, 1, T, d)
    best = torch.full((H,), float("-inf"), device=q.device)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        logits = q[..., start:end, :] @ k[..., :end, :].mT  # (B, n_kv_head, group, end - start, end)
        future = torch.ones(end - start, end, dtype=torch.bool, device=q.device).triu(start + 1)
        best = torch.maximum(best, logits.masked_fill(future, float("-inf")).amax(dim=(0, 3, 4)).float().flatten())
    return best / math.sqrt(d)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_head key/value heads (MHA, GQA, MQA), RoPE and optional QK-norm."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v come from one fused matrix: one big matmul is faster than three small ones
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        # Muon (optim.py) orthogonalizes q, k and v as the three matrices they are, not as one block
        self.qkv.weight.logical_rows = (self.n_head * self.head_dim,) + 2 * (self.n_kv_head * self.head_dim,)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self.track_max_logits = False  # QK-Clip (optim.py) switches this on to read each head's largest logit

    def new_cache(self, batch, max_len, dtype, device):
        shape = (batch, self.n_kv_head, max_len, self.head_dim)
        return {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device)}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rope(self.q_norm(q.view(B, T, self.n_head, self.head_dim)), ctx.cos, ctx.sin)
        k = apply_rope(self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)), ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        gqa = self.n_kv_head != self.n_head
        if cache is None:  # training and full forward: fused causal kernels
            if self.track_max_logits:
                ctx.aux.setdefault("max_logits", []).append(max_attention_logits(q, k))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # decoding: write the new keys into their slots, attend over the whole static buffer under a mask
            cache["k"].index_copy_(2, ctx.cache_pos, k)
            cache["v"].index_copy_(2, ctx.cache_pos, v)
            y = F.scaled_dot_product_attention(q, cache["k"], cache["v"], attn_mask=ctx.mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * head_dim)
        return F.dropout(self.proj(y), self.dropout, self.training)

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
        gamma = (tau / max_logits.clamp(min=tau))[:, None, None]  # exactly 1 for the heads within tau
        q, k, _ = self.qkv.weight.split(self.qkv.weight.logical_rows)
        if self.n_kv_head == self.n_head:
            gamma = gamma.sqrt()
            k.view(self.n_head, self.head_dim, -1).mul_(gamma)
        q.view(self.n_head, self.head_dim, -1).mul_(gamma)


class MLA(nn.Module):
    """
    Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 §2.1): each token leaves one small latent, from which
    every head's keys and values are up-projected, plus one rotary key shared by all heads (decoupled RoPE: a
    rotation cannot be folded through the up-projection, so position rides on separate dims). The cache holds only
    the normalized latent and the rotated shared key: kv_lora_rank + qk_rope_head_dim numbers per token and layer.
    """

    def __init__(self, config):
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
        self.scale = (self.nope + self.rope) ** -0.5  # a query-key dot product spans both parts
        self.dropout = config.dropout
        self.absorb = True  # decode in the weight-absorbed form; False: the expanded one (the tests compare them)
        self.track_max_logits = False  # QK-Clip (optim.py) switches this on to read each head's largest logit

    def new_cache(self, batch, max_len, dtype, device):
        return {"latent": torch.zeros(batch, max_len, self.rank, dtype=dtype, device=device),
                "k_rope": torch.zeros(batch, max_len, self.rope, dtype=dtype, device=device)}

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q_nope, q_rope = self.q_b(self.q_a(x)).view(B, T, self.n_head, -1).split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, ctx.cos, ctx.sin)
        latent, k_rope = self.kv_a(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_norm(latent)  # (B, T, kv_lora_rank)
        k_rope = apply_rope(k_rope.unsqueeze(2), ctx.cos, ctx.sin).squeeze(2)  # (B, T, qk_rope_head_dim)
        if cache is not None:  # decoding: write the new latents and keys, attend over the whole static buffer
            cache["latent"].index_copy_(1, ctx.cache_pos, latent)
            cache["k_rope"].index_copy_(1, ctx.cache_pos, k_rope)
            latent, k_rope = cache["latent"], cache["k_rope"]
        attend = self.absorbed if cache is not None and self.absorb else self.expanded
        y = attend(q_nope, q_rope, latent, k_rope, ctx)  # (B, n_head, T, v_head_dim)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)

    def expanded(self, q_nope, q_rope, latent, k_rope, ctx):
        """Training form: per-head keys and values up-projected from the S latents, then the fused SDPA kernels."""
        B, S, _ = latent.shape
        k_nope, v = self.kv_b(latent).view(B, S, self.n_head, -1).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, n_head, T, nope + rope)
        k_rope = k_rope.unsqueeze(2).expand(B, S, self.n_head, self.rope)  # the one rotary key, seen by every head
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # (B, n_head, S, nope + rope)
        if self.track_max_logits and ctx.mask is None:
            ctx.aux.setdefault("max_logits", []).append(max_attention_logits(q, k))
        return F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                              scale=self.scale, dropout_p=self.dropout if self.training else 0.0)

    def absorbed(self, q_nope, q_rope, latent, k_rope, ctx):
        """
        Decoding form (DeepSeek-V2 §2.1.2): q^C . (W_UK c) = (W_UK^T q^C) . c, so W_UK folds into the query and
        W_UV applies after attention, which then runs over the cached latents themselves: one key head of
        kv_lora_rank + rope dims shared by all query heads (MQA), with the latent as its value.
        """
        w_uk, w_uv = self.kv_b.weight.view(self.n_head, -1, self.rank).split([self.nope, self.v_dim], dim=1)
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # (B, n_head, T, kv_lora_rank)
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)  # (B, n_head, T, rank + rope)
        k = torch.cat([latent, k_rope], dim=-1).unsqueeze(1)  # (B, 1, S, rank + rope)
        y = F.scaled_dot_product_attention(q, k, latent.unsqueeze(1), attn_mask=ctx.mask, scale=self.scale,
                                           enable_gqa=True)  # (B, n_head, T, rank)
        return torch.einsum("bhtr,hvr->bhtv", y, w_uv)

    @torch.no_grad()
    def qk_clip(self, max_logits, tau):
        """
        QK-Clip (Kimi K2, arXiv 2507.20534 §2.1) for MLA: head h's logit is q^C.k^C + q^R.k^R, where the rotary key
        k^R is shared by all heads. q^C and k^C (head h's rows of q_b and kv_b) take sqrt(gamma) each, q^R all of
        gamma, and k^R (in kv_a) stays untouched, so that both parts of head h's logits scale by gamma = tau / max_logit
        and no other head's change.
        """
        gamma = (tau / max_logits.clamp(min=tau))[:, None, None]  # (n_head, 1, 1), exactly 1 within tau
        q_nope, q_rope = self.q_b.weight.view(self.n_head, self.nope + self.rope, -1).split([self.nope, self.rope], 1)
        k_nope = self.kv_b.weight.view(self.n_head, self.nope + self.v_dim, -1)[:, :self.nope]
        q_nope.mul_(gamma.sqrt())
        k_nope.mul_(gamma.sqrt())
        q_rope.mul_(gamma)


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
        experts = (scores + self.bias).topk(self.topk, dim=-1).indices
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
        counts = slot_expert.new_zeros(E).index_add_(0, slot_expert, torch.ones_like(slot_expert))  # (E,)
        weight, dropped = gates.flatten()[order], torch.zeros((), device=x.device)
        if self.training and self.capacity_factor > 0:  # evaluation and decoding stay dropless
            capacity = math.ceil(self.capacity_factor * tokens.size(0) * k / E)
            rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[slot_expert[order]]
            kept = rank < capacity  # a dropped slot adds nothing: the residual carries its token
            weight, dropped = weight * kept, 1 - kept.float().mean()
        token = order // k
        routed = self.experts(tokens[token], counts) * weight[:, None]  # (N * k, d) in expert order
        y = torch.zeros_like(tokens).index_add_(0, token, routed.type_as(tokens)).view(B, T, d)
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
        per_sequence = scores.new_zeros(B, E).scatter_add_(1, experts.view(B, T * k), scores.new_ones(B, T * k))
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
# block and model

MIXERS = {"mha": CausalSelfAttention, "mla": MLA}  # config.attention -> sequence mixer


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the config picks both for layer `layer`."""

    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = MIXERS[config.attention](config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config, layer) if config.is_moe_layer(layer) else SwiGLU(config)

    def forward(self, x, ctx, cache=None):
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        return x + self.mlp(self.mlp_norm(x), ctx)


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
        first = config.n_layer + (depth - 1) * config.mtp_blocks  # layer numbers go on past the main stack
        self.blocks = nn.ModuleList(Block(config, first + i) for i in range(config.mtp_blocks))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)  # before the shared output head

    def forward(self, h, emb, ctx):
        x = self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(emb)], dim=-1))  # (B, T, 2d) -> (B, T, d)
        for block in self.blocks:
            x = block(x, ctx)
        return x


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
        cos, sin = rope_tables(config.rope_dim, config.block_size, config.rope_theta)
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
            # left padding: row b starts at slot cache.pad[b]; its positions count from there
            pos = (cache_pos[None, :] - cache["pad"][:, None]).clamp(min=0)  # (B, T)
            slots = torch.arange(cache["max_len"], device=idx.device)
            visible = (slots[None, None, :] <= cache_pos[None, :, None]) & (slots[None, None, :] >= cache["pad"][:, None, None])
            ctx = Context(cos=self.cos[pos], sin=self.sin[pos], cache_pos=cache_pos, mask=visible.unsqueeze(1))
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache["layers"][i])
        h = x  # MTP's input: the last hidden state before the final norm
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None, ctx.aux
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if self.training and self.mtp:
            ctx.aux["mtp_loss"] = self.mtp_loss(h, idx, targets, ctx)
        extra = [ctx.aux[key] for key in ("moe_loss", "mtp_loss") if key in ctx.aux] if self.training else []
        if extra:
            ctx.aux["lm_loss"] = loss.detach()
            loss = loss + sum(extra)
        return logits, loss, ctx.aux

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
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets[:, k:].reshape(-1), ignore_index=-1)
            ctx.aux[f"mtp{k}/loss"] = loss.detach()
            total = total + loss
        return self.config.mtp_lambda / len(self.mtp) * total

    # -------------------------------------------------------------------------
    # decoding

    def new_cache(self, batch, max_len, dtype=None):
        """A static-shape cache for `batch` rows of up to `max_len` tokens (max_len <= block_size)."""
        assert max_len <= self.config.block_size
        device = self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        return {"layers": [block.attn.new_cache(batch, max_len, dtype, device) for block in self.blocks],
                "pad": torch.zeros(batch, dtype=torch.long, device=device), "max_len": max_len}

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, generator=None):
        """
        Sample continuations of a batch of prompts (lists of token ids of any lengths) with the KV cache.
        Prompts are left-padded so that every row's next token lands in the same cache slot. Yields a (B,)
        tensor of new tokens per step; a row that produced eos_id keeps yielding it, and generation stops
        once every row has. When the cache is full, it restarts from the most recent half of the context.
        """
        device, L = self.wte.weight.device, self.config.block_size
        lengths = torch.tensor([len(p) for p in prompts])
        assert 0 < lengths.min() and lengths.max() < L, "prompts must hold 1 to block_size - 1 tokens"
        history = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            history[row, history.size(1) - len(prompt):] = torch.as_tensor(prompt)
        history, pad = history.to(device), (history.size(1) - lengths).to(device)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None

        def prefill(tokens, pad):  # one forward over the whole context, filling a fresh cache
            cache = self.new_cache(tokens.size(0), L, dtype)
            cache["pad"] = pad
            return cache, self(tokens, cache=cache, cache_pos=torch.arange(tokens.size(1), device=device))[0][:, -1]

        cache, logits = prefill(history, pad)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = torch.where(done, eos_id, token)
                done |= token == eos_id
            yield token
            if eos_id is not None and done.all():
                return
            history = torch.cat([history, token[:, None]], dim=1)
            if history.size(1) > L:
                shift = history.size(1) - L // 2
                history, pad = history[:, shift:], (pad - shift).clamp(min=0)
                cache, logits = prefill(history, pad)
            else:
                slot = torch.tensor([history.size(1) - 1], device=device)
                logits = self(token[:, None], cache=cache, cache_pos=slot)[0][:, -1]

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
        """
        n = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.mtp.parameters())
        if not embedding:
            n -= self.wte.weight.numel() + (0 if self.config.tie_embeddings else self.lm_head.weight.numel())
        if active:
            routed, active_routed = self.routed_expert_weights(self.blocks)
            n -= routed - active_routed
        return n

    def routed_expert_weights(self, module):
        """The routed experts' weights in module: all of them, and the share one token goes through."""
        n = sum(p.numel() for m in module.modules() if isinstance(m, Experts) for p in m.parameters())
        return n, n // max(1, self.config.n_experts) * self.config.moe_topk

    def flops_per_token(self, seq_len=None):
        """
        Training FLOPs per token (forward + backward = 3 x forward): 2 per weight of every matmul a token goes
        through (the output head included, tied or not, once per MTP depth too; of the routed experts, moe_topk),
        plus causal attention, where the query at position t takes 2 * (query-key dims) FLOPs per key for q.k and
        2 * (value dims) for the weighted sum of values, over t + 1 keys: (T + 1) / 2 on average. MTP depth k runs
        on T - k positions, counted as T.
        """
        c, T = self.config, seq_len or self.config.block_size
        layers = [*self.blocks, *self.mtp]
        matmul = (sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)
                  + sum(self.routed_expert_weights(layer)[1] for layer in layers)
                  + (1 + c.mtp_depth) * self.lm_head.weight.numel())
        qk, v = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attention == "mla" else (c.head_dim,) * 2
        attention = (c.n_layer + c.mtp_depth * c.mtp_blocks) * 2 * c.n_head * (qk + v) * (T + 1) / 2
        return 3 * (2 * matmul + attention)

    def kv_cache_bytes_per_token(self, dtype_bytes=2):
        """
        Bytes the decode cache holds per token, all layers together, at dtype_bytes per number (2: bf16):
        2 * n_kv_head * head_dim numbers per layer for MHA, GQA and MQA; kv_lora_rank + qk_rope_head_dim for MLA.
        """
        caches = [block.attn.new_cache(1, 1, torch.float32, "meta") for block in self.blocks]
        return dtype_bytes * sum(t.numel() for cache in caches for t in cache.values())


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


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else top-k and nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probabilities add up to top_p (Holtzman et al. 2019)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
