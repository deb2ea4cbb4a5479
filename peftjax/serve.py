"""``peftjax serve``: an OpenAI-compatible HTTP server for one base model and many adapters.

    peftjax serve --model smollm2 --adapter sql=adapters/sql --adapter poems=adapters/poems

Endpoints, named as vLLM names them: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true``: server-sent events ``data: {...}`` and
a final ``data: [DONE]``), ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``,
``POST /v1/unload_lora_adapter`` ``{"lora_name"}``, ``GET /health``; and ``GET /stats`` (decode
steps, the most rows and distinct adapters seen in one step, compiled programs). A request's
``model`` picks the adapter; the base model is served under its own name.

How it runs. One background thread (the :class:`Engine`) owns the device. The adapters sit in
one pool (:func:`peftjax.multi.stack`, a fixed number of slots and a padded rank); requests wait
in a queue, are admitted into free rows of a KV cache of fixed shape (``--slots`` rows of
``--max-len`` tokens, one cache index per row), prefilled one at a time (prompts padded to a few
bucket lengths), then decoded together: every step feeds each active row's last token through
its own adapter (:func:`peftjax.models.generate.decode_step`), so requests for different
adapters share the same steps and nothing recompiles per request. Tokens are streamed out as
they come; a row is freed as soon as its request ends (stop token, stop string, ``max_tokens``,
the context is full, or the client went away). Loading and unloading adapters writes into the
pool's slots (values only: no recompile); an adapter being unloaded serves the requests already
running on it, then its slot is emptied.

Why Starlette + uvicorn: a small, well-kept ASGI toolkit and server (the stack FastAPI itself is
built on, without its validation layer, which the OpenAI error format would have to undo);
``async`` handlers stream server-sent events and notice a client that disconnects, while the
single engine thread keeps device work out of the event loop.

Errors are given as the OpenAI API gives them: ``{"error": {"message", "type", "param",
"code"}}``, 400 for malformed JSON and bad values (including a prompt longer than the context),
404 for an unknown model or path, 500 for an internal failure (the request fails; the server
keeps serving).
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import dataclasses
import json
import logging
import math
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# the module (``peftjax.models.generate`` is also the name of the function it exports)
gen = importlib.import_module("peftjax.models.generate")

__all__ = ["Engine", "build_app", "serve"]

log = logging.getLogger("peftjax.serve")


# ------------------------------------------------------------------------------------------------
# the engine: one thread, the device, the slots
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
  """One request in the engine: what to generate and where its events go."""
  prompt: list
  adapter: str             # the model name asked for (the base's name or an adapter's)
  max_tokens: int
  temperature: float
  top_p: float
  seed: int
  stop_ids: frozenset
  stop_strings: tuple
  emit: Callable[[tuple], None]
  logprobs: Optional[int] = None   # None: not asked; k: the chosen token's and k alternatives
  echo: bool = False               # completions: the prompt comes back first (and its logprobs)
  cancelled: bool = False
  # state, owned by the engine thread
  slot: int = -1
  pool_slot: int = 0
  tokens: list = dataclasses.field(default_factory=list)
  sent: str = ""
  text: str = ""             # the decoded completion so far (what the next token's offset is)
  base: int = 0              # with echo: the prompt text's length (offsets count from its start)
  entries: list = dataclasses.field(default_factory=list)   # logprobs of tokens not yet sent

  def cancel(self):
    self.cancelled = True


class _Busy(Exception):
  pass


class Engine:
  """Continuous batching over a fixed set of cache rows, in one background thread.

  Args:
    model: a :class:`peftjax.models.LlamaForCausalLM`.
    params: its parameters: a pool tree (:func:`peftjax.multi.stack`) or a plain base.
    tokenizer: a Hugging Face tokenizer (``decode``, ``eos_token_id``).
    base_name: the name the base model is served under.
    slots: cache rows (requests decoded at once).
    max_len: tokens per row (prompt + completion).
    stop_ids: token ids that end a completion (default: the tokenizer's and config's EOS).
    seed: the seed of requests that give none.
  """

  def __init__(self, model, params, tokenizer, *, base_name: str, slots: int = 8,
               max_len: int = 512, stop_ids: Optional[Sequence[int]] = None, seed: int = 0):
    from peftjax import multi
    self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
    self.params = params
    self.has_pool = gen._has_pool(params)
    self.slots, self.max_len = int(slots), int(max_len)
    if self.max_len < 2:
      raise ValueError(f"max_len must be at least 2 (a prompt token and a new one), got {max_len}")
    self.buckets = gen.prompt_buckets(self.max_len)
    if stop_ids is None:
      stop_ids = set(model.config.stop_token_ids)
      if getattr(tokenizer, "eos_token_id", None) is not None:
        stop_ids.add(int(tokenizer.eos_token_id))
    self.stop_ids = frozenset(int(s) for s in stop_ids)
    self.names = list(multi.slot_names(params)) if self.has_pool else [None]
    self.retiring: set = set()          # names being unloaded: no new requests, then removed
    self.cache = gen.init_slots(model, self.slots, self.max_len)
    self.apply_fn = gen._apply_fn(model, params, None)
    self.rows: list = [None] * self.slots   # the _Job in every cache row
    self.pending: collections.deque = collections.deque()
    self.commands: collections.deque = collections.deque()
    self.lock = threading.Lock()
    # a fast tokenizer's encode may reconfigure its Rust object (padding/truncation), which
    # raises "Already borrowed" if another thread decodes at the same time
    self.tokenizer_lock = threading.Lock()
    self.wake = threading.Event()
    self.stopping = False
    self.rng = np.random.default_rng(seed)
    self.stats = {"steps": 0, "prefills": 0, "max_active": 0, "max_adapters_in_step": 0,
                  "requests": 0, "cancelled": 0,
                  "errors": 0}
    self._warmup()
    self.thread = threading.Thread(target=self._loop, name="peftjax-engine", daemon=True)
    self.thread.start()

  # -- what handlers call (any thread) -----------------------------------------------------------
  def models(self) -> list:
    """The served names: the base first, then the adapters (not those being unloaded)."""
    return [self.base_name] + [n for n in self.names[1:] if n is not None
                               and n not in self.retiring]

  def submit(self, job: _Job):
    with self.lock:
      self.pending.append(job)
      self.stats["requests"] += 1
    self.wake.set()

  def call(self, fn: Callable[[], Any]):
    """Runs ``fn()`` in the engine thread between steps; returns a concurrent Future."""
    import concurrent.futures
    fut = concurrent.futures.Future()
    with self.lock:
      self.commands.append((fn, fut))
    self.wake.set()
    return fut

  def alive(self) -> bool:
    return self.thread.is_alive() and not self.stopping

  def stop(self, timeout: float = 10.0):
    self.stopping = True
    self.wake.set()
    self.thread.join(timeout)

  def compiled_programs(self) -> int:
    """Programs compiled by the step functions so far (prefill buckets + the decode step)."""
    return gen._prefill_slot._cache_size() + gen._decode_step._cache_size()

  # -- adapters (run in the engine thread through call()) ----------------------------------------
  def read_adapter(self, source):
    """An adapter tree read from a directory (HF PEFT, a peftjax checkpoint or a `peftjax train
    --out` directory) onto the base; any thread (reads files, touches nothing shared)."""
    from peftjax import multi
    if not self.has_pool:
      raise ValueError("the server was started without adapters, so it has no adapter pool to "
                       "load into: start it with --adapter NAME=DIR (the pool's targets and "
                       "rank come from those)")
    from pathlib import Path
    d = Path(source)
    if (d / "run.json").is_file() and (d / "adapter").is_dir():   # a `peftjax train --out` dir
      d = d / "adapter"
    if not d.exists():
      raise FileNotFoundError(2, "no such adapter directory", str(d))
    here = bool(getattr(self.model, "scan_layers", False))
    saved = multi.saved_layout(d)
    if saved is not None and saved != here:
      layout = lambda stacked: "stacked layers" if stacked else "per-layer weights"
      raise ValueError(f"{d}: the adapter was saved on {layout(saved)} and this server's base "
                       f"has {layout(here)}; restart the server with it among its --adapter "
                       f"options (the base then loads in the adapters' layout)")
    return multi._read_adapter(self.params, d)

  def load(self, name: str, tree):
    from peftjax import multi
    if name == self.base_name or name in self.names:
      raise ValueError(f"an adapter called {name!r} is already loaded" +
                       (" (it is being unloaded)" if name in self.retiring else ""))
    self.params = multi.load(self.params, name, tree)
    self.names = list(multi.slot_names(self.params))

  def unload(self, name: str):
    if name == self.base_name:
      raise ValueError(f"{name!r} is the base model; only adapters can be unloaded")
    if name not in self.names or name in self.retiring:
      raise LookupError(f"no adapter called {name!r} is loaded; loaded: {self.models()[1:]}")
    self.retiring.add(name)
    self._retire()

  def _retire(self):
    from peftjax import multi
    busy = {j.adapter for j in self.rows if j is not None}
    with self.lock:
      busy |= {j.adapter for j in self.pending}
    for name in sorted(self.retiring - busy):
      self.params = multi.remove(self.params, name)
      self.names = list(multi.slot_names(self.params))
      self.retiring.discard(name)

  # -- the loop ----------------------------------------------------------------------------------
  def _warmup(self):
    """Compiles the decode step and the smallest prompt bucket before the first request."""
    t0 = time.perf_counter()
    z = np.zeros(self.slots, np.int32)
    off = np.zeros(self.slots, bool)
    _, self.cache, _ = gen.decode_step(self.model, self.params, self.cache, z, z, off,
                                       apply_fn=self.apply_fn, logprobs=off)
    _, self.cache, _ = gen.prefill_slot(self.model, self.params, self.cache, 0, [0],
                                        buckets=self.buckets, apply_fn=self.apply_fn,
                                        logprobs=False)
    self.cache = self.cache._replace(index=jnp.zeros_like(self.cache.index))
    jax.block_until_ready(self.cache)
    log.info("compiled the decode step and the first prompt bucket in %.1fs",
             time.perf_counter() - t0)

  def _loop(self):
    while not self.stopping:
      try:
        self._commands()
        self._drop_cancelled()
        self._admit()
        if any(j is not None for j in self.rows):
          self._step()
        else:
          self.wake.wait(0.25)
          self.wake.clear()
        if self.retiring:
          self._retire()
      except Exception as e:  # never take the server down: fail the requests in flight
        log.error("engine step failed:\n%s", traceback.format_exc())
        self.stats["errors"] += 1
        for i, j in enumerate(self.rows):
          if j is not None:
            j.emit(("error", f"internal error: {type(e).__name__}: {e}"))
            self.rows[i] = None
        self.cache = gen.init_slots(self.model, self.slots, self.max_len)
    for i, j in enumerate(self.rows):
      if j is not None:
        j.emit(("error", "the server is shutting down", 503))
    with self.lock:
      while self.pending:
        self.pending.popleft().emit(("error", "the server is shutting down", 503))

  def _commands(self):
    while True:
      with self.lock:
        if not self.commands:
          return
        fn, fut = self.commands.popleft()
      try:
        fut.set_result(fn())
      except Exception as e:
        fut.set_exception(e)

  def _drop_cancelled(self):
    for i, j in enumerate(self.rows):
      if j is not None and j.cancelled:
        self.rows[i] = None
        self.stats["cancelled"] += 1
    with self.lock:
      keep = [j for j in self.pending if not j.cancelled]
      self.pending.clear()
      self.pending.extend(keep)

  def _admit(self):
    while True:
      free = [i for i, j in enumerate(self.rows) if j is None]
      if not free:
        return
      with self.lock:
        if not self.pending:
          return
        job = self.pending.popleft()
      try:
        self._prefill(free[0], job)
      except Exception as e:
        log.error("prefill failed:\n%s", traceback.format_exc())
        self.stats["errors"] += 1
        self.rows[free[0]] = None
        job.emit(("error", f"internal error: {type(e).__name__}: {e}"))
        if self.cache.k.is_deleted():   # donated to a program that then failed: start over
          raise

  def _key(self, job: _Job):
    return jax.random.fold_in(jax.random.key(job.seed), len(job.tokens))

  def _echo(self, job: _Job):
    """Sends the prompt's text (and with logprobs its tokens' logprobs, the first one None, as
    OpenAI's) before the completion; the completion's offsets then count from the prompt's."""
    entries = []
    with self.tokenizer_lock:
      dec = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
      text = dec(job.prompt)
      offsets = [len(dec(job.prompt[:i])) for i in range(len(job.prompt))] \
          if job.logprobs is not None else []
    if job.logprobs is not None:
      k = job.logprobs
      lps = jax.tree.map(np.asarray, gen.prompt_logprobs(
          self.model, self.params, job.prompt, adapter=job.pool_slot, buckets=self.buckets,
          apply_fn=self.apply_fn)) if len(job.prompt) > 1 else None
      entries.append((job.prompt[0], 0, None, None))
      for i, t in enumerate(job.prompt[1:]):
        entries.append((t, offsets[i + 1], float(lps.logprob[i]),
                        [(int(a), float(b)) for a, b in zip(lps.top_ids[i, :k],
                                                            lps.top_logprobs[i, :k])]))
    job.base = len(text)
    job.emit(("text", text, entries))

  def _prefill(self, slot: int, job: _Job):
    if job.adapter == self.base_name:
      job.pool_slot = 0
    elif job.adapter in self.names and job.adapter not in self.retiring:
      job.pool_slot = self.names.index(job.adapter)
    else:  # unloaded while it waited
      job.emit(("error", f"The model `{job.adapter}` was unloaded before the request started",
                404))
      return
    if job.echo:
      self._echo(job)
      if job.max_tokens == 0:   # the prompt alone (a log-likelihood request): no row needed
        return self._finish(job, "length")
    job.slot = slot
    self.rows[slot] = job
    tok, self.cache, lps = gen.prefill_slot(
        self.model, self.params, self.cache, slot, job.prompt, adapter=job.pool_slot,
        temperature=job.temperature, top_p=job.top_p, key=self._key(job), buckets=self.buckets,
        apply_fn=self.apply_fn, logprobs=job.logprobs is not None)
    self.stats["prefills"] += 1
    self._emit_token(job, int(tok), jax.tree.map(np.asarray, lps))

  def _step(self):
    jobs = self.rows
    active = np.array([j is not None for j in jobs])
    last = np.array([j.tokens[-1] if j else 0 for j in jobs], np.int32)
    ids = np.array([j.pool_slot if j else 0 for j in jobs], np.int32)
    temp = np.array([j.temperature if j else 0.0 for j in jobs], np.float32)
    top_p = np.array([j.top_p if j else 1.0 for j in jobs], np.float32)
    seeds = np.array([j.seed if j else 0 for j in jobs], np.uint32)
    counts = np.array([len(j.tokens) if j else 0 for j in jobs], np.int32)
    keys = _row_keys(seeds, counts)
    want = np.array([j is not None and j.logprobs is not None for j in jobs])
    toks, self.cache, lps = gen.decode_step(self.model, self.params, self.cache, last, ids, active,
                                            temperature=temp, top_p=top_p, key=keys,
                                            apply_fn=self.apply_fn, logprobs=want)
    toks = np.asarray(toks)
    lps = jax.tree.map(np.asarray, lps) if want.any() else None
    self.stats["steps"] += 1
    self.stats["max_active"] = max(self.stats["max_active"], int(active.sum()))
    self.stats["max_adapters_in_step"] = max(self.stats["max_adapters_in_step"],
                                             len({int(k) for k in ids[active]}))
    for i, j in enumerate(jobs):
      if j is not None:
        self._emit_token(j, int(toks[i]), None if lps is None else
                         jax.tree.map(lambda x, i=i: x[i], lps))

  def _emit_token(self, job: _Job, tok: int, lps=None):
    """Adds one generated token to ``job``: streams the new text, ends the job when due.
    ``lps``: the token's :class:`~peftjax.models.generate.TokenLogprobs` row, for a job that
    asked for logprobs."""
    n_prompt = len(job.prompt)
    if tok in job.stop_ids:
      return self._finish(job, "stop")
    job.tokens.append(tok)
    if job.logprobs is not None and lps is not None:
      k = job.logprobs
      job.entries.append((tok, job.base + len(job.text), float(lps.logprob),
                          [(int(a), float(b)) for a, b in zip(lps.top_ids[:k],
                                                              lps.top_logprobs[:k])]))
    with self.tokenizer_lock:
      text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
    job.text = text
    hit = None
    for s in job.stop_strings:
      at = text.find(s, max(0, len(job.sent) - len(s)))
      if at >= 0 and (hit is None or at < hit):
        hit = at
    if hit is not None:
      self._send(job, text[:hit])
      return self._finish(job, "stop", cut=True)
    if text.endswith("\ufffd"):
      safe = len(job.sent)    # an incomplete multi-byte character: wait for the next token
    else:
      safe = len(text)
      for s in job.stop_strings:   # hold back what may be the start of a stop string
        for k in range(min(len(s) - 1, len(text)), 0, -1):
          if text.endswith(s[:k]):
            safe = min(safe, len(text) - k)
            break
    self._send(job, text[:max(safe, len(job.sent))])
    if len(job.tokens) >= job.max_tokens or n_prompt + len(job.tokens) >= self.max_len:
      if not text.endswith("\ufffd"):
        self._send(job, text)
      return self._finish(job, "length")

  def _send(self, job: _Job, text: str):
    if len(text) > len(job.sent):
      # the logprobs of the tokens whose text starts in what is sent go with it
      end = job.base + len(text)
      n = next((i for i, e in enumerate(job.entries) if e[1] >= end), len(job.entries))
      sent, job.entries = job.entries[:n], job.entries[n:]
      job.emit(("text", text[len(job.sent):], sent))
      job.sent = text

  def _finish(self, job: _Job, reason: str, cut: bool = False):
    # cut (a stop string ended the text): tokens that start after the text are not reported
    rest = ([e for e in job.entries if e[1] < job.base + len(job.sent)] if cut else
            job.entries)
    job.entries = []
    job.emit(("done", reason, {"prompt_tokens": len(job.prompt),
                               "completion_tokens": len(job.tokens),
                               "total_tokens": len(job.prompt) + len(job.tokens)}, rest))
    if 0 <= job.slot < self.slots and self.rows[job.slot] is job:
      self.rows[job.slot] = None


