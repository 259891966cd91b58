"""Veil: shared pieces of the edge and the core (settings, errors, step wire format, bundles)."""

__version__ = "0.1.0"
