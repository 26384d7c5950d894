"""FSDP2 (train.py and grpo.py --fsdp=True) on the CPU, two processes over gloo: equal to one process at the same
global batch (AdamW with Engram's replicated tables, clipping, gradient accumulation and activation checkpointing;
MuonClip with MoE layers and unevenly sharded matrices), its checkpoints resumed on two processes and on one and
read by sample.py, GRPO equal to DDP's, and the one-line refusals."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import configurator
from conftest import ROOT, assert_resume_reproduces, read_log, run_stage, run_train

TINY = ["--device=cpu", "--n_layer=2", "--n_embd=32", "--n_head=4", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3"]
# AdamW: 2 micro-steps per process, the norm clipped (0.1 is below it), Engram's tables replicated, checkpointing
ADAMW = ["--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=4", "--grad_clip=0.1",
         "--engram_layers=1", "--engram_table_size=2048", "--engram_dim=32"]
# MuonClip (tau below the logits: heads are clipped), MoE layers with a balance loss (the second layer's goes through
# the Context that FSDP would copy), matrices of 33 and of 3 experts' rows (split 17/16 and 2/1), x0_mix's 3 gains.
# One micro-step per process and no clipping keep the gradients one process's bit for bit, and so Newton-Schulz's
# result, which in bf16 turns a last-bit difference of its input into up to 1% of its output
MUON = ["--eval_interval=2", "--gradient_accumulation_steps=2", "--grad_clip=0", "--optimizer=muonclip",
        "--qk_clip_tau=0.05", "--n_layer=3", "--n_kv_head=2", "--mlp=relu2", "--mlp_hidden=33", "--n_experts=3",
        "--moe_topk=2", "--moe_hidden=16", "--moe_first_dense=1", "--aux_loss_coef=0.01", "--bias_update_rate=1e-3",
        "--x0_mix=True"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(warm, stage, *args, env=None):
    """stage under torchrun on 2 processes; a short monitor interval: torchrun notices at once that they are done.
    torchrun and its workers are warm processes (warm_python: a fresh one spends seconds importing), each worker still
    a process of its own."""
    result = subprocess.run([warm["python"], "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.05",
                             "--nproc_per_node=2", stage, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**ENV, **warm["env"], **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def fsdp(warm, data, out, *args):
    return torchrun(warm, "train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--fsdp=True", *args)


def one(monkeypatch, data, out, *args):
    return run_train(monkeypatch, f"--data_dir={data}", f"--out_dir={out}", *TINY, *args)


def checkpoint(out):
    return torch.load(out / "ckpt.pt", weights_only=True)


def assert_same_weights(a, b, atol):
    a, b = checkpoint(a)["model"], checkpoint(b)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, (a[name] - b[name]).abs().max().item())


def values(out, key):
    return [(r["step"], r[key]) for r in read_log(out) if key in r]


@pytest.fixture(scope="module")
def adamw(tiny_data, tmp_path_factory, warm_python):
    out = tmp_path_factory.mktemp("fsdp_adamw")
    fsdp(warm_python, tiny_data, out, *ADAMW, "--activation_checkpointing=True")
    return out


@pytest.fixture(scope="module")
def muon(tiny_data, tmp_path_factory, warm_python):
    """MuonClip for 4 steps under FSDP straight, and stopped at step 2 then resumed under FSDP (assert_resume_
    reproduces: bit for bit), the checkpoint of step 2 kept in `at2`: the folders."""
    root = tmp_path_factory.mktemp("fsdp_muon")

    def stop(out):
        fsdp(warm_python, tiny_data, out, *MUON, "--max_iters=2")
        shutil.copytree(out, root / "at2")

    assert_resume_reproduces(lambda out, *more: fsdp(warm_python, tiny_data, out, *MUON, *more), root, 4, stop,
                             keys=("loss", "lr"))
    return root


def test_fsdp_adamw_equals_one_process_with_accumulation_clipping_and_engram(adamw, tiny_data, tmp_path,
                                                                            monkeypatch, one_thread):
    one(monkeypatch, tiny_data, tmp_path / "one", *ADAMW)
    assert_same_weights(adamw, tmp_path / "one", atol=1e-5)
    for key in ("val_loss", "exact_val_bpb"):
        (step, a), (_, b) = values(adamw, key)[-1], values(tmp_path / "one", key)[-1]
        assert step == 4 and abs(a - b) < 1e-5, (key, a, b)
    # the clip mattered: unclipped, the weights are others
    one(monkeypatch, tiny_data, tmp_path / "unclipped", *ADAMW, "--grad_clip=0")
    with pytest.raises(AssertionError):
        assert_same_weights(adamw, tmp_path / "unclipped", atol=1e-4)
    # and the checkpoint is one process's: the same keys and shapes, the Engram table's Adam state whole
    a, b = checkpoint(adamw), checkpoint(tmp_path / "one")
    assert a["optimizer"].keys() == b["optimizer"].keys() == {"adamw", "sparse_adam"}
    for part in a["optimizer"]:
        shapes = [{i: {k: getattr(v, "shape", v) for k, v in state.items()}  # SparseAdam's step: an int
                   for i, state in run["optimizer"][part]["state"].items()} for run in (a, b)]
        assert shapes[0] == shapes[1], part


def test_fsdp_muonclip_equals_one_process_and_resumes_on_two_and_on_one(muon, tiny_data, tmp_path, monkeypatch,
                                                                       one_thread):
    whole = muon / "whole"
    one(monkeypatch, tiny_data, tmp_path / "one", *MUON, "--max_iters=4")
    assert_same_weights(whole, tmp_path / "one", atol=1e-6)
    assert values(whole, "val_loss") == pytest.approx(values(tmp_path / "one", "val_loss"), abs=1e-6)
    assert max(max(r["max_logit"]) for r in read_log(whole) if "max_logit" in r) > 0.05  # QK-Clip clipped
    a, b = checkpoint(whole)["optimizer"], checkpoint(tmp_path / "one")["optimizer"]
    for name, state in b["muon"]["state"].items():  # Muon's momentum, gathered whole
        assert torch.allclose(a["muon"]["state"][name]["momentum_buffer"], state["momentum_buffer"], atol=1e-7)
    # step 2's checkpoint of two FSDP processes, resumed by one plain process: the uninterrupted run's weights
    one(monkeypatch, tiny_data, muon / "at2", *MUON, "--max_iters=4", "--init_from=resume")
    assert_same_weights(whole, muon / "at2", atol=1e-6)
    assert values(whole, "val_loss")[-1] == pytest.approx(values(muon / "at2", "val_loss")[-1], abs=1e-6)


def test_fsdp_checkpoint_loads_weights_only_and_samples(muon, warm_python):
    saved = checkpoint(muon / "whole")  # weights_only=True
    assert saved["step"] == 4 and len(saved["rng"]) == 2
    assert saved["model"]["wte.weight"].data_ptr() == saved["model"]["lm_head.weight"].data_ptr()  # tied: once
    result = run_stage("sample.py", f"--out_dir={muon / 'whole'}", "--device=cpu", "--start=alice", "--num_samples=1",
                       "--max_new_tokens=8", "--temperature=0", warm=warm_python)
    assert result.stdout.startswith("alice") and len(result.stdout) > len("alice") + 4


REWARD = """
def some(prompt, completion):
    # no variance for the prompts of odd length: some processes are left fewer micro-batches than others
    return 0.0 if len(prompt) % 2 else float(sum(map(ord, completion)) % 5)
