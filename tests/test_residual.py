"""
Residual streams and memory: hyper-connections (hc), mHC and Engram. The generic checks (causality, decoding equals
the full forward, gradients, learning) run in test_model.py over conftest.FAMILY_VARIANTS; here, each one's own
invariants, its optimizer (sparse rows) and the stages around it (clipping, GradScaler, compile, DDP, resume).
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import TINY_CONFIG, assert_resume_reproduces, read_log, run_train
from model import ENGRAM_PAD, GPT, Engram, GPTConfig, HyperConnections, sinkhorn
from optim import clip_grad_norm_, configure_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")

ENGRAM = dict(engram_layers="0,1", engram_table_size=2048, engram_dim=32)


def training_batch(seed=0, batch=4, T=16):
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (batch, T + 1), generator=generator)
    return idx[:, :-1], idx[:, 1:]


# -----------------------------------------------------------------------------
# hyper-connections and mHC

@pytest.mark.parametrize("residual", ["hc", "mhc"])
@pytest.mark.parametrize("extra", [{}, dict(attention="mla", kv_lora_rank=16, n_experts=4, moe_hidden=16, mtp_depth=1)],
                         ids=["dense", "mla_moe_mtp"])
def test_hyper_connections_at_init_equal_the_standard_residual(tiny_model, residual, extra):
    standard = tiny_model(**extra)
    streams = tiny_model(residual=residual, **extra)
    missing, unexpected = streams.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith(("_residual.static", "_residual.dynamic")) for k in missing)
    x, y = training_batch()
    logits, loss, aux = standard(x, y)
    logits_hc, loss_hc, aux_hc = streams(x, y)  # training mode: the MTP loss too
    assert torch.allclose(logits_hc, logits, atol=1e-5) and torch.allclose(loss_hc, loss, atol=1e-6)
    standard.eval(), streams.eval()
    cache, cache_hc = standard.new_cache(4, 32), streams.new_cache(4, 32)
    prefill = standard(x[:, :10], cache=cache, cache_pos=torch.arange(10))[0]
    assert torch.allclose(streams(x[:, :10], cache=cache_hc, cache_pos=torch.arange(10))[0], prefill, atol=1e-5)


def test_sinkhorn_makes_doubly_stochastic_matrices_with_gradients():
    torch.manual_seed(0)
    logits = torch.randn(64, 4, 4)
    m = sinkhorn(logits, 20)
    assert (m >= 0).all()
    assert torch.allclose(m.sum(dim=-2), torch.ones(64, 4), atol=1e-5)  # columns: exact, the last step
    assert torch.allclose(m.sum(dim=-1), torch.ones(64, 4), atol=1e-3)  # rows: within the iterations' error
    product = torch.linalg.multi_dot(list(sinkhorn(torch.randn(50, 4, 4), 20)))  # closed under products
    assert torch.allclose(product.sum(dim=-1), torch.ones(4), atol=1e-3)
    assert torch.allclose(product.sum(dim=-2), torch.ones(4), atol=1e-3)
    assert torch.linalg.matrix_norm(product, ord=2) <= 1 + 1e-3
    small = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: sinkhorn(z, 5), (small,))


def test_mhc_mixing_stays_doubly_stochastic_while_streams_diverge(tiny_model):
    model = tiny_model(residual="mhc", hc_streams=4)
    opt = configure_optimizers(model, learning_rate=1e-2)
    for step in range(3):
        x, y = training_batch(step)
        opt.zero_grad()
        model(x, y)[1].backward()
        if step == 0:  # gradients flow through Sinkhorn into the static and dynamic res logits
            for hc in [m for m in model.modules() if isinstance(m, HyperConnections)]:
                assert hc.static.grad[8:].abs().sum() > 0 and hc.dynamic.grad[:, 8:].abs().sum() > 0
        opt.step()
    streams = {}
    hook = model.blocks[1].attn_residual.register_forward_pre_hook(lambda m, args: streams.update(H=args[0]))
    model(*training_batch(9))
    hook.remove()
    H = streams["H"]  # (B, T, 4, d)
    assert (H[:, :, 0] - H[:, :, 1]).abs().max() > 1e-4  # per-layer reading weights broke the streams' symmetry
    _, _, res = model.blocks[1].attn_residual.mappings(H)
    assert torch.allclose(res.sum(dim=-2), torch.ones(res.shape[:-1]), atol=1e-5)
    assert torch.allclose(res.sum(dim=-1), torch.ones(res.shape[:-1]), atol=1e-3)


def test_hyper_connection_flops_and_muon_routing(tiny_model):
    d, n = 32, 4
    for residual, dynamic in (("hc", n * d * (n + 2)), ("mhc", n * d * (n * n + 2 * n))):
        model = tiny_model(residual=residual, hc_streams=n)
        extra = model.flops_per_token(32) - tiny_model().flops_per_token(32)
        assert extra == 3 * 4 * (2 * dynamic + 2 * d * (n * n + 2 * n))  # 4 sublayers, forward + backward
        opt = configure_optimizers(model, "muon", learning_rate=1e-3)
        muon = {id(p) for p in opt.muon.param_groups[0]["params"]}
        assert not any(id(p) in muon for name, p in model.named_parameters() if "_residual." in name)
        decayed = {id(p) for p in opt.adamw.param_groups[0]["params"]}
        assert not any(id(p) in decayed for name, p in model.named_parameters() if name.endswith("static"))


# -----------------------------------------------------------------------------
# Engram

def engram_config(**overrides):
    return GPTConfig(**{**TINY_CONFIG, **ENGRAM, **overrides})


def test_engram_hashing_is_deterministic_and_matches_a_hand_computation():
    config = engram_config(engram_orders="2,3", engram_heads=2)
    engram, again, other_layer = Engram(config, 1), Engram(config, 1), Engram(config, 0)
    tokens = engram.window(torch.randint(0, 64, (3, 20)))
    rows = engram.rows(tokens)  # (3, 20, orders, heads)
    assert rows.shape == (3, 20, 2, 2) and torch.equal(rows, again.rows(tokens))
    assert not torch.equal(rows, other_layer.rows(tokens))  # multipliers per layer
    assert ((rows >= engram.offsets) & (rows < engram.offsets + engram.primes)).all()  # each head in its own rows

    def wrap(v):  # int64 two's complement, as torch multiplies
        v &= (1 << 64) - 1
        return v - (1 << 64) if v >= 1 << 63 else v
    c = engram.multipliers.tolist()
    assert all(m % 2 == 1 and 0 < m < 2**62 for m in c)
    b, t = 1, 7
    ids = tokens[b, t:t + 3].tolist()  # id_{t-2}, id_{t-1}, id_t
    bigram = wrap(ids[2] * c[0]) ^ wrap(ids[1] * c[1])
    trigram = bigram ^ wrap(ids[0] * c[2])
    for order, mix in enumerate((bigram, trigram)):
        for head in range(2):
            p, offset = engram.primes[order, head].item(), engram.offsets[order, head].item()
            assert rows[b, t, order, head].item() == mix % p + offset
    # the first token's n-grams read the pad id, never a later token
    first = engram.window(torch.tensor([[5, 9, 9]]))
    assert first[0, :2].tolist() == [ENGRAM_PAD] * 2


def test_engram_collision_rate_is_near_the_rate_of_a_random_function():
    config = engram_config(engram_orders="2", engram_heads=4, engram_table_size=4 * 5000, engram_dim=32)
    engram = Engram(config, 0)
    pairs = torch.unique(torch.randint(0, 50000, (3000, 2), generator=torch.Generator().manual_seed(0)), dim=0)
    N = len(pairs)
    rows = engram.rows(torch.cat([torch.full((N, 1), ENGRAM_PAD), pairs], dim=1))[:, -1, 0]  # (N, heads): a bigram each
    for head in range(4):
        p = engram.primes[0, head].item()
        _, inverse, counts = rows[:, head].unique(return_inverse=True, return_counts=True)
        shared = (counts[inverse] > 1).float().mean().item()  # n-grams whose row holds another n-gram too
        expected = 1 - (1 - 1 / p) ** (N - 1)
        assert abs(shared - expected) < 0.15 * expected, (head, shared, expected)
    _, counts = rows.unique(dim=0, return_counts=True)
    assert (counts > 1).sum() <= 2  # colliding in every head at once: about N^2 / 2 * (1/p)^4, none expected


def test_engram_step_reads_and_writes_only_the_rows_its_batch_looked_up(tiny_model):
    model = tiny_model(**ENGRAM, residual="hc")
    for optimizer in ("adamw", "muon"):
        opt = configure_optimizers(model, optimizer, learning_rate=1e-2)
        tables = [m.table.weight for m in model.modules() if isinstance(m, Engram)]
        assert [id(p) for p in opt.sparse_adam.param_groups[0]["params"]] == [id(t) for t in tables]
        assert not any(id(t) == id(p) for t in tables for g in opt.param_groups[:-1] for p in g["params"])
        before = [t.detach().clone() for t in tables]
        x, y = training_batch()
        model(x, y)[1].backward()
        touched = [m.rows(m.window(x)).unique() for m in model.modules() if isinstance(m, Engram)]
        for table, rows in zip(tables, touched):
            assert table.grad.is_sparse and table.grad.coalesce().indices()[0].tolist() == rows.tolist()
        clip_grad_norm_(model.parameters(), 0.01)  # coalesces, then scales the sparse rows with the rest
        opt.step()
        opt.zero_grad(set_to_none=True)
        for table, old, rows in zip(tables, before, touched):
            changed = (table != old).any(dim=1).nonzero().flatten()
            assert changed.tolist() == rows.tolist()
            state = opt.sparse_adam.state[table]
            assert (state["exp_avg"] != 0).any(dim=1).nonzero().flatten().tolist() == rows.tolist()


def test_clipping_counts_sparse_rows_once_and_scales_them_like_the_rest():
    table = torch.nn.Embedding(10, 3, sparse=True)
    weight = torch.nn.Parameter(torch.ones(2))
    (table(torch.tensor([1, 1, 4])).sum() * 2 + weight.sum() * 3).backward()
    dense_table_grad = torch.zeros(10, 3).index_add_(0, torch.tensor([1, 1, 4]), torch.full((3, 3), 2.0))
    total = torch.cat([dense_table_grad.flatten(), torch.full((2,), 3.0)]).norm()
    norm = clip_grad_norm_([table.weight, weight], 1.0)
    assert torch.isclose(norm, total)
    assert torch.allclose(table.weight.grad.to_dense(), dense_table_grad / total, atol=1e-6)
    assert torch.allclose(weight.grad, torch.full((2,), 3.0) / total, atol=1e-6)


def test_fp16_grad_scaler_and_compile_train_the_tables(tiny_model):
    model = tiny_model(**{**ENGRAM, "engram_layers": "0"}, residual="hc", n_layer=1)
    x, y = training_batch()
    eager_loss = model(x, y)[1]
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(x, y)[1]
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    opt = configure_optimizers(model, learning_rate=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    table = model.blocks[0].memory.table.weight
    before = table.detach().clone()
    scaler.scale(loss).backward()
    assert table.grad.is_sparse
    scaler.unscale_(opt)
    clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no inf found: the step ran
    assert (table != before).any(dim=1).sum() > 0


def test_engram_with_zero_values_is_the_backbone(tiny_model):
    backbone, model = tiny_model(), tiny_model(**ENGRAM)  # (left-padded decoding: test_model.py)
    model.load_state_dict(backbone.state_dict(), strict=False)
    for m in model.modules():
        if isinstance(m, Engram):
            torch.nn.init.zeros_(m.value.weight)
    x, y = training_batch()
    assert torch.allclose(model(x, y)[0], backbone(x, y)[0], atol=1e-6)


def test_engram_accounting(tiny_model):
    model, backbone = tiny_model(**ENGRAM), tiny_model()
    engrams = [m for m in model.modules() if isinstance(m, Engram)]
    rows = [m.primes.sum().item() for m in engrams]
    assert all(2048 <= r < 2048 + 200 for r in rows)  # about engram_table_size, each head's share a prime
    assert model.table_params() == sum(rows) * 4  # 32 dims over 2 orders x 4 heads: 4 per row
    assert model.num_params() == backbone.num_params() + 2 * (2 * 32 * 32 + 2 * 32)  # key, value and two norms
    d = 32
    extra = model.flops_per_token(32) - backbone.flops_per_token(32)
    assert extra == 3 * 2 * (2 * 2 * 32 * d + 4 * d)  # two layers: key and value projections, gate; lookups free


@pytest.mark.parametrize("bad, words", [(dict(engram_layers="1,x"), "comma-separated"),
                                        (dict(engram_layers="2"), "within 0..n_layer-1"),
                                        (dict(engram_layers="0", engram_orders="1"), "orders of 2 or more"),
                                        (dict(engram_layers="0", engram_dim=30), "multiple"),
                                        (dict(residual="pre"), "unknown residual"),
                                        (dict(residual="hc", hc_streams=1), "hc_streams")])
def test_bad_settings_give_one_line_errors(bad, words):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**{**TINY_CONFIG, **bad})


def test_nccl_data_parallel_is_refused_clearly(tiny_model, monkeypatch):
    model = tiny_model(**ENGRAM)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *args: "nccl")
    with pytest.raises(ValueError, match="NCCL"):
        configure_optimizers(model)


# -----------------------------------------------------------------------------
# data parallel (gloo) and train.py

def ddp_worker(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    model, opt = new_run()
    ddp = DDP(model)
    for step in range(2):
        x, y = training_batch(step, batch=4)
        ddp(x[rank::world], y[rank::world])[1].backward()  # this rank's half of the batch
        clip_grad_norm_(ddp.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(model.state_dict(), f"{folder}/model.pt")
    del ddp  # before the process group, as train.py does (a deadlock there otherwise: see train.py's end)
    dist.destroy_process_group()


def new_run():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_CONFIG, **ENGRAM, residual="hc"))
    return model, configure_optimizers(model, learning_rate=1e-2)


def test_two_process_gloo_equals_one_process(tmp_path):
    mp.start_processes(ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    model, opt = new_run()
    for step in range(2):
        model(*training_batch(step, batch=4))[1].backward()
        clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
    two = torch.load(tmp_path / "model.pt", weights_only=True)
    for name, p in model.state_dict().items():
        assert torch.allclose(p, two[name], atol=1e-4, rtol=0), name  # Adam magnifies rounding where grads are ~0


def test_train_py_with_hc_and_engram_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    args = [f"--data_dir={tiny_data}", "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=1",
            "--log_interval=1", "--eval_interval=2", "--warmup_iters=1", "--learning_rate=1e-2", "--lr_schedule=wsd",
            "--decay_frac=0.0", "--optimizer=muon", "--residual=mhc", "--hc_sinkhorn_iters=4",
            "--engram_layers=0,1", "--engram_table_size=4096", "--engram_dim=32", "--grad_clip=0.5"]
    whole, _ = assert_resume_reproduces(lambda out, *more: run_train(monkeypatch, *args, f"--out_dir={out}", *more),
                                        tmp_path, 4, 2)
    assert read_log(whole)[0]["engram_table_params"] > 0
    checkpoint = torch.load(whole / "ckpt.pt", weights_only=True)
    assert set(checkpoint["optimizer"]) == {"muon", "adamw", "sparse_adam"}
