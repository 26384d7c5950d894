"""
The attention family: spans (sliding, block-sparse, MoBA) on every projection, gates, linear attention, hybrid
patterns. The generic checks (causality, decoding equals the full forward, gradients, learning) also run in
test_model.py over conftest.FAMILY_VARIANTS; here every projection x span pair gets causality and decoding, and
each variant its own invariants.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import kernel
from conftest import ROOT, run_stage
from decode import generate
from kernel import (gated_delta_rule_chunked, grouped_attention, linear_attention_chunked, max_attention_logits,
                    pair_block_mask)
from model import (GPT, Context, GPTConfig, MoBASpan, SlidingSpan, BlockSparseSpan, GatedDeltaNet, LinearAttention,
                   gated_delta_rule_recurrent, linear_attention_recurrent)
from optim import QKClip, configure_optimizers

PROJECTIONS = {"mha": dict(), "gqa": dict(n_kv_head=2, qk_norm=True),
               "mla": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4)}
SPANS = {"full": dict(), "sliding": dict(attn_span="sliding", window=5),  # prompts of 12 > window: the cache rolls
         "sparse": dict(attn_span="sparse", sparse_block=4, sparse_local=2, sparse_stride=3),
         "moba": dict(attn_span="moba", moba_block=4, moba_topk=2)}
PAIRS = [(p, s) for p in PROJECTIONS for s in SPANS]


def logits_of(model, idx):
    return model(idx, idx)[0]


@pytest.mark.parametrize("projection,span", PAIRS)
def test_every_projection_with_every_span_is_causal_and_decodes_like_the_full_forward(tiny_model, projection, span):
    model = tiny_model(**PROJECTIONS[projection], **SPANS[span]).eval()
    idx = torch.randint(0, 64, (2, 24))
    full = logits_of(model, idx)
    for j in (5, 17):
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 1) % 64
        after = logits_of(model, changed)
        assert torch.allclose(full[:, :j], after[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(full[:, j:], after[:, j:])
    # a chunked prefill (two chunks, the second longer than the window), then one token at a time
    cache = model.new_cache(2, 32)
    first = model(idx[:, :3], cache=cache, cache_pos=torch.arange(3))[0]
    second = model(idx[:, 3:12], cache=cache, cache_pos=torch.arange(3, 12))[0]
    steps = [first[:, -1], second[:, -1]]
    steps += [model(idx[:, t:t + 1], cache=cache, cache_pos=torch.tensor([t]))[0][:, 0] for t in range(12, 24)]
    assert torch.allclose(torch.stack(steps, dim=1), full[:, [2, *range(11, 24)]], atol=1e-5)


@pytest.mark.parametrize("variant", ["sliding", "sparse", "moba", "linear", "gated_deltanet", "hybrid"])
def test_left_padded_batch_generates_like_each_prompt_alone(tiny_model, variant):
    config = {**SPANS, "linear": dict(attention="linear", linear_chunk=4),
              "gated_deltanet": dict(attention="linear", linear_kind="gated_deltanet", linear_chunk=4),
              "hybrid": dict(attn_pattern="LM", moba_block=4, moba_topk=2)}[variant]
    model = tiny_model(**config).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]
    batched = torch.stack(list(generate(model, prompts, 12, temperature=0)), dim=1)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], torch.stack(list(generate(model, [prompt], 12, temperature=0)), dim=1)[0])


# -----------------------------------------------------------------------------
# spans that reduce to full attention, masks, FLOPs, FlexAttention

@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("span", [dict(attn_span="sliding", window=24),  # window >= T
                                  dict(attn_span="moba", moba_block=4, moba_topk=6),  # topk covers all 6 blocks
                                  dict(attn_span="moba", moba_block=32, moba_topk=1),  # one block holds T
                                  dict(attn_span="sparse", sparse_block=4, sparse_local=6),  # every block local
                                  dict(attn_span="sparse", sparse_block=4, sparse_local=1, sparse_stride=1)])  # global
def test_spans_that_cover_every_past_key_equal_full_attention(tiny_model, projection, span):
    full, spanned = tiny_model(**PROJECTIONS[projection]).eval(), tiny_model(**PROJECTIONS[projection], **span).eval()
    spanned.load_state_dict(full.state_dict())  # spans have no weights
    idx = torch.randint(0, 64, (2, 24))
    assert torch.allclose(logits_of(full, idx), logits_of(spanned, idx), atol=1e-5)


def test_static_masks_match_a_brute_force_pattern_and_the_flops_count():
    config = GPTConfig(block_size=64, n_head=4, n_embd=32, window=7, sparse_block=4, sparse_local=2, sparse_stride=3)
    q = torch.zeros(1, 4, 30, 8)
    for span in (SlidingSpan(config), BlockSparseSpan(config)):
        mask = span.logit_mask(q, q)
        if isinstance(span, SlidingSpan):
            expected = [[0 <= i - j < 7 for j in range(30)] for i in range(30)]
        else:
            expected = [[j <= i and (i // 4 - j // 4 < 2 or (j // 4) % 3 == 0) for j in range(30)] for i in range(30)]
        assert mask.tolist() == expected
        assert span.keys_per_query(30) * 30 == mask.sum().item()  # FLOPs count only the attended keys


def test_moba_sees_its_own_block_causally_and_the_best_scored_earlier_blocks():
    config = GPTConfig(block_size=64, n_head=2, n_embd=16, n_kv_head=1, moba_block=4, moba_topk=3)
    span, T = MoBASpan(config), 22
    q, k = torch.randn(1, 2, T, 8), torch.randn(1, 1, T, 8)
    mask = span.logit_mask(q, k)  # (1, 2, T, T)
    means = k[0, 0, :20].view(5, 4, 8).mean(dim=1)  # the complete blocks' mean keys
    for h in range(2):
        for t in range(T):
            own = t // 4
            best = sorted(range(own), key=lambda b: -(q[0, h, t] @ means[b]).item())[:2]
            expected = [j <= t and (j // 4 == own or j // 4 in best) for j in range(T)]
            assert mask[0, h, t].tolist() == expected, (h, t)
    assert span.keys_per_query(T) * T * 2 == mask.sum().item()


@pytest.mark.parametrize("mask_shape", [(7, 9), (2, 1, 7, 9), (2, 6, 7, 9)])
def test_grouped_attention_equals_sdpa_with_gqa(mask_shape):
    """The masked path of fewer key heads (decoding GQA and MLA's absorbed form) against SDPA's enable_gqa."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 7, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 12)
    mask = (torch.rand(*mask_shape) < 0.7) | (torch.arange(9) == 0)
    mask[..., 3, :] = False  # a query that sees nothing (left padding): zeros
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(grouped_attention(q, k, v, mask, 0.3), expected, atol=1e-5)


@pytest.mark.parametrize("span", [dict(attn_span="sliding", window=5),
                                  dict(attn_span="sparse", sparse_block=4, sparse_local=2, sparse_stride=3),
                                  dict(attn_span="moba", moba_block=4, moba_topk=2)])
def test_flex_attention_path_equals_the_masked_sdpa_path(tiny_model, span):
    # FlexAttention is the CUDA path; eager FlexAttention runs (forward only) on the CPU too
    model = tiny_model(n_kv_head=2, **span).eval()
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        sdpa = logits_of(model, idx)
        for block in model.blocks:
            block.attn.span.use_flex = True
        assert torch.allclose(logits_of(model, idx), sdpa, atol=1e-5)


def dense_flex(q, k, v, block_mask, scale, return_lse=False):
    """FlexAttention's result computed densely from the BlockMask's mask_mod, with autograd (CPU FlexAttention has no
    backward): softmax over the allowed keys, and each query's log-sum-exp (-inf and a zero output where none is)."""
    B, H, L, d = q.shape
    k, v = (t.repeat_interleave(H // t.size(1), dim=1) for t in (k, v))
    allowed = block_mask.mask_mod(torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None],
                                  torch.arange(L)[None, None, :, None], torch.arange(k.size(2))[None, None, None, :])
    scores = (q @ k.mT * (scale or d ** -0.5)).masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    y = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0) @ v
    return (y, lse) if return_lse else y


@pytest.mark.parametrize("T, block, topk", [(150, 16, 3), (257, 64, 4), (130, 8, 2), (300, 128, 3), (1100, 256, 3)])
def test_moba_by_block_equals_the_masked_softmax_in_value_and_gradient(monkeypatch, T, block, topk):
    """The FlexAttention path: own block, then the chosen blocks apart, merged by log-sum-exp (FlexAttention's
    kernel replaced by a dense stand-in, to have gradients on the CPU); its tiles cover every pair's block."""
    monkeypatch.setattr(kernel, "flex", dense_flex)
    span = MoBASpan(GPTConfig(block_size=1024, n_head=4, n_kv_head=2, n_embd=64, moba_block=block, moba_topk=topk))
    inputs = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    results = []
    for flex in (False, True):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        span.use_flex = flex
        y = span.attend(q, k, v, None)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, q.grad, k.grad, v.grad))
    for masked, by_block in zip(*results):
        assert torch.allclose(masked, by_block, atol=1e-5)
    # the BlockMask of the sorted (query, block) pairs visits every tile of 128 x 128 holding an allowed pair and key
    pos = torch.arange(T)[None]
    top, real = span.past_blocks(*inputs[:2], pos, pos)
    blocks = torch.where(real, top, -1).flatten(2)
    blocks = blocks.gather(-1, blocks.argsort(dim=-1, stable=True))
    visited = pair_block_mask(blocks, T, block).to_dense().bool()  # (B, H, pair tiles, key tiles)
    allowed = F.pad(torch.arange(T) // block == blocks[..., None], (0, (-T) % 128, 0, (-blocks.size(-1)) % 128))
    needed = allowed.unflatten(2, (-1, 128)).unflatten(4, (-1, 128)).any(dim=(3, 5))
    assert (visited == needed).all()  # and nothing more: pairs sorted by block touch few tiles
    # the tiles marked full, where FlexAttention's kernel skips the mask_mod, allow every pair and key in them
    mask = pair_block_mask(blocks, T, block)
    lengths = {"seq_lengths": mask.seq_lengths} if hasattr(mask, "seq_lengths") else {}  # torch >= 2.6
    full = torch.nn.attention.flex_attention.BlockMask.from_kv_blocks(
        mask.full_kv_num_blocks, mask.full_kv_indices, BLOCK_SIZE=128, **lengths).to_dense().bool()
    assert (full <= allowed.unflatten(2, (-1, 128)).unflatten(4, (-1, 128)).all(dim=(3, 5))).all()
    assert full.any() == (block % 128 == 0)  # blocks of whole key tiles have full tiles
    # the backward's side, each key tile's pair tiles, is the transpose of the forward's, partial and full apart
    reference = torch.nn.attention.flex_attention.BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, BLOCK_SIZE=128, **lengths)
    for name in ("q", "full_q"):
        ours, theirs = ((getattr(m, f"{name}_num_blocks"), getattr(m, f"{name}_indices")) for m in (mask, reference))
        assert torch.equal(tiles_of(*ours), tiles_of(*theirs)), name


