"""
Prepare a data set: text -> data/NAME/{train,val}.bin (token ids) + meta.json.

    python prepare.py                                     # tiny Shakespeare (assets/), characters
    TIKTOKEN_CACHE_DIR=../shared/data/gpt2/tiktoken_cache \\
    python prepare.py --input ../shared/data/gutenberg --tokenizer gpt2   # -> data/gutenberg_gpt2
    python prepare.py --input my_docs/ --tokenizer hf:HuggingFaceTB/SmolLM2-135M
    python prepare.py --input book.txt --tokenizer gguf:path/to/SmolLM2-135M-Instruct.Q4_1.gguf
    python prepare.py --hf_dataset roneneldan/TinyStories --tokenizer gpt2   # needs a network

- The default input is tiny Shakespeare as nanoGPT's shakespeare_char uses it (karpathy/char-rnn's
  input.txt, public domain), shipped compressed in assets/ so that no step needs a network; train.py
  prepares it on first use (tests/test_first_hour.py).
- Each file or record is a document; between the documents of a split goes the end-of-text token
  (a blank line for char). One file splits as nanoGPT's (the first 90% of its characters train).
- Text is encoded in pieces of about 1M characters cut before a space between two letters, where
  byte-level BPE splits anyway: the ids equal those of each whole document (tests/test_prepare.py).
- The ids go to disk as they come into a temporary folder, moved into place at the end, so a failure
  leaves no damaged outputs. docs/training.md describes meta.json and the splits in full.
"""
import json
import lzma
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from cli import errors, fail, parse

try:
    from tqdm import tqdm
except ImportError:  # tqdm comes with datasets and transformers; without it, no progress bar
    class tqdm:
        def __init__(self, **kwargs): pass
        def __enter__(self): return self
        def __exit__(self, *exc): pass
        def update(self, n): pass

DEFAULTS = dict(
    input=[],  # text files or folders of .txt files (default: tiny Shakespeare from assets/)
    hf_dataset='',  # a Hugging Face dataset name, streamed (needs a network)
    hf_config='',  # the dataset's configuration
    hf_split='train',  # the dataset split to read
    text_field='text',  # the record field that holds the text
    tokenizer='char',  # gpt2, char, hf:<name or folder> or gguf:<file.gguf>
    name='',  # output folder name (default: the input's name + the tokenizer's)
    out_root='data',  # the folder that holds NAME/
    val_fraction=0.1,  # share of the documents (or of a single file) for val
)
# the allowed values of the settings (cli.problem); the tokenizer's spec is checked by prepare
LIMITS = dict(input='path', hf_dataset='text', hf_config='text', hf_split='text',
              text_field='text', tokenizer='text', name='text', out_root='writable',
              val_fraction='(0, 1)')
# tiny Shakespeare, xz-compressed: sha256 86c4e6aa...65ed once decompressed, as char-rnn's input.txt
SHAKESPEARE = Path(__file__).resolve().parent / "assets" / "tinyshakespeare.txt.xz"
DEFAULT_DATASET = "shakespeare_char"  # what the defaults make (train.py's default dataset)
TOKENIZERS = "gpt2, char, hf:<name or folder> or gguf:<file.gguf>"
CHUNK_CHARS = 1_000_000  # characters read and encoded at a time

META_KEYS = {"tokenizer": str, "vocab_size": int, "dtype": str,
             "train_tokens": int, "val_tokens": int}
DTYPES = ("uint16", "uint32")


def load_meta(data_dir):
    """A prepared folder's meta.json, checked: ValueError (one line)
    if it is missing, not JSON, or lacks a key."""
    path = Path(data_dir) / "meta.json"
    redo = "run prepare.py again for this folder"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {path}: prepare the data with prepare.py")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}): {redo}")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object: {redo}")
    bad = [k for k, t in META_KEYS.items() if type(meta.get(k)) is not t]
    if bad:
        raise ValueError(f"{path} lacks {', '.join(bad)} (or has the wrong type): "
                         f"it is incomplete; {redo}")
    if (meta["dtype"] not in DTYPES or meta["vocab_size"] < 1
            or meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1):
        raise ValueError(f"{path}: dtype {meta['dtype']!r} "
                         f"cannot hold a vocabulary of {meta['vocab_size']} "
                         f"(use {' or '.join(DTYPES)}): {redo}")
    if meta["tokenizer"] == "char" and len(meta.get("chars") or "") != meta["vocab_size"]:
        raise ValueError(f"{path}: the char tokenizer needs its {meta['vocab_size']} "
                         f"characters in 'chars': {redo}")
    return meta


