"""Offline active-learning simulator: datasets, the oracle loop and its report.

``ml_backend.simulation.cli`` is the command line; this package holds the parts it wires together.
"""
