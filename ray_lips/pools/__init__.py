"""Client pools: the pool that hosts a share of the clients (``client_pool``), the group of
pools a run drives in this process (``in_process``) or as Ray actors (``ray_actors``), their
typed requests (``messages``), per-client state (``client_store``), the shared dataset rows
(``payload``) and the process's memory (``allocator``, ``memory``)."""
