"""JAX side of the benchmarks: one measurement per process (run by ``benchmarks/run.py``).

    python benchmarks/bench_jax.py --case peftjax_lora --shape '{"vocab": 8192, ...}' \
        --steps 10 --warmup 2 [--dtype float32|bfloat16]

Cases:

* ``peftjax_lora`` / ``peftjax_full`` / ``peftjax_qlora``: one training step of
  :class:`peftjax.models.LlamaForCausalLM` (next-token cross-entropy, AdamW) as
  :func:`peftjax.train.make_train_step` builds it, jitted with the state donated, as
  :func:`peftjax.train.train` runs it. LoRA: :func:`peftjax.lora.apply` on the seven linear layers
  of every block + :func:`peftjax.lift`; QLoRA: :func:`peftjax.qlora.apply` (NF4, blocks of 64,
  double quantization); full: every parameter trained.
* ``qwix_lora`` / ``qwix_qlora``: the same model and step with Google's qwix
  (``qwix.apply_lora_to_model`` with a ``LoraRule`` on the same seven layers; QLoRA:
  ``weight_qtype="nf4"``, tiles of 64 values, or 32 where 64 does not divide the FFN).
* ``peftjax_infer``: forward latency of the base model, the merged LoRA model and the unmerged
  (lifted) one, interleaved in one process; then KV-cache generation tokens/s for the three.
* ``matmul_peak``: jitted ``[n, n] @ [n, n]`` (n = 2048 in f32 on CPU; 8192 in bf16 on an
  accelerator).

The last line of stdout is ``BENCH_RESULT {json}`` (see ``_common.emit``): step times, the first
call's time (compile), XLA's FLOP count of the compiled step (``cost_analysis``), peak RSS, and on
an accelerator the device's peak bytes in use.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import peftjax  # noqa: E402
from peftjax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from peftjax.train import TrainState, make_train_step  # noqa: E402

LEARNING_RATE = 1e-4


def versions() -> dict:
  """Versions of the JAX stack (and qwix if importable), plus peftjax's git commit."""
  import importlib.metadata as md
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "qwix", "peftjax"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def next_token_loss(logits, tokens):
  """Mean cross-entropy of ``tokens[:, 1:]`` given ``logits[:, :-1]`` (HF's ``labels=ids`` loss)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def build_model(shape: dict, dtype) -> tuple[LlamaForCausalLM, jax.Array]:
  """The Llama model of ``shape`` (MHA, untied head) and a batch of random token ids."""
  cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                    intermediate_size=shape["ffn"], num_layers=shape["layers"],
                    num_heads=shape["heads"], num_kv_heads=shape["heads"],
                    max_position_embeddings=max(2048, shape["seq"]), rms_norm_eps=1e-6)
  model = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
  ids = jax.random.randint(jax.random.key(1), (shape["batch"], shape["seq"]), 0, shape["vocab"],
                           dtype=jnp.int32)
  return model, ids


def init_params(model, ids):
  return jax.jit(model.init)(jax.random.key(0), ids)["params"]


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled program as XLA's cost analysis counts them (None if unavailable)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def device_memory() -> dict:
  """Peak bytes in use on the default device (accelerators; CPU reports nothing)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    stats = {}
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
          if k in stats}


def tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes")))


