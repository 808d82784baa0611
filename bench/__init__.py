"""Benchmarks (see bench/run); not part of the installed package."""
