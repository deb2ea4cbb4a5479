"""Multi-adapter decoding: tokens/s of a batch of 32 requests spread over 1, 4, 16 and 64 LoRA adapters.

    .venv/bin/python benchmarks/multi_decode.py              # 3 interleaved rounds -> results JSON
    .venv/bin/python benchmarks/multi_decode.py --quick      # tiny shape, 1 round (development)

Cases (CPU, f32, DESIGN.md's reference Llama shape: vocab 8192, hidden 512, 4 layers, 8 heads,
FFN 1376; LoRA r=8, alpha 16 on the seven linear layers; ``batch`` = 32 rows):

* ``pool_N`` (N = 1, 4, 16, 64): ``peftjax.multi.stack`` of N adapters (N + 1 slots, slot 0 the
  base), row ``i`` routed to adapter ``i mod N`` (with 64 adapters in the pool a 32-row batch holds
  32 distinct ones: the most it can), decoded with ``peftjax.models.generate.decode_step`` (the
  serve engine's step: per-row KV cache, per-row adapter ids as data, one compiled program);
* ``base``: the same step on the base parameters; ``lora``: one plain LoRA tree (lifted);
  ``merged``: that adapter merged into the kernels;
* ``torch_mixed_N``: HF PEFT with N adapters loaded, ``model(..., adapter_names=[...])`` (its
  mixed-adapter batch) with a ``DynamicCache``, eager PyTorch, same config and ranks;
  ``torch_base`` (adapters disabled) and ``torch_lora`` (one active adapter).

Each case first runs ``prompt`` untimed steps (warm-up and compile, and the cache's prompt), then
``steps`` timed decode steps, greedy. Two child processes (JAX in this interpreter, PyTorch in
``benchmarks/.venv-torch`` or ``--torch-python``) are started once, build and compile everything,
then run round after round when the runner says so, alternating (the order rotates each round),
so both sides of every ratio come from the same round. Ratios are computed per round; a goal is
"met" only when every round meets it. The 1-minute load average is recorded around every round.
Results: ``benchmarks/results/multi-decode-cpu.json`` (``--quick``: ``multi-decode-quick.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common  # noqa: E402

ADAPTER_COUNTS = (1, 4, 16, 64)
BATCH = 32
SHAPES = {
    "reference": dict(_common.SHAPES["reference"], batch=BATCH, prompt=16, steps=16),
    "quick": dict(_common.SHAPES["quick"], batch=8, prompt=4, steps=4),
}
QUICK_COUNTS = (1, 4, 16)
#: (ratio name, numerator case, denominator case, op, target): the issue's goals (#16).
GOALS = [("64 adapters / 1-adapter pool", "pool_64", "pool_1", ">=", 0.75),
         ("16 adapters / HF PEFT mixed batch, 16 adapters", "pool_16", "torch_mixed_16", ">=", 3.0),
         ("64 adapters / HF PEFT mixed batch, 64 adapters", "pool_64", "torch_mixed_64", ">=", 3.0)]


def ratio_specs(counts) -> list:
  """Reported (not goal) ratios of tokens/s: every pool vs the 1-adapter pool, one plain adapter,
  the base, and HF PEFT's mixed batch with as many adapters."""
  out = []
  for n in counts:
    out += [(f"{n} adapters / 1-adapter pool", f"pool_{n}", "pool_1"),
            (f"{n} adapters / one plain LoRA", f"pool_{n}", "lora"),
            (f"{n} adapters / base", f"pool_{n}", "base"),
            (f"{n} adapters / HF PEFT mixed batch", f"pool_{n}", f"torch_mixed_{n}")]
  out += [("one plain LoRA / base", "lora", "base"), ("merged / base", "merged", "base"),
          ("HF PEFT one LoRA / PyTorch base", "torch_lora", "torch_base")]
  return out


# -- aggregation (pure Python: tested by tests/test_benchmarks.py) --------------------------------

