"""Trainable-parameter counts of every method on all-MiniLM-L6-v2 and SmolLM2-135M, from
``peftjax.summary`` (no training). The classification head is not included. Writes
``results/param_counts.md`` and ``.json``; ``docs/methods.md`` quotes them.

    python experiments/param_counts.py
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp

import peftjax
from peftjax import tasks
from peftjax.io.hf import from_pretrained

OUT = pathlib.Path(__file__).resolve().parent / "results"
K = jax.random.key(0)


def methods(cfg):
  from peftjax import (adapters, bitfit, diff_pruning, ia3, partial, prefix, prompt, ptuning,
                       qlora)
  floating = lambda p, x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
  return {
      "lora r=8 (all linear)": lambda p: peftjax.lora.apply(p, rank=8, alpha=16, key=K),
      "lora r=8 (q, v only)": lambda p: peftjax.lora.apply(
          p, rank=8, alpha=16, key=K, targets=r".*/(q_proj|v_proj|query|value)/kernel"),
      "qlora r=8 (NF4 base)": lambda p: qlora.apply(p, rank=8, alpha=16, key=K),
      "adapter houlsby m=64": lambda p: adapters.apply(p, 64, placement="houlsby", key=K),
      "adapter pfeiffer m=64": lambda p: adapters.apply(p, 64, placement="pfeiffer", key=K),
      "adapter parallel m=64": lambda p: adapters.apply(p, 64, placement="parallel", key=K),
      "ia3": lambda p: ia3.apply(p),
      "bitfit (all biases)": lambda p: bitfit.apply(p),
      "partial (top 2 layers)": lambda p: partial.apply(p, layers=-2),
      "diffpruning (training)": lambda p: diff_pruning.apply(p),
      "prompt p=20": lambda p: prompt.apply(p, 20, key=K),
      "prefix p=20 (MLP h=512, training)": lambda p: prefix.apply(p, cfg, 20, hidden=512, key=K),
      "prefix p=20 (finalized / P-tuning v2)": lambda p: prefix.finalize(
          prefix.apply(p, cfg, 20, hidden=512, key=K)),
      "ptuning p=20 (MLP encoder)": lambda p: ptuning.apply(p, 20, encoder="mlp", key=K),
      "full": lambda p: partial.apply(p, targets=floating),
  }


def main():
  out = {}
  for name, kw in (("minilm", dict(task="sequence-classification", num_labels=2)),
                   ("smollm2", {})):
    model, params, _ = from_pretrained(tasks.resolve_model(name), scan_layers=False, key=K, **kw)
    if name == "minilm":  # the encoder alone: drop the 2-class head
      params = {k: v for k, v in params.items() if "classifier" not in k}
    cfg = model.config
    rows = {}
    for m, f in methods(cfg).items():
      try:
        s = peftjax.summary(f(params))
        rows[m] = {"trainable": s.trainable, "total": s.total, "pct": 100 * s.fraction}
      except Exception as e:  # reported, not hidden
        rows[m] = {"error": f"{type(e).__name__}: {e}"[:200]}
      print(name, m, rows[m], flush=True)
    base = peftjax.summary(params).total
    out[name] = {"base_params": base, "config": {k: getattr(cfg, k, None) for k in (
        "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "vocab_size")}, "methods": rows}
    del params
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "param_counts.json").write_text(json.dumps(out, indent=2) + "\n")
  names = list(out["minilm"]["methods"])
  lines = ["# Trainable parameters per method (`peftjax.summary`, no classification head)", "",
           f"all-MiniLM-L6-v2: {out['minilm']['base_params']:,} parameters; SmolLM2-135M: "
           f"{out['smollm2']['base_params']:,}.", "",
           "| method | MiniLM trainable | MiniLM % | SmolLM2 trainable | SmolLM2 % |",
           "|---|---|---|---|---|"]
  for m in names:
    cells = []
    for model in ("minilm", "smollm2"):
      r = out[model]["methods"][m]
      cells += ([f"{r['trainable']:,}", f"{r['pct']:.3f}"] if "error" not in r
                else [f"error: {r['error'][:60]}", ""])
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  (OUT / "param_counts.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  sys.exit(main())
