"""
Every command that README.md, docs/*.md and the config files' headers show, found in those files when the test
runs and run as written, in one copy of the repository, so that none of them breaks silently. The test changes
sizes, step counts, device and compile flags (SIZES, STAGE_FLAGS), data folders and download URLs (a small corpus,
and files served from 127.0.0.1 in the layouts of the real servers), and the texts in REWRITES; what it does not
run is in NOT_RUN with the reason. A command that it finds and neither runs nor lists fails the test, and so does a
listed one that no file shows any more.

Order: task files first (prepare.py reads them), then the blocks that make datasets, then the other blocks and
headers (a block or header is a sequence, run in order), then the commands shown inline in the prose; a command
shown twice runs once. The stages run in processes forked from one that has imported torch and the project (a
fresh Python spends seconds importing): `python` and `torchrun` on the PATH hand their command line, folder,
environment and standard streams to it, so ablate.py's runs and torchrun's workers go the same way.
"""
import glob
import hashlib
import http.server
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, serve_forked, start_warm

# -----------------------------------------------------------------------------
# what the test changes

# appended to the copy's config files: the model shapes shrink, the rest stays the config's
TRAIN_SIZES = "n_embd = 32\nn_head = 4\nmlp_hidden = 0\nvocab_size = 0\n"
SIZES = {
    "gpt2_124m.py": TRAIN_SIZES + "n_layer = 2\n",
    # 5 layers: the sweeps' --engram_layers=1,4, whose tables shrink too
    "gutenberg_small.py": TRAIN_SIZES + "n_layer = 5\nengram_table_size = 4096\nengram_dim = 32\n",
    "sweep_gutenberg.py": "train_flops = 3e8\n",  # about two steps of the shrunk model per run
    # two steps per run: the recipe, the first candidate and all of them together
    "sweep_speedrun.py": "train_tokens = 1024\nruns = runs[:2] + runs[-1:]\nrepeat_best = 0\n",
}
# added to every command line of a stage
STAGE_FLAGS = {
    "train.py": ["--device=cpu", "--compile=False", "--block_size=64", "--batch_size=8", "--eval_iters=1"],
    "sample.py": ["--device=cpu", "--compile=False", "--max_new_tokens=8"],
    "bench.py": ["--device=cpu", "--compile=False", "--n_layer=2", "--n_embd=32", "--n_head=4", "--block_size=64",
                 "--vocab_size=512", "--batch_size=2", "--gradient_accumulation_steps=1", "--steps=1", "--repeats=1",
                 "--warmup=1", "--decode_tokens=4", "--decode_batch=2", "--prompt_len=4"],
    "grpo.py": ["--device=cpu", "--max_iters=2", "--prompts_per_step=2", "--group_size=2", "--n_eval=4",
                "--eval_batch_size=4", "--n_task_examples=400", "--batch_size=2"],
}
BUDGETS = {"--epochs", "--train_flops", "--train_tokens", "--train_minutes"}  # train.py: else --max_iters=2
# (file, text, replacement) in the commands of that file before they run
REWRITES = [
    ("docs/stages.md", "[ $steps -lt 8000 ]", "[ $steps -lt 200 ]"),  # the recipe's loop: one round of pretraining
    ("docs/stages.md", "sysconfig.get_paths()['stdlib'] + '/**/*.py'", "'{corpus}/*.txt'"),  # 1 MB, not 30 MB
    ("docs/stages.md", '" 300 data/cost300.txt', '" 1 data/cost300.txt'),
    ("docs/hf.md", "path/to/Qwen3-0.6B", "{qwen3}"),  # a tiny Qwen3 folder made here
    # eight CPU processes sharding a model cost half a minute: two show the same
    ("docs/stages.md", "--nproc_per_node=8 train.py config/gpt2_124m.py --fsdp=True",
     "--nproc_per_node=2 train.py config/gpt2_124m.py --fsdp=True"),
    ("config/speedrun.py", "--epochs=1 ", "--max_iters=2 "),  # the one-epoch run: two steps, of 64 tokens
    ("config/speedrun.py", "--seq_warmup=0.3 ", "--seq_warmup=0.3 --seq_warmup_min=16 "),
    # the config header's command ran this sweep uncompiled in the same folder: a finished run of other arguments
    ("docs/results.md", '--compile=True"', '--compile=True" --out_dir=out/sweep_speedrun_compiled'),
    ("docs/results.md", "--epochs=1 ", "--max_iters=2 "),
    ("docs/results.md", "--seq_warmup=0.3 ", "--seq_warmup=0.3 --seq_warmup_min=16 "),
    ("docs/results.md", "--n_layer=16 --n_embd=2048 --n_head=16 --n_kv_head=4 ", "--n_layer=2 --n_kv_head=2 "),  # 0.81B
]
NOT_RUN = {
    "pip install -r requirements.txt": "installs packages",
    "pip install pytest matplotlib transformers safetensors pyarrow": "installs packages",
    "pip install pyarrow": "installs packages",
    "pip install tokenizers": "installs packages",
    "python3 -m pytest -q tests": "the test suite, of which this test is part",
    "bash .ci/run": "CI: installs packages, then runs the test suite",
    "torchrun --nproc_per_node=2": "a fragment (the launcher of a measurement), not a command",
    "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 train.py "
    "config/gpt2_124m.py --out_dir=out/gpt2_124m_2nodes": "needs two machines",
    "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 train.py "
    "config/gpt2_124m.py --fsdp=True --out_dir=out/gpt2_124m_fsdp_2nodes": "needs two machines",
}


