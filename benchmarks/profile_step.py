"""Where the time of a training step goes: per-HLO-op times from a profiler trace, by category.

    python benchmarks/profile_step.py [--model tiny|llama] [--which lora,full,lora_factored]
                                      [--steps 3] [--top 15] [--json out.json]

For each step function it (1) compiles the jitted step and reads the optimized HLO of its entry
computation (the thunks XLA:CPU runs), (2) runs ``--steps`` steps under ``jax.profiler`` and
sums the duration of every thunk event by HLO instruction, and (3) classifies each instruction:

* ``matmul``: a fusion (or custom call) whose body has a ``dot``/``convolution``; its FLOPs are
  counted from the shapes, so the table also gives the achieved GFLOP/s;
* ``reduce``: a fusion whose root is a ``reduce`` (softmax max/sum, norms, loss);
* ``transpose/copy``: fusions made of ``transpose``/``copy``/``bitcast``/``broadcast`` only;
* ``gather/scatter``: embedding lookup, the loss's one-hot scatter, their gradients;
* ``fused transpose``: an elementwise fusion that also writes its result transposed (XLA's layout
  assignment moving an operand into the layout a dot wants);
* ``elementwise``: every other fusion (activations, norms, adds, the optimizer update);
* ``other``: anything not matched (e.g. ``while``/``call`` thunks, whose bodies are counted
  where they run).

Thunk events nest inside ``ThunkExecutor::Execute`` events and may run on both XLA threads at
once; the "thunk time" below is the sum of the leaf thunks' durations, the "wall" is the
median step time under the profiler. The trace itself adds a few percent.

Shape "reference" is DESIGN.md's (vocab 8192, hidden 512, 4 layers, 8 heads, FFN 1376, batch 4,
seq 128; LoRA r=8 alpha 16 on all seven linears). XLA flags are read from ``XLA_FLAGS`` as usual;
``--xla-flags`` appends to it before jax is imported.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=["tiny", "llama"], default="tiny")
  ap.add_argument("--shape", choices=["reference", "small"], default="reference")
  ap.add_argument("--which", default="lora,full",
                  help="comma list of: lora, lora_factored, lora_merged, full, lora_fwd, full_fwd")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=15, help="rows of the per-op table")
  ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
  ap.add_argument("--dump-hlo", default=None, help="directory to write the optimized HLO to")
  ap.add_argument("--json", default=None)
  return ap.parse_args(argv)


# -- HLO parsing ----------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?|\([^)]*\))"
                    r"\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _dims(shape_str):
  m = _SHAPE.search(shape_str)
  if not m:
    return None, ()
  return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def parse_hlo(text):
  """``{computation: [(name, shape, opcode, rest)]}`` and the entry computation's name."""
  comps, cur, entry = {}, None, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      if m.group(1):
        entry = cur
      continue
    if line.startswith("}"):
      cur = None
      continue
    if cur is None:
      continue
    m = _INSTR.match(line)
    if m:
      comps[cur].append((m.group(2), m.group(3), m.group(4), m.group(5)))
  return comps, entry


def _called(rest):
  return re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", rest)


def _dot_flops(instrs_by_name, name, shape, rest):
  """2 * prod(out) * prod(contracted lhs dims) for a dot."""
  _, out = _dims(shape)
  ops = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  lc = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  if not ops or not lc:
    return 0
  lhs = instrs_by_name.get(ops[0])
  if lhs is None:
    return 0
  _, lshape = _dims(lhs[1])
  k = math.prod(lshape[int(i)] for i in lc.group(1).split(",") if i) if lc.group(1) else 1
  return 2 * math.prod(out) * k


def classify(comps, entry):
  """``{entry instruction: (category, flops, shape, opcode summary)}``."""
  out = {}
  for name, shape, opcode, rest in comps.get(entry, []):
    if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
      continue
    body_ops, flops, root = [], 0, None
    todo = _called(rest)
    seen = set()
    while todo:
      c = todo.pop()
      if c in seen or c not in comps:
        continue
      seen.add(c)
      by_name = {i[0]: i for i in comps[c]}
      for iname, ishape, iop, irest in comps[c]:
        body_ops.append(iop)
        if iop in ("dot", "convolution"):
          flops += _dot_flops(by_name, iname, ishape, irest)
        if iop in ("fusion", "call", "while", "conditional"):
          todo.extend(_called(irest))
      if root is None and comps[c]:
        root = comps[c][-1][2]
    ops = set(body_ops) - {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}
    if opcode in ("dot", "convolution"):
      flops = _dot_flops({i[0]: i for i in comps[entry]}, name, shape, rest)
      cat = "matmul"
    elif opcode in ("custom-call",):
      cat = "matmul" if re.search(r"matmul|dot|gemm", rest, re.I) else "other"
    elif opcode in ("while", "call", "conditional"):
      cat = "other"
    elif flops or "dot" in ops or "convolution" in ops:
      cat = "matmul"
    elif ops & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
      cat = "gather/scatter"
    elif "reduce" in ops or "reduce-window" in ops:
      cat = "reduce"
    elif opcode in ("copy", "transpose", "broadcast") or (
        ops and ops <= {"transpose", "copy", "broadcast", "slice", "concatenate", "reshape"}):
      cat = "transpose/copy"
    elif "transpose" in ops:
      cat = "fused transpose"
    else:
      cat = "elementwise"
    summary = opcode if opcode != "fusion" else "fusion{" + ",".join(
        sorted(ops - {"broadcast", "reshape"}))[:60] + "}"
    out[name] = (cat, flops, shape, summary)
  return out


