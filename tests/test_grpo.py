"""GRPO: its pieces (rl.py) against hand computations, a tiny model learning a rewarded token, SFT, and the stage end to
end (logs, checkpoints, resume after a Ctrl-C, eval, DDP, bad settings, inputs, rewards and folders)."""
import fcntl
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import configurator
import rl
from conftest import ROOT, assert_resume_reproduces, read_log
from configurator import save_checkpoint
from evaluate import token_logprobs
from model import GPT, GPTConfig
from rl import (extract_answer, group_advantages, has_format, is_held_out, kl_k3, layout, policy_loss, problems,
                sample_completions)
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# the pieces

def test_advantages_and_each_loss_aggregation_equal_a_hand_computation():
    # two groups of G = 2; completions of 3, 1, 2 and 4 tokens (T = 4)
    rewards = torch.tensor([1.0, 0.0, 0.2, 1.0])
    lengths = [3, 1, 2, 4]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for n in lengths])
    logprobs = torch.tensor([[-1.0, -0.5, -2.0, 0.0], [-0.3, 0.0, 0.0, 0.0], [-1.2, -0.7, 0.0, 0.0],
                             [-0.9, -1.1, -0.4, -2.5]])
    old = logprobs + torch.tensor([[0.0, 0.4, -0.4, 0.0], [0.1, 0.0, 0.0, 0.0], [-0.3, 0.05, 0.0, 0.0],
                                   [0.5, -0.1, 0.0, 0.3]])  # ratios inside and outside [1 - eps, 1 + eps_high]
    ref = logprobs + torch.tensor([[0.2, -0.1, 0.3, 0.0], [-0.5, 0.0, 0.0, 0.0], [0.0, 0.4, 0.0, 0.0],
                                   [0.1, 0.1, -0.2, 0.6]])
    eps, eps_high, beta, max_len = 0.2, 0.28, 0.1, 8

    # by hand: group 1 has mean 0.5 and population std 0.5, group 2 mean 0.6 and std 0.4
    scaled = [0.5 / 0.5001, -0.5 / 0.5001, -0.4 / 0.4001, 0.4 / 0.4001]
    unscaled = [0.5, -0.5, -0.4, 0.4]
    advantages, zero_variance = group_advantages(rewards, 2)
    assert torch.allclose(advantages, torch.tensor(scaled)) and not zero_variance.any()
    assert torch.allclose(group_advantages(rewards, 2, scale=False)[0], torch.tensor(unscaled))
    assert group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)[1].tolist() == [True, False]

    def per_token(i, t, A):
        rho = math.exp(logprobs[i, t] - old[i, t])
        d = float(ref[i, t] - logprobs[i, t])
        return -min(rho * A, min(max(rho, 1 - eps), 1 + eps_high) * A) + beta * (math.exp(d) - d - 1)

    def hand(agg, A):
        sums = [sum(per_token(i, t, A[i]) for t in range(n)) for i, n in enumerate(lengths)]
        return {"grpo": sum(s / n for s, n in zip(sums, lengths)) / 4, "dapo": sum(sums) / sum(lengths),
                "dr_grpo": sum(sums) / (4 * max_len)}[agg]

    for agg, A in (("grpo", scaled), ("dapo", scaled), ("dr_grpo", unscaled)):
        loss, kl, clipped = policy_loss(logprobs, old, ref, torch.tensor(A), mask, eps, eps_high, beta, agg,
                                        n_completions=4, n_tokens=sum(lengths), max_completion_length=max_len)
        assert math.isclose(loss.item(), hand(agg, A), rel_tol=1e-5), agg
    # clipped by hand: the tokens where min() takes the clipped side
    n_clipped = sum(1 for i, n in enumerate(lengths) for t in range(n)
                    if min(max(r := math.exp(logprobs[i, t] - old[i, t]), 1 - eps), 1 + eps_high) * scaled[i]
                    < r * scaled[i])
    assert clipped.item() == n_clipped > 0


def test_kl_is_nonnegative_per_token_and_zero_when_policy_is_reference():
    torch.manual_seed(0)
    logprobs = torch.randn(64, 16).mul(3).log_softmax(-1).requires_grad_()
    ref = torch.randn(64, 16).mul(3).log_softmax(-1)
    assert (kl_k3(logprobs, ref) >= 0).all()
    at_reference = kl_k3(logprobs, logprobs.detach())
    assert (at_reference == 0).all()
    at_reference.sum().backward()
    assert (logprobs.grad == 0).all()  # and no pull either


