"""Tokenizer: exact round trips on arbitrary text, special tokens that text cannot forge, one-line errors."""
import os
import random
import socket
import string
import subprocess
import sys
import textwrap

import pytest
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from tokenizer import SPACE_MARK, ESCAPE, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_text(seed, length=2000):
    """Any code point but surrogates, mixed with the whitespace and escape characters the tokenizer treats specially."""
    rng = random.Random(seed)
    chars = []
    while len(chars) < length:
        kind = rng.random()
        if kind < 0.3:
            code = rng.randrange(0x110000)
            if not 0xD800 <= code <= 0xDFFF:
                chars.append(chr(code))
        elif kind < 0.5:
            chars.append(rng.choice([" ", "  ", "\t", "\n", "\r\n", "\r", SPACE_MARK, ESCAPE, "_", "\x00", "\u2028"]))
        else:
            chars.append(rng.choice(string.printable))
    return "".join(chars)


TEXTS = {
    "empty": "",
    "space": " ",
    "leading spaces": "   indented",
    "spaces and tabs": "a  b\t\tc \t d    \n\t  \n",
    "crlf": "line one\r\nline two\r\n",
    "lone cr": "a\rb\r",
    "newlines only": "\n\n\n",
    "space marks": f"{SPACE_MARK} {SPACE_MARK}{SPACE_MARK}x{SPACE_MARK}",
    "escape char": f"{ESCAPE}_ {ESCAPE}{SPACE_MARK} {ESCAPE}{ESCAPE}_{ESCAPE}",
    "markers as text": "<|user|>hi<|end|><|assistant|><|endoftext|><|bos|><|pad|><s></s><unk>",
    "python source": open(os.path.join(ROOT, "tokenizer.py"), encoding="utf-8").read(),
    "unicode": "naïve café ﬁ e\u0301 日本語 😀 \ufeff\u200b",
    **{f"random {seed}": random_text(seed) for seed in range(5)},
}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    corpus = [open(module.__file__, encoding="utf-8").read() for module in (textwrap, string, random)]
    return Tokenizer.train(corpus, 400, str(tmp_path_factory.mktemp("bpe") / "tokenizer.model"))


@pytest.fixture(scope="module", params=["bpe", "gpt2"])
def tokenizer(request):
    if request.param == "bpe":
        return request.getfixturevalue("bpe")
    try:
        return Tokenizer.load("gpt2")
    except ValueError:  # offline without tiktoken's cache: test_gpt2_offline_error covers this case
        pytest.skip("tiktoken's gpt2 files are not available offline")


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip_is_exact(tokenizer, name):
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_encode_batch_matches_encode(tokenizer):
    texts = list(TEXTS.values())
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_special_tokens(tokenizer):
    special = tokenizer.special
    assert set(special) == {"bos", "eos", "pad", "user", "assistant", "end"}
    assert (special["bos"], special["eos"], special["pad"]) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    ids = {name: i for name, i in special.items() if name != "bos"}  # gpt2 uses <|endoftext|> for bos and eos
    assert len(set(ids.values())) == len(ids)
    assert all(0 <= i < tokenizer.vocab_size for i in special.values())
    # typing a marker gives ordinary pieces, and every special id decodes to a marker
    assert not set(tokenizer.encode(TEXTS["markers as text"])) & set(special.values())
    markers = [tokenizer.decode([i]) for i in special.values()]
    assert all(m.startswith("<|") and m.endswith("|>") for m in markers)
    assert tokenizer.decode([special["user"]] + tokenizer.encode(" hi") + [special["end"]]) == "<|user|> hi<|end|>"


def test_reload_from_path(tokenizer):
    again = Tokenizer.load(tokenizer.path)
    assert (again.kind, again.vocab_size, again.special) == (tokenizer.kind, tokenizer.vocab_size, tokenizer.special)
    assert again.encode(TEXTS["python source"]) == tokenizer.encode(TEXTS["python source"])


