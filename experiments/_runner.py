"""Shared by the comparison experiments: one ``peftjax train`` per method, each in its own process.

Each run is the real command line (``python -m peftjax.cli train ... --out DIR``) inside a small
wrapper that adds two things the command does not report by itself:

* the process's peak resident memory (``ru_maxrss``: model loading, training and evaluation);
* the base model's metrics, printed once, so later runs can reuse them instead of evaluating the
  same frozen base model again (``PEFTJAX_EXP_BASE``: the wrapper answers the command's first
  ``evaluate`` call, which is the base-model row, with those numbers).

Seconds per step come from ``DIR/metrics.jsonl`` (elapsed time logged every 10 steps): the median
over the 10-step intervals after step 10, so compilation (first step, and a second length bucket
compiled later) and the final evaluation are not counted. The command's own ``s/step`` column
(the mean from the first to the last logged step: the first compile and the final evaluation
excluded, a later bucket's compile included) is kept as ``s/step (cli)``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

_WRAPPER = r"""
import json, os, resource, sys
import peftjax.cli as cli
_orig = cli.evaluate
_base = os.environ.get("PEFTJAX_EXP_BASE")
def _first(*a, **k):
  cli.evaluate = _orig
  if _base:
    return json.loads(_base)
  m = _orig(*a, **k)
  print("BASE_METRICS " + json.dumps({k: float(v) for k, v in m.items()}), flush=True)
  return m
cli.evaluate = _first
rc = cli.main(sys.argv[1:])
print("PEAK_RSS_MB %.1f" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), flush=True)
try:  # accelerators: the device's own peak (None on CPU)
  import jax
  st = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in st:
    print("PEAK_DEVICE_MB %.1f" % (st["peak_bytes_in_use"] / 2**20), flush=True)
except Exception:
  pass
