"""
Generation with the KV cache of model.py: sampling (temperature, top-k, top-p, seeded), a decode step with fixed shapes
that compiles and replays as one CUDA graph, and self-speculative decoding with the MTP module as the draft (Leviathan
et al. 2023, arXiv 2211.17192), through the model's new_cache, decode_context, hidden_states, logits and mtp[0].draft.

    for tokens in generate(model, prompts, 100, temperature=0.8, top_k=200):  # (B,) new tokens per step
        ...
"""
import collections
from dataclasses import dataclass

import torch

from kernel import cuda_graph, grouped_mm_supported
from model import Experts


# -----------------------------------------------------------------------------
# sampling

def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, noise=None):
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else top-k and nucleus sampling
    by the exponential race with Exp(1) noise (B, V), the generator's or `noise` (a captured graph's input)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if noise is None:
        noise = torch.empty(logits.shape, device=logits.device).exponential_(generator=generator)
    return exponential_race(sampling_probs(logits, temperature, top_k, top_p), noise)


def sampling_probs(logits, temperature, top_k=0, top_p=1.0):
    """The distribution (..., V) that sampling draws from: softmax(logits / temperature), within top-k and top-p."""
    # less the max: a tiny temperature sends the others to -inf, not the largest to inf (softmax: NaN), nor 0 / 0
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probabilities add up to top_p (Holtzman et al. 2019)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        outside[..., 0] = False  # the most likely token stays, also at top_p = 0
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits.softmax(dim=-1)


