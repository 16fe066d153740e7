"""Data: WikiText-2 offline joining, calibration source, deterministic windows."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import SHARED_DATA
from pipeline.eval.data import (calibration_text, corpus_text, eval_corpus_windows, eval_windows, sample_windows,
                           tokenize, wikitext2_test_text)
from pipeline.infra.errors import PipelineError


def test_wikitext_offline_joins_nonblank_lines():
    text = wikitext2_test_text({"dir": str(SHARED_DATA)})
    assert "\r" not in text
    docs = text.split("\n\n")
    assert len(docs) == 2891 and all(d.strip() for d in docs)
    assert docs[0] == " = Robert Boulter = "


def test_calibration_sources():
    assert calibration_text({"dir": str(SHARED_DATA), "calib_source": "enwiki"}).startswith(" = Anarchism = ")
    with pytest.raises(PipelineError, match="choose wikitext2_train or enwiki"):
        calibration_text({"dir": str(SHARED_DATA), "calib_source": "c4"})


def test_windows_deterministic_by_seed():
    ids = torch.arange(10_000)
    a, b, c = (sample_windows(ids, 5, 64, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 64) and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 63, dtype=torch.long))


def test_eval_windows_non_overlapping_and_capped():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])
    assert eval_windows(ids, 128, max_windows=3).shape == (3, 128)
    with pytest.raises(PipelineError, match="fewer than one window"):
        eval_windows(ids, 2048)


class _ByteTokenizer:
    """One token per byte, no special tokens: enough to check the windowing of a corpus."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode())}


def test_corpus_windowed_like_wikitext(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffa b\r\n\r\n\r\nc d\r\n".encode())
    assert corpus_text(path) == "a b\n\nc d"  # BOM dropped, CRLF normalised, non-blank lines joined by a blank line
    windows, digest, key = eval_corpus_windows({}, str(path), _ByteTokenizer(), 4)
    assert key == "corpus" and windows.tolist() == [list(b"a b\n"), list(b"\nc d")]  # tail dropped, no BOS
    with pytest.raises(PipelineError, match="8 tokens, fewer than one window of eval.seqlen=9"):
        eval_corpus_windows({}, str(path), _ByteTokenizer(), 9)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(PipelineError, match="is not UTF-8 text"):
        corpus_text(path)
    assert eval_corpus_windows({"dir": str(SHARED_DATA)}, None, _ByteTokenizer(), 512, 2)[2] == "wikitext2"


def test_byte_tokenizer_fast_path_equals_the_tokenizer():
    """data.tokenize's byte lookup gives the ids the tokenizer itself gives: every byte value, multi-byte
    characters, blank lines, and the empty text."""
    from pipeline.model.load import byte_tokenizer

    tok = byte_tokenizer()
    text = "héllo wörld\n\n€ 𝄞 ok\x00\x7f\t " + bytes(range(256)).decode("latin-1") + "语言"
    for sample in (text, text[::-1], ""):
        slow = torch.tensor(tok(sample, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        fast = tokenize(sample, tok)
        assert fast.dtype == torch.int64 and torch.equal(fast, slow)
    assert tokenize("abc", tok).numel() == 3 and tok.rsq_byte_ids.unique().numel() == 256


def test_streamed_corpus_equals_the_whole_text_and_stops_reading_tokens_early(tmp_path, monkeypatch):
    """Pieces cut at rows: the windows and the digest equal the one-pass ones (byte tokenizer, where
    cutting cannot change tokens), for pieces far smaller than the file; BOM, CRLF, a multi-byte
    character split across reads, a final row without newline."""
    import pipeline.eval.data as data

    rows = [f"row {i} caf\u00e9 \u2014 {'x' * (i % 37)}" for i in range(400)]
    raw = ("\ufeff" + "\r\n\r\n".join(rows) + "\r\n  \n" + "last\r").encode()
    path = tmp_path / "c.txt"
    path.write_bytes(raw)
    whole = data._join_rows(raw.decode().lstrip("\ufeff"), drop_blank=True)
    assert data.corpus_text(path) == whole
    monkeypatch.setattr(data, "CORPUS_READ", 7)  # reads split multi-byte characters and CRLFs
    monkeypatch.setattr(data, "CORPUS_CHUNK", 300)
    windows, digest, key = eval_corpus_windows({}, str(path), _ByteTokenizer(), 16)
    assert windows.flatten().tolist() == list(whole.encode()[: windows.numel()]) and key == "corpus"
    assert digest == data.text_digest(whole)
    tokenized = []
    monkeypatch.setattr(data, "tokenize", lambda text, tok: tokenized.append(len(text)) or torch.tensor(list(text.encode())))
    few, few_digest, _ = eval_corpus_windows({}, str(path), _ByteTokenizer(), 16, 3)
    assert torch.equal(few, windows[:3]) and few_digest == digest  # the digest still covers the whole file
    assert sum(tokenized) <= 3 * 16 + 300 + 60  # tokenizing stopped once 3 windows were full


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "loop"])
def test_a_corpus_that_is_not_a_regular_file_is_one_line(tmp_path, kind):
    import os

    path = tmp_path / "corpus"
    if kind == "directory":
        path.mkdir()
        expected = "is a directory"
    elif kind == "fifo":
        os.mkfifo(path)
        expected = "is not a regular file (a FIFO, device or socket)"
    elif kind == "device":
        path = "/dev/zero"
        expected = "is not a regular file (a FIFO, device or socket)"
    else:
        path.symlink_to(path)
        expected = "cannot read it (Too many levels of symbolic links)"
    with pytest.raises(PipelineError, match=re.escape(f"eval.corpus={path}: {expected}")):
        eval_corpus_windows({}, str(path), _ByteTokenizer(), 8)


PEAK = """
import resource, sys
from pipeline.eval.data import eval_corpus_windows
from pipeline.model.load import byte_tokenizer
tok = byte_tokenizer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the imports' peak, not the corpus's
windows = eval_corpus_windows({}, sys.argv[1], tok, 256, 4)[0]
print(windows.shape[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_corpus_memory_does_not_grow_with_the_file(tmp_path):
    """The review's case (64 MiB of text took 14.3 GiB to evaluate 2 windows): the windowing's rise of
    peak RSS (over the imports') for a 32 MiB corpus is within 24 MiB of a 2 MiB one's (one-pass
    tokenization would hold the whole text, its bytes and its int64 tokens: over 300 MiB more)."""
    import subprocess
    import sys

    from conftest import ROOT

    row = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n").encode()
    peaks = []
    for mib in (2, 32):
        path = tmp_path / f"c{mib}.txt"
        path.write_bytes(row * (mib * 2**20 // len(row)))
        out = subprocess.run([sys.executable, "-c", PEAK, str(path)], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[0] == "4"
        peaks.append(int(out[1]) / 1024)
    assert peaks[1] - peaks[0] < 24, peaks