def tiles_of(count, indices):
    """The dense map (..., rows, tiles) of a BlockMask side: count (..., rows) tiles each, listed in indices."""
    listed = torch.where(torch.arange(indices.size(-1)) < count[..., None], indices.long(), indices.size(-1))
    return torch.zeros(*indices.shape[:-1], indices.size(-1) + 1).scatter_(-1, listed, 1.0)[..., :-1]


def test_flops_per_token_count_only_the_attended_positions(tiny_model):
    T, n_head, head_dim = 32, 4, 8
    full, sliding = tiny_model(), tiny_model(attn_span="sliding", window=4)
    keys = (4 * 5 / 2 + 28 * 4) / 32  # min(t + 1, 4) keys at position t
    per_key = 2 * n_head * 2 * head_dim  # q.k and the weighted value, per head
    assert full.flops_per_token(T) - sliding.flops_per_token(T) == 3 * 2 * per_key * ((T + 1) / 2 - keys)  # 2 layers
    assert tiny_model(attn_span="sliding", window=32).flops_per_token(T) == full.flops_per_token(T)


# -----------------------------------------------------------------------------
# decode memory

def test_sliding_cache_is_a_rolling_window_and_linear_state_does_not_grow(tiny_model):
    full, sliding = tiny_model(block_size=256), tiny_model(block_size=256, attn_span="sliding", window=16)
    linear = tiny_model(block_size=256, attn_pattern="L", linear_kind="gated_deltanet")
    hybrid = tiny_model(block_size=256, attn_pattern="LS", linear_kind="gated_deltanet", window=16)
    per_layer_token = 2 * 4 * 8 * 2  # k and v, 4 heads of 8, bf16
    for context in (16, 64, 256):
        assert full.kv_cache_bytes(context) == 2 * context * per_layer_token
        assert sliding.kv_cache_bytes(context) == 2 * 16 * per_layer_token
        assert linear.kv_cache_bytes(context) == 2 * (4 * 8 * 8 * 4 + 3 * 32 * 3 * 2)  # fp32 state + conv inputs
        assert hybrid.kv_cache_bytes(context) == linear.kv_cache_bytes(context) / 2 + 16 * per_layer_token
    cache = sliding.new_cache(1, 256)
    assert cache["layers"][0]["k"].shape == (1, 4, 16, 8)


