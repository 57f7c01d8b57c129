"""Randomness derived from (seed, purpose, client, round), never from which process runs a client.

Every random draw in a run goes through here, so the same config gives the same numbers whether
its clients are spread over one pool or many.
"""

from __future__ import annotations

import numpy as np
import torch

# Distinct streams for each use of randomness.
PURPOSES = {"init": 0, "participants": 1, "batches": 2, "augment": 3, "scorer": 4, "finetune": 5,
            "personal_batches": 6, "personal_augment": 7}


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed that depends only on the run seed, the purpose and the integer keys."""
    entropy = [int(seed), PURPOSES[purpose], *[int(k) for k in keys]]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def torch_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU torch.Generator for the given stream."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, purpose, *keys))
    return gen


def numpy_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, *keys))