def run_train_step(step_fn, state, frozen, batch, steps, warmup):
  """Compiles ``step_fn(state, frozen, batch) -> (state, metrics)`` (state donated) and times it."""
  jitted = jax.jit(step_fn, donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = jitted.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = xla_flops(compiled)
  temp = temp_bytes(compiled)
  box = [state]
  losses = []

  def step():
    box[0], metrics = compiled(box[0], frozen, batch)
    losses.append(metrics["loss"])
    return metrics["loss"]

  times, first = _common.time_steps(step, warmup, steps, jax.block_until_ready)
  return {**_common.summarize(times), "compile_s": compile_s, "first_step_s": first,
          "xla_flops": flops, "temp_bytes": temp, "loss_first": float(losses[0]),
          "loss_last": float(losses[-1])}


def temp_bytes(compiled) -> int | None:
  """XLA's scratch memory of a compiled program (activations, logits, ...; None if unknown)."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None


# -- peftjax -------------------------------------------------------------------------------------

def case_peftjax(kind: str, shape: dict, dtype, steps: int, warmup: int) -> dict:
  """``kind``: ``"lora"``, ``"qlora"`` or ``"full"``."""
  model, ids = build_model(shape, dtype)
  params = init_params(model, ids)
  extra = {}
  if kind == "full":
    tuned = params
    trainable, frozen = params, jax.tree_util.tree_map(lambda _: None, params)
    tx = optax.adamw(LEARNING_RATE)
    forward = model.apply
    extra["trainable_params"] = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
  else:
    targets = list(_common.LINEAR_TARGETS)
    if kind == "lora":
      tuned = peftjax.lora.apply(params, rank=shape["rank"], alpha=shape["alpha"], targets=targets)
    else:
      compute = None if dtype == jnp.float32 else dtype
      tuned = peftjax.qlora.apply(params, rank=shape["rank"], alpha=shape["alpha"],
                                  targets=targets, format="nf4", block_size=64,
                                  double_quant=True, compute_dtype=compute)
      extra["bits_per_param"] = float(peftjax.quant.bits_per_param(tuned))
    del params
    gc.collect()
    s = peftjax.summary(tuned)
    extra["trainable_params"] = int(s.trainable)
    extra["total_params"] = int(s.total)
    trainable, frozen = peftjax.split(tuned)
    tx = peftjax.optimizer(optax.adamw(LEARNING_RATE), tuned)
    forward = peftjax.lift(model.apply)
  extra["frozen_bytes"] = tree_bytes(frozen)

  # peftjax's training loss (what `peftjax train` runs): the model's fused LM head +
  # cross-entropy (labels=), the same tokens as HF's labels=ids loss (every position but the last).
  labels = jnp.concatenate([ids[:, 1:], jnp.full((ids.shape[0], 1), -100, ids.dtype)], axis=1)
  weights = jnp.full(ids.shape, 1.0 / (ids.shape[0] * (ids.shape[1] - 1)), jnp.float32)

  def loss_fn(p, batch, key):
    del key
    return forward({"params": p}, batch["ids"], labels=batch["labels"],
                   loss_weights=batch["weights"]), {}

  def plain_loss_fn(p, batch, key):
    del key
    return next_token_loss(forward({"params": p}, batch["ids"]), batch["ids"]), {}

  state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key(0))
  batch = {"ids": ids, "labels": labels, "weights": weights}
  # The plain log-softmax loss's step is only compiled, for its scratch memory beside the fused one.
  extra["temp_bytes_plain_loss"] = temp_bytes(
      jax.jit(make_train_step(plain_loss_fn, tx)).lower(state, frozen, batch).compile())
  mem_setup = _common.memory()
  res = run_train_step(make_train_step(loss_fn, tx), state, frozen, batch, steps, warmup)
  return {**res, **extra, "rss_after_setup_bytes": mem_setup.get("rss_bytes"),
          **device_memory()}


# -- qwix ----------------------------------------------------------------------------------------

def qwix_bits_per_param(params) -> float | None:
  """Bits per kernel value of qwix's quantized kernels, as the arrays hold them in memory."""
  from flax import traverse_util
  from qwix._src.providers import ptq
  n_bytes = n_vals = 0
  for value in traverse_util.flatten_dict(params).values():
    if isinstance(value, ptq.WithAux):
      q = value.array
      n_bytes += sum(x.nbytes for x in jax.tree_util.tree_leaves(q))
      n_vals += int(np.prod(q.shape))
  return 8.0 * n_bytes / n_vals if n_vals else None


def case_qwix(kind: str, shape: dict, dtype, steps: int, warmup: int) -> dict:
  """``kind``: ``"lora"`` or ``"qlora"`` (NF4 base, no double quantization).

  qwix's NF4 tiles must divide each kernel's input axis: 64 where they do, else 32 (the reference
  FFN, 1376, is 43 x 32); the tile used is recorded.
  """
  import qwix
  from flax import traverse_util
  model, ids = build_model(shape, dtype)
  tile = None
  if kind == "qlora":  # qwix needs tiles that divide the contraction axis (FFN 1376 = 43 * 32)
    tile = next(t for t in (64, 32, 16, 8) if shape["hidden"] % t == 0 and shape["ffn"] % t == 0)
  rule = qwix.LoraRule(module_path=r".*/?(" + "|".join(_common.LINEAR_TARGETS) + r")$",
                       rank=shape["rank"], alpha=float(shape["alpha"]),
                       weight_qtype="nf4" if kind == "qlora" else None, tile_size=tile)
  lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
  params = lora_model.init(jax.random.key(0), ids)["params"]
  flat = traverse_util.flatten_dict(params)
  is_adapter = lambda k: k[-1].endswith(("_lora_a", "_lora_b"))
  trainable = {"/".join(k): v for k, v in flat.items() if is_adapter(k)}
  frozen = {"/".join(k): v for k, v in flat.items() if not is_adapter(k)}
  if not trainable:
    raise RuntimeError("qwix created no LoRA parameters: the module_path rule matched nothing")
  extra = {"trainable_params": int(sum(x.size for x in trainable.values())),
           "frozen_bytes": tree_bytes(frozen), "tile_size": tile}
  if kind == "qlora":
    extra["bits_per_param"] = qwix_bits_per_param(params)
  del params, flat
  gc.collect()
  tx = optax.adamw(LEARNING_RATE)

  def full_tree(t, f):
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in {**f, **t}.items()})

  def loss_fn(t, f, ids):
    return next_token_loss(lora_model.apply({"params": full_tree(t, f)}, ids), ids)

  def step_fn(state, frozen, batch):
    t, opt_state = state
    loss, g = jax.value_and_grad(loss_fn)(t, frozen, batch["ids"])
    u, opt_state = tx.update(g, opt_state, t)
    return (optax.apply_updates(t, u), opt_state), {"loss": loss}

  mem_setup = _common.memory()
  res = run_train_step(step_fn, (trainable, tx.init(trainable)), frozen, {"ids": ids}, steps,
                       warmup)
  return {**res, **extra, "rss_after_setup_bytes": mem_setup.get("rss_bytes"),
          **device_memory()}


