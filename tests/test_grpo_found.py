"""grpo.py and rl.py: zero-variance groups, pass@k's names and settings, refused settings, a Ctrl-C amid an evaluation,
and SFT data (held-out prompts; long prompts), each against the stage run at tiny sizes in this process."""
import json
import os
import runpy
import shutil
import signal
import sys
from dataclasses import asdict

import pytest
import torch

import configurator
import rl
from conftest import ROOT, read_log
from configurator import save_checkpoint
from model import GPT, GPTConfig
from rl import group_advantages, problems
from tokenizer import Tokenizer

STAGE = ["--device=cpu", "--task=addition", "--n_eval=8", "--eval_batch_size=4", "--max_completion_length=6",
         "--prompts_per_step=4", "--group_size=4", "--learning_rate=1e-3", "--warmup_iters=0"]
REWARD_MODULE = """
import os, signal
calls = 0


def ctrl_c(prompt, completion):
    \"\"\"the length, and a Ctrl-C to this process at its CTRL_C_AT-th call\"\"\"
    global calls
    calls += 1
    if calls == int(os.environ["CTRL_C_AT"]):
        os.kill(os.getpid(), signal.SIGINT)
    return float(len(completion))
"""


def grpo_here(monkeypatch, *args, stage=STAGE):
    """grpo.py in this process (a new one costs seconds of imports): the message it stops with, or its exit code (0
    when it ends without one); "KeyboardInterrupt" for a Ctrl-C that grpo.py does not catch."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["grpo.py", *stage, *args])
    monkeypatch.setattr(configurator, "LOCKS", {})
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
    root = tmp_path_factory.mktemp("grpo_found")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=448, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(str(root / "base" / "ckpt.pt"), {"model": model.state_dict(), "model_config": asdict(model.config),
                                                     "step": 0, "tokenizer": "tokenizer.model", "config": {}})
    shutil.copy(tiny_data / "tokenizer.model", root / "base" / "tokenizer.model")
    (root / "found_reward.py").write_text(REWARD_MODULE)  # a name of its own: test_grpo.py imports my_reward
    return root


def test_groups_of_equal_rewards_that_a_float_mean_misses_have_no_advantage():
    """8 rewards of 0.1 (say a format reward on wrong answers): their float32 mean is not 0.1 and their std not 0, but
    the group has no advantage, and it is skipped as a zero-variance group."""
    for value in (0.1, 0.3, 0.7, 1.2, 1 / 3):
        rewards = torch.tensor([value] * 8 + [1.0, 0.0] * 4)
        for scale in (True, False):
            advantages, zero_variance = group_advantages(rewards, 8, scale=scale)
            assert zero_variance.tolist() == [True, False], (value, scale)
            assert (advantages[:8] == 0).all() and (advantages[8:].abs() > 0.4).all(), (value, scale, advantages)


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
        sys.modules.pop("found_reward", None)  # imported afresh, as by a new process: its calls count from 0
        try:
            code = grpo_here(monkeypatch, f"--init_from={start / 'base'}", "--reward=found_reward:ctrl_c",
                             "--max_iters=4", "--eval_interval=2", "--temperature=1.5", f"--out_dir={out}")
        finally:
            sys.modules.pop("found_reward", None)
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
