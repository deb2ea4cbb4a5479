"""``peftjax serve``: the OpenAI-compatible multi-adapter server, started as a subprocess on a free
loopback port with a tiny random Llama (a character-level tokenizer, so text and tokens map one
to one) and three HF PEFT LoRA adapters, talked to with the official ``openai`` client and with
raw HTTP. Greedy outputs equal one-adapter ``generate()`` token for token; concurrent requests to
different adapters share decode steps and each returns what it returns alone; adapters load and
unload at run time without a new compile; bad requests get OpenAI-format errors and the server
keeps answering. Also the slot functions (per-row cache index) against ``generate()``."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax import multi
from peftjax.lora import LoraWeight
from peftjax.models import LlamaConfig, LlamaForCausalLM, generate
from peftjax.models.generate import decode_step, init_slots, prefill_slot

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                  num_kv_heads=2, eos_token_id=2, pad_token_id=0, bos_token_id=1)
MAX_LEN = 128
WAIT = 30.0   # seconds any one request may take


def char_tokenizer():
  """A character-level fast tokenizer of 96 ids (0 pad, 1 BOS, 2 EOS, then printable ASCII) with
  a small chat template."""
  transformers = pytest.importorskip("transformers")
  import tokenizers
  from tokenizers import Regex, decoders, models, pre_tokenizers
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): 3 + i for i in range(93)}}
  t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  t.decoder = decoders.Fuse()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>",
                                             bos_token="<s>", eos_token="</s>")
  tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<a>{% endif %}")
  return tok


def acting(tree, seed):
  """LoRA ``b`` random (it starts at zero), so every adapter changes the outputs."""
  def f(path, x):
    if isinstance(x, LoraWeight):
      k = jax.random.fold_in(jax.random.key(seed), len(jax.tree_util.keystr(path)))
      return x.replace(b=jax.random.normal(k, x.b.shape, x.b.dtype) * 0.3)
    return x
  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=peftjax.is_node)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The model directory, four rank-2 LoRA adapters (three HF PEFT, one peftjax checkpoint) and
  the trees the references run (float32: what the server reads back is the same)."""
  from peftjax.io.checkpoint import save_adapter
  from peftjax.io.hf import save_pretrained
  from peftjax.io.hf_peft import save_hf_peft
  d = tmp_path_factory.mktemp("serve")
  model = LlamaForCausalLM(CFG)
  # random weights straight from the shapes (nothing to compile), sharpened so that greedy
  # choices are not near-ties
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (1.0 + rng.normal(0, 0.1, s.shape) if "scale" in jax.tree_util.keystr(path)
                       else rng.normal(0, 0.06, s.shape)).astype(np.float32), shapes)
  tok = char_tokenizer()
  save_pretrained(params, CFG, d / "tiny", tokenizer=tok)
  trees = {"tiny": params}
  for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
    t = acting(peftjax.lora.apply(params, rank=2, alpha=4.0 + i, key=jax.random.key(i)), 10 + i)
    if name == "delta":
      save_adapter(d / name, t)
    else:
      save_hf_peft(t, d / name)
    trees[name] = t
  save_hf_peft(peftjax.lora.apply(params, rank=6, targets=["q_proj"]), d / "wide")
  return d, model, tok, trees


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(files):
  """``peftjax serve`` started in a subprocess (it compiles while the first test runs); always
  stopped. Yields ``(process, base URL, log file)``."""
  d = files[0]
  port = free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  argv = [sys.executable, "-m", "peftjax.cli", "serve", "--model", str(d / "tiny"),
          "--adapter", f"alpha={d / 'alpha'}", "--adapter", f"beta={d / 'beta'}",
          "--adapter", f"gamma={d / 'gamma'}", "--slots", "4", "--max-len", str(MAX_LEN),
          "--max-loras", "4", "--max-lora-rank", "4", "--port", str(port), "--log-level",
          "warning"]
  log = open(d / "server.log", "w+")
  proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d)
  url = f"http://127.0.0.1:{port}"
  try:
    yield proc, url, log
  finally:
    proc.terminate()
    try:
      proc.wait(15)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(5)
    log.close()


