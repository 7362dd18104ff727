"""Benchmarks: `bench/run.py` compares the gateway with Squid and a direct path on loopback (docs/benchmarks.md)."""
