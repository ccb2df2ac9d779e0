"""Metric implementations of the paper's evaluations, each testable on hand-computed cases."""