"""


def test_fsdp_grpo_equals_ddp(adamw, tmp_path, warm_python):
    """GRPO with a KL to the (sharded) reference and micro-batches of one rollout: the same steps as under DDP."""
    (tmp_path / "my_reward.py").write_text(REWARD)
    args = [f"--init_from={adamw}", "--device=cpu", "--max_iters=3", "--prompts_per_step=4", "--group_size=2",
            "--n_eval=3", "--eval_batch_size=1", "--eval_interval=3", "--max_completion_length=4",
            "--learning_rate=1e-2", "--micro_batch_size=1", "--beta=0.01", "--reward=my_reward:some"]
    for run, more in (("ddp", []), ("fsdp", ["--fsdp=True"])):
        torchrun(warm_python, "grpo.py", *args, f"--out_dir={tmp_path / run}", *more, env={"PYTHONPATH": str(tmp_path)})
    assert_same_weights(tmp_path / "ddp", tmp_path / "fsdp", atol=1e-6)
    rows = [read_log(tmp_path / run) for run in ("ddp", "fsdp")]
    assert [r.get("reward") for r in rows[0]] == [r.get("reward") for r in rows[1]]
    assert any(r.get("zero_variance_groups") for r in rows[1])  # some processes had fewer micro-batches
    trained, start = (checkpoint(out)["model"]["wte.weight"] for out in (tmp_path / "fsdp", adamw))
    assert not torch.equal(trained, start)


def test_fsdp_refusals_are_one_line(tiny_data, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"^error: --fsdp=True runs under torchrun, on one GPU too: torchrun "
                                         r"--standalone --nproc_per_node=1 train.py \.\.\.$"):
        one(monkeypatch, tiny_data, tmp_path, "--fsdp=True")
    assert not (tmp_path / "log.jsonl").exists()
    with pytest.raises(SystemExit, match="dtype='float16' would need a GradScaler"):
        configurator.check_fsdp(True, "float16")
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # as if torch were older than 2.6
    with pytest.raises(SystemExit, match=rf"needs torch >= 2.6 .*; this is torch {re.escape(torch.__version__)}$"):
        configurator.check_fsdp(True, "float32")
