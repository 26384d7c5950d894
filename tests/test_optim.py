"""Optimizers: Newton-Schulz, one Muon step by hand, parameter routing, QK-Clip, distributed Muon, resume."""
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import optim
from conftest import FAMILY_VARIANTS, TINY_CONFIG, assert_resume_reproduces, read_log, run_train
from kernel import max_attention_logits
from model import GPT, GPTConfig
from optim import QKClip, configure_optimizers, orthogonalize

pytestmark = pytest.mark.usefixtures("one_thread")


def newton_schulz_float64(G, schedule="jordan"):
    """The quintic iterations written out by hand, in float64."""
    margin, coefficients = optim.NEWTON_SCHULZ[schedule]
    X = G.double().mT if G.size(-2) > G.size(-1) else G.double()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin)
    for a, b, c in coefficients:
        X = a * X + b * (X @ X.mT) @ X + c * (X @ X.mT) @ (X @ X.mT) @ X
    return X.mT if G.size(-2) > G.size(-1) else X


@pytest.mark.parametrize("schedule, band", [("jordan", (0.6, 1.2)), ("polar_express", (0.8, 1.2))])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 384), (3, 64, 128)])
def test_newton_schulz_singular_values_lie_near_one(shape, schedule, band):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = orthogonalize(G, schedule)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert band[0] < s.min() and s.max() < band[1], (s.min(), s.max())  # the quintics' band, not exactly 1
    exact = newton_schulz_float64(G, schedule)
    assert (X.double() - exact).norm() < 0.05 * exact.norm()  # bf16 rounding: about 3%
    if G.dim() == 3:  # batched over experts equals one matrix at a time
        assert all(torch.equal(X[i], orthogonalize(G[i], schedule)) for i in range(len(G)))


def reference_muon(p, grads, lr, momentum, weight_decay, rule, rows, schedule="jordan", beta2=0.0, cautious=False):
    """Muon written out by hand in float64, for one parameter whose logical matrices are `rows` rows each; beta2 > 0:
    NorMuon's row normalization; cautious: weight decay only where the update has the weight's sign."""
    p, m, v = p.double(), torch.zeros_like(p, dtype=torch.float64), torch.zeros(p.size(0), dtype=torch.float64)
    for g in grads:
        g = g.double()
        m = momentum * m + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * m  # Nesterov
        updates = []
        for block in u.split(rows):
            A, B = block.shape
            updates.append(newton_schulz_float64(block, schedule) * (0.2 * math.sqrt(max(A, B)) if rule == "moonshot"
                                                                    else math.sqrt(max(1, A / B))))
        u = torch.cat(updates)
        if beta2:
            v = beta2 * v + (1 - beta2) * (u ** 2).mean(dim=1)
            normed = u / v.sqrt()[:, None]
            u = torch.cat([new * part.norm() / new.norm() for part, new in zip(u.split(rows), normed.split(rows))])
        decay = 1 - lr * weight_decay * ((u * p >= 0).double() if cautious else 1)
        p = p * decay - lr * u
    return p, m


@pytest.mark.parametrize("rule, schedule, beta2, cautious", [("moonshot", "jordan", 0.0, False),
                                                             ("shape", "jordan", 0.0, False),
                                                             ("moonshot", "polar_express", 0.0, False),
                                                             ("shape", "jordan", 0.9, False),
                                                             ("moonshot", "jordan", 0.0, True)])
def test_muon_steps_equal_a_hand_written_reference(rule, schedule, beta2, cautious, monkeypatch):
    # Newton-Schulz in float64 on both sides, so that everything around it is checked to fp32 precision;
    # its bf16 version is checked against the same float64 iteration above
    monkeypatch.setattr(optim, "orthogonalize", newton_schulz_float64)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    p.logical_rows = (6, 2)  # a tall and a wide matrix fused into one parameter
    grads = [torch.randn(8, 4) for _ in range(3)]  # the second step tells Nesterov from plain momentum, the third
    # NorMuon's EMA from a plain mean square
    expected, buffer = reference_muon(p.detach(), grads, 0.1, 0.9, 0.5, rule, p.logical_rows, schedule, beta2,
                                      cautious)
    muon = optim.Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5, lr_scale=rule, schedule=schedule, beta2=beta2,
                      cautious=cautious)
    for g in grads:
        p.grad = g.clone()
        muon.step()
    assert torch.allclose(muon.state[p]["momentum_buffer"].double(), buffer, atol=1e-6)
    assert torch.allclose(p.detach().double(), expected, atol=1e-6)


