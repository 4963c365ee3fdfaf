"""Metrics, sizes and latency; evaluate, bench, info and their CI gates."""