def aggregate(rounds: list[dict], counts=ADAPTER_COUNTS) -> dict:
  """Per-case summaries, ratios and goals from ``rounds``: one ``{case: tokens_per_s}`` per round
  (a case missing from a round is None there).

  Returns ``{"cases": {case: {tokens_per_s (median), rounds}}, "ratios": {...}, "goals": [...]}``;
  each ratio and goal holds its per-round values (both sides from the same round) and the ratio of
  the medians; a goal is met only if every round's own ratio meets it (``met_rounds`` of them do).
  """
  names = sorted({c for r in rounds for c in r})
  cases = {}
  for c in names:
    vals = [r.get(c) for r in rounds]
    ok = [v for v in vals if v is not None]
    cases[c] = {"tokens_per_s": statistics.median(ok) if ok else None, "rounds": vals}

  def per_round(a, b):
    return [x / y if x is not None and y else None
            for x, y in zip(cases.get(a, {}).get("rounds", [None] * len(rounds)),
                            cases.get(b, {}).get("rounds", [None] * len(rounds)))]

  def med_ratio(a, b):
    x, y = cases.get(a, {}).get("tokens_per_s"), cases.get(b, {}).get("tokens_per_s")
    return x / y if x is not None and y else None

  ratios = {}
  for name, a, b in ratio_specs(counts):
    v = med_ratio(a, b)
    if v is not None:
      ratios[name] = {"value": v, "rounds": per_round(a, b), "cases": [a, b]}
  goals = []
  for name, a, b, op, target in GOALS:
    v = med_ratio(a, b)
    rs = [r for r in per_round(a, b) if r is not None]
    meets = (lambda x: x >= target) if op == ">=" else (lambda x: x <= target)
    k = sum(meets(r) for r in rs)
    goals.append({"name": name, "value": v, "op": op, "target": target, "rounds": rs,
                  "met_rounds": k, "met": None if v is None else (meets(v) and k == len(rs)),
                  "cases": [a, b]})
  return {"cases": cases, "ratios": ratios, "goals": goals}


goal_state = _common.goal_state


def loaded(load_max: float | None, threshold: float = 2.0) -> bool:
  return load_max is not None and load_max > threshold


# -- tables (README and docs/serving.md, generated by experiments/readme_tables.py) ----------

DOC_BEGIN, DOC_END = "<!-- multi_decode:begin -->", "<!-- multi_decode:end -->"
RESULTS = os.path.join(HERE, "results", "multi-decode-cpu.json")


def _run_line(results: dict) -> str:
  meta = results["meta"]
  s, v = meta["shape"], meta.get("versions", {})
  lm = meta.get("load_max_1min")
  return (f"Run {meta['started'][:10]}, {meta['cpu_count']} CPU cores ({meta['threads']} threads), "
          f"f32; Llama vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, "
          f"{s['heads']} heads, FFN {s['ffn']}; LoRA r={s['rank']}, alpha {s['alpha']} on the "
          f"seven linear layers; {s['batch']} rows, {s['steps']} timed decode steps after "
          f"{s['prompt']} untimed; {meta['rounds']} interleaved rounds; jax {v.get('jax', '?')}, "
          f"PyTorch {v.get('torch', '?')}, peft {v.get('peft', '?')}; 1-min load "
          f"{meta['load_start'][0]} at the start, max {lm}"
          + (" (**loaded: above 2, figures are noisy**)" if meta.get("loaded") else "") + ".")


def readme_table(results: dict) -> str:
  """The README's short table: tokens/s by adapter count, peftjax pool vs HF PEFT, and goals."""
  c, r = results["cases"], results["ratios"]
  counts = results["meta"]["adapter_counts"]
  tps = lambda n: (c.get(n) or {}).get("tokens_per_s")
  fmt = lambda x: "–" if x is None else f"{x:,.0f}"
  ratio = lambda k: "–" if k not in r else f"{r[k]['value']:.2f}x"
  L = [_run_line(results), "",
       "| adapters in the batch | peftjax pool tokens/s | vs 1-adapter pool | vs base | "
       "HF PEFT `adapter_names` tokens/s | peftjax / HF PEFT |", "|---|---|---|---|---|---|"]
  for n in counts:
    L.append(f"| {n}{' (32 distinct per batch)' if n > results['meta']['shape']['batch'] else ''}"
             f" | {fmt(tps(f'pool_{n}'))} | {ratio(f'{n} adapters / 1-adapter pool')} | "
             f"{ratio(f'{n} adapters / base')} | {fmt(tps(f'torch_mixed_{n}'))} | "
             f"{ratio(f'{n} adapters / HF PEFT mixed batch')} |")
  L.append(f"| base alone / one plain LoRA (lifted) / merged | {fmt(tps('base'))} / "
           f"{fmt(tps('lora'))} / {fmt(tps('merged'))} | | | {fmt(tps('torch_base'))} / "
           f"{fmt(tps('torch_lora'))} / – | |")
  L += ["", "Goals (met only if every round's own ratio meets it):", ""]
  for g in results["goals"]:
    each = ", ".join(f"{x:.2f}" for x in g["rounds"])
    L.append(f"- {g['name']} {g['op']} {g['target']}x: "
             + ("not measured" if g["value"] is None else
                f"{g['value']:.2f}x (rounds: {each}), **{goal_state(g)}**"))
  return "\n".join(L)


