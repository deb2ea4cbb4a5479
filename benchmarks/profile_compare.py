"""The LoRA step's time by kind of work, peftjax (XLA) and HF PEFT (PyTorch) side by side.

    python benchmarks/profile_compare.py [--steps 5] [--threads 2]

One run: the peftjax LoRA step exactly as ``benchmarks/bench_jax.py`` times it (reference shape,
``lift``, fused LM-head loss, AdamW, state donated) profiled by ``benchmarks/profile_step.py``'s
per-HLO-thunk method, and HF PEFT's step under ``torch.profiler`` by ``benchmarks/profile_torch.py``
(in ``benchmarks/.venv-torch`` when it exists, else this interpreter), with the same thread count.
Both are grouped the same way: matmuls (with achieved GFLOP/s, and by shape), attention (scores,
softmax, values, forward and backward), elementwise/norms/loss, optimizer, copies/transposes,
gathers/scatters. JAX ops are grouped by their HLO category and their ``op_name`` metadata (the
Flax module path and the optax update).

Writes ``benchmarks/results/profile-cpu.json`` and the tables between the ``profile`` markers of
``docs/performance.md`` (``--render`` redoes only the tables from the JSON). Per-op times are sums
of op durations: XLA runs independent thunks on both threads at once (their sum exceeds the step
time) and PyTorch's ops run one at a time, so compare shares and per-group seconds, and read the
step time from the untraced column. The load average is recorded; a loaded machine inflates
PyTorch's times far more than XLA's (its OpenMP threads busy-wait).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

RESULTS = os.path.join(HERE, "results", "profile-cpu.json")
DOC = os.path.join(ROOT, "docs", "performance.md")
BEGIN, END = "<!-- profile:begin -->", "<!-- profile:end -->"
GROUPS = ("matmul", "attention", "elementwise, norms, loss", "optimizer", "copy/transpose",
          "gather/scatter", "other")

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"')


def jax_group(category: str, rest: str) -> str:
  """The group of one HLO entry instruction from profile_step's category and its metadata."""
  op = (_OP_NAME.search(rest) or [None, ""])[1] if rest else ""
  src = (_SOURCE.search(rest) or [None, ""])[1] if rest else ""
  # The model's ops carry its Flax module path; the optimizer update (optax) has none.
  if "optax" in src or "adam" in op.lower() or (op and "LlamaForCausalLM" not in op
                                                 and category != "matmul"):
    return "optimizer"
  if "self_attn" in op and "_proj" not in op:
    return "attention"
  if category == "matmul":
    return "matmul"
  if category in ("transpose/copy", "fused transpose"):
    return "copy/transpose"
  if category == "gather/scatter":
    return "gather/scatter"
  if category in ("elementwise", "reduce"):
    return "elementwise, norms, loss"
  return "other"   # while/call thunks: the fused LM head + loss runs in a loop


def profile_jax(steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  import _common
  import bench_jax
  import profile_step
  import peftjax
  from peftjax.train import TrainState, make_train_step
  shape = dict(_common.SHAPES["reference"])
  model, ids = bench_jax.build_model(shape, jnp.float32)
  params = bench_jax.init_params(model, ids)
  tuned = peftjax.lora.apply(params, rank=shape["rank"], alpha=shape["alpha"],
                             targets=list(_common.LINEAR_TARGETS))
  trainable, frozen = peftjax.split(tuned)
  tx = peftjax.optimizer(optax.adamw(bench_jax.LEARNING_RATE), tuned)
  forward = peftjax.lift(model.apply)
  labels = jnp.concatenate([ids[:, 1:], jnp.full((ids.shape[0], 1), -100, ids.dtype)], axis=1)
  weights = jnp.full(ids.shape, 1.0 / (ids.shape[0] * (ids.shape[1] - 1)), jnp.float32)

  def loss_fn(p, batch, key):
    return forward({"params": p}, batch["ids"], labels=batch["labels"],
                   loss_weights=batch["weights"]), {}

  state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key(0))
  step = jax.jit(make_train_step(loss_fn, tx))
  batch = {"ids": ids, "labels": labels, "weights": weights}
  with tempfile.TemporaryDirectory() as d:
    p = profile_step.profile("lora", step, (state, frozen, batch), steps, dump_dir=d)
    with open(os.path.join(d, "lora.hlo.txt")) as f:
      comps, entry = profile_step.parse_hlo(f.read())
  rest = {name: r for name, _, _, r in comps.get(entry, [])}
  groups = collections.defaultdict(lambda: [0.0, 0.0, 0])
  mm = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for name, t in p["per_op"].items():
    cat, flops, shp, _ = p["info"][name]
    g = jax_group(cat, rest.get(name, ""))
    rec = groups[g]
    rec[0] += t
    rec[1] += flops
    rec[2] += 1
    if g == "matmul" and flops:
      _, out_dims = profile_step._dims(shp)
      key = f"{list(out_dims)} K={flops // (2 * math.prod(out_dims))}"
      m = mm[key]
      m[0] += t
      m[1] += flops
      m[2] += 1
  return {"step_s": p["untraced_s"], "jax": jax.__version__,
          "groups": {g: dict(seconds=v[0], gflop=v[1] / 1e9, ops=v[2]) for g, v in groups.items()},
          "matmuls": {k: dict(seconds=v[0], gflop=v[1] / 1e9, ops=v[2]) for k, v in mm.items()},
          "load": os.getloadavg()}