@pytest.fixture
def batch(tiny_model):
    """A tiny model and a batch of prompts of 2 to 6 tokens with completions of 1 to 5 tokens."""
    model = tiny_model().eval()
    prompts = [[1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]
    completions = [[20, 21, 22], [23], [24, 25, 26, 27, 28], [29, 30]]
    return model, prompts, completions


def test_layout_positions_match_a_forward_of_each_row_alone(batch):
    model, prompts, completions = batch
    idx, targets = layout(prompts, completions, pad_id=0)
    logprobs = token_logprobs(model, idx, targets, temperature=0.7)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        alone = torch.tensor([p + c])
        logits = model(alone[:, :-1], alone[:, 1:])[0][0, len(p) - 1:] / 0.7
        expected = logits.float().log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        got = logprobs[row][targets[row] >= 0]
        assert torch.allclose(got, expected, atol=1e-5)
        assert (logprobs[row][targets[row] < 0] == 0).all()


def test_prompt_and_padding_tokens_get_no_gradient(batch):
    model, prompts, completions = batch
    idx, targets = layout(prompts, completions, pad_id=0)
    logits = []

    def keep_logits(module, inputs, out):
        out.retain_grad()
        logits.append(out)

    model.lm_head.register_forward_hook(keep_logits)
    logprobs = token_logprobs(model, idx, targets)
    mask = (targets >= 0).float()
    loss = policy_loss(logprobs, logprobs.detach(), None, torch.tensor([1.0, -1.0, 0.5, -0.5]), mask, 0.2, 0.2,
                       0.0, "grpo", 4, mask.sum(), 8)[0]
    loss.backward()
    grad = logits[0].grad.abs().sum(-1)  # (B, T): the gradient reaching each position's logits
    assert (grad[targets < 0] == 0).all() and (grad[targets >= 0] > 0).all()
    # the padding is never seen: other pad ids give the same loss
    idx_other_pad = torch.where((idx == 0) & (torch.arange(idx.size(1)) >= torch.tensor([4, 6, 7, 5])[:, None]), 63, idx)
    assert not torch.equal(idx_other_pad, idx)
    other = token_logprobs(model, idx_other_pad, targets)
    assert torch.equal(other, logprobs)


def test_first_inner_iteration_has_ratio_one_nothing_clipped_and_the_reinforce_gradient(batch):
    model, prompts, completions = batch
    idx, targets = layout(prompts, completions, pad_id=0)
    mask = (targets >= 0).float()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    logprobs = token_logprobs(model, idx, targets)
    old = token_logprobs(model, idx, targets).detach()  # the training forward before the first update
    assert torch.equal((logprobs - old).exp()[mask > 0], torch.ones(int(mask.sum())))
    loss, _, clipped = policy_loss(logprobs, old, None, advantages, mask, 0.2, 0.2, 0.0, "dapo", 4, mask.sum(), 8)
    assert clipped.item() == 0
    grad = torch.autograd.grad(loss, model.lm_head.weight, retain_graph=True)[0]
    reinforce = -(advantages[:, None] * logprobs * mask).sum() / mask.sum()  # REINFORCE with the group baseline
    assert torch.allclose(grad, torch.autograd.grad(reinforce, model.lm_head.weight)[0], atol=1e-7)


def test_sampled_completions_are_grouped_and_stop_at_the_stop_token(tiny_model):
    model = tiny_model().eval()
    completions = sample_completions(model, [[1, 2, 3], [4]], 3, 6, 0.0, stop_id=5)
    assert len(completions) == 6 and completions[0] == completions[1] == completions[2]  # greedy: one per group
    assert all(0 < len(c) <= 6 and (5 not in c[:-1]) for c in completions)


def test_tasks_split_and_answers():
    held_out = problems("addition", True, 0, 200)
    train = problems("addition", False, 1, 2000)
    assert all(is_held_out(p) for p, _ in held_out) and not any(is_held_out(p) for p, _ in train)
    assert not {p for p, _ in held_out} & {p for p, _ in train}
    assert problems("addition", True, 0, 200) == held_out  # fixed
    for prompt, answer in train[:50]:
        a, b = prompt.split(" = ")[0].split(" + ")
        assert int(a) + int(b) == int(answer) and 1 <= len(a) <= 3 and 1 <= len(b) <= 3
    prompt, answer = problems("reverse", False, 0, 1)[0]
    assert prompt.startswith("reverse: ") and prompt[9:-1].split()[::-1] == answer.split()
    assert extract_answer("the sum\n#### 968 \n") == "968" and extract_answer("968") is None
    assert has_format("#### 968", "addition") and not has_format("so #### 968", "addition")
    assert has_format("#### c b a", "reverse") and not has_format("#### cba!", "reverse")


def test_asking_for_more_problems_than_a_side_holds_stops(monkeypatch):
    import rl
    monkeypatch.setitem(rl.TASKS, "tiny", lambda rng: (f"{rng.randrange(40)} = ?", "0"))  # 40 prompts in all
    assert len(problems("tiny", False, 0, 20)) == 20
    with pytest.raises(ValueError, match="distinct problems of the tiny task's training side in 1,112,444 draws, fewer than the 60"):
        problems("tiny", False, 0, 60)


def test_tiny_model_learns_to_emit_the_rewarded_token(tiny_model):
    """A 16-token vocabulary: the rewarded first token starts near 1/16; GRPO's updates (mu = 2, so the ratio and
    the clipping are used) raise the mean reward to at least 0.9."""
    model = tiny_model(vocab_size=16, n_layer=1, n_embd=32).eval()
    start = torch.softmax(model(torch.tensor([[1, 2, 3]]))[0][0, -1], -1)[7].item()
    assert 0.01 < start < 0.2
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    prompts, G, history = [[1, 2, 3], [4, 5], [6], [8, 9, 10]], 8, []
    for step in range(60):
        completions = sample_completions(model, prompts, G, 2, 1.0, stop_id=None, generator=generator)
        rewards = torch.tensor([float(c[0] == 7) for c in completions])
        history.append(rewards.mean().item())
        if len(history) >= 3 and min(history[-3:]) >= 0.9:
            break
        advantages, _ = group_advantages(rewards, G)
        idx, targets = layout([p for p in prompts for _ in range(G)], completions, pad_id=0)
        mask = (targets >= 0).float()
        old = None
        for inner in range(2):
            logprobs = token_logprobs(model, idx, targets)
            old = logprobs.detach() if old is None else old
            loss = policy_loss(logprobs, old, None, advantages, mask, 0.2, 0.28, 0.0, "dapo", len(completions),
                               mask.sum(), 2)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert history[0] < 0.3 and min(history[-3:]) >= 0.9, history


def test_sft_loss_is_the_mean_over_response_tokens_only(batch):
    model, prompts, responses = batch
    idx, targets = layout(prompts, responses, pad_id=0)
    loss = model(idx, targets)[1]
    by_hand = []
    for p, r in zip(prompts, responses):
        row = torch.tensor([p + r])
        logits = model(row[:, :-1], row[:, 1:])[0][0, len(p) - 1:]
        by_hand += F.cross_entropy(logits, torch.tensor(r), reduction="none").tolist()
    assert math.isclose(loss.item(), sum(by_hand) / len(by_hand), rel_tol=1e-5)


def test_groups_of_equal_rewards_that_a_float_mean_misses_have_no_advantage():
    """8 rewards of 0.1 (say a format reward on wrong answers): their float32 mean is not 0.1 and their std not 0, but
    the group has no advantage, and it is skipped as a zero-variance group."""
    for value in (0.1, 0.3, 0.7, 1.2, 1 / 3):
        rewards = torch.tensor([value] * 8 + [1.0, 0.0] * 4)
        for scale in (True, False):
            advantages, zero_variance = group_advantages(rewards, 8, scale=scale)
            assert zero_variance.tolist() == [True, False], (value, scale)
            assert (advantages[:8] == 0).all() and (advantages[8:].abs() > 0.4).all(), (value, scale, advantages)


# -----------------------------------------------------------------------------
# the stage end to end

STAGE = ["--device=cpu", "--task=addition", "--n_eval=8", "--eval_batch_size=4", "--max_completion_length=6",
         "--prompts_per_step=4", "--group_size=4", "--learning_rate=1e-3", "--warmup_iters=0"]
REWARD_MODULE = """
import math, os, signal
calls = 0


def longer(prompt, completion):
    return float(len(completion))


def ctrl_c(prompt, completion):
    \"\"\"longer, and a Ctrl-C to this process at its CTRL_C_AT-th call (on process CTRL_C_RANK of a torchrun)\"\"\"
    global calls
    calls += 1
    if calls == int(os.environ["CTRL_C_AT"]) and os.environ.get("RANK", "0") == os.environ.get("CTRL_C_RANK", "0"):
        os.kill(os.getpid(), signal.SIGINT)
    return float(len(completion))


def nan_every_third(prompt, completion):
    global calls
    calls += 1
    return math.nan if calls % 3 == 0 else 1.0


def text(prompt, completion):
    return "1.0"


def nothing(prompt, completion):
    return None


def raises(prompt, completion):
    raise KeyError("answer")
"""


def grpo_here(monkeypatch, *args, stage=STAGE):
    """grpo.py in this process (a new one costs seconds of imports): the message it stops with, or its exit code (0
    when it ends without one). A Ctrl-C that grpo.py does not catch returns "KeyboardInterrupt" (a failure of the test
    that asserts what it stops with, not the end of the whole test session)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["grpo.py", *stage, *args])
    monkeypatch.setattr(configurator, "LOCKS", {})  # the locks it takes, released below
    handler = signal.getsignal(signal.SIGINT)
    try:
        runpy.run_path(os.path.join(ROOT, "grpo.py"))
        return 0
    except SystemExit as stop:
        return 0 if stop.code is None else stop.code
    except KeyboardInterrupt:
        return "KeyboardInterrupt"
    finally:
        signal.signal(signal.SIGINT, handler)
        for lock in configurator.LOCKS.values():
            lock.close()


@pytest.fixture(scope="module")
def start(tiny_data, tmp_path_factory):
    """A tiny random model saved as train.py saves one, with the tiny dataset's tokenizer, and a reward module."""
    root = tmp_path_factory.mktemp("grpo")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=448, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(str(root / "base" / "ckpt.pt"), {"model": model.state_dict(), "model_config": asdict(model.config),
                                                     "step": 0, "tokenizer": "tokenizer.model", "config": {}})
    shutil.copy(tiny_data / "tokenizer.model", root / "base" / "tokenizer.model")
    (root / "my_reward.py").write_text(REWARD_MODULE)
    return root


def test_grpo_runs_logs_checkpoints_and_resumes_exactly_after_a_ctrl_c(start, tmp_path, monkeypatch, capsys,
                                                                       one_thread):
    """The runs go in this process (a new one costs seconds of imports), each importing the reward module afresh, as a
    new process does (ctrl_c counts its calls); the Ctrl-C is a real SIGINT to this process."""
    common = [f"--init_from={start / 'base'}", "--beta=0.04", "--eval_interval=2", "--temperature=1.5"]
    monkeypatch.syspath_prepend(str(start))

    def run(out, *more, reward="longer"):
        monkeypatch.delitem(sys.modules, "my_reward", raising=False)
        code = grpo_here(monkeypatch, *common, f"--reward=my_reward:{reward}", f"--out_dir={out}", *more)
        assert reward == "ctrl_c" or code == 0, code
        return code

    def ctrl_c(out):
        """A Ctrl-C amid step 3's rollouts (after 8 + 16 + 16 + 8 reward calls: evaluations at steps 0 and 2, 16
        rollouts a step): the step ends, is saved, and the run exits 130 with one line; then a crash amid an append
        leaves a partial last line in the log, which the resume leaves out."""
        monkeypatch.setenv("CTRL_C_AT", "55")
        capsys.readouterr()
        code = run(out, "--max_iters=4", reward="ctrl_c")
        stderr = capsys.readouterr().err
        assert code == 130, (code, stderr[-3000:])
        assert stderr.strip().splitlines()[-1] == (f"interrupted at step 3: saved {out / 'ckpt.pt'}; resume "
                                                   "with --init_from=resume")
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
        with open(out / "log.jsonl", "a") as f:
            f.write('{"step": 4, "rew')

    full, _ = assert_resume_reproduces(run, tmp_path, 4, ctrl_c, keys=("reward", "kl", "completion_len"))
    rows = read_log(full)
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2, 4]
    for key in ("reward_std", "accuracy", "kl", "clip_frac", "completion_len", "zero_variance_groups", "rollout_s",
                "update_s", "rollout_tokens_per_s"):
        assert key in steps[0], key
    assert steps[0]["kl"] == 0  # the policy is the reference until the first update
    assert steps[-1]["kl"] > 0
    assert all(r["clip_frac"] == 0 for r in steps)  # mu = 1: every update is a first inner iteration
    assert (full / "grpo.png").exists() and (full / "tokenizer.model").exists()
    checkpoint = torch.load(full / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["config"]["init_from"] == str(start / "base")


def test_eval_sft_and_task_modes(start, monkeypatch, capsys, one_thread):
    """Each mode in this process (a new one costs seconds of imports)."""
    assert grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--mode=eval", "--eval_k=3") == 0
    line = [l for l in capsys.readouterr().out.splitlines() if "held-out" in l][0]
    assert "pass@1" in line and "pass@3" in line
    tasks = start / "tasks"
    assert grpo_here(monkeypatch, "--mode=tasks", "--task=reverse", f"--task_dir={tasks}", "--n_task_examples=64",
                     "--n_eval=8", stage=[]) == 0
    rows = [json.loads(line) for line in (tasks / "reverse_train.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and rows[0]["text"] == rows[0]["prompt"] + rows[0]["response"]
    assert len((tasks / "reverse_held_out.jsonl").read_text().splitlines()) == 8
    out = start / "sft"
    assert grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--mode=sft", "--task=reverse", "--chat=True",
                     f"--sft_data={tasks / 'reverse_train.jsonl'}", f"--out_dir={out}", "--batch_size=8",
                     "--max_iters=40", "--learning_rate=3e-3", "--eval_interval=40", "--max_completion_length=16",
                     "--log_interval=1") == 0
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 40


def test_two_process_sft_equals_one_process_on_responses_of_unequal_lengths(start, tmp_path, monkeypatch, one_thread,
                                                                            warm_python):
    """Each process's loss is weighted by its share of the step's response tokens: two processes train on the token
    mean of the step, as one does (the processes' responses here are of 2 and of 10 or more tokens). The one process
    is this one (a new one costs seconds of imports), the two warm processes under a warm torchrun."""
    data = tmp_path / "uneven.jsonl"
    rows = [("1 + 1 = ?\n", "#### 2"), ("2 + 2 = ?\n", "#### 4 and a longer response with more words"),
            ("3 + 3 = ?\n", "#### 6"), ("4 + 4 = ?\n", "#### 8 and more")]
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    args = [*STAGE, f"--init_from={start / 'base'}", "--mode=sft", f"--sft_data={data}", "--batch_size=4",
            "--max_iters=3", "--eval_interval=100", "--n_eval=0", "--learning_rate=1e-3", "--warmup_iters=0"]
    assert grpo_here(monkeypatch, *args[len(STAGE):], f"--out_dir={tmp_path / 'one'}") == 0
    subprocess.run([warm_python["python"], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "grpo.py", *args, f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, check=True, capture_output=True,
                   timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **warm_python["env"]})
    one, two = ([r["loss"] for r in read_log(tmp_path / run) if "loss" in r] for run in ("one", "two"))
    assert len(one) == 3 and one == pytest.approx(two, abs=1e-5), (one, two)


def test_sft_with_dropout_resumes_exactly(start, tmp_path, monkeypatch, capsys, one_thread):
    """SFT trains with the model's dropout: the checkpoint keeps each process's random stream, so that a resumed run
    draws the masks the uninterrupted one draws, bit for bit. The runs go in this process (a new one costs seconds of
    imports): each seeds its stream at its start, as a new process would, and the resume takes the checkpoint's."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=448, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
    save_checkpoint(str(base / "ckpt.pt"), {"model": model.state_dict(), "model_config": asdict(model.config),
                                            "step": 0, "tokenizer": "tokenizer.model", "config": {}})
    shutil.copy(start / "base" / "tokenizer.model", base / "tokenizer.model")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + {i} = ?\n", "response": f"#### {2 * i}"}) + "\n"
                            for i in range(16)))

    def run(out, *more):
        return grpo_here(monkeypatch, f"--init_from={base}", "--mode=sft", f"--sft_data={data}", "--batch_size=4",
                         "--n_eval=0", "--eval_interval=2", "--learning_rate=1e-3", "--warmup_iters=0",
                         f"--out_dir={out}", *more)

    def ran(out, *more):
        assert run(out, *more) == 0
    whole, _ = assert_resume_reproduces(ran, tmp_path, 4, 2)
    # the optimizer's state holds its weight decay: a resume that asks for another stops in one line (the SystemExit
    # message, which goes to stderr, exit status 1), and nothing else goes to stderr
    capsys.readouterr()
    message = run(whole, "--init_from=resume", "--max_iters=5", "--weight_decay=0.1")
    assert capsys.readouterr().err == "" and message == (
        f"error: checkpoint {whole / 'ckpt.pt'} was trained with weight_decay=0.0, but the config says weight_decay=0.1, "
        "which the optimizer's state would override: resume with the checkpoint's value, or start a new run in another "
        "--out_dir")


def test_two_process_ddp_rounds_prompts_up_and_stops_on_a_ctrl_c_of_either_process(start, warm_python):
    """3 prompts a step on 2 processes become 4, with a note (as train.py rounds its accumulation steps). A Ctrl-C to
    process 1 amid step 2 (its 4 evaluation prompts, then 8 rollouts a step): both processes end the step, process 0
    saves it, and both exit. (Warm processes, a fresh one spends seconds importing: the SIGINT is process 1's to
    itself.)"""
    out = start / "ddp"
    result = subprocess.run(
        [warm_python["python"], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "grpo.py", *STAGE,
         f"--init_from={start / 'base'}", "--reward=my_reward:ctrl_c", f"--out_dir={out}", "--max_iters=4",
         "--eval_interval=2", "--temperature=1.5", "--prompts_per_step=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", **warm_python["env"], "PYTHONPATH": str(start), "CTRL_C_AT": "15",
             "CTRL_C_RANK": "1"})
    assert result.stdout.count("prompts_per_step=3 rounded up to 4, a multiple of the 2 processes (each takes 2)") == 1
    assert "4 prompts x 4 completions per step" in result.stdout
    assert result.returncode != 0 and f"interrupted at step 2: saved {out / 'ckpt.pt'}" in result.stderr, \
        result.stderr[-3000:]
    steps = [r for r in read_log(out) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and steps[0]["completion_len"] > 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_bad_inputs_give_one_line_errors(start, tmp_path, monkeypatch, capsys):
    """In this process (a new one costs seconds of imports): the SystemExit message is the one line that goes to stderr
    (exit status 1), and nothing else goes there."""
    message = grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--reward=nowhere:nothing", f"--out_dir={tmp_path}")
    assert isinstance(message, str) and message.startswith("error: ") and "cannot load reward" in message
    assert "\n" not in message and capsys.readouterr().err == ""


def test_settings_inputs_and_folders_are_checked_before_out_dir_changes(start, tmp_path, monkeypatch, one_thread):
    """Each refusal is one line, and the folder of a train.py run given as out_dir is as it was after all of them."""
    run = tmp_path / "run"
    shutil.copytree(start / "base", run)
    (run / "log.jsonl").write_text('{"step": 0, "val_loss": 6.0}\n')
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    latin1, malformed = tmp_path / "latin1.jsonl", tmp_path / "malformed.jsonl"
    latin1.write_bytes(b'{"prompt": "1 + 1 = ?\\n", "response": "#### 2"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    malformed.write_text('{"prompt": "1 + 1 = ?\\n", "response": "#### 2"}\n\n{"prompt": "2 + 2 = ?\\n"}\n')
    numbers = tmp_path / "numbers.jsonl"  # a prompt that is no string
    numbers.write_text('{"prompt": 5, "response": "#### 2"}\n')
    long = tmp_path / "long.jsonl"  # a response longer than the model's context
    long.write_text('{"prompt": "1 + 1 = ?\\n", "response": "#### 2"}\n'
                    + json.dumps({"prompt": "x", "response": "1 " * 500}))
    base = f"--init_from={start / 'base'}"
    for args, expected in [
        (["--group_size=1"], "group_size=1 must be at least 2"),
        (["--max_completion_length=0"], "max_completion_length=0 must be positive"),
        (["--prompts_per_step=-4"], "prompts_per_step=-4 must be positive"),
        (["--mode=sft", "--batch_size=0"], "batch_size=0 must be positive"),
        (["--eval_interval=0"], "eval_interval=0 must be positive"),
        (["--mode=eval", "--eval_batch_size=0"], "eval_batch_size=0 must be positive"),
        (["--mode=eval", "--n_eval=0"], "n_eval must be at least 1"),
        (["--micro_batch_size=-1"], "micro_batch_size=-1 must not be negative"),
        (["--loss_agg=ppo"], "unknown loss_agg 'ppo' (choose grpo, dapo, dr_grpo)"),
        ([base], f"{run} holds a run (ckpt.pt): continue it with --init_from=resume, replace it with "
                 "--overwrite=True"),
        (["--init_from=resume"], "is not a grpo.py --mode=grpo run: train.py wrote it"),
        ([base, "--overwrite=True", "--mode=sft", f"--sft_data={latin1}"], f"{latin1} line 2 is not UTF-8 text"),
        ([base, "--overwrite=True", "--mode=sft", f"--sft_data={malformed}"],
         f"{malformed} line 3 is not a JSON object with 'prompt' and 'response' strings"),
        ([base, "--overwrite=True", "--mode=sft", f"--sft_data={numbers}"],
         f"{numbers} line 1 is not a JSON object with 'prompt' and 'response' strings"),
        ([base, "--overwrite=True", "--mode=sft", f"--sft_data={long}"], f"{long} line 2: prompt and response hold"),
    ]:
        message = grpo_here(monkeypatch, f"--out_dir={run}", *args)
        assert message.startswith("error: ") and expected in message and "\n" not in message, (args, message)
    with open(run / ".lock", "a") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "is in use by another run" in grpo_here(monkeypatch, f"--out_dir={run}", base, "--overwrite=True")
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.name != ".lock"} == before


def test_rewards_must_be_finite_numbers_and_weights_finite_to_be_saved(start, tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(start))
    base = [f"--init_from={start / 'base'}", "--max_iters=2"]
    contract = "must be a function (prompt, completion) -> float"
    for function, said in (("nan_every_third", "with a finite value: it returned nan (float)"),
                           ("text", "with a finite value: it returned '1.0' (str)"),
                           ("nothing", "with a finite value: it returned None (NoneType)"),
                           ("raises", "-> float: it raised KeyError: 'answer'")):
        out = tmp_path / function
        message = grpo_here(monkeypatch, *base, f"--reward=my_reward:{function}", f"--out_dir={out}")
        assert message.startswith(f"error: reward 'my_reward:{function}' {contract}") and said in message, message
        assert "\n" not in message and not (out / "ckpt.pt").exists()
    # a learning rate that blows the weights up: step 1 is saved, step 2's weights are not finite and are not
    out = tmp_path / "diverged"
    message = grpo_here(monkeypatch, *base, "--reward=my_reward:longer", "--learning_rate=1e30", "--max_iters=3",
                        "--eval_interval=1", f"--out_dir={out}")
    assert message == (f"error: a weight is not finite at step 2: training diverged; {out / 'ckpt.pt'} is kept as it "
                       "was (lower learning_rate, or look at the reward)")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 1 and all(t.isfinite().all() for t in checkpoint["model"].values())
    assert [r["step"] for r in read_log(out) if "eval_accuracy" in r] == [0, 1]


def test_sampled_pass_at_1_does_not_replace_the_greedy_pass_at_1(start, monkeypatch, capsys, one_thread):
    """With eval_k=1 the sampled score is printed beside the greedy one, not under its name: here greedy decoding is
    always right and sampling always wrong."""
    tok = Tokenizer.load(str(start / "base" / "tokenizer.model"))

    def fake(model, prompts, n, max_new_tokens, temperature, stop_id, generator=None):
        sums = [sum(map(int, tok.decode(p[1:]).split(" = ")[0].split(" + "))) for p in prompts]
        return [tok.encode(f"#### {s + (temperature > 0)}") + [stop_id] for s in sums for _ in range(n)]
    monkeypatch.setattr(rl, "sample_completions", fake)
    assert grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--mode=eval", "--eval_k=1") == 0
    line = [line for line in capsys.readouterr().out.splitlines() if "held-out" in line][0]
    assert line.endswith("pass@1 1.0000, sampled pass@1 0.0000"), line
    assert grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--mode=eval", "--eval_k=2") == 0
    line = [line for line in capsys.readouterr().out.splitlines() if "held-out" in line][0]
    assert line.endswith("pass@1 1.0000, pass@2 0.0000"), line


def test_out_of_range_settings_stop_in_one_line_before_anything_trains(start, tmp_path, monkeypatch, one_thread):
    """Sampled pass@k at temperature 0 (k copies of the greedy completion), an infinite or negative format reward, and
    a lower clip range eps above 1 (1 - eps < 0 clips nothing) are refused, not run."""
    base = f"--init_from={start / 'base'}"
    for args, expected in [
        (["--mode=eval", "--temperature=0"], "sampled pass@8 samples at temperature=0.0: it must be above 0"),
        (["--format_reward=1e999"], "format_reward=inf must be a finite number"),
        (["--format_reward=-1"], "format_reward=-1.0 must not be negative"),
        (["--eps=5"], "eps=5.0 must lie between 0 and 1"),
    ]:
        out = tmp_path / "run"
        message = grpo_here(monkeypatch, base, f"--out_dir={out}", "--max_iters=1", *args)
        assert isinstance(message, str) and message.startswith("error: ") and expected in message, (args, message)
        assert "\n" not in message and not (out / "ckpt.pt").exists()
    assert grpo_here(monkeypatch, base, "--mode=eval", "--temperature=0", "--eval_k=0") == 0  # greedy alone: fine


def test_a_ctrl_c_amid_an_evaluation_stops_at_that_step_as_train_py(start, tmp_path, monkeypatch, capsys, one_thread):
    """The evaluations call the reward too (8 held-out prompts), 16 rollouts a step: a Ctrl-C at call 43 comes amid
    step 2's evaluation, and the run stops there with step 2 saved, training no step 3 first; one at call 3, amid
    step 0's, stops with nothing trained."""
    monkeypatch.syspath_prepend(str(start))
    for at, last in ((43, "interrupted at step 2: saved {ckpt}; resume with --init_from=resume"),
                     (3, "interrupted at step 0: no step trained, so nothing to save")):
        out = tmp_path / f"at{at}"
        monkeypatch.setenv("CTRL_C_AT", str(at))
        capsys.readouterr()
        sys.modules.pop("my_reward", None)  # imported afresh, as by a new process: its calls count from 0
        try:
            code = grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--reward=my_reward:ctrl_c",
                             "--max_iters=4", "--eval_interval=2", "--temperature=1.5", f"--out_dir={out}")
        finally:
            sys.modules.pop("my_reward", None)
        stderr = capsys.readouterr().err
        assert code == 130, (code, stderr[-2000:])
        assert stderr.strip().splitlines()[-1] == last.format(ckpt=out / "ckpt.pt")
        if at == 43:
            assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
            assert [r["step"] for r in read_log(out) if "reward" in r] == [1, 2]
        else:
            assert not (out / "ckpt.pt").exists()


def test_sft_refuses_the_prompts_that_its_held_out_accuracy_scores(start, tmp_path, monkeypatch, one_thread):
    """--mode=tasks writes the held-out problems as prompt/response rows too: SFT on them would make the logged held-out
    accuracy a training accuracy. A file of training problems trains."""
    held_out, train = problems("addition", True, 0, 8), problems("addition", False, 0, 8)
    data = tmp_path / "sft.jsonl"
    args = [f"--init_from={start / 'base'}", "--mode=sft", f"--sft_data={data}", "--batch_size=4", "--max_iters=1"]
    data.write_text("".join(json.dumps({"prompt": p, "response": f"#### {a}"}) + "\n" for p, a in train[:3] + held_out))
    message = grpo_here(monkeypatch, *args, f"--out_dir={tmp_path / 'a'}")
    assert isinstance(message, str) and message.startswith(
        f"error: {data} line 4 holds the held-out prompt {held_out[0][0]!r}"), message
    assert not (tmp_path / "a" / "ckpt.pt").exists()
    data.write_text("".join(json.dumps({"prompt": p, "response": f"#### {a}"}) + "\n" for p, a in train))
    assert grpo_here(monkeypatch, *args, f"--out_dir={tmp_path / 'b'}") == 0


def test_sft_pairs_need_no_room_for_generated_tokens(start, tmp_path, monkeypatch, one_thread):
    """An SFT pair that fits the context trains, whatever max_completion_length (a setting of generation) is: here
    a prompt of 55 tokens and a response of 7 in a context of 64, with room for 16 generated tokens asked for."""
    tok = Tokenizer.load(str(start / "base" / "tokenizer.model"))
    prompt, response = "alice reads books " * 11 + "1 + 1 = ?\n", "#### 2"
    n_prompt = 1 + len(tok.encode(prompt))  # the end-of-document token first; the response ends with another
    assert n_prompt + 16 > 64 and n_prompt + len(tok.encode(response)) + 1 <= 64 + 1, n_prompt
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "response": response}) + "\n")
    code = grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--mode=sft", f"--sft_data={data}", "--n_eval=0",
                     "--batch_size=2", "--max_iters=1", "--max_completion_length=16", f"--out_dir={tmp_path / 'o'}")
    assert code == 0, code
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"] == 1