sys.exit(rc)
"""


def step_seconds(metrics_jsonl: pathlib.Path) -> dict:
  recs = [json.loads(l) for l in metrics_jsonl.read_text().splitlines() if l.strip()]
  recs = [r for r in recs if "elapsed_s" in r]
  per = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
         for a, b in zip(recs, recs[1:]) if a["step"] >= 10 and b["step"] > a["step"]]
  out = {"first_step_s": recs[0]["elapsed_s"] if recs else None,
         "train_loop_s": recs[-1]["elapsed_s"] if recs else None}
  out["s_per_step"] = statistics.median(per) if per else None
  out["s_per_step_min"] = min(per) if per else None
  out["loss_first"] = recs[0].get("loss") if recs else None
  out["loss_last"] = recs[-1].get("loss") if recs else None
  return out


def run_method(name: str, args: list[str], *, base_metrics: dict | None = None,
               log_dir: pathlib.Path | None = None) -> dict:
  """Runs ``peftjax train`` with ``args`` in a fresh process; returns what it measured."""
  out = pathlib.Path(tempfile.mkdtemp(prefix=f"peftjax-exp-{name}-"))
  cmd = [sys.executable, "-c", _WRAPPER, "train", *args, "--out", str(out)]
  env = dict(os.environ)
  if base_metrics:
    env["PEFTJAX_EXP_BASE"] = json.dumps(base_metrics)
  load0 = os.getloadavg()
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  wall = time.perf_counter() - t0
  load1 = os.getloadavg()
  if log_dir is not None:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = proc.stdout + "\n--- stderr ---\n" + re.sub(r"[^\n]*\r", "", proc.stderr)
    # no paths of this machine in committed logs: the run directory is OUT, the checkout .,
    # the home directory (the model cache under ~/.cache) ~
    log = (log.replace(str(out), "OUT").replace(str(ROOT), ".")
           .replace(os.path.expanduser("~") + os.sep, "~" + os.sep))
    (log_dir / f"{name}.log").write_text(log)
  r = {"name": name, "command": "peftjax train " + " ".join(args), "wall_s": round(wall, 1),
       "loadavg_before": [round(x, 2) for x in load0],
       "loadavg_after": [round(x, 2) for x in load1]}
  if proc.returncode != 0 or not (out / "results.json").exists():
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    r["error"] = (err[-1] if err else f"exit code {proc.returncode}")[:300]
    shutil.rmtree(out, ignore_errors=True)
    return r
  res = json.loads((out / "results.json").read_text())
  rows = res["rows"]
  m = re.search(r"PEAK_RSS_MB ([\d.]+)", proc.stdout)
  r["peak_rss_mb"] = float(m.group(1)) if m else None
  m = re.search(r"PEAK_DEVICE_MB ([\d.]+)", proc.stdout)
  if m:
    r["peak_device_mb"] = float(m.group(1))
  m = re.search(r"BASE_METRICS (\{.*\})", proc.stdout)
  r["base_metrics"] = json.loads(m.group(1)) if m else base_metrics
  r["base_row"], r["row"] = rows[0], rows[-1]
  r["trainable"] = int(rows[-1]["trainable"].replace(",", ""))
  r["trainable_pct"] = float(rows[-1]["trainable %"])
  r["s_per_step_cli"] = rows[-1].get("s/step")
  r["lr"] = (res.get("args") or {}).get("lr")
  r.update(step_seconds(out / "metrics.jsonl"))
  m = re.search(r"open gates ([\d.]+)%", proc.stderr)
  if m:
    r["diffpruning_open_pct"] = float(m.group(1))
  shutil.rmtree(out, ignore_errors=True)
  return r


def save_json(path: pathlib.Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def machine() -> dict:
  import platform
  info = {"platform": platform.platform(), "python": platform.python_version(),
          "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
  try:
    import jax
    info["jax"] = jax.__version__
    info["backend"] = jax.default_backend()
    info["devices"] = [str(d) for d in jax.devices()]
  except Exception as e:  # pragma: no cover - informational only
    info["jax"] = f"unavailable: {e}"
  return info


def load_note(results: list[dict], cpus: int | None) -> str:
  loads = [x for r in results for x in (r.get("loadavg_before", [None])[0],
                                        r.get("loadavg_after", [None])[0]) if x is not None]
  if not loads:
    return ""
  hi, mean = max(loads), sum(loads) / len(loads)
  note = f"1-minute load average during the runs: mean {mean:.1f}, max {hi:.1f} on {cpus} CPUs."
  if cpus and mean > 0.75 * cpus:
    note += (" **Step times were measured on a shared machine** (other jobs ran during some of "
             "the runs; see each run's load in the JSON): they are comparable between rows only "
             "roughly, and are slower than on a quiet machine.")
  return note


def table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def resume(path: pathlib.Path, a, names: list[str]) -> tuple[list[dict], dict | None]:
  """Results already in ``path`` for the same settings (steps, batch, sequence length), without
  failed runs, restricted to ``names``; and the base metrics they measured."""
  if not path.exists():
    return [], None
  old = json.loads(path.read_text())
  for k in ("steps", "batch_size", "seq_len", "warmup"):
    if k in old and old.get(k) != getattr(a, k, old.get(k)):
      raise SystemExit(f"--resume: {path} was run with {k}={old.get(k)}, not {getattr(a, k)}")
  keep = [r for r in old.get("results", []) if "error" not in r and r["name"] in names]
  base = old.get("base")
  if base is not None and "perplexity" in base:
    base = {"nll": base["nll"]}
  print(f"resuming: {', '.join(r['name'] for r in keep) or 'nothing'} already done", flush=True)
  return keep, base


def run_all(experiment: str, a, methods: dict, names: list[str], common: list[str],
            write, score=None) -> None:
  """Runs ``peftjax train *common --method M --lr LR *extra`` for each name not yet done.

  ``methods`` maps a row name to ``(method, extra options, lr or lr grid, why)``. With a grid
  (several rates), ``a.validation`` > 0 and ``score`` (``row -> number``, higher is better), each
  rate first trains with seed 0 on the training data less a held-out ``a.validation`` fraction
  (``peftjax train --validation``) and is scored there; the test split is never used to choose.
  The chosen rate (a single rate, not a grid: that rate; a grid without a sweep: the method's
  default, ``peftjax train`` without ``--lr``) then trains ``a.seeds`` times (seeds 0, 1,
  ...) and is evaluated on the test split: the row keeps the seed-0 run's measurements and adds
  ``grid`` (rate -> validation score), ``seed_rows`` (each seed's result row) and ``lr``.
  ``write(out, a, machine, results, base, final=False)`` rewrites the report after every method
  (so a stopped run keeps what it finished, and ``--resume`` continues it); ``--report`` only
  rewrites it from the JSON.
  """
  out = pathlib.Path(a.out)
  path = out / f"{experiment}.json"
  info = machine()
  results, base = [], None
  if a.resume or a.report:
    results, base = resume(path, a, list(methods))
  if a.report:
    write(out, a, json.loads(path.read_text()).get("machine", info), results, base, final=True)
    return
  done = {r["name"] for r in results}
  if getattr(a, "rerun", False):  # --resume --rerun --methods A,B: keep the others, redo A and B
    done -= set(names)            # (each old row stays until its new one is written)
  logs = out / "logs" / experiment
  validation, seeds = getattr(a, "validation", 0) or 0, max(1, getattr(a, "seeds", 1) or 1)
  for n in names:
    if n in done:
      continue
    method, extra, lrs, _ = methods[n]
    grid = tuple(lrs) if isinstance(lrs, (tuple, list)) else (lrs,)
    args = [*common, "--method", method, "--save-every", str(a.steps), *extra]
    scores = {}
    if len(grid) > 1 and validation and score is not None:
      for lr in grid:
        vargs = [*args, "--lr", f"{lr:g}", "--validation", str(validation), "--seed", "0"]
        print(f"== {n} (validation): peftjax train {' '.join(vargs)}", flush=True)
        # the base row of a validation run is not used: skip evaluating it
        v = run_method(f"{n}-val-lr{lr:g}", vargs, base_metrics={"accuracy": 0.0, "loss": 0.0},
                       log_dir=logs)
        scores[f"{lr:g}"] = None if "error" in v else score(v["row"])
        print(f"   lr {lr:g}: {scores[f'{lr:g}']}", flush=True)
      ok = {k: v for k, v in scores.items() if v is not None}
      lr = float(max(ok, key=ok.get)) if ok else grid[0]
    elif not isinstance(lrs, (tuple, list)):
      lr = lrs   # the experiment's one rate for this method (compare_lm.py's METHODS)
    else:
      lr = None  # not swept: the method's default rate (peftjax train without --lr)
    runs = []
    for seed in range(seeds):
      sargs = [*args, *(["--lr", f"{lr:g}"] if lr is not None else []), "--seed", str(seed)]
      print(f"== {n}: peftjax train {' '.join(sargs)}", flush=True)
      runs.append(run_method(n if seed == 0 else f"{n}-seed{seed}", sargs, base_metrics=base,
                             log_dir=logs))
      if base is None and runs[-1].get("base_metrics"):
        base = runs[-1]["base_metrics"]
    r = runs[0]
    r["lr"], r["grid"] = r.get("lr") if lr is None else lr, scores or None
    r["seed_rows"] = [x.get("row") for x in runs if "error" not in x]
    r["seeds_failed"] = [x["error"] for x in runs if "error" in x]
    print({k: v for k, v in r.items() if k not in ("base_row", "row")}, flush=True)
    results = [x for x in results if x["name"] != n] + [r]
    results.sort(key=lambda r: list(methods).index(r["name"]))
    write(out, a, info, results, base)
  write(out, a, info, results, base, final=True)
