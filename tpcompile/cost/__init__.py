"""Predicting what a plan costs on given hardware: ``workload`` (what one step of each rank does),
``model`` (pure formulas: time per decode step and per prefill), ``profiles`` (hardware profiles by name),
``advisor`` (``tpcompile plan``: a table over tp and profiles), ``plot`` (its figure)."""
