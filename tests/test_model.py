"""The dense baseline: shapes, causality, KV-cache decoding, weight tying, gradients, learning, accounting."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ATTENTION, FAMILY_VARIANTS, VARIANTS
from decode import generate, sample_next
from kernel import cross_entropy
from model import Context, Engram, Experts, GPTConfig, HyperConnections, apply_rope, rope_tables
from optim import configure_optimizers


@pytest.mark.parametrize("variant", ATTENTION)
def test_shapes(tiny_model, variant):
    model = tiny_model(**ATTENTION[variant])
    idx = torch.randint(0, 64, (3, 20))
    logits, loss, aux = model(idx, idx)
    assert logits.shape == (3, 20, 64) and loss.shape == () and isinstance(aux, dict)
    logits, loss, _ = model(idx)
    assert logits.shape == (3, 1, 64) and loss is None  # inference returns the last position only
    assert model.blocks[0].attn.qkv.weight.shape[0] == (4 + 2 * model.config.n_kv_head) * 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(tiny_model, variant):
    model = tiny_model(**VARIANTS[variant]).eval()
    idx = torch.randint(0, 64, (2, 24))
    for j in (0, 7, 23):
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 1) % 64
        before, after = model(idx, idx)[0], model(changed, changed)[0]
        assert torch.allclose(before[:, :j], after[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(before[:, j:], after[:, j:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decode_equals_full_forward(tiny_model, variant):
    model = tiny_model(**VARIANTS[variant]).eval()
    idx = torch.randint(0, 64, (2, 20))
    full = model(idx, idx)[0]
    cache = model.new_cache(2, 32)
    prefill = model(idx[:, :12], cache=cache, cache_pos=torch.arange(12))[0]
    assert torch.allclose(prefill[:, -1], full[:, 11], atol=1e-5)
    for t in range(12, 20):
        step = model(idx[:, t:t + 1], cache=cache, cache_pos=torch.tensor([t]))[0]
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa", "engram"])  # Engram: left padding must not count as tokens in n-grams
def test_batched_left_padded_generation_equals_one_by_one(tiny_model, variant):
    model = tiny_model(**VARIANTS[variant]).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batched = torch.stack(list(generate(model, prompts, 10, temperature=0)), dim=1)
    for row, prompt in enumerate(prompts):
        alone = torch.stack(list(generate(model, [prompt], 10, temperature=0)), dim=1)
        assert torch.equal(batched[row], alone[0])


def test_greedy_generation_equals_argmax_of_full_forward_past_the_cache(tiny_model):
    model = tiny_model().eval()
    prompt = list(range(1, 21))
    tokens = list(prompt)
    for token in generate(model, [prompt], 30, temperature=0):  # 20 + 30 > block_size 32: the cache restarts
        tokens.append(token.item())
    assert len(tokens) == 50
    # before the cache fills, every token is the argmax of a full forward over the context so far
    for t in range(20, 31):
        assert model(torch.tensor([tokens[:t]]))[0][0, -1].argmax().item() == tokens[t]


def test_generation_stops_each_row_at_end_of_document(tiny_model):
    model = tiny_model().eval()
    first = [t.item() for t in generate(model, [[1, 2, 3]], 1, temperature=0)][0]
    steps = list(generate(model, [[1, 2, 3], [4, 5, 6, 7]], 20, temperature=0, eos_id=first))
    rows = torch.stack(steps, dim=1)
    assert (rows[0] == first).all()  # row 0 hit eos at once and keeps yielding it
    assert len(steps) <= 20


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).item() == 1
    assert all(sample_next(logits, 1.0, top_k=1, generator=generator).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.01, generator=generator).item() == 1 for _ in range(20))
    two = {sample_next(logits, 1.0, top_k=2, generator=generator).item() for _ in range(200)}
    assert two == {1, 2}
    # top_p = 0.8: softmax is [.08, .63, .23, .05], so tokens 1 and 2 (cumulative .86) are kept
    kept = {sample_next(logits, 1.0, top_p=0.8, generator=generator).item() for _ in range(300)}
    assert kept == {1, 2}


def test_tied_and_untied_embeddings(tiny_model):
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 64 * 32
    assert tied.num_params(embedding=False) == untied.num_params(embedding=False)


def test_gqa_equals_mha_with_duplicated_kv_heads(tiny_model):
    gqa, mha = tiny_model(n_kv_head=2).eval(), tiny_model(n_kv_head=4).eval()
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith("attn.qkv.weight"):
            q, k, v = w.split([32, 16, 16])
            # query head h reads kv head h // 2 (contiguous groups): repeat each kv head's 8 rows twice
            dup = lambda m: m.view(2, 1, 8, 32).expand(2, 2, 8, 32).reshape(32, 32)  # noqa: E731
            state[name] = torch.cat([q, dup(k), dup(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.allclose(gqa(idx, idx)[0], mha(idx, idx)[0], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(tiny_model, variant):
    model = tiny_model(**VARIANTS[variant])
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["gqa", *FAMILY_VARIANTS])
def test_loss_falls_on_a_tiny_corpus(tiny_model, variant):
    torch.manual_seed(0)
    model = tiny_model(**VARIANTS[variant])
    corpus = torch.tensor([i % 13 for i in range(400)])
    # torch's AdamW defaults, through optim.py: Engram tables have sparse gradients, which need its SparseAdam
    optimizer = configure_optimizers(model, learning_rate=3e-3, weight_decay=0.01, betas=(0.9, 0.999))
    losses = []
    for step in range(60):
        starts = torch.randint(0, len(corpus) - 33, (8,))
        batch = torch.stack([corpus[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.5 * losses[0]


def test_loss_ignores_minus_one_targets(tiny_model):
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 10))
    targets = idx.clone()
    targets[:, :5] = -1
    logits, loss, _ = model(idx, targets)
    manual = F.cross_entropy(logits[:, 5:].reshape(-1, 64), idx[:, 5:].reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-6)


def test_flops_per_token_equals_a_hand_count(tiny_model):
    model = tiny_model(n_kv_head=2, mlp_hidden=96)
    d, L, V, T, head_dim = 32, 2, 64, 32, 8
    attention_weights = d * (4 + 2 * 2) * head_dim + 4 * head_dim * d  # fused qkv + output projection
    mlp_weights = 3 * d * 96
    forward = 2 * (L * (attention_weights + mlp_weights) + d * V) + L * 4 * 4 * head_dim * (T + 1) / 2
    assert model.flops_per_token(T) == 3 * forward
    assert math.isclose(model.flops_per_token(T), 6 * (L * (attention_weights + mlp_weights) + d * V)
                        + 6 * L * d * (T + 1), rel_tol=1e-12)  # nanoGPT's 6N + 12·L·d·T/2 form
    scores = L * 4 * 4 * head_dim * (T + 1) / 2
    assert model.flops_breakdown(T) == {
        "attention projections": 3 * 2 * L * attention_weights, "attention scores": 3 * scores,
        "mlp": 3 * 2 * L * mlp_weights, "head": 3 * 2 * d * V, "moe": 0, "hyper-connections": 0, "engram": 0, "mtp": 0}


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_breakdown_misses_and_double_counts_nothing(tiny_model, variant):
    """The parts sum to a count over all the parameters at once: every matrix of the blocks and MTP modules (routed
    experts at moe_topk) but lookup tables (value embeddings), the head once plus once per MTP depth, HC and Engram by
    their own count."""
    with torch.device("meta"):  # shapes only
        model = tiny_model(**VARIANTS[variant])
    c, T = model.config, 32
    own = [m for m in model.modules() if isinstance(m, (HyperConnections, Engram))]
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    skip = {id(p) for m in own for p in m.parameters()} | {id(p) for p in tables}
    matrices = sum(p.numel() for p in [*model.blocks.parameters(), *model.mtp.parameters()]
                   if p.dim() == 2 and id(p) not in skip)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    heads = (1 + c.mtp_depth) * c.vocab_size * c.n_embd
    forward = (2 * (matrices + experts // max(1, c.n_experts) * c.moe_topk + heads)
               + sum(m.attention_flops(T) for m in model.modules() if hasattr(m, "attention_flops"))
               + sum(sum(m.flops().values()) for m in own))
    parts = model.flops_breakdown(T)
    assert sum(parts.values()) == model.flops_per_token(T) == 3 * forward
    present = {"moe": c.n_experts > 0, "mtp": c.mtp_depth > 0, "hyper-connections": c.residual != "standard",
               "engram": bool(c.engram_layer_list), "attention projections": True, "attention scores": True,
               "head": True}
    assert {part: parts[part] > 0 for part in present} == present


def test_cross_entropy_matches_torch_with_ignored_targets():
    logits = torch.randn(12, 50, requires_grad=True)
    targets = torch.randint(50, (12,))
    targets[[2, 7]] = -1
    ours = cross_entropy(logits, targets)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    reference = F.cross_entropy(logits, targets, ignore_index=-1)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.allclose(grad_ours, grad_reference, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only_and_keep_the_input_dtype():
    cos, sin = rope_tables(GPTConfig(block_size=12, n_embd=32, n_head=2))  # head_dim 16
    q, k = torch.randn(1, 1, 1, 16).expand(1, 12, 1, 16), torch.randn(1, 1, 1, 16).expand(1, 12, 1, 16)
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation
    scores = torch.einsum("bmhd,bnhd->mn", q_rot, k_rot)
    assert torch.allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-4)  # the same offset m - n, the same score
    assert not torch.allclose(scores[0, 0], scores[0, 5], atol=1e-3)
    # bf16 in, bf16 out, within bf16 rounding of the fp32 rotation
    x = torch.randn(2, 12, 3, 16)
    rotated = apply_rope(x.bfloat16(), cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.allclose(rotated.float(), apply_rope(x.bfloat16().float(), cos, sin), atol=0.05, rtol=0.02)


def test_relu2_mlp_is_its_formula_with_swiglus_weights_and_flops(tiny_model):
    """down(relu(up(x))^2) at 4 * n_embd: at n_embd 48 as many weights and FLOPs as SwiGLU's three matrices at 128."""
    relu2, swiglu = tiny_model(n_embd=48, mlp="relu2"), tiny_model(n_embd=48)
    mlp = relu2.blocks[0].mlp
    assert mlp.up.weight.shape == (192, 48) and mlp.down.weight.shape == (48, 192)
    x = torch.randn(2, 5, 48)
    assert torch.allclose(mlp(x), (x @ mlp.up.weight.T).clamp(min=0) ** 2 @ mlp.down.weight.T, atol=1e-6)
    assert relu2.num_params() == swiglu.num_params()
    assert relu2.flops_breakdown()["mlp"] == swiglu.flops_breakdown()["mlp"] == 3 * 2 * 2 * (2 * 48 * 192)


