"""Numba and torch kernels of top-k SAEs, each with a CPU path and the torch path GPUs take.

`saelab.ops.topk`: the exact per-row top-k (`topk_rows`); `saelab.ops.kernels`: top-k entries in COO form and
the sparse encode/decode autograd function (`sparse_autoencode`, `sparse_decode`).
"""
