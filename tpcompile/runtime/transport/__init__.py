"""Moving tensors between the ranks of a job: process-group setup and the runtime's own collectives.

Modules: :mod:`.distributed` (``env://`` rendezvous, backend and device choice), :mod:`.collectives`
(gathering sharded outputs, broadcasting tokens and prompts) and :mod:`.shm` (the same-host
shared-memory transport the programs' collectives are rebound to).  Invariant: every collective here is
called by all ranks in the same order and gives all of them the same result.
"""
