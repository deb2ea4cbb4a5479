"""One command for peftjax's benchmarks: peftjax vs HF PEFT (PyTorch) vs qwix, side by side.

    make bench                                  # = .venv/bin/python benchmarks/run.py
    .venv/bin/python benchmarks/run.py --quick  # tiny shapes, 3 steps, 1 round (development)
    .venv/bin/python benchmarks/run.py --device # accelerator mode (bf16, larger shapes)

What it measures (CPU, f32, DESIGN.md's reference shape unless ``--quick``):

1. a LoRA training step (r=8, alpha 16 on all seven linear layers, AdamW) in peftjax, HF PEFT on
   PyTorch and qwix, and full fine-tuning in peftjax and PyTorch;
2. QLoRA (NF4 + double quantization) in peftjax, qwix (NF4) and HF PEFT + bitsandbytes;
3. inference: forward latency of the base, merged and unmerged (``lift``) models, and KV-cache
   generation tokens/s;
4. scaling: step time and peak memory over 3 model sizes x 3 ranks (peftjax);
5. the machine's matmul peak (JAX and PyTorch) and each step's achieved FLOP/s as a fraction of it.

Every measurement runs in its own process (``bench_jax.py`` in this venv, ``bench_torch.py`` in
``benchmarks/.venv-torch``, created on first use: ``torch==2.13.0`` first, then ``peft``,
``transformers`` and ``bitsandbytes``), in interleaved rounds (the order rotates each round), with
the load average recorded before and after. Results go to ``benchmarks/results/cpu.json`` and the
report to ``docs/benchmarks.md`` with plots in ``docs/figures/bench_*.png``; ``--quick`` writes
``benchmarks/results/quick.{json,md}`` and ``benchmarks/results/figures-quick/`` instead.
Regenerate a report from saved JSON with ``python benchmarks/report.py RESULTS.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common  # noqa: E402

TORCH_VENV = os.path.join(HERE, ".venv-torch")
TORCH_PY = os.path.join(TORCH_VENV, "bin", "python")
TORCH_PIN = "torch==2.13.0"

#: Display names, in report order.
SYSTEMS = {
    "peftjax_lora": "peftjax LoRA",
    "torch_lora": "HF PEFT LoRA (PyTorch)",
    "qwix_lora": "qwix LoRA",
    "peftjax_full": "peftjax full fine-tuning",
    "torch_full": "PyTorch full fine-tuning",
    "peftjax_qlora": "peftjax QLoRA (NF4 + double quant)",
    "qwix_qlora": "qwix QLoRA (NF4)",
    "torch_qlora": "HF PEFT + bitsandbytes QLoRA (NF4 + double quant)",
}
#: The peftjax cases also run on the newest jax (``.venv-newest``, which ``make test`` creates),
#: interleaved with the rest, so one run compares the two JAX releases side by side.
NEWEST_CASES = _common.NEWEST_CASES
SYSTEMS.update({f"{c}_newest": f"{SYSTEMS[c]}, newest jax" for c in NEWEST_CASES})
TRAIN_KIND = {"peftjax_lora": "lora", "torch_lora": "lora", "qwix_lora": "lora",
              "peftjax_full": "full", "torch_full": "full", "peftjax_qlora": "lora",
              "qwix_qlora": "lora", "torch_qlora": "lora"}
TRAIN_KIND.update({f"{c}_newest": TRAIN_KIND[c] for c in NEWEST_CASES})


@dataclasses.dataclass
class Job:
  """One child process: ``case`` of ``runner`` ("jax" or "torch") at ``shape``."""
  name: str
  runner: str
  case: str
  shape: dict
  args: tuple = ()
  group: str = "main"
  python: str | None = None  # the interpreter of a "jax" job; None: this one


def log(msg: str) -> None:
  print(msg, flush=True)


loadavg = _common.loadavg


def git_state() -> dict:
  def git(*a):
    try:
      return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                            timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
      return ""
  return {"commit": git("rev-parse", "HEAD").strip(),
          "dirty_files": [l[3:] for l in git("status", "--porcelain").splitlines()
                          if l[:2] != "??" and len(l) > 3]}


def head_commit() -> str:
  """The commit checked out now (each child imports peftjax afresh, so this is what it runs)."""
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          timeout=20).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    return ""


# -- environments --------------------------------------------------------------------------------

def ensure_torch_venv(setup: bool, notes: list) -> bool:
  """Creates ``benchmarks/.venv-torch`` (torch first, then peft/transformers/bitsandbytes)."""
  stamp = os.path.join(TORCH_VENV, ".installed")
  if os.path.exists(stamp):
    return True
  if not setup:
    notes.append("PyTorch systems skipped: benchmarks/.venv-torch does not exist (--no-setup).")
    return False
  log(f"creating {os.path.relpath(TORCH_VENV, ROOT)} ({TORCH_PIN} first, then peft, "
      f"transformers, bitsandbytes) ...")
  pip = [TORCH_PY, "-m", "pip", "install", "-q"]
  try:
    # PyTorch 2.13's CPU wheel is for 3.11 here: use it even when this runner is a newer Python.
    py = shutil.which("python3.11") or sys.executable
    subprocess.run([py, "-m", "venv", TORCH_VENV], check=True)
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + [TORCH_PIN, "peft", "transformers", "psutil"], check=True)
  except (OSError, subprocess.CalledProcessError) as e:
    notes.append(f"PyTorch systems skipped: creating benchmarks/.venv-torch failed ({e}).")
    return False
  r = subprocess.run(pip + [TORCH_PIN, "bitsandbytes"])
  if r.returncode:
    notes.append("bitsandbytes did not install in benchmarks/.venv-torch: its QLoRA is skipped.")
  with open(stamp, "w") as f:
    f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
  return True


def torch_has(module: str) -> bool:
  return subprocess.run([TORCH_PY, "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_qwix(setup: bool, notes: list) -> bool:
  """qwix in this venv, installed (if missing) with jax/jaxlib/flax pinned to their versions here.

  qwix 0.1.8 installs next to jax 0.10.2 / flax 0.12.8 without changing them; the pin makes pip
  fail rather than change them (then qwix is skipped: give it its own venv in that case).
  """
  check = [sys.executable, "-c", "import qwix"]
  if subprocess.run(check, capture_output=True).returncode == 0:
    return True
  if not setup:
    notes.append("qwix skipped: not installed (make bench installs it).")
    return False
  import importlib.metadata as md
  pins = [f"{n}=={md.version(n)}" for n in ("jax", "jaxlib", "flax")]
  log(f"installing qwix into this venv with {', '.join(pins)} pinned ...")
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qwix", *pins])
  if r.returncode or subprocess.run(check, capture_output=True).returncode:
    notes.append(f"qwix skipped: it does not install next to {', '.join(pins)}.")
    return False
  return True


def newest_python(path: str, notes: list) -> str | None:
  """``path`` if it is an interpreter whose jax differs from this one's, else None (with a note)."""
  if not os.path.exists(path):
    notes.append(f"newest-jax runs skipped: {os.path.relpath(path, ROOT)} does not exist "
                 "(make test creates .venv-newest).")
    return None
  code = "import importlib.metadata as m; print(m.version('jax'))"
  p = subprocess.run([path, "-c", code], capture_output=True, text=True)
  import importlib.metadata as md
  if p.returncode or p.stdout.strip() == md.version("jax"):
    notes.append(f"newest-jax runs skipped: {os.path.relpath(path, ROOT)} has "
                 f"{'no jax' if p.returncode else 'the same jax as this venv'}.")
    return None
  return path


