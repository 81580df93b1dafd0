"""Benchmarks (``python -m bench.<name>``): speed, scale and accuracy studies, not part of the tests.

Each writes a Markdown table under ``bench/results/`` with the machine description and the command.
"""