# -- trace parsing --------------------------------------------------------------------------------

def thunk_times(trace_dir, names, steps):
  """Per-step duration (s) of every HLO instruction in ``names``: the minimum over the steps.

  Each instruction runs once per step (or a fixed number of times), so its events, in time order,
  split into ``steps`` equal runs; the minimum over the runs discards the steps in which the
  thread was preempted by other processes (the machines are shared).
  """
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"no trace written under {trace_dir}")
  d = json.load(gzip.open(sorted(files)[-1]))
  evs = collections.defaultdict(list)
  for e in d["traceEvents"]:
    if e.get("ph") == "X" and e["name"] in names:
      evs[e["name"]].append((e["ts"], e["dur"]))
  out = {}
  for n, lst in evs.items():
    lst.sort()
    k = len(lst) // steps
    if k == 0 or len(lst) % steps:
      out[n] = sum(d for _, d in lst) / steps / 1e6
      continue
    out[n] = min(sum(d for _, d in lst[i * k:(i + 1) * k]) for i in range(steps)) / 1e6
  return out


# -- models ---------------------------------------------------------------------------------------

SHAPES = {
    "reference": dict(vocab=8192, dim=512, heads=8, ffn=1376, layers=4, batch=4, seq=128),
    "small": dict(vocab=1024, dim=128, heads=4, ffn=384, layers=2, batch=4, seq=64),
}


def build(model_name, shape, which):
  """The step functions to profile: ``{label: (jitted fn, args)}``."""
  import jax
  import optax
  import peftjax
  from peftjax.testing import next_token_loss
  cfg = SHAPES[shape]
  tokens = jax.random.randint(jax.random.key(1), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])
  if model_name == "tiny":
    from peftjax.testing import TinyTransformer
    model = TinyTransformer(vocab=cfg["vocab"], dim=cfg["dim"], heads=cfg["heads"],
                            ffn=cfg["ffn"], layers=cfg["layers"])
    params = model.init(jax.random.key(0), tokens)
    apply = model.apply
    targets = lambda p, x: p.endswith("kernel") and "lm_head" not in p
  else:
    from peftjax.models.llama import LlamaConfig, LlamaForCausalLM
    lc = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["dim"],
                     intermediate_size=cfg["ffn"], num_layers=cfg["layers"],
                     num_heads=cfg["heads"], num_kv_heads=cfg["heads"])
    model = LlamaForCausalLM(lc)
    params = {"params": model.init(jax.random.key(0), tokens)["params"]}
    apply = lambda p, tok: model.apply(p, tok)
    targets = r".*(q|k|v|o|gate|up|down)_proj/kernel"
  opt = optax.adamw(1e-4)
  fns = {}
  for label in which:
    if label == "full":
      @jax.jit
      def full_step(p, st, tok):
        loss, g = jax.value_and_grad(lambda p: next_token_loss(apply(p, tok), tok))(p)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st, loss
      fns[label] = (full_step, (params, opt.init(params), tokens))
    elif label == "full_fwd":
      fns[label] = (jax.jit(apply), (params, tokens))
    elif label.startswith("lora"):
      matmul = {"lora": "auto", "lora_fwd": "auto", "lora_factored": "factored",
                "lora_merged": "merged"}[label]
      tuned = peftjax.lora.apply(params, rank=8, alpha=16, targets=targets, matmul=matmul)
      forward = peftjax.lift(apply)
      if label == "lora_fwd":
        fns[label] = (jax.jit(forward), (tuned, tokens))
        continue
      tx = peftjax.optimizer(opt, tuned)
      trainable, frozen = peftjax.split(tuned)

      @jax.jit
      def lora_step(t, frozen, st, tok, tx=tx, forward=forward):
        loss, g = jax.value_and_grad(
            lambda t: next_token_loss(forward(peftjax.combine(t, frozen), tok), tok))(t)
        u, st = tx.update(g, st, t)
        return optax.apply_updates(t, u), st, loss
      fns[label] = (lora_step, (trainable, frozen, tx.init(trainable), tokens))
    else:
      raise SystemExit(f"unknown step {label!r}")
  return fns


