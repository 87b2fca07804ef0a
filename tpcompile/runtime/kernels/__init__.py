"""Faster decode steps on the loaded program: CPU kernels and graph rewrites that only change speed.

Modules: :mod:`.streaming_linear` (a matrix-vector kernel), :mod:`.prefix_attention` (attention over the
written part of the KV cache), :mod:`.weight_layout` (column-major wide weights) and :mod:`.compiled`
(the decode step compiled by TorchInductor).  Invariant: results equal the plain program's up to
floating-point summation order; whatever a kernel does not handle goes to the stock torch op.
"""
