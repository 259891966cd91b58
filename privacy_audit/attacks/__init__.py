"""One module per attack; each takes what the operator knows plus one setting's traces and returns token ids."""
