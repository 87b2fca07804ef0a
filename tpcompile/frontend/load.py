"""Which frontend reads what the user names: a Hugging Face checkpoint directory or a .gguf file (``hf``), a
``torch.export.save`` archive, a factory ``pkg.module:function``, or (only with ``--trust-pickle``) a
pickled ``(module, example_args)`` (``capture``).

Invariant: every failure to read or capture the model is a typed error with a one-line message; nothing
is unpickled without ``--trust-pickle``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from tpcompile.errors import UsageError
from tpcompile.frontend.capture import CapturedModel, capture_factory, capture_pickle, captured_program
from tpcompile.frontend.options import LanguageModelOptions
from tpcompile.runtime.errors import first_line
from tpcompile.runtime.load.exported_load import load_exported
from tpcompile.runtime.load.program_archive import unsafe_content

KNOWN_FORMATS = (
    "a Hugging Face checkpoint directory, a .gguf file, a .pt2/.pt file from torch.export.save, "
    "a pickled (module, example_args) with --trust-pickle, or a factory pkg.module:function"
)


def _is_pickle_archive(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    with path.open("rb") as f:
        return f.read(1) == b"\x80"


def load_model(
    spec: str, trust_pickle: bool = False, lm: LanguageModelOptions | None = None
) -> CapturedModel:
    """Load ``spec`` (see the module docstring); every failure is a typed error with a one-line message."""
    path = Path(spec)
    if not path.exists():
        if ":" in spec and not spec.endswith((".pt", ".pt2")) and "/" not in spec.split(":")[0]:
            return capture_factory(spec)
        raise UsageError(f"model file {spec} does not exist")
    if (path.is_dir() and (path / "config.json").is_file()) or path.suffix == ".gguf":
        from tpcompile.frontend.hf import load_hf  # noqa: PLC0415 (needs the optional transformers)

        opts = lm or LanguageModelOptions()
        return load_hf(path, opts.dtype, opts.max_seq_len, opts.max_batch_size, opts.dequantize)
    if path.is_dir():
        raise UsageError(f"{spec} is a directory; unknown model format (expected {KNOWN_FORMATS})")
    if path.suffix not in (".pt2", ".pt"):
        raise UsageError(f"unknown model format: {spec} (expected {KNOWN_FORMATS})")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_export = any(
                "serialized_exported_program" in n or n.endswith("models/model.json") for n in z.namelist()
            )
        if is_export:
            problem = None if trust_pickle else unsafe_content(path)
            if problem is not None:
                raise UsageError(
                    f"{spec} contains {problem}; unpickling runs arbitrary code, so it is loaded only "
                    "with --trust-pickle"
                )
            try:
                ep = load_exported(path)
            except Exception as err:
                raise UsageError(
                    f"{spec} is not a loadable torch.export archive: {first_line(err)}"
                ) from None
            return captured_program(ep, str(path))
    if _is_pickle_archive(path):
        if not trust_pickle:
            raise UsageError(
                f"{spec} is a pickled object; unpickling runs arbitrary code, so it is loaded only with "
                "--trust-pickle (or save the model with torch.export.save instead)"
            )
        return capture_pickle(path)
    raise UsageError(f"unknown model format: {spec} (expected {KNOWN_FORMATS})")
