"""prepare.py on tiny corpora: shards agree with meta.json, splits, input formats, downloads, one-line errors, and
nothing of an earlier dataset lost to a bad setting, a failed or interrupted re-run or a full disk."""
import errno
import fcntl
import hashlib
import http.server
import importlib.util
import json
import os
import random
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import numpy as np
import pytest

from conftest import run_stage
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a cat dog sat ran on under mat log quickly slowly red blue def return if else for in print "
         "value index count (x) [i] = + - : , .").split()


def make_doc(seed, lines=12):
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)) + "\n"


def write_corpus(folder, n=12):
    """doc00.txt ... : n small documents; returns {basename: text}."""
    folder.mkdir(exist_ok=True)
    docs = {f"doc{i:02d}.txt": make_doc(i) for i in range(n)}
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return docs


def prepare(*argv):
    """prepare.py in this process, as `python prepare.py *argv` runs it; an error is its SystemExit."""
    with mock.patch.object(sys, "argv", ["prepare.py", *argv]):
        runpy.run_path(os.path.join(ROOT, "prepare.py"), run_name="__main__")


def run(tmp_path, *args):
    """prepare.py with a tiny vocab into tmp_path/out; returns (meta, {split: decoded documents})."""
    prepare(f"--out_root={tmp_path / 'out'}", "--name=t", "--vocab_size=300", "--num_workers=2", *args)
    out = tmp_path / "out" / "t"
    meta = json.loads((out / "meta.json").read_text())
    tokenizer = Tokenizer.load(str(out / meta["tokenizer_path"]))
    docs = {}
    for split, info in meta["splits"].items():
        tokens = np.concatenate([np.fromfile(out / shard, dtype=meta["dtype"]) for shard in info["shards"]])
        assert len(tokens) == info["tokens"]
        assert tokens[-1] == meta["eos_id"] and (tokens == meta["eos_id"]).sum() == info["documents"]
        ends = np.flatnonzero(tokens == meta["eos_id"])
        docs[split] = [tokenizer.decode(doc[:-1]) for doc in np.split(tokens, ends[:-1] + 1)]
        assert info["bytes"] == sum(len(doc.encode("utf-8")) for doc in docs[split])
    return meta, docs


def test_shards_and_meta_agree(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n=30)
    meta, docs = run(tmp_path, f"--input={tmp_path / 'corpus'}", "--shard_size=500", "--val_fraction=0.1")
    assert set(meta) == {"tokenizer", "tokenizer_path", "vocab_size", "dtype", "bos_id", "eos_id", "pad_id",
                         "special", "splits", "source", "prepare", "created"}
    assert (meta["tokenizer"], meta["tokenizer_path"], meta["vocab_size"], meta["dtype"]) == \
        ("bpe", "tokenizer.model", 300, "uint16")
    assert meta["special"]["eos"] == meta["eos_id"] and meta["source"]["files"] == 30
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert (train["documents"], val["documents"]) == (27, 3)
    cost = meta["prepare"]  # the main process and its 2 workers, each of them more than the Python interpreter
    assert cost["processes"] == 3 and cost["peak_rss_mb"] > 3 * 10
    assert cost["tokens_per_second"] * cost["seconds"] == pytest.approx(train["tokens"] + val["tokens"], rel=0.02)
    assert len(train["shards"]) > 1 and train["shards"][0] == "train_000.bin"
    assert all(os.path.getsize(tmp_path / "out" / "t" / s) == 500 * 2 for s in train["shards"][:-1])
    # every document comes back exactly, once
    assert sorted(docs["train"] + docs["val"]) == sorted(corpus.values())