def profile(label, fn, args, steps, dump_dir=None):
  import jax
  compiled = fn.lower(*args).compile()
  text = compiled.as_text()
  if dump_dir:
    os.makedirs(dump_dir, exist_ok=True)
    with open(os.path.join(dump_dir, f"{label}.hlo.txt"), "w") as f:
      f.write(text)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  comps, entry = parse_hlo(text)
  info = classify(comps, entry)
  jax.block_until_ready(fn(*args))
  walls = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
  untraced = sorted(walls)[len(walls) // 2]
  tdir = tempfile.mkdtemp(prefix="peftjax_prof_")
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0
  jax.profiler.start_trace(tdir, profiler_options=opts)
  walls = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
  jax.profiler.stop_trace()
  times = thunk_times(tdir, set(info), steps)
  per_op = {n: times.get(n, 0.0) for n in info}
  return dict(label=label, wall_s=sorted(walls)[len(walls) // 2], untraced_s=untraced,
              flops=cost.get("flops", 0.0), bytes=cost.get("bytes accessed", 0.0),
              per_op=per_op, info=info, load=os.getloadavg())


def report(p, top):
  cats = collections.defaultdict(lambda: [0.0, 0, 0])
  for n, t in p["per_op"].items():
    cat, flops, _, _ = p["info"][n]
    c = cats[cat]
    c[0] += t
    c[1] += flops
    c[2] += 1
  total = sum(c[0] for c in cats.values())
  print(f"\n== {p['label']}: step {p['untraced_s']:.4f} s untraced, {p['wall_s']:.4f} s traced; "
        f"thunk time {total:.4f} s; XLA cost: {p['flops'] / 1e9:.2f} GFLOP, "
        f"{p['bytes'] / 1e9:.2f} GB accessed; load {tuple(round(x, 2) for x in p['load'])}")
  print(f"{'category':16s} {'ops':>5s} {'seconds':>9s} {'share':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s}")
  for cat, (t, fl, n) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
    rate = f"{fl / t / 1e9:8.1f}" if fl and t else f"{'':8s}"
    print(f"{cat:16s} {n:5d} {t:9.4f} {t / total:6.1%} {fl / 1e9:7.2f} {rate}")
  groups = collections.defaultdict(lambda: [0.0, 0, 0])
  for n, t in p["per_op"].items():
    cat, fl, shape, _ = p["info"][n]
    if cat != "matmul" or not fl:
      continue
    _, out_dims = _dims(shape)
    key = f"{list(out_dims)} K={fl // (2 * math.prod(out_dims))}"
    g = groups[key]
    g[0] += t
    g[1] += fl
    g[2] += 1
  print(f"\nmatmuls by output shape and contraction size")
  print(f"{'output, K':28s} {'ops':>5s} {'seconds':>9s} {'GFLOP':>7s} {'GFLOP/s':>8s}")
  for key, (t, fl, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
    rate = f"{fl / t / 1e9:8.1f}" if t else ""
    print(f"{key:28s} {n:5d} {t:9.4f} {fl / 1e9:7.2f} {rate}")
  print(f"\ntop {top} ops")
  print(f"{'op':28s} {'category':15s} {'seconds':>8s} {'GFLOP/s':>8s}  shape / body")
  for n, t in sorted(p["per_op"].items(), key=lambda kv: -kv[1])[:top]:
    cat, fl, shape, summ = p["info"][n]
    rate = f"{fl / t / 1e9:8.1f}" if fl and t else f"{'':8s}"
    print(f"{n[:28]:28s} {cat:15s} {t:8.4f} {rate}  {shape[:40]} {summ[:70]}")
  return {cat: dict(seconds=t, gflop=fl / 1e9, ops=n) for cat, (t, fl, n) in cats.items()}


def main(argv=None):
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  import jax
  print(f"jax {jax.__version__}, {os.cpu_count()} cpus, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  fns = build(args.model, args.shape, args.which.split(","))
  out = {}
  for label, (fn, fargs) in fns.items():
    p = profile(label, fn, fargs, args.steps, args.dump_hlo)
    out[label] = dict(step_s=p["untraced_s"], traced_s=p["wall_s"], gflop=p["flops"] / 1e9,
                      categories=report(p, args.top), load=p["load"],
                      ops={n: [t, *p["info"][n]] for n, t in sorted(
                          p["per_op"].items(), key=lambda kv: -kv[1])[:300]})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(model=args.model, shape=args.shape, xla_flags=os.environ.get("XLA_FLAGS", ""),
                     results=out), f, indent=2)
  return out


if __name__ == "__main__":
  main()
