"""
Turn raw text into token shards for training: read documents, hold some out for validation, train a tokenizer
on the rest, tokenize everything on all cores and write data/<name>/ (see data/README.md for the layout). The
dataset is built beside that folder and replaces it only once complete: a failed or interrupted run changes nothing.

    python prepare.py                                    # offline: this Python's own standard library
    python prepare.py --dataset=gutenberg                # the benchmark's 96 books, checked against their sha256
    python prepare.py --dataset=tinyshakespeare          # also tinystories, fineweb_edu, or a URL (downloaded once)
    python prepare.py --input=books/ --strip_gutenberg=True --val_files=pg1342.txt
    python prepare.py --input=chats.jsonl --tokenizer=gpt2

--input takes .txt files (one file is one document, unless --doc_separator splits it), .jsonl files (one row's
"text" is one document) and .parquet files (a "text" column; needs pyarrow), folders of them, and globs.
Every document is followed by the end-of-document token in the shards.
"""
import errno
import glob
import hashlib
import http.client
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

import numpy as np
from tqdm import tqdm

from configurator import copy_tokenizer, fail, lock_folder, parse_config, write_json
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# defaults
dataset = "pystdlib"          # pystdlib (offline), gutenberg (the benchmark), a name in SOURCES or the URL of a .txt,
                              # .jsonl or .parquet file (downloaded once); ignored when --input is given
input = ""                    # your own text instead: comma-separated files, folders (recursive) or globs
name = ""                     # output folder under out_root; default: the dataset name or the input's basename
doc_separator = ""            # split .txt files into documents at this string, e.g. '<|endoftext|>'
strip_gutenberg = False       # drop Project Gutenberg's header and license from each .txt file
val_files = ""                # comma-separated file basenames held out whole as the val split
val_fraction = 0.02           # otherwise this fraction of documents (at least one), chosen at random
seed = 1337                   # for the val choice and the document order
tokenizer = "bpe"             # 'bpe' (trained here on the train split), 'gpt2', a tokenizer.model, or a HF folder
vocab_size = 8192             # of the trained bpe
shard_size = 100_000_000      # tokens per .bin file
out_root = "data"
num_workers = 0               # tokenizing processes; 0 = one per core
gutenberg_url = "https://raw.githubusercontent.com/RU-ECE/ECE451-Parallel/c58dca3a6abedd8041057571c247e9a393cc3b4d"
                              # where --dataset=gutenberg fetches the books from (a mirror of that commit)
gutenberg_books = ""          # a list of 'sha256  path' lines under gutenberg_url; default: config/gutenberg.sha256
# -----------------------------------------------------------------------------
config = parse_config({k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))},
                      sys.argv[1:])
globals().update(config)
started = time.time()

HF = "https://huggingface.co/datasets"
SOURCES = {
    # a speech is a document: the play is one file, and the val split needs more than one document
    "tinyshakespeare": dict(url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                            doc_separator="\n\n"),
    # the validation file of TinyStories is plenty for small models, and far smaller than the train file
    "tinystories": dict(url=f"{HF}/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
                        doc_separator="<|endoftext|>"),
    # the first parquet file of the 10B-token sample
    "fineweb_edu": dict(url=f"{HF}/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/000_00000.parquet"),
}
# The Gutenberg benchmark: the 96 books listed in config/gutenberg.sha256, unmodified Project Gutenberg files kept
# in RU-ECE/ECE451-Parallel (a course repository) at the commit of gutenberg_url, with their paths under it. Two
# books there marked "COPYRIGHTED Project Gutenberg eBook" (#16 and #5200) are not among them.
GUTENBERG_BOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "gutenberg.sha256")
GUTENBERG_VAL = "11-0.txt,pg1661.txt,pg1342.txt"  # Alice, The Adventures of Sherlock Holmes, Pride and Prejudice
DOCS_PER_TASK = 16  # documents a worker tokenizes per task: IPC stays cheap, the work spreads evenly


# -----------------------------------------------------------------------------
# reading documents: lists of (file basename, text)

