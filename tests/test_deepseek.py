"""
The DeepSeek family: MLA, MoE and MTP invariants, accounting and the configs. The generic checks (causality,
decoding equals the full forward, gradients, learning) run in test_model.py over conftest.FAMILY_VARIANTS.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, read_log, run_stage
from decode import generate
from model import GPT, Context, GPTConfig, Router, apply_rope, config_fields, update_router_biases

MLA = dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4)  # head_dim 8: nope 8, v 8
NO_POSITIONS = Context(cos=None, sin=None)  # what a feed-forward layer is given


# -----------------------------------------------------------------------------
# MLA

def test_mla_absorbed_decode_equals_expanded_decode_and_full_forward(tiny_model):
    model = tiny_model(**MLA).eval()
    idx = torch.randint(0, 64, (2, 20))
    full = model(idx, idx)[0]
    for absorb in (True, False):
        for block in model.blocks:
            block.attn.absorb = absorb
        cache = model.new_cache(2, 32)
        steps = [model(idx[:, :12], cache=cache, cache_pos=torch.arange(12))[0][:, -1]]
        steps += [model(idx[:, t:t + 1], cache=cache, cache_pos=torch.tensor([t]))[0][:, 0] for t in range(12, 20)]
        assert torch.allclose(torch.stack(steps, dim=1), full[:, 11:], atol=1e-5), absorb
    # left-padded rows: the absorbed form masks the padding like the expanded one
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    batched = torch.stack(list(generate(model, prompts, 6, temperature=0)), dim=1)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], torch.stack(list(generate(model, [prompt], 6, temperature=0)), dim=1)[0])


def test_mla_cache_holds_exactly_the_latent_and_the_rotary_key(tiny_model):
    model = tiny_model(**MLA).eval()
    cache = model.new_cache(2, 32)
    assert [{name: tuple(t.shape) for name, t in layer.items()} for layer in cache["layers"]] == \
        [{"latent": (2, 32, 16), "k_rope": (2, 32, 4)}] * 2
    attn, inputs = model.blocks[1].attn, []
    attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    model(torch.randint(0, 64, (2, 10)), cache=cache, cache_pos=torch.arange(10))
    latent, k_rope = attn.kv_a(inputs[0]).split([16, 4], dim=-1)
    cached = cache["layers"][1]
    assert torch.allclose(cached["latent"][:, :10], attn.kv_norm(latent), atol=1e-6)  # normalized
    rotated = apply_rope(k_rope[:, :, None], model.cos[:10], model.sin[:10])[:, :, 0]
    assert torch.allclose(cached["k_rope"][:, :10], rotated, atol=1e-6)
    assert not cached["latent"][:, 10:].any() and not cached["k_rope"][:, 10:].any()
    # bytes per token in bf16: MLA 2 layers x (16 + 4); MHA 2 layers x k and v x 4 heads x 8; MQA 1 head
    assert model.kv_cache_bytes(1) == 2 * 2 * 20
    assert tiny_model().kv_cache_bytes(1) == 2 * 2 * 2 * 4 * 8
    assert tiny_model(n_kv_head=1).kv_cache_bytes(1, torch.float32) == 4 * 2 * 2 * 1 * 8


def mla_logit_parts(attn, x, cos, sin):
    """Each head's pre-softmax logits (B, n_head, T, T), unscaled, as q^C.k^C and q^R.k^R, computed by hand."""
    B, T, _ = x.shape
    q_nope, q_rope = attn.q_b(attn.q_a(x)).view(B, T, attn.n_head, -1).split([attn.nope, attn.rope], dim=-1)
    latent, k_rope = attn.kv_a(x).split([attn.rank, attn.rope], dim=-1)
    k_nope = attn.kv_b(attn.kv_norm(latent)).view(B, T, attn.n_head, -1)[..., :attn.nope]
    k_rope = apply_rope(k_rope[:, :, None], cos, sin).expand(B, T, attn.n_head, attn.rope)  # one key for all heads
    return (torch.einsum("bthd,bshd->bhts", q_nope, k_nope),
            torch.einsum("bthd,bshd->bhts", apply_rope(q_rope, cos, sin), k_rope))