# -----------------------------------------------------------------------------
# gates

@pytest.mark.parametrize("base", [dict(), dict(n_kv_head=2), PROJECTIONS["mla"]])
@pytest.mark.parametrize("gate_at", ["output", "value"])
def test_gate_at_initialization_halves_the_attention_output(tiny_model, base, gate_at):
    if base.get("attention") == "mla" and gate_at == "value":
        with pytest.raises(ValueError, match="attn_gate_at='value' needs attention='mha'"):
            GPTConfig(attn_gate="headwise", attn_gate_at="value", **base)
        return
    plain = tiny_model(**base).eval()
    x, ctx = torch.randn(2, 10, 32), Context(cos=plain.cos[:10], sin=plain.sin[:10])
    heads = plain.config.n_kv_head if gate_at == "value" else 4  # the gate's heads: the values' or the outputs'
    for gate, rows in (("headwise", heads), ("elementwise", heads * 8)):
        gated = tiny_model(**base, attn_gate=gate, attn_gate_at=gate_at).eval()
        gated.load_state_dict(plain.state_dict(), strict=False)  # the same weights, plus the gate's
        attn = gated.blocks[0].attn
        assert attn.gate.proj.weight.shape == (rows, 32)
        # the documented initialization: W ~ N(0, 0.02), so the gate is sigmoid(~0), close to 0.5 everywhere
        assert (torch.sigmoid(attn.gate.proj(x)) - 0.5).abs().max() < 0.1
        with torch.no_grad():
            attn.gate.proj.weight.zero_()  # exactly 0.5: the attention output (linear in the values) halves
            assert torch.allclose(attn(x, ctx), 0.5 * plain.blocks[0].attn(x, ctx), atol=1e-6)