# -- running -------------------------------------------------------------------------------------

def run_job(job: Job, cfg: dict) -> dict:
  """Runs one job in a child process; returns its record (result or error) with load averages."""
  if job.runner == "torch":
    cmd = [TORCH_PY, os.path.join(HERE, "bench_torch.py"), "--threads", str(cfg["threads"])]
  else:
    cmd = [job.python or sys.executable, os.path.join(HERE, "bench_jax.py"), "--dtype", cfg["dtype"],
           "--gen-tokens", str(cfg["gen_tokens"])]
  cmd += ["--case", job.case, "--shape", json.dumps(job.shape), "--steps", str(cfg["steps"]),
          "--warmup", str(cfg["warmup"]), "--matmul-n", str(cfg["matmul_n"]), *job.args]
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  if cfg.get("jax_platforms") and job.runner == "jax":
    env["JAX_PLATFORMS"] = cfg["jax_platforms"]
  rec = {"name": job.name, "runner": job.runner, "case": job.case, "group": job.group,
         "newest_jax": job.python is not None,
         "shape": job.shape, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
         "git_head": head_commit(), "load_before": loadavg()}
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg["timeout"], cwd=ROOT,
                       env=env)
    out, err, code = p.stdout, p.stderr, p.returncode
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    err, code = f"timed out after {cfg['timeout']} s", -1
  rec["wall_s"] = round(time.perf_counter() - t0, 2)
  rec["load_after"] = loadavg()
  result = _common.parse_result(out) if code == 0 else None
  rec["ok"] = result is not None
  if result is None:
    rec["error"] = (err or out)[-2000:]
  else:
    rec["result"] = result
  return rec


