"""Running a whole artifact: spawning and supervising one process per rank, and what each rank runs.

Modules: :mod:`.launcher` (spawn, supervise, and turn the outcome into a result or one error),
:mod:`.args` (the description of a run, sent to each rank as JSON), :mod:`.worker` (a rank's entry
point) and :mod:`.api` (``run_artifact`` and ``generate_text``).  Invariant: a job ends with every rank
exited, and reports at most one error line.
"""
