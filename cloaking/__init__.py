"""Cloaking tools (edge trust domain): checkpoint loading, `veil cloak`, and the sealed rotation."""
