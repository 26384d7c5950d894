"""
Optimizers shared by train.py and grpo.py; configure_optimizers builds the parameter groups for every stage alike:
- 'adamw': AdamW (Loshchilov & Hutter 2019) on everything, with weight decay on matrices (every >= 2-D weight:
  linear layers and embeddings) and none on vectors (norm gains), fused into one kernel on CUDA.
- 'muon': Muon (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024) on the hidden
  matrices, AdamW as above on the rest: embeddings, output head, routers, norms and every other vector.
- 'muonclip': Muon plus QK-Clip (Kimi K2, arXiv 2507.20534 §2.1), which the stage applies after each step through
  QKClip, because it needs the attention logits of the step's forward passes.
Under any of them Engram tables (model.py) train by sparse rows with SparseAdam, and clip_grad_norm_ takes their
sparse gradients. A group's 'lr_ratio' is its peak learning rate over the stage's `learning_rate`: the schedule
sets group['lr'] = lr * group.get('lr_ratio', 1), so that Muon and AdamW warm up and decay together.
Under FSDP2 (--fsdp) parameters, gradients and states are DTensors of which each rank holds some rows: AdamW works on
them as they are, Muon gathers each matrix whole on one rank for Newton-Schulz, clip_grad_norm_ and QK-Clip see the
whole model, and load_state cuts a checkpoint's whole states to this rank's rows.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from kernel import cuda_graph

try:
    from torch.distributed.tensor import DTensor  # FSDP2's sharded tensors
except ImportError:  # a torch without torch.distributed (as on some macOS builds): nothing is one
    DTensor = ()


# -----------------------------------------------------------------------------
# Muon

# Newton-Schulz schedules: the margin the input's norm is divided by, then (a, b, c) of each iteration
NEWTON_SCHULZ = {
    # Keller Jordan's Muon: one quintic, five times, fast from small singular values, leaving them in [0.7, 1.2]
    "jordan": (1.0, [(3.4445, -4.7750, 2.0315)] * 5),
    # Polar Express (Amsel et al. 2025, arXiv 2505.16932 §4): each iteration the minimax-optimal quintic for the
    # singular values the previous ones leave, the norm taken 2% larger against bf16's rounding (modded-nanogpt's)
    "polar_express": (1.02, [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                             (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                             (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                             (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                             (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]),
}


def orthogonalize(G, schedule="jordan"):
    """U V^T of G = U S V^T, approximately, by a Newton-Schulz schedule (NEWTON_SCHULZ): its quintics trade exactness
    for speed, leaving singular values near 1 instead of exactly 1, which training does not notice. In bf16; batched
    over leading dimensions. Each iteration is three batched matmuls, the sums riding along to save launches."""
    margin, coefficients = NEWTON_SCHULZ[schedule]
    tall = G.size(-2) > G.size(-1)
    X = G.bfloat16().mT if tall else G.bfloat16()  # the wide orientation: X X^T is the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)  # spectral norm <= Frobenius norm: inside the basin
    shape, X = X.shape, X.reshape(-1, *X.shape[-2:])
    for a, b, c in coefficients:
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A A) X
    X = X.view(shape)
    return X.mT if tall else X


def logical_matrices(p, t):
    """Views of t (p's shape) as the logical matrices p's rows hold (`logical_rows`: q | k | v, gate | up), or whole."""
    return t.split(getattr(p, "logical_rows", None) or t.size(-2), dim=-2)


# An A x B matrix whose singular values are all 1 has RMS 1/sqrt(max(A, B)); each rule rescales that.
MUON_LR_SCALES = {
    # Moonlight (arXiv 2502.16982 §2): RMS 0.2, AdamW's typical update RMS, so AdamW's lr and weight decay carry over
    "moonshot": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
    # modded-nanogpt: RMS 1/sqrt(cols) = 1/sqrt(fan_in) for tall and wide alike, with Muon's own lr of about 0.02
    "shape": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),
}


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Keller Jordan 2024) for weight matrices (out, in), or stacks of them
    (experts, out, in): Nesterov momentum, then each matrix's update replaced by its nearest semi-orthogonal matrix,
    scaled by the lr_scale rule, with decoupled weight decay p <- p (1 - lr wd). Each logical matrix of a fused one
    (logical_matrices: q | k | v, gate | up) is orthogonalized and scaled alone; momentum covers the whole parameter.
    A step is a few large kernels rather than a few per matrix, since at small batches launching them costs more than
    the arithmetic: the momentum and the final update are foreach ops over all parameters, and every logical matrix
    of one shape joins one batched Newton-Schulz call (modded-nanogpt's scheme).
    Under torch.distributed (gradients already averaged) each rank takes a contiguous share of each batch and all_gather
    hands every rank the whole result, overlapping the next batch; every rank applies the same update and keeps every
    momentum buffer (cheap, and rank 0's state_dict is complete for any world size). FSDP2: orthogonalize_sharded.
    Speedrun candidates, off by default: schedule='polar_express' (NEWTON_SCHULZ), beta2 > 0 (NorMuon's row
    normalization, normalize_rows), cautious=True (weight decay only where the update also moves p towards 0)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, lr_scale="shape", schedule="jordan",
                 beta2=0.0, cautious=False, graph=False):
        if lr_scale not in MUON_LR_SCALES:
            raise ValueError(f"unknown muon_lr_scale '{lr_scale}' (choose {', '.join(MUON_LR_SCALES)})")
        if schedule not in NEWTON_SCHULZ:
            raise ValueError(f"unknown muon_schedule '{schedule}' (choose {', '.join(NEWTON_SCHULZ)})")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lr_scale=lr_scale,
                                      schedule=schedule, beta2=beta2, cautious=cautious))
        self.graph = graph
        self.graphs = {}  # group index -> capture's (graph, gradients, factors)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint of a version before a setting existed: the setting's default
            group.update({key: value for key, value in self.defaults.items() if key not in group})
        self.graphs = {}  # the state's buffers are new tensors: capture again

    @torch.no_grad()
    def step(self):
        """graph=True (CUDA, one process, no DTensor): each group's whole step replays as one CUDA graph (one launch,
        not hundreds), its gradients copied in and its factors filled in. The same kernels either way."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]  # the same on every rank under DDP
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                if group["beta2"] and "row_moments" not in self.state[p]:
                    self.state[p]["row_moments"] = p.new_zeros(p.shape[:-1])
            grads = [p.grad for p in params]
            factors = (1 - group["momentum"], group["momentum"], group["lr"], 1 - group["lr"] * group["weight_decay"])
            if not (self.graph and world == 1 and len(params) == len(group["params"])):
                self.update(group, params, grads, *factors, rank=rank, world=world)
                continue
            if i not in self.graphs:
                self.graphs[i] = self.capture(group, params, grads, len(factors))
            replay, static_grads, static_factors = self.graphs[i]
            torch._foreach_copy_(static_grads, grads)
            for tensor, value in zip(static_factors, factors):
                tensor.fill_(value)
            replay()

    def capture(self, group, params, grads, n_factors):
        factors = [torch.zeros((), dtype=torch.float32, device=grads[0].device) for _ in range(n_factors)]
        grads = [torch.zeros_like(g) for g in grads]
        return cuda_graph(lambda: self.update(group, params, grads, *factors)), grads, factors

    def update(self, group, params, grads, fresh, momentum, lr, decay, rank=0, world=1):
        """One step of the parameters, in place; the factors are numbers, or 0-d tensors (a graph's inputs)."""
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        scaled = torch._foreach_mul(grads, fresh)
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, scaled)  # M <- beta M + (1 - beta) G
        updates = torch._foreach_mul(buffers, momentum)
        torch._foreach_add_(updates, scaled)  # Nesterov: (1 - beta) G + beta M
        orthogonalize_all = self.orthogonalize_sharded if isinstance(params[0], DTensor) else self.orthogonalize_updates
        orthogonalize_all(params, updates, MUON_LR_SCALES[group["lr_scale"]], group["schedule"], rank, world)
        if group["beta2"]:
            self.normalize_rows(params, updates, [self.state[p]["row_moments"] for p in params], group["beta2"])
        if group["cautious"]:  # Cautious Weight Decay (arXiv 2510.12402 §3): only where the update shrinks p too
            for p, u in zip(params, updates):
                p.copy_(torch.where(u * p >= 0, p * decay, p))
        else:
            torch._foreach_mul_(params, decay)  # decoupled weight decay: p <- p (1 - lr wd)
        torch._foreach_mul_(updates, lr)
        torch._foreach_sub_(params, updates)

    @staticmethod
    def normalize_rows(params, updates, moments, beta2):
        """NorMuon (Li et al. 2025, arXiv 2510.05491, Algorithm 1): an orthogonalized update's rows (output neurons)
        have unequal norms; each row is divided by the root of an EMA of its mean square, then each logical matrix is
        scaled back to its norm before, so that the lr_scale rule still sets its size."""
        for p, u, v in zip(params, updates, moments):
            v.lerp_(u.square().mean(dim=-1), 1 - beta2)
            normed = u * v.clamp(min=1e-20).rsqrt()[..., None]
            for part, new in zip(logical_matrices(p, u), logical_matrices(p, normed)):
                before, after = (t.norm(dim=(-2, -1), keepdim=True) for t in (part, new))  # per matrix of a stack
                part.copy_(new * (before / after.clamp(min=1e-20)))

    @classmethod
    def orthogonalize_updates(cls, params, updates, scale, schedule="jordan", rank=0, world=1):
        """The whole updates, in place: each shape's logical matrices in one call, split over the ranks, and scaled."""
        batches = {}  # (rows, cols) -> views of the updates' logical matrices of that shape
        for p, u in zip(params, updates):
            for part in logical_matrices(p, u):
                batches.setdefault(part.shape[-2:], []).append(part)
        pending = [cls.orthogonalize_share(shape, parts, schedule, rank, world) for shape, parts in batches.items()]
        for (shape, parts), (result, gather) in zip(batches.items(), pending):
            if gather is not None:
                gather.wait()
            result *= scale(*shape)
            results = result.split([part[..., 0, 0].numel() for part in parts])
            torch._foreach_copy_(parts, [X.view(part.shape) for X, part in zip(results, parts)])

    @classmethod
    def orthogonalize_sharded(cls, params, updates, scale, schedule, rank, world):
        """Under FSDP2 each rank holds some rows of every update (a DTensor on Shard(0)), and Newton-Schulz needs whole
        matrices: each parameter gets an owner (the least loaded rank, in turn), one all_to_all sends the rows to the
        owners, which orthogonalize them as one process does, and a second sends them back. A rank holds about
        1/world of the updates, in bf16 (Newton-Schulz's precision), where an all-gather of each would hold them all."""
        load, owner = [0] * world, []
        for u in updates:
            owner.append(load.index(min(load)))
            load[owner[-1]] += u.numel()
        theirs = [[i for i, o in enumerate(owner) if o == r] for r in range(world)]  # rank r's updates
        local = [u.to_local() for u in updates]

        def size(i, r):  # elements of update i on rank r: Shard(0) splits the rows as torch.chunk does
            n = updates[i].size(0)
            return max(0, min(-(-n // world), n - r * -(-n // world))) * (updates[i].numel() // n)

        def exchange(out, sizes):  # all_to_all: the pieces out[r] go to rank r; from rank r come pieces of sizes[r]
            send = torch.cat([t.flatten() for ts in out for t in ts] + [local[0].new_empty(0, dtype=torch.bfloat16)])
            recv = send.new_empty(sum(map(sum, sizes)))
            dist.all_to_all_single(recv, send, [sum(s) for s in sizes], [sum(t.numel() for t in ts) for ts in out])
            pieces = iter(recv.split([n for s in sizes for n in s]))
            return [[next(pieces) for _ in s] for s in sizes]

        mine = theirs[rank]
        got = exchange([[local[i].bfloat16() for i in ids] for ids in theirs],
                       [[size(i, r) for i in mine] for r in range(world)])
        whole = [torch.cat([got[r][j] for r in range(world)]).view(updates[i].shape) for j, i in enumerate(mine)]
        cls.orthogonalize_updates([params[i] for i in mine], whole, scale, schedule)
        rows = [w.flatten().split([size(i, r) for r in range(world)]) for w, i in zip(whole, mine)]
        back = exchange([[rows_i[r] for rows_i in rows] for r in range(world)],
                        [[size(i, rank) for i in ids] for ids in theirs])
        for ids, pieces in zip(theirs, back):
            for i, piece in zip(ids, pieces):
                local[i].copy_(piece.view_as(local[i]))

    @staticmethod
    def orthogonalize_share(shape, parts, schedule, rank, world):
        """Newton-Schulz on this rank's contiguous share of a batch of (rows, cols) matrices: its result (all of the
        batch's, once the returned gather, if any, is done) and the gather."""
        X = torch.cat([part.reshape(-1, *shape) for part in parts])
        if world == 1:
            return orthogonalize(X, schedule), None
        share = -(-len(X) // world)
        result = torch.zeros(world * share, *shape, dtype=torch.bfloat16, device=X.device)
        mine = X[rank * share:][:share]
        if len(mine):
            result[rank * share:][:len(mine)] = orthogonalize(mine, schedule)
        gather = dist.all_gather_into_tensor(result, result[rank * share:][:share].clone(), async_op=True)
        return result[:len(X)], gather  # the last share may be short: world * share rows, len(X) of them matrices


class Optimizers:
    """Optimizers of disjoint parameters (muon, adamw, sparse_adam) as one: each an attribute and a state_dict key."""

    def __init__(self, **parts):
        self.parts = parts
        vars(self).update(parts)

    @property
    def param_groups(self):  # read afresh: load_state_dict replaces the group dicts
        return [group for part in self.parts.values() for group in part.param_groups]

    def step(self):
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none=True):
        for part in self.parts.values():
            part.zero_grad(set_to_none)

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict):
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])