def test_mla_qk_clip_scales_each_part_of_only_the_clipped_heads_logits(tiny_model):
    model = tiny_model(**MLA)
    attn, x = model.blocks[0].attn, torch.randn(2, 12, 32)
    cos, sin = model.cos[:12], model.sin[:12]
    attn.track_max_logits = True
    ctx = Context(cos=cos, sin=sin)
    attn(x, ctx)
    nope, rope = mla_logit_parts(attn, x, cos, sin)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    by_hand = ((nope + rope) * attn.scale).masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3))
    assert torch.allclose(ctx.aux["max_logits"][0], by_hand, rtol=1e-5)
    tau = by_hand[1].item()
    gamma = (tau / by_hand).clamp(max=1.0)
    attn.qk_clip(by_hand, tau)
    nope_after, rope_after = mla_logit_parts(attn, x, cos, sin)
    for head in range(4):
        if gamma[head] < 1:
            assert torch.allclose(nope_after[:, head], gamma[head] * nope[:, head], rtol=1e-4, atol=1e-6)
            assert torch.allclose(rope_after[:, head], gamma[head] * rope[:, head], rtol=1e-4, atol=1e-6)
        else:  # untouched
            assert torch.equal(nope_after[:, head], nope[:, head]) and torch.equal(rope_after[:, head], rope[:, head])
    assert (gamma < 1).any() and (gamma == 1).any()


# -----------------------------------------------------------------------------
# MoE

def moe_layer(tiny_model, **overrides):
    """The MoE feed-forward of a tiny model's first layer, and the model (update_router_biases' argument)."""
    model = tiny_model(**{"n_experts": 4, "moe_topk": 2, "moe_hidden": 16, **overrides})
    return model.blocks[0].mlp, model


