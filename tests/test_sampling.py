"""Fast sampling: the static decode step of every architecture, its capture as one graph, batched decoding,
exponential-race sampling, and self-speculative decoding with the MTP modules."""
import json
import os
import runpy
import shutil
import sys
from dataclasses import asdict

import pytest
import torch

from configurator import save_checkpoint
from conftest import FAMILY_VARIANTS, ROOT, VARIANTS, run_stage, tiny_corpus_text
from decode import Run, State, generate, speculative_step, exponential_race, sample_next, sampling_probs
from model import GPT, GPTConfig
from tokenizer import Tokenizer

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
# the matrix's MTP variants, and one MTP module of one block: its drafts restart the cache at another point unless
# the speculative loop takes plain_loop's last single step
MTP_VARIANTS = {**{name: args for name, args in FAMILY_VARIANTS.items() if args.get("mtp_depth")},
                "mtp_depth_1": dict(mtp_depth=1)}


def greedy(model, prompts, n, **options):
    return torch.stack(list(generate(model, prompts, n, temperature=0, **options)), dim=1)  # (B, n)


# 15 tokens and 1: the short row's padding outlasts the first restart and ends at the second
@pytest.mark.parametrize("prompts", [PROMPTS, [list(range(1, 16)), [8]]], ids=["three", "long_and_short"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_static_decode_equals_full_forward_of_each_prompt(tiny_model, variant, prompts):
    """The static-shape step, on a left-padded batch: each row's greedy tokens are the argmax of a full forward (no
    cache) over that prompt alone and its tokens so far, also past the cache's restarts (block_size 16)."""
    model = tiny_model(**{**VARIANTS[variant], "block_size": 16}).eval()
    n, width = 14, max(map(len, prompts))
    batched = greedy(model, prompts, n)
    for row, prompt in enumerate(prompts):
        columns = [None] * (width - len(prompt)) + prompt + batched[row].tolist()  # None: left padding
        start, logits = 0, {}
        for i in range(n):
            end = width + i  # token i follows columns[:end]
            if end - start > 16:  # the restart: the most recent half of the context
                start = end - 8
            if start not in logits:  # one forward over the longest context from this start gives every position
                segment = torch.tensor([[c for c in columns[start:start + 16] if c is not None]])
                logits[start] = model(segment, segment)[0][0]
            seen = sum(c is not None for c in columns[start:end])
            assert logits[start][seen - 1].argmax().item() == batched[row, i].item(), (row, i)


@pytest.mark.parametrize("speculative", [False, True])
def test_each_restart_keeps_the_padding_left_in_each_row(tiny_model, monkeypatch, speculative):
    """Every restart of the cache sets each row's padding to what is left of it in the new context: the short row's
    padding (14 of 15 columns) outlasts the first restart and is gone after the second."""
    model = tiny_model(**MTP_VARIANTS["mtp_depth_1"], block_size=16).eval() if speculative else \
        tiny_model(block_size=16).eval()
    restart, shifted, pads = Run.restart, [0], []

    def spy(run, history, new):
        context, token = restart(run, history, new)
        shifted[0] += history.size(1) + len(new) - context.size(1)
        pads.append((run.cache["pad"].tolist(), (torch.tensor([0, 14]) - shifted[0]).clamp(min=0).tolist()))
        return context, token
    monkeypatch.setattr(Run, "restart", spy)
    greedy(model, [list(range(1, 16)), [8]], 24, speculative=speculative)
    assert len(pads) >= 2 and all(pad == expected for pad, expected in pads), pads


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_parameters_decode_every_architecture(tiny_model, variant):
    """cast_parameters(bf16), as sample.py and bench.py decode on a GPU: ties kept, buffers fp32, the same logits as
    fp32 weights under bf16 autocast (which casts them at every matmul) up to bf16 rounding, and decoding runs."""
    model = tiny_model(**VARIANTS[variant]).eval()
    idx = torch.tensor([PROMPTS[0]])
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    with amp, torch.no_grad():
        before = model(idx, idx)[0].float()
        model.cast_parameters(torch.bfloat16)
        after = model(idx, idx)[0].float()
        tokens = greedy(model, PROMPTS, 6, speculative=bool(model.mtp))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and model.cos.dtype == torch.float32
    assert (model.lm_head.weight is model.wte.weight) == model.config.tie_embeddings
    assert (after - before).abs().max() < 0.05 * before.abs().max() and tokens.shape == (3, 6)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    """Holtzman et al. 2019's nucleus: the fewest most likely tokens whose mass reaches top_p, ties included (two
    tokens of 0.25 reach 0.5: the third is out), and at least the most likely one."""
    uniform = torch.zeros(1, 4)
    assert sorted(sampling_probs(uniform, 1.0, top_p=0.5)[0].tolist()) == [0.0, 0.0, 0.5, 0.5]  # which two: a tie
    assert sampling_probs(torch.tensor([[1.0, 3.0, 2.0]]), 1.0, top_p=0.0).tolist() == [[0.0, 1.0, 0.0]]


def test_sampling_draws_the_filtered_distribution():
    """The exponential race draws each token with its probability under temperature, top-k and top-p."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0]]).expand(40000, 5)
    generator = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)]:
        expected = sampling_probs(logits[:1], temperature, top_k, top_p)[0]
        drawn = sample_next(logits, temperature, top_k, top_p, generator)
        frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
        assert torch.allclose(frequencies, expected, atol=0.01), (temperature, top_k, top_p)
        assert (frequencies[expected == 0] == 0).all()  # filtered tokens never win
    weights = torch.tensor([[0.0, 2.0, 6.0]]).expand(20000, 3)  # unnormalized weights (the speculative residual)
    noise = torch.empty(20000, 3).exponential_(generator=generator)
    assert torch.allclose(torch.bincount(exponential_race(weights, noise), minlength=3) / 20000.0,
                          torch.tensor([0.0, 0.25, 0.75]), atol=0.015)


def test_seeded_sampling_repeats_and_stops_each_row_at_end_of_document(tiny_model):
    model = tiny_model(n_kv_head=2).eval()
    runs = [torch.stack(list(generate(model, PROMPTS, 20, 0.9, 10, 0.95, generator=torch.Generator().manual_seed(7))), 1)
            for _ in range(2)]
    assert torch.equal(*runs)
    eos = runs[0][1, 3].item()  # row 1 produces it at its 4th token at the latest
    steps = list(generate(model, PROMPTS, 40, 0.9, 10, 0.95, eos_id=eos, generator=torch.Generator().manual_seed(7),
                                check_every=4))
    rows = torch.stack(steps, dim=1)
    first = min(20, rows.size(1))  # the same draws: rows that are done keep drawing, as the others do
    expected = torch.where(torch.cumsum(runs[0] == eos, 1) > 0, eos, runs[0])
    assert torch.equal(rows[:, :first], expected[:, :first])
    assert (rows[1, 3:] == eos).all()
    # a row that produced eos keeps it; the loop stops within check_every tokens once every row has
    done_at = [(row == eos).nonzero()[0].item() if (row == eos).any() else 40 for row in rows]
    assert len(steps) == 40 or len(steps) <= max(done_at) + 4


@pytest.mark.parametrize("variant,sampling", [("dense", (0.8, 5, 0.9))] + [(name, (0, 0, 1.0)) for name in FAMILY_VARIANTS])
def test_decode_step_captures_as_one_graph(tiny_model, variant, sampling):
    """Every architecture: torch.compile(fullgraph=True) captures the step (no graph break, no host sync), sampling
    included; the compiled step gives the eager step's tokens for the same seed (CPU-cheap backend: aot_eager)."""
    torch._dynamo.reset()
    model = tiny_model(**({"n_layer": 1} if variant == "dense" else FAMILY_VARIANTS[variant])).eval()
    eager, graph = (torch.stack(list(generate(model, PROMPTS, 12, *sampling, generator=torch.Generator().manual_seed(3),
                                              compiler=compiler)), 1) for compiler in (None, "aot_eager"))
    assert torch.equal(eager, graph)


def drafting_model(tiny_model, variant):
    """A model whose MTP draft agrees with it often but not always: the MTP module reads only the embedding of the
    token after and its blocks add nothing, so it drafts that token's bigram (untied embeddings: not itself)."""
    model = tiny_model(tie_embeddings=False, **MTP_VARIANTS[variant]).eval()
    d = model.config.n_embd
    with torch.no_grad():
        for p in model.mtp.parameters():
            if getattr(p, "writes_residual", False):
                p.zero_()
        model.mtp[0].proj.weight.copy_(torch.cat([torch.zeros(d, d), torch.eye(d)], dim=1))
    return model


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_vocab_size_keeps_the_ids_of_a_rounded_up_table_out(tiny_model, temperature, speculative):
    """A tokenizer of 40 ids under a table of 64 (train.py rounds up): the ids from 40 on, which it cannot decode,
    are never sampled however likely (their logits raised here), nor drafted."""
    model = tiny_model(mtp_depth=1).eval()
    raised = torch.cat([torch.zeros(40), torch.full((24,), 50.0)])
    model.logits = lambda h, norm=None: GPT.logits(model, h, norm) + raised
    tokens = [torch.stack(list(generate(model, PROMPTS, 20, temperature, generator=torch.Generator().manual_seed(0),
                                        speculative=speculative, vocab_size=vocab)), 1) for vocab in (None, 40)]
    assert (tokens[0] >= 40).all() and (tokens[1] < 40).all()


@pytest.mark.parametrize("variant", MTP_VARIANTS)
def test_speculative_greedy_equals_plain_greedy(tiny_model, variant):
    """fp32: drafts accepted and rejected, one row and a left-padded batch, past the cache's restart; sliding windows
    and Engram cannot rewind by position, so rejected drafts are undone from a copy."""
    model, stats = drafting_model(tiny_model, variant), {}
    for prompts in (PROMPTS[:1], PROMPTS):
        assert torch.equal(greedy(model, prompts, 40, speculative=True, stats=stats), greedy(model, prompts, 40))
    assert 0 < stats["accepted"] < stats["drafted"], stats
    # with an end-of-document token: the same tokens, and speculation stops in the round where every row is done
    plain = greedy(model, PROMPTS, 40)
    eos = plain[0, 5].item()
    ends = [(row == eos).nonzero()[0].item() if (row == eos).any() else 40 for row in plain]
    fast = greedy(model, PROMPTS, 40, speculative=True, eos_id=eos)
    expected = torch.where(torch.cumsum(plain == eos, 1) > 0, eos, plain)
    assert torch.equal(fast, expected[:, :fast.size(1)])
    assert fast.size(1) == 40 if max(ends) == 40 else max(ends) < fast.size(1) <= max(ends) + 2


def test_speculative_step_samples_the_main_model():
    """Speculative sampling is exact: the verified token is distributed as the main model's (filtered) distribution,
    whatever the draft's, over many identical rows (V = 8), with drafts both accepted and rejected."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=8, n_layer=2, n_head=2, n_embd=16, mtp_depth=1)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # (tied) distinct, peaked distributions rather than two near-uniform ones
    rows, temperature, top_k, top_p = 30000, 1.0, 6, 0.95
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cache = model.new_cache(rows, 16, mtp=True)
        prompt = torch.tensor([[3, 1, 4, 1, 5]]).expand(rows, 5)
        h = model.hidden_states(prompt, model.decode_context(cache, torch.arange(5)), cache)
        token = torch.full((rows,), 2)  # the next token, fixed: its distribution under p_next does not matter here
        draft_logits = model.mtp[0].draft(model, cache, h, torch.cat([prompt[:, 1:], token[:, None]], 1), torch.arange(5))
        state = State(temperature, top_k, top_p, 8, token=token.clone(), pos=torch.tensor([5]),
                      done=torch.zeros(rows, dtype=torch.bool), eos=torch.tensor(-1),
                      noise=torch.empty(rows, 3, 8).exponential_(generator=generator),
                      uniform=torch.rand(rows, generator=generator), draft=draft_logits[:, -1])
        tokens, summary = speculative_step(model, cache, state)
        # the main model's distribution of the token after `token`: a full forward
        expected = sampling_probs(model(torch.tensor([[3, 1, 4, 1, 5, 2]]))[0][0, -1], temperature, top_k, top_p)
    kept, accepted, *all_done = summary.tolist()
    assert 0.05 * rows < accepted < 0.9 * rows and kept == 1 and all_done == [0, 0], summary
    assert torch.equal(state.token, tokens[:, 0]) and state.pos.item() == 6  # the state advanced by one token
    assert torch.allclose(torch.bincount(tokens[:, 0], minlength=8) / float(rows), expected, atol=0.012)


def test_speculative_compiled_equals_eager(tiny_model):
    """The draft and verify steps capture as graphs too (aot_eager), and give the eager tokens."""
    torch._dynamo.reset()
    model = drafting_model(tiny_model, "mtp")
    stats = {}
    assert torch.equal(greedy(model, PROMPTS, 16, speculative=True, compiler="aot_eager", stats=stats),
                       greedy(model, PROMPTS, 16))
    assert stats["accepted"] > 0


def test_sample_stage_decodes_a_batch_and_speculates(tiny_data, tmp_path):
    """sample.py: a file of prompts as one batch; --speculative drafts with the MTP module and prints the same greedy
    text; a model without MTP stops with a one-line error."""
    meta = json.loads((tiny_data / "meta.json").read_text())
    for name, mtp_depth in (("mtp", 1), ("dense", 0)):
        (tmp_path / name).mkdir()
        shutil.copy(tiny_data / meta["tokenizer_path"], tmp_path / name / meta["tokenizer_path"])
        torch.manual_seed(0)
        config = GPTConfig(block_size=64, vocab_size=400, n_layer=2, n_head=4, n_embd=32, mtp_depth=mtp_depth)
        save_checkpoint(str(tmp_path / name / "ckpt.pt"), {"model_config": asdict(config), "model": GPT(config).state_dict(),
                                                           "tokenizer": meta["tokenizer_path"], "eos_id": meta["eos_id"]})
    (tmp_path / "prompts.txt").write_text("alice reads\nbob\n\ndef counts_lines(n):\n")
    args = [f"--prompts_file={tmp_path / 'prompts.txt'}", "--num_samples=1", "--max_new_tokens=12", "--temperature=0",
            "--device=cpu"]
    plain = run_stage("sample.py", f"--out_dir={tmp_path / 'mtp'}", *args)
    speculative = run_stage("sample.py", f"--out_dir={tmp_path / 'mtp'}", *args, "--speculative=True")
    assert plain.stdout == speculative.stdout and plain.stdout.count("\n---\n") == 3  # three prompts, one batch
    assert "of drafts accepted" in speculative.stderr and "3 rows" in plain.stderr
    error = run_stage("sample.py", f"--out_dir={tmp_path / 'dense'}", *args, "--speculative=True", check=False)
    assert error.returncode == 1 and "mtp_depth=0" in error.stderr.strip().splitlines()[-1]


def test_sample_stage_refuses_bad_settings_and_files_in_one_line(tmp_path, monkeypatch):
    """Checked before a model is loaded (there is none here); top_k=0 (all tokens) and temperature=0 (greedy) stay
    valid, and reach the model's loading."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"alice reads\nbob writes 3 caf\xe9s\n")
    for args, expected in [(["--max_new_tokens=0"], "max_new_tokens=0 must be positive"),
                           (["--num_samples=-1"], "num_samples=-1 must be positive"),
                           (["--top_k=-5"], "top_k=-5 must not be negative"),
                           (["--temperature=-0.5"], "temperature=-0.5 must not be negative"),
                           (["--top_p=-0.1"], "top_p=-0.1 must lie between 0 and 1"),
                           (["--top_p=1.5"], "top_p=1.5 must lie between 0 and 1"),
                           ([f"--prompts_file={latin1}"], f"prompts file {latin1} line 2 is not UTF-8 text"),
                           ([f"--start=FILE:{latin1}"], f"prompt file {latin1} line 2 is not UTF-8 text"),
                           ([f"--prompts_file={tmp_path / 'no.txt'}"], f"prompts file {tmp_path / 'no.txt'} not found"),
                           (["--top_k=0", "--temperature=0"], f"no checkpoint at {tmp_path / 'none'}")]:
        monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={tmp_path / 'none'}", "--device=cpu", *args])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(os.path.join(ROOT, "sample.py"))
        assert stop.value.code.startswith(f"error: {expected}") and "\n" not in stop.value.code, stop.value.code


@pytest.mark.parametrize("temperature", [1e-40, 1e-50])  # float32: subnormal, and 0
def test_a_tiny_temperature_samples_the_most_likely_token(tiny_model, temperature):
    """softmax(logits / T) tends to the argmax as T -> 0; logits / 1e-40 overflow float32 to inf (NaN probabilities,
    the exponential race then always picking id 0), and 1e-50 is 0 in float32. Sampling, plain and speculative (p
    and q one-hot), gives greedy decoding's tokens."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    assert sampling_probs(logits, temperature).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert sample_next(logits, temperature, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]
    model = tiny_model(mtp_depth=1).eval()
    greedy = torch.stack(list(generate(model, PROMPTS, 8, temperature=0)), 1)
    for speculative in (False, True):
        tokens = generate(model, PROMPTS, 8, temperature, generator=torch.Generator().manual_seed(0),
                          speculative=speculative)
        assert torch.equal(torch.stack(list(tokens), 1), greedy), speculative


def test_sample_stage_streams_the_prompt_of_a_one_line_prompts_file(tmp_path, monkeypatch, capsys):
    """A prompts_file of one line streams (one prompt), and the text streamed begins with that prompt, as it does
    with --start and as the batch's printout does, not with --start's (empty) text."""
    Tokenizer.train(tiny_corpus_text(n_docs=8), 300, str(tmp_path / "tokenizer.model"))
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=320, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model_config": asdict(config), "model": GPT(config).state_dict(),
                                                "tokenizer": "tokenizer.model", "eos_id": 2})
    (tmp_path / "prompts.txt").write_text("alice reads\n")
    args = ["--num_samples=1", "--max_new_tokens=4", "--temperature=0", "--device=cpu"]
    printed = {}
    for name, prompt in (("start", "--start=alice reads"), ("file", f"--prompts_file={tmp_path / 'prompts.txt'}")):
        monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={tmp_path}", prompt, *args])
        runpy.run_path(os.path.join(ROOT, "sample.py"))
        printed[name] = capsys.readouterr().out
    assert printed["start"].startswith("alice reads") and printed["file"] == printed["start"], printed