# -----------------------------------------------------------------------------
# the commands the files show

def shown_commands():
    """[(where, block, command)]: each line of a bash block (continuations joined, comment lines left out) and each
    '$ ' line of another block, with the block's first line as block; each inline code span that starts a command
    (block None), in README.md and docs/*.md; each command in a config file's first comment lines (block: the file)."""
    found = []
    for path in ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]:
        fence, pending = None, ""
        for number, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1):
            text = line.strip()
            if text.startswith("```"):
                fence, block = (None, None) if fence is not None else (text[3:].strip(), f"{path}:{number}")
            elif fence in ("bash", "sh", "shell"):
                if text and not text.startswith("#"):
                    pending += text
                    if pending.endswith("\\"):
                        pending = pending[:-1]
                        continue
                    found.append((f"{path}:{number}", block, pending))
                pending = ""
            elif fence is not None:
                if text.startswith("$ "):
                    found.append((f"{path}:{number}", block, text[2:]))
            else:
                found += [(f"{path}:{number}", None, span) for span in re.findall(r"`([^`]+)`", line)
                          if re.match(r"(python3?|torchrun|pip|bash) ", span)]
    for path in sorted(glob.glob("config/*.py", root_dir=ROOT)):
        for number, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1):
            if not line.startswith("#"):
                break
            if match := re.match(r"#\s+((python|torchrun) .*)", line):
                found.append((f"{path}:{number}", path, match.group(1)))
    return found


def plain(command):
    """The command without its comment, spaces collapsed: how NOT_RUN and the check for repeats know it."""
    try:
        return " ".join(shlex.split(command, comments=True))
    except ValueError:  # a shell construct's fragment
        return command.strip()


def units(found):
    """The runnable units in their order, as (where, shell text): a block's commands in its order, a shell loop and
    the assignments before it as one. Task files first (prepare.py reads them), then the blocks that run prepare.py
    and the inline commands that do, then the other blocks, then the other inline commands."""
    blocks = {}
    for where, block, command in found:
        blocks.setdefault(block or where, []).append((where, command))
    tasks, data, others, inline = [], [], [], []
    for name, commands in blocks.items():
        sequence, group, depth = [], [], 0
        for where, command in commands:
            first = command.split()[0]
            depth += (first in ("while", "for", "until", "if")) - (first in ("done", "fi"))
            group.append((where, command))
            if not depth and not re.fullmatch(r"(\w+=[^\s;]*;?\s*)+", plain(command)):
                sequence.append((group[0][0], "\n".join(text for _, text in group)))
                group = []
        tasks += [unit for unit in sequence if re.match(r"python grpo\.py .*--mode=tasks", plain(unit[1]))]
        rest = [unit for unit in sequence if unit not in tasks]
        if any(plain(text).startswith("python prepare.py") for _, text in rest):
            data += rest
        else:
            (inline if name == commands[0][0] else others).extend(rest)
    return tasks + data + others + inline


def stage_command(argv):
    """A stage's argv (['train.py', ...]) with its STAGE_FLAGS, and for prepare.py its data from 127.0.0.1 (DATA)."""
    stage = os.path.basename(argv[0])
    given = {arg.split("=")[0] for arg in argv[1:]}
    added = list(STAGE_FLAGS.get(stage, []))
    if stage == "train.py" and not given & BUDGETS:
        added.append("--max_iters=2")
    if stage == "bench.py" and "--decode_context" in given:
        added.append("--decode_context=16")
    if stage == "prepare.py":
        added += [] if "--vocab_size" in given else ["--vocab_size=512"]
        dataset = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--dataset=")), "pystdlib")
        added += [] if "--input" in given else DATA.get(dataset, [])
    return [*argv, *added]