def test_logit_softcap_is_applied_on_every_path_as_a_hand_computed_reference(tiny_model):
    """c * tanh(logits / c) of the output head's own logits (caught by a hook), in the training loss, the MTP loss, the
    eval loss and logits (evaluate.py's bits per byte read them) and the speculative draft; decoding equals the full
    forward (the generic checks, variant softcap_mtp)."""
    c = 0.5
    model = tiny_model(logit_softcap=c, mtp_depth=1)
    with torch.no_grad():
        model.wte.weight.mul_(30)  # logits of a few units, where tanh bends
    heads = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: heads.append(output))
    cap = lambda logits: c * torch.tanh(logits / c)  # noqa: E731
    idx = torch.randint(0, 64, (2, 16))
    logits, loss, aux = model(idx, idx)
    main, mtp = heads  # the next token's head, then MTP depth 1's on positions 0..T-2
    assert main.abs().max() > 4 * c and logits.abs().max() <= c  # the cap binds
    assert torch.allclose(logits, cap(main), atol=1e-6)
    lm_loss = F.cross_entropy(cap(main).flatten(0, 1), idx.flatten())
    mtp_loss = F.cross_entropy(cap(mtp).flatten(0, 1), idx[:, 1:].flatten())
    assert torch.allclose(aux["lm_loss"], lm_loss, atol=1e-6) and torch.allclose(aux["mtp1/loss"], mtp_loss, atol=1e-6)
    assert torch.allclose(loss, lm_loss + 0.3 * mtp_loss, atol=1e-6)
    heads.clear()
    model.eval()
    logits, loss, _ = model(idx, idx)
    assert torch.allclose(logits, cap(heads[0]), atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(cap(heads[0]).flatten(0, 1), idx.flatten()), atol=1e-6)
    cache = model.new_cache(2, 32, mtp=True)
    h = model.hidden_states(idx, model.decode_context(cache, torch.arange(16)), cache)
    heads.clear()
    draft = model.mtp[0].draft(model, cache, h[:, :-1], idx[:, 1:], torch.arange(15))
    assert draft.shape == (2, 1, 64) and torch.allclose(draft, cap(heads[0]), atol=1e-6)


