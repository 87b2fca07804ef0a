"""Loading one rank of an artifact: check its files, open its program, attach its weights.

Modules: :mod:`.program` (the loaded :class:`RankProgram`), :mod:`.loader` (``load_rank``),
:mod:`.weights`, :mod:`.graph_reader` (a program archive read straight into the graph a rank runs;
:mod:`.exported_load`, torch's loader sped up, for the archives it leaves to torch),
:mod:`.program_archive` (what loading a program archive would execute, and ``check_artifact``: the
launcher's checks of the files, without torch), :mod:`.graph_rewrite` (run-time rewrites of the program's
graphs) and :mod:`.tensor_io` (the named tensors a program consumes and produces).  Invariant: one job,
one rank, no process group needed.
"""
