"""Every method on all-MiniLM-L6-v2 + rotten-tomatoes sentiment (fresh vs rotten), side by side.

For full fine-tuning and each PEFT method of ``peftjax.cli.METHODS`` (with the classification head
trained too, as HF PEFT's ``modules_to_save``): trainable parameters (count and %), seconds per
step, peak memory of the process, test accuracy, and accuracy as a percentage of full
fine-tuning. Writes ``results/compare_classification.md`` and ``.png``.

    python experiments/compare_classification.py [--steps 300] [--methods lora,ia3,...]

Each method runs in its own process so peak memory is per method.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = ["full", "lora", "qlora", "ia3", "adapter", "bitfit", "partial"]


def run_one(method: str, steps: int, batch: int, eval_limit: int) -> dict:
  out = tempfile.mkdtemp(prefix=f"peftjax-{method}-")
  cmd = [sys.executable, "-c",
         "import resource, sys, json; from peftjax.cli import main; rc = main(sys.argv[1:]); "
         "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); "
         "sys.exit(rc)",
         "train", "--model", "minilm", "--method", method, "--data", "rotten_tomatoes",
         "--steps", str(steps), "--batch-size", str(batch), "--eval-limit", str(eval_limit),
         "--no-baseline", "--out", out]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if proc.returncode != 0:
    return {"method": method, "error": proc.stderr[-800:]}
  rows = json.loads(pathlib.Path(out, "results.json").read_text())["rows"]
  peak = float(re.search(r"PEAK_RSS_MB ([\d.]+)", proc.stdout).group(1))
  r = rows[-1]
  return {"method": method, "trainable": int(r["trainable"].replace(",", "")),
          "trainable %": float(r["trainable %"]), "accuracy": float(r["test accuracy"][:-1]),
          "s/step": float(r["s/step"]), "peak RSS MB": peak,
          "base accuracy": float(rows[0]["test accuracy"][:-1])}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--eval-limit", type=int, default=0, help="0 = the whole test split")
  ap.add_argument("--methods", default=",".join(DEFAULT))
  ap.add_argument("--out", default=str(ROOT / "results"))
  a = ap.parse_args(argv)
  results = []
  for m in a.methods.split(","):
    print(f"== {m}", flush=True)
    r = run_one(m, a.steps, a.batch_size, a.eval_limit)
    print(r, flush=True)
    results.append(r)
  full = next((r["accuracy"] for r in results if r["method"] == "full" and "accuracy" in r), None)
  lines = ["| method | trainable | trainable % | s/step | peak RSS (MB) | test accuracy | % of full FT |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['method']} | failed: {r['error'].splitlines()[-1][:80]} | | | | | |")
      continue
    rel = f"{100 * r['accuracy'] / full:.1f}%" if full else "-"
    lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable %']:.3f} | {r['s/step']:.3f} "
                 f"| {r['peak RSS MB']:.0f} | {r['accuracy']:.2f}% | {rel} |")
  base = next((r["base accuracy"] for r in results if "base accuracy" in r), None)
  text = (f"all-MiniLM-L6-v2, rotten tomatoes (fresh vs rotten), {a.steps} steps of batch "
          f"{a.batch_size}; base model with an untrained head: {base}% test accuracy.\n\n"
          + "\n".join(lines) + "\n")
  os.makedirs(a.out, exist_ok=True)
  pathlib.Path(a.out, "compare_classification.md").write_text(text)
  print(text)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([max(r["trainable"], 1) for r in ok], [r["accuracy"] for r in ok])
    for r in ok:
      ax.annotate(r["method"], (max(r["trainable"], 1), r["accuracy"]))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM on rotten tomatoes")
    fig.tight_layout()
    fig.savefig(pathlib.Path(a.out, "compare_classification.png"), dpi=120)
  except ImportError:
    print("matplotlib not installed: no plot")


if __name__ == "__main__":
  main()
