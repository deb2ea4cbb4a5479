"""Rewrites the README's classification table from ``results/compare_classification.json``.

The table sits between ``<!-- compare_classification:begin -->`` and
``<!-- compare_classification:end -->``; nothing outside the markers changes. Run after
``compare_classification.py`` (tests/test_readme.py checks that the README matches the JSON).

    python experiments/readme_tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- compare_classification:begin -->", "<!-- compare_classification:end -->"


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


def render(readme: str, results: dict) -> str:
  if BEGIN not in readme or END not in readme:
    raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
  head, rest = readme.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return head + BEGIN + "\n" + classification_table(results) + "\n" + END + tail


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
  a = ap.parse_args(argv)
  path = ROOT / "README.md"
  results = json.loads((ROOT / "experiments" / "results" / "compare_classification.json")
                       .read_text())
  new = render(path.read_text(), results)
  if a.check:
    sys.exit(0 if new == path.read_text() else 1)
  path.write_text(new)


if __name__ == "__main__":
  main()
