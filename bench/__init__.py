"""Benchmarks (`orderflow bench ...`).  Each prints a summary and, last, one JSON line."""