def values(attn, x):
    """CausalSelfAttention attn's own values of x (B, T, n_kv_head, head_dim), by hand."""
    return (x @ attn.qkv.weight.T).split(attn.qkv.weight.logical_rows, dim=-1)[2].view(*x.shape[:2], attn.n_kv_head, -1)


def attention_of_values(attn, x, v, cos, sin):
    """attn's causal softmax attention of x by hand, over the values v (B, T, n_kv_head, head_dim) given."""
    (B, T, _), H, G, D = x.shape, attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, _ = (x @ attn.qkv.weight.T).split(attn.qkv.weight.logical_rows, dim=-1)
    q, k = apply_rope(q.view(B, T, H, D), cos, sin), apply_rope(k.view(B, T, G, D), cos, sin)
    k, v = k.repeat_interleave(H // G, dim=2), v.repeat_interleave(H // G, dim=2)  # query head h reads kv head h // 2
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, H * D) @ attn.proj.weight.T


def test_value_embeds_add_a_table_of_their_own_to_the_values_as_a_hand_computed_attention(tiny_model):
    """Layer 1's attention is softmax attention over v + scale * ve[token] (GQA: kv head h // 2), layer 0 keeps its
    values; the table's parameters count, as embeddings, and its lookup costs no FLOPs. Decoding equals the forward,
    and spans and hybrid layers compose: the generic checks (variant value_embeds_gqa_sliding)."""
    model, base = tiny_model(value_embeds="1", n_kv_head=2), tiny_model(n_kv_head=2)
    attn = model.blocks[1].attn
    assert model.blocks[0].attn.value_embed is None and attn.value_embed.table.weight.shape == (64, 16)
    with torch.no_grad():
        attn.value_embed.scale.fill_(0.5)
    x, idx, cos, sin = torch.randn(2, 7, 32), torch.randint(0, 64, (2, 7)), model.cos[:7], model.sin[:7]
    y = attn(x, Context(cos=cos, sin=sin, idx=idx))
    v = values(attn, x) + 0.5 * attn.value_embed.table.weight[idx].view(2, 7, 2, 8)
    assert torch.allclose(y, attention_of_values(attn, x, v, cos, sin), atol=1e-5)
    assert model.num_params() == base.num_params() + 64 * 16 + 1  # the table and its scale
    assert model.num_params(embedding=False) == base.num_params(embedding=False) + 1
    assert model.flops_breakdown() == base.flops_breakdown()


