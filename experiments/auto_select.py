"""Automatic selection under a budget vs a random selection of the same budget.

For each seed: score every candidate parameter from a few gradient batches
(``peftjax.auto.importance``: empirical Fisher, or ``|w * grad|``), choose ``budget`` parameters
(``peftjax.auto.select`` at the granularity ``--units``), fine-tune only those, and do the same
with ``peftjax.auto.random_scores`` (a random selection of the same budget). Prints held-out
loss/accuracy per seed and the mean over seeds, and writes them as JSON with ``--out``.

Tasks:

* ``mlp`` (default; seconds): a "pretrained" MLP (a random teacher, 32 -> 64 -> 64 -> 8 classes)
  fine-tuned on a shifted task: the teacher's labels for inputs with four features remapped.
* ``minilm`` (real; slow on CPU): all-MiniLM-L6-v2 on the rotten-tomatoes sentiment sentences
  (``peftjax.tasks.classification_task``). The fresh classification head is first trained
  alone (a linear probe), then scores are computed and head + selection are fine-tuned; the
  encoder's embeddings are not candidates.

    python experiments/auto_select.py                              # mlp, element/row/leaf
    python experiments/auto_select.py --task minilm --budget 20000 --steps 150 --units element
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax
import peftjax.auto as auto
import peftjax.partial

D, H, C = 32, 64, 8
PERM = np.concatenate([np.roll(np.arange(4), 1), np.arange(4, D)])


def mlp_init(key):
  ks = jax.random.split(key, 3)
  dense = lambda k, i, o, s: {"kernel": s * jax.random.normal(k, (i, o)) / np.sqrt(i),
                              "bias": jnp.zeros(o)}
  return {"fc1": dense(ks[0], D, H, 1.5), "fc2": dense(ks[1], H, H, 1.5),
          "out": dense(ks[2], H, C, 4.0)}


def mlp(p, x):
  h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  h = jnp.tanh(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
  return h @ p["out"]["kernel"] + p["out"]["bias"]


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


@jax.jit
def mlp_data(teacher, key):
  x = jax.random.normal(key, (64, D))
  return x, jnp.argmax(mlp(teacher, x[:, PERM]), -1)


def train(tuned, loss, batches, lr):
  """Adam on the trainable part of ``tuned``; ``loss(tree, batch) -> scalar``."""
  tx = peftjax.optimizer(optax.adam(lr), tuned)
  tr, fr = peftjax.split(tuned)
  state = jax.jit(tx.init)(tr)

  @jax.jit
  def step(tr, state, b):
    g = jax.grad(lambda t: loss(peftjax.combine(t, fr), b))(tr)
    u, state = tx.update(g, state, tr)
    return optax.apply_updates(tr, u), state

  for b in batches:
    tr, state = step(tr, state, b)
  return peftjax.combine(tr, fr)


def run_mlp(seed, budget, unit, kind, steps):
  kt, kd, kr = jax.random.split(jax.random.key(seed), 3)
  teacher = jax.jit(mlp_init)(kt)
  batches = [mlp_data(teacher, jax.random.fold_in(kd, i)) for i in range(steps)]
  test = jax.tree.map(lambda *a: jnp.concatenate(a),
                      *[mlp_data(teacher, jax.random.fold_in(kd, 10**6 + j)) for j in range(32)])
  lifted = peftjax.lift(mlp)
  loss = lambda t, b: xent(lifted(t, b[0]), b[1])
  evaluate = jax.jit(lambda t: (lambda y: (xent(y, test[1]), (y.argmax(-1) == test[1]).mean()))(
      peftjax.lift(mlp)(t, test[0])))
  out = {"base": [float(v) for v in evaluate(teacher)]}
  plain_loss = lambda p, b: xent(mlp(p, b[0]), b[1])
  for name, scores in (("auto", auto.importance(plain_loss, teacher, batches[:4], kind=kind)),
                       ("random", auto.random_scores(teacher, kr))):
    tuned = auto.select(teacher, scores, budget, unit=unit)
    trained = train(tuned, loss, batches, 2e-2)
    out[name] = [float(v) for v in evaluate(trained)] + [peftjax.summary(tuned).trainable]
  return out


def run_minilm(seed, budget, unit, kind, steps, probe_steps=100, eval_limit=1000):
  from peftjax import tasks
  task = tasks.classification_task("minilm", batch_size=32, max_len=48, seed=seed,
                                   eval_limit=eval_limit)
  loss = lambda p, b: task.loss_fn(p, b, None)[0]
  head = task.head_targets
  batches = [next(task.train_loader) for _ in range(probe_steps + steps)]
  eval_batches = list(task.eval_batches())

  def evaluate(params):
    f = jax.jit(task.eval_fn)
    tot = {}
    for b in eval_batches:
      for k, (s, n) in f(params, b).items():
        a = tot.setdefault(k, [0.0, 0])
        a[0] += float(s)
        a[1] += int(n)
    return [tot["loss"][0] / tot["loss"][1], tot["accuracy"][0] / tot["accuracy"][1]]

  # 1. linear probe: the fresh head alone
  probed = peftjax.merge(train(peftjax.partial.apply(task.params, targets=head), loss,
                               batches[:probe_steps], 1e-3))
  out = {"base": evaluate(probed)}
  body = rf"^(?!{head})(?!.*embeddings/).*$"
  for name, scores in (
      ("auto", auto.importance(loss, probed, batches[:8], kind=kind, targets=body)),
      ("random", auto.random_scores(probed, jax.random.key(seed), targets=body))):
    tuned = peftjax.partial.apply(auto.select(probed, scores, budget, unit=unit), targets=head)
    n = peftjax.summary(tuned).trainable
    trained = train(tuned, loss, batches[probe_steps:], 1e-3)
    out[name] = evaluate(trained) + [n]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--task", choices=("mlp", "minilm"), default="mlp")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--first-seed", type=int, default=0)
  ap.add_argument("--budget", type=int, default=None, help="trainable parameters (mlp: 256)")
  ap.add_argument("--units", default=None, help="comma list of element,row,leaf")
  ap.add_argument("--kinds", default="fisher", help="comma list of fisher,grad_weight")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  args = ap.parse_args(argv)
  mlp_task = args.task == "mlp"
  budget = args.budget or (256 if mlp_task else 20000)
  units = (args.units or ("element,row,leaf" if mlp_task else "element")).split(",")
  steps = args.steps or (100 if mlp_task else 150)
  run = run_mlp if mlp_task else run_minilm
  results = []
  for kind in args.kinds.split(","):
    for unit in units:
      t0 = time.time()
      seeds = range(args.first_seed, args.first_seed + args.seeds)
      runs = [run(seed, budget, unit, kind, steps) for seed in seeds]
      mean = {k: np.mean([r[k][:2] for r in runs], axis=0).tolist() for k in ("base", "auto", "random")}
      results.append({"task": args.task, "kind": kind, "unit": unit, "budget": budget,
                      "steps": steps, "seeds": list(seeds), "runs": runs, "mean": mean})
      for s, r in zip(seeds, runs):
        print(f"  seed {s}: base acc {r['base'][1]:.3f} | auto loss {r['auto'][0]:.3f} acc "
              f"{r['auto'][1]:.3f} ({r['auto'][2]} params) | random loss {r['random'][0]:.3f} "
              f"acc {r['random'][1]:.3f} ({r['random'][2]} params)")
      print(f"{args.task} {kind:11s} {unit:7s} budget {budget}: held-out accuracy auto "
            f"{mean['auto'][1]:.3f} vs random {mean['random'][1]:.3f} (base {mean['base'][1]:.3f});"
            f" loss auto {mean['auto'][0]:.3f} vs random {mean['random'][0]:.3f} "
            f"[{args.seeds} seeds, {time.time() - t0:.0f}s]", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
