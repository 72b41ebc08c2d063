"""Benchmark scripts; ``harness`` holds what they share."""
