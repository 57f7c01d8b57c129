"""The generic federated engine: the driver loop, client pools (in-process or Ray actors),
their typed requests, local trainers, per-client state and exact aggregation. It never names
an algorithm: those live in :mod:`ray_lips.algorithms`."""