def test_muon_orthogonalizes_each_shape_of_logical_matrix_in_one_batched_call(monkeypatch):
    """Launches, not arithmetic, cost most at small batches: one Newton-Schulz call per shape, whatever the layers."""
    calls = []
    monkeypatch.setattr(optim, "orthogonalize", counting(calls))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY_CONFIG, "n_layer": 3}, n_kv_head=2, n_experts=4, moe_hidden=16, moe_every=2))
    opt = configure_optimizers(model, "muon")
    model(batch(0), batch(0))[1].backward()
    opt.step()
    # 32x32: q and proj of 3 layers; 16x32: k and v of 3, the 4 experts' gate and up; 128x32: the 2 dense layers'
    # gate and up; 32x128: their down; 32x16: the experts' down
    assert calls == [6, 14, 4, 2, 4]  # matrices per call, in parameter order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("candidates", [{}, dict(muon_schedule="polar_express", normuon_beta2=0.95, cautious_wd=True)])
def test_muon_steps_replayed_as_a_cuda_graph_equal_eager_steps(candidates):
    torch.manual_seed(0)
    models = [GPT(GPTConfig(**TINY_CONFIG, n_kv_head=2)).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [configure_optimizers(m, "muon", device_type="cuda", **candidates) for m in models]
    opts[1].muon.graph = False
    for step in range(5):
        for model, opt in zip(models, opts):
            for group in opt.param_groups:  # the factors, filled into the graph, change every step
                group["lr"] = 1e-3 * (step + 1)
            opt.muon.param_groups[0]["momentum"] = 0.85 + 0.02 * step
            model(batch(step).cuda(), batch(step).cuda())[1].backward()
            opt.step()
            opt.zero_grad()
        if step == 2:  # a resume replaces the momentum buffers: the graph is captured again
            opts[0].load_state_dict(opts[0].state_dict())
    assert opts[0].muon.graphs and not opts[1].muon.graphs
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_embed_lr_and_head_lr_give_the_tables_and_the_head_groups_of_their_own(tiny_model):
    model = tiny_model(tie_embeddings=False, value_embeds="1")
    opt = configure_optimizers(model, "muon", 1e-3, embed_lr=0.2, head_lr=4e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {tuple(sorted(names[id(p)] for p in g["params"])): (g.get("lr_ratio", 1), g["weight_decay"])
              for g in opt.adamw.param_groups}
    assert groups[("blocks.1.attn.value_embed.table.weight", "wte.weight")] == (200, 0)
    assert groups[("lm_head.weight",)] == (4, 0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))  # each in one group
    model = tiny_model()
    own = [g for g in configure_optimizers(model, "adamw", 1e-3, embed_lr=0.1).param_groups if "lr_ratio" in g]
    assert len(own) == 1 and own[0]["params"] == [model.wte.weight] and own[0]["lr_ratio"] == 100  # tied: the head too
    with pytest.raises(ValueError, match="head_lr needs an output head of its own"):
        configure_optimizers(tiny_model(), "adamw", 1e-3, head_lr=0.1)


ROUTING_VARIANTS = {"dense": dict(), "gqa_untied": dict(n_kv_head=2, tie_embeddings=False), **FAMILY_VARIANTS}


@pytest.mark.parametrize("variant", ROUTING_VARIANTS)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_parameter_sits_in_exactly_one_group_of_the_right_optimizer(tiny_model, optimizer, variant):
    model = tiny_model(**ROUTING_VARIANTS[variant])
    opt = configure_optimizers(model, optimizer, learning_rate=1e-3)
    placed = [id(p) for group in opt.param_groups for p in group["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters())  # none twice, none forgotten
    before = {n: p.clone() for n, p in model.named_parameters()}
    model(torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32)))[1].backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # every parameter trains
    if optimizer == "adamw":
        return
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, vectors = opt.adamw.param_groups
    # AdamW: the embedding, an untied head, the routers, hyper-connection weights and Gated DeltaNet's convolution
    # filters (tiny skinny maps) and every vector; SparseAdam: the Engram tables; Muon: the other matrices
    adamw_matrices = {"wte.weight"} | ({"lm_head.weight"} if "untied" in variant else set())
    adamw_matrices |= {n for n, p in model.named_parameters()
                       if p.dim() >= 2 and (".router." in n or "_residual." in n or "attn.conv" in n
                                            or ".value_embed." in n)}
    assert {names[id(p)] for p in decayed["params"]} == adamw_matrices
    assert all(p.dim() == 1 for p in vectors["params"]) and vectors["weight_decay"] == 0
    tables = {n for n in names.values() if n.endswith("memory.table.weight")}
    if tables:
        assert {names[id(p)] for p in opt.sparse_adam.param_groups[0]["params"]} == tables
    muon = {names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() >= 2} - adamw_matrices - tables
    if variant in ("dense", "gqa_untied"):
        hidden = ("attn.qkv.weight", "attn.proj.weight", "mlp.gate_up.weight", "mlp.down.weight")
        assert muon == {n for n in names.values() if n.endswith(hidden)}
        attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
        assert attn.qkv.weight.logical_rows == ((32, 16, 16) if variant == "gqa_untied" else (32, 32, 32))
        assert mlp.gate_up.weight.logical_rows == (mlp.hidden, mlp.hidden)


def test_muon_lr_follows_the_chosen_rule(tiny_model):
    model = tiny_model()
    assert configure_optimizers(model, "muon", 2e-3).param_groups[0]["lr_ratio"] == 1  # moonshot: AdamW's lr
    assert configure_optimizers(model, "muon", 2e-3, muon_lr_scale="shape").param_groups[0]["lr_ratio"] == 10
    assert configure_optimizers(model, "muon", 2e-3, muon_lr=4e-3).param_groups[0]["lr_ratio"] == 2
    with pytest.raises(ValueError, match="muon_lr_scale"):
        configure_optimizers(model, "muon", muon_lr_scale="sqrt")


def test_max_attention_logits_equal_the_full_causal_logits():
    torch.manual_seed(0)
    for n_kv_head in (4, 2, 1):
        q, k = torch.randn(2, 4, 40, 8), torch.randn(2, n_kv_head, 40, 8)
        logits = q @ k.repeat_interleave(4 // n_kv_head, dim=1).mT / math.sqrt(8)
        logits = logits.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
        assert torch.allclose(max_attention_logits(q, k, chunk=16), logits.amax(dim=(0, 2, 3)), rtol=1e-6)


# every sequence mixer with a qk_clip method, in the shapes where keys are shared and where they are not
QK_CLIP_VARIANTS = {"mha": dict(n_kv_head=4), "gqa": dict(n_kv_head=2), "mqa": dict(n_kv_head=1),
                    "mha_qkv_bias": dict(n_kv_head=4, qkv_bias=True), "gqa_qkv_bias": dict(n_kv_head=2, qkv_bias=True),
                    "mla": FAMILY_VARIANTS["mla"], "mla_low_rank_q": FAMILY_VARIANTS["mla_low_rank_q"]}


@pytest.mark.parametrize("variant", QK_CLIP_VARIANTS)
def test_qk_clip_brings_large_logits_down_to_tau_and_leaves_the_rest(tiny_model, variant):
    model = tiny_model(n_layer=1, **QK_CLIP_VARIANTS[variant])
    with torch.no_grad():  # plant large logits: every matrix of the attention times 30, so q and k too
        for name, p in model.blocks[0].attn.named_parameters():
            if p.dim() >= 2:
                p.mul_(30)
            elif name.endswith("bias"):  # qkv_bias: large biases too, which QK-Clip must scale with their rows
                p.normal_(std=3.0, generator=torch.Generator().manual_seed(1))
    idx = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))

    def measure(tau):
        clip = QKClip(model, tau)
        clip.track(True)
        clip.observe(model(idx, idx)[2])
        clip.track(False)
        return clip

    before = measure(0.0).max_logits[0]
    tau = before.sort().values[1:3].mean().item()  # two heads above tau, two below
    assert before.max() > 10 and (before > tau).sum() == 2
    weights = {n: p.clone() for n, p in model.named_parameters()}
    assert measure(tau).clip() == [before.max().item()]
    after = measure(0.0).max_logits[0]
    assert torch.allclose(after[before > tau], torch.full((2,), tau), rtol=1e-5)
    assert torch.equal(after[before <= tau], before[before <= tau])  # bit for bit
    # only attention weights move; a shared key (GQA group, MLA's rotary key) stays, or the neighbours' logits would
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if not n.startswith("blocks.0.attn."))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    measure(before.max().item() + 1).clip()  # nothing above tau: nothing changes
    model.blocks[0].attn.qk_clip(-before, tau)  # not even for heads whose every logit is negative
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_qk_clip_measures_the_logits_the_softmax_sees_under_yarn(tiny_model):
    """MLA under YaRN sharpens every logit by its temperature (yarn_mscale_all_dim): tau is compared with those."""
    model = tiny_model(n_layer=1, **FAMILY_VARIANTS["hf_deepseek_v3"])
    attn, seen = model.blocks[0].attn, []
    attend = attn.span.attend

    def spy(q, k, v, ctx, mask=None, scale=None, dropout=0.0):  # the logits SDPA's softmax takes
        future = torch.ones(q.size(2), k.size(2), dtype=torch.bool).triu(1)
        seen.append((q @ k.mT * scale).masked_fill(future, float("-inf")).amax(dim=(0, 2, 3)))
        return attend(q, k, v, ctx, mask, scale, dropout)
    attn.span.attend = spy
    clip = QKClip(model, 1.0)
    clip.track(True)
    clip.observe(model(batch(0), batch(0))[2])
    assert attn.scale > 1.2 * (attn.nope + attn.rope) ** -0.5  # the temperature is in the scale
    assert torch.allclose(clip.max_logits[0], seen[0], rtol=1e-5)