def read_text(path):
    """A file's text exactly as stored (no newline translation, BOM dropped); UnicodeDecodeError if it is not UTF-8."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8-sig")


def read_pystdlib():
    """The running Python's standard library: one document per .py file, plus pydoc's topic texts."""
    from pydoc_data.topics import topics
    stdlib = sysconfig.get_paths()["stdlib"]
    docs, files, skipped = [], 0, 0
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages"))  # third-party code
        for name in sorted(names):
            path = os.path.join(root, name)
            # topics.py holds the topic texts as string literals: they come in below as plain text instead
            if not name.endswith(".py") or path == os.path.join(stdlib, "pydoc_data", "topics.py"):
                continue
            files += 1
            try:
                text = read_text(path)
            except UnicodeDecodeError:
                skipped += 1  # a few test files are deliberately in other encodings
                continue
            if text.strip():
                docs.append((name, text))
    docs += [(f"pydoc_topic_{key}", text) for key, text in sorted(topics.items())]
    source = {"dataset": "pystdlib", "python": platform.python_version(), "stdlib": stdlib, "files": files,
              "skipped_non_utf8": skipped, "pydoc_topics": len(topics)}
    return docs, source


def find_input_files(spec):
    """The files named by --input: comma-separated files, folders (searched for .txt/.jsonl/.parquet) and globs."""
    files = []
    for item in spec.split(","):
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            fail(f"--input {item} not found")
        for match in matches:
            if os.path.isdir(match):
                files += sorted(os.path.join(root, name) for root, _, names in os.walk(match)
                                for name in names if name.endswith((".txt", ".jsonl", ".parquet")))
            else:
                files.append(match)
    return files


GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE)


def gutenberg_book(text):
    """The book between Project Gutenberg's '*** START OF ...' and '*** END OF ...' lines, with LF line ends.
    A file without the markers is kept whole: it is not a Gutenberg book, or it was stripped already."""
    text = text.replace("\r\n", "\n")
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


def jsonl_text(path, number, line):
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        fail(f"{path} line {number} is not a JSON object with a 'text' string")
    return text


def parquet_texts(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail(f"reading {path} needs pyarrow: pip install pyarrow")
    try:
        # batch by batch, so the whole file is never in memory twice (as Arrow data and as Python strings)
        batches = pq.ParquetFile(path).iter_batches(columns=["text"])
        return [text or "" for batch in batches for text in batch.column(0).to_pylist()]  # a null row: no text
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid and ArrowIOError are these
        fail(f"{path} is not a parquet file with a 'text' column ({str(e).splitlines()[0][:120]})")


def read_documents(paths, doc_separator, gutenberg):
    """Documents of .txt, .jsonl and .parquet files. A file that is not UTF-8 stops the run: a corpus of the
    user's own is never cut short silently."""
    docs = []
    for path in paths:
        if path.endswith(".parquet"):
            texts = parquet_texts(path)
        else:
            try:
                text = read_text(path)
            except UnicodeDecodeError as e:
                line = e.object.count(b"\n", 0, e.start) + 1
                fail(f"{path} line {line} is not UTF-8 (byte 0x{e.object[e.start]:02x}): convert the file, "
                     "e.g. with iconv -f latin1 -t utf-8, or leave it out")
            except OSError as e:
                fail(f"cannot read {path}: {e.strerror or e}")
            if path.endswith(".jsonl"):
                # split on '\n' only: str.splitlines() would also cut at U+2028 inside a JSON string
                texts = [jsonl_text(path, number, line) for number, line in enumerate(text.split("\n"), 1)
                         if line.strip()]
            else:
                if gutenberg:
                    text = gutenberg_book(text)
                # a separator usually sits on a line of its own: the line breaks around it are not the documents'
                texts = [t.strip("\r\n") for t in text.split(doc_separator)] if doc_separator else [text]
        docs += [(os.path.basename(path), t) for t in texts if t.strip()]
    return docs


# -----------------------------------------------------------------------------
# downloading