# -- inference -----------------------------------------------------------------------------------

def _median_interleaved(fns: dict, reps: int) -> dict:
  """Median seconds of each zero-argument function, calls interleaved (rotating order)."""
  names = list(fns)
  for n in names:  # warm-up (compile)
    jax.block_until_ready(fns[n]())
  times = {n: [] for n in names}
  for i in range(reps):
    order = names[i % len(names):] + names[:i % len(names)]
    for n in order:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[n]())
      times[n].append(time.perf_counter() - t0)
  return {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
          for n, t in times.items()}


def case_infer(shape: dict, dtype, steps: int, gen_tokens: int, prompt_len: int) -> dict:
  """Forward latency and generation tokens/s: base vs merged LoRA vs unmerged (lifted) LoRA."""
  from peftjax.lora import LoraWeight
  from peftjax.models import generate
  model, ids = build_model(shape, dtype)
  params = init_params(model, ids)
  tuned = peftjax.lora.apply(params, rank=shape["rank"], alpha=shape["alpha"],
                             targets=list(_common.LINEAR_TARGETS))
  # A trained adapter (B != 0), so merging really changes the kernels.
  key = [jax.random.key(7)]

  def perturb(x):
    if isinstance(x, LoraWeight):
      key[0], sub = jax.random.split(key[0])
      return x.replace(b=0.01 * jax.random.normal(sub, x.b.shape, x.b.dtype))
    return x
  tuned = jax.tree_util.tree_map(perturb, tuned, is_leaf=lambda x: isinstance(x, LoraWeight))
  merged = peftjax.merge(tuned)
  fwd = jax.jit(model.apply)
  fwd_lift = jax.jit(peftjax.lift(model.apply))
  forward = _median_interleaved({
      "base": lambda: fwd({"params": params}, ids),
      "merged": lambda: fwd({"params": merged}, ids),
      "lift": lambda: fwd_lift({"params": tuned}, ids),
  }, reps=max(steps, 3))
  prompt = ids[:1, :prompt_len]

  def gen(p):
    return lambda: generate(model, p, prompt, max_new_tokens=gen_tokens, stop_tokens=()).tokens
  gen_t = _median_interleaved({"base": gen(params), "merged": gen(merged), "lift": gen(tuned)},
                              reps=max(3, steps // 3))
  tokens = prompt.shape[0] * gen_tokens
  generation = {n: dict(v, tokens_per_s=tokens / v["median_s"]) for n, v in gen_t.items()}
  return {"forward": forward, "generate": generation, "gen_tokens": gen_tokens,
          "prompt_len": int(prompt.shape[1]), "gen_batch": int(prompt.shape[0])}


def case_matmul(n: int, dtype, reps: int) -> dict:
  """Peak jitted matmul throughput (best and median over ``reps`` calls)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  times, _ = _common.time_steps(lambda: f(a, b), 2, reps, jax.block_until_ready)
  flops = 2.0 * n ** 3
  return {"n": n, "dtype": jnp.dtype(dtype).name, "flops": flops, **_common.summarize(times),
          "peak_flops_per_s": flops / min(times), "median_flops_per_s": flops / statistics.median(times)}


CASES = ("peftjax_lora", "peftjax_full", "peftjax_qlora", "qwix_lora", "qwix_qlora",
         "peftjax_infer", "matmul_peak")


def run_case(case: str, shape: dict, *, steps: int = 10, warmup: int = 2, dtype="float32",
             matmul_n: int = 2048, gen_tokens: int = 64, prompt_len: int = 16) -> dict:
  """Runs one case in this process and returns its result dict (what ``main`` emits)."""
  dt = jnp.dtype(dtype)
  if case.startswith("peftjax_") and case != "peftjax_infer":
    out = case_peftjax(case.split("_", 1)[1], shape, dt, steps, warmup)
  elif case.startswith("qwix_"):
    out = case_qwix(case.split("_", 1)[1], shape, dt, steps, warmup)
  elif case == "peftjax_infer":
    out = case_infer(shape, dt, steps, gen_tokens, prompt_len)
  elif case == "matmul_peak":
    out = case_matmul(matmul_n, dt, max(steps, 10))
  else:
    raise ValueError(f"unknown case {case!r}; known: {', '.join(CASES)}")
  dev = jax.devices()[0]
  return {"case": case, "shape": shape, "dtype": dt.name, "steps": steps, "warmup": warmup,
          "backend": jax.default_backend(), "device_kind": dev.device_kind,
          "versions": versions(), **_common.base_info(), **out}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--case", required=True, choices=CASES)
  ap.add_argument("--shape", required=True, help="JSON dict (see _common.SHAPES)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--matmul-n", type=int, default=2048)
  ap.add_argument("--gen-tokens", type=int, default=64)
  ap.add_argument("--prompt-len", type=int, default=16)
  args = ap.parse_args(argv)
  shape = json.loads(args.shape)
  _common.emit(run_case(args.case, shape, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                        matmul_n=args.matmul_n, gen_tokens=args.gen_tokens,
                        prompt_len=args.prompt_len))


if __name__ == "__main__":
  main()