def describe(rec: dict) -> str:
  if not rec["ok"]:
    last = rec["error"].strip().splitlines()[-1:] or ["?"]
    return f"FAILED: {last[0][:160]}"
  r = rec["result"]
  if rec["case"] == "matmul_peak":
    return f"{r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s peak"
  if rec["case"] == "peftjax_infer":
    f = r["forward"]
    return (f"fwd base {f['base']['median_s'] * 1e3:.1f} ms merged {f['merged']['median_s'] * 1e3:.1f}"
            f" lift {f['lift']['median_s'] * 1e3:.1f}; gen base "
            f"{r['generate']['base']['tokens_per_s']:.0f} tok/s")
  return f"{r['median_s']:.4f} s/step, peak RSS {r.get('peak_rss_bytes', 0) / 1e9:.2f} GB"


def run_jobs(jobs_per_round: list[list[Job]], cfg: dict) -> list[dict]:
  records = []
  total = sum(len(j) for j in jobs_per_round)
  i = 0
  for rnd, jobs in enumerate(jobs_per_round):
    for job in jobs:
      i += 1
      rec = run_job(job, cfg)
      rec["round"] = rnd
      records.append(rec)
      log(f"[{i:3d}/{total}] round {rnd + 1} {job.name:24s} {describe(rec)}  "
          f"(load {rec['load_before'][0]:.2f}->{rec['load_after'][0]:.2f}, {rec['wall_s']:.0f} s)")
  return records


