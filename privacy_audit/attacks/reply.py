"""Attack E: read the reply back, with the public final norm and LM head on the de-rotated returned states.

The edge samples from exactly these states, so under greedy decoding the operator's argmax is
the edge's token whenever Q̂ is right; noise on the inputs does not touch this channel.
"""

from __future__ import annotations

import torch

from privacy_audit.attacks.nearest import derotate
from privacy_audit.knowledge import Knowledge
from privacy_audit.trace import Observed


def read_back(op: Knowledge, observed: list[Observed]) -> list[list[int]]:
    """Each request's reply tokens, one per returned state."""
    rows = torch.cat([o.returned for o in observed])
    ids = op.public.logits(derotate(op, rows)).argmax(-1)
    return [chunk.tolist() for chunk in ids.split([o.returned.shape[0] for o in observed])]


def recover(op: Knowledge, observed: Observed) -> list[int]:
    return read_back(op, [observed])[0]
