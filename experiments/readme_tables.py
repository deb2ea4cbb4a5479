"""Rewrites the README's generated tables from the committed result JSON.

Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; nothing outside the
markers changes:

* ``compare_classification``: the classification comparison, from
  ``experiments/results/compare_classification.json`` (``compare_classification.py``);
* ``benchmarks``: the performance section, from ``benchmarks/results/cpu.json``
  (``benchmarks/run.py``; text from ``benchmarks/report.py:readme_block``).

Run after either writes its JSON (tests/test_readme.py checks that the README matches the JSON).

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


def benchmark_block(results: dict) -> str:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import report
  return report.readme_block(results)


#: block name -> (its results JSON, relative to the root; the function that renders it).
BLOCKS = {
    "compare_classification": ("experiments/results/compare_classification.json",
                               classification_table),
    "benchmarks": ("benchmarks/results/cpu.json", benchmark_block),
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
  a = ap.parse_args(argv)
  path = ROOT / "README.md"
  new = render_all(path.read_text())
  if a.check:
    sys.exit(0 if new == path.read_text() else 1)
  path.write_text(new)


if __name__ == "__main__":
  main()