def check_data(data_dir, meta, vocab_size=None):
    """ValueError (one line) unless train.bin and val.bin hold whole tokens, as many as meta.json
    says, and (given vocab_size, a model's) every id is below vocab_size: a pass over the data,
    about 1 s per 5e9 tokens."""
    size = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = Path(data_dir) / f"{split}.bin"
        if not path.is_file():
            raise ValueError(f"no {path}: the folder is incomplete; run prepare.py again for it")
        n = path.stat().st_size
        if n % size:
            raise ValueError(f"{path} has {n} bytes, not a whole number of {meta['dtype']} tokens "
                             f"({size} bytes each): "
                             f"it is truncated or not from prepare.py; "
                             f"run prepare.py again for this folder")
        if n // size != meta[f"{split}_tokens"]:
            raise ValueError(f"{path} holds {n // size} tokens "
                             f"but meta.json says {meta[f'{split}_tokens']}: the "
                             f"files do not belong together; run prepare.py again for this folder")
        if vocab_size is None or n == 0:
            continue
        data, step = np.memmap(path, dtype=meta["dtype"], mode="r"), 1 << 26
        top = max(int(data[i:i + step].max()) for i in range(0, len(data), step))
        if top >= vocab_size:
            where = next(i + int(np.argmax(data[i:i + step] >= vocab_size))
                         for i in range(0, len(data), step)
                         if data[i:i + step].max() >= vocab_size)
            raise ValueError(f"{path} holds token id {top} "
                             f"(the first out of range at position {where}), beyond the "
                             f"model's vocabulary of {vocab_size}: "
                             f"prepare the data with the model's tokenizer")


def get_tokenizer(spec, meta=None):
    """(encode, decode) for a tokenizer spec: text -> list of ids, list of ids -> text."""
    encode, decode, _, _ = load_tokenizer(spec, (meta or {}).get("chars"))
    return encode, decode


def load_tokenizer(spec, chars=None):
    """(encode, decode, vocab_size, eot_token) for a tokenizer spec; chars is char's vocabulary."""
    if spec == "gpt2":
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        return enc.encode_ordinary, enc.decode, enc.n_vocab, enc.eot_token
    if spec == "char":
        if chars is None:
            raise ValueError("the char tokenizer needs its vocabulary: "
                             "pass meta.json's contents as meta")
        stoi = {c: i for i, c in enumerate(chars)}
        return ((lambda s: [stoi[c] for c in s]),
                (lambda ids: "".join(chars[i] for i in ids)),
                len(chars), None)
    if spec.startswith(("hf:", "gguf:")):
        from transformers import AutoTokenizer
        path = spec.split(":", 1)[1]
        if spec.startswith("hf:"):
            tok = AutoTokenizer.from_pretrained(path)
        elif os.path.isfile(path):
            tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                gguf_file=os.path.basename(path))
        else:
            raise FileNotFoundError(f"no GGUF file {path}")
        # like tiktoken's encode_ordinary: no BOS, and "<|endoftext|>"
        # written in the text stays text
        encode = lambda s: tok.encode(s, add_special_tokens=False, split_special_tokens=True)
        return encode, tok.decode, len(tok), tok.eos_token_id
    raise ValueError(f"unknown tokenizer {spec!r}; use {TOKENIZERS}")


