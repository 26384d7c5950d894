"""
Fast paths of model.py, which writes plainly what each computes (the reference each is tested against): FlexAttention's
block masks, MoBA's block-by-block attention, a permutation whose backward is a gather, grouped decode attention, the
experts' grouped GEMM, a cross-entropy without an fp32 copy of the logits, QK-Clip's largest logits by chunks, chunked
linear attention, and CUDA graphs (the decode step, Muon's step). The spans that use FlexAttention import it when one is
built (it loads torch._dynamo: seconds); nothing here imports or compiles while torch.compile traces.
"""
import functools
import math

import torch
import torch.nn.functional as F


def cross_entropy(logits, targets):
    """F.cross_entropy(logits, targets, ignore_index=-1) in fp32, as logsumexp minus the target's logit picked by a
    comparison instead of a gather, so that torch.compile reads the logits (N, V) once forward and once backward
    (softmax minus one-hot) and never keeps an fp32 copy of them."""
    logits = logits.float()
    is_target = torch.arange(logits.size(-1), device=logits.device) == targets[:, None]  # (N, V)
    losses = logits.logsumexp(dim=-1) - torch.where(is_target, logits, 0.0).sum(dim=-1)
    keep = targets != -1
    return (losses * keep).sum() / keep.sum()


class Permute(torch.autograd.Function):
    """x[order] for a permutation `order` of x's rows and its `inverse`: the backward is the gather grad[inverse], not
    autograd's scatter-add with atomics that first sorts the indices. MoBA's pairs and MoE's tokens use it."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x[order]

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.saved_tensors[0]], None, None


permute = Permute.apply


@functools.cache
def eager(fn):
    """fn, run eagerly under torch.compile; made at first use: torch.compiler loads torch._dynamo (seconds)."""
    return torch.compiler.disable(fn)


def grouped_attention(q, k, v, mask, scale=None):
    """Softmax attention of q (B, n_head, T, d) over k and v (B, n_kv_head, S, d) under a boolean mask: (T, S), (B|1, 1,
    T, S) or (B, n_head, T, S). Each key head's query heads are rows of one matmul against it in the input dtype, the
    softmax in fp32. On CUDA, SDPA with enable_gqa and a mask takes its math path (keys and values copied per query
    head, fp32 matmuls): this wins from two query tokens on (speculative rounds); for one, inductor fuses it."""
    B, H, T, d = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    scores = (q.reshape(B, kv_heads, -1, d) @ k.mT).float() * (d ** -0.5 if scale is None else scale)
    allowed = mask.expand(B, H, T, S).unflatten(1, (kv_heads, -1)).flatten(2, 3)  # (B, n_kv_head, group * T, S)
    # a query that sees no key (left padding) gets zeros, as from SDPA, not the NaNs of an empty softmax
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).masked_fill(~allowed, 0.0).type_as(v)
    return (weights @ v).view(B, H, T, -1)


def grouped_mm_supported(x, w):
    """torch._grouped_mm (PyTorch >= 2.8): bf16 on CUDA GPUs of compute capability 9.0 and up, 16-byte aligned rows."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and dtype == torch.bfloat16 and w.size(-1) % 8 == 0
            and w.size(-2) % 8 == 0 and torch.cuda.get_device_properties(x.device).major >= 9)  # constant to compile


def grouped_mm(x, w, counts):
    """x (M, in) rows grouped by expert, counts (E,) rows per expert, w (E, out, in) -> (M, out): one grouped GEMM."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return torch._grouped_mm(x.to(dtype), w.to(dtype).mT, offs=counts.cumsum(0).to(torch.int32))


compiled_flex_attention = None  # FlexAttention compiled alone, made at its first use (flex)
BLOCK_MASK_LENGTHS = torch.__version__ >= "2.6"  # a constant while torch.compile traces pair_block_mask
STATIC_BLOCK_MASKS = {}  # shared by every layer with the same pattern


def flex(q, k, v, block_mask, scale, return_lse=False):
    """FlexAttention: its fused kernel on CUDA (eager FlexAttention would materialize every score), eager elsewhere.
    return_lse=True also returns each query's log-sum-exp of its scores (B, n_head, T), which gradients flow through."""
    global compiled_flex_attention
    if not q.is_cuda:  # in a compiled model, inductor's CPU lowering miscomputes transposed views (torch 2.13)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    attend = torch.nn.attention.flex_attention.flex_attention  # inside a compiled model, inductor fuses it
    if q.is_cuda and not torch.compiler.is_compiling():  # an eager model on CUDA: FlexAttention compiled alone
        attend = compiled_flex_attention = compiled_flex_attention or torch.compile(attend, dynamic=False)
    return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.size(1) != q.size(1), return_lse=return_lse)


def static_block_mask(key, allowed, T, device):
    """The BlockMask of allowed(query position, key position) over T tokens, built once per key, T and device."""
    key = (key, T, str(device))
    if key not in STATIC_BLOCK_MASKS:
        STATIC_BLOCK_MASKS[key] = torch.nn.attention.flex_attention.create_block_mask(
            lambda b, h, q, k: allowed(q, k), None, None, T, T, device=device)
    return STATIC_BLOCK_MASKS[key]


