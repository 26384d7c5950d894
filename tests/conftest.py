"""Shared pieces: tiny model configs and variants, running the stages, and resuming, so that every test builds models
and runs stages the same way."""
import json
import os
import runpy
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402


TINY_CONFIG = dict(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def tiny_model():
    """tiny_model(**overrides) -> a small fp32 GPT with fixed initial weights."""
    def build(**overrides):
        torch.manual_seed(0)
        return GPT(GPTConfig(**{**TINY_CONFIG, **overrides}))
    return build


@pytest.fixture
def one_thread():
    """Tensors this small run fastest on one thread; a second one mostly waits, the more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tiny configs of the variant families, each with its own tests in tests/test_<family>.py; test_model.py also runs
# every one through the generic checks (causality, decoding equals the full forward, gradients, learning).
FAMILY_VARIANTS = {
    # DeepSeek family (test_deepseek.py): MLA, MoE, MTP, and DeepSeek-V3 and Llama 4 in miniature
    "mla": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4),
    "mla_low_rank_q": dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=6, qk_rope_head_dim=2,
                           v_head_dim=4),
    "moe": dict(n_experts=4, moe_topk=2, moe_hidden=32, aux_loss_coef=0.01, router_z_loss_coef=1e-3),
    "moe_sigmoid": dict(n_experts=4, moe_topk=2, moe_hidden=32, n_shared_experts=1, router_scoring="sigmoid",
                        routed_scaling=2.5, seq_aux_loss_coef=1e-4, bias_update_rate=1e-3),
    "mtp": dict(mtp_depth=2, mtp_blocks=2),
    "deepseek": dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, n_experts=4, moe_topk=2,
                     moe_hidden=16, n_shared_experts=1, moe_first_dense=1, router_scoring="sigmoid",
                     bias_update_rate=1e-3, seq_aux_loss_coef=1e-4, mtp_depth=1),
    "llama4": dict(n_kv_head=2, n_experts=4, moe_topk=1, moe_hidden=32, n_shared_experts=1, moe_every=2,
                   router_scoring="sigmoid", router_renorm=False),
    # what Hugging Face imports need (test_hf.py): Qwen2's biases with Qwen3's free head_dim and Llama 3.1's RoPE
    # scaling; DeepSeek-V3's YaRN with MLA's temperature and its group-limited routing
    "hf_dense": dict(n_kv_head=2, head_dim=12, qkv_bias=True, rope_scaling="llama3", rope_factor=8.0,
                     rope_original_len=8),
    "hf_deepseek_v3": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4, rope_scaling="yarn", rope_factor=4.0,
                           rope_original_len=8, yarn_mscale=0.7, yarn_mscale_all_dim=0.7, n_experts=8, moe_topk=2,
                           moe_hidden=16, n_shared_experts=1, router_scoring="sigmoid", moe_groups=4, moe_topk_groups=2),
    # attention family (test_attention.py): spans with MoE and MTP, gates, linear attention, hybrid patterns
    "sliding_moe_mtp": dict(attn_span="sliding", window=5, n_kv_head=2, n_experts=4, moe_topk=2, moe_hidden=16,
                            mtp_depth=1),
    "mla_moba_gated": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4, attn_span="moba", moba_block=4,
                           moba_topk=2, attn_gate="elementwise"),
    "sparse_value_gate": dict(attn_span="sparse", sparse_block=4, sparse_local=2, sparse_stride=3,
                              attn_gate="headwise", attn_gate_at="value"),
    "linear": dict(attention="linear", linear_chunk=8),
    "gated_deltanet": dict(attention="linear", linear_kind="gated_deltanet", linear_chunk=8),
    "hybrid_lg": dict(attn_pattern="LG", linear_kind="gated_deltanet", linear_chunk=8, attn_gate="elementwise",
                      qk_norm=True),
    "hybrid_sm": dict(attn_pattern="SM", window=5, moba_block=4, moba_topk=2, n_kv_head=1),
    # residual streams and memory (test_residual.py): hyper-connections, mHC and Engram, alone and with the others
    "hc": dict(residual="hc", hc_streams=3),
    "mhc_mla_moe": dict(residual="mhc", hc_sinkhorn_iters=6, attention="mla", kv_lora_rank=16, qk_rope_head_dim=4,
                        n_experts=4, moe_topk=2, moe_hidden=16),
    "engram": dict(engram_layers="0,1", engram_table_size=2048, engram_dim=32),
    "mhc_engram_sliding_mtp": dict(residual="mhc", hc_streams=2, hc_sinkhorn_iters=6, engram_layers="1",
                                   engram_orders="2,3,4", engram_heads=2, engram_table_size=2048, engram_dim=24,
                                   attn_span="sliding", window=5, mtp_depth=1),
    "hc_engram_linear": dict(residual="hc", engram_layers="0", engram_table_size=2048, engram_dim=32,
                             attention="linear", linear_chunk=8),
    # speedrun candidates (test_model.py): the squared-ReLU MLP beside MoE layers, soft-capped logits with MTP, value
    # embeddings on GQA layers, full and sliding (a rolling cache of values), value residual over them, the embedding
    # mixed into HC's streams
    # (zero_init_proj has its own test: at init its blocks are identities, which leaves these checks nothing to check)
    "relu2_moe": dict(mlp="relu2", n_experts=4, moe_topk=2, moe_hidden=16, moe_every=2),
    "softcap_mtp": dict(logit_softcap=3.0, mtp_depth=2),
    "value_embeds_gqa_sliding": dict(value_embeds="0,1", n_kv_head=2, attn_pattern="GS", window=5),
    "value_residual_gqa_sliding": dict(value_residual=True, value_embeds="0", n_kv_head=2, attn_pattern="GS", window=5),
    "x0_mix_hc": dict(x0_mix=True, residual="hc", hc_streams=2),
    "unet_skips_odd": dict(unet_skips=True, n_layer=3),  # the middle block gets no skip
}
# the dense baseline's attention shapes (test_model.py); the generic checks run on these and every family's configs
ATTENTION = {"mha": dict(n_kv_head=4), "gqa": dict(n_kv_head=2), "mqa": dict(n_kv_head=1),
             "qk_norm": dict(n_kv_head=2, qk_norm=True), "untied": dict(tie_embeddings=False)}
VARIANTS = {**ATTENTION, **FAMILY_VARIANTS}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stage(*args, check=True, timeout=300, env=None):
    """Run a stage (e.g. 'train.py', '--max_iters=5') in a fresh Python process from the repository root."""
    import subprocess
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_train(monkeypatch, *args):
    """train.py in this process (a fresh one costs seconds of imports), on a tiny model: returns its globals."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py", "--device=cpu", "--n_layer=2", "--n_embd=32", "--n_head=4",
                                      "--block_size=32", *args])
    return runpy.run_path(os.path.join(ROOT, "train.py"))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_resume_reproduces(train, folder, steps, stop, keys=("loss",), tol=0.0):
    """
    Resuming reproduces the uninterrupted run. train(out, *args) runs a stage into the folder out: once `steps` steps
    straight into folder/whole, once stopped early into folder/part and resumed there with --init_from=resume.
    stop is the first part's --max_iters, or stop(out), which interrupts a run its own way. The resumed log holds
    each step 1..steps once (rows with keys[0]) and every key equals the uninterrupted run's at every step (within
    tol; 0: bit for bit). Returns the two folders.
    """
    whole, part = folder / "whole", folder / "part"
    train(whole, f"--max_iters={steps}")
    if callable(stop):
        stop(part)
    else:
        train(part, f"--max_iters={stop}")
    train(part, f"--max_iters={steps}", "--init_from=resume")
    expected, resumed = ([r for r in read_log(out) if keys[0] in r] for out in (whole, part))
    assert [r["step"] for r in resumed] == [r["step"] for r in expected] == list(range(1, steps + 1))
    for a, b in zip(expected, resumed):
        for key in keys:
            assert abs(a[key] - b[key]) < tol if tol else a[key] == b[key], (a["step"], key, a[key], b[key])
    return whole, part


def tiny_corpus_text(n_docs=60, seed=0):
    """Documents of simple, learnable English-like text and code."""
    import random
    rng = random.Random(seed)
    names = ["alice", "bob", "carol", "dave", "erin", "frank"]
    verbs = ["reads", "writes", "sorts", "counts", "finds", "keeps"]
    things = ["books", "lists", "numbers", "words", "files", "lines"]
    docs = []
    for d in range(n_docs):
        lines = []
        for _ in range(rng.randint(8, 20)):
            a, v, t = rng.choice(names), rng.choice(verbs), rng.choice(things)
            lines.append(f"{a} {v} {rng.randint(1, 9)} {t}.")
            lines.append(f"def {v}_{t}(n):\n    return n * {rng.randint(2, 5)}\n")
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A dataset prepared by prepare.py from a tiny generated corpus: returns its folder."""
    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(tiny_corpus_text()):
        (corpus / f"doc{i:02d}.txt").write_text(doc)
    run_stage("prepare.py", f"--input={corpus}", "--name=tiny", f"--out_root={root}", "--vocab_size=400",
              "--val_fraction=0.1")
    return root / "tiny"
