"""Benchmarks, run from the repository root as ``python -m bench.<name>`` (``gpu_check.py`` also as a
script): a package, so a bench imports another's helpers (``bench.train_bench``) and the tests'
(``tests.reference_stage``) without editing ``sys.path``."""
