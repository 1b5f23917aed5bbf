"""Benchmarks: each prints a table and writes JSON; peers run in the same process."""