def test_value_residual_mixes_the_first_layers_values_into_each_later_layers_as_a_hand_computed_attention(tiny_model):
    """Layer 0 attends over its own values and hands them on; layer 1 attends over a v + b v1 (GQA). Two gains per
    later layer, 0.5 each at init, and no FLOPs counted. Decoding equals the forward with value embeddings and a
    sliding layer beside it: the generic checks (variant value_residual_gqa_sliding)."""
    model, base = tiny_model(value_residual=True, n_kv_head=2), tiny_model(n_kv_head=2)
    first, second = model.blocks[0].attn, model.blocks[1].attn
    assert first.value_residual.mix is None and second.value_residual.mix.tolist() == [0.5, 0.5]
    with torch.no_grad():
        second.value_residual.mix.copy_(torch.tensor([0.3, 1.2]))
    x0, x1, cos, sin = torch.randn(2, 7, 32), torch.randn(2, 7, 32), model.cos[:7], model.sin[:7]
    ctx = Context(cos=cos, sin=sin)
    y0, y1 = first(x0, ctx), second(x1, ctx)
    assert torch.allclose(y0, attention_of_values(first, x0, values(first, x0), cos, sin), atol=1e-5)
    v = 0.3 * values(second, x1) + 1.2 * values(first, x0)
    assert torch.allclose(y1, attention_of_values(second, x1, v, cos, sin), atol=1e-5)
    assert model.num_params(embedding=False) == base.num_params(embedding=False) + 2 * (model.config.n_layer - 1)
    assert model.flops_breakdown() == base.flops_breakdown()