def dtype_for(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def default_name(cfg):
    """The input's name (a file's stem, a folder's name, X for X/input.txt) + "_" + the tokenizer's
    name; tiny Shakespeare, embedded or given, is "shakespeare" as in nanoGPT (shakespeare_char)."""
    if cfg["hf_dataset"]:
        source = cfg["hf_dataset"].rstrip("/").split("/")[-1]
    elif cfg["input"]:
        p = Path(cfg["input"][0]).resolve()
        source = p.parent.name if p.name == "input.txt" else p.stem if p.is_file() else p.name
        source = "shakespeare" if source == "tinyshakespeare" else source
    else:
        source = "shakespeare"
    return f"{source}_{Path(cfg['tokenizer'].split(':', 1)[-1]).name.removesuffix('.gguf')}"


def text_files(inputs):
    """The files to read, in order: files as given, folders as their
    *.txt files (recursive, sorted)."""
    paths = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            found = sorted(p.rglob("*.txt"))
            if not found:
                fail(f"folder {name} holds no .txt files; "
                     f"pass text files or a folder of .txt files")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            fail(f"input {name} does not exist; check the path")
    return paths


def read_chunks(path):
    """A file's text in pieces of about CHUNK_CHARS characters, cut
    before a space between two letters."""
    text = ""
    try:
        opener = lzma.open if Path(path).suffix == ".xz" else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            while block := f.read(CHUNK_CHARS):
                text += block
                cut = text.rfind(" ", 1, len(text) - 1)
                while cut > 0 and not (text[cut - 1].isalpha() and text[cut + 1].isalpha()):
                    cut = text.rfind(" ", 1, cut)
                if cut > 0:  # else no place to cut yet: read on
                    yield text[:cut]
                    text = text[cut:]
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text; "
             f"convert it (e.g. iconv -f latin1 -t utf-8) or leave it out")
    if text:
        yield text


def file_pieces(paths, val_fraction):
    """(split, starts_document, text) for each piece of the input files."""
    # as nanoGPT: the first (1 - val_fraction) of the characters train, the rest val
    if len(paths) == 1:
        cut, seen = int(sum(map(len, read_chunks(paths[0]))) * (1 - val_fraction)), 0
        for chunk in read_chunks(paths[0]):
            if seen < cut:
                yield "train", seen == 0, chunk[:cut - seen]
            if seen + len(chunk) > cut:
                yield "val", seen <= cut, chunk[max(cut - seen, 0):]
            seen += len(chunk)
        return
    n_val = min(len(paths) - 1, max(1, round(len(paths) * val_fraction)))
    for i, path in enumerate(paths):
        for j, chunk in enumerate(read_chunks(path)):
            yield "val" if i >= len(paths) - n_val else "train", j == 0, chunk


def open_dataset(cfg):
    """The Hugging Face dataset split, streamed: records are read as they are used."""
    from datasets import load_dataset
    try:
        return load_dataset(cfg["hf_dataset"], cfg["hf_config"] or None,
                            split=cfg["hf_split"], streaming=True)
    except Exception as e:
        fail(f"could not load dataset {cfg['hf_dataset']!r} ({str(e).splitlines()[0]}); "
             "check the name, --hf_config and --hf_split")


def dataset_pieces(records, text_field, val_fraction):
    """(split, starts_document, text) for each record; every round(1 /
    val_fraction)-th one is val."""
    every = round(1 / val_fraction)
    for i, record in enumerate(records):
        if text_field not in record:
            fail(f"the dataset has no field {text_field!r}; "
                 f"pick one of {list(record)} with --text_field")
        if record[text_field]:
            yield "val" if i % every == every - 1 else "train", True, record[text_field]


def with_separators(pieces, separator):
    """(split, piece) with the separator (a token id or a string)
    between the documents of each split."""
    started = set()
    for split, starts_document, text in pieces:
        if starts_document and split in started:
            yield split, separator
        started.add(split)
        yield split, text


def write_bins(pieces, encode, dtype, folder, total_bytes, quiet=False):
    """Encode (split, text or token id) pieces into
    folder/{train,val}.bin; return meta.json's counts."""
    counts = {"train_tokens": 0, "val_tokens": 0, "val_bytes": 0}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=quiet)
    with (bar, open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val):
        for split, piece in pieces:
            if isinstance(piece, str):
                ids, n_bytes = encode(piece), len(piece.encode("utf-8"))
            else:  # the end-of-text token
                ids, n_bytes = [piece], 0
            np.array(ids, dtype=dtype).tofile(train if split == "train" else val)
            counts[split + "_tokens"] += len(ids)
            counts["val_bytes"] += n_bytes if split == "val" else 0
            bar.update(n_bytes)
    return counts


def text_bytes(path):
    """A file's size in bytes of text (decompressed for .xz)"""
    if path.suffix == ".xz":
        with lzma.open(path) as f:
            return len(f.read())
    return path.stat().st_size


