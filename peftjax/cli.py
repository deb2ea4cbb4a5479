"""The ``peftjax`` command line.

    peftjax train --model minilm --method lora --data rotten_tomatoes --steps 300 --out run/
    peftjax train --model smollm2 --method prefix --data moby_dick --seq-len 128 --out lm_run/
    peftjax eval --adapter run/                    # model, data and method options from run/
    peftjax merge --adapter run/ --out merged/     # base + adapter -> HF model directory
    peftjax export --adapter run/ --out hf_peft/   # adapter -> HF PEFT (PyTorch peft loads it)
    peftjax generate --model smollm2 --prompt "The whale"
    peftjax generate --adapter lm_run/ --prompt "The whale"   # with the trained LM adapter
    peftjax methods
    peftjax serve --model smollm2 --adapter sql=runs/sql   # OpenAI-compatible, many adapters
    peftjax merge-adapters --adapter runs/sql --adapter runs/poems --out mixed/  # 2 LoRAs -> 1

``train`` fine-tunes a real model on a real dataset with one PEFT method, shows a progress bar,
evaluates the base model (and, for classification, a trained linear head on the frozen model)
before, and prints a final comparison table. ``--out DIR`` keeps ``run.json`` (model, data, method
and its options: what ``eval``/``merge``/``export`` need), ``metrics.jsonl``, the result table
(``results.md``, ``results.json``), training checkpoints (``checkpoints/``, every
``--save-every`` steps; running the same command again resumes from the last one) and the
trained adapter (``adapter/``, :func:`peftjax.io.checkpoint.save_adapter`).

Models: ``minilm`` (all-MiniLM-L6-v2, BERT), ``smollm2`` (SmolLM2-135M-Instruct, Llama, GGUF),
an HF model directory or a ``.gguf`` file. Datasets: ``rotten_tomatoes`` or a ``.csv``/``.tsv``/
``.jsonl`` file (sentence classification, with an encoder), ``moby_dick`` or a ``.txt`` file
(language modelling, with a decoder).

User errors (a missing, unreadable, non-UTF-8 or truncated file, an unknown column, method or
model, an option that does not apply to the method, a bad value, an ``--out`` that is a file or
not writable) print one line ``peftjax CMD: error: ...`` and exit with code 2.

Nothing a user saved is overwritten: ``train``/``merge``/``export`` refuse an ``--out`` that holds
other files (``train``: or a finished or checkpointed run of another configuration), and never
write into the model or run directory they read, unless ``--overwrite`` (which never lifts the
second rule). SIGINT/SIGTERM during training finish the step, save a checkpoint and the adapter,
print how to resume and exit with 130/143; a rerun resumes from the newest checkpoint that reads.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import peftjax
from peftjax import methods
from peftjax.train import TrainConfig, evaluate, train

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------

class _UsageError(Exception):
  """A mistake in what the user asked for: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
  """Usage errors are one line (``peftjax train: error: ...``) and exit code 2."""

  def error(self, message):
    raise _UsageError(f"{self.prog}: error: {message}")


class _user_input:
  """``with _user_input():`` turns the ValueError/TypeError/FileNotFoundError of library code
  that checks what the user gave (method options, data files, model and run directories) into
  a one-line usage error. Only such calls run inside; anywhere else an exception is a bug and
  keeps its traceback."""

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if kind is not None and issubclass(kind, (ValueError, TypeError, FileNotFoundError,
                                              PermissionError)):
      raise _UsageError(_one_line(e)) from e
    return False


def _one_line(e: BaseException) -> str:
  """An exception as one line: its message, or for an OSError without one ``strerror: path``."""
  if isinstance(e, OSError) and e.strerror and e.filename:
    return f"{e.filename}: {e.strerror.lower()}"
  return str(e)


def _method(run: dict):
  with _user_input():
    return methods.get(run["method"])


def _sharding(text: str) -> str:
  """``--sharding``: dp, fsdp or a mesh spec (:func:`peftjax.models.sharding.mesh_shape`)."""
  if text in ("dp", "fsdp"):
    return text
  from peftjax.models.sharding import mesh_shape
  try:
    mesh_shape(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected dp, fsdp or a mesh: {e}") from None
  return text


def _arg_type(convert):
  """An argparse ``type`` from a method option's converter (its ValueError as argparse's)."""
  def parse(text):
    try:
      return convert(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return parse


_pos_int, _nonneg_int = _arg_type(methods.positive_int), _arg_type(methods.nonneg_int)
_fraction_arg = _arg_type(methods.fraction)
_pos_float, _nonneg_float = _arg_type(methods.positive_float), _arg_type(methods.nonneg_float)


def _method_options() -> dict:
  """``{option name: (Option, [methods])}`` over every registered method (shared names once)."""
  out = {}
  for m in methods.all_methods().values():
    for o in m.options:
      out.setdefault(o.name, (o, []))[1].append(m.name)
  return out


def _shown_default(name: str, owners: list) -> str:
  """`` (default: X)``, naming the methods whose own default differs (VeRA's rank)."""
  def fmt(d):
    return f"{d:g}" if isinstance(d, float) else f"{d}"
  per = {m: next(o.default for o in methods.get(m).options if o.name == name) for m in owners}
  values = [d for d in per.values() if d is not None and d is not False]
  if not values:
    return ""
  common = max(values, key=values.count)
  others = [f"{m} {fmt(d)}" for m, d in per.items() if d != common and d is not None]
  return f" (default: {fmt(common)}" + (f"; {', '.join(others)}" if others else "") + ")"


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _add_method_options(p):
  """One argument group per method for its own options, one for options several share."""
  opts = _method_options()
  groups: dict = {}
  for name, (o, owners) in opts.items():
    title = (f"{' / '.join(owners)} options" if len(owners) <= 3 else
             "options of several methods")
    groups.setdefault(title, []).append(name)
  for title, names in sorted(groups.items(), key=lambda kv: kv[0] == "options of several methods"):
    g = p.add_argument_group(title)
    for name in names:
      o, owners = opts[name]
      shown = _shown_default(name, owners)
      kw = (dict(action="store_const", const=True) if o.flag else
            dict(type=_arg_type(o.type)) if o.type is not None else {})
      if o.choices is not None:
        kw["choices"] = list(o.choices)
      g.add_argument(_flag(name), dest=name, default=None,
                     help=f"{o.help}{shown} [{', '.join(owners)}]", **kw)


_TRAIN_EPILOG = """examples:
  peftjax train --model minilm --method lora --data rotten_tomatoes --steps 300 --out run/
  peftjax train --model minilm --method prompt --n-tokens 20 --data reviews.csv \\
      --text-column review --label-column sentiment --out run/
  peftjax train --model smollm2 --method qlora --rank 16 --data moby_dick --steps 50 --seq-len 128
  peftjax train --model minilm --method diff_pruning --density 0.01 --data rotten_tomatoes

Options of another method are an error (--rank with --method ia3). Running the same command with
the same --out again resumes from the last checkpoint in OUT/checkpoints.
"""


def _add_data_args(p, *, train: bool):
  p.add_argument("--model", default=None if not train else "minilm",
                 help="minilm | smollm2 | HF dir | .gguf file" + (" (default: minilm)" if train
                                                                   else " (default: the run's)"))
  p.add_argument("--data", default=None if not train else "rotten_tomatoes",
                 help="rotten_tomatoes | FILE.csv/.tsv/.jsonl (classification); moby_dick | "
                      "FILE.txt (language model)" + (" (default: rotten_tomatoes)" if train
                                                     else " (default: the run's)"))
  p.add_argument("--eval-data", default=None,
                 help="evaluate on this file (default: a seeded 10%% held-out split of --data, or "
                      "the dataset's test split)")
  if train:
    p.add_argument("--validation", type=_fraction_arg, default=None, metavar="FRACTION",
                   help="evaluate on a held-out FRACTION of the training data instead of the "
                        "test split (choosing hyperparameters; the split does not depend on "
                        "--seed)")
  p.add_argument("--text-column", default=None, help="text column of a data file "
                                                     "(default: text)")
  p.add_argument("--label-column", default=None, help="label column of a data file "
                                                      "(default: label; strings or int ids)")
  p.add_argument("--seq-len", type=_pos_int, default=None,
                 help="max tokens per example / LM window (default: 64)")
  p.add_argument("--eval-limit", type=_nonneg_int, default=1024 if train else None,
                 help="held-out examples (0 = all; default: " +
                      ("1024)" if train else "the run's, else 1024)"))
  p.add_argument("--batch-size", type=_pos_int, default=None, help="default: 32 (classification),"
                                                                    " 4 (language model)")
  p.add_argument("--seed", type=int, default=None, help="default: 0")
  p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                 help="activation dtype; bfloat16 = mixed precision (parameters, gradients and "
                      "optimizer state stay float32, the loss is computed in float32); "
                      "default: float32" + ("" if train else ", or the run's"))


def _add_train_args(p):
  _add_data_args(p, train=True)
  p.add_argument("--method", default="lora", choices=methods.names(aliases=True),
                 metavar="METHOD", help="PEFT method: " + ", ".join(methods.names()) +
                 " (default: lora; see `peftjax methods`)")
  p.add_argument("--steps", type=_pos_int, default=300, help="optimizer steps (default: 300)")
  p.add_argument("--lr", type=_pos_float, default=None,
                 help="learning rate (default: the method's, e.g. 1e-3 LoRA, 5e-5 full)")
  p.add_argument("--warmup", type=_nonneg_int, default=20, help="warmup steps (default: 20)")
  p.add_argument("--grad-accum", type=_pos_int, default=1,
                 help="micro-batches per step (default: 1)")
  p.add_argument("--eval-every", type=_nonneg_int, default=0,
                 help="evaluate every N steps (default: 0, at the end only)")
  p.add_argument("--out", default=None, help="directory for run.json, metrics, results, "
                                             "checkpoints and the adapter")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an --out that holds other files or a run of another "
                      "configuration (that run's run.json, metrics, results, checkpoints and "
                      "adapter are removed; other files stay)")
  p.add_argument("--save-every", type=_pos_int, default=100,
                 help="checkpoint every N steps into OUT/checkpoints (default: 100)")
  p.add_argument("--sharding", type=_sharding, default="dp", metavar="dp|fsdp|MESH",
                 help="over all visible devices: data parallel (dp), FSDP parameters (fsdp), or "
                      "a (data, fsdp, tensor) mesh such as data=2,fsdp=-1,tensor=2 (tensor "
                      "parallelism on heads, MLP and vocabulary too; axes not named are 1, one "
                      "may be -1) (default: dp)")
  p.add_argument("--no-baseline", action="store_true", help="skip the head-only baseline")
  p.add_argument("--general-data", default=None, metavar="NAME|FILE.txt",
                 help="language models: also evaluate on this general text, never tuned on, "
                      "before and after training; its NLL after minus before is the "
                      "forgetting column. speeches (the 2012 US convention speeches) or a .txt "
                      "file")
  g = p.add_argument_group("several processes (docs/distributed.md); default: the environment "
                           "(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="process 0's address, the same in every process; 'auto': JAX detects "
                      "the cluster (TPU pod slice, SLURM, Open MPI, Kubernetes)")
  g.add_argument("--num-processes", type=_pos_int, default=None, help="processes in the run")
  g.add_argument("--process-id", type=_nonneg_int, default=None,
                 help="this process's index, 0 .. N-1")
  _add_method_options(p)