def main_jobs(shape: dict, rounds: int, have_torch: bool, have_qwix: bool, have_bnb: bool,
              newest: str | None = None) -> list:
  """Per round: every system, matmul peaks and inference; the order rotates each round.
  ``newest``: a second interpreter (the newest jax) that runs the peftjax cases too."""
  base = [Job("matmul_peak_jax", "jax", "matmul_peak", shape),
          Job("peftjax_lora", "jax", "peftjax_lora", shape),
          Job("peftjax_full", "jax", "peftjax_full", shape),
          Job("peftjax_qlora", "jax", "peftjax_qlora", shape),
          Job("peftjax_infer", "jax", "peftjax_infer", shape)]
  if have_qwix:
    base += [Job("qwix_lora", "jax", "qwix_lora", shape), Job("qwix_qlora", "jax", "qwix_qlora", shape)]
  if have_torch:
    base += [Job("matmul_peak_torch", "torch", "matmul_peak", shape),
             Job("torch_lora", "torch", "torch_lora", shape),
             Job("torch_full", "torch", "torch_full", shape)]
    if have_bnb:
      base.append(Job("torch_qlora", "torch", "torch_qlora", shape))
  if newest:
    base += [Job(f"{c}_newest", "jax", c, shape, python=newest) for c in NEWEST_CASES]
  # Interleave runtimes (jax, torch, jax, ...) so neither side gets all the quiet moments.
  jax_jobs = [j for j in base if j.runner == "jax"]
  torch_jobs = [j for j in base if j.runner == "torch"]
  mixed = []
  while jax_jobs or torch_jobs:
    for src in (jax_jobs, torch_jobs):
      if src:
        mixed.append(src.pop(0))
  out = []
  for r in range(rounds):
    k = (r * 3) % len(mixed)
    out.append(mixed[k:] + mixed[:k])
  return out


def scaling_jobs(base: dict, hiddens, ranks) -> list[Job]:
  jobs = []
  for h in hiddens:
    jobs.append(Job(f"scaling_full_h{h}", "jax", "peftjax_full", _common.scaled_shape(base, h, ranks[0]),
                    group="scaling"))
    for r in ranks:
      jobs.append(Job(f"scaling_lora_h{h}_r{r}", "jax", "peftjax_lora",
                      _common.scaled_shape(base, h, r), group="scaling"))
  return jobs


# -- aggregation ---------------------------------------------------------------------------------

def _med(xs):
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def aggregate(records: list[dict], shape: dict) -> dict:
  """Per-system figures over rounds: median of the per-round medians, and their range."""
  by = {}
  for rec in records:
    if rec["group"] == "main":
      by.setdefault(rec["name"], []).append(rec)
  n_rounds = 1 + max((r.get("round", 0) for r in records), default=0)

  def by_round(recs, value):
    """``value(result)`` of each round's run, in round order; None where the run failed."""
    out = [None] * n_rounds
    for r in recs:
      if r["ok"]:
        out[r.get("round", 0)] = value(r["result"])
    return out

  systems = {}
  for name, recs in by.items():
    ok = [r["result"] for r in recs if r["ok"]]
    entry = {"runs": len(recs), "ok_runs": len(ok),
             "load_before": [r["load_before"] for r in recs],
             "load_after": [r["load_after"] for r in recs]}
    if not ok:
      entry["error"] = recs[-1].get("error", "")[-600:]
      systems[name] = entry
      continue
    if name.startswith("matmul_peak"):
      entry.update(peak_flops_per_s=max(r["peak_flops_per_s"] for r in ok),
                   median_flops_per_s=_med([r["median_flops_per_s"] for r in ok]), n=ok[0]["n"],
                   round_peaks=[r["peak_flops_per_s"] for r in ok],
                   by_round=by_round(recs, lambda r: r["peak_flops_per_s"]))
    elif name == "peftjax_infer":
      entry["forward"] = {v: {"median_s": _med([r["forward"][v]["median_s"] for r in ok]),
                              "rounds_s": [r["forward"][v]["median_s"] for r in ok],
                              "by_round": by_round(recs, lambda r, v=v: r["forward"][v]["median_s"])}
                          for v in ("base", "merged", "lift")}
      entry["generate"] = {v: {"tokens_per_s": _med([r["generate"][v]["tokens_per_s"] for r in ok]),
                               "rounds": [r["generate"][v]["tokens_per_s"] for r in ok],
                               "by_round": by_round(
                                   recs, lambda r, v=v: r["generate"][v]["tokens_per_s"])}
                           for v in ("base", "merged", "lift")}
      entry.update({k: ok[0][k] for k in ("gen_tokens", "prompt_len", "gen_batch")})
      entry["peak_rss_bytes"] = _med([r.get("peak_rss_bytes") for r in ok])
    else:
      meds = [r["median_s"] for r in ok]
      entry.update(median_s=_med(meds), min_s=min(meds), max_s=max(meds), rounds_s=meds,
                   by_round=by_round(recs, lambda r: r["median_s"]),
                   peak_rss_bytes=_med([r.get("peak_rss_bytes") for r in ok]),
                   peak_rss_max_bytes=max(r.get("peak_rss_bytes") or 0 for r in ok),
                   rss_after_setup_bytes=_med([r.get("rss_after_setup_bytes") for r in ok]),
                   compile_s=_med([r.get("compile_s") for r in ok]),
                   first_step_s=_med([r.get("first_step_s") for r in ok]),
                   xla_flops=ok[0].get("xla_flops"), torch_flops=ok[0].get("torch_flops"),
                   trainable_params=ok[0].get("trainable_params"),
                   total_params=ok[0].get("total_params"),
                   bits_per_param=ok[0].get("bits_per_param"),
                   frozen_bytes=ok[0].get("frozen_bytes"), tile_size=ok[0].get("tile_size"),
                   loss_first=ok[0].get("loss_first"), loss_last=ok[0].get("loss_last"),
                   temp_bytes=ok[0].get("temp_bytes"),
                   temp_bytes_plain_loss=ok[0].get("temp_bytes_plain_loss"),
                   device_peak_bytes=_med([r.get("peak_bytes_in_use") for r in ok]),
                   analytic_flops=_common.analytic_flops(shape, TRAIN_KIND[name]))
    systems[name] = entry
  return systems