def doc_section(results: dict) -> str:
  """docs/serving.md's section: every case's tokens/s per round, every ratio per round."""
  c, meta = results["cases"], results["meta"]
  L = ["Decode tokens/s of one batch whose rows use different LoRA adapters "
       "(`benchmarks/multi_decode.py`). peftjax: `peftjax.multi.stack` of N adapters, row i "
       "routed to adapter i mod N, each step `peftjax.models.generate.decode_step` (the serve "
       "engine's step); HF PEFT: N adapters loaded, `model(..., adapter_names=[...])` with a "
       "`DynamicCache`, eager. With 64 adapters in the pool a 32-row batch holds 32 distinct "
       "ones.", "", _run_line(results), "",
       "| case | tokens/s (median) | each round |", "|---|---|---|"]
  for n, v in sorted(c.items(), key=lambda kv: (kv[0].startswith("torch"), len(kv[0]), kv[0])):
    each = ", ".join("–" if x is None else f"{x:,.0f}" for x in v["rounds"])
    med = '–' if v['tokens_per_s'] is None else f"{v['tokens_per_s']:,.0f}"
    L.append(f"| {n} | {med} | {each} |")
  L += ["", "| ratio of tokens/s | medians | each round |", "|---|---|---|"]
  for k, v in results["ratios"].items():
    L.append(f"| {k} | {v['value']:.2f}x | "
             + ", ".join("–" if x is None else f"{x:.2f}" for x in v["rounds"]) + " |")
  L += ["", "| goal | measured | each round | target | result |", "|---|---|---|---|---|"]
  for g in results["goals"]:
    val = '–' if g['value'] is None else f"{g['value']:.2f}x"
    L.append(f"| {g['name']} | {val}"
             f" | {', '.join(f'{x:.2f}' for x in g['rounds']) or '–'} | {g['op']} {g['target']}x "
             f"| {goal_state(g)} |")
  L += ["", f"Raw results: `benchmarks/results/{os.path.basename(RESULTS)}`. Reproduce: "
        "`.venv/bin/python benchmarks/multi_decode.py`."]
  return "\n".join(L)


def render_doc(text: str, results: dict) -> str:
  """``text`` (docs/serving.md) with its multi_decode block rendered from ``results``."""
  if DOC_BEGIN not in text or DOC_END not in text:
    raise SystemExit(f"docs/serving.md has no {DOC_BEGIN} ... {DOC_END} block")
  head, rest = text.split(DOC_BEGIN, 1)
  return head + DOC_BEGIN + "\n" + doc_section(results) + "\n" + DOC_END + rest.split(DOC_END, 1)[1]


# -- children ------------------------------------------------------------------------------------

def _ids(n_adapters: int, batch: int) -> list[int]:
  """Pool slots of the rows: adapter ``i mod n`` (slot ``1 + i mod n``; slot 0 is the base)."""
  return [1 + i % n_adapters for i in range(batch)]


def jax_child(shape: dict, counts, threads: int):
  import jax
  import jax.numpy as jnp
  import peftjax
  from peftjax import multi
  from peftjax.lora import LoraWeight
  import importlib
  gen = importlib.import_module("peftjax.models.generate")
  import bench_jax

  model, ids = bench_jax.build_model(dict(shape, seq=shape["prompt"]), jnp.float32)
  params = bench_jax.init_params(model, ids)
  b = shape["batch"]

  def adapter(i):
    t = peftjax.lora.apply(params, rank=shape["rank"], alpha=shape["alpha"],
                           targets=list(_common.LINEAR_TARGETS), key=jax.random.key(100 + i))
    key = [jax.random.key(1000 + i)]

    def perturb(x):  # a trained adapter: B != 0
      if isinstance(x, LoraWeight):
        key[0], sub = jax.random.split(key[0])
        return x.replace(b=0.01 * jax.random.normal(sub, x.b.shape, x.b.dtype))
      return x
    return jax.tree_util.tree_map(perturb, t, is_leaf=lambda x: isinstance(x, LoraWeight))
  tuned = [adapter(i) for i in range(max(counts))]
  cases = {"base": (params, [0] * b), "lora": (tuned[0], [0] * b),
           "merged": (peftjax.merge(tuned[0]), [0] * b)}
  for n in counts:
    cases[f"pool_{n}"] = (multi.stack({f"a{i}": tuned[i] for i in range(n)}), _ids(n, b))
  max_len = shape["prompt"] + shape["steps"] + 1
  tok0 = ids[:, 0] if ids.shape[0] == b else jnp.zeros((b,), jnp.int32)

  def run(p, adapters):
    cache = gen.init_slots(model, b, max_len)
    ad, active = jnp.asarray(adapters, jnp.int32), jnp.ones((b,), bool)
    tok = jnp.zeros((b,), jnp.int32) + tok0
    for _ in range(shape["prompt"]):  # untimed: the prompt, and the compile on the first call
      tok, cache = gen.decode_step(model, p, cache, tok, ad, active)
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for _ in range(shape["steps"]):
      tok, cache = gen.decode_step(model, p, cache, tok, ad, active)
    jax.block_until_ready(tok)
    return time.perf_counter() - t0

  t0 = time.perf_counter()
  for name, (p, a) in cases.items():
    run(p, a)
  compile_s = time.perf_counter() - t0
  info = {"versions": bench_jax.versions(), **_common.base_info(), "compile_s": compile_s,
          "backend": jax.default_backend(), **_common.memory()}
  return cases, run, info


