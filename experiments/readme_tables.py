"""Rewrites the README's generated tables from the committed result JSON.

Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; nothing outside the
markers changes:

* ``compare_lm``: the language-model comparison (perplexity and forgetting), from
  ``experiments/results/compare_lm.json`` (``compare_lm.py``);
* ``compare_classification``: the classification comparison, from
  ``experiments/results/compare_classification.json`` (``compare_classification.py``);
* ``benchmarks``: the performance section, from ``benchmarks/results/cpu.json``
  (``benchmarks/run.py``; text from ``benchmarks/report.py:readme_block``).

``docs/methods.md``'s per-method "Measured" paragraphs (``<!-- measured:KEY:begin -->``) are
rendered from the two comparisons' JSON too.

Run after any of them writes its JSON (tests/test_readme.py checks that the README and
docs/methods.md match the JSON).

    python experiments/readme_tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def classification_table(results: dict) -> str:
  rows = [r for r in results["results"] if "error" not in r]
  acc = {r["name"]: statistics.mean(float(x["test accuracy"].rstrip("%"))
                                    for x in (r.get("seed_rows") or [r["row"]])) for r in rows}
  full = acc.get("full")
  base = results.get("base") or {}
  out = ["| method | trainable | lr | s/step | peak RSS | test accuracy | % of full FT |",
         "|---|---|---|---|---|---|---|"]
  if base:
    out.append(f"| base, untrained head | 0 | - | - | - | {100 * base['accuracy']:.2f}% | |")
  for r in rows:
    pct = f"{100 * acc[r['name']] / full:.1f}%" if full else "-"
    out.append(f"| {r['name']} | {r['trainable']:,} ({r['trainable_pct']:g}%) | {r['lr']:g} | "
               f"{r['s_per_step']:.2f} | {r['peak_rss_mb'] / 1024:.2f} GB | "
               f"{acc[r['name']]:.2f}% | {pct} |")
  return "\n".join(out)


#: compare_lm.py's method names as the README spells them.
LM_NAMES = {"full": "full fine-tuning", "lora": "LoRA r=8", "qlora": "QLoRA r=8 (GGUF's 4-bit blocks)",
            "prompt": "prompt tuning, 20 tokens", "prefix": "prefix tuning, 20 (MLP)",
            "prefix-lr1e-3": "prefix tuning, 20 (MLP)", "dora": "DoRA r=8", "vera": "VeRA r=256",
            "lokr": "LoKr r=8", "oft": "OFT, blocks of 32"}


def lm_table(results: dict) -> str:
  base = results.get("base") or {}
  general = results.get("base_general_nll")
  out = ["| method | trainable | lr | peak RSS | perplexity | vs base | forgetting |",
         "|---|---|---|---|---|---|---|"]
  if base:
    out.append(f"| base SmolLM2-135M-Instruct | 0 | - | - | {base['perplexity']:,.2f} | | "
               + (f"(general NLL {general:.4f}) |" if general is not None else "|"))
  rows = [r for r in results["results"] if "error" not in r]
  for r in sorted(rows, key=lambda r: r["perplexity"]):
    diverged = base and r["perplexity"] > 10 * base["perplexity"]
    vs = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%" if base else "-"
    forgot = r.get("forgetting")
    out.append(f"| {LM_NAMES.get(r['name'], r['name'])} | {r['trainable']:,} "
               f"({r['trainable_pct']:g}%) | {r['lr']:g} | {r['peak_rss_mb'] / 1024:.2f} GB | "
               f"{r['perplexity']:,.2f}{' (diverged)' if diverged else ''} | {vs} | "
               f"{'-' if forgot is None else f'{forgot:+.3f}'} |")
  return "\n".join(out)


#: docs/methods.md's "Measured" blocks: block key -> (compare_lm rows, compare_classification rows).
MEASURED = {
    "full": (["full"], ["full"]), "lora": (["lora"], ["lora"]), "qlora": (["qlora"], ["qlora"]),
    "dora": (["dora"], ["dora"]), "vera": (["vera"], ["vera"]), "loha": ([], ["loha"]),
    "lokr": (["lokr"], ["lokr"]), "oft": (["oft"], ["oft"]),
    "adapters": ([], ["adapter-houlsby", "adapter-pfeiffer"]), "ia3": ([], ["ia3"]),
    "bitfit": ([], ["bitfit"]), "partial": ([], ["partial"]),
    "diff_pruning": ([], ["diff_pruning"]), "prompt": (["prompt"], ["prompt"]),
    "prefix": (["prefix-lr1e-3", "prefix"], ["prefix", "ptuning-v2"]),
    "ptuning": ([], ["ptuning"]), "pissa": ([], ["lora-pissa"]),
}


def _accuracy(r: dict) -> tuple[float, str]:
  """Mean test accuracy over the row's seeds and how it was chosen, for the prose."""
  accs = [float(x["test accuracy"].rstrip("%")) for x in (r.get("seed_rows") or [r["row"]])]
  how = ("chosen on a validation split from " + ", ".join(r["grid"]) if r.get("grid")
         else "not swept")
  return statistics.mean(accs), f"{how}, {len(accs)} seed{'s' * (len(accs) > 1)}"