@pytest.fixture(scope="module")
def server(spawned):
  """The base URL of the server, once it answers ``/health`` (at most 180 s)."""
  proc, url, log = spawned
  deadline = time.monotonic() + 180
  while True:
    if proc.poll() is not None:
      log.seek(0)
      pytest.fail(f"peftjax serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        break
    except httpx.HTTPError:
      pass
    if time.monotonic() > deadline:
      pytest.fail("peftjax serve did not answer /health within 180 s")
    time.sleep(0.2)
  return url


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server + "/v1", api_key="none", timeout=WAIT, max_retries=0)


REF_LEN, REF_NEW = 24, 40   # every reference: one compiled generate() per tree structure


def reference(files, name, ids, n, stop=True):
  """What ``generate()`` with adapter ``name`` alone gives (greedy, the first ``n`` tokens, up to
  the first EOS if ``stop``): ``(decoded text, tokens)``."""
  _, model, tok, trees = files
  assert len(ids) <= REF_LEN and n <= REF_NEW
  row = np.zeros((1, REF_LEN), np.int32)
  mask = np.zeros((1, REF_LEN), np.int32)
  row[0, REF_LEN - len(ids):], mask[0, REF_LEN - len(ids):] = ids, 1   # left padding
  out = generate(model, trees[name], row, mask, max_new_tokens=REF_NEW, stop_tokens=())
  seq = np.asarray(out.tokens)[0][:n].tolist()
  if stop and 2 in seq:
    seq = seq[:seq.index(2) + 1]
  return tok.decode(seq, skip_special_tokens=True), seq


def stats(server):
  return httpx.get(server + "/stats", timeout=WAIT).json()


# ------------------------------------------------------------------------------------------------
# the slot functions (no server)
# ------------------------------------------------------------------------------------------------

@pytest.mark.newest_only
def test_slots_decode_each_row_as_generate_does(files, spawned):
  """Rows at different lengths, with different adapters, prefilled into arbitrary rows at
  different times, decoded in shared steps: each equals its own generate() token for token."""
  _, model, _, trees = files
  pool = multi.stack({n: trees[n] for n in ("alpha", "beta")}, slots=4, max_rank=4)
  prompts = {0: ([5, 9, 30, 41, 7], 1), 2: ([60, 3, 3], 2), 1: ([11] * 12, 0)}
  cache = init_slots(model, 3, 40)
  out = {}
  order = [0, 2]
  for row in order:   # two rows first
    p, k = prompts[row]
    t, cache = prefill_slot(model, pool, cache, row, p, adapter=k)
    out[row] = [int(t)]
  for step in range(12):
    if step == 3:     # the third joins later, at another length
      t, cache = prefill_slot(model, pool, cache, 1, prompts[1][0], adapter=0)
      out[1] = [int(t)]
    active = np.array([r in out and len(out[r]) < 8 for r in range(3)])
    last = np.array([out[r][-1] if r in out else 0 for r in range(3)])
    ids = np.array([prompts[r][1] for r in range(3)])
    toks, cache = decode_step(model, pool, cache, last, ids, active)
    for r in range(3):
      if active[r]:
        out[r].append(int(toks[r]))
  names = [None, "alpha", "beta"]
  for row, (p, k) in prompts.items():
    want = reference(files, names[k] or "tiny", p, 8, stop=False)[1]
    assert out[row][:8] == want, row
  assert out[0] != out[2]
  with pytest.raises(ValueError, match="a prompt needs 1 to 39 tokens"):
    prefill_slot(model, pool, cache, 0, [3] * 40)
  with pytest.raises(ValueError, match="one index per row"):
    decode_step(model, pool, peftjax.models.init_cache(CFG, 3, 8), last, ids, active)


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------