def torch_child(shape: dict, counts, threads: int):
  import torch
  from peft import get_peft_model
  from transformers import DynamicCache
  import bench_torch
  torch.set_num_threads(threads)
  model, _ = bench_torch.build_model(dict(shape, seq=shape["prompt"]))
  cfg = bench_torch.lora_config(shape)
  model = get_peft_model(model, cfg, adapter_name="a0")
  for i in range(1, max(counts)):
    model.add_adapter(f"a{i}", cfg)
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lora_B" in n:
        p.copy_(0.01 * torch.randn(p.shape, generator=g))
  model.eval()
  b = shape["batch"]
  prompt = torch.randint(0, shape["vocab"], (b, shape["prompt"]), generator=g)
  cases = {"torch_base": "base", "torch_lora": "lora"}
  cases.update({f"torch_mixed_{n}": [f"a{i % n}" for i in range(b)] for n in counts})

  def run(_, how):
    import contextlib
    kw = {"adapter_names": how} if isinstance(how, list) else {}
    ctx = model.disable_adapter() if how == "base" else contextlib.nullcontext()
    model.set_adapter("a0")
    with torch.inference_mode(), ctx:
      cache = DynamicCache()
      out = model(input_ids=prompt, past_key_values=cache, use_cache=True, **kw)
      tok = out.logits[:, -1].argmax(-1, keepdim=True)
      t0 = time.perf_counter()
      for _ in range(shape["steps"]):
        out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True, **kw)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
      return time.perf_counter() - t0

  t0 = time.perf_counter()
  for name, how in cases.items():
    run(None, how)
  info = {"versions": bench_torch.versions(), **_common.base_info(),
          "warmup_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
          **_common.memory()}
  return {k: (None, v) for k, v in cases.items()}, run, info


def child_main(kind: str, shape: dict, counts, threads: int, reps: int):
  """Builds and warms every case, prints ``READY {info}``, then for each ``round R`` line on stdin
  measures every case ``reps`` times (order rotated by the round and the rep) and prints one
  result line ``{case: tokens_per_s}`` (the median over the reps)."""
  cases, run, info = (jax_child if kind == "jax" else torch_child)(shape, counts, threads)
  sys.stdout.write("READY " + json.dumps(info) + "\n")
  sys.stdout.flush()
  names = list(cases)
  for line in sys.stdin:
    if not line.startswith("round"):
      break
    r = int(line.split()[1])
    times = {n: [] for n in names}
    for rep in range(reps):
      k = (r * reps + rep) % len(names)
      for n in names[k:] + names[:k]:
        times[n].append(run(*cases[n]))
    toks = shape["batch"] * shape["steps"]
    res = {n: toks / statistics.median(t) for n, t in times.items()}
    sys.stdout.write(_common.RESULT_PREFIX + json.dumps({"tokens_per_s": res,
                                                         "times_s": times}) + "\n")
    sys.stdout.flush()


# -- runner --------------------------------------------------------------------------------------

loadavg = _common.loadavg


def _read(proc, prefix):
  for line in proc.stdout:
    if line.startswith(prefix):
      return json.loads(line[len(prefix):])
  raise RuntimeError(f"child exited ({proc.wait()}): {proc.stderr.read()[-2000:]}")


