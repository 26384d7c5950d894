"""
Turn raw text into token shards for training: read documents, hold some out for validation, train a tokenizer
on a sample of the rest, tokenize everything on all cores and write data/<name>/ (see data/README.md for the
layout). Reading and tokenizing stream, a block of documents at a time, so memory stays flat at any input size. The
dataset is built beside that folder and replaces it only once complete: a failed or interrupted run changes nothing.

    python prepare.py                                    # offline: this Python's own standard library
    python prepare.py --dataset=gutenberg                # the benchmark's 96 books, checked against their sha256
    python prepare.py --dataset=tinystories              # TinyStories V2 (2.2 GB), its own validation file as val
    python prepare.py --dataset=fineweb_edu --shards=4   # 4 parquet files of FineWeb-Edu's 10BT sample (0: all)
    python prepare.py --dataset=tinyshakespeare          # also fineweb_edu_100bt, or a URL (downloaded once)
    python prepare.py --input=books/ --strip_gutenberg=True --val_files=pg1342.txt
    python prepare.py --input=chats.jsonl --tokenizer=gpt2

--input takes .txt files (one file is one document, unless --doc_separator splits it), .jsonl files (one row's
"text" is one document) and .parquet files (a "text" column; needs pyarrow), folders of them, and globs.
Every document is followed by the end-of-document token in the shards.
"""
import collections
import errno
import glob
import hashlib
import http.client
import itertools
import json
import multiprocessing
import os
import platform
import random
import re
import resource
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
tokenizer_sample = 10.0       # MB (millions of characters) of train documents the bpe learns from: the first of the
                              # shuffled train split
block_mb = 128.0              # documents are read, shuffled and split into train and val in blocks of this many MB
                              # (millions of characters): memory stays near it, whatever the size of the input
shard_size = 100_000_000      # tokens per .bin file
out_root = "data"
num_workers = 0               # tokenizing processes; 0 = one per core
shards = 1                    # fineweb_edu, fineweb_edu_100bt: how many of the sample's parquet files (0 = all)
hf_url = "https://huggingface.co"  # where tinystories and the fineweb_edu samples come from (or a mirror)
tinyshakespeare_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
gutenberg_url = "https://raw.githubusercontent.com/RU-ECE/ECE451-Parallel/c58dca3a6abedd8041057571c247e9a393cc3b4d"
                              # where --dataset=gutenberg fetches the books from (a mirror of that commit)
gutenberg_books = ""          # a list of 'sha256  path' lines under gutenberg_url; default: config/gutenberg.sha256
# -----------------------------------------------------------------------------
config = parse_config({k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))},
                      sys.argv[1:])
globals().update(config)
started = time.time()

SOURCES = {
    # a speech is a document: the play is one file, and the val split needs more than one document
    "tinyshakespeare": dict(url=tinyshakespeare_url, doc_separator="\n\n"),
    # TinyStories V2, the stories GPT-4 wrote (Eldan & Li, arXiv:2305.07759): the train file, and its own
    # validation file as val
    "tinystories": dict(repo="roneneldan/TinyStories", doc_separator="<|endoftext|>",
                        files=("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
                        val_files="TinyStoriesV2-GPT4-valid.txt"),
    # FineWeb-Edu (Penedo et al., arXiv:2406.17557): the parquet files of its samples of about 10B and
    # 100B GPT-2 tokens, the first --shards of them in the order of their names
    "fineweb_edu": dict(repo="HuggingFaceFW/fineweb-edu", folder="sample/10BT"),
    "fineweb_edu_100bt": dict(repo="HuggingFaceFW/fineweb-edu", folder="sample/100BT"),
}
# The Gutenberg benchmark: the 96 books listed in config/gutenberg.sha256, unmodified Project Gutenberg files kept
# in RU-ECE/ECE451-Parallel (a course repository) at the commit of gutenberg_url, with their paths under it. Two
# books there marked "COPYRIGHTED Project Gutenberg eBook" (#16 and #5200) are not among them.
GUTENBERG_BOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "gutenberg.sha256")
GUTENBERG_VAL = "11-0.txt,pg1661.txt,pg1342.txt"  # Alice, The Adventures of Sherlock Holmes, Pride and Prejudice
READ_BYTES = 1 << 24     # a text file cut into documents is read this much at a time
PARQUET_ROWS = 1024      # rows of a parquet file read at a time
TASK_CHARS = 1 << 20     # characters a worker tokenizes per task: IPC stays cheap, the work spreads evenly


