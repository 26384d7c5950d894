"""
Text <-> token ids: one Tokenizer class over three backends.
- 'bpe': a BPE with byte fallback that prepare.py trains with sentencepiece on your corpus (tokenizer.model)
- 'gpt2': OpenAI's GPT-2 BPE through tiktoken, with pad and chat markers added after id 50256
- 'hf': a Hugging Face model folder's tokenizer.json (Llama 3, Qwen, DeepSeek-V3, ...), as it is, through the
  `tokenizers` package (pip install tokenizers; imported only for these)

    tok = Tokenizer.load("data/pystdlib/tokenizer.model")   # or Tokenizer.load("gpt2"), or a HF model folder
    assert tok.decode(tok.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"

The first two give back exactly the text they were given, whitespace and all ('hf' as far as its own normalizer
allows). encode() adds no special tokens and never makes one from text: "<|user|>" typed in a document is ordinary
characters. decode() writes a special id as its marker text ("<|user|>", "<|endoftext|>", ...), so a decoded chat
transcript shows its turns. What cannot be loaded or trained raises a one-line ValueError.
"""
import itertools
import json
import os
import re

import sentencepiece as spm
import tiktoken

CHAT_MARKERS = {"user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
BPE_MARKERS = {"bos": "<|bos|>", "eos": "<|endoftext|>", "pad": "<|pad|>"}

# sentencepiece decodes every U+2581 ('▁', its space) to ' ', so a '▁' in the text is hidden from it: ESCAPE + '_'
# stands for '▁', ESCAPE + ESCAPE for a literal ESCAPE (a private-use character, so real text almost never pays for
# this); decoding reads the pairs left to right, so the mapping is exactly reversible.
SPACE_MARK = "\u2581"
ESCAPE = "\ue000"
ESCAPED_PAIR = re.compile(ESCAPE + "(.)", re.DOTALL)


def escape(text):
    return text.replace(ESCAPE, ESCAPE + ESCAPE).replace(SPACE_MARK, ESCAPE + "_")


def unescape(text):
    return ESCAPED_PAIR.sub(lambda m: {"_": SPACE_MARK, ESCAPE: ESCAPE}.get(m[1], m[0]), text)


class Tokenizer:
    """Build one with Tokenizer.load(...) or Tokenizer.train(...)."""

    def __init__(self, kind, path, backend, special, vocab_size):
        self.kind = kind                # 'bpe', 'gpt2' or 'hf'
        self.path = path                # what Tokenizer.load needs to load it again
        self.backend = backend          # a SentencePieceProcessor, a tiktoken Encoding or a tokenizers.Tokenizer
        self.special = special          # name -> id for bos, eos, pad, user, assistant, end ('hf': None where absent)
        self.vocab_size = vocab_size    # every id, the special ones included
        self.bos_id, self.eos_id, self.pad_id = special["bos"], special["eos"], special["pad"]
        if kind == "bpe":
            self.marker_of = {i: backend.id_to_piece(i) for i in special.values()}
            self.newline_id = backend.piece_to_id("<0x0A>")

    @classmethod
    def train(cls, texts, vocab_size, path):
        """Train a BPE of vocab_size ids on every line of the documents (the caller bounds them: sampling lines with
        sentencepiece's input_sentence_size would differ from run to run), write it to path, load it."""
        reserved = 1 + len(BPE_MARKERS) + len(CHAT_MARKERS) + 256  # unk, specials, one piece per byte
        if vocab_size <= reserved:
            raise ValueError(f"vocab_size={vocab_size} is too small: {reserved} ids go to special tokens and the 256 "
                             "byte pieces, and the rest to characters and merges (try 4096 or more)")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open(path, "wb") as model_writer:
                spm.SentencePieceTrainer.train(  # on lines, so no piece holds a '\n' (encode() writes its byte piece),
                    # cut to 2^18 characters (at most max_sentence_length bytes): sentencepiece skips longer ones
                    sentence_iterator=(line[i:i + (1 << 18)] for text in texts for line in escape(text).split("\n")
                                       for i in range(0, len(line) or 1, 1 << 18)),
                    # a fixed thread count: the model file records it, and its bytes must not depend on the machine
                    model_writer=model_writer, model_type="bpe", vocab_size=vocab_size, num_threads=16,
                    # sentencepiece's defaults normalize Unicode and collapse runs of spaces: text would not come back
                    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                    allow_whitespace_only_pieces=True,  # runs of spaces (indentation) become single pieces
                    byte_fallback=True,  # characters outside the vocabulary are spelled as UTF-8 bytes, never <unk>
                    split_digits=True, max_sentence_length=1 << 20, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                    bos_piece=BPE_MARKERS["bos"], eos_piece=BPE_MARKERS["eos"], pad_piece=BPE_MARKERS["pad"],
                    # control symbols are never matched in text, so typing a marker cannot produce its id
                    control_symbols=list(CHAT_MARKERS.values()), minloglevel=2)
        except RuntimeError as e:  # the corpus needs more ids for its characters, or has too little text to merge
            os.remove(path)
            why = str(e).split("] ")[-1].strip()
            raise ValueError(f"cannot train a tokenizer with vocab_size={vocab_size}: {why}") from None
        return cls.load(path)

    @classmethod
    def load(cls, name_or_path):
        """'gpt2', the path of a tokenizer.model written by Tokenizer.train, or a HF folder (or its tokenizer.json)."""
        if os.path.isdir(name_or_path) or name_or_path.endswith("tokenizer.json"):
            return cls.load_hf(name_or_path)
        if name_or_path == "gpt2":
            try:
                gpt2 = tiktoken.get_encoding("gpt2")  # fetches two files once, then reads them from its cache
            except (OSError, ValueError, ImportError):  # no connection, a bad download, tiktoken without requests
                raise ValueError("cannot load the gpt2 tokenizer files (offline?): set TIKTOKEN_CACHE_DIR to a folder "
                                 "holding tiktoken's cached gpt2 files, or connect to the internet once") from None
            added = {"pad": BPE_MARKERS["pad"], **CHAT_MARKERS}
            encoding = tiktoken.Encoding(
                name="gpt2_chat", pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                special_tokens={**gpt2._special_tokens, **{m: gpt2.n_vocab + i for i, m in enumerate(added.values())}})
            eot = gpt2.eot_token  # <|endoftext|> ends every document and also starts one: bos and eos are one id
            special = {"bos": eot, "eos": eot, **{name: encoding.encode_single_token(m) for name, m in added.items()}}
            return cls("gpt2", "gpt2", encoding, special, encoding.n_vocab)
        if not os.path.isfile(name_or_path):
            raise ValueError(f"tokenizer {name_or_path} not found "
                             "(give 'gpt2' or a tokenizer.model written by prepare.py)")
        try:
            sp = spm.SentencePieceProcessor(model_file=name_or_path)
        except (OSError, RuntimeError):
            raise ValueError(f"{name_or_path} is not a sentencepiece model") from None
        special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(),
                   **{name: sp.piece_to_id(marker) for name, marker in CHAT_MARKERS.items()}}
        if min(special.values()) <= sp.unk_id():
            raise ValueError(f"{name_or_path} lacks nanollm's special tokens: train it with prepare.py")
        return cls("bpe", name_or_path, sp, special, sp.get_piece_size())

    @classmethod
    def load_hf(cls, path):
        """The tokenizer.json of a Hugging Face folder, with its bos, eos and pad tokens from tokenizer_config.json
        (config.json's ids where it names none); no chat markers of ours (its chat template is its own)."""
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."  # "tokenizer.json": here
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise ValueError(f"no tokenizer.json in {folder} "
                             "(a sentencepiece-only folder: convert it with transformers first)")
        try:
            import tokenizers
        except ImportError:
            raise ImportError("a Hugging Face tokenizer.json needs the tokenizers package: "
                              "pip install tokenizers") from None
        try:
            backend = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        except Exception as e:  # cut short, not JSON, not a tokenizer
            raise ValueError(f"{folder}/tokenizer.json is damaged ({str(e).splitlines()[0][:120]})") from None
        backend.encode_special_tokens = True  # a marker typed in the text stays ordinary characters
        settings = {}
        for name in ("config.json", "tokenizer_config.json"):  # the second's token strings win
            if os.path.isfile(os.path.join(folder, name)):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        settings.update(json.load(f))
                except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
                    raise ValueError(f"{folder}/{name} is damaged ({e})") from None

        def token_id(name):
            token = settings.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            found = backend.token_to_id(token) if token else None
            found = settings.get(f"{name}_token_id") if found is None else found
            return found[0] if isinstance(found, list) else found  # several eos ids: the first ends our samples
        special = {name: token_id(name) for name in ("bos", "eos", "pad")} | dict.fromkeys(CHAT_MARKERS)
        if special["eos"] is None:
            raise ValueError(f"{folder}: no eos token (tokenizer_config.json eos_token, or config.json eos_token_id)")
        special["pad"] = special["eos"] if special["pad"] is None else special["pad"]
        # past the largest id, which a vocabulary with gaps puts beyond its count of tokens
        return cls("hf", folder, backend, special, max(backend.get_vocab(with_added_tokens=True).values()) + 1)

    def encode(self, text):
        """Token ids of text, without any special tokens."""
        return self.backend.encode_ordinary(text) if self.kind == "gpt2" else self.encode_batch([text])[0]

    def encode_batch(self, texts):
        """encode() of each text; tiktoken spreads a batch over threads."""
        if self.kind == "gpt2":
            return self.backend.encode_ordinary_batch(texts)
        if self.kind == "hf":
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        # line by line gives the same ids (no piece holds a '\n'); one thread, as prepare.py runs a process per core
        lines = [escape(text).split("\n") for text in texts]
        pieces = iter(self.backend.encode([line for doc in lines for line in doc], num_threads=1))
        batch = []
        for doc in lines:
            ids = []
            for _ in doc:
                ids += next(pieces) + [self.newline_id]
            batch.append(ids[:-1])
        return batch

    def decode(self, ids):
        """Text of a sequence of ids (list, numpy array or tensor); special ids become their marker text."""
        ids = [int(i) for i in ids]
        if self.kind == "gpt2":
            return self.backend.decode(ids)
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=False)
        # sentencepiece decodes control symbols to '' and escaped text must be unescaped: decode between markers
        runs = itertools.groupby(ids, lambda i: i in self.marker_of)  # (True, markers), (False, text), ...
        return "".join("".join(self.marker_of[i] for i in run) if marker else unescape(self.backend.decode(list(run)))
                       for marker, run in runs)