def derive(systems: dict, shape: dict) -> dict:
  """Matmul peak, FLOP utilization, ratios and goals."""
  peaks = {k: systems[k]["peak_flops_per_s"] for k in ("matmul_peak_jax", "matmul_peak_torch")
           if "peak_flops_per_s" in systems.get(k, {})}
  machine_peak = max(peaks.values()) if peaks else None
  for name, s in systems.items():
    if "median_s" in s and s["median_s"]:
      s["tokens_per_s"] = shape["batch"] * shape["seq"] / s["median_s"]
      s["achieved_flops_per_s"] = s["analytic_flops"] / s["median_s"]
      if machine_peak:
        s["fraction_of_peak"] = s["achieved_flops_per_s"] / machine_peak

  def t(name):
    return systems.get(name, {}).get("median_s")

  ratios = {}

  def ratio(key, a, b):
    if a is not None and b is not None:
      ratios[key] = a / b
  ratio("peftjax LoRA / HF PEFT LoRA", t("peftjax_lora"), t("torch_lora"))
  ratio("peftjax LoRA / qwix LoRA", t("peftjax_lora"), t("qwix_lora"))
  ratio("peftjax LoRA / peftjax full", t("peftjax_lora"), t("peftjax_full"))
  ratio("PyTorch LoRA / PyTorch full", t("torch_lora"), t("torch_full"))
  ratio("qwix LoRA / peftjax full", t("qwix_lora"), t("peftjax_full"))
  ratio("peftjax QLoRA / peftjax LoRA", t("peftjax_qlora"), t("peftjax_lora"))
  ratio("peftjax QLoRA / qwix QLoRA", t("peftjax_qlora"), t("qwix_qlora"))
  ratio("peftjax QLoRA / bitsandbytes QLoRA", t("peftjax_qlora"), t("torch_qlora"))
  ratio("peftjax full / PyTorch full", t("peftjax_full"), t("torch_full"))
  ratio("peftjax LoRA, newest jax / HF PEFT LoRA", t("peftjax_lora_newest"), t("torch_lora"))
  for c in NEWEST_CASES:
    ratio(f"{SYSTEMS[c]}: newest jax / this jax", t(f"{c}_newest"), t(c))
  inf = systems.get("peftjax_infer", {})
  if "forward" in inf:
    f, g = inf["forward"], inf["generate"]
    ratio("merged forward / base forward", f["merged"]["median_s"], f["base"]["median_s"])
    ratio("lift forward / base forward", f["lift"]["median_s"], f["base"]["median_s"])
    ratio("merged tokens/s / base tokens/s", g["merged"]["tokens_per_s"], g["base"]["tokens_per_s"])
    ratio("lift tokens/s / base tokens/s", g["lift"]["tokens_per_s"], g["base"]["tokens_per_s"])
    ratio("lift forward / merged forward", f["lift"]["median_s"], f["merged"]["median_s"])
    ratio("lift decode time / merged decode time", g["merged"]["tokens_per_s"],
          g["lift"]["tokens_per_s"])
  frac = systems.get("peftjax_lora", {}).get("fraction_of_peak")
  if frac is not None:
    ratios["peftjax LoRA achieved FLOP/s / matmul peak"] = frac

  def per_round(key, names):
    """The goal's ratio measured within each round (both sides from the same round), or None."""
    def div(a, b):
      return [x / y if x is not None and y is not None else None for x, y in zip(a, b)]

    def rounds(name):
      return systems.get(name, {}).get("by_round") or []
    f, g = inf.get("forward", {}), inf.get("generate", {})
    if key == "merged forward / base forward":
      return div(f.get("merged", {}).get("by_round", []), f.get("base", {}).get("by_round", []))
    if key == "lift forward / merged forward":
      return div(f.get("lift", {}).get("by_round", []), f.get("merged", {}).get("by_round", []))
    if key == "lift decode time / merged decode time":
      return div(g.get("merged", {}).get("by_round", []), g.get("lift", {}).get("by_round", []))
    if key == "peftjax LoRA achieved FLOP/s / matmul peak":
      flops = systems.get("peftjax_lora", {}).get("analytic_flops")
      round_peak = [max([p for p in ps if p is not None], default=None)
                    for ps in zip(rounds("matmul_peak_jax"), rounds("matmul_peak_torch"))]
      if not flops:
        return []
      return div([None if t is None else flops / t for t in rounds("peftjax_lora")], round_peak)
    num, den = names  # a step-time ratio: the two systems it compares
    return div(rounds(num), rounds(den))

  # The targets are the benchmarks issue's (#19) and the QLoRA issue's (#14), not eased to fit.
  goal_spec = [  # (ratio, op, target, the runs it compares)
      ("peftjax LoRA / HF PEFT LoRA", "<=", 0.9, ("peftjax_lora", "torch_lora")),
      ("peftjax LoRA, newest jax / HF PEFT LoRA", "<=", 0.9, ("peftjax_lora_newest", "torch_lora")),
      ("peftjax LoRA / qwix LoRA", "<=", 1.0, ("peftjax_lora", "qwix_lora")),
      ("peftjax LoRA / peftjax full", "<=", 0.7, ("peftjax_lora", "peftjax_full")),
      ("peftjax QLoRA / peftjax LoRA", "<=", 1.1, ("peftjax_qlora", "peftjax_lora")),
      ("merged forward / base forward", "<=", 1.02, ("peftjax_infer",)),
      ("lift forward / merged forward", "<=", 1.05, ("peftjax_infer",)),
      ("lift decode time / merged decode time", "<=", 1.05, ("peftjax_infer",)),
      ("peftjax LoRA achieved FLOP/s / matmul peak", ">=", 0.5,
       ("peftjax_lora", "matmul_peak_jax", "matmul_peak_torch")),
  ]
  def meets(v, op, target):
    return v <= target if op == "<=" else v >= target

  goals = []
  for key, op, target, names in goal_spec:
    v = ratios.get(key)
    rounds = [r for r in per_round(key, names) if r is not None]
    # A goal is met only when it holds in every round's own ratio (and in the medians' ratio).
    met_rounds = sum(meets(r, op, target) for r in rounds)
    met = None if v is None else (meets(v, op, target) and met_rounds == len(rounds))
    loads = [l[0] for n in names for k in ("load_before", "load_after")
             for l in systems.get(n, {}).get(k, []) if l]
    goals.append({"name": key, "value": v, "op": op, "target": target, "met": met,
                  "rounds": rounds, "met_rounds": met_rounds,
                  "systems": list(names), "load_max_1min": max(loads) if loads else None})
  return {"matmul_peak": {"jax_flops_per_s": peaks.get("matmul_peak_jax"),
                          "torch_flops_per_s": peaks.get("matmul_peak_torch"),
                          "machine_flops_per_s": machine_peak},
          "ratios": ratios, "goals": goals}


