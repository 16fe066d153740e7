"""Text sources and token windows (DESIGN §1 evaluation protocol, §4 offline data).

Data dir: ``data.dir``, else env ``RSQ_DATA_DIR`` (the layout of ``../shared/data``). Without a data
dir the HF hub is used (``datasets.load_dataset``), as real users online expect.
- WikiText-2 test: documents joined with ``"\\n\\n"``. Offline only the blank-line-free copy exists:
  its lines are joined with ``"\\n\\n"``, which differs slightly from the published protocol.
- Calibration: ``data.calib_source`` = ``wikitext2_train`` (hub; the papers' protocol) or ``enwiki``
  (offline: 106 Wikipedia articles, no overlap with WikiText-2 test).
"""
from __future__ import annotations

import codecs
import hashlib
import os
import stat
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig

from ..infra.errors import PipelineError

WIKITEXT_TEST_FILE = "wikitext-2-raw-test-noblank/wiki.test.raw"
WIKITEXT_TRAIN_FILE = "wikitext-2-raw-train/wiki.train.raw"
ENWIKI_FILE = "enwiki-gensim/enwiki.txt"


def data_dir(data_cfg: DictConfig | dict) -> Path | None:
    """The configured data dir, or None (use the hub). A configured dir that is absent is an error."""
    configured = data_cfg.get("dir") or os.environ.get("RSQ_DATA_DIR")
    if not configured:
        return None
    path = Path(configured).expanduser()
    if not path.is_dir():
        raise PipelineError(f"data dir {path} does not exist (set data.dir= or RSQ_DATA_DIR to ../shared/data)")
    return path