def _options_given(a, method) -> dict:
  """The method's option values (defaults filled in); an explicitly passed option that does not
  apply to ``method`` is an error."""
  for name, (_, owners) in _method_options().items():
    if getattr(a, name, None) is not None and method.name not in owners:
      raise _UsageError(f"peftjax {a.cmd}: error: {_flag(name)} does not apply to --method "
                        f"{method.name} (it applies to: {', '.join(owners)})")
  with _user_input():
    return method.option_values({o.name: getattr(a, o.name, None) for o in method.options})


# ------------------------------------------------------------------------------------------------
# runs: what train --out records, and rebuilding a tuned tree from it
# ------------------------------------------------------------------------------------------------

def _data_kind(data: str) -> str:
  if data == "rotten_tomatoes":
    return "classification"
  if data == "moby_dick":
    return "lm"
  suffix = Path(data).suffix.lower()
  if suffix in peftjax.data.TABLE_SUFFIXES:
    kind = "classification"
  elif suffix == ".txt":
    kind = "lm"
  else:
    raise _UsageError(f"unknown dataset {data!r}: use rotten_tomatoes, moby_dick, or a path to a "
                     f".csv/.tsv/.jsonl (classification) or .txt (language model) file")
  if not Path(data).is_file():
    raise _UsageError(f"data file {data} does not exist")
  return kind


_ENCODERS, _DECODERS = {"minilm"}, {"smollm2"}


def _check_model(model: str, kind: str):
  if kind == "classification" and model in _DECODERS:
    raise _UsageError(f"--model {model} is a decoder; sentence classification needs an encoder "
                     f"(BERT family, e.g. --model minilm)")
  if kind == "lm" and model in _ENCODERS:
    raise _UsageError(f"--model {model} is an encoder; language modelling needs a decoder "
                     f"(Llama family, e.g. --model smollm2)")
  from peftjax import tasks
  with _user_input():
    tasks.resolve_model(model)  # unknown names fail here, before any data is read


def _load_task(run: dict, *, eval_limit: int):
  """The task of a run: model and data loaded (the user's files: their errors are usage errors)."""
  with _user_input():
    return _task_of(run, eval_limit)


def _task_of(run: dict, eval_limit: int):
  from peftjax import tasks
  compute_dtype = jnp.dtype(run.get("compute_dtype") or "float32")
  if run["kind"] == "lm":
    return tasks.lm_task(run["model"], run["data"], batch_size=run["batch_size"],
                         seq_len=run["seq_len"], seed=run["seed"],
                         scan_layers=run.get("scan_layers", False),
                         eval_data=run.get("eval_data"), general=run.get("general_data"),
                         compute_dtype=compute_dtype, load=_load_kwargs(run))
  return tasks.classification_task(
      run["model"], run["data"], batch_size=run["batch_size"], max_len=run["seq_len"],
      seed=run["seed"], eval_limit=eval_limit or None, eval_data=run.get("eval_data"),
      compute_dtype=compute_dtype, validation=run.get("validation") or 0.0,
      load=_load_kwargs(run),
      text_column=run["text_column"], label_column=run["label_column"], labels=run.get("labels"))


def _with_head(tree, head_targets):
  """Makes the task's classification head train too (HF PEFT's ``modules_to_save``)."""
  if head_targets is None:
    return tree
  from peftjax import partial
  from peftjax._src import targeting
  head = re.compile(head_targets)
  # Leaves a method already made trainable (BitFit's head bias, full fine-tuning) stay as they are.
  pick = lambda p, x: bool(head.fullmatch(p)) and not peftjax.is_node(x)
  if not any(pick(p, x) for p, x in targeting.leaves_with_paths(tree)):
    return tree
  return partial.apply(tree, targets=pick)


def _tune(params, run: dict, model, head_targets) -> tuple:
  """``(tree, head added)``: the method's tree, with the head made trainable for classification
  unless the method trains it already, as ``train`` builds it."""
  method = _method(run)
  with _user_input():
    tuned = method.build(params, run["options"], model=model, key=jax.random.key(run["seed"]))
  if run["kind"] != "classification":
    return tuned, False
  headed = _with_head(tuned, head_targets)
  return headed, headed is not tuned


def _adapt(task, run: dict):
  method = _method(run)
  return task.adapt(forward=method.forward(task.model) if method.forward else None,
                    prepare=method.step_hook, penalty=method.bound_penalty(run["options"]))


def _read_run(path: str) -> tuple[dict, Path]:
  """``(run.json contents, adapter directory)`` of a ``train --out`` directory.

  Local paths in the record are absolute (``train`` resolves them); a relative one (as peftjax
  0.1 wrote them) is read relative to the directory the run recorded as its ``cwd``, or to
  this one; one found nowhere is kept in ``run["_unresolved"]`` for :func:`_need_paths`.
  """
  d = Path(path)
  if not d.exists():
    raise _UsageError(f"adapter directory {d} does not exist")
  for run_dir, adapter in ((d, d / ADAPTER_DIR), (d.parent, d)):
    f = run_dir / RUN_FILE
    if f.is_file():
      run = _read_run_file(f)
      if not (adapter / "manifest").exists():
        raise _UsageError(f"{d}: no trained adapter in {adapter} (did the training finish?)")
      run["_run_file"], run["_run_dir"] = str(f), str(run_dir.absolute())
      return run, adapter
  raise _UsageError(f"{d}: not a `peftjax train --out` directory (no {RUN_FILE})")