def test_router_choices_and_gates_equal_a_hand_computation():
    def router(**overrides):
        r = Router(GPTConfig(n_embd=4, n_head=1, n_experts=4, moe_topk=2, **overrides))
        r.gate.weight.data = torch.eye(4)  # logits = the input itself
        return r

    x = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 1.0]])
    softmax = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in x.tolist()]
    experts, gates, _, _ = router()(x)  # softmax, renormalized over the two chosen
    assert experts.tolist() == [[0, 1], [1, 3]]
    by_hand = [[softmax[0][0], softmax[0][1]], [softmax[1][1], softmax[1][3]]]
    assert torch.allclose(gates, torch.tensor([[a / (a + b), b / (a + b)] for a, b in by_hand]))
    assert torch.allclose(router(router_renorm=False)(x)[1], torch.tensor(by_hand))
    # sigmoid: the bias steers the choice, the gates come from the unbiased scores, renormalized and scaled
    r = router(router_scoring="sigmoid", routed_scaling=2.5)
    r.bias[2] = 3.0
    experts, gates, _, _ = r(x)
    assert experts.tolist() == [[2, 0], [2, 1]]
    sigmoid = [[1 / (1 + math.exp(-v)) for v in row] for row in x.tolist()]
    by_hand = [[sigmoid[0][2], sigmoid[0][0]], [sigmoid[1][2], sigmoid[1][1]]]
    assert torch.allclose(gates, 2.5 * torch.tensor([[a / (a + b), b / (a + b)] for a, b in by_hand]))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_balance_losses_and_metrics_equal_their_formulas(tiny_model, scoring):
    moe, _ = moe_layer(tiny_model, router_scoring=scoring, aux_loss_coef=0.01, seq_aux_loss_coef=1e-3,
                       router_z_loss_coef=1e-4)
    B, T, E, k = 3, 5, 4, 2
    x = torch.randn(B, T, 32)
    ctx = Context(cos=None, sin=None)
    moe(x, ctx)
    logits = (x @ moe.router.gate.weight.T).view(B * T, E).tolist()
    scores = [[(math.exp(z) / sum(math.exp(u) for u in row)) if scoring == "softmax" else 1 / (1 + math.exp(-z))
               for z in row] for row in logits]
    probs = [[s / sum(row) for s in row] for row in scores]
    chosen = [sorted(range(E), key=lambda i: -row[i])[:k] for row in scores]
    slots = [sum(i in c for c in chosen) for i in range(E)]
    switch = E * sum(slots[i] / (B * T * k) * sum(p[i] for p in probs) / (B * T) for i in range(E))
    sequences = [(chosen[b * T:(b + 1) * T], probs[b * T:(b + 1) * T]) for b in range(B)]
    sequence_wise = sum(sum(E / (k * T) * sum(i in c for c in seq_chosen) * sum(p[i] for p in seq_probs) / T
                            for i in range(E)) for seq_chosen, seq_probs in sequences) / B
    z = sum(math.log(sum(math.exp(u) for u in row)) ** 2 for row in logits) / (B * T)
    aux = ctx.aux
    for name, value in (("aux_loss", switch), ("seq_aux_loss", sequence_wise), ("z_loss", z)):
        assert math.isclose(aux[f"moe0/{name}"].item(), value, rel_tol=1e-5), name
    assert math.isclose(ctx.losses["moe_loss"].item(), 0.01 * switch + 1e-3 * sequence_wise + 1e-4 * z, rel_tol=1e-5)
    load = [s / (B * T * k) for s in slots]
    assert torch.allclose(aux["moe0/load"], torch.tensor(load))
    assert math.isclose(aux["moe0/load_max_mean"].item(), max(load) * E, rel_tol=1e-6)
    entropy = -sum(f * math.log(f) for f in load if f) / math.log(E)
    assert math.isclose(aux["moe0/load_entropy"].item(), entropy, rel_tol=1e-5)
    assert aux["moe0/dropped"].item() == 0


def test_training_loss_adds_the_weighted_router_losses_and_eval_leaves_them_out(tiny_model):
    model = tiny_model(n_experts=4, moe_topk=2, moe_hidden=16, aux_loss_coef=0.1, router_z_loss_coef=0.01)
    idx = torch.randint(0, 64, (2, 16))
    logits, loss, aux = model(idx, idx)
    by_layer = sum(0.1 * aux[f"moe{i}/aux_loss"] + 0.01 * aux[f"moe{i}/z_loss"] for i in range(2))
    assert torch.allclose(aux["moe_loss"], by_layer) and torch.allclose(loss, aux["lm_loss"] + by_layer)
    assert torch.allclose(aux["lm_loss"], F.cross_entropy(logits.view(-1, 64), idx.view(-1)))
    model.eval()
    logits, loss, _ = model(idx, idx)
    assert torch.allclose(loss, F.cross_entropy(logits.view(-1, 64), idx.view(-1)))


def expert_by_hand(experts, e, token):
    gate, up = (experts.gate_up[e] @ token).chunk(2)
    return experts.down[e] @ (F.silu(gate) * up)


def grouped_mm_runs_here():
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError):
        return False


PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not grouped_mm_runs_here(),
                                                             reason="torch._grouped_mm does not run here"))]


@pytest.mark.parametrize("grouped", PATHS, ids=["loop", "grouped_mm"])
def test_moe_output_equals_a_per_token_reference(tiny_model, grouped):
    moe, _ = moe_layer(tiny_model, n_shared_experts=1, router_scoring="sigmoid", routed_scaling=2.5)
    moe.experts.grouped = grouped
    x = torch.randn(2, 9, 32)
    y = moe(x, Context(cos=None, sin=None)).view(-1, 32)
    experts, gates, _, _ = moe.router(x.view(-1, 32))
    for n, token in enumerate(x.view(-1, 32)):  # each token through its own chosen experts only
        routed = sum(g * expert_by_hand(moe.experts, e, token) for e, g in zip(experts[n], gates[n]))
        reference = moe.shared(token) + routed
        assert torch.allclose(y[n], reference, atol=1e-6), n


