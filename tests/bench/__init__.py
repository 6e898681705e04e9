"""chronorec benchmark suite: `python -m tests.bench.run_all [--quick]` runs every benchmark (see README, Benchmarks)."""
