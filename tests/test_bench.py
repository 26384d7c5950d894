"""bench.py end to end on the CPU with a tiny model, as a subprocess (it is a script)."""
import json
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_embd=32", "--n_head=2", "--block_size=32", "--vocab_size=64", "--batch_size=2", "--steps=2",
        "--repeats=2", "--warmup=1", "--decode_tokens=8", "--device=cpu"]


def bench(*args):
    # one thread: for a model this tiny, waking a thread pool costs more than the math (and is noisy on 2 cores)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_bench_reads_a_train_config_and_writes_table_and_json(tmp_path):
    train_config = tmp_path / "train_config.py"
    train_config.write_text("learning_rate = 1e-3\nmax_iters = 10\nn_layer = 2\n")  # training-only keys are skipped
    out = tmp_path / "out" / "bench.json"
    run = bench(str(train_config), *TINY, "--mtp_depth=1", f"--json_out={out}")
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["model_config"]["n_layer"] == 2  # the file's model key was applied
    assert result["device_name"] == "cpu" and result["torch_version"]
    ours = result["rows"]["ours"]
    assert ours["tokens_per_s"] > 0 and ours["ms_per_step"] > 0 and ours["decode_tokens_per_s"] > 0
    assert ours["decode"]["speculative x1 match"] == 1.0  # fp32: speculative greedy decoding is plain greedy decoding
    assert result["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers x (k, v) x heads x head_dim x fp32
    assert "tokens/s" in run.stdout and "decode tok/s" in run.stdout
    assert any(line.startswith("ours ") for line in run.stdout.splitlines())


def test_profile_prints_where_the_step_time_goes(tmp_path):
    run = bench(*TINY, "--decode=False", "--profile=True", f"--json_out={tmp_path / 'bench.json'}")
    assert run.returncode == 0, run.stderr
    table = run.stdout[run.stdout.index("profile of 3 training steps, by self_cpu_time_total"):]
    assert "aten::mm" in table and "Self CPU time total" in table  # the matmuls, among the ops that took time


def test_unknown_command_line_key_fails_in_one_line():
    run = bench("--learning_rate=1e-3")  # a train.py key: fine in a file, an error on bench's command line
    assert run.returncode == 1
    assert run.stderr.strip() == "error: unknown config key 'learning_rate' (from the command line)"


@pytest.mark.parametrize("bad, words", [("--steps=0", "steps=0 must be positive"),
                                        ("--block_size=16", "prompt_len=16 must be below block_size (16)"),
                                        ("--decode_context=30", "decode_context + decode_tokens must fit in block_size")])
def test_bad_settings_stop_before_anything_is_timed(monkeypatch, bad, words):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, bad])  # in this process: it stops before its first step
    with pytest.raises(SystemExit) as e:
        runpy.run_path("bench.py")
    assert str(e.value.code).startswith("error: ") and words in str(e.value.code)


def test_hf_llama_reference(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    run = bench(*TINY, "--n_layer=1", "--n_kv_head=1", "--decode=False", "--reference=hf_llama", f"--json_out={out}")
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows["ours"]["tokens_per_s"] > 0 and rows["hf_llama"]["tokens_per_s"] > 0
    assert "ours / hf_llama:" in run.stdout
    assert any(line.startswith("hf_llama ") for line in run.stdout.splitlines())


@pytest.mark.parametrize("reference,flag", [("hf_llama", "--mlp=relu2"), ("hf_qwen3_moe", "--logit_softcap=15"),
                                            ("hf_llama", "--unet_skips=True")])
def test_a_reference_that_cannot_match_stops_in_one_line(reference, flag):
    pytest.importorskip("transformers")
    run = bench(*TINY, "--n_experts=4", flag, f"--reference={reference}")
    assert run.returncode == 1 and run.stderr.startswith(f"error: {reference} ") and flag.split("=")[0] in run.stderr
    assert "Traceback" not in run.stderr


def test_flops_prints_the_accounting_and_times_nothing(tmp_path):
    train_config = tmp_path / "train_config.py"
    train_config.write_text("max_iters = 10\ngradient_accumulation_steps = 3\nbatch_size = 2\n")  # train.py's run
    out = tmp_path / "bench.json"
    run = bench(str(train_config), "--flops", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32",
                "--vocab_size=64", "--n_experts=4", "--moe_topk=2", "--mtp_depth=1", f"--json_out={out}")
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    parts, flops = result["flops_breakdown"], result["flops_per_token"]
    assert sum(parts.values()) == flops and parts["moe"] > 0 and parts["mtp"] > 0 and parts["mlp"] == 0
    assert result["tokens"] == 10 * 3 * 2 * 32 and result["training_flops"] == flops * result["tokens"]
    assert result["params"]["active"] < result["params"]["total"] and result["params"]["MTP modules"] > 0
    assert result["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers x (k, v) x heads x head_dim x bf16
    assert "attention scores" in run.stdout and "tokens/s" not in run.stdout
