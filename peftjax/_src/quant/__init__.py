"""Quantization machinery: formats, packing, double quantization, the dequantizing matmul, kernels.

* :mod:`formats`: codebooks (NF4, FP4, the 8-bit dynamic map) and argument checks;
* :mod:`core`: ``QuantizedWeight``, blockwise quantization and dequantization;
* :mod:`matmul`: the ``custom_vjp`` dequantizing matmul (XLA or Pallas);
* :mod:`pallas_kernel`: the fused unpack-dequantize-matmul Pallas kernels.

The public API is :mod:`peftjax.quant` and :mod:`peftjax.qlora`.
"""