def prepare(cfg, quiet=False):
    """The data set cfg (prepare.py's settings) describes -> (its
    folder, meta.json); quiet: no progress bar."""
    if cfg["input"] and cfg["hf_dataset"]:
        fail("--input and --hf_dataset are two sources: pass one of them")
    if not 0 < cfg["val_fraction"] < 1:
        fail(f"--val_fraction must be between 0 and 1, not {cfg['val_fraction']}")
    tokenizer = cfg["tokenizer"]
    if tokenizer not in ("gpt2", "char") and not tokenizer.startswith(("hf:", "gguf:")):
        fail(f"unknown tokenizer {tokenizer!r}; use {TOKENIZERS}")
    out_dir = Path(cfg["out_root"]) / (cfg["name"] or default_name(cfg))
    if cfg["hf_dataset"]:
        records = open_dataset(cfg)
        total_bytes = None
        pieces = lambda: dataset_pieces(  # noqa: E731
            records, cfg["text_field"], cfg["val_fraction"])
    else:
        paths = text_files(cfg["input"] or [SHAKESPEARE])
        total_bytes = sum(map(text_bytes, paths))
        if total_bytes == 0:
            fail("the input holds no text; pass files that are not empty")
        pieces = lambda: file_pieces(paths, cfg["val_fraction"])  # noqa: E731
    chars = None
    if tokenizer == "char":
        # one pass for the vocabulary, the blank-line separators included
        chars = sorted(set().union(*(set(text) for _, text in with_separators(pieces(), "\n\n"))))
    try:
        encode, _, vocab_size, eot = load_tokenizer(tokenizer, chars)
    except Exception as e:
        hint = ("; offline, set TIKTOKEN_CACHE_DIR=../shared/data/gpt2/tiktoken_cache"
                if tokenizer == "gpt2" else "")
        fail(f"could not load tokenizer {tokenizer!r} ({str(e).splitlines()[0]}){hint}")
    dtype = dtype_for(vocab_size)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # the root is removed again if nothing ends up in it
    new_root = not out_dir.parent.exists()
    tmp.mkdir(parents=True)
    try:
        separator = "\n\n" if eot is None else eot
        counts = write_bins(with_separators(pieces(), separator), encode, dtype, tmp,
                            total_bytes, quiet)
        for split in ("train", "val"):
            if counts[split + "_tokens"] == 0:
                fail(f"the {split} split is empty; "
                     f"give more text or documents, or change --val_fraction")
        meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
                **counts, "eot_token": eot}
        if chars:
            meta["chars"] = "".join(chars)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        out_dir.mkdir(exist_ok=True)
        # meta.json last: a folder with a meta.json is whole
        for name in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if new_root and not any(out_dir.parent.iterdir()):
            out_dir.parent.rmdir()
    return out_dir, meta


def training_data(data_dir, vocab_size=None, block_size=1):
    """meta.json of a prepared data set that a model of vocab_size can train on with sequences of
    block_size tokens; else ValueError, one line naming the problem and the fix"""
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        raise ValueError(f"no prepared data at {data_dir}: "
                         f"run python prepare.py (see README) or set --dataset")
    meta = load_meta(data_dir)
    # whole tokens, as many as meta says, all below the vocabulary
    check_data(data_dir, meta, vocab_size or meta["vocab_size"])
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] <= block_size:
            n = meta[f"{split}_tokens"]
            raise ValueError(f"the {split} split of {data_dir} has {n} tokens, "
                             f"fewer than block_size+1={block_size + 1}: "
                             f"lower block_size or prepare more text")
    return meta


def prepare_default(out_root="data"):
    """The default data set (tiny Shakespeare from assets/, characters), as `python prepare.py`
    makes it, quietly -> its folder (train.py's first run on a fresh clone)"""
    return prepare({**DEFAULTS, "out_root": out_root}, quiet=True)[0]


def main(argv=None):
    cfg, _ = parse(DEFAULTS, sys.argv[1:] if argv is None else argv, positional="input",
                   limits=LIMITS)
    out_dir, meta = prepare(cfg)
    print(f"{out_dir}: vocab {meta['vocab_size']:,} ({meta['dtype']}), "
          f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens")


if __name__ == "__main__":
    with errors("prepare.py"):
        main()
