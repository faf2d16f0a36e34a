"""Benchmarks: each module prints a human table and, as its last line, one JSON object.

Run one with `python -m bench NAME` (or `python -m bench.NAME`). They are never tests:
figures only, measured side by side in the same run because these machines are shared.
"""