def test_val_files_and_tokenizer_reuse(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    # a word only val has: trained on all documents, this tokenizer would make it one piece; on train alone, 7
    corpus["doc03.txt"] = "zyxwvut\n" * 500
    (tmp_path / "corpus" / "doc03.txt").write_text(corpus["doc03.txt"])
    args = [f"--input={tmp_path / 'corpus'}", "--val_files=doc03.txt,doc07.txt", "--vocab_size=400"]
    meta, docs = run(tmp_path, *args)
    assert sorted(docs["val"]) == sorted([corpus["doc03.txt"], corpus["doc07.txt"]])
    assert len(docs["train"]) == len(corpus) - 2 and corpus["doc07.txt"] not in docs["train"]
    tokenizer_path = tmp_path / "out" / "t" / "tokenizer.model"
    assert len(Tokenizer.load(str(tokenizer_path)).encode("zyxwvut")) == 7
    # the same tokenizer again, from a copy elsewhere: identical shards
    (tmp_path / "kept.model").write_bytes(tokenizer_path.read_bytes())
    train_ids = (tmp_path / "out" / "t" / "train_000.bin").read_bytes()
    again, _ = run(tmp_path, *args, f"--tokenizer={tmp_path / 'kept.model'}")
    assert (tmp_path / "out" / "t" / "train_000.bin").read_bytes() == train_ids


def test_strip_gutenberg(tmp_path):
    (tmp_path / "books").mkdir()
    body = "Chapter 1\r\n\r\nIt was a dark and stormy night; the rain fell.\r\nThe end of chapter one.\r\n" * 5
    book = ("The Project Gutenberg eBook of Stuff\r\n\r\nThis eBook is for the use of anyone anywhere\r\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK STUFF ***\r\n\r\n" + body +
            "\r\n*** END OF THE PROJECT GUTENBERG EBOOK STUFF ***\r\nSection 1. General Terms of Use and license\r\n")
    (tmp_path / "books" / "pg1.txt").write_bytes(book.encode("utf-8-sig"))  # a BOM, like many Gutenberg files
    plain = "No markers here, so this file is kept whole.\r\n" * 5
    (tmp_path / "books" / "plain.txt").write_text(plain, newline="")
    _, docs = run(tmp_path, f"--input={tmp_path / 'books'}", "--strip_gutenberg=True", "--val_files=plain.txt")
    assert docs["train"] == [body.replace("\r\n", "\n").strip("\n")]
    assert docs["val"] == [plain.replace("\r\n", "\n").strip("\n")]


def test_jsonl_glob_and_doc_separator(tmp_path):
    rows = [make_doc(i) for i in range(6)] + ["unicode row: \u2028 line separator, naïve, 日本語"]
    with open(tmp_path / "rows.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": row, "id": i}, ensure_ascii=False) + "\n\n" for i, row in enumerate(rows))
    stories = [make_doc(10 + i, lines=3) for i in range(5)]
    (tmp_path / "stories.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    meta, docs = run(tmp_path, f"--input={tmp_path}/*.jsonl,{tmp_path / 'stories.txt'}", "--doc_separator=<|endoftext|>")
    assert meta["source"]["files"] == 2
    assert sorted(docs["train"] + docs["val"]) == sorted(rows + [s.strip("\n") for s in stories])


def one_line_error(*argv):
    with pytest.raises(SystemExit) as excinfo:
        prepare(*argv)
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_pystdlib_reads_only_the_standard_library(tmp_path, capsys):
    """The documents named in --val_files must be among those read: the standard library's os.py and pydoc's topic
    texts are, a module of site-packages (tqdm's) is not."""
    import tqdm._monitor
    third_party = os.path.basename(tqdm._monitor.__file__)
    message = one_line_error(f"--out_root={tmp_path}", f"--val_files=os.py,pydoc_topic_assert,{third_party}")
    assert message == f"error: --val_files: {third_party} is not among the input's documents"
    files = int(re.search(r"from ([\d,]+) files", capsys.readouterr().out)[1].replace(",", ""))
    assert files > 500


def test_errors(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus", n=3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    out = f"--out_root={tmp_path / 'out'}"
    corpus = f"--input={tmp_path / 'corpus'}"
    assert "nowhere.txt" in one_line_error(out, f"--input={tmp_path / 'nowhere.txt'}")
    assert "no documents" in one_line_error(out, f"--input={tmp_path / 'empty'}")
    message = one_line_error(out, "--dataset=imaginary")
    assert "imaginary" in message and "tinyshakespeare" in message and "--input" in message
    assert "missing.txt" in one_line_error(out, corpus, "--val_files=doc00.txt,missing.txt")
    assert "vocab_size=200" in one_line_error(out, corpus, "--vocab_size=200")
    assert "bad.jsonl line 2" in one_line_error(out, f"--input={tmp_path / 'bad.jsonl'}")
    assert "no documents left to train" in one_line_error(out, corpus, "--val_files=doc00.txt,doc01.txt,doc02.txt")
    assert "shard_sise" in one_line_error(out, corpus, "--shard_sise=10")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    (tmp_path / "pages.parquet").write_bytes(b"PAR1")
    assert "pip install pyarrow" in one_line_error(out, f"--input={tmp_path / 'pages.parquet'}")


def test_command_line_error_is_one_line():
    result = subprocess.run([sys.executable, "prepare.py", "--dataset=imaginary"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: unknown --dataset=imaginary") and result.stderr.count("\n") == 1


# -----------------------------------------------------------------------------
# nothing lost: bad settings, a failed or interrupted re-run, a full disk leave the earlier dataset as it was

def files_under(folder):
    """{relative path: bytes} of every file under folder (none if it is missing)."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


@pytest.fixture
def dataset(tmp_path):
    """A small dataset of several shards in tmp_path/out/t, from tmp_path/corpus: returns (out_root, its files)."""
    write_corpus(tmp_path / "corpus", n=8)
    run(tmp_path, f"--input={tmp_path / 'corpus'}", "--shard_size=300")
    return tmp_path / "out", files_under(tmp_path / "out")


def again(tmp_path, *args):
    """The one-line error of a re-run into tmp_path/out/t."""
    return one_line_error(f"--out_root={tmp_path / 'out'}", "--name=t", f"--input={tmp_path / 'corpus'}",
                          "--vocab_size=300", *args)


def test_invalid_numbers_stop_before_anything_is_written(tmp_path):
    """Case 1 (shard_size 0 wrote empty shards without end) and negative num_workers; 0 workers is one per core."""
    write_corpus(tmp_path / "corpus", n=4)
    for arg, message in [("--shard_size=0", "--shard_size=0: a shard holds at least one token"),
                         ("--shard_size=-5", "--shard_size=-5: a shard holds at least one token"),
                         ("--num_workers=-1", "--num_workers=-1: give a number of processes, or 0 for one per core"),
                         ("--val_fraction=1.0", "--val_fraction=1.0: give the share of documents held out for val, "
                                                "at least 0 and below 1")]:
        assert again(tmp_path, arg) == f"error: {message}"
        assert not os.path.exists(tmp_path / "out")
    meta, _ = run(tmp_path, f"--input={tmp_path / 'corpus'}", "--num_workers=0")
    assert meta["splits"]["train"]["documents"] == 3


def test_failed_rerun_keeps_the_dataset(tmp_path, dataset):
    """Case 2: a re-run that fails (a bad vocab_size, a missing tokenizer file, bad input) changes nothing: not the
    shards, not meta.json, not tokenizer.model, and leaves no temporary folder."""
    out_root, before = dataset
    out = out_root / "t"
    assert len([f for f in before if f.startswith("t/train_")]) > 1
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut sho')
    for args, message in [
            (["--vocab_size=200"], "error: vocab_size=200 is too small"),
            ([f"--tokenizer={tmp_path / 'missing.model'}"], f"error: tokenizer {tmp_path / 'missing.model'} not found"),
            ([f"--input={tmp_path / 'bad.jsonl'}"], f"error: {tmp_path / 'bad.jsonl'} line 2 is not a JSON object"),
            (["--val_files=doc00.txt,nowhere.txt"], "error: --val_files: nowhere.txt is not among")]:
        assert again(tmp_path, *args).startswith(message)
        assert files_under(out_root) == before
    # a run killed between the two renames of its swap: the next run puts the earlier dataset back
    os.makedirs(out_root / "t.tmp" / "new")
    (out_root / "t.tmp" / "new" / "train_000.bin").write_bytes(b"unfinished")
    os.rename(out, out_root / "t.tmp" / "old")
    assert again(tmp_path, "--vocab_size=200").startswith("error: vocab_size=200 is too small")
    assert files_under(out_root) == before
    # a file of the user's in the folder, or a file in its place: refused, kept
    (out / "notes.txt").write_text("mine")
    assert again(tmp_path) == (f"error: {out} holds files prepare.py did not write (notes.txt): move them away or "
                               "choose another --name")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    for folder in ("f", "t.tmp"):
        (out_root / folder).write_text("not a folder")
        assert again(tmp_path, f"--name={folder.removesuffix('.tmp')}") == \
            f"error: {out_root / folder} is a file, not a folder: move it away or choose another --name"
        (out_root / folder).unlink()
    assert files_under(out_root) == before
    # a re-run that succeeds replaces the folder whole: no shard of the earlier dataset stays
    run(tmp_path, f"--input={tmp_path / 'corpus'}")
    assert sorted(files_under(out_root)) == ["t/meta.json", "t/tokenizer.model", "t/train_000.bin", "t/val_000.bin"]


def test_second_prepare_on_a_dataset_is_refused(tmp_path, dataset):
    """Case 2: while one prepare.py builds a dataset (it holds the lock of the folder beside it), a second one into
    the same folder stops in one line and touches neither that folder nor the dataset."""
    out_root, before = dataset
    os.makedirs(out_root / "t.tmp")
    with open(out_root / "t.tmp" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_stage("prepare.py", f"--input={tmp_path / 'corpus'}", f"--out_root={out_root}", "--name=t",
                           check=False, timeout=120)
    assert result.returncode == 1 and result.stderr == \
        f"error: another prepare.py is writing {out_root / 't'}: wait for it to end, or choose another --name\n"
    assert files_under(out_root) == {**before, "t.tmp/.lock": b""}


def test_full_disk_keeps_the_dataset(tmp_path, dataset, monkeypatch):
    """Case 12: a full disk while writing a shard or meta.json (atomically, by configurator.write_json): one line,
    the earlier dataset as it was, no temporary files; a later run, with space again, succeeds."""
    out_root, before = dataset
    out = out_root / "t"
    fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    for fails_on in (".bin", "meta.json"):
        monkeypatch.setattr(os, "fsync", lambda fd: (full if fails_on in os.readlink(f"/proc/self/fd/{fd}")
                                                     else fsync)(fd))
        assert again(tmp_path) == f"error: could not write {out} (the disk is full); the dataset in {out} is unchanged"
        assert files_under(out_root) == before
        message = one_line_error(f"--out_root={out_root}", "--name=u", f"--input={tmp_path / 'corpus'}",
                                 "--vocab_size=300")
        assert message == f"error: could not write {out_root / 'u'} (the disk is full); no dataset was written"
        assert files_under(out_root) == before
    monkeypatch.setattr(os, "fsync", fsync)
    run(tmp_path, f"--input={tmp_path / 'corpus'}")
    assert sorted(files_under(out_root)) == ["t/meta.json", "t/tokenizer.model", "t/train_000.bin", "t/val_000.bin"]


def test_ctrl_c_keeps_the_dataset(tmp_path, dataset):
    """Case 15: Ctrl-C (SIGINT to the terminal's process group) while the workers tokenize: one line, no traceback of
    the main process or of a worker, every worker gone, the earlier dataset as it was, no temporary folder."""
    out_root, before = dataset
    base = [make_doc(i, lines=60) for i in range(50)]
    (tmp_path / "big.txt").write_text("\f".join(f"{i} {base[i % 50]}" for i in range(1000)))
    prepare_py = subprocess.Popen(
        [sys.executable, "prepare.py", f"--input={tmp_path / 'big.txt'}", "--doc_separator=\f", "--name=t",
         f"--out_root={out_root}", f"--tokenizer={out_root / 't' / 'tokenizer.model'}", "--num_workers=2",
         "--shard_size=1000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    first_shard = out_root / "t.tmp" / "new" / "train_000.bin"
    while not os.path.exists(first_shard) and prepare_py.poll() is None:
        time.sleep(0.005)
    os.killpg(prepare_py.pid, signal.SIGINT)
    _, stderr = prepare_py.communicate(timeout=60)
    assert prepare_py.returncode == 1 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.endswith(f"\nerror: interrupted; the dataset in {out_root / 't'} is unchanged\n"), stderr
    with pytest.raises(ProcessLookupError):  # no process of the group is left: the pool's workers were stopped
        os.killpg(prepare_py.pid, 0)
    assert files_under(out_root) == before


def test_input_that_is_not_utf8_or_not_readable(tmp_path):
    """Case 21: a file of the user's that is not UTF-8 stops the run (it was skipped) with the file and line; so
    does a malformed JSONL line, and a parquet file that is not one."""
    write_corpus(tmp_path / "corpus", n=3)
    latin1 = tmp_path / "corpus" / "latin1.txt"
    latin1.write_bytes("line one\nline two\ncaf\xe9 au lait\n".encode("latin-1"))
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes('{"text": "fine"}\n\n{"text": "na\xefve"}\n'.encode("latin-1"))
    advice = "convert the file, e.g. with iconv -f latin1 -t utf-8, or leave it out"
    out = f"--out_root={tmp_path / 'out'}"
    message = one_line_error(out, f"--input={tmp_path / 'corpus'}")
    assert message == f"error: {latin1} line 3 is not UTF-8 (byte 0xe9): {advice}"
    assert one_line_error(out, f"--input={rows}") == f"error: {rows} line 3 is not UTF-8 (byte 0xef): {advice}"
    rows.write_text('{"text": "fine"}\n{"text": "cut sho')
    assert one_line_error(out, f"--input={rows}") == f"error: {rows} line 2 is not a JSON object with a 'text' string"
    if importlib.util.find_spec("pyarrow"):
        (tmp_path / "pages.parquet").write_bytes(b"PAR1 but no more")
        message = one_line_error(out, f"--input={tmp_path / 'pages.parquet'}")
        assert message.startswith(f"error: {tmp_path / 'pages.parquet'} is not a parquet file with a 'text' column (")
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
        assert one_line_error(out, f"--input={tmp_path / 'numbers.parquet'}").endswith("(its type is int64, not strings)")
    assert files_under(tmp_path / "out") == {}


def test_a_file_named_twice_is_read_once(tmp_path):
    """A folder and a glob in it (or one file twice) name the same files: each is read once, so that no document is
    both trained on and held out for val."""
    corpus = write_corpus(tmp_path / "corpus", n=10)
    meta, docs = run(tmp_path, f"--input={tmp_path / 'corpus'},{tmp_path}/corpus/*.txt,{tmp_path}/corpus//doc00.txt",
                     "--val_fraction=0.3")
    assert meta["source"]["files"] == 10 and sorted(docs["train"] + docs["val"]) == sorted(corpus.values())


def test_separator_that_overlaps_itself_cuts_as_the_whole_text(tmp_path):
    """A separator whose end can begin it again ('---' in '----', here the last one read) cuts a streamed file where
    splitting its whole text does, the first match first, as reading the file whole for --strip_gutenberg does."""
    docs = [make_doc(i, lines=4).strip() for i in range(8)]
    text = "---".join(docs[:7]) + "----" + docs[7]
    (tmp_path / "a.txt").write_text(text)
    _, got = run(tmp_path, f"--input={tmp_path / 'a.txt'}", "--doc_separator=---")
    assert sorted(got["train"] + got["val"]) == sorted(d.strip("\r\n") for d in text.split("---"))
    _, whole = run(tmp_path, f"--input={tmp_path / 'a.txt'}", "--doc_separator=---", "--strip_gutenberg=True")
    assert sorted(whole["train"] + whole["val"]) == sorted(got["train"] + got["val"])


def test_jsonl_text_that_is_not_unicode_stops_naming_the_line(tmp_path):
    """A JSON string may escape half of a surrogate pair (an emoji cut in two: "\\ud83d"), which no UTF-8 can hold:
    one line naming the file and the row, whether a tokenizer is trained or given, and nothing written."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": make_doc(i)}) + "\n" for i in range(6)) + '{"text": "cut \\ud83d"}\n')
    Tokenizer.train([make_doc(i) for i in range(6)], 300, str(tmp_path / "given.model"))
    for args in ([], [f"--tokenizer={tmp_path / 'given.model'}"]):
        message = one_line_error(f"--out_root={tmp_path / 'out'}", f"--input={rows}", "--vocab_size=300", *args)
        assert message == f"error: {rows} line 7 is not UTF-8 text (its 'text' holds the lone surrogate \\ud83d)"
    assert files_under(tmp_path / "out") == {}


def test_input_errors_name_the_input(tmp_path):
    """A folder without .txt, .jsonl or .parquet files, and a link to no file, are input problems, said as such
    (not 'its files are empty', not 'could not write' the dataset)."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("words " * 100)
    out = f"--out_root={tmp_path / 'out'}"
    assert one_line_error(out, f"--input={tmp_path / 'notes'}") == \
        f"error: --input {tmp_path / 'notes'}: no .txt, .jsonl or .parquet files (name other files explicitly)"
    write_corpus(tmp_path / "corpus", n=3)
    os.symlink(tmp_path / "gone.txt", tmp_path / "corpus" / "link.txt")
    assert one_line_error(out, f"--input={tmp_path / 'corpus'}") == \
        f"error: cannot read {tmp_path / 'corpus' / 'link.txt'}: No such file or directory"
    assert files_under(tmp_path / "out") == {}


def byte_level_tokenizer(folder, texts, **files):
    """A Hugging Face folder with a byte-level BPE (exact round trips) trained on texts, and files {name: text}."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    for name, text in {"tokenizer_config.json": json.dumps({"eos_token": "<|endoftext|>"}), **files}.items():
        (folder / name).write_text(text)


def test_rerun_over_a_dataset_of_a_given_tokenizer(tmp_path):
    """A dataset keeps a given tokenizer's file under its own name (kept.model) and a Hugging Face folder's chat
    template: both are prepare.py's own, so a second run replaces the dataset instead of refusing it."""
    corpus = write_corpus(tmp_path / "corpus", n=6)
    Tokenizer.train(list(corpus.values()), 300, str(tmp_path / "kept.model"))
    byte_level_tokenizer(tmp_path / "hf", list(corpus.values()), **{"chat_template.jinja": "{{ messages }}"})
    for given, kept in (("kept.model", "kept.model"), ("hf", "chat_template.jinja")):
        for _ in range(2):
            _, docs = run(tmp_path, f"--input={tmp_path / 'corpus'}", f"--tokenizer={tmp_path / given}")
            assert sorted(docs["train"] + docs["val"]) == sorted(corpus.values())
            assert (tmp_path / "out" / "t" / kept).exists()


# -----------------------------------------------------------------------------
# downloads, against a local server

PAYLOAD = "\n".join(make_doc(100 + i) for i in range(40)).encode()  # documents apart at blank lines
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 40


def gutenberg_file(number, marker="*** "):
    """A small Project Gutenberg file as the benchmark's are stored: a BOM, CRLF, header and license around the book
    (some files write the markers without the space)."""
    book = f"{marker}START OF THE PROJECT GUTENBERG EBOOK {number} ***\n\n{make_doc(200 + number, lines=40)}\n" \
           f"{marker}END OF THE PROJECT GUTENBERG EBOOK {number} ***\n"
    text = f"The Project Gutenberg eBook of {number}\n\nThis eBook is for the use of anyone anywhere\n{book}License\n"
    return ("\ufeff" + text).replace("\n", "\r\n").encode()


# the three val books under their benchmark names, and train books, at paths like the source repository's
BOOKS = {f"/books/data/{path}": gutenberg_file(number, marker) for number, (path, marker) in enumerate([
    ("books/11-0.txt", "*** "), ("pg1661.txt", "*** "), ("pg1342.txt", "***"), ("books/74-0.txt", "*** "),
    ("books/pg768.txt", "***"), ("pg108.txt", "*** ")])}


@pytest.fixture
def server():
    """A local server: /books/... serves BOOKS, /file honours Range, /flaky breaks off its first response halfway,
    /chunky breaks off without a Content-Length, /norange ignores Range, /badsha publishes a wrong sha256, /redirect-good and /redirect-bad redirect to /file as
    Hugging Face does; a test adds its own paths to `served` (path -> bytes). Yields (url, requests, served)."""
    requests, calls, served = [], {}, {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.path, self.headers.get("Range")))
            calls[self.path] = calls.get(self.path, 0) + 1
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", "/file")
                sha = PAYLOAD_SHA256 if self.path == "/redirect-good" else "0" * 64
                self.send_header("X-Linked-ETag", f'"{sha}"')
                self.end_headers()
                return
            if self.path.startswith("/books/") and self.path not in BOOKS:
                self.send_error(404)
                return
            body = {"/shakespeare.txt": SHAKESPEARE.encode(), **BOOKS, **served}.get(self.path, PAYLOAD)
            start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-")[1])
            if self.path == "/norange":
                start = 0
            if self.path == "/chunky":  # chunked, no Content-Length: its first response breaks off mid-file
                self.protocol_version, self.close_connection = "HTTP/1.1", True
                self.send_response(206 if start else 200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = body[start:] if calls[self.path] > 1 else body[:len(body) // 2]
                end = b"0\r\n\r\n" if calls[self.path] > 1 else b""  # the last chunk, or the connection just closes
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) + end)
                return
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            if self.path == "/badsha":
                self.send_header("X-Linked-ETag", '"' + "f" * 64 + '"')
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if self.path == "/flaky" and calls[self.path] == 1:
                self.wfile.write(body[:len(body) // 2])  # then the connection closes, short of Content-Length
                return
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests, served
    httpd.shutdown()
    httpd.server_close()


def nobody():
    """The URL of a port on 127.0.0.1 where no server listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def download(tmp_path, url):
    """prepare.py --dataset=url; returns the meta.json it wrote and the cached download's path."""
    meta, _ = run(tmp_path, f"--dataset={url}", "--doc_separator=\n\n")
    name = url.rsplit("/", 1)[1]
    return meta, tmp_path / "out" / "downloads" / os.path.splitext(name)[0] / name


def test_download_resumes_a_broken_transfer(tmp_path, server):
    url, requests, _ = server
    meta, path = download(tmp_path, f"{url}/flaky")
    assert path.read_bytes() == PAYLOAD and not os.path.exists(f"{path}.part")
    assert meta["source"]["sha256"] == PAYLOAD_SHA256 and meta["splits"]["train"]["documents"] > 30
    assert requests == [("/flaky", None), ("/flaky", f"bytes={len(PAYLOAD) // 2}-")]
    download(tmp_path, f"{url}/flaky")  # cached: no request
    assert len(requests) == 2


def test_download_without_a_length_resumes_a_broken_transfer(tmp_path, server):
    url, requests, _ = server
    _, path = download(tmp_path, f"{url}/chunky")
    assert path.read_bytes() == PAYLOAD  # not the half that came first (read whole again: the chunk was cut)
    assert [path for path, _ in requests] == ["/chunky", "/chunky"]


def test_download_continues_a_part_file_or_restarts(tmp_path, server):
    url, requests, _ = server
    for route, part in [("/file", PAYLOAD[:1000]), ("/norange", b"junk from an old server" * 100)]:
        folder = tmp_path / "out" / "downloads" / route.strip("/")
        folder.mkdir(parents=True)
        (folder / f"{route.strip('/')}.part").write_bytes(part)
        meta, path = download(tmp_path, url + route)
        assert meta["source"]["sha256"] == PAYLOAD_SHA256 and path.read_bytes() == PAYLOAD
    assert requests == [("/file", "bytes=1000-"), ("/norange", "bytes=2300-")]


def test_download_checks_sha256(tmp_path, server):
    url, _, _ = server
    for route in ("/badsha", "/redirect-bad"):  # the sha256 the server publishes does not match the file
        message = one_line_error(f"--out_root={tmp_path}", f"--dataset={url}{route}")
        assert "sha256" in message
        folder = tmp_path / "downloads" / route.strip("/")
        assert not os.path.exists(folder / route.strip("/")) and not os.path.exists(folder / f"{route.strip('/')}.part")
    assert download(tmp_path, f"{url}/redirect-good")[0]["source"]["sha256"] == PAYLOAD_SHA256


def test_download_offline_points_to_input(tmp_path):
    message = one_line_error(f"--out_root={tmp_path}", f"--dataset={nobody()}/input.txt")
    assert "--input=PATH" in message


def test_dataset_download_is_cached(tmp_path, server):
    url, requests, _ = server
    for _ in range(2):
        meta, docs = run(tmp_path, f"--dataset={url}/shakespeare.txt", "--doc_separator=\n\n")
    assert requests == [("/shakespeare.txt", None)]
    assert meta["source"]["sha256"] == hashlib.sha256(SHAKESPEARE.encode()).hexdigest()
    assert len(docs["train"]) + len(docs["val"]) == 80
    assert os.path.exists(tmp_path / "out" / "downloads" / "shakespeare" / "shakespeare.txt")


def gutenberg(tmp_path, url, *args, sha256=None):
    """prepare.py --dataset=gutenberg from url/books with BOOKS as the list of books (their sha256, or these)."""
    sha256 = {path: hashlib.sha256(body).hexdigest() for path, body in BOOKS.items()} | (sha256 or {})
    sums = tmp_path / "books.sha256"
    sums.write_text("".join(f"{sha256[path]}  {path.removeprefix('/books/')}\n" for path in BOOKS))
    prepare("--dataset=gutenberg", f"--gutenberg_url={url}/books/", f"--gutenberg_books={sums}",
            f"--out_root={tmp_path / 'out'}", "--vocab_size=300", "--num_workers=2", *args)


def test_gutenberg_download_equals_the_folder_and_resumes(tmp_path, server):
    """--dataset=gutenberg makes the same shards and tokenizer, byte for byte, as the benchmark command on a folder of
    the same files; a second run fetches only the books missing from the cache or changed in it."""
    url, requests, _ = server
    gutenberg(tmp_path, url)
    assert sorted(path for path, _ in requests) == sorted(BOOKS)
    (tmp_path / "folder").mkdir()
    for path, body in BOOKS.items():
        (tmp_path / "folder" / os.path.basename(path)).write_bytes(body)
    prepare(f"--input={tmp_path / 'folder'}", "--name=folder", "--strip_gutenberg=True",
            "--val_files=11-0.txt,pg1661.txt,pg1342.txt", f"--out_root={tmp_path / 'out'}", "--vocab_size=300",
            "--num_workers=2")
    downloaded, folder = (files_under(tmp_path / "out" / name) for name in ("gutenberg", "folder"))
    metas = [json.loads(files.pop("meta.json")) for files in (downloaded, folder)]
    assert sorted(downloaded) == ["tokenizer.model", "train_000.bin", "val_000.bin"] and downloaded == folder
    meta = metas[0]
    assert meta["splits"] == metas[1]["splits"] and meta["source"] == {"dataset": "gutenberg", "url": f"{url}/books/",
                                                                       "files": 6}
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (3, 3)
    cache = tmp_path / "out" / "downloads" / "gutenberg"
    assert files_under(cache) == {os.path.basename(path): body for path, body in BOOKS.items()}
    (cache / "pg1661.txt").unlink()
    (cache / "74-0.txt").write_bytes(b"changed")
    del requests[:]
    gutenberg(tmp_path, url, "--name=again")
    assert sorted(path for path, _ in requests) == ["/books/data/books/74-0.txt", "/books/data/pg1661.txt"]
    again = files_under(tmp_path / "out" / "again")
    assert json.loads(again.pop("meta.json"))["splits"] == meta["splits"] and again == downloaded


def test_gutenberg_checksum_failure_and_offline(tmp_path, server):
    """A book that is not the one listed stops the run in one line naming it, and no dataset is written; so does a
    server that cannot be reached."""
    url, _, _ = server
    wrong = {"/books/data/pg108.txt": "0" * 64}
    with pytest.raises(SystemExit) as excinfo:
        gutenberg(tmp_path, url, sha256=wrong)
    actual = hashlib.sha256(BOOKS["/books/data/pg108.txt"]).hexdigest()
    assert excinfo.value.code == (f"error: pg108.txt from {url}/books/data/pg108.txt is not the file listed "
                                  f"(sha256 {actual}, expected {'0' * 64}); deleted it, no dataset written")
    assert sorted(os.listdir(tmp_path / "out")) == ["downloads"]
    assert "pg108.txt" not in os.listdir(tmp_path / "out" / "downloads" / "gutenberg")
    # the benchmark's own list, from a server that is not there
    closed = nobody()
    message = one_line_error("--dataset=gutenberg", f"--gutenberg_url={closed}",
                             f"--out_root={tmp_path / 'offline'}")
    assert message.startswith(f"error: cannot download {closed}/data/books/11-0.txt (")
    assert "offline?" in message
    assert os.listdir(tmp_path / "offline") == ["downloads"]


def test_gutenberg_list():
    """The benchmark's list: 96 books of distinct names, the three val books among them, no copyrighted one."""
    with open(os.path.join(ROOT, "config", "gutenberg.sha256")) as f:
        books = [line.split() for line in f]
    names = [os.path.basename(path) for _, path in books]
    assert len(books) == len(set(names)) == 96 and all(re.fullmatch(r"[0-9a-f]{64}", sha) for sha, _ in books)
    assert {"11-0.txt", "pg1661.txt", "pg1342.txt"} <= set(names) and not {"16-0.txt", "pg5200.txt"} & set(names)


# -----------------------------------------------------------------------------
# the Hugging Face datasets, streaming, the tokenizer's sample

def serve_hub(served, repo, folder, files, sha256=None):
    """Serve files ({path in the repository: bytes}) as the Hugging Face Hub does: the API's listing of folder, with
    the sha256 of each file (or the one `sha256` gives for it), and each file under resolve/main/."""
    listing = [{"type": "directory", "oid": "0" * 40, "path": f"{folder}/more".lstrip("/")}]
    for path, body in files.items():
        lfs = {"oid": (sha256 or {}).get(path, hashlib.sha256(body).hexdigest()), "size": len(body), "pointerSize": 134}
        listing.append({"type": "file", "oid": "1" * 40, "size": len(body), "path": path, "lfs": lfs})
        served[f"/datasets/{repo}/resolve/main/{path}"] = body
    served[f"/api/datasets/{repo}/tree/main" + (f"/{folder}" if folder else "")] = json.dumps(listing).encode()


def stories(texts):
    """TinyStories' layout: each story followed by a line <|endoftext|>."""
    return "".join(f"{text}\n<|endoftext|>\n" for text in texts).encode()


def test_tinystories_whole_train_file_and_its_own_val(tmp_path, server):
    """--dataset=tinystories: the whole train file, read and shuffled in blocks (many of them here, with separators
    and multi-byte characters across the reads), its own validation file as val, each file checked against the
    sha256 the Hub lists; the listing is kept, so that a second run needs no network. A byte that is not UTF-8 in
    a later read is named by its line."""
    url, requests, served = server
    train = [f"{make_doc(300 + i, lines=3).strip()} naïve 日本語 {i}" for i in range(40)]
    valid = [make_doc(400 + i, lines=3).strip() for i in range(5)]
    files = {"TinyStoriesV2-GPT4-train.txt": stories(train), "TinyStoriesV2-GPT4-valid.txt": stories(valid),
             "TinyStories-valid.txt": b"the first version, not read"}
    serve_hub(served, "roneneldan/TinyStories", "", files)
    meta, docs = run(tmp_path, "--dataset=tinystories", f"--hf_url={url}", "--block_mb=0.001", "--vocab_size=400")
    assert sorted(docs["train"]) == sorted(train) and sorted(docs["val"]) == sorted(valid)
    assert meta["source"] == {"dataset": "tinystories", "repo": "roneneldan/TinyStories", "url": url, "files": 2,
                              "sha256": {name: hashlib.sha256(files[name]).hexdigest() for name in list(files)[:2]}}
    assert sorted(path for path, _ in requests) == ["/api/datasets/roneneldan/TinyStories/tree/main",
                                                    "/datasets/roneneldan/TinyStories/resolve/main/"
                                                    "TinyStoriesV2-GPT4-train.txt",
                                                    "/datasets/roneneldan/TinyStories/resolve/main/"
                                                    "TinyStoriesV2-GPT4-valid.txt"]
    del requests[:]
    again, _ = run(tmp_path, "--dataset=tinystories", f"--hf_url={nobody()}", "--block_mb=0.001", "--vocab_size=400")
    assert requests == [] and again["splits"] == meta["splits"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(stories(train[:30]) + "caf\xe9\n".encode("latin-1") + stories(train[30:]))
    message = one_line_error(f"--out_root={tmp_path / 'out'}", f"--input={bad}", "--doc_separator=<|endoftext|>",
                             "--block_mb=0.001")
    data = bad.read_bytes()
    line = data.count(b"\n", 0, data.index(b"caf")) + 1
    assert line > 100 and message.startswith(f"error: {bad} line {line} is not UTF-8 (byte 0xe9)")


def parquet_file(texts, path=None, rows=4):
    """A parquet file of texts (and another column), in row groups of `rows` rows: its bytes, or written to path."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    sink = path or pa.BufferOutputStream()
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), sink, row_group_size=rows)
    return None if path else sink.getvalue().to_pybytes()


def test_fineweb_edu_shards_and_the_100bt_sample(tmp_path, server):
    """--dataset=fineweb_edu --shards=N: the first N parquet files of the 10BT sample in the Hub's listing, 0 all of
    them (fetching only those not kept yet), more than there are one line; fineweb_edu_100bt reads the 100BT sample."""
    url, requests, served = server
    pages = {f"sample/10BT/{i:03d}_00000.parquet": [make_doc(500 + 10 * i + j) for j in range(6)] for i in range(3)}
    serve_hub(served, "HuggingFaceFW/fineweb-edu", "sample/10BT", {p: parquet_file(t) for p, t in pages.items()})
    first, second, third = pages.values()
    _, docs = run(tmp_path, "--dataset=fineweb_edu", f"--hf_url={url}", "--shards=2")
    assert sorted(docs["train"] + docs["val"]) == sorted(first + second)
    del requests[:]
    meta, docs = run(tmp_path, "--dataset=fineweb_edu", f"--hf_url={url}", "--shards=0")
    assert sorted(docs["train"] + docs["val"]) == sorted(first + second + third) and meta["source"]["files"] == 3
    assert requests == [("/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/002_00000.parquet", None)]
    assert one_line_error(f"--out_root={tmp_path / 'out'}", "--dataset=fineweb_edu", f"--hf_url={url}",
                          "--shards=4") == ("error: --shards=4: HuggingFaceFW/fineweb-edu has 3 parquet files in "
                                            "sample/10BT (--shards=0 takes them all)")
    assert "--shards=-1" in one_line_error("--dataset=fineweb_edu", "--shards=-1")
    more = [make_doc(600 + i) for i in range(5)]
    serve_hub(served, "HuggingFaceFW/fineweb-edu", "sample/100BT",
              {"sample/100BT/000_00000.parquet": parquet_file(more)})
    meta, docs = run(tmp_path, "--dataset=fineweb_edu_100bt", f"--hf_url={url}")
    assert sorted(docs["train"] + docs["val"]) == sorted(more)
    assert sorted(os.listdir(tmp_path / "out" / "downloads" / "fineweb_edu_100bt")) == ["000_00000.parquet",
                                                                                         "files.json"]


def test_hub_checksum_failure_and_offline(tmp_path, server):
    """A file that is not the one the Hub lists stops the run in one line naming it and is not kept, with no dataset
    written; so does a file the listing lacks, and, with nothing kept, a Hub that cannot be reached."""
    url, _, served = server
    files = {"TinyStoriesV2-GPT4-train.txt": stories(["a story", "another"]), "TinyStoriesV2-GPT4-valid.txt":
             stories(["a third"])}
    serve_hub(served, "roneneldan/TinyStories", "", files, sha256={"TinyStoriesV2-GPT4-valid.txt": "0" * 64})
    message = one_line_error(f"--out_root={tmp_path}", "--dataset=tinystories", f"--hf_url={url}")
    actual = hashlib.sha256(files["TinyStoriesV2-GPT4-valid.txt"]).hexdigest()
    assert message == (f"error: TinyStoriesV2-GPT4-valid.txt from {url}/datasets/roneneldan/TinyStories/resolve/main/"
                       f"TinyStoriesV2-GPT4-valid.txt is not the file listed (sha256 {actual}, expected {'0' * 64}); "
                       "deleted it, no dataset written")
    assert sorted(os.listdir(tmp_path)) == ["downloads"]
    assert sorted(os.listdir(tmp_path / "downloads" / "tinystories")) == ["TinyStoriesV2-GPT4-train.txt", "files.json"]
    serve_hub(served, "roneneldan/TinyStories", "", {"TinyStoriesV2-GPT4-train.txt": b"x"})
    message = one_line_error(f"--out_root={tmp_path / 'lacking'}", "--dataset=tinystories", f"--hf_url={url}")
    assert message == (f"error: TinyStoriesV2-GPT4-valid.txt is not among the files of roneneldan/TinyStories "
                       f"({url}/api/datasets/roneneldan/TinyStories/tree/main)")
    closed = nobody()
    message = one_line_error(f"--out_root={tmp_path / 'offline'}", "--dataset=fineweb_edu", f"--hf_url={closed}")
    assert message.startswith(f"error: cannot download {closed}/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/"
                              "sample/10BT (") and "offline?" in message


def test_tokenizer_sample_is_seeded_and_bounded(tmp_path, capsys):
    """The bpe learns from the first --tokenizer_sample MB of the shuffled train documents: the same tokenizer for a
    seed, another for another seed; and with blocks (--block_mb) far smaller than the corpus, every document still
    comes back once."""
    corpus = write_corpus(tmp_path / "corpus", n=40)
    models = {}
    for seed in (1, 2, 1):
        _, docs = run(tmp_path, f"--input={tmp_path / 'corpus'}", f"--seed={seed}", "--tokenizer_sample=0.002",
                      "--block_mb=0.003")
        assert sorted(docs["train"] + docs["val"]) == sorted(corpus.values())
        learned = int(re.search(r"BPE on (\d+) train documents", capsys.readouterr().out)[1])
        assert 2 <= learned <= 10  # documents of about 300 characters each, up to 2,000 and one more
        model = (tmp_path / "out" / "t" / "tokenizer.model").read_bytes()
        assert models.setdefault(seed, model) == model
    assert models[1] != models[2]


def test_parquet_streams_in_flat_memory(tmp_path):
    """A parquet file ten times the size of another, its text (14 MB) larger than the memory it may add (8 MB), takes
    no more memory to prepare (the peak RSS of every process, summed, as meta.json records it): it is read a row
    group and a block (--block_mb) at a time, with a few tasks in flight."""
    base = [make_doc(i, lines=60) for i in range(50)]
    for name, n in (("small", 800), ("large", 8000)):
        parquet_file([f"{i} {base[i % 50]}" for i in range(n)], str(tmp_path / f"{name}.parquet"), rows=500)
    Tokenizer.train(base, 400, str(tmp_path / "tokenizer.model"))
    peaks = {}
    for name in ("small", "large"):
        run_stage("prepare.py", f"--input={tmp_path / f'{name}.parquet'}", f"--out_root={tmp_path}", "--block_mb=0.2",
                  "--num_workers=2", f"--tokenizer={tmp_path / 'tokenizer.model'}")
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        peaks[name] = meta["prepare"]["peak_rss_mb"]
    assert meta["splits"]["train"]["bytes"] > 14e6  # ten times the text of the small file, in 16 row groups
    assert peaks["large"] < peaks["small"] + 8, peaks
