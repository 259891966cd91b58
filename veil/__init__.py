"""Veil's ground floor, shared by the edge and the core: errors, settings, the step wire format,
bundles, HTTP error rendering, logging, and (in veil.model) the cloaked-decoder maths.
It imports nothing else of Veil."""

__version__ = "0.1.0"