def measured(key: str, lm: dict, cls: dict) -> str:
  """The "Measured" paragraph of one method section of docs/methods.md."""
  lm_names, cls_names = MEASURED[key]
  out = [f"**Measured** (generated from the committed runs' JSON by "
         f"`experiments/readme_tables.py`; step times are in the linked tables):"]
  by = {r["name"]: r for r in lm["results"] if "error" not in r}
  base = lm.get("base") or {}
  for n in lm_names:
    if n not in by:
      continue
    r = by[n]
    diverged = r["perplexity"] > 10 * base["perplexity"]
    forgot = r.get("forgetting")
    out.append(
        f"- SmolLM2-135M on Moby Dick ([table](../experiments/results/compare_lm.md), "
        f"{lm['steps']} steps of {lm['batch_size']} x {lm['seq_len']} tokens), "
        f"{LM_NAMES.get(n, n)} at lr {r['lr']:g}: held-out perplexity {base['perplexity']:.2f} "
        f"-> {r['perplexity']:,.2f} ({100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%"
        f"{', diverged' if diverged else ''})"
        + (f"; forgetting {forgot:+.3f} (NLL on general text after minus before)"
           if forgot is not None else "")
        + f"; {r['trainable']:,} trainable ({r['trainable_pct']:g}%); peak RSS "
        f"{r['peak_rss_mb'] / 1024:.2f} GB.")
  by = {r["name"]: r for r in cls["results"] if "error" not in r}
  full = _accuracy(by["full"])[0] if "full" in by else None
  for n in cls_names:
    if n not in by:
      continue
    r = by[n]
    acc, how = _accuracy(r)
    out.append(
        f"- all-MiniLM-L6-v2 on rotten tomatoes ([table]"
        f"(../experiments/results/compare_classification.md), {cls['steps']} steps of "
        f"{cls['batch_size']}), `{n}` at lr {r['lr']:g} ({how}): test accuracy {acc:.2f}%"
        + (f", {100 * acc / full:.1f}% of full fine-tuning's {full:.2f}%"
           if full and n != "full" else "")
        + f" (majority class 58.00%); {r['trainable']:,} trainable ({r['trainable_pct']:g}%, "
        f"head included); peak RSS {r['peak_rss_mb'] / 1024:.2f} GB.")
  return "\n".join(out)


def render_methods_doc(text: str, lm: dict, cls: dict) -> str:
  """docs/methods.md with every ``<!-- measured:KEY:begin/end -->`` block rendered."""
  for key in MEASURED:
    begin, end = f"<!-- measured:{key}:begin -->", f"<!-- measured:{key}:end -->"
    if begin not in text or end not in text:
      raise SystemExit(f"docs/methods.md has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + begin + "\n" + measured(key, lm, cls) + "\n" + end + tail
  return text


def benchmark_block(results: dict) -> str:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import report
  return report.readme_block(results)


def multi_decode_block(results: dict) -> str:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import multi_decode
  return multi_decode.readme_table(results)


#: block name -> (its results JSON, relative to the root; the function that renders it).
BLOCKS = {
    "compare_lm": ("experiments/results/compare_lm.json", lm_table),
    "compare_classification": ("experiments/results/compare_classification.json",
                               classification_table),
    "benchmarks": ("benchmarks/results/cpu.json", benchmark_block),
    "multi_decode": ("benchmarks/results/multi-decode-cpu.json", multi_decode_block),
}


def render(readme: str, name: str, results: dict) -> str:
  """``readme`` with block ``name`` rendered from ``results``."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  if begin not in readme or end not in readme:
    raise SystemExit(f"README.md has no {begin} ... {end} block")
  head, rest = readme.split(begin, 1)
  _, tail = rest.split(end, 1)
  return head + begin + "\n" + BLOCKS[name][1](results) + "\n" + end + tail


def render_all(readme: str) -> str:
  for name, (path, _) in BLOCKS.items():
    readme = render(readme, name, json.loads((ROOT / path).read_text()))
  return readme


def _results(name: str) -> dict:
  return json.loads((ROOT / "experiments" / "results" / f"{name}.json").read_text())


def render_docs() -> dict:
  """``{path: rendered text}`` of the docs with generated blocks."""
  path = ROOT / "docs" / "methods.md"
  serving = ROOT / "docs" / "serving.md"
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import multi_decode
  return {path: render_methods_doc(path.read_text(), _results("compare_lm"),
                                   _results("compare_classification")),
          serving: multi_decode.render_doc(
              serving.read_text(), json.loads((ROOT / multi_decode.RESULTS).read_text()))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
  a = ap.parse_args(argv)
  path = ROOT / "README.md"
  files = {path: render_all(path.read_text()), **render_docs()}
  if a.check:
    sys.exit(0 if all(new == p.read_text() for p, new in files.items()) else 1)
  for p, new in files.items():
    p.write_text(new)


if __name__ == "__main__":
  main()
