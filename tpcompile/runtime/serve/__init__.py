"""``tprun serve``: an OpenAI-compatible HTTP server over the ranks of a causal-LM artifact.

One front process (``server.py``) serves HTTP (``app.py`` routes, ``schemas.py`` requests and errors,
``service.py`` one request's life: prompt, stop strings, text) and launches the ranks; it talks to rank 0
over a Unix socket (``link.py`` its end, ``protocol.py`` the messages). Every rank runs ``ranks.py``: rank 0
forwards what the front asked to all ranks, and all of them run the same continuous-batching scheduler
(``tpcompile.runtime.lm.scheduler``). The import of this package is free of torch and of the web stack.
"""