# -----------------------------------------------------------------------------
# distributed Muon and resuming

def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 64, (4, 32), generator=g)


def muon_run(model, opt, clip, steps):
    """
    Train the given steps with MuonClip. Under DDP every rank takes the whole batch, so that the averaged gradient
    is bit for bit the single process's: Newton-Schulz in bf16 turns last-bit differences of the gradients (another
    summation order) into differences of about 1e-3 within a few steps, so only identical gradients compare at 1e-5.
    """
    for step in steps:
        for group in opt.param_groups:  # a schedule, as in train.py, so that resuming must restore lr_ratio
            group["lr"] = 1e-2 * (1 - step / 10) * group.get("lr_ratio", 1.0)
        clip.track(True)
        _, loss, aux = model(batch(step), batch(step))
        clip.observe(aux)
        clip.track(False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clip.clip()


def new_run():
    torch.manual_seed(0)
    # 3 layers: a batch of 3 matrices of each shape, which 2 processes split 2 and 1
    model = GPT(GPTConfig(**{**TINY_CONFIG, "n_layer": 3}, n_kv_head=2))
    # tau below the tiny model's largest logits (about 0.05), so that every step clips
    return model, configure_optimizers(model, "muonclip", 1e-2, muon_lr_scale="shape"), QKClip(model, tau=0.04)


def counting(calls):
    """optim.orthogonalize, appending to `calls` how many matrices each call orthogonalizes."""
    orthogonalize = optim.orthogonalize
    return lambda G, schedule: calls.append(G[..., 0, 0].numel()) or orthogonalize(G, schedule)


def ddp_worker(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    calls = []
    optim.orthogonalize = counting(calls)
    model, opt, clip = new_run()
    ddp = DDP(model)
    muon_run(ddp, opt, clip, range(0, 2))
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f"{folder}/step2.pt")
    muon_run(ddp, opt, clip, range(2, 4))
    if rank == 0:
        torch.save(model.state_dict(), f"{folder}/step4.pt")
    torch.save(sum(calls), f"{folder}/calls{rank}.pt")
    del ddp  # before the process group, as train.py does (a deadlock there otherwise: see train.py's end)
    dist.destroy_process_group()


def resumed_run(checkpoint):
    model, opt, clip = new_run()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    return model, opt, clip


def test_two_process_muonclip_equals_one_process_and_resumes_on_one(tmp_path, monkeypatch):
    mp.start_processes(ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")  # fork: no second torch import
    calls = []
    monkeypatch.setattr(optim, "orthogonalize", counting(calls))
    model, opt, clip = new_run()
    muon_run(model, opt, clip, range(0, 4))
    two = torch.load(tmp_path / "step4.pt", weights_only=True)
    for name, p in model.state_dict().items():
        assert torch.allclose(p, two[name], atol=1e-5, rtol=0), name
    # each rank orthogonalized its share of the matrices, not all of them
    shares = [torch.load(tmp_path / f"calls{rank}.pt") for rank in range(2)]
    assert sum(shares) == sum(calls) and max(shares) <= 0.6 * sum(calls), (shares, sum(calls))
    # rank 0's checkpoint holds the whole optimizer state: one process continues it
    resumed, opt, clip = resumed_run(torch.load(tmp_path / "step2.pt", weights_only=True))
    muon_run(resumed, opt, clip, range(2, 4))
    for name, p in model.state_dict().items():
        assert torch.allclose(p, resumed.state_dict()[name], atol=1e-5, rtol=0), name


def test_resume_equals_uninterrupted():
    whole, opt, clip = new_run()
    muon_run(whole, opt, clip, range(0, 4))
    first, opt, clip = new_run()
    muon_run(first, opt, clip, range(0, 2))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    resumed, opt, clip = resumed_run(torch.load(saved, weights_only=True))
    muon_run(resumed, opt, clip, range(2, 4))
    for name, p in whole.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


# -----------------------------------------------------------------------------
# train.py, in this process

def test_train_py_muonclip_and_muons_candidates_log_max_logits_and_resume_exactly(tiny_data, tmp_path, monkeypatch):
    args = [f"--data_dir={tiny_data}", "--batch_size=8", "--gradient_accumulation_steps=2", "--eval_iters=1",
            "--log_interval=1", "--eval_interval=3", "--warmup_iters=1", "--learning_rate=1e-2", "--lr_schedule=wsd",
            "--decay_frac=0.0", "--optimizer=muonclip", "--qk_clip_tau=0.05",  # wsd without decay: max_iters changes no lr
            "--muon_momentum_warmup=4", "--embed_lr=3e-2",  # both set from the step: a resume must give the same
            "--muon_schedule=polar_express", "--normuon_beta2=0.9", "--cautious_wd=True"]  # NorMuon's state resumes
    whole, _ = assert_resume_reproduces(lambda out, *more: run_train(monkeypatch, *args, f"--out_dir={out}", *more),
                                        tmp_path, 6, 3, keys=("loss", "max_logit"))
    assert all(len(r["max_logit"]) == 2 for r in read_log(whole) if "loss" in r)  # one per layer


def test_muon_momentum_warms_up_from_085_and_embed_lr_follows_the_schedule(tiny_data, tmp_path, monkeypatch):
    run = run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--batch_size=4", "--max_iters=3",
                    "--eval_iters=1", "--warmup_iters=0", "--lr_schedule=wsd", "--decay_frac=0.0", "--optimizer=muon",
                    "--learning_rate=1e-3", "--muon_momentum_warmup=4", "--muon_momentum=0.95", "--embed_lr=0.1")
    # steps 0, 1, 2 trained; the loop's last pass sets the schedule of step 3 before it stops
    assert run["optim"].muon.param_groups[0]["momentum"] == pytest.approx(0.85 + 3 / 4 * 0.10)
    assert [g["lr"] for g in run["optim"].adamw.param_groups if "lr_ratio" in g] == [pytest.approx(0.1)]


def test_normuon_is_refused_on_fsdp_sharded_matrices(tiny_model, monkeypatch):
    monkeypatch.setattr(optim, "DTensor", torch.nn.Parameter)  # as if FSDP2 had sharded every parameter
    with pytest.raises(ValueError, match="^normuon_beta2 keeps a moment per matrix row, which FSDP2 does not shard"):
        configure_optimizers(tiny_model(), "muon", normuon_beta2=0.95)


@pytest.mark.parametrize("bad, words", [("--optimizer=sgd", "unknown optimizer"), ("--qk_norm=True", "qk_norm"),
                                        ("--muon_schedule=cubic", "muon_schedule"),
                                        ("--normuon_beta2=1.5", "normuon_beta2"),
                                        ("--learning_rate=0", "learning_rate must be positive")])
def test_bad_optimizer_settings_give_one_line_errors(tiny_data, tmp_path, monkeypatch, bad, words):
    with pytest.raises(SystemExit, match=f"^error: .*{words}"):
        run_train(monkeypatch, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--optimizer=muonclip", bad)