# -----------------------------------------------------------------------------
# reading documents: (file basename, text), one at a time

def read_text(path):
    """A file's text exactly as stored (no newline translation, BOM dropped); UnicodeDecodeError if it is not UTF-8."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8-sig")


def utf8(data, path, line=1, bom=False):
    """The text of some bytes of the file path that begin on line `line`. A file of the user's that is not UTF-8
    stops the run, naming the file and the line: a corpus is never cut short silently."""
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        line += e.object.count(b"\n", 0, e.start)
        fail(f"{path} line {line} is not UTF-8 (byte 0x{e.object[e.start]:02x}): convert the file, "
             "e.g. with iconv -f latin1 -t utf-8, or leave it out")


def pystdlib_files():
    """The .py files of the running Python's standard library, without third-party code."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages"))
        # topics.py holds pydoc's topic texts as string literals: they come in as plain text instead
        files += [os.path.join(root, name) for name in sorted(names) if name.endswith(".py")
                  and os.path.join(root, name) != os.path.join(stdlib, "pydoc_data", "topics.py")]
    return stdlib, files


def pystdlib_documents(files, topics, source):
    """One document per .py file, then pydoc's topic texts; files that are not UTF-8 are counted in source."""
    for path in files:
        try:
            text = read_text(path)
        except UnicodeDecodeError:
            source["skipped_non_utf8"] += 1  # a few test files are deliberately in other encodings
            continue
        if text.strip():
            yield os.path.basename(path), text
    yield from ((f"pydoc_topic_{key}", text) for key, text in sorted(topics.items()))


def find_input_files(spec):
    """The files named by --input: comma-separated files, folders (searched for .txt/.jsonl/.parquet) and globs."""
    files = {}  # the real path of each file -> the path first named: a file named twice (a folder and a glob in
    # it) is read once, or its documents could be both trained on and held out for val
    for item in spec.split(","):
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            fail(f"--input {item} not found")
        found = []
        for match in matches:
            if os.path.isdir(match):
                found += sorted(os.path.join(root, name) for root, _, names in os.walk(match)
                                for name in names if name.endswith((".txt", ".jsonl", ".parquet")))
            else:
                found.append(match)
        if not found:  # folders only of other files
            fail(f"--input {item}: no .txt, .jsonl or .parquet files (name other files explicitly)")
        for path in found:
            files.setdefault(os.path.realpath(path), path)
    return list(files.values())


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


def separated_documents(path, separator):
    """The documents of a text file cut at separator, READ_BYTES or a block at a time, so that a file of any size
    streams: those of splitting the whole text, since in UTF-8 a separator's bytes never begin inside a character."""
    sep, size = separator.encode(), min(READ_BYTES, round(block_mb * 1e6) + 1)
    rest, line, first = b"", 1, True
    with open(path, "rb") as f:
        while True:
            block = f.read(size)
            # cut left to right, as str.split: the last separator found from the right ('---' in '----') may begin
            # inside a match of the whole text's split
            pieces = (rest + block).split(sep)
            rest = pieces.pop() if block else b""  # the text after the last separator may go on
            for piece in pieces:
                # a separator usually sits on a line of its own: the line breaks around it are not the documents'
                yield utf8(piece, path, line, bom=first).strip("\r\n")
                line += piece.count(b"\n") + sep.count(b"\n")
                first = False
            if not block:
                return


