"""The queue plumbing: enqueue and coalescing (``queue``, ``markers``: the Lua transitions), the
per-project lease with its heartbeat and reconciler (``lease``), the status store (``state``) and
the RQ worker (``worker``). What a job does is in ``ml_backend.pipeline``."""
