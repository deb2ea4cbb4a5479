"""Accelerator mode of the benchmark runner (``benchmarks/run.py --device``).

The same JAX cases as the CPU run (peftjax LoRA / full / QLoRA, qwix LoRA / QLoRA, inference),
in bf16 at a larger shape (``_common.SHAPES["device"]``) on the default JAX device, reported as
tokens/s and model FLOPs utilization (MFU): analytic FLOPs per step / step time / peak, where the
peak is both the measured bf16 matmul peak (an ``8192 x 8192`` jitted matmul) and, for devices
listed in :data:`NOMINAL_PEAK`, the vendor's nominal dense bf16 figure. Device memory is the
device's ``peak_bytes_in_use``.

With no accelerator (JAX's default backend is the CPU) it falls back to a tiny bf16 CPU run at the
quick shape, which checks that the path works; the results are written but mean nothing.

Writes ``benchmarks/results/device-<backend>.json`` and ``.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

#: Nominal dense bf16 peak FLOP/s by device kind (substring match, first hit wins).
NOMINAL_PEAK = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
)


def nominal_peak(kind: str) -> float | None:
  for key, peak in NOMINAL_PEAK:
    if key.lower() in (kind or "").lower():
      return peak
  return None


def main(args) -> int:
  import run  # the runner (sibling module)
  backend, kind = run.detect_backend({})
  fallback = backend == "cpu"
  if fallback:
    run.log("no accelerator visible to JAX: falling back to a tiny bf16 CPU run (checks the "
            "path only; figures are meaningless)")
  shape = dict(_common.SHAPES["quick" if fallback else "device"])
  cfg = {"steps": args.steps or (3 if fallback else 20), "warmup": args.warmup or (1 if fallback else 3),
         "threads": _common.cpu_threads(), "dtype": "bfloat16",
         "matmul_n": 256 if fallback else 8192, "gen_tokens": 8 if fallback else 128,
         "timeout": args.timeout, "jax_platforms": None}
  notes = []
  have_qwix = not args.no_qwix and run.ensure_qwix(not args.no_setup, notes)
  names = ["matmul_peak_jax", "peftjax_lora", "peftjax_full", "peftjax_qlora", "peftjax_infer"]
  if have_qwix:
    names += ["qwix_lora", "qwix_qlora"]
  jobs = [run.Job(n, "jax", "matmul_peak" if n == "matmul_peak_jax" else n, shape) for n in names]
  rounds = args.rounds or 1
  started = dt.datetime.now(dt.timezone.utc)
  run.log(f"accelerator benchmarks on {backend} ({kind}): shape {shape}, bf16, {rounds} round(s)")
  records = run.run_jobs([jobs[r % len(jobs):] + jobs[:r % len(jobs)] for r in range(rounds)], cfg)
  systems = run.aggregate(records, shape)
  peak = systems.get("matmul_peak_jax", {}).get("peak_flops_per_s")
  nominal = None if fallback else nominal_peak(kind)
  rows = []
  for n in ("peftjax_lora", "peftjax_full", "peftjax_qlora", "qwix_lora", "qwix_qlora"):
    s = systems.get(n, {})
    if "median_s" not in s:
      rows.append({"system": n, "error": s.get("error", "not run")[-300:]})
      continue
    flops_s = s["analytic_flops"] / s["median_s"]
    rows.append({"system": n, "median_s": s["median_s"], "min_s": s["min_s"], "max_s": s["max_s"],
                 "tokens_per_s": shape["batch"] * shape["seq"] / s["median_s"],
                 "achieved_flops_per_s": flops_s,
                 "mfu_measured_peak": flops_s / peak if peak else None,
                 "mfu_nominal_peak": flops_s / nominal if nominal else None,
                 "device_peak_bytes": s.get("device_peak_bytes"),
                 "peak_rss_bytes": s.get("peak_rss_bytes"), "bits_per_param": s.get("bits_per_param"),
                 "xla_flops": s.get("xla_flops"), "analytic_flops": s["analytic_flops"]})
  versions = {}
  for rec in records:
    if rec["ok"]:
      versions.update({k: v for k, v in rec["result"].get("versions", {}).items() if v})
  results = {"meta": {"mode": "device", "backend": backend, "device_kind": kind,
                      "fallback_cpu": fallback, "started": started.isoformat(), "shape": shape,
                      "dtype": "bfloat16", **{k: cfg[k] for k in ("steps", "warmup", "matmul_n",
                                                                  "gen_tokens")},
                      "rounds": rounds, "versions": versions, "git": run.git_state(),
                      "notes": notes},
             "matmul_peak_flops_per_s": peak, "nominal_peak_flops_per_s": nominal,
             "rows": rows, "inference": systems.get("peftjax_infer"), "systems": systems,
             "runs": records}
  res_dir = os.path.join(HERE, "results")
  os.makedirs(res_dir, exist_ok=True)
  base = os.path.join(res_dir, f"device-{backend}")
  with open(base + ".json", "w") as f:
    json.dump(results, f, indent=1)
  md = markdown(results)
  with open(base + ".md", "w") as f:
    f.write(md)
  print(md)
  run.log(f"wrote {base}.json and .md")
  return 0


def markdown(results: dict) -> str:
  m = results["meta"]
  peak, nominal = results["matmul_peak_flops_per_s"], results["nominal_peak_flops_per_s"]
  L = [f"# Accelerator benchmarks: {m['device_kind']} ({m['backend']})", ""]
  if m["fallback_cpu"]:
    L += ["**CPU fallback (no accelerator): a tiny-shape check of the path; the figures mean "
          "nothing.**", ""]
  L.append(f"{m['started'][:19]}Z, bf16, shape {m['shape']}, {m['rounds']} round(s) x "
           f"{m['steps']} steps. Measured bf16 matmul peak "
           f"({m['matmul_n']}x{m['matmul_n']}): {'–' if not peak else f'{peak / 1e12:.1f} TFLOP/s'}"
           + (f"; nominal {nominal / 1e12:.0f} TFLOP/s." if nominal else "."))
  L += ["", "| system | s/step | tokens/s | TFLOP/s (analytic) | MFU vs measured peak | "
        "MFU vs nominal | device peak memory |", "|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    if "error" in r:
      L.append(f"| {r['system']} | failed | | | | | |")
      continue
    mm = r["mfu_measured_peak"]
    mn = r["mfu_nominal_peak"]
    dev = r.get("device_peak_bytes")
    L.append(f"| {r['system']} | {r['median_s']:.4f} | {r['tokens_per_s']:.0f} | "
             f"{r['achieved_flops_per_s'] / 1e12:.2f} | {'–' if mm is None else f'{mm * 100:.1f}%'} | "
             f"{'–' if mn is None else f'{mn * 100:.1f}%'} | "
             f"{'–' if not dev else f'{dev / 1e9:.2f} GB'} |")
  inf = results.get("inference") or {}
  if "forward" in inf:
    L += ["", "| model | forward ms | generation tokens/s |", "|---|---|---|"]
    for v in ("base", "merged", "lift"):
      L.append(f"| {v} | {inf['forward'][v]['median_s'] * 1e3:.2f} | "
               f"{inf['generate'][v]['tokens_per_s']:.0f} |")
  L.append("")
  return "\n".join(L)
