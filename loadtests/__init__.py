"""Benchmark scripts (not collected by pytest): ``python -m loadtests.run`` writes
docs/benchmarks.md and docs/benchmarks.png."""
