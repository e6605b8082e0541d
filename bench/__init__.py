"""Benchmarks: each module measures one thing side by side and writes bench/results/NAME.json."""