class KeepLinkedEtag(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib's own handler, but keeps the X-Linked-ETag header (Hugging Face's sha256
    of an LFS file), which only the redirecting response carries and the file's final response lacks."""

    def http_error_302(self, req, fp, code, msg, headers):
        response = super().http_error_302(req, fp, code, msg, headers)
        if "X-Linked-ETag" in headers and "X-Linked-ETag" not in response.headers:
            response.headers["X-Linked-ETag"] = headers["X-Linked-ETag"]
        return response

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def published_sha256(headers):
    """The sha256 Hugging Face states for an LFS file, if these headers have one. A plain ETag is not trusted:
    other servers (GitHub, CDNs) put other hashes there."""
    etag = (headers.get("X-Linked-ETag") or "").removeprefix("W/").strip('"')
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(url, path):
    """Fetch url to path, once (path is the cache), and return the file's sha256.

    Bytes go to path + '.part'. When the connection breaks, the next attempt (or the next run) asks only for
    the missing bytes with an HTTP Range request; a server that ignores Range sends everything again. The file
    is checked against the sha256 the server publishes, if it does."""
    if os.path.exists(path):
        return file_sha256(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    opener = urllib.request.build_opener(KeepLinkedEtag)
    for _ in range(5):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = opener.open(request, timeout=30)
        except urllib.error.HTTPError as e:
            if e.code == 416:  # .part already holds the whole file (a run stopped before renaming it): start over
                os.remove(part)
                continue
            fail(f"downloading {url} failed: HTTP {e.code} {e.reason}")
        except OSError as e:  # URLError, refused, timed out
            fail(f"cannot download {url} ({getattr(e, 'reason', e)}): offline? "
                 "Prepare your own text files instead with --input=PATH")
        with response:
            if response.status != 206:  # the server ignored Range: it sends the whole file
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else None
            sha256 = published_sha256(response.headers)
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                try:
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException):
                    pass  # broken off: the size check below asks for the rest
        if total is None or os.path.getsize(part) >= total:
            break
    else:
        fail(f"downloading {url} keeps breaking off; run again to resume from {part}")
    actual = file_sha256(part)
    if sha256 and actual != sha256:
        os.remove(part)
        fail(f"{url} arrived corrupt (sha256 {actual}, expected {sha256}); deleted it, run again to retry")
    os.replace(part, path)
    return actual


def read_dataset(name, source):
    """The documents of a file downloaded once into out_root/downloads/name/, and where they came from."""
    path = os.path.join(out_root, "downloads", name, os.path.basename(source["url"]))
    sha256 = download(source["url"], path)
    docs = read_documents([path], doc_separator or source.get("doc_separator", ""), strip_gutenberg)
    return docs, {"dataset": name, "url": source["url"], "sha256": sha256, "files": 1}