@pytest.mark.parametrize("grouped", PATHS, ids=["loop", "grouped_mm"])
def test_expert_groups_of_any_size_including_empty(tiny_model, grouped):
    experts = moe_layer(tiny_model)[0].experts
    experts.grouped = grouped
    counts = torch.tensor([3, 0, 5, 2])
    rows = torch.randn(10, 32)
    owner = torch.repeat_interleave(torch.arange(4), counts)
    reference = torch.stack([expert_by_hand(experts, e, row) for e, row in zip(owner, rows)])
    assert torch.allclose(experts(rows, counts), reference, atol=1e-6)


def test_capacity_drops_exactly_the_lowest_scored_overflow_tokens(tiny_model):
    # 2 experts, top-1, 8 tokens, capacity ceil(1.0 * 8 * 1 / 2) = 4; the router reads feature 0 alone, so a token
    # goes to expert 0 with score sigmoid(x0) when x0 > 0
    moe, model = moe_layer(tiny_model, n_experts=2, moe_topk=1, capacity_factor=1.0)
    moe.router.gate.weight.data.zero_()
    moe.router.gate.weight.data[0, 0] = 1.0
    x = torch.randn(1, 8, 32)
    x[0, :, 0] = torch.tensor([3.0, 1.0, 2.0, -1.0, 1.0, 0.5, -2.0, 4.0])
    # expert 0 gets tokens 0, 1, 2, 4, 5, 7: it keeps 7, 0, 2 and, of the tied 1 and 4, the earlier one
    dropless = moe.eval()(x, NO_POSITIONS)
    ctx = Context(cos=None, sin=None)
    trained = moe.train()(x, ctx)
    dropped = [4, 5]
    assert not trained[0, dropped].any()  # nothing added: the residual carries these tokens alone
    kept = [t for t in range(8) if t not in dropped]
    assert torch.allclose(trained[0, kept], dropless[0, kept], atol=1e-6) and dropless[0, dropped].abs().min() > 0
    assert ctx.aux["moe0/dropped"].item() == 2 / 8


def test_bias_balancing_evens_out_a_skewed_router(tiny_model):
    moe, model = moe_layer(tiny_model, moe_topk=1, router_scoring="sigmoid", bias_update_rate=0.01)
    moe.router.gate.weight.data[0] = 0.3  # inputs with a positive mean: expert 0 takes nearly every token
    torch.manual_seed(0)

    def max_over_mean():
        ctx = Context(cos=None, sin=None)
        moe(torch.randn(4, 16, 32) + 0.5, ctx)
        return ctx.aux["moe0/load_max_mean"].item()

    before = max_over_mean()
    update_router_biases(model)
    assert moe.router.bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])  # the overloaded one goes down
    assert not moe.router.load.any()  # counted afresh for the next step
    after = []
    for _ in range(150):
        after.append(max_over_mean())
        update_router_biases(model)
    # the sign steps keep the bias wobbling: over the last 20 steps (64 tokens each), not one step's sample
    assert before > 3.5 and sum(after[-20:]) / 20 < 1.75
    moe.eval()
    max_over_mean()
    assert not moe.router.load.any()  # evaluation does not count


def test_shared_experts_see_every_token(tiny_model):
    moe, _ = moe_layer(tiny_model, moe_topk=1, n_shared_experts=2)
    assert moe.shared.hidden == 2 * 16  # the shared experts run as one SwiGLU twice as wide
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        moe.experts.down.zero_()  # routed experts add nothing now
    y = moe(x, NO_POSITIONS)
    assert torch.allclose(y, moe.shared(x)) and (y.abs().sum(dim=-1) > 0).all()