def profile_torch(steps: int, threads: int) -> dict:
  venv = os.path.join(HERE, ".venv-torch", "bin", "python")
  py = venv if os.path.exists(venv) else sys.executable
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "torch.json")
    subprocess.run([py, os.path.join(HERE, "profile_torch.py"), "--steps", str(steps),
                    "--threads", str(threads), "--json", out], check=True, timeout=1800)
    with open(out) as f:
      return json.load(f)


def _ms(x):
  return "–" if x is None else f"{x * 1e3:.1f}"


def render(results: dict) -> str:
  jx, th = results["jax"], results["torch"]
  meta = results["meta"]
  L = [f"Measured {meta['date']} by `benchmarks/profile_compare.py` ({meta['threads']} threads "
       f"each; jax {jx['jax']}, torch {th['torch']}; load average {meta['load_before'][0]:.1f} "
       f"before, {meta['load_after'][0]:.1f} after"
       + ("; **a loaded machine: PyTorch's times are inflated far more than XLA's**"
          if max(meta["load_before"][0], meta["load_after"][0]) > meta["threads"] + 0.5 else "")
       + f"). Step time untraced: peftjax {jx['step_s']:.3f} s, HF PEFT {th['step_s']:.3f} s.",
       "", "| group | peftjax ms | share | HF PEFT ms | share | peftjax / HF PEFT |",
       "|---|---|---|---|---|---|"]
  tj = sum(v["seconds"] for v in jx["groups"].values())
  tt = sum(v["seconds"] for v in th["groups"].values())
  for g in GROUPS:
    a, b = jx["groups"].get(g, {}).get("seconds"), th["groups"].get(g, {}).get("seconds")
    if a is None and b is None:
      continue
    ratio = f"{a / b:.2f}" if a and b else "–"
    L.append(f"| {g} | {_ms(a)} | {'' if a is None else f'{a / tj:.0%}'} | {_ms(b)} | "
             f"{'' if b is None else f'{b / tt:.0%}'} | {ratio} |")
  L.append(f"| **sum of op times** | {_ms(tj)} | | {_ms(tt)} | | {tj / tt:.2f} |")
  L += ["", "Matmuls by output shape and contraction size (the largest by peftjax time):", "",
        "| output, K | peftjax ops | ms | GFLOP/s | HF PEFT ops | ms | GFLOP/s |",
        "|---|---|---|---|---|---|---|"]
  keys = sorted(set(jx["matmuls"]) | set(th["matmuls"]),
                key=lambda k: -(jx["matmuls"].get(k, {}).get("seconds") or 0))[:12]
  for k in keys:
    a, b = jx["matmuls"].get(k), th["matmuls"].get(k)

    def cells(r):
      if not r:
        return "–", "–", "–"
      rate = r["gflop"] / r["seconds"] if r["seconds"] else None
      return str(r["ops"]), _ms(r["seconds"]), "–" if rate is None else f"{rate:.0f}"
    L.append(f"| {k} | " + " | ".join(cells(a)) + " | " + " | ".join(cells(b)) + " |")
  return "\n".join(L)


def write_doc(results: dict, path: str = DOC) -> None:
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(path, "w") as f:
    f.write(head + BEGIN + "\n" + render(results) + "\n" + END + tail)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--json", default=RESULTS)
  ap.add_argument("--render", action="store_true", help="only redo the tables from --json")
  a = ap.parse_args(argv)
  if not a.render:
    load_before = os.getloadavg()
    jx = profile_jax(a.steps)
    th = profile_torch(a.steps, a.threads)
    results = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "threads": a.threads, "steps": a.steps, "load_before": load_before,
                        "load_after": os.getloadavg()},
               "jax": jx, "torch": th}
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)
  with open(a.json) as f:
    results = json.load(f)
  write_doc(results)
  print(render(results))


if __name__ == "__main__":
  main()
