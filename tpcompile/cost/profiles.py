"""Hardware profiles by name: measured ones (``tprun calibrate`` writes ``host``) in the user's profile
directory first, then the ones shipped in ``tpcompile/cost/profiles/``, or a ``.toml`` path.

Invariant: every failure is a ``UsageError`` with one line: an unknown name lists the known ones.
"""

from __future__ import annotations

from pathlib import Path

from tpcompile.errors import UsageError
from tpcompile.runtime.format.hardware import HardwareProfile, ProfileError, read_profile, user_profile_dir

SHIPPED_DIR = Path(__file__).parent / "profiles"


def known_profiles() -> list[str]:
    names = {p.stem for p in SHIPPED_DIR.glob("*.toml")}
    if user_profile_dir().is_dir():
        names |= {p.stem for p in user_profile_dir().glob("*.toml")}
    return sorted(names)


def profile_path(name: str) -> Path:
    """The file of profile ``name`` (a name, or a path to a .toml file)."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"hardware profile file {name} does not exist")
        return path
    for folder in (user_profile_dir(), SHIPPED_DIR):
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    hint = " (run `tprun calibrate` to measure this host)" if name.startswith("host") else ""
    raise UsageError(
        f"unknown hardware profile {name!r}{hint}; known: {', '.join(known_profiles())}, or a .toml file"
    )


def load_profile(name: str) -> HardwareProfile:
    try:
        return read_profile(profile_path(name))
    except ProfileError as err:
        raise UsageError(str(err)) from None
