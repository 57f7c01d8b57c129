"""Local training in a pool: one client's SGD (``local``), groups of clients at once
(``batched``), and the trainers that pick between them (``trainers``)."""
