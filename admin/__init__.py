"""The admin and policy plane: API keys, scopes, JWT, rate limits, guardrails, policy store, audit.

It runs at the edge and knows nothing of tensors; the core never learns who is calling.
"""
