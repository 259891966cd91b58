"""The core server: runs cloaked decoder blocks on rotated hidden states. Imports nothing edge-side."""