def test_headwise_gate_equals_elementwise_gate_with_values_tied_per_head(tiny_model):
    headwise, elementwise = tiny_model(attn_gate="headwise").eval(), tiny_model(attn_gate="elementwise").eval()
    state = headwise.state_dict()
    for name in list(state):
        if name.endswith("gate.proj.weight"):
            state[name] = state[name].repeat_interleave(8, dim=0)  # each head's row, once per channel of the head
    elementwise.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.allclose(logits_of(headwise, idx), logits_of(elementwise, idx), atol=1e-6)


# -----------------------------------------------------------------------------
# linear attention

def test_linear_attention_chunked_equals_recurrent_equals_the_naive_quadratic_form():
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 37, 5  # T not a multiple of the chunk
    q, k = torch.rand(B, H, T, d), torch.rand(B, H, T, d)  # positive features
    v, state = torch.randn(B, H, T, d + 1), torch.randn(B, H, d, d + 1)
    chunked, chunked_state = linear_attention_chunked(q, k, v, state, chunk=8)
    recurrent, recurrent_state = linear_attention_recurrent(q, k, v, state)
    naive = q @ state + ((q @ k.mT) * torch.ones(T, T).tril()) @ v
    assert torch.allclose(chunked, naive, atol=1e-4) and torch.allclose(recurrent, naive, atol=1e-4)
    assert torch.allclose(chunked_state, state + k.mT @ v, atol=1e-4)
    assert torch.allclose(recurrent_state, chunked_state, atol=1e-4)