def test_serve_usage_errors(files, capsys):
  from peftjax import cli
  d = files[0]
  cases = [(["--adapter", "x"], "--adapter 'x': expected NAME=DIR"),
           (["--adapter", f"a={d / 'nope'}"], "no such adapter directory"),
           (["--adapter", f"a={d / 'alpha'}", "--adapter", f"a={d / 'beta'}"], "given twice"),
           (["--adapter", f"tiny={d / 'alpha'}"], "has the base model's name"),
           (["--max-len", "1"], "--max-len must be at least 2"),
           (["--max-len", "4096"], "longer than the model's context (2048 positions)")]
  for argv, msg in cases:
    assert cli.main(["serve", "--model", str(d / "tiny"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftjax serve: error: ") and msg in err, err


def test_models_and_health(server, client):
  assert httpx.get(server + "/health", timeout=WAIT).status_code == 200
  assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta", "gamma"]


@pytest.mark.parametrize("name", ["tiny", "beta"])
def test_completion_equals_one_adapter_generate(files, client, name):
  tok = files[2]
  prompt = "Call me Ishmael."
  want, seq = reference(files, name, tok(prompt)["input_ids"], 20)
  r = client.completions.create(model=name, prompt=prompt, max_tokens=20, temperature=0)
  assert r.choices[0].text == want
  assert r.choices[0].finish_reason == ("stop" if seq[-1] == 2 else "length")
  assert r.usage.prompt_tokens == len(prompt)
  assert r.usage.completion_tokens == len(seq) - (seq[-1] == 2)
  parts = [c.choices[0].text for c in client.completions.create(
      model=name, prompt=prompt, max_tokens=20, temperature=0, stream=True)]
  assert "".join(parts) == want and len([p for p in parts if p]) > 1


def test_chat_equals_one_adapter_generate(files, client):
  tok = files[2]
  msgs = [{"role": "user", "content": "Hi"}]
  ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]
  want, _ = reference(files, "gamma", ids, 30)
  r = client.chat.completions.create(model="gamma", messages=msgs, temperature=0, max_tokens=30)
  assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
  chunks = list(client.chat.completions.create(model="gamma", messages=msgs, temperature=0,
                                               stream=True, max_tokens=30,
                                               stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
  assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
  # a stop string ends the text before it (not streamed out, even in part)
  if len(want) > 6:
    stop = want[3:5]
    r = client.chat.completions.create(model="gamma", messages=msgs, temperature=0, stop=[stop],
                                       max_tokens=30)
    assert r.choices[0].message.content == want[:want.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def model_logprobs(files, name, ids, gen):
  """``log_softmax`` of adapter ``name``'s logits before each of the tokens ``gen`` that follow
  ``ids`` (one forward over the whole sequence): a ``[len(gen), vocab]`` array."""
  _, model, _, trees = files
  seq = np.asarray([list(ids) + list(gen)], np.int32)
  logits = peftjax.lift(model.apply)({"params": trees[name]}, seq)
  lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))[0]
  return lp[len(ids) - 1:len(ids) - 1 + len(gen)]


@pytest.mark.newest_only   # not about the interpreter: the 3.11 suite is over budget
def test_logprobs_are_the_models_log_softmax(files, server, client):
  """logprobs (completions, with echo too) and logprobs + top_logprobs (chat), streamed or not:
  each token's log-probability and its likeliest alternatives under the adapter's model; the
  generated tokens' come from the same compiled step (nothing compiles for them)."""
  tok = files[2]
  before = stats(server)["compiled_programs"]
  prompt = "Call me Ishmael."
  ids = tok(prompt)["input_ids"]
  r = client.completions.create(model="beta", prompt=prompt, max_tokens=12, temperature=0,
                                logprobs=3)
  c, lp = r.choices[0], r.choices[0].logprobs
  n = r.usage.completion_tokens
  gen = reference(files, "beta", ids, n, stop=False)[1]
  want = model_logprobs(files, "beta", ids, gen)
  # each token as it reads (special tokens by name: the text leaves them out), at its offset
  specials = set(tok.all_special_tokens)
  shown = ["" if t in specials else t for t in lp.tokens]
  assert len(lp.tokens) == n and "".join(shown) == c.text
  assert lp.text_offset == [len("".join(shown[:i])) for i in range(n)]
  for i, t in enumerate(gen):
    assert lp.token_logprobs[i] == pytest.approx(float(want[i, t]), abs=1e-4), i
    top3 = [tok.decode([int(j)]) for j in np.argsort(-want[i])[:3]]
    assert set(lp.top_logprobs[i]) == set(top3) | {lp.tokens[i]}
    for s_, v in lp.top_logprobs[i].items():
      assert v == pytest.approx(float(want[i, tok.convert_tokens_to_ids(s_)]), abs=1e-4)
  # chat: logprobs + top_logprobs, the same entries streamed and not
  msgs = [{"role": "user", "content": "Hi"}]
  kw = dict(model="gamma", messages=msgs, temperature=0, max_tokens=10, logprobs=True,
            top_logprobs=2)
  r = client.chat.completions.create(**kw)
  content = r.choices[0].logprobs.content
  assert "".join("" if e.token in specials else e.token for e in content) == \
      r.choices[0].message.content
  assert len(content) == r.usage.completion_tokens
  for e in content:
    assert e.bytes == list(e.token.encode("utf-8")) and len(e.top_logprobs) == 2
    assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)   # greedy: the likeliest
  chunks = list(client.chat.completions.create(**kw, stream=True))
  streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
              for e in ch.choices[0].logprobs.content]
  assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
      [(e.token, round(e.logprob, 4)) for e in content]
  assert stats(server)["compiled_programs"] == before   # (echo's prompt pass is a program)
  # echo: the prompt comes back first with its tokens' logprobs (the first None), then the
  # completion's, offsets counting from the prompt's start; max_tokens=0: the prompt alone
  r = client.completions.create(model="beta", prompt=prompt, max_tokens=4, temperature=0,
                                logprobs=2, echo=True)
  c, lp = r.choices[0], r.choices[0].logprobs
  gen = reference(files, "beta", ids, r.usage.completion_tokens, stop=False)[1]
  want = model_logprobs(files, "beta", ids[:1], ids[1:] + gen)
  assert c.text.startswith(prompt) and len(lp.tokens) == len(ids) + len(gen)
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  for i, t in enumerate(ids[1:] + gen):
    assert lp.token_logprobs[i + 1] == pytest.approx(float(want[i, t]), abs=1e-4), i
    assert len(lp.top_logprobs[i + 1]) in (2, 3)
  shown = ["" if t in specials else t for t in lp.tokens]
  assert "".join(shown) == c.text
  assert lp.text_offset == [len("".join(shown[:i])) for i in range(len(shown))]
  r = client.completions.create(model="beta", prompt=prompt, max_tokens=0, logprobs=0, echo=True)
  assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
  assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
      [float(want[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
  # without logprobs: none
  r = client.chat.completions.create(model="gamma", messages=msgs, temperature=0, max_tokens=3)
  assert r.choices[0].logprobs is None
  # bad values: the OpenAI error, naming the parameter
  for path, body, param in (
      ("/v1/completions", {"model": "beta", "prompt": "x", "logprobs": 21}, "logprobs"),
      ("/v1/completions", {"model": "beta", "prompt": "x", "logprobs": True}, "logprobs"),
      ("/v1/chat/completions", {"model": "beta", "messages": msgs, "top_logprobs": 2},
       "top_logprobs"),
      ("/v1/chat/completions", {"model": "beta", "messages": msgs, "logprobs": "yes"},
       "logprobs"),
      ("/v1/chat/completions", {"model": "beta", "messages": msgs, "echo": True}, "echo"),
      ("/v1/completions", {"model": "beta", "prompt": "x", "max_tokens": 0}, "max_tokens")):
    res = httpx.post(server + path, json=body, timeout=WAIT)
    assert res.status_code == 400 and res.json()["error"]["param"] == param, res.text


def test_three_adapters_at_once_return_what_each_returns_alone(files, server, client):
  tok = files[2]
  prompt = "The whale"
  ids = tok(prompt)["input_ids"]
  names = ["alpha", "beta", "gamma"]
  n = MAX_LEN - len(ids)   # long enough to overlap; the reference checks the first REF_NEW
  want = {m: reference(files, m, ids, REF_NEW, stop=False)[0] for m in names}
  before = stats(server)
  got, errors = {}, []
  start = threading.Barrier(len(names), timeout=WAIT)

  def ask(m):
    try:
      start.wait()
      got[m] = "".join(c.choices[0].text for c in client.completions.create(
          model=m, prompt=prompt, max_tokens=n, temperature=0, stream=True,
          extra_body={"ignore_eos": True}))
    except Exception as e:  # reported below
      errors.append(e)
  threads = [threading.Thread(target=ask, args=(m,)) for m in names]
  for t in threads:
    t.start()
  for t in threads:
    t.join(WAIT)
  assert not errors and sorted(got) == sorted(want)
  for m in names:
    assert got[m].startswith(want[m]), m
  assert len(set(want.values())) == 3
  after = stats(server)
  assert after["max_adapters_in_step"] >= 2     # they shared decode steps
  assert after["compiled_programs"] == before["compiled_programs"]


def test_load_and_unload_at_run_time(files, server, client):
  d, _, tok, _ = files
  prompt = "Moby"
  want, _ = reference(files, "delta", tok(prompt)["input_ids"], 12)
  before = stats(server)["compiled_programs"]
  r = httpx.post(server + "/v1/load_lora_adapter",
                 json={"lora_name": "delta", "lora_path": str(d / "delta")}, timeout=WAIT)
  assert r.status_code == 200, r.text
  assert "delta" in [m.id for m in client.models.list().data]
  r = client.completions.create(model="delta", prompt=prompt, max_tokens=12, temperature=0)
  assert r.choices[0].text == want
  # loading the same name again, a missing directory, a full pool: 400, 404, 400
  again = httpx.post(server + "/v1/load_lora_adapter",
                     json={"lora_name": "delta", "lora_path": str(d / "delta")}, timeout=WAIT)
  assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
  missing = httpx.post(server + "/v1/load_lora_adapter",
                       json={"lora_name": "x", "lora_path": str(d / "nope")}, timeout=WAIT)
  assert missing.status_code == 404 and "no such adapter directory" in \
      missing.json()["error"]["message"]
  full = httpx.post(server + "/v1/load_lora_adapter",
                    json={"lora_name": "x", "lora_path": str(d / "alpha")}, timeout=WAIT)
  assert full.status_code == 400 and "the pool is full" in full.json()["error"]["message"]
  r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "beta"}, timeout=WAIT)
  assert r.status_code == 200, r.text
  assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "gamma", "delta"]
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="beta", prompt=prompt, max_tokens=2)
  r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "beta"}, timeout=WAIT)
  assert r.status_code == 404
  wide = httpx.post(server + "/v1/load_lora_adapter",
                    json={"lora_name": "wide", "lora_path": str(d / "wide")}, timeout=WAIT)
  assert wide.status_code == 400 and "above the pool's maximum rank 4" in \
      wide.json()["error"]["message"]
  # unloading an adapter that is generating: it is gone for new requests at once; the running
  # request finishes as it would have (its first REF_NEW tokens: the reference), then the slot
  # is emptied
  ids = tok(prompt)["input_ids"]
  want_g, _ = reference(files, "gamma", ids, REF_NEW, stop=False)
  with httpx.stream("POST", server + "/v1/completions", timeout=WAIT,
                    json={"model": "gamma", "prompt": prompt, "max_tokens": MAX_LEN - len(ids),
                          "temperature": 0, "stream": True, "ignore_eos": True}) as s:
    lines = s.iter_lines()
    first = next(lines)
    r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "gamma"},
                   timeout=WAIT)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
      client.completions.create(model="gamma", prompt=prompt, max_tokens=2)
    events = [e for e in (first, *lines) if e]
  assert events[-1] == "data: [DONE]"
  chunks = [json.loads(e[6:])["choices"][0] for e in events if e.startswith("data: {")]
  assert "".join(c["text"] for c in chunks).startswith(want_g)
  assert chunks[-1]["finish_reason"] == "length"
  assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "delta"]
  # the other adapters still give what they gave; nothing was compiled for the swaps
  want_a, _ = reference(files, "alpha", tok(prompt)["input_ids"], 12)
  r = client.completions.create(model="alpha", prompt=prompt, max_tokens=12, temperature=0)
  assert r.choices[0].text == want_a
  assert stats(server)["compiled_programs"] == before


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(files, server, client):
  def post(body, raw=None):
    return httpx.post(server + "/v1/completions", timeout=WAIT,
                      content=raw if raw is not None else json.dumps(body),
                      headers={"content-type": "application/json"})
  ok = {"model": "alpha", "prompt": "x", "max_tokens": 2}
  cases = [
      (dict(ok, model="nobody"), None, 404, "model_not_found"),
      (None, b'{"model": "alpha", "prompt": ', 400, "invalid_json"),
      (None, b"[1, 2]", 400, None),
      (dict(ok, temperature=5), None, 400, "invalid_value"),
      (dict(ok, temperature="hot"), None, 400, "invalid_type"),
      (dict(ok, top_p=0), None, 400, "invalid_value"),
      (dict(ok, max_tokens=0), None, 400, "invalid_value"),
      (dict(ok, prompt="y" * MAX_LEN), None, 400, "context_length_exceeded"),
      (dict(ok, max_tokens=MAX_LEN), None, 400, "context_length_exceeded"),
      (dict(ok, prompt=[5, 500]), None, 400, "invalid_value"),
      (dict(ok, n=2), None, 400, "unsupported_parameter"),
      ({"prompt": "x"}, None, 400, "missing_required_parameter"),
  ]
  for body, raw, status, code in cases:
    r = post(body, raw)
    assert r.status_code == status, (body, raw, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code, (body, err)
  chat = httpx.post(server + "/v1/chat/completions", timeout=WAIT,
                    json={"model": "alpha", "messages": "hi"})
  assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
  assert httpx.get(server + "/v1/nothing", timeout=WAIT).status_code == 404
  with pytest.raises(openai.BadRequestError, match="maximum context length"):
    client.chat.completions.create(model="alpha", messages=[{"role": "user",
                                                             "content": "z" * MAX_LEN}])
  # a client that goes away mid-stream frees its slot
  cancelled = stats(server)["cancelled"]
  with httpx.stream("POST", server + "/v1/completions", timeout=WAIT,
                    json=dict(ok, max_tokens=MAX_LEN - 2, stream=True, ignore_eos=True)) as r:
    assert r.status_code == 200
    next(r.iter_lines())
  deadline = time.monotonic() + WAIT
  while stats(server)["active"] and time.monotonic() < deadline:
    time.sleep(0.05)
  assert stats(server)["active"] == 0 and stats(server)["cancelled"] == cancelled + 1
  # still serving
  tok = files[2]
  want, _ = reference(files, "alpha", tok("x")["input_ids"], 2)
  r = client.completions.create(model="alpha", prompt="x", max_tokens=2, temperature=0)
  assert r.choices[0].text == want
  assert httpx.get(server + "/health", timeout=WAIT).status_code == 200


def test_base_model_only_in_process(files):
  """The app without adapters (no pool), in process with Starlette's test client: the base
  model's greedy completion equals generate(); loading an adapter is refused, clearly."""
  from starlette.testclient import TestClient
  from peftjax import serve
  d, model, tok, trees = files
  engine = serve.Engine(model, trees["tiny"], tok, base_name="tiny", slots=2, max_len=MAX_LEN)
  try:
    with TestClient(serve.build_app(engine)) as c:
      assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
      want, _ = reference(files, "tiny", tok("Call me")["input_ids"], 12)
      r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Call me",
                                          "max_tokens": 12, "temperature": 0})
      assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
      r = c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(d / "alpha")})
      assert r.status_code == 400 and "started without adapters" in r.json()["error"]["message"]
      r = c.post("/v1/unload_lora_adapter", json={"lora_name": "tiny"})
      assert r.status_code == 400 and "is the base model" in r.json()["error"]["message"]
  finally:
    engine.stop()
  assert not engine.thread.is_alive()