# -----------------------------------------------------------------------------
# MTP

class Echo(nn.Module):
    """Stands in for an MTP module: records its inputs and passes the embedding on as its hidden state."""

    def __init__(self):
        super().__init__()
        self.norm, self.inputs = nn.Identity(), []

    def forward(self, h, emb, ctx):
        self.inputs.append((h, emb))
        return emb


def test_mtp_depth_k_predicts_token_i_plus_k_plus_1_from_token_i_plus_k(tiny_model):
    model = tiny_model(vocab_size=32, mtp_depth=3, mtp_lambda=0.6, tie_embeddings=False)
    model.mtp = nn.ModuleList(Echo() for _ in range(3))
    with torch.no_grad():  # one-hot embeddings, and a head that reads token t as a confident guess of t + 1
        model.wte.weight.copy_(torch.eye(32))
        model.lm_head.weight.copy_(20 * torch.eye(32).roll(1, dims=0))
    idx = (torch.arange(16) + torch.tensor([[0], [9]])) % 32  # counting: the next token is always t + 1
    _, loss, aux = model(idx, (idx + 1) % 32)
    for k in (1, 2, 3):
        assert aux[f"mtp{k}/loss"] < 1e-3, k  # right targets; one position off would cost about 20 nats
        h, emb = model.mtp[k - 1].inputs[0]
        assert h.shape[1] == emb.shape[1] == 16 - k
        assert torch.equal(emb, model.wte(idx[:, k:]))
    assert torch.equal(model.mtp[1].inputs[0][0], model.mtp[0].inputs[0][1][:, :-1])  # depth 1's output feeds depth 2
    assert torch.allclose(aux["mtp_loss"], 0.6 / 3 * sum(aux[f"mtp{k}/loss"] for k in (1, 2, 3)))
    assert torch.allclose(loss, aux["lm_loss"] + aux["mtp_loss"])


def test_mtp_is_left_out_at_inference_and_kept_in_the_checkpoint(tiny_model):
    model = tiny_model(mtp_depth=1).eval()
    idx = torch.randint(0, 64, (2, 16))
    logits, loss, aux = model(idx, idx)
    assert "mtp_loss" not in aux and torch.allclose(loss, F.cross_entropy(logits.view(-1, 64), idx.view(-1)))
    assert any(name.startswith("mtp.0.") for name in model.state_dict())
    assert model.num_params() == tiny_model().num_params()  # the model that runs at inference


# -----------------------------------------------------------------------------
# accounting, configs, training

def test_parameter_and_flops_accounting_of_mla_moe_and_mtp(tiny_model):
    model = tiny_model(**MLA, n_experts=4, moe_topk=2, moe_hidden=16, n_shared_experts=1, moe_first_dense=1,
                       mtp_depth=1)
    d, V, T, H, nope, rope, v, q_rank, rank = 32, 64, 32, 4, 8, 4, 8, 16, 16
    mla = d * q_rank + q_rank * H * (nope + rope) + d * (rank + rope) + rank * H * (nope + v) + H * v * d  # matrices
    expert, router, dense = 3 * d * 16, 4 * d, 3 * d * 128  # mlp_hidden = 8/3 * 32 rounded up to 128
    moe = router + 4 * expert + expert  # routed and one shared
    norms = 2 * d + q_rank + rank  # per block: the two pre-norms and MLA's two latent norms
    main = V * d + (mla + dense + norms) + (mla + moe + norms) + d
    assert model.num_params() == main
    assert model.num_params(active=True) == main - 2 * expert
    assert sum(p.numel() for p in model.parameters()) == main + 2 * d + 2 * d * d + (mla + moe + norms) + d
    matmul = 3 * mla + dense + 2 * (moe - 2 * expert) + 2 * d * d + 2 * V * d  # the MTP block is an MoE one
    attention = 3 * 2 * H * (nope + rope + v) * (T + 1) / 2
    assert model.flops_per_token(T) == 3 * (2 * matmul + attention)
    parts = model.flops_breakdown(T)  # attention: 3 layers alike, the MTP module's block the third
    assert (parts["attention projections"], parts["attention scores"]) == (3 * 2 * 2 * mla, 3 * 2 * attention / 3)
    assert (parts["mlp"], parts["moe"], parts["head"]) == (3 * 2 * dense, 3 * 2 * (moe - 2 * expert), 3 * 2 * V * d)
    assert parts["mtp"] == 3 * (2 * (2 * d * d + mla + moe - 2 * expert + V * d) + attention / 3)


