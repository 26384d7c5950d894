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

The order below is bottom-up, as in nanoGPT: config, shared pieces, attention, feed-forward,
block, the model, decoding, accounting.
"""
import math
from dataclasses import dataclass, field, fields

import torch
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
    n_kv_head: int = 0          # key/value heads: 0 = n_head (MHA), 1 = MQA, a divisor of n_head = GQA
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2i/head_dim)
    qk_norm: bool = False       # RMSNorm on each query and key head before RoPE
    # feed-forward
    mlp_hidden: int = 0         # SwiGLU hidden width; 0 = 8/3 * n_embd rounded up to a multiple of 64
    # output
    tie_embeddings: bool = True  # the output head shares the token embedding matrix

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.mlp_hidden == 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        assert self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head"
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert (self.n_embd // self.n_head) % 2 == 0, "RoPE needs an even head dimension"

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


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

class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_head key/value heads (MHA, GQA, MQA), RoPE and optional QK-norm."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v come from one fused matrix: one big matmul is faster than three small ones
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout

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
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # decoding: write the new keys into their slots, attend over the whole static buffer under a mask
            cache["k"].index_copy_(2, ctx.cache_pos, k)
            cache["v"].index_copy_(2, ctx.cache_pos, v)
            y = F.scaled_dot_product_attention(q, cache["k"], cache["v"], attn_mask=ctx.mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * head_dim)
        return F.dropout(self.proj(y), self.dropout, self.training)


# -----------------------------------------------------------------------------
# feed-forward

class SwiGLU(nn.Module):
    """FFN(x) = W_down(SiLU(W_gate x) * W_up x), Shazeer 2020."""

    def __init__(self, config):
        super().__init__()
        self.hidden = config.mlp_hidden
        self.gate_up = nn.Linear(config.n_embd, 2 * self.hidden, bias=False)  # gate and up fused into one matmul
        self.down = nn.Linear(self.hidden, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return F.dropout(self.down(F.silu(gate) * up), self.dropout, self.training)


# -----------------------------------------------------------------------------
# block and model

class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, ctx, cache=None):
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        # matrices that write into the residual stream get a depth-scaled init (GPT-2 paper §2.3):
        # 2 * n_layer of them add up along the stream, so each gets std / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, cache_pos=None):
        """
        idx (B, T) token ids. Training: targets (B, T) with -1 where no loss is wanted.
        Decoding: cache from new_cache() and cache_pos (T,) the cache slots of these tokens.
        Returns logits (B, T, V) (only the last position when there are no targets), the mean loss
        (or None) and a dict of auxiliary losses and metrics that variants fill.
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
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None, ctx.aux
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, ctx.aux

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

    def num_params(self, embedding=True):
        """Parameter count; embedding=False leaves out the token embedding (and an untied output head)."""
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if not embedding:
            n -= self.wte.weight.numel() + (0 if self.config.tie_embeddings else self.lm_head.weight.numel())
        return n

    def flops_per_token(self, seq_len=None):
        """
        Training FLOPs per token (forward + backward = 3 x forward): 2 per weight of every matmul
        (the output head included, tied or not), plus causal attention, where the query at position t
        takes 2 * head_dim FLOPs per key for q.k and as many for the weighted sum of values, over t + 1
        keys: (T + 1) / 2 on average.
        """
        c, T = self.config, seq_len or self.config.block_size
        matmul = sum(p.numel() for p in self.blocks.parameters() if p.dim() == 2) + self.lm_head.weight.numel()
        attention = c.n_layer * 4 * c.n_head * c.head_dim * (T + 1) / 2
        return 3 * (2 * matmul + attention)


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