def test_serve_loads_the_base_in_the_layout_the_adapters_were_saved_on(files, tmp_path, capsys):
  """`peftjax train` trains language models on stacked layers (scan_layers): serving such a run
  loads the base stacked too. Before, the base was always per layer and the adapter of every
  LM training run was refused as "saved for a different base model"."""
  from peftjax import cli
  from peftjax.io.checkpoint import save_adapter
  from peftjax.io.hf import from_pretrained
  d = files[0]
  _, stacked, _ = from_pretrained(d / "tiny", scan_layers=True)
  save_adapter(tmp_path / "stacked", peftjax.lora.apply(stacked, rank=2, key=jax.random.key(0)))
  assert cli._served_layout({"s": tmp_path / "stacked"}) is True
  assert cli._served_layout({"d": d / "delta", "a": d / "alpha"}) is False   # HF PEFT: either
  assert cli._served_layout({"a": d / "alpha"}) is False
  tree = cli._read_onto(stacked, tmp_path / "stacked")
  assert tree["layers"]["self_attn"]["q_proj"]["kernel"].a.shape[0] == CFG.num_layers
  with pytest.raises(cli._UsageError, match="--adapter s was saved on stacked layers .* and d "
                                            "per layer; serve adapters of one layout"):
    cli._served_layout({"s": tmp_path / "stacked", "d": d / "delta"})
  # loaded at run time onto a server of the other layout: said so, not "another base model"
  import types
  from peftjax import serve
  engine = types.SimpleNamespace(has_pool=True, model=files[1], params=None)
  with pytest.raises(ValueError, match="saved on stacked layers and this server's base has "
                                       "per-layer weights; restart the server"):
    serve.Engine.read_adapter(engine, tmp_path / "stacked")
