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
    assert "KV cache: 512 bytes per token in float32," in run.stdout  # a whole number of bytes, as --flops prints it
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


@pytest.mark.parametrize("reference, flags", [
    ("hf_llama", ["--n_experts=4"]), ("hf_llama", ["--attention=mla"]), ("hf_llama", ["--mtp_depth=1"]),
    ("hf_llama", ["--residual=hc"]), ("hf_llama", ["--attn_span=sliding"]), ("hf_llama", ["--engram_layers=0"]),
    ("hf_llama", ["--attn_gate=headwise"]), ("hf_llama", ["--qkv_bias=True"]),
    ("hf_qwen3_moe", ["--n_experts=4", "--mtp_depth=1"]), ("hf_qwen3_moe", ["--n_experts=4", "--attn_pattern=SG"])])
def test_a_reference_refuses_every_flag_that_changes_the_model_it_trains(monkeypatch, tmp_path, reference, flags):
    """Else transformers' model would train another model (a dense MLP for our experts, no MTP module, full
    attention for a window) and be credited with our FLOPs per token, and ours / reference compares unlike models."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, *flags, f"--reference={reference}",  # stops before timing
                                      f"--json_out={tmp_path / 'bench.json'}"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path("bench.py")
    message = str(e.value.code)
    assert message.startswith(f"error: {reference} cannot match") and flags[-1].split("=")[0] in message, message


@pytest.mark.parametrize("shape", [["--head_dim=8"], ["--head_dim=24", "--n_kv_head=1", "--tie_embeddings=False"]])
def test_the_hf_llama_reference_has_our_shape(monkeypatch, tmp_path, shape):
    """A head_dim of its own (not n_embd / n_head) is Llama's too: the reference has our parameters, one for one."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, "--n_layer=1", "--decode=False", "--warmup=0", "--steps=1",
                                      "--repeats=1", "--reference=hf_llama", f"--json_out={tmp_path / 'bench.json'}",
                                      *shape])
    bench_globals = runpy.run_path("bench.py")
    from model import GPT
    ours, reference = GPT(bench_globals["model_config"]), bench_globals["build_reference"]()
    assert sum(p.numel() for p in reference.parameters()) == sum(p.numel() for p in ours.parameters())


def test_flops_refuses_an_unknown_dtype_in_one_line(monkeypatch, tmp_path):
    """--flops names the cache's dtype: a name torch lacks (bf16) stopped with a traceback, int8 gave 0 bytes."""
    monkeypatch.chdir(ROOT)
    for name in ("bf16", "int8"):
        monkeypatch.setattr(sys, "argv", ["bench.py", "--flops", "--n_layer=1", "--n_embd=32", "--n_head=2",
                                          "--block_size=32", "--vocab_size=64", f"--dtype={name}",
                                          f"--json_out={tmp_path / 'bench.json'}"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path("bench.py")
        assert str(e.value.code).startswith(f"error: unknown dtype '{name}'"), e.value.code