# -----------------------------------------------------------------------------
# the stages' processes: forked from one that has imported torch and the project's modules (conftest.start_warm)

def stage_argv(argv):
    """In a stage's forked process, the argv it runs with (stage_command); only the commands about plots draw, since
    a figure costs more than a tiny run."""
    if not {"--plot=True", "--report_only=True"} & set(argv) and "ablate.py" not in argv:
        sys.modules["matplotlib"] = None
    return stage_command(argv)


def serve(path, python):
    """conftest.serve_forked with GPT-2's BPE files, a download, replaced by a stand-in of the same layout (256 byte
    ranks and <|endoftext|>), and transformers' reference models imported once, before the first fork."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM  # noqa: F401
    stand_in = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    tiktoken.get_encoding = lambda name: stand_in
    serve_forked(path, python, rewrite=stage_argv)


# -----------------------------------------------------------------------------
# the copy of the repository, its data sources and its processes

DATA = {}  # --dataset=NAME -> the flags that fetch it from 127.0.0.1 (set by the fixture)


def write_corpus(folder, size):
    """Documents of about 2 KB cut from the project's own sources: a small code corpus, as pystdlib is a large one."""
    text = "".join(open(os.path.join(ROOT, name), encoding="utf-8").read() for name in sorted(os.listdir(ROOT))
                   if name.endswith(".py"))[:size]
    docs, doc = [], ""
    for part in re.split(r"\n\n(?=\S)", text):
        doc += part + "\n\n"
        if len(doc) > 2000:
            docs.append(doc)
            doc = ""
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return docs


def write_served(served, docs):
    """The files of each download under served/, at the paths of their servers: the benchmark's books (a list of
    six, the val books among them), TinyStories and FineWeb-Edu as the Hugging Face Hub lists and serves them."""
    listing = []
    books = {"11-0.txt": docs[0][:500], "pg1661.txt": docs[1][:500], "pg1342.txt": docs[2][:500],  # val: kept short
             "pg84.txt": "".join(docs[3:7]), "pg1080.txt": "".join(docs[7:11]), "2701-0.txt": "".join(docs[11:15])}
    for i, (name, text) in enumerate(books.items()):
        data = (f"The Project Gutenberg eBook {i}\r\n*** START OF THE PROJECT GUTENBERG EBOOK {i} ***\r\n{text}\r\n"
                f"*** END OF THE PROJECT GUTENBERG EBOOK {i} ***\r\nlicense\r\n")
        path = served / "gutenberg" / "data" / "books" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode())
        listing.append(f"{hashlib.sha256(data.encode()).hexdigest()}  data/books/{name}\n")
    (served / "gutenberg.sha256").write_text("".join(listing))

    def hub_files(repo, folder, files):
        entries = []
        for name, data in files.items():
            path = served / "hf" / "datasets" / repo / "resolve" / "main" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            entries.append({"type": "file", "path": f"{folder}/{name}".lstrip("/"), "size": len(data),
                            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}})
        tree = served / "hf" / "api" / "datasets" / repo / "tree" / "main" / folder
        tree.parent.mkdir(parents=True, exist_ok=True)
        tree.write_text(json.dumps(entries))

    stories = [" ".join(doc.split()[:60]) for doc in docs]
    hub_files("roneneldan/TinyStories", "", {
        "TinyStoriesV2-GPT4-train.txt": "\n<|endoftext|>\n".join(stories[:-4]).encode(),
        "TinyStoriesV2-GPT4-valid.txt": "\n<|endoftext|>\n".join(stories[-4:]).encode()})
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = {}
    for i in range(4):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": docs[i::4], "id": list(range(len(docs[i::4])))}), buffer)
        parquet[f"00{i}_00000.parquet"] = buffer.getvalue()
    hub_files("HuggingFaceFW/fineweb-edu", "sample/10BT", parquet)
    (served / "input.txt").write_text("\n\n".join(" ".join(doc.split()[:40]) for doc in docs))


