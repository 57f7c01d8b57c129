"""Ray at the edges: joining or starting a cluster (``connect``), the driver actors with their
restarts and queueing (``driver``), sweep specs (``sweep_spec``), the Ray Tune trial
(``tune_trial``), a sweep's stop (``sweep_stop``) and where a submitted job's results go
(``jobpaths``)."""
