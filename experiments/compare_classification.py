"""Every method on all-MiniLM-L6-v2 + rotten-tomatoes sentiment (fresh vs rotten), side by side.

Full fine-tuning and each PEFT method of ``peftjax methods`` (the classification head trains too,
as HF PEFT's ``modules_to_save``), each as one ``peftjax train --model minilm --data
rotten_tomatoes`` in its own process (so peak memory is per method), with the method's learning
rate passed as ``--lr``: trainable parameters (count and %), seconds per step, peak memory of the
process, accuracy on the whole held-out test split, and accuracy as a percentage of full
fine-tuning. Writes ``results/compare_classification.md``, ``.json`` and two ``.png`` plots.

    python experiments/compare_classification.py [--steps 150] [--methods lora,ia3,...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _runner  # noqa: E402

#: name -> (method, extra options, learning-rate grid, where the grid comes from). The runner picks
#: the rate with the best validation accuracy (a held-out part of the training split).
METHODS = {
    "full": ("full", [], (3e-5, 1e-4, 3e-4), "BERT practice is 2e-5 to 5e-5 over epochs (Devlin "
             "et al.); higher for a budget of a few hundred steps with a fresh head"),
    "lora": ("lora", ["--rank", "8", "--alpha", "16"], (3e-4, 1e-3, 3e-3), "LoRA on encoders: "
             "5e-4 to 1e-3 (Hu et al.)"),
    "qlora": ("qlora", ["--rank", "8", "--alpha", "16"], (3e-4, 1e-3, 3e-3), "as LoRA"),
    "dora": ("dora", ["--rank", "8", "--alpha", "16"], (3e-4, 1e-3, 3e-3), "as LoRA (Liu et al. "
             "2024 use LoRA's rates)"),
    "vera": ("vera", ["--rank", "256"], (3e-3, 1e-2, 3e-2), "only scaling vectors train: a "
             "large lr (Kopiczko et al.: 1e-2 to 4e-2 on GLUE)"),
    "loha": ("loha", ["--rank", "8", "--alpha", "16"], (3e-4, 1e-3, 3e-3), "as LoRA"),
    "lokr": ("lokr", ["--rank", "8", "--alpha", "16"], (3e-4, 1e-3, 3e-3), "as LoRA"),
    "oft": ("oft", ["--block-size", "32"], (3e-4, 1e-3, 3e-3), "Qiu et al.: 6e-5 to 1e-3"),
    "lora-pissa": ("lora", ["--rank", "8", "--alpha", "16", "--init", "pissa"],
                   (3e-5, 1e-4, 3e-4), "PiSSA trains the principal directions: a lower lr than "
                   "LoRA (Meng et al. 2024 use 2e-5 over epochs)"),
    "adapter-houlsby": ("adapters", ["--placement", "houlsby", "--bottleneck", "64"],
                        (3e-4, 1e-3, 3e-3), "Houlsby et al.: 1e-4 to 1e-3"),
    "adapter-pfeiffer": ("adapters", ["--placement", "pfeiffer", "--bottleneck", "64"],
                         (3e-4, 1e-3, 3e-3), "as Houlsby"),
    "ia3": ("ia3", [], (3e-3, 1e-2, 3e-2), "scaling vectors need a large lr (IA3: 3e-3 for T0)"),
    "bitfit": ("bitfit", [], (3e-4, 1e-3, 3e-3), "Ben Zaken et al.: 1e-4 to 1e-3"),
    "partial": ("partial", ["--top-layers", "2"], (3e-5, 1e-4, 3e-4), "the top layers train "
                "fully: as full fine-tuning"),
    "diff_pruning": ("diff_pruning", ["--density", "0.005"], (3e-5, 1e-4, 3e-4),
                     "the difference trains like full fine-tuning (Guo et al.: 1e-5 to 5e-5 over "
                     "epochs); gate logits at --gate-lr 0.05"),
    "prompt": ("prompt", ["--n-tokens", "20"], (1e-2, 3e-2, 1e-1), "prompt tuning needs a large "
               "lr (Lester et al. 0.3 with Adafactor)"),
    "prefix": ("prefix", ["--n-tokens", "20"], (1e-4, 3e-4, 1e-3), "through the MLP: Li & "
               "Liang 5e-5 to 8e-5 over epochs; 1e-2 diverged here"),
    "ptuning-v2": ("prefix", ["--n-tokens", "20", "--no-projection"], (1e-3, 3e-3, 1e-2),
                   "P-tuning v2 (prefixes trained directly): 5e-3 to 1e-2 (Liu et al. 2022)"),
    "ptuning": ("ptuning", ["--n-tokens", "20", "--encoder", "mlp"], (1e-4, 3e-4, 1e-3),
                "P-tuning v1: the MLP encoder trains, like prefix tuning's MLP"),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=64)
  ap.add_argument("--eval-limit", type=int, default=0, help="0 = the whole test split")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--validation", type=float, default=0.1,
                  help="fraction of the training split held out to choose each method's learning "
                       "rate from its grid (0: no sweep, the method's default rate)")
  ap.add_argument("--seeds", type=int, default=3, help="test runs per method at the chosen rate")
  ap.add_argument("--out", default=str(_runner.RESULTS))
  ap.add_argument("--rerun", action="store_true",
                  help="with --resume: run the --methods again, keep the other rows")
  ap.add_argument("--report", action="store_true",
                  help="only rebuild the .md and plots from OUT/compare_classification.json")
  ap.add_argument("--resume", action="store_true",
                  help="keep the methods already in OUT/compare_classification.json (same settings) and run the rest")
  a = ap.parse_args(argv)
  if a.warmup is None:
    a.warmup = max(a.steps // 10, 1)
  names = [m for m in a.methods.split(",") if m]
  for n in names:
    if n not in METHODS:
      ap.error(f"unknown method {n!r}; choose from {', '.join(METHODS)}")
  _runner.run_all("compare_classification", a, METHODS, names, [
      "--model", "minilm", "--data", "rotten_tomatoes", "--steps", str(a.steps), "--batch-size",
      str(a.batch_size), "--seq-len", str(a.seq_len), "--eval-limit", str(a.eval_limit),
      "--warmup", str(a.warmup), "--no-baseline"], write,
      score=lambda row: float(row["test accuracy"].rstrip("%")))


def write(out: pathlib.Path, a, info: dict, results: list[dict], base: dict | None,
          final: bool = False):
  info = {**info, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
  for r in results:
    if "error" not in r:
      rows_ = r.get("seed_rows") or [r["row"]]
      accs = [float(x["test accuracy"].rstrip("%")) for x in rows_]
      r["accuracy"] = statistics.mean(accs)
      r["accuracy_std"] = statistics.stdev(accs) if len(accs) > 1 else None
      r["n_seeds"] = len(accs)
      r["test_loss"] = statistics.mean(float(x["test loss"]) for x in rows_)
  full = next((r["accuracy"] for r in results if r["name"] == "full" and "accuracy" in r), None)
  rows = [["base model, untrained head", "0", "0", "-", "-", "-",
           f"{100 * base['accuracy']:.2f}%" if base else "-",
           f"{base['loss']:.4f}" if base else "-",
           f"{base['accuracy'] * 100 / full * 100:.1f}%" if base and full else "-"]]
  for r in results:
    if "error" in r:
      rows.append([r["name"], f"failed: {r['error'][:120]}", "", "", "", "", "", "", ""])
      continue
    r["pct_of_full"] = 100 * r["accuracy"] / full if full else None
    grid = r.get("grid")
    lr = f"**{r['lr']:g}**" + (" (" + ", ".join(
        f"{k}: {'failed' if v is None else f'{v:.1f}'}" for k, v in grid.items()) + ")"
        if grid else " (not swept)")
    acc = f"{r['accuracy']:.2f}%" + (f" ± {r['accuracy_std']:.2f} ({r['n_seeds']} seeds)"
                                     if r.get("accuracy_std") is not None else " (1 seed)")
    rows.append([r["name"], f"{r['trainable']:,}", f"{r['trainable_pct']:.3f}", lr,
                 f"{r['s_per_step']:.2f} ({r['s_per_step_min']:.2f})" if r.get("s_per_step")
                 else "-",
                 f"{r['peak_rss_mb']:,.0f}" if r.get("peak_rss_mb") else "-",
                 acc, f"{r['test_loss']:.4f}",
                 f"{r['pct_of_full']:.1f}%" if r.get("pct_of_full") else "-"])
  header = ["method", "trainable", "trainable %", "lr (grid: validation accuracy %)",
            "s/step (min)", "peak RSS (MB)", "test accuracy (mean ± std)", "test loss",
            "% of full FT"]
  n_test = None
  if base:
    n_test = "all"
  majority = _majority()
  dp = next((r for r in results if r.get("diffpruning_open_pct") is not None), None)
  md = [
      "# all-MiniLM-L6-v2 on rotten tomatoes: every method side by side",
      "",
      f"`python experiments/compare_classification.py --steps {a.steps} --warmup {a.warmup} --batch-size "
      f"{a.batch_size} --seq-len {a.seq_len}` ({'complete' if final else 'in progress'}): "
      f"all-MiniLM-L6-v2 (22.7M parameters) with a new 2-class head, {a.steps} steps of "
      f"{a.batch_size} sentences (at most {a.seq_len} tokens; AdamW, {a.warmup} warmup steps, cosine "
      f"decay, clip 1.0) on the training split of the rotten-tomatoes fresh-vs-rotten sentences, "
      f"then accuracy on the "
      + ("whole held-out test split (2,562 sentences)" if a.eval_limit == 0
         else f"first {a.eval_limit} held-out test sentences")
      + ". The head (the classifier, 770 parameters, and the BERT pooler, 147,840, which this "
      "sentence-transformers checkpoint never trained) trains with every method and is counted. "
      "Each method ran in "
      "its own process (`peftjax train --model minilm --data rotten_tomatoes --method M --lr LR "
      "--no-baseline ...`).",
      "",
      _runner.table(header, rows),
      "",
      "- *s/step*: median over 10-step intervals after step 10 (compilation and evaluation "
      "excluded); in brackets the fastest such interval, the least disturbed by other jobs. *peak RSS*: the whole process (loading, training, evaluation, saving). The "
      "base row was evaluated once, in the first process, and reused.",
      f"- {a.steps} steps of {a.batch_size} is {a.steps * a.batch_size:,} sentences, a small "
      "fraction of an epoch (10,246 training sentences), chosen to fit a shared 2-core machine: "
      "the quality columns show how fast each method starts to learn at its learning rate, not "
      "where it ends; a method still at the majority class has not left it within this budget "
      "at its learning rate, and is reported as it is. Run `--steps 300` or more for a quality "
      "comparison.\n" +
      (f"- Always answering the majority class (fresh) scores {majority:.2f}%; the test loss "
       "(mean cross-entropy, 0.6931 = chance) is the finer signal when accuracies sit there.\n"
       if majority else "") +
      (f"- *lr*: chosen per method from its grid by accuracy on a validation split ({a.validation:.0%} "
       f"of the training sentences held out, seed 0; the test split is never used to choose), "
       f"then trained {a.seeds} time(s) (seeds 0..{a.seeds - 1}) at that rate on the whole "
       f"training split and tested: mean ± standard deviation over the seeds. "
       if any(r.get("grid") for r in results) else
       "- *lr*: no row of this table was chosen by a sweep yet (`--validation 0.1 --seeds 3` "
       "does that: each grid's rates scored on a held-out part of the training split, then the "
       "best one over several seeds). ") +
      "A row marked *not swept* ran at one rate: the method's default (rows run with "
      "`--validation 0`), or, for rows from before the sweep existed, a guessed one (see "
      "`compare_classification.json`: each row's command, each grid and its source). *1 seed*: "
      "trained once; differences of about 1 point are within run-to-run noise. The head trains "
      "at the method's rate.",
      "- LoRA/QLoRA r=8, alpha=16 on all linear layers; adapters bottleneck 64 (Houlsby: after "
      "attention output and FFN; Pfeiffer: FFN only); IA3 on keys, values and FFN; BitFit all "
      "biases; partial: top 2 of 6 layers; prompt/prefix/P-tuning 20 virtual tokens (prefix "
      "through the reparameterization MLP, P-tuning through an MLP encoder)."
      + (f" DiffPruning: target density 0.5%; the gate logits train at --gate-lr 0.05, "
         f"{dp['diffpruning_open_pct']:.3f}% of the gates open when the difference is projected "
         f"onto its 0.5% largest entries (after 70% of the steps), which then train alone; its "
         f"accuracy and trainable count are the projected model's."
         if dp else ""),
      f"- Machine: {info.get('cpus')} CPUs, {info.get('backend')}, jax {info.get('jax')}. "
      + _runner.load_note(results, info.get("cpus")),
      "",
      "![accuracy vs trainable parameters](compare_classification.png)",
      "",
      "![step time and peak memory](compare_classification_cost.png)",
      ""]
  out.mkdir(parents=True, exist_ok=True)
  (out / "compare_classification.md").write_text("\n".join(md))
  _runner.save_json(out / "compare_classification.json", {
      "experiment": "compare_classification", "complete": final, "steps": a.steps,
      "warmup": a.warmup,
      "batch_size": a.batch_size, "seq_len": a.seq_len, "eval_limit": a.eval_limit,
      "machine": info, "base": base, "full_ft_accuracy": full,
      "methods": {n: {"method": m, "options": e, "lr": lr, "why": w}
                  for n, (m, e, lr, w) in METHODS.items()},
      "results": results})
  if final:
    print("\n".join(md))
    plot(out, results, base, full)


def _majority():
  try:
    from peftjax import data
    _, labels = data.rotten_tomatoes("test")
    return 100 * max(labels.mean(), 1 - labels.mean())
  except Exception:  # informational only
    return None


def plot(out: pathlib.Path, results: list[dict], base, full):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plots (pip install -e '.[experiments]')")
    return
  ok = [r for r in results if "error" not in r]
  if not ok:
    return
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for i, r in enumerate(sorted(ok, key=lambda r: r["trainable"])):
    ax.scatter(r["trainable"], r["accuracy"])
    ax.annotate(r["name"], (r["trainable"], r["accuracy"]), textcoords="offset points",
                xytext=(4, 3 - 11 * (i % 3)), fontsize=8)
  if base:
    ax.axhline(100 * base["accuracy"], color="gray", ls=":", lw=1, label="base, untrained head")
  if full:
    ax.axhline(full, color="gray", ls="--", lw=1, label="full fine-tuning")
  ax.legend(loc="lower right")
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters (log; the 148,610-parameter head included)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("all-MiniLM-L6-v2 on rotten tomatoes")
  fig.tight_layout()
  fig.savefig(out / "compare_classification.png", dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
  names = [r["name"] for r in ok]
  axes[0].bar(names, [r.get("s_per_step") or 0 for r in ok], color="tab:orange")
  axes[0].set_ylabel("seconds per step")
  axes[0].set_title("step time (batch 32)")
  axes[1].bar(names, [r.get("peak_rss_mb") or 0 for r in ok], color="tab:green")
  axes[1].set_ylabel("peak RSS (MB)")
  axes[1].set_title("peak process memory")
  for ax in axes:
    ax.tick_params(axis="x", rotation=45)
    plt.setp(ax.get_xticklabels(), ha="right")
  fig.tight_layout()
  fig.savefig(out / "compare_classification_cost.png", dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
