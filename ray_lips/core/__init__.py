"""The federated run itself, whatever runs its pools: the driver loop (``run``), the run folder
(``run_folder``), exact aggregation, seeding and the inertia metrics. It never names an
algorithm: those live in :mod:`ray_lips.algorithms`."""
