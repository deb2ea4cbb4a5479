"""The method registry: every PEFT method as a :class:`Method` record (see
:mod:`peftjax._src.method`).

>>> import peftjax
>>> peftjax.methods.names()[:4]
['lora', 'qlora', 'dora', 'vera']
"""

from peftjax._src.method import (METHOD_MODULES, Method, Option, Refine, all_methods, fraction,
                                 get, names, nonneg_float, nonneg_int, positive_float,
                                 positive_int, rate, register)

__all__ = ["Method", "Option", "Refine", "get", "names", "all_methods", "register", "METHOD_MODULES",
           "positive_int", "nonneg_int", "positive_float", "nonneg_float", "fraction", "rate"]
