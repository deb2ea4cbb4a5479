"""LoRA training step vs full fine-tuning, lift forward vs merged forward, and trace cost.

Measured side by side in one process on a Llama-like Flax model (pre-norm, SwiGLU MLP, tied
nothing; targets: all seven linear layers per block), f32:

* LoRA training step / full fine-tuning step (goal <= 0.75: frozen kernels get no weight
  gradient, and the optimizer touches only the adapters), for the default ``matmul="auto"``
  (merged kernel + custom backward at training batch sizes) and the plain factored form;
* ``lift`` forward / merged forward (goal <= 1.10);
* trace + compile time of ``jit(lift(fn))`` / ``jit(fn)`` (goal <= 2.0).

    python benchmarks/lora_step.py [--model tiny|llama] [--shape reference|small] [--steps 10]
                                   [--json out.json]

Shape "reference" is DESIGN.md's: vocab 8192, hidden 512, 4 layers, 8 heads, FFN 1376, batch 4,
seq 128, LoRA r=8 alpha 16. ``--model tiny`` is :class:`peftjax.testing.TinyTransformer`,
``--model llama`` is :class:`peftjax.models.llama.LlamaForCausalLM` (what benchmarks/run.py uses).

Besides wall time, every measurement records the process CPU time per call and the load average:
on a shared machine the wall time swings with other processes' load. Run it pinned to one core
(``taskset -c 0 python benchmarks/lora_step.py``) to compare the *work* of two versions: the CPU
time on one core hardly depends on the load (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax
from peftjax.testing import TinyTransformer, next_token_loss

SHAPES = {
    "reference": dict(vocab=8192, dim=512, heads=8, ffn=1376, layers=4, batch=4, seq=128),
    "small": dict(vocab=1024, dim=128, heads=4, ffn=384, layers=2, batch=4, seq=64),
}


def median_time(fn, *args, steps: int, cpu: list | None = None):
  """Median wall seconds of ``steps`` calls (after one warm-up); appends the median CPU seconds
  of the process per call to ``cpu``."""
  out = fn(*args)
  jax.block_until_ready(out)
  times, cpus = [], []
  for _ in range(steps):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  if cpu is not None:
    cpu.append(statistics.median(cpus))
  return statistics.median(times)


def compile_time(fn, *args):
  jax.clear_caches()  # measure a cold trace + lower + compile, not a cache hit
  t0 = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=["tiny", "llama"], default="tiny")
  ap.add_argument("--shape", choices=list(SHAPES), default="reference")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--scan", action="store_true", help="layer-stacked params (nn.scan)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  cfg = SHAPES[args.shape]

  tokens = jax.random.randint(jax.random.key(1), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])
  if args.model == "tiny":
    model = TinyTransformer(vocab=cfg["vocab"], dim=cfg["dim"], heads=cfg["heads"],
                            ffn=cfg["ffn"], layers=cfg["layers"], scan=args.scan)
    params = model.init(jax.random.key(0), tokens)
    apply = model.apply
    targets = lambda p, x: p.endswith("kernel") and "lm_head" not in p
  else:
    from peftjax.models.llama import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["dim"], intermediate_size=cfg["ffn"],
        num_layers=cfg["layers"], num_heads=cfg["heads"], num_kv_heads=cfg["heads"]),
        scan_layers=args.scan)
    params = {"params": model.init(jax.random.key(0), tokens)["params"]}
    apply = lambda p, tok: model.apply(p, tok)
    targets = r".*(q|k|v|o|gate|up|down)_proj/kernel"
  tuned = peftjax.lora.apply(params, rank=args.rank, alpha=2 * args.rank, targets=targets)
  tuned_factored = peftjax.lora.apply(params, rank=args.rank, alpha=2 * args.rank,
                                      targets=targets, matmul="factored")
  s = peftjax.summary(tuned)
  forward = peftjax.lift(apply)
  opt = optax.adamw(1e-4)

  # --- full fine-tuning
  full_state = opt.init(params)

  @jax.jit
  def full_step(p, st, tok):
    loss, g = jax.value_and_grad(lambda p: next_token_loss(apply(p, tok), tok))(p)
    u, st = opt.update(g, st, p)
    return optax.apply_updates(p, u), st, loss

  # --- LoRA
  def lora_setup(tuned):
    tx = peftjax.optimizer(opt, tuned)
    trainable, frozen = peftjax.split(tuned)

    @jax.jit
    def lora_step(t, frozen, st, tok):
      loss, g = jax.value_and_grad(
          lambda t: next_token_loss(forward(peftjax.combine(t, frozen), tok), tok))(t)
      u, st = tx.update(g, st, t)
      return optax.apply_updates(t, u), st, loss
    return lora_step, (trainable, frozen, tx.init(trainable), tokens)

  lora_step, lora_args = lora_setup(tuned)
  lora_step_f, lora_args_f = lora_setup(tuned_factored)
  merged = peftjax.merge(tuned)
  fwd_lift = jax.jit(forward)
  fwd_merged = jax.jit(apply)

  results, cpu = {}, {}
  load_start = os.getloadavg()
  # Interleave the measurements so drifting machine load hits both sides alike.
  rounds = 3
  runs = [("full_step_s", full_step, (params, full_state, tokens)),
          ("lora_step_s", lora_step, lora_args),
          ("lora_factored_step_s", lora_step_f, lora_args_f),
          ("merged_fwd_s", fwd_merged, (merged, tokens)),
          ("lift_fwd_s", fwd_lift, (tuned, tokens))]
  for _ in range(rounds):
    for name, fn, fargs in runs:
      results.setdefault(name, []).append(
          median_time(fn, *fargs, steps=args.steps, cpu=cpu.setdefault(name, [])))
  load_end = os.getloadavg()
  res = {k: min(v) for k, v in results.items()}
  cpu_s = {k: min(v) for k, v in cpu.items()}
  res["compile_fn_s"] = min(compile_time(apply, merged, tokens) for _ in range(2))
  res["compile_lift_s"] = min(compile_time(peftjax.lift(apply), tuned, tokens) for _ in range(2))
  ratios = {
      "lora_step / full_step": res["lora_step_s"] / res["full_step_s"],
      "lora_factored_step / full_step": res["lora_factored_step_s"] / res["full_step_s"],
      "lift_fwd / merged_fwd": res["lift_fwd_s"] / res["merged_fwd_s"],
      "trace+compile lift / fn": res["compile_lift_s"] / res["compile_fn_s"],
  }
  goals = {"lora_step / full_step": 0.75, "lora_factored_step / full_step": 0.75,
           "lift_fwd / merged_fwd": 1.10,
           "trace+compile lift / fn": 2.0}
  print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__}, "
        f"backend {jax.default_backend()}")
  print(f"model: {args.model}, shape: {args.shape} {cfg}, scan={args.scan}, LoRA r={args.rank}: "
        f"trainable {s.trainable:,} of {s.total:,} params; load average "
        f"{load_start[0]:.2f} -> {load_end[0]:.2f}, affinity {len(os.sched_getaffinity(0))} cpus")
  print(f"{'measure':32s} {'seconds':>10s} {'cpu s':>8s}")
  for k, v in res.items():
    c = f"{cpu_s[k]:8.4f}" if k in cpu_s else ""
    print(f"{k:32s} {v:10.4f} {c}")
  print(f"\n{'ratio':32s} {'value':>8s} {'goal':>6s}")
  for k, v in ratios.items():
    print(f"{k:32s} {v:8.3f} {'<=' + str(goals[k]):>6s} {'ok' if v <= goals[k] else 'MISSED'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "shape": cfg, "scan": args.scan, "rank": args.rank,
                 "seconds": res, "cpu_seconds": cpu_s, "ratios": ratios, "goals": goals,
                 "load_average": [load_start, load_end], "jax": jax.__version__,
                 "backend": jax.default_backend()}, f, indent=2)


if __name__ == "__main__":
  main()