def read_gutenberg():
    """The benchmark's books, each fetched once into out_root/downloads/gutenberg/ and checked against its sha256,
    then read exactly as --input=<a folder of them> --strip_gutenberg=True reads them: the same documents, in the
    same order, so the same shards."""
    listing = gutenberg_books or GUTENBERG_BOOKS
    try:
        with open(listing) as f:
            books = [line.split() for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read the list of books {listing} ({e.strerror})")
    if not books or any(len(book) != 2 or not re.fullmatch(r"[0-9a-f]{64}", book[0]) for book in books):
        fail(f"{listing} is not a list of 'sha256  path' lines")
    folder = os.path.join(out_root, "downloads", "gutenberg")
    paths = []
    for sha256, book in books:
        path = os.path.join(folder, os.path.basename(book))
        if os.path.exists(path) and file_sha256(path) != sha256:
            os.remove(path)  # changed since it was checked: fetched again
        url = f"{gutenberg_url.rstrip('/')}/{book}"
        actual = download(url, path)
        if actual != sha256:
            os.remove(path)
            fail(f"{os.path.basename(book)} from {url} is not the benchmark's book (sha256 {actual}, expected "
                 f"{sha256}); deleted it, no dataset written")
        paths.append(path)
    docs = read_documents(sorted(paths), doc_separator, True)
    return docs, {"dataset": "gutenberg", "url": gutenberg_url, "files": len(paths)}


# -----------------------------------------------------------------------------
# tokenizing on all cores into shards

def start_worker(tokenizer_path, dtype):
    global worker_tokenizer, worker_dtype
    # Ctrl-C reaches every process of the terminal's group: the main process alone stops the run, in one line
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_tokenizer, worker_dtype = Tokenizer.load(tokenizer_path), dtype


def tokenize(texts):
    """Worker: the ids of a few documents, each followed by the end-of-document id, and their size in bytes."""
    ids = []
    for doc_ids in worker_tokenizer.encode_batch(texts):
        ids += doc_ids
        ids.append(worker_tokenizer.eos_id)
    return np.array(ids, dtype=worker_dtype), sum(len(text.encode("utf-8")) for text in texts)


def close_shard(shard):
    """Close a shard once its bytes are on the disk: meta.json, written after, never lists a shard still in flight."""
    shard.flush()
    os.fsync(shard.fileno())
    shard.close()


def write_split(pool, split, texts, folder, shard_size):
    """Tokenize one split and stream its ids into split_000.bin, split_001.bin, ...: no shard sits in memory."""
    tasks = [texts[i:i + DOCS_PER_TASK] for i in range(0, len(texts), DOCS_PER_TASK)]
    shards, shard, room, tokens, size = [], None, 0, 0, 0
    with tqdm(total=len(texts), desc=f"tokenizing {split}", unit="doc") as bar:
        for task, (ids, task_bytes) in zip(tasks, pool.imap(tokenize, tasks)):
            tokens += len(ids)
            size += task_bytes
            while len(ids):
                if room == 0:
                    if shard:
                        close_shard(shard)
                    shards.append(f"{split}_{len(shards):03d}.bin")
                    shard = open(os.path.join(folder, shards[-1]), "wb")
                    room = shard_size
                head, ids = ids[:room], ids[room:]
                head.tofile(shard)
                room -= len(head)
            bar.update(len(task))
    close_shard(shard)
    return {"tokens": tokens, "bytes": size, "documents": len(texts), "shards": shards}


# -----------------------------------------------------------------------------
# the settings and the dataset folder, checked before anything is read or written

if shard_size < 1:
    fail(f"--shard_size={shard_size}: a shard holds at least one token")
if num_workers < 0:
    fail(f"--num_workers={num_workers}: give a number of processes, or 0 for one per core")
if not 0 <= val_fraction < 1:
    fail(f"--val_fraction={val_fraction}: give the share of documents held out for val, at least 0 and below 1")
if input:
    first = re.split(r"[*?[]", input.split(",")[0])[0]  # the first path, up to any glob pattern
    default_name = os.path.splitext(os.path.basename(os.path.abspath(first)))[0]
elif dataset in ("pystdlib", "gutenberg") or dataset in SOURCES:
    default_name = dataset
elif "://" in dataset:
    default_name = os.path.splitext(os.path.basename(dataset))[0]
else:
    fail(f"unknown --dataset={dataset}: choose pystdlib, gutenberg, {', '.join(SOURCES)}, a URL, or use --input=PATH")
out_dir = os.path.join(out_root, name or default_name)
work = out_dir + ".tmp"  # where the new dataset is built (see below)
for folder in (out_dir, work):
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"{folder} is a file, not a folder: move it away or choose another --name")
if os.path.exists(out_dir):
    # the new dataset replaces the folder whole: only what an earlier run of this script wrote may go
    foreign = sorted(f for f in os.listdir(out_dir)
                     if not re.fullmatch(r"(train|val)_\d+\.bin|meta\.json|tokenizer(\.model|\.json|_config\.json)", f))
    if foreign:
        fail(f"{out_dir} holds files prepare.py did not write ({', '.join(foreign[:3])}): "
             "move them away or choose another --name")

# -----------------------------------------------------------------------------
# the documents, their split, the tokenizer, the shards: built in work/new, beside out_dir, which they replace
# only once complete, so that a failure, a full disk or Ctrl-C leaves the earlier dataset as it was

