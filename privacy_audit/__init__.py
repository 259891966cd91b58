"""`veil audit-privacy`: play the core operator and attack Veil's defenses with the strongest known methods."""
