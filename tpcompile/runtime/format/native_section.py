"""The native section of a manifest (``extra.native``): each rank's program compiled to native code.

``{"target": {"device": "cpu", "arch": "x86_64", "isa": ["avx", "avx2", ...], "torch_version": "2.13.0+cpu"},
"ranks": {"0": "native.pt2", ...}}``: rank r's package is ``rank{r}/<file>`` (listed and hashed with the
rank's other files). Invariant: a package runs only on a host whose architecture matches and whose CPU has
every ISA flag listed, under the torch version it was built against; ``NativeTarget.mismatch`` says why
a host does not qualify. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ManifestError

__all__ = ["NATIVE_FILE", "NativeSection", "NativeTarget", "host_cpu_flags", "native_section"]

NATIVE_FILE = "native.pt2"


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags of this host (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class NativeTarget:
    """What a package was built for."""

    device: str
    arch: str
    isa: tuple[str, ...]
    torch_version: str

    def mismatch(self, arch: str, flags: frozenset[str], torch_version: str) -> str | None:
        """Why a host (``arch``, CPU ``flags``, ``torch_version``) cannot run the package, or None."""
        if arch != self.arch:
            return f"it was built for {self.arch}, this host is {arch}"
        missing = [f for f in self.isa if f not in flags]
        if missing:
            return f"it needs the CPU features {', '.join(missing)}, which this CPU lacks"
        if torch_version != self.torch_version:
            return f"it was built against torch {self.torch_version}, this is torch {torch_version}"
        return None


@dataclass(frozen=True)
class NativeSection:
    target: NativeTarget
    files: Mapping[int, str]  # rank -> package file in the rank's directory

    def to_json(self) -> dict[str, Any]:
        t = self.target
        return {
            "target": {
                "device": t.device,
                "arch": t.arch,
                "isa": list(t.isa),
                "torch_version": t.torch_version,
            },
            "ranks": {str(r): f for r, f in sorted(self.files.items())},
        }


def native_section(extra: Mapping[str, Any], where: str) -> NativeSection | None:
    """``extra.native`` of a manifest, or None when the artifact has no native programs.

    Raises:
        ManifestError: the section is malformed.
    """
    data = extra.get("native")
    if data is None:
        return None
    try:
        t, ranks = data["target"], data["ranks"]
        target = NativeTarget(
            str(t["device"]), str(t["arch"]), tuple(str(f) for f in t["isa"]), str(t["torch_version"])
        )
        files = {int(r): str(f) for r, f in ranks.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{where}: malformed extra.native ({exc}); recompile the artifact") from exc
    return NativeSection(target, files)
