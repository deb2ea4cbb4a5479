"""The method contract: one :class:`Method` record per method module, one registry.

A PEFT method is declared once, where it lives, as a small record of pure functions and
capabilities (optax's ``GradientTransformation`` is the model): ``peftjax.lora.METHOD``,
``peftjax.prefix.METHOD``, ... Everything that runs methods generically (the command line,
:func:`peftjax.compose`, merge/export/generate, the trainer) reads the record and never branches on
a method's name. Adding a method is writing one module that defines ``apply`` and ``METHOD``, and
naming the module in :data:`METHOD_MODULES` (or calling :func:`register`).

>>> import peftjax
>>> m = peftjax.methods.get("lora")
>>> m.name, m.mergeable, m.hf_peft_type, m.step_hook is peftjax.set_rng
('lora', True, 'LORA', True)
>>> peftjax.methods.get("diffpruning").name     # earlier spellings still resolve
'diff_pruning'
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, NamedTuple, Optional

__all__ = ["Method", "Option", "Refine", "get", "names", "all_methods", "register",
           "METHOD_MODULES", "positive_int", "nonneg_int", "positive_float", "nonneg_float", "fraction", "rate"]

#: Modules (``peftjax.<name>``) that define a ``METHOD``, in the order ``peftjax methods`` lists.
METHOD_MODULES = ("lora", "qlora", "dora", "vera", "loha", "lokr", "oft", "adapters", "ia3",
                  "prompt", "prefix", "ptuning", "bitfit", "partial", "diff_pruning", "full")


# ------------------------------------------------------------------------------------------------
# option values
# ------------------------------------------------------------------------------------------------

def _number(kind: str, lo: float, lo_ok: bool, hi: Optional[float] = None) -> Callable:
  """A converter ``str | number -> int | float`` checking ``>= lo`` (``> lo`` unless ``lo_ok``)
  and ``< hi``; a ValueError names what was expected and what came."""
  conv = int if kind == "int" else float
  if hi is not None:
    what = f"a number in {'[' if lo_ok else '('}{lo:g}, {hi:g})"
  else:
    what = {("int", False): "a positive integer", ("int", True): "an integer >= 0",
            ("float", False): "a positive number", ("float", True): "a number >= 0"}[(kind, lo_ok)]

  def parse(text):
    if isinstance(text, bool):
      raise ValueError(f"expected {what}, got {text!r}")
    try:
      v = conv(text)
      if kind == "int" and not isinstance(text, str) and v != text:
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(v) or v < lo or (v == lo and not lo_ok) or (hi is not None and v >= hi):
      raise ValueError(f"expected {what}, got {text!r}")
    return v
  parse.what = what
  return parse


positive_int, nonneg_int = _number("int", 0, False), _number("int", 0, True)
positive_float, nonneg_float = _number("float", 0, False), _number("float", 0, True)
#: a number in (0, 1), e.g. a density.
fraction = _number("float", 0, False, 1.0)
#: a number in [0, 1), e.g. a dropout rate.
rate = _number("float", 0, True, 1.0)


class Option(NamedTuple):
  """One hyperparameter of a method, as the command line and run records name it.

  Attributes:
    name: the option's name (``"rank"``; the flag is ``--rank``, the run record's key ``rank``).
      Options of different methods with one name are one flag.
    default: its value when not given (``None``: the method's own default).
    help: one line.
    kwarg: the ``apply`` keyword it feeds (default: ``name``).
    type: converter from text (e.g. :data:`positive_int`), or None for a string.
    choices: allowed values, or None.
    flag: a switch without a value (``--no-projection``), True when given.
    convert: value -> ``apply`` keyword value (e.g. ``lambda v: not v``), or None.
    to_apply: False for options that are not ``apply`` keywords (a penalty's weight).
  """
  name: str
  default: Any
  help: str
  kwarg: Optional[str] = None
  type: Optional[Callable] = None
  choices: Optional[tuple] = None
  flag: bool = False
  convert: Optional[Callable] = None
  to_apply: bool = True


class Refine(NamedTuple):
  """A method's second training stage: after ``1 - fraction(options)`` of the steps,
  ``transform(tree, options) -> tree``, then the rest of the steps on its result without the
  penalty, at ``learning_rate(options)`` (None: the run's rate). DiffPruning: project onto the
  kept support, then tune the kept values, as Guo et al. do."""
  transform: Callable
  fraction: Callable
  learning_rate: Optional[Callable] = None


class Method(NamedTuple):
  """A PEFT method: its transform, what else it needs to train and run, what it can do.

  Attributes:
    name: the canonical name (the module's: ``"lora"``, ``"diff_pruning"``).
    apply: ``apply(params, **kwargs) -> tree``: the pure transform.
    description: one line for ``peftjax methods``.
    options: the :class:`Option`\\ s the command line exposes.
    forward: ``forward(model) -> f(tree, *args, **kwargs)`` when the method changes the forward
      pass (soft prompts, prefixes: :func:`peftjax.forward`); None: the model's own, lifted.
    step_hook: ``(tree, key) -> tree`` before every training step (per-step keys:
      :func:`peftjax.set_rng`), or None.
    penalty: ``(tree, options) -> scalar`` added to the training loss (``options``: the
      option values by name), or None.
    finalize: ``tree -> tree`` after training (drop a training-time reparameterization), or None.
    report: ``(tree, options) -> str``, a line printed after training, or None.
    refine: a second training stage (:class:`Refine`), or None.
    lr_scales: ``(options, learning_rate) -> {"type_id.field": factor}``, learning-rate
      multipliers of node fields (``peftjax.optimizer``'s ``field_lr_scales``), or None.
    mergeable: whether the trained tree folds into plain weights (``peftjax.merge`` then a
      merged model directory).
    hf_peft_type: the Hugging Face PEFT ``peft_type`` it exports as, or None.
    learning_rate: default learning rate, or ``options -> rate`` when it depends on the options
      (see :meth:`default_learning_rate`).
    model_kwargs: ``model -> dict`` of ``apply`` keywords read off the model (prefix tuning
      needs its config), or None.
    aliases: earlier names that still resolve (old run records, scripts).
    load: keywords for :func:`peftjax.io.from_pretrained` when a model is loaded to be tuned
      with this method (QLoRA: ``quantize=`` and a 16-bit ``dtype``, so the full-precision model
      never exists), ``options -> keywords`` when they depend on the options (see
      :meth:`load_kwargs`), or None. The command line passes them without knowing what they mean.
  """
  name: str
  apply: Callable
  description: str
  options: tuple = ()
  forward: Optional[Callable] = None
  step_hook: Optional[Callable] = None
  penalty: Optional[Callable] = None
  finalize: Optional[Callable] = None
  report: Optional[Callable] = None
  refine: Optional[Refine] = None
  lr_scales: Optional[Callable] = None
  mergeable: bool = True
  hf_peft_type: Optional[str] = None
  learning_rate: Any = 1e-3
  model_kwargs: Optional[Callable] = None
  aliases: tuple = ()
  load: Optional[dict | Callable] = None

  def option_values(self, given: Optional[dict] = None) -> dict:
    """``{name: value}`` for every option: ``given``'s (checked) or the default.

    Raises:
      ValueError: a name that is not an option of this method, or a bad value (named).
    """
    given = dict(given or {})
    known = {o.name: o for o in self.options}
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f"{self.name} has no option {unknown[0]!r} (its options: "
                       f"{', '.join(known) or 'none'})")
    out = {}
    for o in self.options:
      v = given.get(o.name)
      if v is None:
        v = o.default
      elif o.type is not None and not o.flag:
        try:
          v = o.type(v)
        except ValueError as e:
          raise ValueError(f"{self.name} option {o.name}: {e}") from None
      if v is not None and o.choices is not None and v not in o.choices:
        raise ValueError(f"{self.name} option {o.name}: expected one of {list(o.choices)}, "
                         f"got {v!r}")
      out[o.name] = v
    return out

  def build(self, params, options: Optional[dict] = None, *, model=None, key=None):
    """``apply(params, ...)`` from option values (see :meth:`option_values`), the model's
    keywords (:attr:`model_kwargs`) and ``key`` (passed when ``apply`` takes one)."""
    values = self.option_values(options)
    kwargs = {}
    for o in self.options:
      if not o.to_apply:
        continue
      v = values[o.name]
      if o.convert is not None:
        v = o.convert(v)
      if v is not None or o.convert is not None:
        kwargs[o.kwarg or o.name] = v
    if self.model_kwargs is not None:
      if model is None:
        raise TypeError(f"{self.name} needs the model (pass model=)")
      kwargs.update(self.model_kwargs(model))
    if key is not None and "key" in inspect.signature(self.apply).parameters:
      kwargs["key"] = key
    return self.apply(params, **kwargs)

  def bound_penalty(self, options: Optional[dict] = None) -> Optional[Callable]:
    """``tree -> scalar`` with the option values bound, or None."""
    if self.penalty is None:
      return None
    values = self.option_values(options)
    return lambda tree: self.penalty(tree, values)

  def default_learning_rate(self, options: Optional[dict] = None) -> float:
    """The default learning rate for these option values."""
    lr = self.learning_rate
    return float(lr(self.option_values(options)) if callable(lr) else lr)

  def load_kwargs(self, options: Optional[dict] = None) -> dict:
    """The :attr:`load` keywords for these option values (a new dict)."""
    load = self.load(self.option_values(options)) if callable(self.load) else self.load
    return dict(load or {})

  def refine_steps(self, steps: int, options: Optional[dict] = None) -> int:
    """How many of ``steps`` train after :attr:`refine`'s transform (0 without a refine stage).

    At least one step trains on each side of the transform when ``steps >= 2``.
    """
    if self.refine is None or steps < 2:
      return 0
    frac = float(self.refine.fraction(self.option_values(options)))
    if frac <= 0:
      return 0
    return min(max(1, round(frac * steps)), steps - 1)


#: Options several methods share (one flag each on the command line).
TARGETS = Option("targets", None, "regex over parameter paths (default: the method's)")
N_TOKENS = Option("n_tokens", 20, "soft tokens / prefix length", type=positive_int)


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------

_REGISTERED: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
  """Adds a method (e.g. one defined outside peftjax) to the registry; returns it.

  Raises:
    TypeError: not a :class:`Method`.
    ValueError: its name or an alias is already taken by another method.
  """
  if not isinstance(method, Method):
    raise TypeError(f"register expects a peftjax Method record, got {type(method).__name__}")
  for n in (method.name, *method.aliases):
    old = _lookup_table().get(n)
    if old is not None and old.apply is not method.apply:
      raise ValueError(f"method name {n!r} is already taken by {old.name}")
  _REGISTERED[method.name] = method
  return method


def _load():
  global _LOADED
  if not _LOADED:
    for mod in METHOD_MODULES:
      m = importlib.import_module(f"peftjax.{mod}").METHOD
      _REGISTERED.setdefault(m.name, m)
    _LOADED = True


def _lookup_table() -> dict[str, Method]:
  _load()
  table = {}
  for m in _REGISTERED.values():
    for n in (m.name, *m.aliases):
      table[n] = m
  return table


def all_methods() -> dict[str, Method]:
  """``{name: Method}`` of every registered method, in listing order."""
  _load()
  return dict(_REGISTERED)


def names(*, aliases: bool = False) -> list[str]:
  """The canonical method names (and their aliases with ``aliases=True``)."""
  return list(_lookup_table()) if aliases else list(all_methods())


def get(name) -> Method:
  """The :class:`Method` called ``name`` (canonical or alias); a Method passes through.

  Raises:
    ValueError: an unknown name (the known ones listed).
  """
  if isinstance(name, Method):
    return name
  m = _lookup_table().get(name) if isinstance(name, str) else None
  if m is None:
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}")
  return m