def jsonl_documents(path):
    # line by line at '\n' only: str.splitlines() would also cut at U+2028 inside a JSON string
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = utf8(raw, path, number, bom=number == 1)
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                fail(f"{path} line {number} is not a JSON object with a 'text' string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON may escape half of a surrogate pair ("\ud83d"): no text in UTF-8
                fail(f"{path} line {number} is not UTF-8 text (its 'text' holds the lone surrogate "
                     f"\\u{ord(text[e.start]):04x})")
            yield text


def open_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail(f"reading {path} needs pyarrow: pip install pyarrow")
    try:
        parquet = pq.ParquetFile(path)
        kind = parquet.schema_arrow.field("text").type if "text" in parquet.schema_arrow.names else None
        if kind is not None and str(kind) in ("string", "large_string"):
            return parquet
        why = "no such column" if kind is None else f"its type is {kind}, not strings"
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid and ArrowIOError are these
        why = str(e).splitlines()[0][:120]
    fail(f"{path} is not a parquet file with a 'text' column ({why})")


def parquet_documents(path):
    """The texts of a parquet file, a row group at a time, PARQUET_ROWS rows of it at a time as Python strings:
    never the whole file in memory (iter_batches over all row groups at once reads ahead of its batches)."""
    parquet = open_parquet(path)
    try:
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(PARQUET_ROWS, row_groups=[group], columns=["text"], use_threads=False):
                yield from (text or "" for text in batch.column(0).to_pylist())  # a null row: no text
    except (ValueError, OSError) as e:
        fail(f"{path} is not a parquet file with a 'text' column ({str(e).splitlines()[0][:120]})")


def file_documents(path, separator, gutenberg):
    if path.endswith(".parquet"):
        return parquet_documents(path)
    if path.endswith(".jsonl"):
        return jsonl_documents(path)
    if separator and not gutenberg:
        return separated_documents(path, separator)
    with open(path, "rb") as f:  # a Gutenberg book is stripped whole: its markers bound the whole text
        text = utf8(f.read(), path, bom=True)
    if gutenberg:
        text = gutenberg_book(text)
    return [t.strip("\r\n") for t in text.split(separator)] if separator else [text]


def read_documents(paths, separator, gutenberg):
    """The documents of .txt, .jsonl and .parquet files, one at a time, in the order of the files."""
    for path in paths:
        try:
            yield from ((os.path.basename(path), text) for text in file_documents(path, separator, gutenberg)
                        if text.strip())
        except OSError as e:
            fail(f"cannot read {path}: {e.strerror or e}")


def input_chars(paths):
    """About how much text the files hold, for the progress bar: their sizes, a parquet file's uncompressed text."""
    total = 0
    for path in paths:
        if path.endswith(".parquet"):
            meta = open_parquet(path).metadata
            column = meta.schema.names.index("text")
            total += sum(meta.row_group(i).column(column).total_uncompressed_size for i in range(meta.num_row_groups))
        else:
            try:
                total += os.path.getsize(path)
            except OSError as e:  # a link to no file: a problem of the input, not of writing the dataset
                fail(f"cannot read {path}: {e.strerror or e}")
    return total


def shuffled_blocks(docs, held_out):
    """(train texts, val texts) of blocks of about block_mb of documents, each block shuffled with one random
    generator of the run's seed: a corpus within one block is split and ordered as if shuffled whole. Val holds
    the documents of the held_out files, or else val_fraction of each block's documents (one at least in all)."""
    rng = random.Random(seed)
    block, size, least = [], 0, 1
    for doc in itertools.chain(docs, [None]):  # None: the end, where the last block is due
        if doc is not None:
            block.append(doc)
            size += len(doc[1])
        if block and (doc is None or size >= block_mb * 1e6):
            rng.shuffle(block)
            if held_out:
                yield ([text for file, text in block if file not in held_out],
                       [text for file, text in block if file in held_out])
            else:
                n_val = max(least, round(val_fraction * len(block)))
                yield [text for _, text in block[n_val:]], [text for _, text in block[:n_val]]
            block, size, least = [], 0, 0


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


def download(url, path, sha256=None):
    """Fetch url to path, once (path is the cache), and return the file's sha256.

    Bytes go to path + '.part'. When the connection breaks, the next attempt (or the next run) asks only for
    the missing bytes with an HTTP Range request; a server that ignores Range sends everything again. The file
    is checked against sha256, the one listed for it, or else the one the server publishes, if it does; a cached
    file that is not the listed one is fetched again."""
    if os.path.exists(path):
        actual = file_sha256(path)
        if sha256 in (None, actual):
            return actual
        os.remove(path)  # changed since it was checked
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
            published = published_sha256(response.headers)
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                broke = False
                try:
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException):
                    broke = True  # broken off (with no Content-Length, no size would tell): the next try resumes
        if not broke and (total is None or os.path.getsize(part) >= total):
            break
    else:
        fail(f"downloading {url} keeps breaking off; run again to resume from {part}")
    actual = file_sha256(part)
    if sha256 and actual != sha256:
        os.remove(part)
        fail(f"{os.path.basename(path)} from {url} is not the file listed (sha256 {actual}, expected {sha256}); "
             "deleted it, no dataset written")
    if published and actual != published:
        os.remove(part)
        fail(f"{url} arrived corrupt (sha256 {actual}, expected {published}); deleted it, run again to retry")
    os.replace(part, path)
    return actual