@pytest.mark.parametrize("n_layer, skipped", [(4, {2: 1, 3: 0}), (3, {2: 0})])
def test_unet_skips_feed_the_first_half_blocks_outputs_into_the_mirrored_last_half(tiny_model, n_layer, skipped):
    """Block i of the last n_layer // 2 reads the last block's output + gain * the output of block n_layer - 1 - i
    (the middle block of an odd depth none); with the gains at 0 the model computes what the model without them does."""
    model, base = tiny_model(unet_skips=True, n_layer=n_layer), tiny_model(n_layer=n_layer)
    idx = torch.randint(0, 64, (2, 9))
    assert all(torch.equal(p, base.state_dict()[name]) for name, p in model.state_dict().items() if "skip" not in name)
    with torch.no_grad():
        model.skip_gains.zero_()
        assert torch.equal(model(idx, idx)[0], base(idx, idx)[0])
        model.skip_gains.copy_(torch.tensor([0.5, -2.0][:n_layer // 2]))
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    model(idx, idx)
    for i in range(1, n_layer):
        gain = model.skip_gains[i - (n_layer - n_layer // 2)] if i in skipped else 0  # in the order they are used
        skip = seen[skipped[i]][1] if i in skipped else 0
        assert torch.allclose(seen[i][0], seen[i - 1][1] + gain * skip, atol=1e-6), i
    assert model.num_params() == base.num_params() + n_layer // 2


@pytest.mark.parametrize("residual", ["standard", "hc"])
def test_x0_mix_is_the_baseline_at_init_and_feeds_a_x_plus_b_x0_into_each_block(tiny_model, residual):
    """a = 1, b = 0: the same weights and logits as the model without it, bit for bit; hand-set a and b: block i reads
    a_i * (the last block's output) + b_i * x0, x0 the embedding in every stream (hc)."""
    streams = dict(residual=residual, hc_streams=2)
    model, base = tiny_model(x0_mix=True, **streams), tiny_model(**streams)
    idx = torch.randint(0, 64, (2, 9))
    assert all(torch.equal(p, base.state_dict()[name]) for name, p in model.state_dict().items() if "x0" not in name)
    assert torch.equal(model(idx, idx)[0], base(idx, idx)[0])
    with torch.no_grad():
        model.x0_a.copy_(torch.tensor([0.5, 2.0]))
        model.x0_b.copy_(torch.tensor([0.3, -1.0]))
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    model(idx, idx)
    (in0, out0), (in1, _) = seen
    x0 = model.wte(idx).unsqueeze(-2).expand(*in0.shape) if residual == "hc" else model.wte(idx)
    assert torch.allclose(in0, 0.5 * x0 + 0.3 * x0, atol=1e-6) and torch.allclose(in1, 2.0 * out0 - x0, atol=1e-6)


def test_zero_init_proj_zeroes_the_marked_weights_and_trains_every_parameter_from_the_second_step(tiny_model):
    """Every writes_residual weight (attention proj, MLP and experts' down, MTP's blocks') starts at zero, the rest
    as without the flag, so that parameters and FLOPs are the same and each block starts as the identity: the logits
    are the embedding's through the final norm and head. The first step's gradient reaches the zero matrices but
    nothing before them in a block; after one step, it reaches every parameter."""
    overrides = dict(mlp="relu2", n_experts=4, moe_topk=2, moe_hidden=16, moe_every=2, mtp_depth=1)
    model, base = tiny_model(zero_init_proj=True, **overrides), tiny_model(**overrides)
    marked = {name for name, p in model.named_parameters() if getattr(p, "writes_residual", False)}
    assert {"blocks.0.attn.proj.weight", "blocks.0.mlp.down.weight", "blocks.1.mlp.experts.down",
            "mtp.0.blocks.0.attn.proj.weight"} <= marked
    for name, p in model.state_dict().items():
        assert (p == 0).all() if name in marked else torch.equal(p, base.state_dict()[name]), name
    assert model.num_params() == base.num_params() and model.flops_breakdown() == base.flops_breakdown()
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx, idx)[0], model.logits(model.wte(idx)))
    model(idx, idx)[1].backward()
    assert model.blocks[0].attn.proj.weight.grad.abs().sum() > 0 and (model.blocks[0].attn.qkv.weight.grad == 0).all()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad,message", [
    (dict(mlp="gelu"), "unknown mlp 'gelu' \\(choose swiglu, relu2\\)"),
    (dict(logit_softcap=-1.0), "logit_softcap must be 0 \\(off\\) or positive"),
    (dict(n_layer=2, value_embeds="0,2"), "value_embeds must be layers within 0..n_layer-1"),
    (dict(value_embeds="0,x"), "value_embeds must be comma-separated integers"),
    (dict(value_embeds="0", attention="mla"), "value_embeds needs softmax attention='mha' layers"),
    (dict(value_embeds="1", attn_pattern="GL"), "value_embeds needs softmax attention='mha' layers"),
    (dict(value_residual=True, attn_pattern="GL"), "value_residual needs softmax attention='mha' in every layer"),
    (dict(value_residual=True, attention="mla"), "value_residual needs softmax attention='mha' in every layer"),
    (dict(n_experts=4, moe_topk=5), "moe_topk must be within 1..n_experts"),
    (dict(n_experts=4, moe_every=0), "moe_every must be >= 1"),
    (dict(n_experts=4, moe_first_dense=-1), "moe_first_dense >= 0"),
    (dict(n_experts=4, moe_groups=3), "moe_groups must divide n_experts"),
    (dict(n_layer=0), "n_layer=0 must be 1 or more"), (dict(n_head=0), "n_head=0 must be 1 or more"),
    (dict(block_size=0), "block_size=0 must be 1 or more"), (dict(head_dim=-8), "head_dim=-8 must be 0 or more"),
    (dict(mtp_depth=-1), "mtp_depth must be 0 or more"), (dict(mtp_blocks=0), "mtp_blocks 1 or more"),
    (dict(attention="mla", qkv_bias=True), "MLA has no q, k, v projections to bias"),
    # flags another flag would silently ignore, and a division by zero
    (dict(attention="mla", n_kv_head=2), "n_kv_head needs attention='mha'"),
    (dict(n_experts=8, moe_topk_groups=2), "moe_groups must divide n_experts"),
    (dict(n_experts=8, moe_groups=0), "moe_groups must divide n_experts"),
    (dict(rope_scaling="llama3", rope_factor=8.0, rope_original_len=8, yarn_mscale=0.7), "set rope_scaling='yarn'"),
])
def test_bad_configs_fail_with_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**bad)