def aggregate_scaling(records: list[dict]) -> list[dict]:
  rows = []
  for rec in records:
    if rec["group"] != "scaling":
      continue
    s = rec["shape"]
    row = {"name": rec["name"], "kind": "full" if "full" in rec["case"] else "lora",
           "hidden": s["hidden"], "ffn": s["ffn"], "heads": s["heads"],
           "rank": s["rank"] if "lora" in rec["case"] else None, "ok": rec["ok"],
           "load_before": rec["load_before"], "load_after": rec["load_after"],
           "analytic_flops": _common.analytic_flops(s, "full" if "full" in rec["case"] else "lora")}
    if rec["ok"]:
      r = rec["result"]
      row.update(median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"],
                 peak_rss_bytes=r.get("peak_rss_bytes"),
                 rss_after_setup_bytes=r.get("rss_after_setup_bytes"),
                 trainable_params=r.get("trainable_params"), total_params=r.get("total_params"),
                 xla_flops=r.get("xla_flops"))
    else:
      row["error"] = rec["error"][-400:]
    rows.append(row)
  return rows


# -- main ----------------------------------------------------------------------------------------

def detect_backend(cfg: dict) -> tuple[str, str]:
  code = "import jax; d = jax.devices()[0]; print(jax.default_backend(), '|', d.device_kind)"
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  if p.returncode:
    return "cpu", "unknown"
  backend, kind = (x.strip() for x in p.stdout.strip().splitlines()[-1].split("|", 1))
  return backend, kind


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n", 2)[2])
  ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 steps, 1 round")
  ap.add_argument("--device", action="store_true",
                  help="accelerator mode: bf16, larger shapes, tokens/s and MFU (falls back to a "
                       "tiny CPU run when JAX sees no accelerator)")
  ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
  ap.add_argument("--steps", type=int, help="timed steps per run (default 10; --quick 3)")
  ap.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 2)")
  ap.add_argument("--parts", default="main,scaling", help="comma list of: main, scaling")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch systems")
  ap.add_argument("--no-qwix", action="store_true", help="skip qwix")
  ap.add_argument("--newest-python", default=os.path.join(ROOT, ".venv-newest", "bin", "python"),
                  help="an interpreter with the newest jax that runs the peftjax cases too "
                       "(default: .venv-newest, which make test creates; skipped if absent)")
  ap.add_argument("--no-newest", action="store_true", help="skip the newest-jax runs")
  ap.add_argument("--no-setup", action="store_true", help="create/install nothing")
  ap.add_argument("--timeout", type=int, default=900, help="seconds per child process")
  ap.add_argument("--out", help="results JSON path")
  ap.add_argument("--report", help="markdown report path")
  ap.add_argument("--figures", help="directory for the PNG plots")
  args = ap.parse_args(argv)

  if args.device:
    import accelerator
    return accelerator.main(args)

  quick = args.quick
  shape = dict(_common.SHAPES["quick" if quick else "reference"])
  rounds = args.rounds or (1 if quick else 3)
  cfg = {"steps": args.steps or (3 if quick else 10), "warmup": args.warmup or (1 if quick else 2),
         "threads": _common.cpu_threads(), "dtype": "float32", "matmul_n": 256 if quick else 2048,
         "gen_tokens": 8 if quick else 64, "timeout": args.timeout, "jax_platforms": "cpu"}
  res_dir = os.path.join(HERE, "results")
  out = args.out or os.path.join(res_dir, "quick.json" if quick else "cpu.json")
  report = args.report or (os.path.join(res_dir, "quick.md") if quick
                           else os.path.join(ROOT, "docs", "benchmarks.md"))
  figures = args.figures or (os.path.join(res_dir, "figures-quick") if quick
                             else os.path.join(ROOT, "docs", "figures"))
  parts = set(args.parts.split(","))
  notes = []
  setup = not args.no_setup
  have_torch = not args.no_torch and ensure_torch_venv(setup, notes)
  have_bnb = have_torch and torch_has("bitsandbytes")
  if have_torch and not have_bnb:
    notes.append("bitsandbytes is not importable in benchmarks/.venv-torch: its QLoRA is skipped.")
  have_qwix = not args.no_qwix and ensure_qwix(setup, notes)
  if args.no_torch:
    notes.append("PyTorch systems skipped (--no-torch).")
  if args.no_qwix:
    notes.append("qwix skipped (--no-qwix).")
  newest = None if args.no_newest else newest_python(args.newest_python, notes)

  started = dt.datetime.now(dt.timezone.utc)
  load_start = loadavg()
  git = git_state()  # at the start: other work may commit while this runs
  log(f"peftjax benchmarks ({'quick' if quick else 'full'}): shape {shape}, {rounds} round(s), "
      f"{cfg['steps']} steps, {cfg['threads']} CPU threads, load {load_start}")
  records = []
  if "main" in parts:
    records += run_jobs(main_jobs(shape, rounds, have_torch, have_qwix, have_bnb, newest), cfg)
  if "scaling" in parts:
    hid = _common.QUICK_SCALING_HIDDEN if quick else _common.SCALING_HIDDEN
    rk = _common.QUICK_SCALING_RANKS if quick else _common.SCALING_RANKS
    records += run_jobs([scaling_jobs(shape, hid, rk)], cfg)
  finished = dt.datetime.now(dt.timezone.utc)

  systems = aggregate(records, shape)
  versions, versions_newest = {}, {}
  for rec in records:
    if rec["ok"]:
      (versions_newest if rec.get("newest_jax") else versions).update(
          {k: v for k, v in rec["result"].get("versions", {}).items() if v})
  loads = [r["load_before"][0] for r in records] + [r["load_after"][0] for r in records]
  results = {
      "meta": {"mode": "quick" if quick else "full", "started": started.isoformat(),
               "finished": finished.isoformat(),
               "duration_s": round((finished - started).total_seconds(), 1),
               "argv": sys.argv[1:] if argv is None else list(argv), "shape": shape,
               "rounds": rounds, **{k: cfg[k] for k in ("steps", "warmup", "threads", "dtype",
                                                        "matmul_n", "gen_tokens")},
               "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "load_start": load_start, "load_end": loadavg(),
               "load_max_1min": max(loads) if loads else None,
               "load_median_1min": _med(loads), "versions": versions,
               "versions_newest": versions_newest, "git": git,
               "params": _common.param_counts(shape), "notes": notes},
      "systems": systems,
      **derive(systems, shape),
      "scaling": aggregate_scaling(records),
      "runs": records,
  }
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  log(f"wrote {os.path.relpath(out, ROOT)}")
  import report as report_lib
  report_lib.write_report(results, report, figures, results_path=out)
  log(f"wrote {os.path.relpath(report, ROOT)}")
  for g in results["goals"]:
    v = "n/a" if g["value"] is None else f"{g['value']:.3f}"
    state = report_lib.goal_state(g)
    log(f"  goal {g['name']:45s} {v:>7s} {g['op']} {g['target']}: {state}")
  failed = [r["name"] for r in records if not r["ok"]]
  if failed:
    log(f"failed runs: {', '.join(failed)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