def clip_grad_norm_(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ of an iterable of parameters, sparse gradients (Engram's; torch's fails) too."""
    params = [p for p in parameters if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:  # rows looked up twice summed first: the norm of the gradient, not of its pieces
            p.grad = p.grad.coalesce()
    sparse = [p.grad._values() for p in params if p.grad.is_sparse]  # the touched rows, a view of the gradient
    local = [p.grad for p in params if not p.grad.is_sparse and not isinstance(p.grad, DTensor)] + sparse
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local))) if local else torch.zeros(())
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if sharded:  # FSDP2's (torch >= 2.6): the norm over every rank's rows, beside that of the replicated gradients
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
        total = torch.linalg.vector_norm(torch.stack([total.to(norm.device), norm]))
        torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, total)
    if local:  # the coefficient torch's clip applies
        torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0).to(local[0].device))
    return total


# -----------------------------------------------------------------------------
# QK-Clip

class QKClip:
    """The clip of MuonClip (Kimi K2, arXiv 2507.20534 §2.1): Muon lets attention logits grow until training spikes, so
    after each optimizer step every head whose largest pre-softmax logit exceeded tau has its query and key weights
    scaled down until that logit is tau (the step's own update untouched). Works on every module with a
    `qk_clip(max_logits, tau)` method and a `track_max_logits` switch (CausalSelfAttention): while it is on, forward
    appends the per-head maximum logit (n_head,) to aux["max_logits"], in forward order. Per step: track(True); each
    micro-step observe(aux) of model(x, y); track(False); optimizer.step(); max_logit_per_layer = clip()."""

    def __init__(self, model, tau):
        self.layers = [m for m in model.modules() if hasattr(m, "qk_clip")]
        self.tau = tau
        self.max_logits = None  # (layers, n_head): the maximum over the observed forward passes

    def track(self, on):
        for layer in self.layers:
            layer.track_max_logits = on

    def observe(self, aux):
        max_logits = torch.stack(aux["max_logits"])
        assert len(max_logits) == len(self.layers), "one maximum per attention layer and forward pass"
        self.max_logits = max_logits if self.max_logits is None else torch.maximum(self.max_logits, max_logits)

    @torch.no_grad()
    def clip(self):
        """Clip the heads above tau; returns each layer's largest logit over the observed passes (floats)."""
        if dist.is_initialized():  # the largest logit over every rank's data: all replicas must clip alike
            dist.all_reduce(self.max_logits, op=dist.ReduceOp.MAX)
        for layer, max_logits in zip(self.layers, self.max_logits):
            # FSDP2: the layer's sharded weights swapped for whole ones, clipped, and this rank's rows kept
            sharded = [(m, name, p) for m in layer.modules() for name, p in m._parameters.items()
                       if isinstance(p, DTensor)]
            for m, name, p in sharded:
                m._parameters[name] = p.full_tensor()
                m._parameters[name].logical_rows = getattr(p, "logical_rows", None)  # q | k | v
            layer.qk_clip(max_logits, self.tau)
            for m, name, p in sharded:
                p.to_local().copy_(local_rows(m._parameters[name], p))
                m._parameters[name] = p
        per_layer, self.max_logits = self.max_logits.amax(dim=1).tolist(), None
        return per_layer


# -----------------------------------------------------------------------------
# FSDP2: whole tensors and each rank's rows

def local_rows(full, p):
    """This rank's rows of full, a whole tensor of p's shape, where p is a DTensor as FSDP2 shards parameters:
    Shard(0), the rows split as torch.chunk splits them (the last ranks may hold fewer, or none)."""
    rows = -(-full.size(0) // p.device_mesh.size())
    return full[p.device_mesh.get_local_rank() * rows:][:rows]


def full_state(model, optimizer, master):
    """The model's and the optimizer's state_dicts (a checkpoint's "model" and "optimizer") as one process has them:
    under FSDP2 every sharded tensor (a DTensor) is gathered whole, one at a time, onto the master's CPU (None on the
    other processes), so that any world size resumes the checkpoint and sample.py and export.py read it. Collective:
    every process calls it. A tensor under two names (a tied head) stays one."""
    whole = {}

    def gather(value):
        if isinstance(value, dict):
            return {key: gather(v) for key, v in value.items()}
        if isinstance(value, list):
            return [gather(v) for v in value]
        if not isinstance(value, DTensor):
            return value.detach() if torch.is_tensor(value) else value
        if id(value) not in whole:
            full = value.detach().full_tensor()
            whole[id(value)] = full.cpu() if master else None
        return whole[id(value)]
    return gather(model.state_dict(keep_vars=True)), gather(optimizer.state_dict())


def load_state(optimizer, state_dict):
    """optimizer.load_state_dict of a checkpoint's whole state (any world size's, full_state's): under
    FSDP2 each state tensor of a sharded parameter becomes a DTensor of this rank's rows first."""
    parts = optimizer.parts if isinstance(optimizer, Optimizers) else {None: optimizer}
    for name, part in parts.items():
        saved = state_dict if name is None else state_dict[name]
        params = [p for group in part.param_groups for p in group["params"]]
        for i, state in saved["state"].items():
            p = params[i] if i < len(params) else None
            if isinstance(p, DTensor):  # the moments and momentum (a step count stays as it is)
                state.update({key: DTensor.from_local(local_rows(value, p).to(p.device), p.device_mesh, p.placements,
                                                      shape=p.shape, stride=p.stride())
                              for key, value in state.items() if torch.is_tensor(value) and value.shape == p.shape})
    optimizer.load_state_dict(state_dict)


# -----------------------------------------------------------------------------
# one optimizer for a stage

OPTIMIZERS = ("adamw", "muon", "muonclip")


def configure_optimizers(model, optimizer="adamw", learning_rate=6e-4, weight_decay=0.1, betas=(0.9, 0.95),
                         device_type="cpu", muon_lr=0.0, muon_momentum=0.95, muon_lr_scale="moonshot", embed_lr=0.0,
                         head_lr=0.0, muon_schedule="jordan", normuon_beta2=0.0, cautious_wd=False):
    """One optimizer object for a stage, used like any torch optimizer (step, zero_grad, param_groups, state_dict).
    muon_lr is Muon's peak learning rate; 0 picks the one its muon_lr_scale rule is calibrated for: learning_rate
    itself under 'moonshot' (the update's RMS matches AdamW's), 0.02 under 'shape' (modded-nanogpt's Muon lr).
    embed_lr > 0 gives the dense embedding tables (token and value embeddings) AdamW groups of that peak lr, and
    head_lr an untied output head: modded-nanogpt and nanochat train the embedding tens of times faster than the
    head and the matrices; with no weight decay, as there, since lr * weight_decay at such rates would erase them."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}' (choose {', '.join(OPTIMIZERS)})")
    # An Engram table (nn.Embedding, sparse=True) gets SparseAdam, a lazy Adam (no weight decay) whose step touches
    # only the rows its batch looked up (its cost does not grow with the table); never Muon: rows are no linear map.
    sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad]
    if sparse and dist.is_initialized() and dist.get_backend() == "nccl":
        raise ValueError("Engram tables have sparse gradients, which DDP all-reduces over gloo but not over NCCL: "
                         "train them on one GPU (or CPU processes)")
    params = [p for p in model.parameters() if p.requires_grad and not any(p is t for t in sparse)]
    # Muon is for the hidden matrices: embeddings (rows train only when their token shows up) and the output head (a
    # classifier over the vocabulary) stay with AdamW, as in the Muon reference, and so do the tiny, skinny maps that
    # model.py marks p.muon = False (routers, hyper-connections' mixing weights, Gated DeltaNet's filters).
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(model.lm_head.weight)} - embeddings  # none of its own when tied: the head is the token embedding
    matrices = [p for p in params if optimizer != "adamw" and p.dim() >= 2 and id(p) not in embeddings | head
                and getattr(p, "muon", True)]
    in_muon = {id(p) for p in matrices}
    if normuon_beta2 and any(isinstance(p, DTensor) for p in matrices):
        raise ValueError("normuon_beta2 keeps a moment per matrix row, which FSDP2 does not shard: train without "
                         "--fsdp, or with normuon_beta2=0")
    if head_lr and not head:
        raise ValueError("head_lr needs an output head of its own (tie_embeddings=False); a tied one is the "
                         "embedding: set embed_lr")
    own = [(lr, ids) for lr, ids in ((embed_lr, embeddings), (head_lr, head)) if lr]
    if learning_rate <= 0 and (own or optimizer != "adamw"):
        raise ValueError("learning_rate must be positive: muon_lr, embed_lr and head_lr are ratios to it")
    rest = [p for p in params if id(p) not in in_muon and not any(id(p) in ids for _, ids in own)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    groups += [{"params": [p for p in params if id(p) in ids], "weight_decay": 0.0, "lr_ratio": lr / learning_rate}
               for lr, ids in own]
    parts = {}
    if optimizer != "adamw":
        muon_lr = muon_lr or (learning_rate if muon_lr_scale == "moonshot" else 0.02)
        parts["muon"] = Muon(matrices, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay,
                             lr_scale=muon_lr_scale, schedule=muon_schedule, beta2=normuon_beta2, cautious=cautious_wd,
                             graph=device_type == "cuda" and not dist.is_initialized())
        parts["muon"].param_groups[0]["lr_ratio"] = muon_lr / learning_rate
    parts["adamw"] = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
    if sparse:
        parts["sparse_adam"] = torch.optim.SparseAdam(sparse, lr=learning_rate, betas=betas)
    return parts["adamw"] if len(parts) == 1 else Optimizers(**parts)