def moba_attention(q, k, v, top, real, size, scale):
    """MoBA's training attention through FlexAttention as the paper computes it (arXiv 2502.13189 §2.3): every query
    attends its own block of `size` keys causally and, apart, each earlier block it chose (top (B, H, T, m) block
    indices, real: whether each is a block); the parts merge by their log-sum-exps into one softmax over all. For the
    second part the (query, chosen block) pairs are sorted by block, so that a tile of 128 pairs meets a block or two;
    tiles of the queries themselves would meet the union of all their choices."""
    B, H, T, d = q.shape
    own = static_block_mask(("moba", size), lambda q_pos, k_pos: (k_pos <= q_pos) & (k_pos // size == q_pos // size),
                            T, q.device)
    y_own, lse_own = flex(q, k, v, own, scale, return_lse=True)
    m = top.size(-1)
    if m == 0:  # a single block: nothing before it
        return y_own
    block = torch.where(real, top, -1).flatten(2)  # (B, H, P = T * m) each pair's block; -1 = none (masked out)
    P = block.size(-1)
    # the block numbers as 16-bit keys where they fit: a radix sort then passes over 16 bits, not 64
    order = (block.to(torch.int16) if k.size(2) // size < 2 ** 15 else block).argsort(dim=-1, stable=True)
    inverse = torch.empty_like(order).scatter_(-1, order, torch.arange(P, device=q.device).expand_as(order))
    block = block.gather(-1, order)
    # the sorts as permutations of all B * H * P pair rows, so that their backward is a gather too
    offset = torch.arange(B * H, device=q.device).view(B, H, 1) * P
    order, inverse = (order + offset).flatten(), (inverse + offset).flatten()
    pairs = permute(q.repeat_interleave(m, dim=2).flatten(0, 2), order, inverse).view(B, H, P, d)
    y, lse = flex(pairs, k, v, pair_block_mask(block, k.size(2), size), scale, return_lse=True)
    y = permute(y.flatten(0, 2), inverse, order).view(B, H, T, m, -1)
    lse = permute(lse.flatten(), inverse, order).view(B, H, T, m)
    # softmax over the parts' log-sum-exps: each part's share of the whole softmax (an empty part's lse is -inf)
    share = torch.softmax(torch.cat([lse_own[..., None], lse], dim=-1), dim=-1)
    return (share[..., :1] * y_own + (share[..., 1:, None] * y).sum(dim=3)).type_as(y_own)


def pair_block_mask(block, S, size):
    """The BlockMask of sorted (query, key block) pairs, block (B, H, P) each pair's key block of `size` keys (-1:
    none), over S keys: a tile of 128 pairs visits the key tiles from its first block's to its last's; the mask_mod
    keeps each pair's own block. Built from both sides at once: BlockMask.from_kv_blocks would find the pair tiles
    visiting each key tile (for the backward) by sorting a dense tile map."""
    B, H, P = block.shape
    tile, key_tiles = 128, math.ceil(S / 128)  # FlexAttention's default BLOCK_SIZE
    tiles = F.pad(block, (0, (-P) % tile), value=-1).view(B, H, -1, tile)
    pair_tiles = tiles.size(2)
    last = tiles.amax(dim=-1)  # -1: a tile of no pair
    first_tile = torch.where(tiles >= 0, tiles, last[..., None]).amin(dim=-1).clamp(min=0) * size // tile
    last_tile = (((last + 1) * size - 1) // tile).clamp(max=key_tiles - 1)
    count = torch.where(last >= 0, last_tile - first_tile + 1, 0)
    # a tile whose pairs all chose one block sees all of each key tile of it (when blocks are whole key tiles):
    # FlexAttention then skips the mask_mod there, which is most tiles, since a block is chosen by many pairs
    whole = (tiles.amin(dim=-1) == last) & (last >= 0) & (size % tile == 0)
    # the other side, for the backward: the tiles of no pair sort first and the others' key tile ranges only move
    # forward, so the pair tiles visiting key tile j are one run lo..hi
    j = torch.arange(key_tiles, device=block.device)[:, None]
    empty = (count == 0)[..., None, :]  # (B, H, 1, pair tiles)
    lo = (empty | (last_tile[..., None, :] < j)).sum(dim=-1)  # (B, H, key tiles)
    hi = (empty | (first_tile[..., None, :] <= j)).sum(dim=-1) - 1

    def indices(start, n):
        return (start[..., None] + torch.arange(n, device=block.device)).clamp(0, n - 1).int()

    if size % tile:  # blocks within key tiles: every visit needs the mask_mod
        part_count, full_count = hi - lo + 1, torch.zeros_like(lo)
        part_indices = full_indices = indices(lo, pair_tiles)
    else:  # only the run's ends can be partial: a tile strictly inside it holds pairs of j's block alone
        lo_part = ((hi >= lo) & ~whole.gather(-1, lo.clamp(max=pair_tiles - 1))).long()
        hi_part = ((hi > lo) & ~whole.gather(-1, hi.clamp(min=0))).long()
        part_count = lo_part + hi_part
        first_end = torch.arange(pair_tiles, device=block.device) < lo_part[..., None]  # lo listed before hi
        part_indices = torch.where(first_end, lo[..., None], hi[..., None]).clamp(min=0).int()
        full_count, full_indices = hi - hi_part - lo - lo_part + 1, indices(lo + lo_part, pair_tiles)

    kv_indices = indices(first_tile, key_tiles)  # partial and full tiles alike: a run from the first
    # torch 2.5's BlockMask has no seq_lengths: it takes whole tiles, the queries' and keys' own lengths then
    lengths = {"seq_lengths": (P, S)} if BLOCK_MASK_LENGTHS else {}
    return torch.nn.attention.flex_attention.BlockMask(
        **lengths, BLOCK_SIZE=(tile, tile), mask_mod=lambda b, h, q, k: k // size == block[b, h, q],
        kv_num_blocks=torch.where(whole, 0, count).int(), kv_indices=kv_indices,
        full_kv_num_blocks=torch.where(whole, count, 0).int(), full_kv_indices=kv_indices,
        q_num_blocks=part_count.clamp(min=0).int(), q_indices=part_indices,
        full_q_num_blocks=full_count.clamp(min=0).int(), full_q_indices=full_indices)


@torch.no_grad()
def max_attention_logits(q, k, mask=None, scale=None, chunk=256):
    """For QK-Clip (optim.py): each head's largest logit q.k * scale (None: d^-0.5) over the batch, which SDPA never
    exposes, of q (B, n_head, T, d), k (B, n_kv_head, T, d), causal or under a span's mask (T, T) or (B, n_head, T, T).
    (n_head,) fp32; chunked over queries, at most B*n_head*chunk*T logits at once."""
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
    return best * (d ** -0.5 if scale is None else scale)


# -----------------------------------------------------------------------------
# linear attention in chunks: the training forms of model.py's recurrent references

def linear_attention_chunked(q, k, v, state, chunk):
    """Causal linear attention o_t = q_t S_t, S_t = S_{t-1} + k_t v_t^T, in chunks: inside a chunk the quadratic form
    (q k^T, causal) v, across chunks the state before each chunk (an exclusive cumsum of the chunks' k^T v).
    q, k (B, H, T, d_k), v (B, H, T, d_v), state (B, H, d_k, d_v) -> o (B, H, T, d_v) and the final state."""
    T = q.size(2)
    q, k, v = (F.pad(t, (0, 0, 0, -T % chunk)).unflatten(2, (-1, chunk)) for t in (q, k, v))  # (B, H, n, C, d)
    kv = k.mT @ v  # (B, H, n, d_k, d_v): each chunk's sum of k v^T (zero-padded keys add nothing)
    before = state[:, :, None] + kv.cumsum(dim=2) - kv  # the state entering each chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    o = q @ before + ((q @ k.mT) * causal) @ v
    return o.flatten(2, 3)[:, :, :T], before[:, :, -1] + kv[:, :, -1]


def gated_delta_rule_chunked(q, k, v, beta, g, state, chunk):
    """Gated delta rule (Gated DeltaNet, arXiv 2412.06464 §3) S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,
    o_t = S_t^T q_t, with a_t = exp(g_t), in chunks (the paper's §3.3 WY form): inside a chunk the sequential writes
    become one unit-triangular solve, T_c = (I - A)^-1 with A_ij = -b_i (k_i . k_j) exp(G_i - G_j) for j < i, G the
    cumulative log-decay; pseudo-values U = T_c (b v) and decayed keys W = T_c (b exp(G) k) then carry the chunk as
    v_new = U - W S, o = (q exp(G)) S + (q k^T * exp(G_i - G_j), causal) v_new,
    S <- exp(G_C) S + (k exp(G_C - G))^T v_new.
    That last step is an affine map of S per chunk, so the states entering the chunks come from a parallel scan of
    the maps (log2(chunks) batched steps, no loop over chunks to unroll under torch.compile).
    q, k (B, H, T, d_k), v (B, H, T, d_v), beta and g (B, H, T), state (B, H, d_k, d_v); fp32."""
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


# -----------------------------------------------------------------------------
# CUDA graphs

def cuda_graph(fn):
    """fn (no arguments, fixed shapes, tensors read and written in place, no host sync) replayed as one CUDA graph: a
    call is one launch, no Python and no guard checks, where launching the kernels one by one costs the host more time
    than the GPU takes to run them (a decode step at batch 1, Muon's step at small batches; torch.compile's
    mode='reduce-overhead' spends more host time per call). Every call does fn's work once: the first runs fn
    (compiling it) on a side stream, the second captures fn there and replays it. Returns fn's output: after the first
    call the graph's tensors, overwritten by the next."""
    stream, graph, out, warm = torch.cuda.Stream(), None, None, False

    def call():
        nonlocal graph, out, warm
        if graph is None:
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
