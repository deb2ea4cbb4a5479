"""PyTorch side of the side-by-side profile: HF PEFT's LoRA step under ``torch.profiler``.

    python benchmarks/profile_torch.py --steps 5 --threads 2 --json out.json

The step is ``benchmarks/bench_torch.py``'s (``transformers.LlamaForCausalLM`` at the reference
shape, HF PEFT ``LoraConfig`` on the seven linear layers, ``labels=input_ids``, AdamW, eager). Every
profiler event's *self* time (its duration minus its children's) is put in one group:

* ``optimizer``: anything under ``Optimizer.step``;
* ``attention``: ``scaled_dot_product_attention`` and its backward, with everything under them;
* ``matmul``: ``aten::mm``/``addmm``/``bmm`` elsewhere, with FLOPs from the recorded input shapes;
* ``gather/scatter``: the embedding lookup and its gradient, ``index_*``, ``gather``/``scatter``;
* ``copy/transpose``: ``copy_``, ``clone``, ``contiguous``, ``_to_copy``, ``cat``;
* ``elementwise, norms, loss``: every other op (RMSNorm, SiLU, RoPE, softmax of the loss, adds).

Times are per step (the sum over ``--steps`` profiled steps divided by their number, after two
warm-up steps). ``benchmarks/profile_compare.py`` runs this next to the JAX profile.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GROUPS = ("matmul", "attention", "elementwise, norms, loss", "optimizer", "copy/transpose",
          "gather/scatter", "other")

_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_COPY = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat",
         "aten::to"}
_GATHER = {"aten::embedding", "aten::embedding_dense_backward", "aten::index_select",
           "aten::index", "aten::gather", "aten::scatter", "aten::scatter_add_",
           "aten::index_add_", "aten::index_put_", "aten::_index_put_impl_",
           "aten::embedding_backward"}


def _mm_flops(name, shapes):
  try:
    if name == "aten::mm":
      (m, k), (_, n) = shapes[0], shapes[1]
      return 2 * m * k * n, (m, n), k
    if name == "aten::addmm":
      (m, k), (_, n) = shapes[1], shapes[2]
      return 2 * m * k * n, (m, n), k
    if name in ("aten::bmm", "aten::baddbmm"):
      a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
      return 2 * a[0] * a[1] * a[2] * b[2], (a[0], a[1], b[2]), a[2]
  except (IndexError, ValueError, TypeError):
    pass
  return 0, None, None


def group_of(ev) -> str:
  names = []
  e = ev
  while e is not None:
    names.append(e.name)
    e = e.cpu_parent
  if any(n.startswith("Optimizer.step") or n.startswith("Optimizer.zero_grad") for n in names):
    return "optimizer"
  if any("scaled_dot_product" in n.lower() or "ScaledDotProduct" in n for n in names):
    return "attention"
  if ev.name in _MATMUL:
    return "matmul"
  if ev.name in _GATHER:
    return "gather/scatter"
  if ev.name in _COPY:
    return "copy/transpose"
  if ev.name.startswith("aten::"):
    return "elementwise, norms, loss"
  return "other"


def profile(shape: dict, steps: int, threads: int) -> dict:
  import torch
  from peft import get_peft_model
  import bench_torch
  torch.set_num_threads(threads)
  model, ids = bench_torch.build_model(shape)
  model = get_peft_model(model, bench_torch.lora_config(shape))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=bench_torch.LEARNING_RATE)

  def step():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  import time
  for _ in range(2):
    step()
  walls = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    walls.append(time.perf_counter() - t0)
  untraced = sorted(walls)[len(walls) // 2]
  from torch.profiler import ProfilerActivity, profile as tprofile
  with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(steps):
      step()
  groups = collections.defaultdict(lambda: [0.0, 0, 0])
  mm = collections.defaultdict(lambda: [0.0, 0, 0])
  for ev in prof.events():
    self_us = ev.self_cpu_time_total
    if self_us <= 0:
      continue
    g = group_of(ev)
    flops = 0
    if ev.name in _MATMUL:
      flops, out, k = _mm_flops(ev.name, ev.input_shapes)
      if out is not None and g == "matmul":
        rec = mm[f"{list(out)} K={k}"]
        rec[0] += self_us * 1e-6 / steps
        rec[1] += flops / steps
        rec[2] += 1
    rec = groups[g]
    rec[0] += self_us * 1e-6 / steps
    rec[1] += flops / steps
    rec[2] += 1
  return {"step_s": untraced, "threads": threads, "torch": torch.__version__,
          "groups": {g: dict(seconds=v[0], gflop=v[1] / 1e9, ops=v[2] // steps)
                     for g, v in groups.items()},
          "matmuls": {k: dict(seconds=v[0], gflop=v[1] / 1e9, ops=v[2] // steps)
                      for k, v in mm.items()},
          "load": os.getloadavg()}


def main(argv=None):
  import _common
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="reference", choices=sorted(_common.SHAPES))
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--json", default=None)
  a = ap.parse_args(argv)
  out = profile(dict(_common.SHAPES[a.shape]), a.steps, a.threads)
  text = json.dumps(out, indent=1)
  if a.json:
    with open(a.json, "w") as f:
      f.write(text)
  else:
    print(text)


if __name__ == "__main__":
  main()