def test_bpe_layout(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert len(bpe.encode("\n")) == 1  # newline is always its own byte piece
    assert len(bpe.encode("    ")) == 1  # indentation merges into one piece


def test_gpt2_extension_on_a_stand_in(monkeypatch):
    """The gpt2 wrapping, offline: a byte-level stand-in for tiktoken's gpt2 (256 byte ranks + <|endoftext|>)."""
    stand_in = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    gpt2 = Tokenizer.load("gpt2")
    assert (gpt2.kind, gpt2.path, gpt2.vocab_size) == ("gpt2", "gpt2", 257 + 4)
    assert gpt2.special == {"bos": 256, "eos": 256, "pad": 257, "user": 258, "assistant": 259, "end": 260}
    for text in TEXTS.values():
        assert gpt2.decode(gpt2.encode(text)) == text
    assert max(gpt2.encode(TEXTS["markers as text"])) < 256
    assert gpt2.decode([258, 104, 105, 260, 256]) == "<|user|>hi<|end|><|endoftext|>"


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("vocab_size", [100, 264])
def test_vocab_too_small(tmp_path, vocab_size):
    with pytest.raises(ValueError) as excinfo:
        Tokenizer.train(["some text with a few characters: äöü ß €"] * 20, vocab_size, str(tmp_path / "t.model"))
    assert f"vocab_size={vocab_size}" in one_line_error(excinfo)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        Tokenizer.load(str(tmp_path / "missing.model"))
    assert "missing.model" in one_line_error(excinfo)
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError) as excinfo:
        Tokenizer.load(str(tmp_path / "junk.model"))
    assert "junk.model" in one_line_error(excinfo)


def test_gpt2_offline_error(tmp_path):
    """With an empty cache and no way out (proxy on a closed local port), a stage that loads gpt2 stops with one clear
    line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    proxy = f"http://127.0.0.1:{closed_port}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY=proxy, https_proxy=proxy, HTTP_PROXY=proxy, http_proxy=proxy)
    for name in ("a.txt", "b.txt"):  # a train and a val document
        (tmp_path / name).write_text("some text")
    result = subprocess.run([sys.executable, "prepare.py", f"--input={tmp_path}/*.txt", "--tokenizer=gpt2",
                             f"--out_root={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "TIKTOKEN_CACHE_DIR" in result.stderr


def test_trained_model_is_the_same_on_any_core_count(tmp_path, monkeypatch):
    """The model file records sentencepiece's thread count: trained on machines of 1 and 3 cores, the same corpus gives
    the same bytes (train.py compares tokenizers by their bytes)."""
    corpus = [open(module.__file__, encoding="utf-8").read() for module in (textwrap, string)]
    models = []
    for cores in (1, 3):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        Tokenizer.train(corpus, 400, str(tmp_path / f"{cores}.model"))
        models.append((tmp_path / f"{cores}.model").read_bytes())
    assert models[0] == models[1]


def test_training_on_lines_longer_than_a_mib(tmp_path):
    """sentencepiece skips a sentence of more than max_sentence_length bytes: a document of one long line (minified
    code, a JSON row without line breaks) is still learned from, here the only text there is."""
    line = open(textwrap.__file__, encoding="utf-8").read().replace("\n", " ") * 60
    assert len(line.encode()) > 1 << 20
    tok = Tokenizer.train([line], 400, str(tmp_path / "long.model"))
    assert len(tok.encode(" the text")) < 6 and tok.decode(tok.encode(line)) == line


def hf_folder(folder, vocab):
    """A Hugging Face folder of a word-level tokenizer.json of vocab (token -> id), eos </s>."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')


def test_hf_vocab_size_covers_every_id(tmp_path):
    """A tokenizer.json whose ids leave gaps (here 0-3 and 70000): vocab_size is past the largest id, not the count
    of tokens, so that every id fits the dataset's dtype and the model's table."""
    hf_folder(tmp_path / "hf", {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "rare": 70000})
    tok = Tokenizer.load(str(tmp_path / "hf"))
    assert tok.encode("hello rare") == [2, 70000] and tok.vocab_size == 70001


def test_hf_tokenizer_json_in_the_working_folder(tmp_path, monkeypatch):
    """--tokenizer=tokenizer.json in the working folder: its path loads again (prepare.py's workers load tok.path)."""
    hf_folder(tmp_path / "hf", {"<unk>": 0, "</s>": 1, "hello": 2})
    monkeypatch.chdir(tmp_path / "hf")
    tok = Tokenizer.load("tokenizer.json")
    assert Tokenizer.load(tok.path).encode("hello") == tok.encode("hello") == [2]
