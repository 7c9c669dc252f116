"""Benchmarks of metald against the raw VMM (issue 8). Not tests: nothing here asserts speed.

Each module is a CLI (`python -m bench.<name> --help`) that prints a table and writes JSON to
bench/results/; `python -m bench` runs them all with their small defaults.
"""