def read_url(name, source):
    """A file downloaded once into out_root/downloads/name/: its path, and where it came from."""
    path = os.path.join(out_root, "downloads", name, os.path.basename(source["url"]))
    return [path], {"dataset": name, "url": source["url"], "sha256": download(source["url"], path), "files": 1}


def read_hf(name, source):
    """The files of a Hugging Face dataset (source's files, or the first --shards parquet files of its folder),
    each fetched once into out_root/downloads/name/ and checked against the sha256 the Hub lists for it. The list
    comes from the Hub's API once and is kept there too, so that a later run needs the network only for new files."""
    folder = os.path.join(out_root, "downloads", name)
    hub = hf_url.rstrip("/")
    api = f"{hub}/api/datasets/{source['repo']}/tree/main" + (f"/{source['folder']}" if "folder" in source else "")
    listing = os.path.join(folder, "files.json")
    download(api, listing)
    try:
        with open(listing) as f:
            listed = {entry["path"]: (entry.get("lfs") or {}).get("oid") for entry in json.load(f)
                      if entry["type"] == "file"}
    except (ValueError, KeyError, TypeError):
        os.remove(listing)
        fail(f"{api} did not answer with a list of files; deleted it, run again to retry")
    if "files" in source:
        files = list(source["files"])
        missing = [file for file in files if file not in listed]
        if missing:
            fail(f"{', '.join(missing)} is not among the files of {source['repo']} ({api})")
    else:
        files = sorted(path for path in listed if path.endswith(".parquet"))
        if shards > len(files):
            fail(f"--shards={shards}: {source['repo']} has {len(files)} parquet files in {source['folder']} "
                 "(--shards=0 takes them all)")
        files = files[:shards or None]
    paths, sha256 = [], {}
    for file in files:
        path = os.path.join(folder, os.path.basename(file))
        sha256[os.path.basename(file)] = download(f"{hub}/datasets/{source['repo']}/resolve/main/{file}", path,
                                                  listed[file])
        paths.append(path)
    return paths, {"dataset": name, "repo": source["repo"], "url": hf_url, "files": len(paths), "sha256": sha256}


