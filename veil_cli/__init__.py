"""The `veil` command: the composition root above every package."""
