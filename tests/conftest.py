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


def run_stage(*args, check=True, timeout=300, env=None, warm=None):
    """Run a stage (e.g. 'train.py', '--max_iters=5') in a fresh Python process from the repository root; with
    warm (the warm_python fixture), in one forked from a process that has imported torch and the project."""
    import subprocess
    result = subprocess.run([warm["python"] if warm else sys.executable, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(warm["env"] if warm else {}), **(env or {})})
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


# -----------------------------------------------------------------------------
# warm processes: a fresh Python spends seconds importing torch and the project, a tiny run a fraction of one. A
# `python` (and `torchrun`) shim hands its command line, folder, environment and standard streams to a process that
# has imported them, which forks one for each; the stages' own processes (ablate.py's runs, torchrun's workers) go
# the same way.

SHIM = """#!{python} -S
import json, os, signal, socket, sys
server = socket.socket(socket.AF_UNIX)
server.connect(os.environ["NANOLLM_WARM"])
request = {{"argv": {prefix} + sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}
socket.send_fds(server, [json.dumps(request).encode()], [0, 1, 2])
server.shutdown(socket.SHUT_WR)
reply = server.makefile()
pid = int(reply.readline())
for stop in (signal.SIGINT, signal.SIGTERM):
    signal.signal(stop, lambda signum, frame: os.kill(pid, signum))
sys.exit(int(reply.readline()))
"""


def run_forked(request, python, rewrite=None):
    """In a forked process: request's command line, as `python ...` would run it, in its folder, environment
    (PYTHONPATH too) and standard streams; rewrite(argv) -> the argv a script runs with. Never returns."""
    import atexit, signal, traceback, weakref  # noqa: E401
    # the exit handlers and finalizers so far are the forking process's (running them costs more than a tiny run):
    # the command's own run at its end
    atexit._clear()
    for finalizer in list(weakref.finalize._registry):
        finalizer.atexit = False
    weakref.finalize._registered_with_atexit = False
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.executable = python  # the processes it starts (torchrun's workers, ablate.py's runs) come back here
    argv = [arg for arg in request["argv"] if arg != "-u"]
    extra = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            sys.path[:1] = [os.getcwd(), *extra]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = rewrite(argv) if rewrite else argv
            sys.path[:1] = [os.path.dirname(os.path.abspath(argv[0])), *extra]
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:  # as the interpreter ends: a message goes to stderr with status 1
        code = stop.code if stop.code is None or isinstance(stop.code, int) else 1
        if code == 1 and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code or 0)


def serve_forked(path, python, rewrite=None):
    """Fork a process for each request on the socket at path (run_forked); python: the shim, their sys.executable."""
    import io, select, socket  # noqa: E401
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    import torch._dynamo  # noqa: F401  (what an optimizer imports when the first one is made)
    import torch.distributed.run  # noqa: F401
    import configurator, decode, evaluate, hf, kernel, optim, rl, tokenizer  # noqa: E401, F401
    figure = matplotlib.pyplot.figure()  # the font cache, which the first figure loads
    figure.savefig(io.BytesIO(), format="png")
    matplotlib.pyplot.close(figure)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # there once it listens
    children = {}
    while True:
        if select.select([listener], [], [], 0.01)[0]:
            connection, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            while chunk := connection.recv(1 << 20):
                data += chunk
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                for other in (listener, connection, *children.values()):
                    other.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                run_forked(json.loads(data), python, rewrite)
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            children[pid] = connection
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            code = os.waitstatus_to_exitcode(status)
            try:
                children.pop(pid).sendall(f"{code if code >= 0 else 128 - code}\n".encode())
            except OSError:  # the shim is gone
                pass


def start_warm(folder, serve="import conftest; conftest.serve_forked(*sys.argv[1:])"):
    """The warm process, running `serve` (Python code, given the socket's path and the `python` shim as sys.argv[1:]),
    and the shims folder/python and folder/torchrun: (the process, {"python": the shim, "env": what a shim needs})."""
    import subprocess
    import time
    path = str(folder / "warm.sock")
    for name, prefix in (("python", []), ("torchrun", ["-m", "torch.distributed.run"])):
        (folder / name).write_text(SHIM.format(python=sys.executable, prefix=prefix))
        (folder / name).chmod(0o755)
    code = f"import sys; sys.path[:0] = [{os.path.dirname(__file__)!r}, {ROOT!r}]; {serve}"
    server = subprocess.Popen([sys.executable, "-c", code, path, str(folder / "python")], cwd=ROOT,
                              start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not os.path.exists(path):
        assert server.poll() is None, "the warm process did not start"
        time.sleep(0.05)
    return server, {"python": str(folder / "python"), "env": {"NANOLLM_WARM": path}}


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory):
    """start_warm's {"python", "env"}, for stages whose tests need no fresh interpreter (none about signals to a
    process or its group: a signal to the shim reaches the forked process only as SIGINT or SIGTERM, forwarded)."""
    import signal
    server, warm = start_warm(tmp_path_factory.mktemp("warm"))
    yield warm
    os.killpg(server.pid, signal.SIGTERM)  # it and whatever it forked
    server.wait()
