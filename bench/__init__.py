"""Benchmarks and machine checks, outside the installed package: ``python bench/<script>.py``."""
