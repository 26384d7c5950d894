"""Shared fixtures: tiny model configs, so that every test builds models the same way."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def tiny_model():
    """tiny_model(**overrides) -> a small fp32 GPT with fixed initial weights."""
    def build(**overrides):
        torch.manual_seed(0)
        args = dict(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
        args.update(overrides)
        return GPT(GPTConfig(**args))
    return build


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
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stage(*args, check=True, timeout=300, env=None):
    """Run a stage (e.g. 'train.py', '--max_iters=5') in a fresh Python process from the repository root."""
    import subprocess
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


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
