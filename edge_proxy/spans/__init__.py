"""Span protection: find sensitive spans, keep them at the edge, restore them in the reply."""