def _read_local(root: Path, rel: str) -> str:
    path = root / rel
    if not path.is_file():
        raise PipelineError(f"{path} is missing: the data dir must hold {rel} (see ../shared/data/README.md)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _join_rows(raw: str, drop_blank: bool) -> str:
    """A raw WikiText file as the HF rows joined with ``"\\n\\n"`` (CRLF normalised first)."""
    rows = raw.replace("\r\n", "\n").split("\n")
    if rows and rows[-1] == "":
        rows.pop()  # the file's final newline ends the last row, it is not an empty row
    return "\n\n".join(r for r in rows if r.strip() or not drop_blank)


def _hub_split(name: str, config: str, split: str, local_hint: str) -> list[str]:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PipelineError(
            f"{name}/{config} {split} is not available: the hub is off and no data dir holds {local_hint} "
            "(set data.dir= or RSQ_DATA_DIR to a folder like ../shared/data)"
        )
    import datasets

    try:
        return list(datasets.load_dataset(name, config, split=split)["text"])
    except (OSError, ConnectionError, ValueError) as exc:
        raise PipelineError(f"could not load {name}/{config} {split} from the hub: {str(exc).splitlines()[0]}") from None


def wikitext2_test_text(data_cfg: DictConfig | dict) -> str:
    """The WikiText-2 raw test split as one string (see module doc for the offline difference)."""
    root = data_dir(data_cfg)
    if root is None:
        return "\n\n".join(_hub_split("wikitext", "wikitext-2-raw-v1", "test", WIKITEXT_TEST_FILE))
    return _join_rows(_read_local(root, WIKITEXT_TEST_FILE), drop_blank=True)


def calibration_text(data_cfg: DictConfig | dict) -> str:
    """Calibration text from ``data.calib_source``."""
    source = data_cfg.get("calib_source")
    if source == "wikitext2_train":
        root = data_dir(data_cfg)
        if root is not None and (root / WIKITEXT_TRAIN_FILE).is_file():
            return _join_rows(_read_local(root, WIKITEXT_TRAIN_FILE), drop_blank=False)
        return "\n\n".join(_hub_split("wikitext", "wikitext-2-raw-v1", "train", WIKITEXT_TRAIN_FILE))
    if source == "enwiki":
        root = data_dir(data_cfg)
        if root is None:
            raise PipelineError("data.calib_source=enwiki needs a data dir (data.dir= or RSQ_DATA_DIR)")
        return _read_local(root, ENWIKI_FILE)
    raise PipelineError(f"data.calib_source={source!r}: choose wikitext2_train or enwiki")


def text_digest(text: str) -> str:
    """Short sha256 of a text, recorded in metrics so a changed data file shows in ``dvc metrics diff``."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_seqlen(seqlen: int, max_positions: int | None, what: str) -> None:
    """Refuse windows longer than the model's position range (they would run, and mean nothing)."""
    if max_positions is not None and seqlen > max_positions:
        raise PipelineError(f"{what}={seqlen} exceeds the model's max_position_embeddings={max_positions}")


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All of ``text`` as one ``(n_tokens,)`` int64 tensor, tokenized once (no special tokens)."""
    byte_ids = getattr(tokenizer, "rsq_byte_ids", None)  # models.byte_tokenizer: one token per byte
    if byte_ids is not None and text:
        return byte_ids[torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(n, seqlen)`` windows from the start; the tail shorter than seqlen is dropped."""
    if seqlen < 2:
        raise PipelineError(f"eval.seqlen={seqlen}: must be at least 2")
    n = ids.numel() // seqlen
    if max_windows is not None:
        check_max_windows(max_windows)
        n = min(n, max_windows)
    if n == 0:
        raise PipelineError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def check_max_windows(max_windows) -> None:
    """``max_windows`` is null (every window) or an integer >= 1, else one line."""
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
        raise PipelineError(f"max_windows={max_windows!r}: must be null (every window) or an integer >= 1")


def wikitext2_windows(data_cfg: DictConfig | dict, tokenizer, seqlen: int,
                      max_windows: int | None = None) -> tuple[torch.Tensor, str]:
    """The evaluation windows every ppl figure uses: WikiText-2 test tokenized once, cut into
    ``(n, seqlen)`` int64 windows from the start; also the text's digest for the metrics."""
    text = wikitext2_test_text(data_cfg)
    return eval_windows(tokenize(text, tokenizer), seqlen, max_windows), text_digest(text)


CORPUS_READ = 1 << 20  # bytes of the corpus file read at a time
CORPUS_CHUNK = 1 << 20  # characters of corpus text tokenized at a time (cut before a row's separator)


def check_corpus_file(path: str | os.PathLike) -> Path:
    """``eval.corpus`` as a readable regular file holding some text, else one line saying what it is.
    Reads only up to its first non-blank row: a bad corpus fails before the checkpoint is loaded."""
    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise PipelineError(f"eval.corpus={path}: no such file") from None
    except OSError as exc:  # a symlink loop, a path through a non-directory, no permission
        raise PipelineError(f"eval.corpus={path}: cannot read it ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise PipelineError(f"eval.corpus={path}: is a directory; give a UTF-8 text file")
    if not stat.S_ISREG(mode):
        raise PipelineError(f"eval.corpus={path}: is not a regular file (a FIFO, device or socket); "
                            "give a UTF-8 text file")
    if next(corpus_rows(file), None) is None:
        raise PipelineError(f"eval.corpus={path}: the file holds no text")
    return file


def corpus_rows(file: Path) -> Iterator[str]:
    """The non-blank rows of a UTF-8 text file, read ``CORPUS_READ`` bytes at a time: a leading BOM
    dropped, CRLF normalised, rows split at ``"\n"`` (as ``_join_rows`` does with a whole file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed, pending, leading = 0, "", True
    try:
        with file.open("rb") as f:
            while True:
                block = f.read(CORPUS_READ)
                held = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    raise PipelineError(f"{file} is not UTF-8 text (byte {consumed - held + exc.start}: "
                                        f"{exc.reason})") from None
                consumed += len(block)
                if leading:
                    text = text.lstrip("\ufeff")
                    leading = not text
                rows = (pending + text).split("\n")
                pending = rows.pop() if block else ""
                for row in rows:
                    row = row[:-1] if row.endswith("\r") and block else row
                    if row.strip():
                        yield row
                if not block:
                    return
    except OSError as exc:
        raise PipelineError(f"{file}: cannot read it ({exc.strerror})") from None


def _corpus_pieces(file: Path) -> Iterator[str]:
    """The corpus text in pieces: the first row, then ``"\n\n" + row`` for each next one."""
    first = True
    for row in corpus_rows(file):
        yield row if first else "\n\n" + row
        first = False


def corpus_text(path: str | os.PathLike) -> str:
    """A user's UTF-8 text file as an evaluation corpus, joined as the offline WikiText-2 is: CRLF
    normalised, the non-blank lines joined by blank lines (``"\n\n"``). Whole, in memory: for small
    files; the eval stage streams (``eval_corpus_windows``)."""
    return "".join(_corpus_pieces(check_corpus_file(path)))


def eval_corpus_windows(data_cfg: DictConfig | dict, corpus: str | None, tokenizer, seqlen: int,
                        max_windows: int | None = None) -> tuple[torch.Tensor, str, str]:
    """The evaluation windows of ``eval.corpus`` (a text file; None: WikiText-2 test), cut as
    ``wikitext2_windows`` cuts them (no BOS, non-overlapping, tail dropped); also the text's digest and
    the metric prefix: ``wikitext2``, or ``corpus`` for a user's file.

    A corpus is streamed: read ``CORPUS_READ`` bytes at a time and tokenized ``CORPUS_CHUNK``
    characters at a time (each piece cut before a row's ``"\n\n"``; a file under 1 MiB of text is one
    piece, exactly the one-pass tokenization), and tokenizing stops once ``max_windows`` windows are
    filled, so memory is the windows plus one piece whatever the file's size. The rest of the file is
    still read for the digest (sha256 of the whole joined text, as ``text_digest``)."""
    if corpus is None:
        windows, digest = wikitext2_windows(data_cfg, tokenizer, seqlen, max_windows)
        return windows, digest, "wikitext2"
    if seqlen < 2:
        raise PipelineError(f"eval.seqlen={seqlen}: must be at least 2")
    if max_windows is not None:
        check_max_windows(max_windows)
    need = None if max_windows is None else max_windows * seqlen
    digest, tokens, n_tokens, piece, size = hashlib.sha256(), [], 0, [], 0

    def flush() -> None:
        nonlocal n_tokens, piece, size
        if piece:
            ids = tokenize("".join(piece), tokenizer)
            tokens.append(ids)
            n_tokens += ids.numel()
        piece, size = [], 0

    for text in _corpus_pieces(check_corpus_file(corpus)):
        digest.update(text.encode())
        if need is not None and n_tokens >= need:
            continue  # the windows are full: only the digest still reads on
        if size + len(text) > CORPUS_CHUNK and piece:
            flush()
            if need is not None and n_tokens >= need:
                continue
        piece.append(text)
        size += len(text)
    flush()
    ids = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64)
    if ids.numel() < seqlen:
        raise PipelineError(f"eval.corpus={corpus}: {ids.numel()} tokens, fewer than one window of eval.seqlen={seqlen}")
    return eval_windows(ids, seqlen, max_windows), digest.hexdigest()[:16], "corpus"


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(n, seqlen)`` windows at random starts, deterministic by ``seed`` (the papers' calibration)."""
    if n < 1:
        raise PipelineError(f"calib.n_windows={n}: must be at least 1")
    if seqlen < 2:
        raise PipelineError(f"calib.seqlen={seqlen}: must be at least 2")
    if ids.numel() <= seqlen:
        raise PipelineError(f"calibration text has {ids.numel()} tokens, need more than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