def gated_delta_inputs(dtype, B=2, H=3, T=37):
    torch.manual_seed(0)
    d_k, d_v = 4, 5
    q = torch.nn.functional.normalize(torch.randn(B, H, T, d_k, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, d_k, dtype=dtype), dim=-1)
    v, beta = torch.randn(B, H, T, d_v, dtype=dtype), torch.rand(B, H, T, dtype=dtype)
    g = -torch.rand(B, H, T, dtype=dtype) * 0.5
    return q, k, v, beta, g, torch.randn(B, H, d_k, d_v, dtype=dtype)


def test_gated_delta_rule_chunked_equals_recurrent_equals_the_naive_rule():
    q, k, v, beta, g, state = gated_delta_inputs(torch.float32)
    chunked, chunked_state = gated_delta_rule_chunked(q, k, v, beta, g, state, chunk=8)
    recurrent, recurrent_state = gated_delta_rule_recurrent(q, k, v, beta, g, state)
    S, naive = state.clone(), []
    for t in range(q.size(2)):  # S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t
        kt = k[:, :, t, :, None]
        S = g[:, :, t, None, None].exp() * (S - beta[:, :, t, None, None] * kt @ (kt.mT @ S))
        S = S + beta[:, :, t, None, None] * kt @ v[:, :, t, None, :]
        naive.append((q[:, :, t, None, :] @ S)[:, :, 0])
    naive = torch.stack(naive, dim=2)
    assert torch.allclose(recurrent, naive, atol=1e-5) and torch.allclose(recurrent_state, S, atol=1e-5)
    assert torch.allclose(chunked, naive, atol=1e-4) and torch.allclose(chunked_state, S, atol=1e-4)


def test_gated_delta_rule_chunked_gradients_pass_gradcheck():
    inputs = [t.requires_grad_() for t in gated_delta_inputs(torch.float64, B=1, H=1, T=6)]
    assert torch.autograd.gradcheck(lambda *args: gated_delta_rule_chunked(*args, chunk=4), inputs)


@pytest.mark.parametrize("kind", ["elu", "gated_deltanet"])
def test_linear_layers_decode_with_a_state_and_take_no_span(tiny_model, kind):
    model = tiny_model(attention="linear", linear_kind=kind)
    assert all(isinstance(b.attn, {"elu": LinearAttention, "gated_deltanet": GatedDeltaNet}[kind])
               for b in model.blocks)
    assert not any("k" in layer for layer in model.new_cache(1, 32)["layers"])
    with pytest.raises(ValueError, match="linear attention has no span"):
        GPTConfig(attention="linear", attn_span="sliding")


# -----------------------------------------------------------------------------
# hybrids, QK-Clip, configuration

def test_attn_pattern_picks_each_layers_mixer_repeated_over_depth(tiny_model):
    gemma = tiny_model(n_layer=8, attn_pattern="SSSG", window=4)
    assert [type(b.attn.span).__name__ for b in gemma.blocks] == ["SlidingSpan"] * 3 + ["FullSpan"] + \
        ["SlidingSpan"] * 3 + ["FullSpan"]
    qwen = tiny_model(n_layer=4, attn_pattern="LLLG", linear_kind="gated_deltanet", attention="mla",
                      kv_lora_rank=16, qk_rope_head_dim=4, attn_gate="elementwise")
    assert [type(b.attn).__name__ for b in qwen.blocks] == ["GatedDeltaNet"] * 3 + ["MLA"]
    every = tiny_model(n_layer=5, attn_pattern="GSBML", mtp_depth=1)  # MTP's block continues the pattern: G
    assert [type(getattr(b.attn, "span", b.attn)).__name__ for b in [*every.blocks, *every.mtp[0].blocks]] == \
        ["FullSpan", "SlidingSpan", "BlockSparseSpan", "MoBASpan", "LinearAttention", "FullSpan"]