def read_gutenberg():
    """The benchmark's books, each fetched once into out_root/downloads/gutenberg/ and checked against its sha256,
    in the order that --input=<a folder of them> reads them: the same documents, in the same order, so the same
    shards."""
    listing = gutenberg_books or GUTENBERG_BOOKS
    try:
        with open(listing) as f:
            books = [line.split() for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read the list of books {listing} ({e.strerror})")
    if not books or any(len(book) != 2 or not re.fullmatch(r"[0-9a-f]{64}", book[0]) for book in books):
        fail(f"{listing} is not a list of 'sha256  path' lines")
    paths = []
    for sha256, book in books:
        paths.append(os.path.join(out_root, "downloads", "gutenberg", os.path.basename(book)))
        download(f"{gutenberg_url.rstrip('/')}/{book}", paths[-1], sha256)
    return sorted(paths), {"dataset": "gutenberg", "url": gutenberg_url, "files": len(paths)}


# -----------------------------------------------------------------------------
# tokenizing on all cores into shards

def id_dtype(tok):
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def start_worker():
    global worker_tokenizer
    # Ctrl-C reaches every process of the terminal's group: the main process alone stops the run, in one line
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_tokenizer = None


def peak_rss():
    """This process's peak resident memory in bytes (Linux counts it in KiB, macOS in bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def tokenize(task):
    """Worker: the ids of a few documents of a split, each followed by the end-of-document id, with their size in
    bytes and their number, and this process's id and peak memory. The tokenizer is loaded on the first task: the
    workers start before it is trained."""
    global worker_tokenizer
    tokenizer_path, split, texts = task
    if worker_tokenizer is None:
        worker_tokenizer = Tokenizer.load(tokenizer_path)
    ids = []
    for doc_ids in worker_tokenizer.encode_batch(texts):
        ids += doc_ids
        ids.append(worker_tokenizer.eos_id)
    size = sum(len(text.encode("utf-8")) for text in texts)
    return split, np.array(ids, dtype=id_dtype(worker_tokenizer)), size, len(texts), os.getpid(), peak_rss()


class Shards:
    """The shards of one split, split_000.bin, split_001.bin, ...: ids stream in, no shard sits in memory."""

    def __init__(self, folder, split):
        self.folder, self.split = folder, split
        self.names, self.file, self.room = [], None, 0
        self.tokens = self.bytes = self.documents = 0

    def write(self, ids, size, documents):
        self.tokens += len(ids)
        self.bytes += size
        self.documents += documents
        while len(ids):
            if self.room == 0:
                self.close()
                self.names.append(f"{self.split}_{len(self.names):03d}.bin")
                self.file = open(os.path.join(self.folder, self.names[-1]), "wb")
                self.room = shard_size
            head, ids = ids[:self.room], ids[self.room:]
            self.file.write(head.data)  # not ndarray.tofile, which turns a Ctrl-C inside it into a TypeError
            self.room -= len(head)

    def close(self):
        """Close the shard once its bytes are on the disk: meta.json, written after, never lists one in flight."""
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def stats(self):
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "shards": self.names}


def tasks(blocks, tokenizer_path):
    """(tokenizer, split, texts) of about TASK_CHARS each, block by block. A block's lists are emptied once handed
    out, so that reading the next block never holds two."""
    for block in blocks:
        for split, texts in zip(("train", "val"), block):
            chunk, size = [], 0
            for text in texts:
                chunk.append(text)
                size += len(text)
                if size >= TASK_CHARS:
                    yield tokenizer_path, split, chunk
                    chunk, size = [], 0
            if chunk:
                yield tokenizer_path, split, chunk
            texts.clear()


def tokenized(pool, tasks, window):
    """tokenize(task) of every task, in order, at most `window` of them in flight: reading stays a little ahead of
    the workers (Pool.imap would read the whole input ahead of them)."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(tokenize, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# -----------------------------------------------------------------------------
# the settings and the dataset folder, checked before anything is read or written

if shard_size < 1:
    fail(f"--shard_size={shard_size}: a shard holds at least one token")
if num_workers < 0:
    fail(f"--num_workers={num_workers}: give a number of processes, or 0 for one per core")
if not 0 <= val_fraction < 1:
    fail(f"--val_fraction={val_fraction}: give the share of documents held out for val, at least 0 and below 1")
for key in ("tokenizer_sample", "block_mb"):
    if not config[key] > 0:
        fail(f"--{key}={config[key]}: give a positive number of MB")
if shards < 0:
    fail(f"--shards={shards}: give a number of parquet files, or 0 for all of them")
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
    try:  # the tokenizer file its meta.json names: a given one keeps its own name (kept.model)
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            ours = {json.load(f)["tokenizer_path"]}
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    foreign = sorted(f for f in os.listdir(out_dir) if f not in ours and not re.fullmatch(
        r"(train|val)_\d+\.bin|meta\.json|tokenizer(\.model|\.json|_config\.json)|chat_template\.jinja", f))
    if foreign:
        fail(f"{out_dir} holds files prepare.py did not write ({', '.join(foreign[:3])}): "
             "move them away or choose another --name")

# -----------------------------------------------------------------------------
# the documents, their split, the tokenizer, the shards: built in work/new, beside out_dir, which they replace
# only once complete, so that a failure, a full disk or Ctrl-C leaves the earlier dataset as it was

new, old = os.path.join(work, "new"), os.path.join(work, "old")
owner = False  # whether this run holds work (and removes it at the end)
interrupt = signal.getsignal(signal.SIGINT)  # given back after the swap, which ignores Ctrl-C (for in-process callers)
workers = num_workers or os.cpu_count()
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

    # The workers start before anything is read, so that none carries a copy of the main process's documents.
    # Forked workers inherit this script's functions; spawned ones (macOS's default) would run the whole script again.
    with multiprocessing.get_context("fork").Pool(workers, start_worker) as pool:
        settings = {} if input else SOURCES.get(dataset, {})
        docs, gutenberg, topics = None, strip_gutenberg, {}
        if input:
            paths = find_input_files(input)
            source = {"input": input, "files": len(paths)}
        elif dataset == "pystdlib":
            from pydoc_data.topics import topics
            stdlib, paths = pystdlib_files()
            source = {"dataset": "pystdlib", "python": platform.python_version(), "stdlib": stdlib,
                      "files": len(paths), "skipped_non_utf8": 0, "pydoc_topics": len(topics)}
            docs = pystdlib_documents(paths, topics, source)
        elif dataset == "gutenberg":
            paths, source = read_gutenberg()
            gutenberg, settings = True, {"val_files": GUTENBERG_VAL}
        elif "repo" in settings:
            paths, source = read_hf(default_name, settings)
        else:
            paths, source = read_url(default_name, settings or {"url": dataset})
        docs = docs or read_documents(paths, doc_separator or settings.get("doc_separator", ""), gutenberg)
        total = input_chars(paths)
        print(f"reading documents from {source['files']:,} files ({total / 1e6:,.1f} MB)")
        names = {os.path.basename(path) for path in paths} | {f"pydoc_topic_{key}" for key in topics}
        held_out = set(filter(None, (val_files or settings.get("val_files", "")).split(",")))
        if held_out - names:
            fail(f"--val_files: {', '.join(sorted(held_out - names))} is not among the input's documents")

        # the tokenizer's sample: the first tokenizer_sample million characters of the shuffled train documents (the
        # last one cut short), from the first blocks, which wait for it (another tokenizer waits for a train document)
        reading = time.time()
        blocks = shuffled_blocks(docs, held_out)
        budget = round(tokenizer_sample * 1e6) if tok is None else 1
        held, sample = [], []
        for block in blocks:
            held.append(block)
            for text in block[0]:
                if budget <= 0:
                    break
                sample.append(text[:budget])
                budget -= len(text)
            if budget <= 0:
                break
        if not held:
            fail(f"no documents in {input or dataset}: its files are empty")
        if not sample:  # every block was read, and none holds a train document
            fail(f"no documents left to train on after the val split ({sum(len(v) for _, v in held)} in all): "
                 "add files, or cut them into documents with --doc_separator")
        if tok is None:
            print(f"training a {vocab_size}-token BPE on {len(sample):,} train documents "
                  f"({sum(map(len, sample)) / 1e6:,.1f}M characters)")
            tok = Tokenizer.train(sample, vocab_size, os.path.join(new, "tokenizer.model"))
        del sample  # its texts go when their blocks are tokenized
        tokenizer_path = copy_tokenizer(tok.path, new)  # train.py reads it here, as it is

        splits = {split: Shards(new, split) for split in ("train", "val")}
        rss = {}  # worker process id -> its peak memory
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
            for split, ids, nbytes, count, pid, peak in tokenized(pool, tasks(itertools.chain(held, blocks),
                                                                               tok.path), 2 * workers):
                splits[split].write(ids, nbytes, count)
                rss[pid] = peak
                bar.update(nbytes)
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix_str(f"{sum(s.documents for s in splits.values()) / elapsed:,.0f} docs/s, "
                                    f"{sum(s.tokens for s in splits.values()) / elapsed:,.0f} tokens/s", refresh=False)
    for shard in splits.values():
        shard.close()
    if not splits["val"].documents:
        fail(f"--val_files: {', '.join(sorted(held_out))} hold no text: no documents for the val split")
    stats = {split: shards.stats() for split, shards in splits.items()}
    tokens, seconds = sum(s["tokens"] for s in stats.values()), time.time() - reading
    # every process's own peak: shared pages (the imports) count once per process, so this is an upper bound
    cost = {"seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds), "processes": 1 + len(rss),
            "peak_rss_mb": round((peak_rss() + sum(rss.values())) / 1e6)}

    meta = {
        "tokenizer": tok.kind,
        "tokenizer_path": tokenizer_path,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(id_dtype(tok)).name,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "special": tok.special,
        "splits": stats,
        "source": source,
        "prepare": cost,
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

skipped = f" ({source['skipped_non_utf8']} not UTF-8, skipped)" if "skipped_non_utf8" in source else ""
print(f"read {sum(s['documents'] for s in stats.values()):,} documents from {source['files']:,} files{skipped}")
print(f"{'split':<6}{'documents':>12}{'tokens':>15}{'bytes':>15}{'bytes/token':>13}")
for split, s in stats.items():
    print(f"{split:<6}{s['documents']:>12,}{s['tokens']:>15,}{s['bytes']:>15,}{s['bytes'] / s['tokens']:>13.2f}")
size = sum(s["bytes"] for s in stats.values())
print(f"wrote {out_dir} ({tok.kind} tokenizer, {tok.vocab_size:,} ids) in {time.time() - started:.1f}s; reading and "
      f"tokenizing {cost['seconds']:.1f}s, {size / 1e6 / cost['seconds']:,.2f} MB/s, {cost['tokens_per_second']:,} "
      f"tokens/s on {cost['processes']} processes, {cost['peak_rss_mb']:,} MB of peak memory in all")