def _read_run_file(f: Path) -> dict:
  try:
    run = json.loads(f.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _UsageError(f"{f}: corrupt run file ({e})") from None
  if not isinstance(run, dict):
    raise _UsageError(f"{f}: corrupt run file (not a JSON object)")
  unresolved = {}
  for key in _PATH_KEYS:
    v = run.get(key)
    if not isinstance(v, str) or _is_name(key, v) or os.path.isabs(v):
      continue
    here = [Path(run["cwd"]) / v] if isinstance(run.get("cwd"), str) else []
    found = next((c for c in here + [Path(v)] if c.exists()), None)
    if found is None:
      unresolved[key] = v
    else:
      run[key] = os.path.abspath(found)
  run["_unresolved"] = unresolved
  return run


#: run.json keys that hold a registered name or a local path.
_PATH_KEYS = ("model", "data", "eval_data")
_DATASETS = ("rotten_tomatoes", "moby_dick")


def _is_name(key: str, value: str) -> bool:
  """A registered model or dataset name (or a ``package==version`` model), not a local path."""
  from peftjax import tasks
  if key == "model":
    return value in tasks.MODELS or ("==" in value and not Path(value).exists())
  if key == "general_data":
    return value in peftjax.data.GENERAL_TEXTS
  return value in _DATASETS


def _abs_path(key: str, value: Optional[str]) -> Optional[str]:
  """``value`` as run.json stores it: a name as it is, a local path made absolute."""
  if value is None or _is_name(key, value):
    return value
  return os.path.abspath(os.path.expanduser(value))


def _need_paths(run: dict, *keys):
  """Every local path the command needs from the run exists, or a one-line error naming it."""
  where = run.get("_run_file", RUN_FILE)
  flag = {"model": "--model", "data": "--data", "eval_data": "--eval-data"}
  for key in keys:
    v = run.get(key)
    if v is None:
      continue
    if run.get("_unresolved", {}).get(key) == v:
      raise _UsageError(f"{where} records {flag[key]} {v}, a path relative to the directory "
                        f"`peftjax train` ran in, and it is not found from here: run this "
                        f"command from that directory, or write the absolute path into {where}")
    if not _is_name(key, v) and not Path(v).exists():
      raise _UsageError(f"{where} records {flag[key]} {v}, which does not exist (moved or "
                        f"deleted?)")


# ------------------------------------------------------------------------------------------------
# output directories: a directory that holds something else is the user's
# ------------------------------------------------------------------------------------------------

#: What ``merge``/``export`` write beside their output: which command wrote it, from which run.
OUTPUT_MARKER = "peftjax_output.json"
#: What ``train --out`` writes (removed by ``--overwrite``; nothing else is touched).
_TRAIN_OUTPUTS = (RUN_FILE, "metrics.jsonl", "results.md", "results.json", CHECKPOINT_DIR,
                  ADAPTER_DIR)


def _writable_dir(out: Path):
  """``out`` is a directory (or can be created as one) that this process may write into."""
  if out.exists() and not out.is_dir():
    raise _UsageError(f"--out {out} is a file, not a directory; give a directory")
  p = out.absolute()
  while not p.exists():
    p = p.parent
  if not p.is_dir():
    raise _UsageError(f"--out {out}: {p} is a file, not a directory")
  if not os.access(p, os.W_OK | os.X_OK):
    raise _UsageError(f"--out {out}: cannot write into {p} (permission denied)")


def _inside(a: Path, b: Path) -> bool:
  a, b = a.resolve(), b.resolve()
  return a == b or b in a.parents


def _not_an_input(out: Path, inputs: dict):
  """``out`` is not (inside) a directory the command reads, nor a file it reads."""
  for what, p in inputs.items():
    if p is not None and Path(p).exists() and _inside(out, Path(p)):
      raise _UsageError(f"--out {out} is {'inside ' if out.resolve() != Path(p).resolve() else ''}"
                        f"{what} {p}, which this command reads; give another directory")


def _listing(d: Path, n: int = 3) -> str:
  names = sorted(x.name for x in d.iterdir())
  return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _output_dir(a, inputs: dict) -> Path:
  """``merge``/``export`` ``--out``: new, empty, or written by the same command before (its
  :data:`OUTPUT_MARKER`); anything else only with ``--overwrite``."""
  out = Path(a.out)
  _writable_dir(out)
  _not_an_input(out, inputs)
  if out.is_dir() and any(out.iterdir()) and not a.overwrite:
    try:
      mine = json.loads((out / OUTPUT_MARKER).read_text()).get("command") == a.cmd
    except (OSError, ValueError, AttributeError):
      mine = False
    if not mine:
      raise _UsageError(f"--out {out} is a directory that holds other files ({_listing(out)}); "
                        f"give a new or empty directory, or --overwrite to write into it")
  return out


def _mark_output(out: Path, a, run: dict, **extra):
  (out / OUTPUT_MARKER).write_text(json.dumps(
      {"command": a.cmd, "adapter": run.get("_run_dir"), "model": run["model"],
       "method": run["method"], **extra, "peftjax_version": peftjax.__version__}, indent=2) + "\n")


def _head_targets(run: dict) -> str:
  """The classification head of the run's model, as ``tasks.classification_task`` chose it."""
  from peftjax import tasks
  return tasks.classification_head(tasks.resolve_model(run["model"]))


def _restored(run: dict, adapter: Path, params, model):
  from peftjax.io.checkpoint import restore_adapter
  if _method(run).refine is not None:
    template = params  # the refine stage changed the nodes: rebuild them from the manifest
  else:
    template, _ = _tune(params, run, model, _head_targets(run))
  with _user_input():
    return restore_adapter(adapter, template)


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

def _table(rows: list[dict], cols: list[str]) -> str:
  w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
  line = lambda vals: "| " + " | ".join(str(v).ljust(w[c]) for c, v in zip(cols, vals)) + " |"
  out = [line(cols), "|" + "|".join("-" * (w[c] + 2) for c in cols) + "|"]
  out += [line([r.get(c, "") for c in cols]) for r in rows]
  return "\n".join(out)


def _step_seconds(history: list) -> Optional[float]:
  """Seconds per step between the first and the last logged training step.

  The first logged step includes compilation and the last evaluation comes after the last one,
  so neither is counted. None when fewer than two steps were logged.
  """
  steps = [r for r in history if "elapsed_s" in r]
  if len(steps) < 2 or steps[-1]["step"] <= steps[0]["step"]:
    return None
  return (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (steps[-1]["step"] - steps[0]["step"])


def _row(name, tree, metrics, lm: bool, step_s: Optional[float] = None,
         general: Optional[tuple] = None) -> dict:
  """A results row; ``general``: ``(nll, base nll or None)`` on the general text."""
  s = peftjax.summary(tree)
  r = {"model": name, "trainable": f"{s.trainable:,}", "trainable %": f"{100 * s.fraction:.3f}"}
  if lm:
    r["held-out nll"] = f"{metrics['nll']:.4f}"
    r["perplexity"] = f"{math.exp(metrics['nll']):.2f}"
    if general is not None:
      nll, before = general
      r["general nll"] = f"{nll:.4f}"
      r["forgetting"] = "-" if before is None else f"{nll - before:+.4f}"
  else:
    r["test accuracy"] = f"{100 * metrics['accuracy']:.2f}%"
    r["test loss"] = f"{metrics['loss']:.4f}"
  r["s/step"] = "-" if step_s is None else f"{step_s:.3f}"
  return r


def _run_record(a) -> dict:
  method = methods.get(a.method)
  kind = _data_kind(a.data)
  if a.eval_data is not None:
    _data_kind(a.eval_data)
  _check_model(a.model, kind)
  if kind == "lm" and (a.text_column is not None or a.label_column is not None):
    raise _UsageError(f"peftjax {a.cmd}: error: --text-column/--label-column apply to "
                      f"classification data files, not {a.data}")
  if a.general_data is not None:
    if kind != "lm":
      raise _UsageError(f"peftjax {a.cmd}: error: --general-data measures a language model's "
                        f"forgetting; {a.data} is classification data")
    if not _is_name("general_data", a.general_data):
      if Path(a.general_data).suffix.lower() != ".txt":
        raise _UsageError(f"peftjax {a.cmd}: error: --general-data {a.general_data}: expected "
                          f"{', '.join(peftjax.data.GENERAL_TEXTS)} or a .txt file")
      if not Path(a.general_data).is_file():
        raise _UsageError(f"peftjax {a.cmd}: error: --general-data {a.general_data} does not "
                          f"exist")
  if a.validation is not None and (kind == "lm" or a.eval_data is not None):
    raise _UsageError(f"peftjax {a.cmd}: error: --validation holds out part of classification "
                      f"training data; it cannot be used with "
                      f"{'--eval-data' if a.eval_data is not None else 'language-model data'}")
  # Local paths are stored absolute, so eval/merge/export of the run work from any directory.
  return {"model": _abs_path("model", a.model), "data": _abs_path("data", a.data),
          "eval_data": _abs_path("eval_data", a.eval_data), "kind": kind,
          "general_data": _abs_path("general_data", a.general_data),
          "validation": a.validation,
          "method": method.name, "options": _options_given(a, method),
          "seed": 0 if a.seed is None else a.seed,
          "seq_len": a.seq_len or 64,
          "compute_dtype": a.compute_dtype or "float32",
          "batch_size": a.batch_size or (4 if kind == "lm" else 32),
          # Language models run with their layers stacked (nn.scan): one compiled layer instead
          # of num_layers copies (SmolLM2, 30 layers: peak memory 1.87 -> 1.57 GB, the 2-step
          # run 138 -> 92 s). Runs saved without the key were unstacked, and stay so.
          "scan_layers": kind == "lm",
          "text_column": a.text_column or "text", "label_column": a.label_column or "label",
          "cwd": os.getcwd(), "peftjax_version": peftjax.__version__}


_SAME_RUN = ("model", "data", "eval_data", "general_data", "validation", "method", "options",
             "seed", "seq_len", "batch_size", "text_column", "label_column")
BASELINE_FILE = "baseline.json"


def _saved_steps(ckpt_dir: Path) -> list[int]:
  """The committed checkpoint steps in ``ckpt_dir`` (orbax step directories)."""
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())


def _clear_run(out: Path):
  """Removes what ``train --out`` writes (and nothing else) from ``out``."""
  import shutil
  for name in _TRAIN_OUTPUTS + (BASELINE_FILE,):
    p = out / name
    if p.is_dir() and not p.is_symlink():
      shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
      p.unlink()


def _train_out(a, run: dict) -> Optional[Path]:
  """Checks ``train --out`` before anything loads: a new or empty directory, the same run again
  (resumed from its last checkpoint), a run of any configuration that never saved a step
  (started over), or anything with ``--overwrite``. A finished or checkpointed run of another
  configuration, and a directory of other files, are refused."""
  if not a.out:
    return None
  out = Path(a.out)
  _writable_dir(out)
  model = run["model"] if not _is_name("model", run["model"]) else None
  _not_an_input(out, {"the model directory": model})
  if not out.is_dir() or not any(out.iterdir()):
    return out
  prev = out / RUN_FILE
  if a.overwrite:
    _clear_run(out)
    return out
  if not prev.is_file():
    raise _UsageError(f"--out {out} holds other files ({_listing(out)}) and no {RUN_FILE}: it "
                      f"is not a `peftjax train --out` directory; give a new or empty directory, "
                      f"or --overwrite to write the run into it")
  old = _read_run_file(prev)
  diff = [k for k in _SAME_RUN if old.get(k) != run.get(k)]
  steps = _saved_steps(out / CHECKPOINT_DIR)
  finished = (out / ADAPTER_DIR / "manifest").exists()
  if diff and (steps or finished):
    raise _UsageError(f"{out} holds {'a finished' if finished else 'the checkpoints of a'} run "
                      f"of another configuration ({', '.join(diff)} differ; it has "
                      f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use another --out, or "
                      f"--overwrite to replace that run")
  if not steps:
    _clear_run(out)  # nothing to resume: the run starts over (its old metrics would mislead)
  else:
    run["scan_layers"] = old.get("scan_layers", False)  # the checkpoints' layout
  return out


class _Stopped(Exception):
  """A signal ended the command after saving what there was: one line, exit code ``code``."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


def _interrupted(a, e, out: Optional[Path]) -> _Stopped:
  """Saves the adapter of an interrupted training (its checkpoint is written) and says how to
  resume."""
  import signal
  name = signal.Signals(e.signum).name
  if out is None:
    return _Stopped(f"peftjax train: {name} at step {e.step}/{a.steps}: nothing saved (no --out)",
                    128 + e.signum)
  from peftjax.io.checkpoint import save_adapter
  save_adapter(out / ADAPTER_DIR, e.result.params, force=True)
  return _Stopped(f"peftjax train: {name} at step {e.step}/{a.steps}: saved checkpoint "
                  f"{e.checkpoint} and the adapter to {out / ADAPTER_DIR}; run the same command "
                  f"again to resume", 128 + e.signum)


def _train_method(method, run: dict, task, mtask, tuned, cfg):
  """``train`` with the method's learning-rate multipliers and, when it has one, its refine stage
  (the first ``steps - n`` steps, the transform, then ``n`` steps on the result without the
  penalty, checkpointed in ``checkpoints/refine``); the result's metrics are the final tree's."""
  options = method.option_values(run["options"])
  if method.lr_scales is not None:
    cfg = dataclasses.replace(cfg, field_lr_scales=method.lr_scales(options, cfg.learning_rate))
  report = lambda tree: (method.report is not None and
                         print(method.report(tree, run["options"]), file=sys.stderr))
  if method.refine is None:
    res = train(mtask.loss_fn, tuned, mtask.train_loader, cfg, eval_fn=mtask.eval_fn,
                eval_data=mtask.eval_batches)
    report(res.params)
    return res
  n = method.refine_steps(cfg.steps, run["options"])
  first = dataclasses.replace(cfg, steps=cfg.steps - n, warmup_steps=min(cfg.warmup_steps,
                                                                          cfg.steps - n - 1))
  res = train(mtask.loss_fn, tuned, mtask.train_loader, first)
  report(res.params)
  refined = method.refine.transform(res.params, options)
  if n == 0:
    metrics = evaluate(mtask.eval_fn, refined, mtask.eval_batches())
    res = res._replace(params=refined, eval_metrics=metrics)
  else:
    rtask = task.adapt(forward=mtask.forward, prepare=method.step_hook)
    second = dataclasses.replace(
        cfg, steps=n, learning_rate=(method.refine.learning_rate and
                                     method.refine.learning_rate(options)) or cfg.learning_rate,
        field_lr_scales=None, warmup_steps=min(cfg.warmup_steps, n - 1),
        label=f"{cfg.label} (refine)",
        checkpoint_dir=cfg.checkpoint_dir and os.path.join(cfg.checkpoint_dir, "refine"))
    res2 = train(rtask.loss_fn, refined, mtask.train_loader, second, eval_fn=mtask.eval_fn,
                 eval_data=mtask.eval_batches)
    last = res.history[-1] if res.history else {}
    shift = lambda r: {**r, **{k: r[k] + last[k] for k in ("step", "elapsed_s")
                               if k in r and k in last}}
    res = res2._replace(history=res.history + [shift(r) for r in res2.history])
  report(res.params)
  return res


def _start_processes(a) -> bool:
  """Starts JAX's distributed runtime when flags or the environment ask for several processes;
  returns whether this is process 0 (the one that writes run files and prints)."""
  from peftjax.train import distributed as dist
  if not dist.requested(a.coordinator, a.num_processes, a.process_id):
    return True
  try:
    dist.initialize(a.coordinator, a.num_processes, a.process_id)
  except ValueError as e:
    raise _UsageError(str(e)) from None
  return dist.is_main()


def cmd_train(a) -> dict:
  import contextlib
  if _start_processes(a):
    return _cmd_train(a, True)
  with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
      contextlib.redirect_stderr(null):  # only process 0 prints
    return _cmd_train(a, False)


def _check_mesh(spec: str):
  """A ``--sharding`` mesh that does not fit the devices: said before anything loads."""
  if spec in ("dp", "fsdp"):
    return
  from peftjax.train import _placement
  try:
    _placement(spec)
  except ValueError as e:
    raise _UsageError(str(e).replace(f"TrainConfig.sharding {spec!r}", f"--sharding {spec}") +
                      f" (JAX sees {jax.device_count()} device(s))") from None


def _cmd_train(a, main: bool) -> dict:
  from peftjax.train import TrainInterrupted
  from peftjax.train import distributed as dist
  run = _run_record(a)
  method = _method(run)
  lr = a.lr = a.lr or method.default_learning_rate(run["options"])  # results.json: the rate used
  if a.warmup >= a.steps and a.warmup:
    a.warmup = a.steps - 1
  if run["batch_size"] % a.grad_accum:
    raise _UsageError(f"--batch-size {run['batch_size']} is not divisible by --grad-accum "
                     f"{a.grad_accum}")
  _check_mesh(a.sharding)
  # several processes: process 0 checks (and may clear) --out, on a filesystem they all share
  out = _train_out(a, run) if main else (Path(a.out) if a.out else None)
  dist.sync("peftjax_train_out")
  ckpt_dir = out / CHECKPOINT_DIR if out is not None else None
  lm = run["kind"] == "lm"
  t0 = time.perf_counter()
  task = _load_task(run, eval_limit=a.eval_limit)
  run["labels"], run["eval_limit"] = task.labels, a.eval_limit
  if dist.multi_process() and hasattr(task.train_loader, "process_count"):
    # each process builds only its rows of every global batch
    if run["batch_size"] % jax.process_count():
      raise _UsageError(f"--batch-size {run['batch_size']} is not divisible by the "
                        f"{jax.process_count()} processes")
    task.train_loader.process_index = jax.process_index()
    task.train_loader.process_count = jax.process_count()
  print(f"loaded {a.model} and {a.data} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
  if out is not None and main:
    with _user_input():
      out.mkdir(parents=True, exist_ok=True)
      (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
  cfg = TrainConfig(steps=a.steps, learning_rate=lr, warmup_steps=min(a.warmup, a.steps - 1),
                    grad_accum=a.grad_accum, eval_every=a.eval_every, seed=run["seed"],
                    out_dir=a.out, log_every=10, sharding=a.sharding,
                    checkpoint_dir=str(ckpt_dir) if ckpt_dir else None,
                    save_every=a.save_every)
  # The baseline rows of a resumed run are the ones its first start computed.
  baseline = out / BASELINE_FILE if out is not None else None
  rows = None
  if baseline is not None and baseline.is_file() and _saved_steps(ckpt_dir):
    try:
      rows = json.loads(baseline.read_text())["rows"]
      print(f"baseline from {baseline} (computed when the run started)", file=sys.stderr)
    except (ValueError, KeyError, TypeError):
      rows = None
  if rows is None:
    rows = _baseline_rows(a, task, cfg, lm)
    if baseline is not None and main:
      baseline.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
  tuned, with_head = _tune(task.params, run, task.model, task.head_targets)
  if with_head and _trains_pooler(task):
    print("the model is a sentence-transformers checkpoint, whose BERT pooler never trained: the "
          "pooler trains with the classifier head", file=sys.stderr)
  mtask = _adapt(task, run)
  print(peftjax.summary(tuned).table(max_rows=15), file=sys.stderr)
  try:
    res = _train_method(method, run, task, mtask, tuned,
                        dataclasses.replace(cfg, handle_signals=True, label=method.name))
  except TrainInterrupted as e:
    raise _interrupted(a, e, out) from None
  general = _general_nll(task, mtask.eval_fn, res.params, cfg)
  if general is not None:
    general = (general, float(rows[0]["general nll"]))
  rows.append(_row(method.name + (" + head" if with_head else ""), res.params,
                   res.eval_metrics, lm, _step_seconds(res.history), general))
  table = _table(rows, list(rows[0]))
  print("\n" + table)
  if out is not None:
    from peftjax.io.checkpoint import save_adapter
    if main:
      with open(out / "results.md", "w") as f:
        f.write(table + "\n")
      with open(out / "results.json", "w") as f:
        json.dump({"args": vars(a), "run": run, "rows": rows}, f, indent=2, default=str)
    save_adapter(out / ADAPTER_DIR, res.params, force=True)  # every process: its shards
    print(f"saved the adapter to {out / ADAPTER_DIR}", file=sys.stderr)
  return {"rows": rows, "result": res}


def _trains_pooler(task) -> bool:
  return bool(task.head_targets and re.fullmatch(task.head_targets, "pooler/dense/kernel")
              and "pooler" in task.params)


def _general_nll(task, eval_fn, tree, cfg) -> Optional[float]:
  """``tree``'s NLL on the task's general text (``--general-data``), or None without one."""
  if task.general_batches is None:
    return None
  return evaluate(eval_fn, tree, task.general_batches(),
                  label="general text eval" if cfg.progress else None)["nll"]


def _baseline_rows(a, task, cfg, lm: bool) -> list[dict]:
  """The base model's row and, for classification, the linear probe's."""
  rows = []
  base_metrics = evaluate(task.eval_fn, task.params, task.eval_batches(),
                          label="base model eval" if cfg.progress else None)
  general = _general_nll(task, task.eval_fn, task.params, cfg)
  rows.append(_row("base model" + ("" if lm else " (untrained head)"), task.params, base_metrics,
                   lm, general=None if general is None else (general, None)))
  if not lm and not a.no_baseline:
    probe = _with_head(task.params, task.head_targets)
    probe_loader = copy.copy(task.train_loader)  # its own position: the method starts afresh
    probe_loader.restore({"epoch": 0, "index": 0})
    res = train(task.loss_fn, probe, probe_loader,
                dataclasses.replace(cfg, out_dir=None, checkpoint_dir=None, learning_rate=1e-3,
                                    label="head only"),
                eval_fn=task.eval_fn, eval_data=task.eval_batches)
    kind = "pooler + classifier" if _trains_pooler(task) else "linear probe"
    rows.append(_row(f"base + trained head ({kind})", res.params, res.eval_metrics, lm,
                     _step_seconds(res.history)))
  return rows


# ------------------------------------------------------------------------------------------------
# eval / merge / export
# ------------------------------------------------------------------------------------------------

def _eval_run(a) -> tuple[dict, Optional[Path]]:
  if a.adapter:
    run, adapter = _read_run(a.adapter)
    # the run's own paths must still be there (those given on the command line replace them)
    _need_paths(run, *(k for k in _PATH_KEYS if getattr(a, k, None) is None and
                       (k != "eval_data" or a.data is None)))
  else:
    if a.model is None or a.data is None:
      raise _UsageError("peftjax eval: error: give --adapter DIR (a `peftjax train --out` "
                        "directory), or --model and --data to evaluate a base model")
    run, adapter = {"method": None, "options": {}, "seed": 0, "labels": None}, None
  for k in ("model", "data", "eval_data", "text_column", "label_column", "seq_len", "batch_size",
            "seed", "compute_dtype"):
    v = getattr(a, k, None)
    if v is not None:
      run[k] = v
  if a.data is not None and a.adapter and a.eval_data is None:
    # a new dataset: evaluate on its held-out part (or the test split)
    run["eval_data"] = None
  run["kind"] = _data_kind(run["data"])
  if run.get("eval_data"):
    _data_kind(run["eval_data"])
  _check_model(run["model"], run["kind"])
  run.setdefault("text_column", "text")
  run.setdefault("label_column", "label")
  run["seq_len"] = run.get("seq_len") or 64
  run["batch_size"] = run.get("batch_size") or (4 if run["kind"] == "lm" else 32)
  return run, adapter


def cmd_eval(a) -> dict:
  run, adapter = _eval_run(a)
  lm = run["kind"] == "lm"
  limit = a.eval_limit if a.eval_limit is not None else run.get("eval_limit", 1024)
  with _head_from_adapter(adapter is not None):
    task = _load_task(run, eval_limit=limit)
  if adapter is None:
    name, tree = "base model" + ("" if lm else " (untrained head)"), task.params
  else:
    tree = _restored(run, adapter, task.params, task.model)
    task = _adapt(task, run)
    name = f"{run['method']} ({adapter})"
  metrics = evaluate(task.eval_fn, tree, task.eval_batches())
  row = _row(name, tree, metrics, lm)
  row.pop("s/step")
  print(_table([row], list(row)))
  return {"rows": [row], "metrics": metrics}


class _head_from_adapter:
  """While loading the base of a run, the loader's "initialized classifier/..." warning is
  not shown: the adapter restores the trained head over the initialized one."""

  def __init__(self, active: bool = True):
    self.active = active

  def filter(self, record) -> bool:
    return not str(record.msg).startswith("%s: initialized")

  def __enter__(self):
    if self.active:
      logging.getLogger("peftjax.io").addFilter(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("peftjax.io").removeFilter(self)
    return False


def _load_model(run: dict):
  from peftjax import tasks
  from peftjax.io.hf import from_pretrained
  _need_paths(run, "model")
  with _user_input(), _head_from_adapter():
    path = tasks.resolve_model(run["model"])
    # as _task_of loads it for training: a QLoRA base dequantizes to the run's compute dtype
    compute_dtype = jnp.dtype(run.get("compute_dtype") or "float32")
    if run["kind"] == "classification":
      return from_pretrained(path, task="sequence-classification",
                             num_labels=len(run["labels"]), key=jax.random.key(run["seed"]),
                             compute_dtype=compute_dtype, **_load_kwargs(run))
    return from_pretrained(path, scan_layers=run.get("scan_layers", False),
                           compute_dtype=compute_dtype, **_load_kwargs(run))


def _load_kwargs(run: dict) -> dict:
  """The run's method's loading keywords (``Method.load``: QLoRA quantizes while loading); none
  for a base-model run (no method)."""
  if run.get("method") is None:
    return {}
  load = _method(run).load_kwargs(run.get("options"))
  if "dtype" in load:
    load["dtype"] = jnp.dtype(load["dtype"])
  return load


def _outputs_inputs(run: dict) -> dict:
  """What ``merge``/``export`` read, which their ``--out`` must not be (inside)."""
  from peftjax import tasks
  inputs = {"the run directory": run.get("_run_dir")}
  if not _is_name("model", run["model"]):
    inputs["the base model"] = run["model"]
  elif run["model"] in tasks.MODELS:
    with _user_input():
      inputs["the base model"] = str(tasks.resolve_model(run["model"]))
  return inputs


def cmd_merge(a):
  from peftjax.io.export import export_merged
  run, adapter = _read_run(a.adapter)
  method = _method(run)
  if not method.mergeable:
    alt = ("; `peftjax export --adapter RUN --out DIR` writes it in Hugging Face PEFT format"
           if method.hf_peft_type else
           "; generate/eval use it with the base as it is (`peftjax eval --adapter RUN`)")
    raise _UsageError(f"--method {method.name} ({method.description}) has no merged form: no "
                      f"weight holds what it adds{alt}")
  _need_paths(run, "model")
  out = _output_dir(a, _outputs_inputs(run))
  model, params, tok = _load_model(run)
  tuned = _restored(run, adapter, params, model)
  with _user_input():
    path = export_merged(tuned, model, out, tokenizer=tok,
                         dtype=None if a.dtype is None else jnp.dtype(a.dtype))
    if run["kind"] == "classification" and run.get("labels"):
      _write_labels(path, run["labels"])
    _mark_output(path, a, run)
  print(f"wrote the merged model ({run['model']} + {method.name}) to {path}")
  return path


def _write_labels(path: Path, labels: list):
  """The run's class names as the merged config's ``id2label``/``label2id``."""
  f = path / "config.json"
  cfg = json.loads(f.read_text())
  cfg["id2label"] = {str(i): str(n) for i, n in enumerate(labels)}
  cfg["label2id"] = {str(n): i for i, n in enumerate(labels)}
  f.write_text(json.dumps(cfg, indent=2))


def cmd_export(a):
  from peftjax import lora_init, tasks
  from peftjax.io.hf_peft import save_hf_peft
  run, adapter = _read_run(a.adapter)
  method = _method(run)
  if method.hf_peft_type is None:
    can = [m.name for m in methods.all_methods().values() if m.hf_peft_type]
    alt = ("`peftjax merge --adapter RUN --out DIR` writes the merged model" if method.mergeable
           else "it has no merged form either; `peftjax eval --adapter RUN` uses the run as it is")
    raise _UsageError(f"--method {method.name} has no Hugging Face PEFT format (export writes "
                      f"{', '.join(can)}); {alt}")
  _need_paths(run, "model")
  init = (run.get("options") or {}).get("init")
  if init == "loftq":
    raise _UsageError("a LoftQ run's adapter fits its own quantized base, which HF PEFT does not "
                      "rebuild from the original model; `peftjax merge --adapter RUN --out DIR` "
                      "writes the model as trained")
  out = _output_dir(a, _outputs_inputs(run))
  model, params, tok = _load_model(run)
  tuned = peftjax.as_tuned(_restored(run, adapter, params, model))
  if lora_init.modifies_base(init):
    # PiSSA/OLoRA trained on a residual base: saved as a rank-2r LoRA on the original weights,
    # as HF PEFT saves them (the initial adapter is rebuilt from the run's seed)
    initial, _ = _tune(params, run, model, _head_targets(run))
    tuned = tuned.replace(params=lora_init.convert_to_lora(
        tuned.params, peftjax.as_tuned(initial).params, params))
  head = {}
  if run["kind"] == "classification":
    # The trained head is HF PEFT's modules_to_save: written beside the adapter, as plain weights.
    from peftjax._src import targeting
    pat = re.compile(_head_targets(run))
    head = {p: peftjax.merge(x) for p, x in targeting.leaves_with_paths(tuned.params)
            if pat.fullmatch(p) and peftjax.is_node(x)}
    tuned = tuned.replace(params=targeting.map_selected(lambda p, x: head[p], tuned.params,
                                                        set(head)))
  if method.finalize is not None:
    tuned = method.finalize(tuned)
  with _user_input():
    path = save_hf_peft(tuned, out, base_model_name_or_path=run["model"], modules_to_save=[
        next(c for c in p.split("/") if c in tasks.HEAD_MODULES) for p in head] or "auto")
    _mark_output(path, a, run)
  print(f"wrote the HF PEFT adapter ({method.name}) to {path}")
  return path


# ------------------------------------------------------------------------------------------------
# generate / methods / main
# ------------------------------------------------------------------------------------------------

def cmd_generate(a):
  from peftjax import tasks
  from peftjax.io.hf import from_pretrained
  if a.chat and a.raw:
    raise _UsageError("peftjax generate: error: --chat and --raw contradict each other")
  if a.adapter:
    run, adapter = _read_run(a.adapter)
    if run["kind"] != "lm":
      raise _UsageError(f"{a.adapter} holds a {run['kind']} run ({run['model']}); generate needs "
                        f"a language-model adapter")
    if a.model is not None and a.model != run["model"]:
      raise _UsageError(f"{a.adapter} was trained on --model {run['model']}, not {a.model}")
    method = _method(run)
    if not method.mergeable and method.forward is None:
      raise _UsageError(f"--method {method.name} has no merged form and no generation path; "
                        f"use lora, prompt, prefix, ... for generation")
    model, params, tok = _load_model(run)
    tree = _restored(run, adapter, params, model)
    if method.finalize is not None:
      tree = method.finalize(tree)
    if method.mergeable:  # plain weights decode fastest
      tree = peftjax.merge(tree)
  else:
    with _user_input():
      model, tree, tok = from_pretrained(tasks.resolve_model(a.model or "smollm2"))
  text = a.prompt
  # A run trained on raw text (every `peftjax train` language-model run) continues raw text: the
  # chat template only with --chat; the base model alone gets it unless --raw.
  chat = a.chat if a.chat is not None else not (a.adapter or a.raw)
  if getattr(tok, "chat_template", None) and chat:
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False,
                                   add_generation_prompt=True)
  ids = jnp.asarray(np.asarray(tok(text)["input_ids"], np.int32)[None])
  out = peftjax.generate(model, tree, ids, max_new_tokens=a.max_new_tokens,
                         temperature=a.temperature, key=jax.random.key(a.seed),
                         stop_tokens=[tok.eos_token_id] if tok.eos_token_id is not None else None)
  seq = np.asarray(out.tokens)[0][:int(np.asarray(out.lengths)[0])]
  text = tok.decode(seq, skip_special_tokens=True)
  print(text)
  return text


def _serve_adapters(specs: list) -> dict:
  """``--adapter NAME=DIR`` options as ``{name: directory}``: an HF PEFT directory, a peftjax
  adapter checkpoint, or a `peftjax train --out` directory (its adapter/)."""
  from peftjax import multi
  out = {}
  for spec in specs or ():
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise _UsageError(f"--adapter {spec!r}: expected NAME=DIR")
    with _user_input():
      multi._check_name(name)
    if name in out:
      raise _UsageError(f"--adapter {name!r} is given twice")
    d = Path(path)
    if not d.is_dir():
      raise _UsageError(f"--adapter {name}={path}: no such adapter directory")
    if (d / RUN_FILE).is_file() and (d / ADAPTER_DIR).is_dir():
      d = d / ADAPTER_DIR
    out[name] = d
  return out


def cmd_serve(a):
  from peftjax import multi, serve, tasks
  from peftjax.io.hf import from_pretrained
  if a.max_len < 2:
    raise _UsageError(f"--max-len must be at least 2, got {a.max_len}")
  sources = _serve_adapters(a.adapter)
  base_name = a.served_model_name or (a.model if a.model in tasks.MODELS else Path(a.model).name)
  if base_name in sources:
    raise _UsageError(f"--adapter {base_name!r} has the base model's name; rename it")
  with _user_input():
    path = tasks.resolve_model(a.model)
    model, params, tok = from_pretrained(path, quantize=a.quantize,
                                         scan_layers=_served_layout(sources))
  if tok is None:
    raise _UsageError(f"{a.model}: the model has no tokenizer; serve needs one to read prompts "
                      f"and write text")
  if a.max_len > model.config.max_position_embeddings:
    raise _UsageError(f"--max-len {a.max_len} is longer than the model's context "
                      f"({model.config.max_position_embeddings} positions)")
  tree = params
  if sources:
    with _user_input():
      trees = {n: _read_onto(params, d) for n, d in sources.items()}
      ranks = [x.rank for t in trees.values() for x in jax.tree_util.tree_leaves(
          t, is_leaf=peftjax.is_node) if isinstance(x, peftjax.lora.LoraWeight)]
      max_rank = a.max_lora_rank or max([16, *ranks])
      slots = (a.max_loras or max(4, len(trees))) + 1
      tree = multi.stack(trees, slots=slots, max_rank=max_rank)
  with _user_input():
    engine = serve.Engine(model, tree, tok, base_name=base_name, slots=a.slots,
                          max_len=a.max_len, seed=a.seed)
  print(f"peftjax serve: {base_name} with adapters {list(sources) or 'none'}: {a.slots} slots "
        f"of {a.max_len} tokens on http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
  serve.serve(engine, host=a.host, port=a.port, log_level=a.log_level)


def _served_layout(sources: dict) -> bool:
  """``scan_layers`` for the served base: the layout the adapters were saved on (one for all)."""
  from peftjax import multi
  with _user_input():
    layouts = {n: multi.saved_layout(d) for n, d in sources.items()}
  stacked = sorted(n for n, v in layouts.items() if v)
  per_layer = sorted(n for n, v in layouts.items() if v is False)
  if stacked and per_layer:
    raise _UsageError(f"--adapter {', '.join(stacked)} {'was' if len(stacked) == 1 else 'were'} "
                      f"saved on stacked layers (a scan_layers model, as `peftjax train` trains "
                      f"language models) and {', '.join(per_layer)} per layer; serve adapters "
                      f"of one layout at a time")
  return bool(stacked)


def _read_onto(params, d: Path):
  """An adapter directory (HF PEFT or a peftjax checkpoint) read onto the base ``params``."""
  from peftjax.io.checkpoint import restore_adapter
  from peftjax.io.hf_peft import ADAPTER_CONFIG, load_hf_peft
  if (d / ADAPTER_CONFIG).is_file():
    return load_hf_peft(d, params)
  return restore_adapter(d, params)


def _merged_model(a, sources: dict) -> str:
  """The base model of ``merge-adapters``: ``--model``, or the one every adapter records (a
  train run's ``run.json``, an HF PEFT ``base_model_name_or_path`` that is a local model)."""
  from peftjax import tasks
  from peftjax.io.hf_peft import ADAPTER_CONFIG
  if a.model is not None:
    return a.model
  seen = {}
  for name, d in sources.items():
    run_file = d.parent / RUN_FILE if d.name == ADAPTER_DIR else d / RUN_FILE
    base = None
    if run_file.is_file():
      base = _read_run_file(run_file).get("model")
    elif (d / ADAPTER_CONFIG).is_file():
      try:
        base = json.loads((d / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
      except (OSError, ValueError, AttributeError):
        base = None
      if base is not None and base not in tasks.MODELS and not Path(base).exists():
        base = None  # a hub id: not available offline
    if base is None:
      raise _UsageError(f"--adapter {name}={d}: the adapter does not say which model it was "
                        f"trained on (as a model here); give --model")
    seen.setdefault(base, []).append(name)
  if len(seen) > 1:
    raise _UsageError("the adapters were trained on different models (" + "; ".join(
        f"{', '.join(n)}: {m}" for m, n in seen.items()) + "); merge adapters of one base model")
  return next(iter(seen))


def _merge_options_apply(a):
  """``--density``/``--rank``/``--majority-sign`` given to a ``--method`` that would ignore them:
  a usage error, not a silently different merge."""
  m = a.method
  if a.density is not None and m in ("cat", "svd", "linear"):
    raise _UsageError(f"--density does not apply to --method {m} (it keeps every entry); the "
                      f"methods that prune are ties, dare_*, magnitude_prune and their _svd forms")
  if a.rank is not None and not m.endswith("svd"):
    raise _UsageError(f"--rank does not apply to --method {m} (only the *svd methods choose the "
                      f"merged rank)")
  if a.majority_sign is not None and "ties" not in m:
    raise _UsageError(f"--majority-sign does not apply to --method {m} (only the ties methods "
                      f"elect signs)")


def _merged_runs_are_plain_lora(sources: dict):
  """The adapters that are `peftjax train --out` runs are LoRA on a language model's own weights:
  a PiSSA/OLoRA/LoftQ run's factors belong to a changed base, and merging them onto the original
  one would give a silently wrong adapter."""
  from peftjax import lora_init
  for name, d in sources.items():
    run_file = d.parent / RUN_FILE if d.name == ADAPTER_DIR else d / RUN_FILE
    if not run_file.is_file():
      continue
    run = _read_run_file(run_file)
    if run.get("kind") != "lm":
      raise _UsageError(f"--adapter {name}={d} is a {run.get('kind')} run (its trained head is "
                        f"not a LoRA adapter); merge-adapters combines language-model LoRA "
                        f"adapters")
    method = _method(run).name
    if method == "qlora":
      raise _UsageError(f"--adapter {name}={d} is a --method qlora run (its adapter reads onto "
                        f"a 4-bit base); `peftjax export` it and merge the exported directory")
    if method != "lora":
      raise _UsageError(f"--adapter {name}={d} is a --method {run.get('method')} run; "
                        f"merge-adapters combines LoRA adapters only")
    init = (run.get("options") or {}).get("init")
    if lora_init.modifies_base(init):
      raise _UsageError(f"--adapter {name}={d} was trained with --init {init}, on a changed base; "
                        f"`peftjax export` it (a LoRA on the original weights) and merge the "
                        f"exported directory")


def _weights(text: Optional[str], names: list) -> list:
  if text is None:
    return [1.0] * len(names)
  try:
    ws = [float(w) for w in text.split(",")]
  except ValueError:
    raise _UsageError(f"--weights {text!r}: expected numbers separated by commas, one per "
                      f"--adapter (e.g. 0.6,0.4)") from None
  if len(ws) != len(names):
    raise _UsageError(f"--weights {text!r} gives {len(ws)} weight{'s' * (len(ws) != 1)} for "
                      f"{len(names)} adapters ({', '.join(names)})")
  return ws


def cmd_merge_adapters(a):
  """Several LoRA adapters of one base combined into one (``peftjax.merge_adapters``), written as
  an HF PEFT adapter."""
  from peftjax import tasks
  from peftjax.io.hf import from_pretrained
  from peftjax.io.hf_peft import save_hf_peft
  from peftjax.lora import LoraWeight
  specs = [s if "=" in s else f"{Path(s.rstrip('/')).name}={s}" for s in a.adapter]
  sources = _serve_adapters(specs)
  names = list(sources)
  weights = _weights(a.weights, names)
  if a.density is not None and not 0 < a.density <= 1:
    raise _UsageError(f"--density must be in (0, 1] (the fraction of entries kept), got "
                      f"{a.density}")
  _merge_options_apply(a)
  _merged_runs_are_plain_lora(sources)
  model_name = _merged_model(a, sources)
  with _user_input():
    path = tasks.resolve_model(model_name)
  inputs = {f"adapter {n}": d for n, d in sources.items()}
  if not _is_name("model", model_name):
    inputs["the base model"] = str(path)
  out = _output_dir(a, inputs)
  with _user_input():
    _, params, _ = from_pretrained(path, scan_layers=_served_layout(sources))
    trees = {n: _read_onto(params, d) for n, d in sources.items()}
  for n, t in trees.items():
    other = sorted({type(x).__name__ for x in jax.tree_util.tree_leaves(t, is_leaf=peftjax.is_node)
                    if peftjax.is_node(x) and not isinstance(x, LoraWeight)})
    if other:
      raise _UsageError(f"--adapter {n}={sources[n]} holds {', '.join(other)} nodes; "
                        f"merge-adapters combines LoRA adapters only")
  with _user_input():
    merged = peftjax.merge_adapters(
        trees, weights, method=a.method, svd_rank=a.rank, density=a.density,
        majority_sign_method=a.majority_sign or "total", key=jax.random.key(a.seed))
    saved = save_hf_peft(merged, out, base_model_name_or_path=model_name)
  _mark_output(saved, a, {"model": model_name, "method": "lora"}, combination=a.method,
               adapters={n: str(d.absolute()) for n, d in sources.items()}, weights=weights)
  print(f"wrote the merged adapter ({a.method} of {', '.join(names)}) to {saved}")
  return saved


def cmd_methods(a):
  for name, m in methods.all_methods().items():
    opts = " ".join(_flag(o.name) for o in m.options)
    also = f" (also: {', '.join(m.aliases)})" if m.aliases else ""
    print(f"{name:12s} {m.description}{also}" + (f"  [{opts}]" if opts else ""))


def _add_out_args(p, files: str, whose: str):
  """``--out`` and ``--overwrite`` of the commands that write one directory (merge, export,
  merge-adapters)."""
  p.add_argument("--out", required=True,
                 help=f"output directory ({files}): new, empty, or an earlier {whose}")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an --out that holds other files (files of the same names are "
                      "replaced)")


def build_parser() -> argparse.ArgumentParser:
  """The ``peftjax`` argument parser (subcommands train, eval, merge, export, generate, methods,
  serve, merge-adapters)."""
  ap = _Parser(prog="peftjax", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
  p = sub.add_parser("train", help="fine-tune a model with a PEFT method and compare to the base",
                     description="Fine-tune a model with one PEFT method; compare to the base.",
                     epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_train_args(p)
  p = sub.add_parser("eval", help="evaluate a base model, or base + a trained adapter",
                     description="Evaluate a base model, or base + the adapter of a train --out "
                                 "directory, on a dataset; prints a table.",
                     epilog="examples:\n  peftjax eval --adapter run/\n"
                            "  peftjax eval --adapter run/ --eval-data other.csv\n"
                            "  peftjax eval --model minilm --data rotten_tomatoes --eval-limit 256",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--adapter", default=None, help="a `peftjax train --out` directory")
  _add_data_args(p, train=False)
  p = sub.add_parser("merge", help="fold an adapter into its base: an HF model directory",
                     epilog="example:\n  peftjax merge --adapter run/ --out merged/",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--adapter", required=True, help="a `peftjax train --out` directory")
  _add_out_args(p, "config.json + safetensors", "merge's")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                 help="dtype of the written weights (default: each parameter's)")
  p = sub.add_parser("export", help="write an adapter in Hugging Face PEFT format",
                     epilog="example:\n  peftjax export --adapter run/ --out hf_adapter/\n"
                            "  # PyTorch: peft.PeftModel.from_pretrained(model, 'hf_adapter/')",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--adapter", required=True, help="a `peftjax train --out` directory")
  _add_out_args(p, "adapter_config.json + adapter_model.safetensors", "export's")
  p = sub.add_parser("generate", help="generate text with a decoder (and a trained adapter)",
                     epilog="examples:\n  peftjax generate --model smollm2 --prompt 'The whale'\n"
                            "  peftjax generate --adapter run/ --prompt 'Call me'",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=None, help="default: smollm2, or the adapter's model")
  p.add_argument("--adapter", default=None,
                 help="a `peftjax train --out` directory of a language-model run")
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", type=_pos_int, default=48)
  p.add_argument("--temperature", type=_nonneg_float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--raw", action="store_true",
                 help="do not apply the chat template (the default with --adapter: the "
                      "adapter was trained on raw text)")
  p.add_argument("--chat", action="store_const", const=True, default=None,
                 help="apply the tokenizer's chat template (the default without --adapter)")
  p = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters",
                     description="Serve a base model and its adapters over an OpenAI-compatible "
                                 "HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                                 "/v1/load_lora_adapter, /v1/unload_lora_adapter, /health); a "
                                 "request's `model` picks the adapter.",
                     epilog="example:\n  peftjax serve --model smollm2 --adapter sql=runs/sql "
                            "--adapter poems=hf_adapters/poems\n  curl localhost:8000/v1/"
                            "completions -d '{\"model\": \"sql\", \"prompt\": \"SELECT\"}'",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2",
                 help="smollm2, an HF model directory or a .gguf file (default: smollm2)")
  p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                 help="an adapter served as model NAME (repeatable): an HF PEFT directory, a "
                      "peftjax adapter checkpoint or a `peftjax train --out` directory")
  p.add_argument("--served-model-name", default=None,
                 help="the base model's name in the API (default: --model's name)")
  p.add_argument("--slots", type=_pos_int, default=8,
                 help="requests decoded together (cache rows; default: 8)")
  p.add_argument("--max-len", type=_pos_int, default=1024,
                 help="tokens per request, prompt + completion (default: 1024)")
  p.add_argument("--max-loras", type=_pos_int, default=None,
                 help="adapter slots of the pool (default: the adapters given, at least 4)")
  p.add_argument("--max-lora-rank", type=_pos_int, default=None,
                 help="the pool's padded rank, the most a loaded adapter may have (default: the "
                      "largest given, at least 16)")
  p.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int4", "int8"],
                 help="quantize the base model while loading (QLoRA adapters)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
  p.add_argument("--port", type=_pos_int, default=8000, help="default: 8000")
  p.add_argument("--seed", type=int, default=0, help="seeds requests that give none")
  p.add_argument("--log-level", default="info",
                 choices=["critical", "error", "warning", "info", "debug"])
  from peftjax.merging import METHODS as MERGE_METHODS
  p = sub.add_parser("merge-adapters", help="combine LoRA adapters of one base into one LoRA "
                                            "adapter (HF PEFT format)",
                     description="Combine several LoRA adapters trained on one base model into "
                                 "one LoRA adapter, as HF PEFT's add_weighted_adapter does "
                                 "(peftjax.merge_adapters); written in HF PEFT format, which "
                                 "`peftjax serve --adapter`, PyTorch PEFT and "
                                 "peftjax.io.hf_peft.load_hf_peft read.",
                     epilog="examples:\n  peftjax merge-adapters --adapter runs/sql --adapter "
                            "runs/poems --weights 0.7,0.3 --out mixed/\n"
                            "  peftjax merge-adapters --model smollm2 --adapter a=hf/a --adapter "
                            "b=hf/b --method dare_ties --density 0.5 --seed 1 --out ab/",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                 help="an adapter to combine (repeatable, in the order of --weights): an HF PEFT "
                      "directory, a peftjax adapter checkpoint or a `peftjax train --out` "
                      "directory; NAME defaults to the directory's name")
  p.add_argument("--model", default=None,
                 help="the base model (default: the one the adapters record)")
  p.add_argument("--weights", default=None, metavar="W1,W2,...",
                 help="one weight per adapter; negative subtracts (default: 1 each)")
  p.add_argument("--method", default="svd", choices=list(MERGE_METHODS),
                 help="how to combine (default: svd, as HF PEFT; cat is exact; ties, dare_*, "
                      "magnitude_prune need --density)")
  p.add_argument("--rank", type=_pos_int, default=None,
                 help="rank of the *svd methods' result (default: the largest input rank)")
  p.add_argument("--density", type=float, default=None,
                 help="fraction of entries kept by ties, dare_* and magnitude_prune, in (0, 1]")
  p.add_argument("--majority-sign", default=None, choices=["total", "frequency"],
                 help="the ties rules' sign election (default: total)")
  p.add_argument("--seed", type=int, default=0, help="seed of the DARE masks (default: 0)")
  _add_out_args(p, "adapter_config.json + adapter_model.safetensors", "merge-adapters'")
  sub.add_parser("methods", help="list the PEFT methods")
  return ap


_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "export": cmd_export,
             "generate": cmd_generate, "methods": cmd_methods, "serve": cmd_serve,
             "merge-adapters": cmd_merge_adapters}


class _Terminated(KeyboardInterrupt):
  """SIGTERM outside a training loop (which handles it itself): ends the command as Ctrl-C."""


def _on_sigterm(signum, frame):
  raise _Terminated


def main(argv=None) -> int:
  """Runs the command line; returns the exit code: 0, 2 for user errors, 130/143 after
  SIGINT/SIGTERM (training saves a checkpoint and the adapter first)."""
  import signal
  import threading
  # transformers' advice that PyTorch is missing ("Models won't be available") is about its own
  # PyTorch models, which peftjax never uses: a plain install would print it on every command
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  ap = build_parser()
  cmd = "peftjax"
  old_term = None
  if threading.current_thread() is threading.main_thread():
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    a = ap.parse_args(argv)
    cmd = f"peftjax {a.cmd}"
    _COMMANDS[a.cmd](a)
  except _UsageError as e:
    msg = str(e).strip().replace("\n", " ")
    print(msg if msg.startswith("peftjax") else f"{cmd}: error: {msg}", file=sys.stderr)
    return 2
  except _Stopped as e:
    print(str(e), file=sys.stderr)
    return e.code
  except KeyboardInterrupt as e:
    term = isinstance(e, _Terminated)
    print(f"\n{cmd}: {'SIGTERM' if term else 'SIGINT'}: stopped"
          + ("; a rerun of the same command resumes from the last checkpoint"
             if cmd == "peftjax train" else ""), file=sys.stderr)
    return 143 if term else 130
  except SystemExit as e:  # --help
    return e.code if isinstance(e.code, int) else 0
  finally:
    if old_term is not None:
      signal.signal(signal.SIGTERM, old_term)
  return 0


if __name__ == "__main__":
  sys.exit(main())
