"""Routing state: the stores (memory, Redis) and the replica's route table. The only part of
``router`` that does I/O or runs background tasks; built on ``router.policy``."""
