"""Markdown report and PNG plots from the benchmark results JSON (written by ``run.py``).

    .venv/bin/python benchmarks/report.py benchmarks/results/cpu.json [--report docs/benchmarks.md]

The report states every goal as "met" (it holds in every round's own ratio), "met in k of n
rounds" or "MISSED", with each round's ratio and the load average around each measurement; plots need matplotlib (the ``dev`` extra; ``make bench`` installs it). Without it the
report is written without figures and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common  # noqa: E402

SYSTEM_ORDER = ["peftjax_lora", "torch_lora", "qwix_lora", "peftjax_full", "torch_full",
                "peftjax_qlora", "qwix_qlora", "torch_qlora"]
NAMES = {
    "peftjax_lora": "peftjax LoRA",
    "torch_lora": "HF PEFT LoRA (PyTorch)",
    "qwix_lora": "qwix LoRA",
    "peftjax_full": "peftjax full fine-tuning",
    "torch_full": "PyTorch full fine-tuning",
    "peftjax_qlora": "peftjax QLoRA (NF4 + double quant)",
    "qwix_qlora": "qwix QLoRA (NF4)",
    "torch_qlora": "HF PEFT + bitsandbytes QLoRA (NF4 + DQ)",
}
NAMES.update({f"{c}_newest": f"{NAMES[c]}, newest jax" for c in _common.NEWEST_CASES})
PERFORMANCE_DOC = os.path.join(ROOT, "docs", "performance.md")


def _gb(x):
  return "–" if not x else f"{x / 1e9:.2f} GB"


def _s(x, digits=3):
  return "–" if x is None else f"{x:.{digits}f}"


def _rel(path, start):
  return os.path.relpath(path, start).replace(os.sep, "/")


def _load(rows):
  """``"a–b"``: the range of 1-minute load averages before/after the given runs."""
  vals = [r[k][0] for r in rows for k in ("load_before", "load_after") if r.get(k)]
  if not vals:
    return "–"
  return f"{min(vals):.1f}–{max(vals):.1f}"


# -- plots ---------------------------------------------------------------------------------------

def make_figures(results: dict, fig_dir: str) -> dict:
  """Writes the PNGs; returns ``{name: path}`` (empty if matplotlib is missing)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return {}
  os.makedirs(fig_dir, exist_ok=True)
  out = {}
  systems = results["systems"]
  names = [n for n in SYSTEM_ORDER if "median_s" in systems.get(n, {})]
  if names:
    colors = ["#1f77b4" if n.startswith("peftjax") else "#d62728" if n.startswith("torch")
              else "#2ca02c" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    med = [systems[n]["median_s"] for n in names]
    lo = [systems[n]["median_s"] - systems[n]["min_s"] for n in names]
    hi = [systems[n]["max_s"] - systems[n]["median_s"] for n in names]
    y = range(len(names))
    axes[0].barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
    axes[0].set_yticks(list(y), [NAMES[n] for n in names], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("seconds per training step (median; bars: range over rounds)")
    axes[0].set_title("Training step, " + ("quick shape" if results["meta"]["mode"] == "quick"
                                           else "reference shape") + ", f32 CPU")
    rss = [(systems[n].get("peak_rss_bytes") or 0) / 1e9 for n in names]
    axes[1].barh(y, rss, color=colors)
    axes[1].set_yticks(list(y), [""] * len(names))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("peak RSS of the process (GB)")
    axes[1].set_title("Peak memory")
    fig.tight_layout()
    p = os.path.join(fig_dir, "bench_step_memory.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["step_memory"] = p

  rows = [r for r in results.get("scaling", []) if r.get("ok")]
  if rows:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    hiddens = sorted({r["hidden"] for r in rows})
    ranks = sorted({r["rank"] for r in rows if r["kind"] == "lora"})
    series = [("full fine-tuning", lambda r: r["kind"] == "full", "k--")]
    series += [(f"LoRA r={k}", (lambda k: lambda r: r["kind"] == "lora" and r["rank"] == k)(k),
                "o-") for k in ranks]
    for label, pick, style in series:
      pts = sorted((r["hidden"], r) for r in rows if pick(r))
      if not pts:
        continue
      xs = [h for h, _ in pts]
      axes[0].plot(xs, [r["median_s"] for _, r in pts], style, label=label)
      axes[1].plot(xs, [(r.get("peak_rss_bytes") or 0) / 1e9 for _, r in pts], style, label=label)
    for ax, ylabel in zip(axes, ("seconds per step (median)", "peak RSS (GB)")):
      ax.set_xscale("log", base=2)
      ax.set_xticks(hiddens, [str(h) for h in hiddens])
      ax.set_xlabel(f"hidden size (FFN = 2.6875 x hidden, {results['meta']['shape']['layers']} "
                    "layers)")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_ylim(bottom=0)
    axes[0].set_title("peftjax step time: model size x LoRA rank")
    axes[1].set_title("peftjax peak memory: model size x LoRA rank")
    fig.tight_layout()
    p = os.path.join(fig_dir, "bench_scaling.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["scaling"] = p

  inf = systems.get("peftjax_infer", {})
  if "forward" in inf:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    vs = ["base", "merged", "lift"]
    axes[0].bar(vs, [inf["forward"][v]["median_s"] * 1e3 for v in vs],
                color=["#7f7f7f", "#1f77b4", "#9467bd"])
    axes[0].set_ylabel("ms per forward pass (median)")
    axes[0].set_title("Forward, reference batch")
    axes[1].bar(vs, [inf["generate"][v]["tokens_per_s"] for v in vs],
                color=["#7f7f7f", "#1f77b4", "#9467bd"])
    axes[1].set_ylabel("generated tokens/s")
    axes[1].set_title(f"KV-cache generation, batch {inf['gen_batch']}, {inf['gen_tokens']} tokens")
    fig.tight_layout()
    p = os.path.join(fig_dir, "bench_inference.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["inference"] = p
  return out


# -- markdown ------------------------------------------------------------------------------------

def _why(doc_dir):
  return f"[docs/performance.md]({_rel(PERFORMANCE_DOC, doc_dir)})"


goal_state = _common.goal_state


def _fmt_goal(g, v):
  return f"{v * 100:.0f}%" if "peak" in g["name"] else f"{v:.2f}x"


def _goal_lines(results, doc_dir):
  threads = results["meta"].get("threads") or 1
  lines = ["| goal | measured (medians) | each round | target | result | max 1-min load during its runs |",
           "|---|---|---|---|---|---|"]
  for g in results["goals"]:
    load = g.get("load_max_1min")
    noisy = load is not None and load > threads
    load_s = "–" if load is None else f"{load:.1f}" + (" (above the thread count: unreliable)"
                                                       if noisy else "")
    if g["value"] is None:
      lines.append(f"| {g['name']} | – | – | {g['op']} {g['target']} | not measured | {load_s} |")
      continue
    state = goal_state(g)
    if not g["met"]:
      state += f" (why: {_why(doc_dir)})"
    each = ", ".join(_fmt_goal(g, r) for r in g.get("rounds") or []) or "–"
    t = f"{g['target'] * 100:.0f}%" if "peak" in g["name"] else f"{g['target']}x"
    lines.append(f"| {g['name']} | {_fmt_goal(g, g['value'])} | {each} | {g['op']} {t} | {state} "
                 f"| {load_s} |")
  return lines


#: Quiet-machine figures at the reference shape from DESIGN.md ("Performance facts measured on our
#: machines": 2 cores, f32, medians of 10 steps), shown beside a run as context for its load.
#: The JAX rows there are hand-written JAX (not peftjax) and qwix 0.1.8.
QUIET_REFERENCE = {"torch_lora": "0.206–0.217", "torch_full": "0.290–0.323",
                   "torch_qlora": "0.231–0.238", "qwix_lora": "0.348–0.355",
                   "qwix_qlora": "0.350–0.360", "peftjax_lora": "0.311–0.353 (plain JAX)",
                   "peftjax_full": "0.329–0.343 (plain JAX)"}


def _train_table(results, names, ref):
  systems = results["systems"]
  runs = results.get("runs", [])
  ref_t = systems.get(ref, {}).get("median_s")
  quiet = results["meta"]["mode"] == "full"
  lines = [f"| system | s/step, median (range over rounds) | vs {NAMES.get(ref, ref)} | "
           "peak RSS | trainable params | achieved GFLOP/s | % of matmul peak | load (1-min) |"
           + (" DESIGN.md quiet-machine s/step |" if quiet else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if quiet else "")]
  for n in names:
    s = systems.get(n)
    if s is None:
      continue
    load = _load([r for r in runs if r["name"] == n])
    if "median_s" not in s:
      err = (s.get("error") or "").strip().splitlines()[-1:] or ["failed"]
      lines.append(f"| {NAMES[n]} | failed: `{err[0][:100]}` | | | | | | {load} |"
                   + (" |" if quiet else ""))
      continue
    ratio = f"{s['median_s'] / ref_t:.2f}x" if ref_t else "–"
    frac = s.get("fraction_of_peak")
    lines.append(
        f"| {NAMES[n]} | {s['median_s']:.3f} ({s['min_s']:.3f}–{s['max_s']:.3f}) | {ratio} | "
        f"{_gb(s.get('peak_rss_bytes'))} | {s.get('trainable_params') or 0:,} | "
        f"{s['achieved_flops_per_s'] / 1e9:.0f} | {'–' if frac is None else f'{frac * 100:.0f}%'} | "
        f"{load} |" + (f" {QUIET_REFERENCE.get(n, '–')} |" if quiet else ""))
  return lines


#: Rows of the README's performance table, in order.
README_SYSTEMS = ["peftjax_lora", "peftjax_lora_newest", "torch_lora", "qwix_lora", "peftjax_full",
                  "peftjax_full_newest", "torch_full", "peftjax_qlora", "peftjax_qlora_newest",
                  "qwix_qlora", "torch_qlora"]


def _newest_line(meta) -> list:
  """Which jax the "newest jax" rows ran on, when the run had them."""
  vn = meta.get("versions_newest") or {}
  if not vn:
    return []
  return [f"\"Newest jax\" rows: the same peftjax cases run by `.venv-newest` (jax "
          f"{vn.get('jax', '?')}, flax {vn.get('flax', '?')}, optax {vn.get('optax', '?')}), "
          "interleaved with the rest.", ""]


def _loss_memory_lines(systems) -> list:
  """XLA's scratch memory of each peftjax step with the fused loss and with the plain one."""
  rows = [(NAMES[n], systems[n]) for n in ("peftjax_lora", "peftjax_qlora", "peftjax_full")
          if systems.get(n, {}).get("temp_bytes") and systems[n].get("temp_bytes_plain_loss")]
  if not rows:
    return []
  L = ["Scratch memory of the compiled step (XLA's `memory_analysis().temp_size_in_bytes`: "
       "activations, logits and their gradients; exact, not affected by load), with the fused "
       "loss and with the plain `log_softmax` loss compiled beside it:", "",
       "| system | fused loss | plain loss | fused / plain |", "|---|---|---|---|"]
  for name, s in rows:
    a, b = s["temp_bytes"], s["temp_bytes_plain_loss"]
    L.append(f"| {name} | {a / 2**20:.0f} MiB | {b / 2**20:.0f} MiB | {a / b:.2f} |")
  L.append("")
  return L


def readme_block(results: dict) -> str:
  """The README's performance section body: the run (date, machine, load, versions), the step
  table and every goal with its state, all from the results JSON."""
  meta, systems = results["meta"], results["systems"]
  v, git = meta.get("versions", {}), meta.get("git", {})
  threads = meta.get("threads") or 1
  load_max = meta.get("load_max_1min")
  quiet = load_max is not None and load_max <= threads
  L = [f"Last run: {meta['started'][:10]}, {meta['cpu_count']} CPU cores ({threads} threads), "
       f"{meta['rounds']} interleaved rounds of {meta['steps']} timed steps; 1-min load median "
       f"{meta['load_median_1min']}, max {load_max} "
       + ("(a quiet machine: the benchmark's own load)" if quiet else
          "(**a loaded machine: these figures are not quotable**)")
       + f"; jax {v.get('jax', '?')}, PyTorch {v.get('torch', '?')}, peft {v.get('peft', '?')}, "
       f"qwix {v.get('qwix', '?')}; peftjax at {git.get('commit', '?')[:7]}"
       + (" with local changes" if git.get("dirty_files") else "") + ".", "",
       *_newest_line(meta),
       "| system | s/step, median (range over rounds) | vs HF PEFT LoRA | peak RSS |",
       "|---|---|---|---|"]
  ref = systems.get("torch_lora", {}).get("median_s")
  for n in README_SYSTEMS:
    s = systems.get(n, {})
    if "median_s" not in s:
      continue
    name = NAMES[n] + (f", {s['bits_per_param']:.2f} bits/param" if s.get("bits_per_param") else "")
    ratio = f"{s['median_s'] / ref:.2f}x" if ref else "–"
    if n == "peftjax_lora":
      name, ratio = f"**{name}**", f"**{ratio}**"
    L.append(f"| {name} | {s['median_s']:.3f} ({s['min_s']:.3f}–{s['max_s']:.3f}) | {ratio} | "
             f"{_gb(s.get('peak_rss_bytes'))} |")
  L += ["", "Goals (a goal is met only if it holds in every round's own ratio):", ""]
  for g in results["goals"]:
    if g["value"] is None:
      L.append(f"- {g['name']} {g['op']} {g['target']}: not measured")
      continue
    t = f"{g['target'] * 100:.0f}%" if "peak" in g["name"] else f"{g['target']}x"
    each = ", ".join(_fmt_goal(g, r) for r in g.get("rounds") or [])
    L.append(f"- {g['name']} {g['op']} {t}: {_fmt_goal(g, g['value'])}"
             + (f" (rounds: {each})" if each else "") + f", **{goal_state(g)}**")
  peak = results.get("matmul_peak", {})
  if meta.get("notes"):
    L += [""] + [f"Note: {n}" for n in meta["notes"]]
  if peak.get("jax_flops_per_s"):
    L += ["", f"Matmul peak measured in the same run: JAX {peak['jax_flops_per_s'] / 1e9:.0f} "
              f"GFLOP/s, PyTorch {(peak.get('torch_flops_per_s') or 0) / 1e9:.0f} GFLOP/s."]
  return "\n".join(L)


def write_report(results: dict, path: str, fig_dir: str, *, results_path: str | None = None):
  """Writes the markdown report (and the figures) for ``results``."""
  meta, systems, ratios = results["meta"], results["systems"], results["ratios"]
  doc_dir = os.path.dirname(os.path.abspath(path))
  figs = make_figures(results, fig_dir)
  shape = meta["shape"]
  threads = meta.get("threads") or 1
  load_max = meta.get("load_max_1min")
  high = load_max is not None and load_max > threads
  L = []
  quick = meta["mode"] == "quick"
  L.append("# Benchmarks" + (" (quick run: tiny shapes, not for conclusions)" if quick else ""))
  L.append("")
  L.append("peftjax side by side with HF PEFT on PyTorch and with qwix (Google's JAX LoRA/QLoRA "
           "library), measured by one command, `make bench` (`.venv/bin/python benchmarks/run.py`)."
           " Every figure is a ratio of runs taken in the same session: each system runs in its own "
           "process, in interleaved rounds whose order rotates, with the load average recorded "
           "before and after each run.")
  L.append("")
  git = meta.get("git", {})
  dirty = git.get("dirty_files") or []
  L.append(f"- Run: {meta['started'][:19]}Z, {meta['duration_s'] / 60:.1f} min; "
           f"{meta['rounds']} round(s) x {meta['steps']} timed steps after {meta['warmup']} "
           f"warm-up steps (compile included); medians of the per-round medians, range over rounds.")
  L.append(f"- Machine: {meta['platform']}, {meta['cpu_count']} CPUs, {threads} threads for XLA "
           f"and `torch.set_num_threads({threads})`; f32.")
  L.append(f"- peftjax at the start of the run: commit `{(git.get('commit') or '?')[:10]}`"
           + (f" with uncommitted changes in {', '.join(dirty[:6])}" if dirty else "") + ".")
  L.append(f"- Load average (1-min) during the run: start {meta['load_start'][0]}, end "
           f"{meta['load_end'][0]}, median {meta['load_median_1min']}, max {load_max}. "
           + ("**The machine is shared and the load was high (above the thread count): timings "
              "are noisy and absolute numbers are pessimistic; the ratios between systems, "
              "measured interleaved, are the figures to read.** Even ratios across runtimes "
              "suffer: PyTorch's OpenMP worker threads busy-wait, so when other processes hold "
              "the cores its eager step slows down far more than XLA's (compare the DESIGN.md "
              "quiet-machine column below), which flatters peftjax against HF PEFT. Rerun on a "
              "quiet machine before drawing conclusions." if high else
              "The machine is shared; load was at or below the thread count."))
  if results_path:
    L.append(f"- Raw results: [`{_rel(results_path, doc_dir)}`]({_rel(results_path, doc_dir)}) "
             "(every run, with its load averages and versions).")
  heads = []
  for r in results.get("runs", []):
    if r.get("git_head") and (not heads or heads[-1][0] != r["git_head"]):
      heads.append((r["git_head"], r.get("started", "?")[:19], r["name"], r.get("round", 0)))
  if len(heads) > 1:
    L.append("- **peftjax changed while this run was in progress** (each run imports the checked-out "
             "code): " + "; ".join(f"from {t}Z (round {rd + 1}, {n}) commit `{h[:10]}`"
                                   for h, t, n, rd in heads) + ".")
  for n in meta.get("notes", []):
    L.append(f"- Note: {n}")
  L.append("")
  L.append("## Goals")
  L.append("")
  L.append("Reported, not asserted. For the reasons behind a miss see " + _why(doc_dir) + ".")
  L.append("")
  L += _goal_lines(results, doc_dir)
  L.append("")

  p = meta["params"]
  L.append("## 1. LoRA training step at the reference shape")
  L.append("")
  L.append(f"Llama (`peftjax.models.llama` / `transformers.LlamaForCausalLM`, same config, random "
           f"init): vocab {shape['vocab']}, hidden {shape['hidden']}, {shape['layers']} layers, "
           f"{shape['heads']} heads, FFN {shape['ffn']}, batch {shape['batch']} x seq "
           f"{shape['seq']}; {p['total']:,} parameters. LoRA r={shape['rank']}, alpha "
           f"{shape['alpha']} on q/k/v/o/gate/up/down ({p['lora']:,} trainable), AdamW (lr 1e-4), "
           "next-token cross-entropy. peftjax: `peftjax.lora.apply` + `peftjax.lift(model.apply)` "
           "+ `peftjax.train.make_train_step`, jitted with the state donated (as "
           "`peftjax.train.train` runs it), the loss by the model's fused LM head + cross-entropy "
           "(`labels=`, `peftjax.losses.fused_cross_entropy`, as `peftjax train` runs it). qwix: `qwix.apply_lora_to_model` with a `LoraRule` on "
           "the same layers, the same jitted AdamW step over its `*_lora_a/b` parameters. "
           "PyTorch: HF PEFT `get_peft_model(LoraConfig(...))`, eager, `torch.optim.AdamW`.")
  L.append("")
  L += _newest_line(meta)
  L += _train_table(results, ["peftjax_lora", "peftjax_lora_newest", "torch_lora", "qwix_lora",
                              "peftjax_full", "peftjax_full_newest", "torch_full"], "torch_lora")
  L.append("")
  for k in ("peftjax LoRA / peftjax full", "PyTorch LoRA / PyTorch full",
            "peftjax full / PyTorch full", "qwix LoRA / peftjax full",
            *(k for k in ratios if "newest jax" in k)):
    if k in ratios:
      L.append(f"- {k}: **{ratios[k]:.2f}x**")
  L.append("")
  L += _loss_memory_lines(systems)
  if "step_memory" in figs:
    L.append(f"![step time and memory]({_rel(figs['step_memory'], doc_dir)})")
    L.append("")

  L.append("## 2. QLoRA")
  L.append("")
  L.append("peftjax: `peftjax.qlora.apply` (NF4, blocks of 64, double quantization; dequantizing "
           "matmul, XLA path on CPU). qwix: `LoraRule(weight_qtype='nf4')` (no double "
           "quantization; its tile must divide the input axis: "
           f"{systems.get('qwix_qlora', {}).get('tile_size') or '–'} here). bitsandbytes: "
           "`BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute f32)`, loaded from a "
           "saved checkpoint as QLoRA does, on CPU (bitsandbytes 0.50 says at import that its "
           "optional `kernels` package, a faster CPU 4-bit matmul, is not installed: its default "
           "CPU path is what runs here).")
  L.append("")
  L += _train_table(results, ["peftjax_lora", "peftjax_qlora", "peftjax_qlora_newest", "qwix_qlora",
                              "torch_qlora"], "peftjax_lora")
  L.append("")
  L.append("| system | bits per quantized parameter | frozen part held by the step |")
  L.append("|---|---|---|")
  for n in ("peftjax_lora", "peftjax_qlora", "qwix_lora", "qwix_qlora", "torch_qlora"):
    s = systems.get(n, {})
    if "median_s" not in s:
      continue
    b = s.get("bits_per_param")
    L.append(f"| {NAMES[n]} | {'32 (f32)' if b is None and 'qlora' not in n else _s(b, 2)} | "
             f"{_gb(s.get('frozen_bytes')) if s.get('frozen_bytes') else '–'} |")
  L.append("")
  L.append("bits/param: peftjax from `peftjax.quant.bits_per_param` (packed codes, 8-bit scales "
           "with their absmax and offset, padding); qwix from the bytes its quantized arrays hold "
           "in memory (JAX stores a 4-bit value in one byte); bitsandbytes from its packed weight "
           "and quant state (absmax, nested absmax, code tables).")
  for k in ("peftjax QLoRA / peftjax LoRA", "peftjax QLoRA / qwix QLoRA",
            "peftjax QLoRA / bitsandbytes QLoRA"):
    if k in ratios:
      L.append(f"- {k}: **{ratios[k]:.2f}x**")
  L.append("")

  inf = systems.get("peftjax_infer", {})
  L.append("## 3. Inference")
  L.append("")
  if "forward" in inf:
    L.append(f"Forward pass at the reference batch ({shape['batch']} x {shape['seq']}), jitted: the "
             "base model (no adapter), the merged model (`peftjax.merge` of a LoRA with B != 0) "
             "and the unmerged one (`jit(peftjax.lift(model.apply))`), interleaved in one "
             f"process. Generation: `peftjax.models.generate`, greedy, batch {inf['gen_batch']}, "
             f"prompt {inf['prompt_len']} tokens, {inf['gen_tokens']} new tokens (KV cache; "
             "prefill included), parameters base / merged / LoRA tree (lifted).")
    L.append("")
    L.append("| model | forward ms (median; rounds) | vs base | generation tokens/s (rounds) | vs base |")
    L.append("|---|---|---|---|---|")
    fb, gb = inf["forward"]["base"]["median_s"], inf["generate"]["base"]["tokens_per_s"]
    for v in ("base", "merged", "lift"):
      f, g = inf["forward"][v], inf["generate"][v]
      rs = ", ".join(f"{x * 1e3:.1f}" for x in f["rounds_s"])
      gs = ", ".join(f"{x:.0f}" for x in g["rounds"])
      L.append(f"| {v} | {f['median_s'] * 1e3:.1f} ({rs}) | {f['median_s'] / fb:.3f}x | "
               f"{g['tokens_per_s']:.0f} ({gs}) | {g['tokens_per_s'] / gb:.3f}x |")
    L.append("")
    if "inference" in figs:
      L.append(f"![inference]({_rel(figs['inference'], doc_dir)})")
      L.append("")
  else:
    L.append("Not measured in this run.")
    L.append("")

  rows = results.get("scaling", [])
  L.append("## 4. Scaling: model size x LoRA rank (peftjax)")
  L.append("")
  if rows:
    L.append("Reference shape with the hidden size scaled (FFN = 2.6875 x hidden, head dim 64, "
             f"{shape['layers']} layers, vocab {shape['vocab']}, batch {shape['batch']} x seq "
             f"{shape['seq']}); one process per point, one round.")
    L.append("")
    L.append("| hidden | FFN | kind | rank | s/step | vs full | peak RSS | trainable | "
             "% of matmul peak | load |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    peak = results["matmul_peak"].get("machine_flops_per_s")
    fulls = {r["hidden"]: r.get("median_s") for r in rows if r["kind"] == "full" and r.get("ok")}
    for r in rows:
      if not r.get("ok"):
        L.append(f"| {r['hidden']} | {r['ffn']} | {r['kind']} | {r['rank'] or '–'} | failed | | | | | |")
        continue
      vs = fulls.get(r["hidden"])
      vs = "–" if not vs else f"{r['median_s'] / vs:.2f}x"
      frac = r["analytic_flops"] / r["median_s"] / peak if peak else None
      L.append(f"| {r['hidden']} | {r['ffn']} | {r['kind']} | {r['rank'] or '–'} | "
               f"{r['median_s']:.3f} | {vs} | "
               f"{_gb(r.get('peak_rss_bytes'))} | {r.get('trainable_params') or 0:,} | "
               f"{'–' if frac is None else f'{frac * 100:.0f}%'} | "
               f"{r['load_before'][0]:.1f}–{r['load_after'][0]:.1f} |")
    L.append("")
    if "scaling" in figs:
      L.append(f"![scaling]({_rel(figs['scaling'], doc_dir)})")
      L.append("")
  else:
    L.append("Not measured in this run.")
    L.append("")

  mp = results["matmul_peak"]
  L.append("## 5. The machine's limit")
  L.append("")
  n = systems.get("matmul_peak_jax", {}).get("n") or meta.get("matmul_n")
  L.append(f"Matmul peak: the best of the timed calls of a `{n}x{n}` f32 matmul, in every round.")
  L.append("")
  L.append("| | peak GFLOP/s | median GFLOP/s |")
  L.append("|---|---|---|")
  for k, label in (("matmul_peak_jax", "jitted JAX"), ("matmul_peak_torch", "PyTorch")):
    s = systems.get(k, {})
    if "peak_flops_per_s" in s:
      L.append(f"| {label} | {s['peak_flops_per_s'] / 1e9:.0f} | {s['median_flops_per_s'] / 1e9:.0f} |")
  L.append("")
  if mp.get("machine_flops_per_s"):
    L.append(f"The \"% of matmul peak\" columns divide each step's achieved FLOP/s by the higher "
             f"of the two ({mp['machine_flops_per_s'] / 1e9:.0f} GFLOP/s).")
    if meta["mode"] == "full":
      L.append("For context, DESIGN.md measured about 300 (JAX) and 330 (PyTorch) GFLOP/s for the "
               "same matmul on a quiet machine; a peak measured under load is lower, and the "
               "fractions are relative to the peak of the same (loaded) moment.")
  L.append("")
  L.append("FLOPs are counted **analytically** (`benchmarks/_common.py: analytic_flops`), the "
           "same way for every system: 2 FLOPs per multiply-add of the matmuls only; forward = "
           "all linear layers + LM head + attention scores and values (full seq x seq square); "
           "full fine-tuning = 3x the matmul work (forward, input gradients, weight gradients); "
           "LoRA/QLoRA = forward + input gradients (no weight gradients for frozen kernels) + the "
           "adapters' three products. Cross-checks: XLA's own count of the compiled step "
           "(`jax.jit(step).lower(...).compile().cost_analysis()['flops']`) and PyTorch's "
           "`FlopCounterMode` over one step:")
  L.append("")
  L.append("| system | analytic GFLOP/step | XLA cost_analysis GFLOP | torch FlopCounter GFLOP |")
  L.append("|---|---|---|---|")
  for nm in SYSTEM_ORDER:
    s = systems.get(nm, {})
    if "median_s" not in s:
      continue
    xf, tf = s.get("xla_flops"), s.get("torch_flops")
    L.append(f"| {NAMES[nm]} | {s['analytic_flops'] / 1e9:.2f} | "
             f"{'–' if not xf else f'{xf / 1e9:.2f}'} | {'–' if not tf else f'{tf / 1e9:.2f}'} |")
  L.append("")

  L.append("## 6. Accelerators")
  L.append("")
  L.append("`.venv/bin/python benchmarks/run.py --device` runs the same JAX cases in bf16 at a "
           f"larger shape ({_common.SHAPES['device']}) on the default JAX device and reports "
           "tokens/s and model FLOPs utilization (analytic FLOPs / step time / the measured bf16 "
           "matmul peak, and the vendor's nominal dense peak where known); with no accelerator it "
           "falls back to a tiny CPU run that only checks the path "
           "(`benchmarks/results/device-cpu.json`). No accelerator was available for this run.")
  dev_files = sorted(f for f in os.listdir(os.path.join(HERE, "results"))
                     if f.startswith("device-") and f.endswith(".md") and "cpu" not in f) \
      if os.path.isdir(os.path.join(HERE, "results")) else []
  for f in dev_files:
    L.append(f"- Accelerator results: [`benchmarks/results/{f}`]"
             f"({_rel(os.path.join(HERE, 'results', f), doc_dir)})")
  meas = os.path.join(ROOT, "docs", "measurements")
  if os.path.isdir(meas):
    L.append("")
    L.append("Earlier outputs from a lent NVIDIA H200 machine (`benchmarks/device_check.sh`: "
             "the LoRA step on 2 pinned CPU cores and on the GPU, and the dequantizing matmul "
             "kernels):")
    L.append("")
    for f in sorted(os.listdir(meas)):
      L.append(f"- [`docs/measurements/{f}`]({_rel(os.path.join(meas, f), doc_dir)})")
  L.append("")

  L.append("## Versions")
  L.append("")
  v = meta.get("versions", {})
  L.append(", ".join(f"{k} {v[k]}" for k in sorted(v)) + f"; Python {platform_python(results)}.")
  L.append("")
  L.append("## Reproduce")
  L.append("")
  L.append("```sh\nmake bench                                   # full run (~20 min on 2 quiet cores)\n"
           ".venv/bin/python benchmarks/run.py --quick   # tiny shapes, a few minutes\n"
           ".venv/bin/python benchmarks/run.py --device  # accelerator: bf16, tokens/s, MFU\n"
           ".venv/bin/python benchmarks/report.py benchmarks/results/cpu.json  # redo this page\n```")
  L.append("")
  L.append("The PyTorch stack lives in `benchmarks/.venv-torch` (created on first use: "
           "`torch==2.13.0` first, then `peft`, `transformers`, `bitsandbytes`); qwix is installed "
           "into `.venv` with jax/jaxlib/flax pinned (it needs no other jax).")
  os.makedirs(doc_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(L) + "\n")
  return path


def platform_python(results):
  for r in results.get("runs", []):
    if r.get("ok"):
      return r["result"].get("python", "?")
  return "?"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("results")
  ap.add_argument("--report", default=os.path.join(ROOT, "docs", "benchmarks.md"))
  ap.add_argument("--figures", default=os.path.join(ROOT, "docs", "figures"))
  ap.add_argument("--keep", action="store_true",
                  help="use the JSON's summaries as they are (default: recompute them from its "
                       "raw runs with the current run.py and write them back)")
  args = ap.parse_args(argv)
  with open(args.results) as f:
    results = json.load(f)
  if not args.keep and results.get("runs") and results["meta"].get("mode") != "device":
    import run
    shape = results["meta"]["shape"]
    results["systems"] = run.aggregate(results["runs"], shape)
    results.update(run.derive(results["systems"], shape))
    results["scaling"] = run.aggregate_scaling(results["runs"])
    with open(args.results, "w") as f:
      json.dump(results, f, indent=1)
  write_report(results, args.report, args.figures, results_path=args.results)
  print(f"wrote {args.report}")


if __name__ == "__main__":
  main()
