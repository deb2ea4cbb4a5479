"""PyTorch side of the benchmarks: one measurement per process, run in ``benchmarks/.venv-torch``.

    benchmarks/.venv-torch/bin/python benchmarks/bench_torch.py --case torch_lora \
        --shape '{"vocab": 8192, ...}' --steps 10 --warmup 2 --threads 2

Cases (``transformers.LlamaForCausalLM`` with the same config as the JAX model, random init, f32,
``labels=input_ids`` loss, ``torch.optim.AdamW`` over the trainable parameters, eager mode):

* ``torch_lora``: HF PEFT ``LoraConfig(r, lora_alpha, target_modules=<7 linear layers>)``;
* ``torch_full``: every parameter trained;
* ``torch_qlora``: bitsandbytes 4-bit NF4 with double quantization (the model is saved and loaded
  back with ``BitsAndBytesConfig``, as QLoRA loads a checkpoint), then the same LoRA;
* ``matmul_peak``: ``[n, n] @ [n, n]`` in f32.

``torch.set_num_threads(--threads)`` matches the JAX (XLA CPU) thread count. The step's FLOPs are
also counted by ``torch.utils.flop_counter.FlopCounterMode`` over one extra step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

LEARNING_RATE = 1e-4


def versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def build_model(shape: dict):
  from transformers import LlamaConfig, LlamaForCausalLM
  cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                    intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                    num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                    max_position_embeddings=max(2048, shape["seq"]), rms_norm_eps=1e-6,
                    tie_word_embeddings=False, attention_dropout=0.0)
  torch.manual_seed(0)
  model = LlamaForCausalLM(cfg).to(torch.float32)
  g = torch.Generator().manual_seed(1)
  ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
  return model, ids


def lora_config(shape: dict):
  from peft import LoraConfig
  return LoraConfig(r=shape["rank"], lora_alpha=shape["alpha"], lora_dropout=0.0, bias="none",
                    target_modules=list(_common.LINEAR_TARGETS), task_type="CAUSAL_LM")


def bnb_bits_per_param(model) -> float | None:
  """Stored bits per value of the 4-bit kernels: packed codes + absmax (+ nested) + code tables."""
  import bitsandbytes as bnb
  n_bytes = n_vals = 0
  for m in model.modules():
    if isinstance(m, bnb.nn.Linear4bit):
      w, qs = m.weight, m.weight.quant_state
      n_bytes += w.numel() * w.element_size()
      n_vals += int(torch.Size(qs.shape).numel())
      for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
        if isinstance(t, torch.Tensor):
          n_bytes += t.numel() * t.element_size()
      if getattr(qs, "state2", None) is not None:
        for t in (qs.state2.absmax, qs.state2.code):
          n_bytes += t.numel() * t.element_size()
  return 8.0 * n_bytes / n_vals if n_vals else None


def case_train(kind: str, shape: dict, steps: int, warmup: int) -> dict:
  from peft import get_peft_model
  model, ids = build_model(shape)
  extra = {}
  if kind == "qlora":
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    with tempfile.TemporaryDirectory() as d:
      model.save_pretrained(d)
      del model
      q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
      model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu",
                                               dtype=torch.float32)
    extra["bits_per_param"] = bnb_bits_per_param(model)
  if kind in ("lora", "qlora"):
    model = get_peft_model(model, lora_config(shape))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  extra["trainable_params"] = int(sum(p.numel() for p in params))
  extra["total_params"] = int(sum(p.numel() for p in model.parameters()))
  opt = torch.optim.AdamW(params, lr=LEARNING_RATE)
  losses = []

  def step():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(out.loss.detach()))
    return out.loss

  mem_setup = _common.memory()
  times, first = _common.time_steps(step, warmup, steps, lambda _: None)
  counted = None
  try:  # torch's own FLOP count of one step (a cross-check of the analytic count)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
      step()
    counted = float(fc.get_total_flops())
  except Exception as e:  # noqa: BLE001
    extra["flop_counter_error"] = f"{type(e).__name__}: {e}"[:200]
  return {**_common.summarize(times), "first_step_s": first, "torch_flops": counted,
          "loss_first": losses[0], "loss_last": losses[-1],
          "rss_after_setup_bytes": mem_setup.get("rss_bytes"), **extra}


def case_matmul(n: int, reps: int) -> dict:
  a = torch.randn(n, n)
  b = torch.randn(n, n)
  times, _ = _common.time_steps(lambda: a @ b, 2, reps, lambda _: None)
  flops = 2.0 * n ** 3
  return {"n": n, "dtype": "float32", "flops": flops, **_common.summarize(times),
          "peak_flops_per_s": flops / min(times),
          "median_flops_per_s": flops / statistics.median(times)}


CASES = ("torch_lora", "torch_full", "torch_qlora", "matmul_peak")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--case", required=True, choices=CASES)
  ap.add_argument("--shape", required=True)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--threads", type=int, default=_common.cpu_threads())
  ap.add_argument("--matmul-n", type=int, default=2048)
  args = ap.parse_args(argv)
  torch.set_num_threads(args.threads)
  shape = json.loads(args.shape)
  if args.case == "matmul_peak":
    out = case_matmul(args.matmul_n, max(args.steps, 10))
  else:
    out = case_train(args.case.split("_", 1)[1], shape, args.steps, args.warmup)
  _common.emit({"case": args.case, "shape": shape, "dtype": "float32", "steps": args.steps,
                "warmup": args.warmup, "backend": "cpu", "torch_threads": torch.get_num_threads(),
                "versions": versions(), **_common.base_info(), **out})


if __name__ == "__main__":
  main()