def torch_python(arg: str | None) -> str | None:
  cands = [arg] if arg else [os.path.join(HERE, ".venv-torch", "bin", "python"), sys.executable]
  for c in cands:
    if c and os.path.exists(c) and subprocess.run([c, "-c", "import torch, peft"],
                                                  capture_output=True).returncode == 0:
      return c
  return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n", 2)[2])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rounds", type=int)
  ap.add_argument("--reps", type=int, default=2, help="measurements of every case per round")
  ap.add_argument("--torch-python", help="an interpreter with torch and peft")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--out")
  ap.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  ap.add_argument("--shape", help=argparse.SUPPRESS)
  ap.add_argument("--counts", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  threads = _common.cpu_threads()
  if args.child:
    return child_main(args.child, json.loads(args.shape), json.loads(args.counts), threads,
                      args.reps)
  shape = SHAPES["quick" if args.quick else "reference"]
  counts = QUICK_COUNTS if args.quick else ADAPTER_COUNTS
  n_rounds = args.rounds or (1 if args.quick else 3)
  out = args.out or os.path.join(HERE, "results", "multi-decode-quick.json" if args.quick
                                 else "multi-decode-cpu.json")
  notes = []
  tpy = None if args.no_torch else torch_python(args.torch_python)
  if tpy is None:
    notes.append("HF PEFT side skipped: no interpreter with torch and peft.")
  started = dt.datetime.now(dt.timezone.utc)
  load_start = loadavg()
  print(f"multi-adapter decode: shape {shape}, adapters {counts}, {n_rounds} rounds, "
        f"load {load_start}", flush=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  base = ["--shape", json.dumps(shape), "--counts", json.dumps(list(counts)), "--reps",
          str(args.reps)]
  kids = {"jax": [sys.executable, __file__, "--child", "jax", *base]}
  if tpy:
    kids["torch"] = [tpy, __file__, "--child", "torch", *base]
  procs, info = {}, {}
  for k, cmd in kids.items():  # one at a time: building/compiling does not overlap
    procs[k] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    info[k] = _read(procs[k], "READY ")
    print(f"  {k} child ready ({info[k].get('compile_s') or info[k].get('warmup_s'):.1f} s)",
          flush=True)
  rounds, round_log = [], []
  for r in range(n_rounds):
    order = list(procs)[r % len(procs):] + list(procs)[:r % len(procs)]
    merged = {}
    for k in order:
      lb = loadavg()
      t0 = time.perf_counter()
      procs[k].stdin.write(f"round {r}\n")
      procs[k].stdin.flush()
      res = _read(procs[k], _common.RESULT_PREFIX)
      round_log.append({"round": r, "child": k, "load_before": lb, "load_after": loadavg(),
                        "wall_s": round(time.perf_counter() - t0, 2), **res})
      merged.update(res["tokens_per_s"])
    rounds.append(merged)
    print(f"  round {r + 1}: " + ", ".join(f"{c} {v:.0f}" for c, v in sorted(merged.items())),
          flush=True)
  for p in procs.values():
    p.stdin.close()
    p.wait(timeout=60)
  finished = dt.datetime.now(dt.timezone.utc)
  loads = [x[k][0] for x in round_log for k in ("load_before", "load_after")]
  load_max = max(loads + [load_start[0]]) if loads else load_start[0]
  versions = {}
  for k in info:
    versions.update({n: v for n, v in info[k].get("versions", {}).items() if v})
  import run as run_lib
  results = {
      "meta": {"benchmark": "multi-adapter decode", "mode": "quick" if args.quick else "full",
               "started": started.isoformat(), "finished": finished.isoformat(),
               "duration_s": round((finished - started).total_seconds(), 1),
               "shape": shape, "adapter_counts": list(counts), "rounds": n_rounds,
               "reps_per_round": args.reps, "threads": threads, "dtype": "float32",
               "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "load_start": load_start, "load_end": loadavg(), "load_max_1min": load_max,
               "loaded": loaded(load_max), "versions": versions,
               "git": run_lib.git_state(), "params": _common.param_counts(shape),
               "children": {k: {n: v for n, v in i.items() if n not in ("versions", "pid")}
                            for k, i in info.items()},
               "notes": notes},
      **aggregate(rounds, counts),
      "runs": round_log,
  }
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {os.path.relpath(out, ROOT)} (load max {load_max}"
        f"{', LOADED' if results['meta']['loaded'] else ''})")
  for g in results["goals"]:
    v = "n/a" if g["value"] is None else f"{g['value']:.2f}"
    print(f"  goal {g['name']:50s} {v:>6s} {g['op']} {g['target']}: {goal_state(g)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