def write_qwen3(folder, docs):
    """A tiny Qwen3 folder as the Hub holds one: config.json, model.safetensors, a byte-level BPE tokenizer.json."""
    import tokenizers
    from hf import to_hf
    from model import GPT, GPTConfig
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(docs, tokenizers.trainers.BpeTrainer(
        vocab_size=383, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    to_hf(GPT(GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, vocab_size=384, qk_norm=True)),
          str(folder), eos_id=tok.token_to_id("<|endoftext|>"))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def start_stages(root, data):
    """The process that the stages fork from, and the `python` and `torchrun` in root/bin that hand it commands:
    (the process, the environment that puts them first on the PATH). data: DATA's entries."""
    (root / "bin").mkdir()
    stages, warm = start_warm(root / "bin", f"import test_commands; test_commands.DATA.update({data!r}); "
                                            "test_commands.serve(*sys.argv[1:])")
    return stages, {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", **warm["env"], "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The repository's copy (its stages, docs and config files, with SIZES), its data sources served from
    127.0.0.1, and the process that the stages fork from: (folder, environment, the values of REWRITES)."""
    pytest.importorskip("pyarrow")  # FineWeb-Edu's parquet files
    pytest.importorskip("tokenizers")  # the Qwen3 folder's tokenizer.json
    root = tmp_path_factory.mktemp("commands")
    repo = root / "repo"
    repo.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".md", ".txt")) or name in ("docs", "assets"):
            os.symlink(os.path.join(ROOT, name), repo / name)
    shutil.copytree(os.path.join(ROOT, "config"), repo / "config", ignore=shutil.ignore_patterns("__pycache__"))
    for path in (repo / "config").glob("*.py"):
        text = path.read_text()
        sizes = SIZES.get(path.name, TRAIN_SIZES if re.search(r"^(n_layer|exec)", text, re.M) else "")
        path.write_text(text + "\n# the test's sizes\n" + sizes)
    docs = write_corpus(root / "corpus", 120_000)
    write_served(root / "served", docs)
    write_qwen3(root / "qwen3", docs)

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root / "served"), **kwargs)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}"
    stages, env = start_stages(root, {
        "pystdlib": [f"--input={root / 'corpus'}", "--name=pystdlib"],
        "gutenberg": [f"--gutenberg_url={url}/gutenberg", f"--gutenberg_books={root / 'served' / 'gutenberg.sha256'}"],
        "tinystories": [f"--hf_url={url}/hf"], "fineweb_edu": [f"--hf_url={url}/hf"],
        "tinyshakespeare": [f"--tinyshakespeare_url={url}/input.txt"]})
    yield repo, env, {"qwen3": root / "qwen3", "corpus": root / "corpus"}
    os.killpg(stages.pid, signal.SIGTERM)  # it and whatever it forked
    stages.wait()
    files.shutdown()


def test_every_documented_command_runs(clone):
    repo, env, values = clone
    found = shown_commands()
    shown = {plain(command) for _, _, command in found}
    assert not set(NOT_RUN) - shown, f"NOT_RUN lists commands that no file shows: {set(NOT_RUN) - shown}"
    stale = [rewrite for rewrite in REWRITES if not any(where.startswith(rewrite[0] + ":") and rewrite[1] in command
                                                        for where, _, command in found)]
    assert not stale, f"REWRITES changes texts that no command holds: {stale}"
    done, failures = set(), []
    for where, text in units(found):
        if plain(text) in done or plain(text) in NOT_RUN:
            continue
        done.add(plain(text))
        for path, old, new in REWRITES:
            if where.startswith(path + ":"):
                text = text.replace(old, new.format(**values))
        started = time.time()
        result = subprocess.run(["bash", "-c", "set -eo pipefail\n" + text], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=120)
        print(f"{time.time() - started:5.1f} s  exit {result.returncode}  {where}  {plain(text)[:90]}")
        if result.returncode or "Traceback (most recent call last)" in result.stdout + result.stderr:
            failures.append(f"{where}: {text}\nexit {result.returncode}\n{result.stdout[-1500:]}\n"
                            f"{result.stderr[-3000:]}")
    assert not failures, "\n\n".join(failures)


def test_no_module_shadows_an_installed_package():
    """A stage runs with the repository first on sys.path, so a module of ours named as a package that pip installed
    hides it from every library that imports it (transformers >= 5.25 imports Hugging Face's `kernels`)."""
    from importlib.metadata import packages_distributions
    ours = {os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))}
    installed = packages_distributions()
    assert not {name: installed[name] for name in ours & set(installed)}