CONFIGS = ["moe_small", "deepseek_small", "llama4_small"]


def config_file(name, **overrides):
    """The GPTConfig a config file gives (run from the repository root, as its paths are)."""
    namespace = {}
    with open(os.path.join("config", f"{name}.py")) as f:
        exec(f.read(), namespace)
    keys = config_fields()
    return GPTConfig(**{**{k: v for k, v in namespace.items() if k in keys}, "vocab_size": 8192, **overrides})


def test_configs_match_the_dense_benchmark_in_active_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)
    with torch.device("meta"):
        dense = {name: GPT(config_file("gutenberg_small", n_kv_head=2 if name == "llama4_small" else 0))
                 for name in CONFIGS}  # the dense model each config is matched to
        models = {name: GPT(config_file(name)) for name in CONFIGS}
    for name, model in models.items():
        assert model.num_params(active=True) < model.num_params() / 2, name
        # the same width and depth, each token through the same feed-forward width: within 1% of the dense model
        assert abs(model.num_params(active=True) / dense[name].num_params() - 1) < 0.01, name
    assert models["deepseek_small"].kv_cache_bytes(1) == 8 * (256 + 32) * 2  # MHA: 8 * 2 * 512 * 2


TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_embd=32", "--n_head=4", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3",
        "--q_lora_rank=16", "--kv_lora_rank=16", "--qk_nope_head_dim=8", "--qk_rope_head_dim=4", "--v_head_dim=8",
        "--n_experts=4", "--moe_hidden=16", "--moe_topk=2", "--mlp_hidden=64"]


def test_deepseek_config_trains_and_logs_router_metrics(tiny_data, tmp_path):
    result = run_stage("train.py", "config/deepseek_small.py", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}",
                       *TINY, "--max_iters=3", "--eval_interval=3")
    rows = read_log(tmp_path)
    step = [r for r in rows if "loss" in r][-1]
    assert len(step["moe1/load"]) == 4 and {"moe1/dropped", "moe2/seq_aux_loss", "mtp1/loss", "lm_loss"} <= set(step)
    assert "moe/load_max_mean" in result.stdout and "mtp/loss" in result.stdout
    biases = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]["blocks.1.mlp.router.bias"]
    assert biases.abs().sum() > 0  # aux-loss-free balancing moved them (3 steps of +-gamma: none is back at 0)


def test_two_process_ddp_moe_equals_one_process(tiny_data, tmp_path):
    """Bias balancing sums the loads over micro-steps and processes: the replicas stay equal to one process."""
    args = [*TINY, "--attention=mla", "--moe_first_dense=1", "--router_scoring=sigmoid", "--bias_update_rate=0.01",
            "--seq_aux_loss_coef=0.01", "--mtp_depth=1", "--max_iters=3", "--eval_interval=3", "--batch_size=2",
            "--gradient_accumulation_steps=4", "--sampler=epoch", f"--data_dir={tiny_data}"]
    run_stage("train.py", *args, f"--out_dir={tmp_path / 'one'}")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                    *args, f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert one["blocks.1.mlp.router.bias"].abs().sum() > 0  # 3 steps of +-gamma: none is back at 0
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), name
