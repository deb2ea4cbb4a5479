"""The quickstart job: LoRA fine-tuning of a small Flax transformer, end to end.

Builds a small causal transformer (peftjax.testing.TinyTransformer, layers scanned), rewrites its
linear layers to LoRA with ``peftjax.lora.apply``, prints the trainable-parameter table, and
trains the adapters with ``peftjax.optimizer`` on character-level text (this repository's
README), printing the loss as it falls. Finally it checks that the merged model computes the same
logits as the factored one.

    python experiments/quickstart.py [--steps 150] [--rank 8]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax
from peftjax.testing import TinyTransformer, next_token_loss


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=64)
  args = ap.parse_args(argv)

  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
  data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) % 128
  model = TinyTransformer(vocab=128, dim=128, heads=4, ffn=256, layers=4, scan=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))

  tuned = peftjax.lora.apply(params, rank=args.rank, alpha=2 * args.rank, key=jax.random.key(1))
  print(peftjax.summary(tuned).table(max_rows=12))

  forward = peftjax.lift(model.apply)
  tx = peftjax.optimizer(optax.adamw(3e-3, weight_decay=0.0), tuned)
  trainable, frozen = peftjax.split(tuned)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda t: next_token_loss(forward(peftjax.combine(t, frozen), batch), batch))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  first = None
  for i in range(1, args.steps + 1):
    starts = rng.integers(0, len(data) - args.seq, args.batch)
    batch = jnp.asarray(np.stack([data[s:s + args.seq] for s in starts]))
    trainable, opt_state, loss = step(trainable, opt_state, batch)
    first = float(loss) if first is None else first
    if i == 1 or i % 25 == 0 or i == args.steps:
      print(f"step {i:4d}  loss {float(loss):.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)

  tuned_after = peftjax.combine(trainable, frozen)
  batch = jnp.asarray(data[None, :args.seq])
  merged = peftjax.merge(tuned_after)
  diff = float(jnp.max(jnp.abs(forward(tuned_after, batch) - model.apply(merged, batch))))
  print(f"\nloss {first:.4f} -> {float(loss):.4f}; lift vs merged max |diff| = {diff:.2e}")
  if not float(loss) < first or diff > 1e-4:
    raise SystemExit("quickstart check failed")


if __name__ == "__main__":
  main()