@jax.jit
def _row_keys(seeds, counts):
  return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


# ------------------------------------------------------------------------------------------------
# the HTTP side
# ------------------------------------------------------------------------------------------------

class APIError(Exception):
  """An error response in the OpenAI format."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, \
        code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


def _bad(message, param=None, code=None):
  return APIError(400, message, param=param, code=code)


def _number(body, name, default, lo, hi, *, lo_open=False):
  v = body.get(name)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise _bad(f"{name} must be a number, got {v!r}", name, "invalid_type")
  if v < lo or v > hi or (lo_open and v == lo):
    rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
    raise _bad(f"{name} must be in {rng}, got {v}", name, "invalid_value")
  return float(v)


def _int(body, name, default, lo=1):
  v = body.get(name)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, int):
    raise _bad(f"{name} must be an integer, got {v!r}", name, "invalid_type")
  if v < lo:
    raise _bad(f"{name} must be >= {lo}, got {v}", name, "invalid_value")
  return v


_UNSUPPORTED = {"best_of": (None, 1), "n": (None, 1), "suffix": (None, ""),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
                "response_format": (None, {"type": "text"})}


class _Server:
  """The request handlers of one engine."""

  def __init__(self, engine: Engine):
    self.engine = engine

  # -- parsing -----------------------------------------------------------------------------------
  @staticmethod
  async def _json(request) -> dict:
    raw = await request.body()
    try:
      body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
      raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    return body

  def _model(self, body) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
      raise _bad("model is required: the base model's name or an adapter's (GET /v1/models)",
                 "model", "missing_required_parameter" if name is None else "invalid_type")
    if name not in self.engine.models():
      raise APIError(404, f"The model `{name}` does not exist. Served: "
                          f"{', '.join(self.engine.models())}", param="model",
                     code="model_not_found")
    return name

  @staticmethod
  def _logprobs(body, chat: bool) -> Optional[int]:
    """How many alternatives a request wants with each token's logprob (None: no logprobs).
    Completions: ``logprobs: k``; chat: ``logprobs: true`` and ``top_logprobs: k``."""
    most = gen.TOP_LOGPROBS
    if not chat:
      lp = body.get("logprobs")
      if lp is None:
        return None
      if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= most:
        raise _bad(f"logprobs must be an integer in [0, {most}], got {lp!r}", "logprobs",
                   "invalid_value")
      return lp
    on, top = body.get("logprobs"), body.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
      raise _bad(f"logprobs must be a boolean, got {on!r}", "logprobs", "invalid_type")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or
                            not 0 <= top <= most):
      raise _bad(f"top_logprobs must be an integer in [0, {most}], got {top!r}", "top_logprobs",
                 "invalid_value")
    if top is not None and not on:
      raise _bad("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    return (top or 0) if on else None

  def _sampling(self, body, prompt: list, default_max: Optional[int]) -> dict:
    for k, ok in _UNSUPPORTED.items():
      if k in body and body[k] not in ok:
        raise _bad(f"{k}={body[k]!r} is not supported by this server", k, "unsupported_parameter")
    chat = default_max is None
    logprobs = self._logprobs(body, chat=chat)
    echo = body.get("echo", False)
    if chat and echo not in (None, False):
      raise _bad(f"echo={echo!r} is not supported by chat completions", "echo",
                 "unsupported_parameter")
    if not isinstance(echo, bool) and echo is not None:
      raise _bad(f"echo must be a boolean, got {echo!r}", "echo", "invalid_type")
    echo = bool(echo)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    max_tokens = _int(body, "max_completion_tokens", None)
    if max_tokens is None:   # 0 (the prompt alone) only with echo
      max_tokens = _int(body, "max_tokens", None, lo=0 if body.get("echo") is True else 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
      raise _bad(f"seed must be an integer, got {seed!r}", "seed", "invalid_type")
    stop = body.get("stop")
    if stop is None:
      stop = ()
    elif isinstance(stop, str):
      stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
      stop = tuple(stop)
    else:
      raise _bad(f"stop must be a string or a list of up to 4 strings, got {stop!r}", "stop",
                 "invalid_type")
    if any(not s for s in stop):
      raise _bad("stop strings must not be empty", "stop", "invalid_value")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
      raise _bad(f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos",
                 "invalid_type")
    eng = self.engine
    n = len(prompt)
    if n == 0:
      raise _bad("the prompt is empty", "prompt", "invalid_value")
    room = eng.max_len - n
    if (room < 1 and max_tokens != 0) or (max_tokens is not None and max_tokens > room):
      want = n + (max_tokens or 1)
      raise _bad(f"This model's maximum context length is {eng.max_len} tokens. However, you "
                 f"requested {want} tokens ({n} in the prompt, {want - n} in the completion). "
                 f"Please reduce the length of the prompt or completion.", "messages"
                 if default_max is None else "prompt", "context_length_exceeded")
    if max_tokens is None:
      max_tokens = room if default_max is None else min(default_max, room)
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=logprobs,
                echo=echo,
                seed=int(eng.rng.integers(2 ** 31)) if seed is None else seed % 2 ** 32,
                stop_strings=stop, stop_ids=frozenset() if ignore_eos else eng.stop_ids)

  def _completion_prompt(self, body) -> list:
    p = body.get("prompt")
    tok = self.engine.tokenizer
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
      p = p[0]
    if isinstance(p, str):
      with self.engine.tokenizer_lock:
        return list(tok(p)["input_ids"])
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
      vocab = self.engine.model.config.vocab_size
      bad = [t for t in p if not 0 <= t < vocab]
      if bad:
        raise _bad(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", "prompt",
                   "invalid_value")
      return list(p)
    if p is None:
      raise _bad("prompt is required", "prompt", "missing_required_parameter")
    raise _bad("prompt must be a string or a list of token ids (one prompt per request)",
               "prompt", "invalid_type")

  def _chat_prompt(self, body) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
      raise _bad("messages must be a non-empty list of {role, content} objects", "messages",
                 "missing_required_parameter" if msgs is None else "invalid_type")
    conv = []
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _bad(f"messages[{i}] must be an object with a role", "messages", "invalid_type")
      c = m.get("content")
      if isinstance(c, list):   # content parts: text only
        parts = []
        for part in c:
          if not isinstance(part, dict) or part.get("type") != "text" or \
              not isinstance(part.get("text"), str):
            raise _bad(f"messages[{i}].content: only text parts are supported", "messages",
                       "invalid_value")
          parts.append(part["text"])
        c = "".join(parts)
      if c is None:
        c = ""
      if not isinstance(c, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                   "messages", "invalid_type")
      conv.append({"role": m["role"], "content": c})
    tok = self.engine.tokenizer
    if not getattr(tok, "chat_template", None):
      raise _bad("this model's tokenizer has no chat template: use /v1/completions", "messages",
                 "unsupported_parameter")
    with self.engine.tokenizer_lock:
      try:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
      except Exception as e:  # a template that rejects the conversation (roles, order)
        raise _bad(f"the chat template rejects these messages: {e}", "messages",
                   "invalid_value") from None
      return list(tok(text, add_special_tokens=False)["input_ids"])

  # -- running a job -----------------------------------------------------------------------------
  def _start(self, name, prompt, opts):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(ev):
      try:
        loop.call_soon_threadsafe(queue.put_nowait, ev)
      except RuntimeError:   # the event loop is closed: the server is stopping
        pass
    job = _Job(prompt=prompt, adapter=name, emit=emit, **opts)
    if not self.engine.alive():
      raise APIError(503, "the engine is not running", type="server_error")
    self.engine.submit(job)
    return job, queue

  async def _events(self, job, queue, request):
    """The job's events as they come; cancels the job if the client goes away."""
    try:
      while True:
        try:
          ev = await asyncio.wait_for(queue.get(), 1.0)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            return
          continue
        yield ev
        if ev[0] in ("done", "error"):
          return
    finally:
      job.cancel()
      self.engine.wake.set()

  async def _run(self, request, kind: str):
    body = await self._json(request)
    name = self._model(body)
    if kind == "chat":
      prompt, default_max = self._chat_prompt(body), None
    else:
      prompt, default_max = self._completion_prompt(body), 16
    opts = self._sampling(body, prompt, default_max)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise _bad(f"stream must be a boolean, got {stream!r}", "stream", "invalid_type")
    so = body.get("stream_options") or {}
    usage_chunk = bool(isinstance(so, dict) and so.get("include_usage"))
    job, queue = self._start(name, prompt, opts)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    from starlette.responses import JSONResponse, StreamingResponse
    if stream:
      return StreamingResponse(self._sse(job, queue, request, kind, rid, created, name,
                                         usage_chunk), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    text, reason, usage, entries = [], None, None, []
    async for ev in self._events(job, queue, request):
      if ev[0] == "text":
        text.append(ev[1])
        entries += ev[2]
      elif ev[0] == "done":
        reason, usage = ev[1], ev[2]
        entries += ev[3]
      else:
        raise _event_error(ev)
    if reason is None:   # the client went away
      return JSONResponse({}, status_code=499)
    text = "".join(text)
    lp = self._logprobs_json(kind, entries) if job.logprobs is not None else None
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "logprobs": lp, "finish_reason": reason} if kind == "chat" else
              {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason})
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": name,
                         "choices": [choice], "usage": usage})

  async def _sse(self, job, queue, request, kind, rid, created, name, usage_chunk):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: Optional[str], reason=None, first=False, entries=()):
      lp = (self._logprobs_json(kind, entries) if job.logprobs is not None and not first
            else None)
      if kind == "chat":
        d = {"role": "assistant", "content": ""} if first else \
            ({} if delta is None else {"content": delta})
        c = {"index": 0, "delta": d, "logprobs": lp, "finish_reason": reason}
      else:
        c = {"index": 0, "text": delta or "", "logprobs": lp, "finish_reason": reason}
      return _event({"id": rid, "object": obj, "created": created, "model": name,
                     "choices": [c]})
    if kind == "chat":
      yield chunk(None, first=True)
    async for ev in self._events(job, queue, request):
      if ev[0] == "text":
        yield chunk(ev[1], entries=ev[2])
      elif ev[0] == "done":
        yield chunk(None, ev[1], entries=ev[3])
        if usage_chunk:
          yield _event({"id": rid, "object": obj, "created": created, "model": name,
                        "choices": [], "usage": ev[2]})
      else:
        yield _event(_event_error(ev).body())
    yield "data: [DONE]\n\n"

  def _logprobs_json(self, kind: str, entries) -> dict:
    """OpenAI's ``logprobs`` object of ``entries`` ((token, text offset, logprob, [(id, logprob)
    alternatives]) each): chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` or
    completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` (offsets into the
    returned text; each ``top_logprobs`` dict also holds the chosen token, as OpenAI's; the
    first token of an echoed prompt has None for both). A logprob of -inf is written as
    -9999.0, as OpenAI does (JSON has no infinity)."""
    tok = self.engine.tokenizer
    with self.engine.tokenizer_lock:
      ids = {t for e in entries for t in [e[0]] + [a for a, _ in e[3] or ()]}
      text = {t: tok.decode([t]) for t in ids}
    num = lambda v: None if v is None else max(float(v), -9999.0)
    if kind == "chat":
      one = lambda t, v: {"token": text[t], "logprob": num(v),
                          "bytes": list(text[t].encode("utf-8"))}
      return {"content": [{**one(t, v), "top_logprobs": [one(a, b) for a, b in alts]}
                          for t, _, v, alts in entries]}
    return {"tokens": [text[t] for t, _, _, _ in entries],
            "token_logprobs": [num(v) for _, _, v, _ in entries],
            "top_logprobs": [None if alts is None else
                             {**{text[a]: num(b) for a, b in alts}, text[t]: num(v)}
                             for t, _, v, alts in entries],
            "text_offset": [o for _, o, _, _ in entries]}

  # -- endpoints ---------------------------------------------------------------------------------
  async def completions(self, request):
    return await self._run(request, "completion")

  async def chat(self, request):
    return await self._run(request, "chat")

  async def models(self, request):
    from starlette.responses import JSONResponse
    eng = self.engine
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "peftjax",
             "root": eng.base_name, "parent": None if n == eng.base_name else eng.base_name}
            for n in eng.models()]
    return JSONResponse({"object": "list", "data": data})

  async def health(self, request):
    from starlette.responses import Response
    return Response(status_code=200 if self.engine.alive() else 503)

  async def stats(self, request):
    from starlette.responses import JSONResponse
    eng = self.engine
    return JSONResponse(dict(eng.stats, slots=eng.slots, max_len=eng.max_len,
                             active=sum(j is not None for j in eng.rows),
                             compiled_programs=eng.compiled_programs()))

  async def load_adapter(self, request):
    from peftjax import multi
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import PlainTextResponse
    body = await self._json(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name:
      raise _bad("lora_name must be a non-empty string", "lora_name")
    if not isinstance(path, str) or not path:
      raise _bad("lora_path must be a non-empty string", "lora_path")
    try:
      multi._check_name(name)
      if name == self.engine.base_name or name in self.engine.names:
        raise ValueError(f"an adapter called {name!r} is already loaded")
      tree = await run_in_threadpool(self.engine.read_adapter, path)
      await asyncio.wrap_future(self.engine.call(lambda: self.engine.load(name, tree)))
    except FileNotFoundError as e:
      raise APIError(404, f"{path}: {e.strerror or e}", param="lora_path",
                     code="not_found") from None
    except (ValueError, TypeError, OSError) as e:
      raise _bad(str(e), "lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

  async def unload_adapter(self, request):
    from starlette.responses import PlainTextResponse
    body = await self._json(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
      raise _bad("lora_name must be a non-empty string", "lora_name")
    try:
      await asyncio.wrap_future(self.engine.call(lambda: self.engine.unload(name)))
    except LookupError as e:
      raise APIError(404, str(e.args[0]), param="lora_name", code="model_not_found") from None
    except ValueError as e:
      raise _bad(str(e), "lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _event_error(ev) -> APIError:
  """The APIError of an engine ``("error", message[, status])`` event."""
  status = ev[2] if len(ev) > 2 else 500
  if status == 404:
    return APIError(404, ev[1], param="model", code="model_not_found")
  return APIError(status, ev[1], type="server_error")


def _event(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engine: Engine):
  """The Starlette ASGI app serving ``engine``."""
  from starlette.applications import Starlette
  from starlette.exceptions import HTTPException
  from starlette.responses import JSONResponse
  from starlette.routing import Route
  s = _Server(engine)

  async def api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)

  async def http_error(request, e: HTTPException):
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

  async def internal(request, e: Exception):
    log.error("request failed:\n%s", traceback.format_exc())
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                 type="server_error").body(), status_code=500)

  routes = [Route("/v1/models", s.models, methods=["GET"]),
            Route("/v1/completions", s.completions, methods=["POST"]),
            Route("/v1/chat/completions", s.chat, methods=["POST"]),
            Route("/v1/load_lora_adapter", s.load_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", s.unload_adapter, methods=["POST"]),
            Route("/health", s.health, methods=["GET"]),
            Route("/stats", s.stats, methods=["GET"])]
  return Starlette(routes=routes, exception_handlers={APIError: api_error,
                                                      HTTPException: http_error,
                                                      Exception: internal})


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
  """Runs the server until SIGINT/SIGTERM, then stops the engine."""
  import uvicorn
  try:
    uvicorn.run(build_app(engine), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
  finally:
    engine.stop()
