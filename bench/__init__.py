"""Benchmark harness of cupy-lean: decode-attention sweeps of the three
schedules of :func:`cupy_lean.attention` ("lean", "split", "head"; "invariant": batch_invariant=True) against
PyTorch SDPA (flash, cuDNN) and FlashInfer's paged decode, under CUDA graphs
with cold L2.

Modules:

* :mod:`bench.cases`  case definitions (pure NumPy) and GPU input builders;
* :mod:`bench.timing` HBM read ceiling, CUDA-graph and eager timing;
* :mod:`bench.peers`  PyTorch / FlashInfer adapters (imported only here);
* :mod:`bench.report` table, CSV, JSON, plots and targets (no GPU needed);
* :mod:`bench.run`    ``python -m bench.run`` / ``main(argv)``.

Nothing here is imported by the ``cupy_lean`` package itself.
"""