def exponential_race(weights, noise):
    """A sample of each row of weights (..., V) >= 0, proportionally, without torch.multinomial's host sync: with
    E_i ~ Exp(1) independent (noise), E_i / w_i ~ Exp(w_i), and the smallest is index i with probability
    w_i / sum(w), so argmax w_i / E_i is the sample (the Gumbel-max trick in another form). Zero weights never win."""
    return (weights / noise.clamp(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)


# -----------------------------------------------------------------------------
# the steps: fixed shapes, no host sync, the state read and written in place (a CUDA graph replays them)

@dataclass
class State:
    """What the decode steps read and write: settings, and tensors at fixed addresses."""
    temperature: float
    top_k: int
    top_p: float
    vocab: int             # ids sampled: those below (the tokenizer's; the model's table may be rounded up)
    token: torch.Tensor    # (B,) each row's last token, not yet in the cache
    pos: torch.Tensor      # (1,) its cache slot
    done: torch.Tensor     # (B,) rows that produced eos
    eos: torch.Tensor      # () the end-of-sequence id; -1 = none
    noise: torch.Tensor    # (B, draws, V) Exp(1) noise for sampling: a step's draws, drawn before it; None = greedy
    uniform: torch.Tensor  # (B,) speculative sampling: each draft's acceptance draw
    draft: torch.Tensor = None  # (B, V) speculative decoding: the draft's logits for the token after `token`


def pick_token(logits, state):
    """Each row's next token from logits (B, V) and state.noise[:, 0], also into state.token; done rows stay at eos."""
    noise = None if state.temperature == 0 else state.noise[:, 0]
    token = sample_next(logits[:, :state.vocab], state.temperature, state.top_k, state.top_p, noise=noise)
    token = torch.where(state.done, state.eos, token)
    state.done |= token == state.eos
    state.token.copy_(token)
    return token


def decode_step(model, cache, state):
    """One token per row: feed each row's last token at slot state.pos, pick the next and advance the state."""
    h = model.hidden_states(state.token[:, None], model.decode_context(cache, state.pos), cache)
    state.pos += 1
    return pick_token(model.logits(h)[:, -1], state)


def speculative_step(model, cache, state):
    """One round of self-speculative decoding: draft a token from the logits state.draft (B, V), verify it with one
    forward of the main model over each row's last token and the draft (slots state.pos and the next). Exact (Leviathan
    et al. 2023, arXiv 2211.17192, §2.3): greedy, the draft is accepted when it is the main model's argmax; sampling,
    with probability min(1, p/q) (p the main model's distribution, q the draft's, both after temperature, top-k and
    top-p), a rejected draft replaced by a sample of max(0, p - q), so that every token is a sample of p. Every row
    keeps the first of the two tokens after its last one; all keep the second when every row accepted (or is done). The
    MTP module drafts after both positions at once, for whichever the rows keep; the cache entries of a position not
    kept are overwritten next round. The state advances on the device, so that the host can queue the next round before
    it reads this one's outcome. Returns the tokens (B, 2) and, for the host, (4,): how many the rows keep (1 or 2), how
    many drafts were accepted, and whether every row is done after each of the two tokens."""
    s, noise, draft_logits = state, state.noise, state.draft[:, :state.vocab]
    q = None if s.temperature == 0 else sampling_probs(draft_logits, s.temperature, s.top_k, s.top_p)  # (B, V)
    draft = draft_logits.argmax(dim=-1) if q is None else exponential_race(q, noise[:, 0])
    pos = s.pos + torch.arange(2, device=draft.device)
    h = model.hidden_states(torch.stack([s.token, draft], dim=1), model.decode_context(cache, pos), cache)
    logits = model.logits(h)[..., :s.vocab]  # (B, 2, V)
    if s.temperature == 0:
        first, second = logits.argmax(dim=-1).unbind(1)
        accepted = draft == first
    else:
        p = sampling_probs(logits, s.temperature, s.top_k, s.top_p)  # (B, 2, V)
        p_draft, q_draft = p[:, 0].gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
        accepted = s.uniform * q_draft < p_draft
        first = torch.where(accepted, draft, exponential_race((p[:, 0] - q).clamp(min=0), noise[:, 1]))
        second = exponential_race(p[:, 1], noise[:, 2])
    first = torch.where(s.done, s.eos, first)
    done_first = s.done | (first == s.eos)
    second = torch.where(done_first, s.eos, second)
    done = torch.stack([done_first, done_first | (second == s.eos)], dim=1)
    tokens = torch.stack([first, second], dim=1)
    both = (accepted | s.done).all()
    drafts = model.mtp[0].draft(model, cache, h, tokens, pos, last=2)  # (B, 2, V)
    for kept, pair in ((s.draft, drafts), (s.token, tokens), (s.done, done)):  # after the second or the first
        kept.copy_(torch.where(both, pair[:, 1], pair[:, 0]))
    s.pos += 1 + both.long()
    return tokens, torch.stack([1 + both.long(), accepted.sum(), *done.all(dim=0)]).long()


# -----------------------------------------------------------------------------
# the loops

@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, generator=None,
             compiler=None, speculative=False, stats=None, check_every=16, vocab_size=None):
    """Sample continuations of a batch of prompts (lists of token ids of any lengths) with the KV cache, yielding a (B,)
    tensor of new tokens per step. Prompts are left-padded so that every row's next token lands in the same cache slot;
    one forward fills the cache (prefill), then decode_step feeds one token per row with fixed shapes and no host sync.
    A row that produced eos_id keeps yielding it; generation stops once every row has, checked every check_every tokens
    (the loop's only host sync). A full cache restarts from the most recent half of the context. compiler: see compiled
    ('aot_eager' in the CPU tests). speculative=True drafts each next token with the first MTP module and verifies it
    (speculative_step); stats, a dict, then counts rounds, drafted and accepted tokens. vocab_size: sample only ids
    below it (a tokenizer's, under a model's table rounded up; None: every id)."""
    device, L, B, V = model.wte.weight.device, model.config.block_size, len(prompts), model.config.vocab_size
    sampled = min(vocab_size or V, V)
    lengths = [len(p) for p in prompts]
    assert 0 < min(lengths) and max(lengths) < L, "prompts must hold 1 to block_size - 1 tokens"
    assert model.mtp or not speculative, "speculative decoding drafts with the MTP modules: mtp_depth must be >= 1"
    history = torch.tensor([[0] * (max(lengths) - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    # a cache as long as the prompts and their continuations need (attention reads all of it at every step),
    # with one slot for a draft; block_size when they do not fit in it
    cache = model.new_cache(B, min(L, history.size(1) + max_new_tokens + 1), dtype, mtp=speculative)
    cache["pad"].copy_(history.size(1) - torch.tensor(lengths, device=device))
    draws = 3 if speculative else 1  # Exp(1) noise per row and step: the draft, its replacement, the next token
    state = State(temperature, top_k, top_p, sampled, token=history.new_zeros(B), pos=history.new_zeros(1),  # long
                  done=history.new_zeros(B, dtype=torch.bool), uniform=torch.zeros(B, device=device),
                  eos=torch.tensor(-1 if eos_id is None else eos_id, device=device),
                  noise=torch.ones(B, draws, sampled, device=device) if temperature else None,
                  draft=torch.zeros(B, V, device=device) if speculative else None)
    run = Run(model, cache, state, generator, eos_id, dtype)
    # a CUDA graph cannot hold a host sync: MoE layers without the grouped GEMM read their row counts on the host
    graph = compiler == "inductor" and device.type == "cuda" and all(
        grouped_mm_supported(model.wte.weight, m.gate_up) for m in model.modules() if isinstance(m, Experts))
    step = compiled(lambda: (speculative_step if speculative else decode_step)(model, cache, state), compiler, graph)
    if speculative:
        yield from speculative_loop(run, history, max_new_tokens, step, {} if stats is None else stats)
    else:
        yield from plain_loop(run, history, max_new_tokens, step, check_every)


@dataclass
class Run:
    """One generate call's model, cache and state, and its host-side steps: drawing noise, prefill and restarts."""
    model: torch.nn.Module
    cache: dict
    state: State
    generator: torch.Generator
    eos_id: int
    dtype: torch.dtype     # the cache's (None: the parameters')

    def draw(self):
        """Outside the graph: the generator's random numbers for the next step."""
        if self.state.temperature:
            self.state.noise.exponential_(generator=self.generator)
            self.state.uniform.uniform_(generator=self.generator)

    def prefill(self, history):
        """One forward over the context: the cache, and the next token from the last position (and its draft)."""
        model, cache, state = self.model, self.cache, self.state
        pos = torch.arange(history.size(1), device=history.device)
        h = model.hidden_states(history, model.decode_context(cache, pos), cache)
        self.draw()
        state.pos.fill_(history.size(1))
        token = pick_token(model.logits(h[:, -1]), state)
        if state.draft is not None:  # the draft over the whole context, for the token after the next
            next_tokens = torch.cat([history[:, 1:], token[:, None]], dim=1)
            state.draft.copy_(model.mtp[0].draft(model, cache, h, next_tokens, pos)[:, -1])
        return token

    def all_done(self):
        """Every row has produced eos_id (a host sync)."""
        return self.eos_id is not None and bool(self.state.done.all())

    def restart(self, history, new):
        """The cache is full: start again from the most recent half of the context; returns it and [its next token]."""
        history = torch.cat([history, torch.stack(new, dim=1)], dim=1)
        shift = history.size(1) - self.cache["max_len"] // 2
        fresh = self.model.new_cache(len(history), self.cache["max_len"], self.dtype, "mtp" in self.cache)
        fresh["pad"].copy_((self.cache["pad"] - shift).clamp(min=0))  # from the padding left after the last restart
        torch._foreach_copy_(cache_tensors(self.cache), cache_tensors(fresh))
        return history[:, shift:], [self.prefill(history[:, shift:])]


def plain_loop(run, history, max_new_tokens, step, check_every):
    new = [run.prefill(history)]  # the tokens after history; the last one is not in the cache yet
    for i in range(max_new_tokens):
        if i and history.size(1) + len(new) > run.cache["max_len"]:
            history, new = run.restart(history, new)
        elif i:
            run.draw()
            new.append(step().clone())  # the graph overwrites its output at the next step
        yield new[-1]
        if i % check_every == check_every - 1 and run.all_done():
            return


def speculative_loop(run, history, max_new_tokens, verify, stats):
    """Rounds of speculative_step, queued on the device before the host reads the oldest one's outcome, so that the
    GPU need not wait for the host: one ahead, unless the host must undo rejected drafts between rounds from copies
    of the cache tensors that cannot rewind by position alone (blocks with `rewinds` False: rolling windows,
    recurrent states, Engram's last token ids), the MTP module's included."""
    model, cache, state, B, L = run.model, run.cache, run.state, len(history), run.cache["max_len"]
    blocks = [*zip(model.blocks, cache["layers"]), *zip(model.mtp[0].blocks, cache["mtp"])]
    unrewound = cache_tensors([layer for block, layer in blocks if not block.rewinds])
    ahead = 0 if unrewound else 1
    new = [run.prefill(history)]
    yield new[0]
    produced, finished, queue = 1, run.all_done(), collections.deque()
    while not finished and produced < max_new_tokens:
        room = history.size(1) + len(new) + 2 * len(queue) + 1 <= L  # for the last token, its draft, and the queue's
        if len(queue) <= ahead and room and produced + len(queue) < max_new_tokens:
            run.draw()
            saved = [tensor.clone() for tensor in unrewound + [state.token, state.pos]] if unrewound else []
            tokens, summary = verify()
            out = torch.cat([tokens.flatten(), summary])  # a copy: the graph overwrites its outputs next round
            ready = torch.cuda.Event() if out.is_cuda else None
            queue.append((out, out.to("cpu", non_blocking=ready is not None), ready, saved))
            if ready is not None:
                ready.record()
        elif not queue:  # no room for a round: where one slot is left, one plain step as plain_loop takes there, so
            if history.size(1) + len(new) == L:  # that both restart from the same context
                run.draw()
                new.append(decode_step(model, cache, state))
            else:
                history, new = run.restart(history, new)
            produced, finished = produced + 1, run.all_done()
            yield new[-1]
        else:
            out, host, ready, saved = queue.popleft()
            if ready is not None:
                ready.synchronize()  # the round's outcome: the loop's one wait, with the next round already queued
            n, accepted, *done_after = host[2 * B:].tolist()
            tokens = out[:2 * B].view(B, 2)
            if n == 1 and saved:  # undo the draft where mixers do not rewind, then feed the first token alone
                *copies, token_before, pos_before = saved
                torch._foreach_copy_(unrewound, copies)
                h = model.hidden_states(token_before[:, None], model.decode_context(cache, pos_before), cache)
                state.draft.copy_(model.mtp[0].draft(model, cache, h, tokens[:, :1], pos_before)[:, -1])
            finished = run.eos_id is not None and bool(done_after[n - 1])
            for key, value in (("rounds", 1), ("drafted", B), ("accepted", accepted)):
                stats[key] = stats.get(key, 0) + value
            for j in range(min(n, max_new_tokens - produced)):
                new.append(tokens[:, j])
                produced += 1
                yield tokens[:, j]


def cache_tensors(cache):
    """Every tensor of a decode cache (or of any nesting of dicts and lists), in a fixed order."""
    if torch.is_tensor(cache):
        return [cache]
    items = cache.values() if isinstance(cache, dict) else cache if isinstance(cache, list) else []
    return [tensor for item in items for tensor in cache_tensors(item)]


# -----------------------------------------------------------------------------
# compilation

def compiled(fn, compiler, graph):
    """fn (no arguments, fixed shapes, tensors read and written in place) compiled with the torch.compile backend named
    compiler (None: fn as it is), 'inductor' tuning tile sizes by coordinate descent (as gpt-fast: at batch 1 a decode
    step is many small matrix-vector products); graph=True (CUDA, no host sync in fn) replays it as one CUDA graph."""
    if not compiler:
        return fn
    options = {"coordinate_descent_tuning": True} if compiler == "inductor" else None
    fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=compiler, options=options)
    # torch 2.5 traces a .tolist() (MoE's rows per expert, without the grouped GEMM) into one graph only with this
    fn = torch._dynamo.config.patch(capture_scalar_outputs=True)(fn)
    return cuda_graph(fn) if graph else fn
