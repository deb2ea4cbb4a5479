"""Shared by the benchmark runner and its per-system child processes (pure Python: no jax, no torch).

The child processes (``bench_jax.py`` in the project venv, ``bench_torch.py`` in
``benchmarks/.venv-torch``) import this module for the shapes, the analytic FLOP count, memory
readings and the one-line result protocol, so every system is measured and counted the same way.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

#: Llama-like shapes. ``ffn`` is the SwiGLU intermediate size; heads have dim ``hidden // heads``.
SHAPES = {
    # DESIGN.md's reference shape.
    "reference": dict(vocab=8192, hidden=512, layers=4, heads=8, ffn=1376, seq=128, batch=4,
                      rank=8, alpha=16),
    # Development / test shape (--quick).
    "quick": dict(vocab=512, hidden=64, layers=2, heads=4, ffn=192, seq=32, batch=2, rank=4,
                  alpha=8),
    # Accelerator (--device) shape: bf16, about 0.5B parameters.
    "device": dict(vocab=32000, hidden=2048, layers=8, heads=16, ffn=5504, seq=1024, batch=8,
                   rank=16, alpha=32),
}

#: Scaling grid: hidden sizes (FFN = 2.6875 x hidden, as at the reference shape; head dim 64) and
#: LoRA ranks; everything else as the reference shape.
SCALING_HIDDEN = (256, 512, 1024)
SCALING_RANKS = (4, 16, 64)
QUICK_SCALING_HIDDEN = (32, 64, 128)
QUICK_SCALING_RANKS = (2, 4, 8)

#: peftjax cases that run.py also runs on the newest jax (``.venv-newest``), named ``<case>_newest``.
NEWEST_CASES = ("peftjax_lora", "peftjax_full", "peftjax_qlora")

RESULT_PREFIX = "BENCH_RESULT "

#: The seven linear layers of a Llama block (HF PEFT ``target_modules`` names; the same names are
#: the Flax module names in ``peftjax.models.llama``).
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def scaled_shape(base: dict, hidden: int, rank: int) -> dict:
  """``base`` with ``hidden`` (FFN and heads scaled with it, head dim kept) and LoRA ``rank``."""
  head_dim = base["hidden"] // base["heads"]
  ffn = int(round(base["ffn"] * hidden / base["hidden"]))
  return dict(base, hidden=hidden, ffn=ffn, heads=max(1, hidden // head_dim), rank=rank,
              alpha=2 * rank)


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
  """``(d_in, d_out)`` of the seven LoRA-targeted kernels of one block."""
  h, f = shape["hidden"], shape["ffn"]
  return [(h, h)] * 4 + [(h, f), (h, f), (f, h)]


def param_counts(shape: dict) -> dict:
  """Parameter counts: total (untied embeddings and head), targeted kernels, LoRA adapters."""
  h, v, n_layers, r = shape["hidden"], shape["vocab"], shape["layers"], shape["rank"]
  kernels = sum(i * o for i, o in linear_shapes(shape))
  adapters = sum(r * (i + o) for i, o in linear_shapes(shape))
  norms = 2 * h
  total = 2 * v * h + h + n_layers * (kernels + norms)
  return {"total": total, "targeted": n_layers * kernels, "lora": n_layers * adapters}


def analytic_flops(shape: dict, kind: str) -> float:
  """Model FLOPs of one step (multiply-add = 2 FLOPs; matmuls only; no recomputation).

  Args:
    shape: a :data:`SHAPES` entry.
    kind: ``"forward"`` (inference forward pass), ``"full"`` (forward + backward with weight
      gradients of every kernel) or ``"lora"`` (forward + backward with input gradients only for
      the frozen kernels, plus the adapters' forward, input- and weight-gradient products). QLoRA
      counts as ``"lora"`` (dequantization is not a useful FLOP).

  The attention score and value products count the full ``seq x seq`` square (as the kernels
  compute it; the causal mask does not halve the work). Embedding lookups, norms, softmax and the
  optimizer are not counted.
  """
  t = shape["batch"] * shape["seq"]
  n_layers, h, v = shape["layers"], shape["hidden"], shape["vocab"]
  dense = n_layers * sum(i * o for i, o in linear_shapes(shape)) + h * v  # incl. lm_head
  attn = n_layers * 2 * 2 * shape["batch"] * shape["seq"] ** 2 * h  # QK^T and PV
  fwd = 2 * t * dense + attn
  if kind == "forward":
    return float(fwd)
  bwd_dx = 2 * t * dense + 2 * attn
  if kind == "full":
    return float(fwd + bwd_dx + 2 * t * dense)
  if kind == "lora":
    adapters = n_layers * sum(shape["rank"] * (i + o) for i, o in linear_shapes(shape))
    return float(fwd + bwd_dx + 3 * 2 * t * adapters)
  raise ValueError(f"kind must be 'forward', 'full' or 'lora', got {kind!r}")


def memory() -> dict:
  """This process's resident memory now and its peak (bytes), from ``/proc/self/status``."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("VmRSS:", "VmHWM:")):
          key = "rss_bytes" if line.startswith("VmRSS") else "peak_rss_bytes"
          out[key] = int(line.split()[1]) * 1024
  except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_rss_bytes"] = peak if sys.platform == "darwin" else peak * 1024
  return out


def cpu_threads() -> int:
  """CPUs this process may run on (what XLA's CPU thread pool sizes itself to)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover
    return os.cpu_count() or 1


def time_steps(step, n_warmup: int, n_steps: int, sync) -> tuple[list[float], float]:
  """Calls ``step()`` ``n_warmup + n_steps`` times; returns the timed steps and the first call's time.

  ``sync(out)`` blocks until the step's result is ready (``jax.block_until_ready``, or nothing
  for eager PyTorch).
  """
  first = None
  for i in range(max(n_warmup, 1)):
    t0 = time.perf_counter()
    sync(step())
    if i == 0:
      first = time.perf_counter() - t0
  times = []
  for _ in range(n_steps):
    t0 = time.perf_counter()
    sync(step())
    times.append(time.perf_counter() - t0)
  return times, first


def summarize(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "times_s": times}


def base_info() -> dict:
  return {"python": platform.python_version(), "machine": platform.machine(),
          "cpu_threads": cpu_threads(), "pid": os.getpid()}


def emit(result: dict) -> None:
  """Prints the child's result as one line the runner parses."""
  result = dict(result, **memory())
  sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
  sys.stdout.flush()


def parse_result(stdout: str) -> dict | None:
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  return None


def loadavg() -> list[float]:
  """The 1-, 5- and 15-minute load averages, rounded (NaN where the OS has none)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:  # pragma: no cover
    return [float("nan")] * 3


def goal_state(g: dict) -> str:
  """``"met"`` only when the goal holds in every round's own ratio (and in the medians' ratio);
  ``"met in k of n rounds"`` when it holds in some; ``"MISSED"`` otherwise; ``"not measured"``."""
  rounds, k = g.get("rounds") or [], g.get("met_rounds", 0)
  if g.get("value") is None:
    return "not measured"
  if g["met"]:
    return "met" + (f" in all {len(rounds)} rounds" if len(rounds) > 1 else "")
  return f"met in {k} of {len(rounds)} rounds" if k else "MISSED"