def test_qk_clip_measures_the_logits_each_span_sees_and_skips_linear_layers(tiny_model):
    model = tiny_model(attn_pattern="ML", moba_block=4, moba_topk=2)
    qk_clip = QKClip(model, tau=100.0)
    assert len(qk_clip.layers) == 1  # the MoBA layer; the linear layer has no logits
    qk_clip.track(True)
    idx = torch.randint(0, 64, (2, 16))
    qk_clip.observe(model(idx, idx)[2])
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    mask = model.blocks[0].attn.span.logit_mask(q, k)
    logits = (q @ k.repeat_interleave(2, dim=1).mT / 8 ** 0.5).masked_fill(~mask, float("-inf"))
    assert torch.allclose(max_attention_logits(q, k, mask), logits.amax(dim=(0, 2, 3)))
    assert (max_attention_logits(q, k, mask) <= max_attention_logits(q, k)).all()  # a subset of the causal logits


@pytest.mark.parametrize("bad,message", [
    (dict(attn_span="local"), "unknown attn_span 'local'"),
    (dict(attn_pattern="SSXG"), "attn_pattern letters"),
    (dict(attention="linear", attn_pattern="LG"), "linear attention has no span"),
    (dict(attn_gate="channel"), "unknown attn_gate 'channel'"),
    (dict(linear_kind="retnet"), "unknown linear_kind 'retnet'"),
    (dict(attn_span="sliding", window=0), "must be 1 or more"),
    (dict(attn_span="moba", dropout=0.1), "FlexAttention has no attention dropout"),
    # softmax layers' flags on a model without any: ignored, not computed
    (dict(attention="linear", attn_gate="elementwise"), "act on softmax layers"),
    (dict(attention="linear", linear_kind="gated_deltanet", qk_norm=True), "act on softmax layers"),
    (dict(attn_pattern="L", qkv_bias=True), "act on softmax layers"),
])
def test_bad_attention_configs_fail_with_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**bad)


def test_hybrid_small_config_builds_a_valid_model(monkeypatch):
    monkeypatch.chdir(ROOT)  # config files exec their base config by a relative path
    namespace = {}
    exec(open(os.path.join("config", "hybrid_small.py")).read(), namespace)
    config = GPTConfig(**{k: v for k, v in namespace.items() if k in GPTConfig.__dataclass_fields__})
    with torch.device("meta"):
        model = GPT(config)
    assert [type(b.attn).__name__ for b in model.blocks] == ["GatedDeltaNet"] * 3 + ["CausalSelfAttention"] + \
        ["GatedDeltaNet"] * 3 + ["CausalSelfAttention"]


def test_bench_decodes_at_a_long_context_and_reports_cache_memory(tmp_path):
    out = tmp_path / "bench.json"
    run_stage("bench.py", "--device=cpu", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=64",
              "--vocab_size=64", "--batch_size=1", "--steps=1", "--repeats=1", "--warmup=1", "--attn_pattern=SL",
              "--window=8", "--decode_context=48", "--decode_tokens=8", f"--json_out={out}")
    row = json.loads(out.read_text())["rows"]["ours"]
    # the sliding layer keeps 8 slots of k and v (2 heads of 16, fp32) and their positions (int64), the linear
    # layer its state (2 heads x 16 x 17, fp32)
    assert row["decode_tokens_per_s"] > 0
    assert row["cache_gib"] * 2**30 == 8 * 2 * 2 * 16 * 4 + 8 * 8 + 2 * 16 * 17 * 4


def test_muon_leaves_the_depthwise_convolution_to_adamw(tiny_model):
    model = tiny_model(attention="linear", linear_kind="gated_deltanet")
    in_adamw = [p for group in configure_optimizers(model, "muon").adamw.param_groups for p in group["params"]]
    assert all(any(p is b.attn.conv for p in in_adamw) for b in model.blocks)
