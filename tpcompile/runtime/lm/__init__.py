"""Causal language models on one rank: generation, token choice, tokenization and the worker's session.

Modules: :mod:`.generate` (:class:`CausalLM`), :mod:`.sampling` (the same token on every rank),
:mod:`.tokenization` (prompts in, text out), :mod:`.session` (a worker's prompts and answers),
:mod:`.options` (what a run asks for) and :mod:`.prompts` (prompt text checked before tokenizing): these
two import no torch, so ``tprun`` checks them before importing it.
Invariant: every rank runs the same forward passes and picks the same tokens, so the ranks stop together.
"""