new, old = os.path.join(work, "new"), os.path.join(work, "old")
owner = False  # whether this run holds work (and removes it at the end)
interrupt = signal.getsignal(signal.SIGINT)  # given back after the swap, which ignores Ctrl-C (for in-process callers)
try:
    tok = Tokenizer.load(tokenizer) if tokenizer != "bpe" else None
    try:
        lock_folder(work)
    except ValueError:
        fail(f"another prepare.py is writing {out_dir}: wait for it to end, or choose another --name")
    owner = True
    if os.path.isdir(old) and not os.path.exists(out_dir):  # a run killed between the two renames of its swap
        os.rename(old, out_dir)
    for leftover in (new, old):  # of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(new)

    if input:
        files = find_input_files(input)
        docs = read_documents(files, doc_separator, strip_gutenberg)
        source = {"input": input, "files": len(files)}
    elif dataset == "pystdlib":
        docs, source = read_pystdlib()
    elif dataset == "gutenberg":
        docs, source = read_gutenberg()
        val_files = val_files or GUTENBERG_VAL
    else:
        docs, source = read_dataset(default_name, SOURCES.get(dataset, {"url": dataset}))
    if not docs:
        fail(f"no documents in {input or dataset}: its files are empty")
    skipped = f" ({source['skipped_non_utf8']} not UTF-8, skipped)" if "skipped_non_utf8" in source else ""
    print(f"read {len(docs):,} documents from {source['files']:,} files{skipped}")

    # shuffled so that val is a random sample and any stretch of train looks like the whole corpus
    random.Random(seed).shuffle(docs)
    if val_files:
        held_out = set(filter(None, val_files.split(",")))
        missing = held_out - {file for file, _ in docs}
        if missing:
            fail(f"--val_files: {', '.join(sorted(missing))} is not among the input's documents")
        splits = {"train": [text for file, text in docs if file not in held_out],
                  "val": [text for file, text in docs if file in held_out]}
    else:
        n_val = max(1, round(val_fraction * len(docs)))
        splits = {"train": [text for _, text in docs[n_val:]], "val": [text for _, text in docs[:n_val]]}
    if not splits["train"]:
        fail(f"no documents left to train on after the val split ({len(docs)} in all): "
             "add files, or cut them into documents with --doc_separator")

    if tok is None:
        print(f"training a {vocab_size}-token BPE on {len(splits['train']):,} train documents")
        tok = Tokenizer.train(splits["train"], vocab_size, os.path.join(new, "tokenizer.model"))
    tokenizer_path = copy_tokenizer(tok.path, new)  # train.py reads it here, as it is
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    # forked workers inherit this script's functions; spawned ones (macOS's default) would run the whole script again
    workers = num_workers or os.cpu_count()
    with multiprocessing.get_context("fork").Pool(workers, start_worker, (tok.path, dtype)) as pool:
        stats = {split: write_split(pool, split, texts, new, shard_size) for split, texts in splits.items()}

    meta = {
        "tokenizer": tok.kind,
        "tokenizer_path": tokenizer_path,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "special": tok.special,
        "splits": stats,
        "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(os.path.join(new, "meta.json"), meta)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the new dataset is complete: the swap runs to its end
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(new, out_dir)
except (ValueError, ImportError) as e:  # a tokenizer that cannot be loaded or trained
    fail(str(e))
except (KeyboardInterrupt, OSError) as e:
    kept = f"the dataset in {out_dir} is unchanged" if os.path.isdir(out_dir) else "no dataset was written"
    if isinstance(e, KeyboardInterrupt):
        fail(f"interrupted; {kept}")
    if e.errno == errno.ENOSPC or "the disk is full" in str(e):
        why = f"could not write {out_dir} (the disk is full)"
    elif e.errno is None:  # one line of configurator's already (lock_folder, write_json)
        why = str(e)
    else:
        why = f"could not write {out_dir} ({e.strerror})"
    fail(f"{why}; {kept}")
finally:
    if owner:
        shutil.rmtree(work, ignore_errors=True)  # the unfinished dataset, or the replaced one
    signal.signal(signal.SIGINT, interrupt)

print(f"{'split':<6}{'documents':>12}{'tokens':>15}{'bytes':>15}{'bytes/token':>13}")
for split, s in stats.items():
    print(f"{split:<6}{s['documents']:>12,}{s['tokens']:>15,}{s['bytes']:>15,}{s['bytes'] / s['tokens']:>13.2f}")
print(f"wrote {out_dir} ({tok.kind} tokenizer, {tok.vocab_size:,} ids) in {time.time() - started:.1f}s")
