"""Hardware profiles: the numbers the cost model predicts with, as TOML files.

``tprun calibrate`` (the runtime) measures this host and writes a profile; ``tpcompile plan`` and
``tpcompile explain --profile`` (the compiler's cost model, ``tpcompile/cost/``) read profiles, the shipped
ones and measured ones alike. Both sides use this module, which is why it lives in the artifact contract.

A profile file::

    name = "h100-nvlink"
    description = "8x H100 SXM 80 GB, NVLink 4 (NVSwitch)"
    predicted = true                  # numbers from data sheets, not measured here
    [device]
    memory_gib = 80                   # per rank (one device per rank)
    memory_bandwidth_gbs = 3350       # per rank; or a table by ranks sharing one host: {"1" = 11, "2" = 9}
    peak_tflops = 989                 # per rank, dense, in the profile's dtype; or a table like the above
    op_overhead_us = 2.0              # host time per op of a step (launch / dispatch)
    max_ranks_per_node = 8
    [link]                            # between ranks of one host
    latency_us = 8.0                  # one collective's fixed cost
    bandwidth_gbs = 450               # bus bandwidth
    [network]                         # optional: `nodes` hosts; ranks fill one host before the next
    nodes = 2
    latency_us = 30.0
    bandwidth_gbs = 3.125

Invariant: standard library only; every problem with a file is a :class:`ProfileError` whose message is one
line naming the file and the key.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

__all__ = [
    "PROFILES_ENV",
    "HardwareProfile",
    "Link",
    "ProfileError",
    "parse_profile",
    "profile_to_toml",
    "read_profile",
    "user_profile_dir",
]

GB = 1e9
#: Where ``tprun calibrate`` writes measured profiles and ``--profile NAME`` looks for ``NAME.toml`` first.
PROFILES_ENV = "TPCOMPILE_PROFILES"


def user_profile_dir() -> Path:
    """``$TPCOMPILE_PROFILES``, else ``$XDG_CACHE_HOME/tpcompile/profiles`` (``~/.cache/...``)."""
    if os.environ.get(PROFILES_ENV):
        return Path(os.environ[PROFILES_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tpcompile" / "profiles"


class ProfileError(ValueError):
    """A hardware profile file is missing, not TOML, or lacks / mistypes a key (one-line message)."""


@dataclass(frozen=True)
class Link:
    """A collective's cost on this link: ``latency_s + factor * bytes / bandwidth_bytes_s``."""

    latency_s: float
    bandwidth_bytes_s: float


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    predicted: bool  # True: data-sheet numbers; False: measured on the host by `tprun calibrate`
    memory_bytes: float  # per rank
    #: per-rank memory bandwidth (bytes/s) by the number of ranks sharing one host (key 1 at least)
    memory_bandwidth: dict[int, float]
    #: per-rank peak FLOP/s by the number of ranks sharing one host (a host's cores are shared)
    peak_flops: dict[int, float]
    op_overhead_s: float  # host time per op of a step
    max_ranks_per_node: int
    link: Link  # between ranks on one host
    nodes: int = 1  # hosts available; ranks fill one (max_ranks_per_node) before using the next
    network: Link | None = None  # between hosts
    source: str = field(default="", compare=False)  # the file it was read from

    def bandwidth_per_rank(self, ranks_on_node: int) -> float:
        """Per-rank memory bandwidth (bytes/s) when ``ranks_on_node`` ranks share a host."""
        return _per_rank(self.memory_bandwidth, ranks_on_node)

    def flops_per_rank(self, ranks_on_node: int) -> float:
        """Per-rank peak FLOP/s when ``ranks_on_node`` ranks share a host."""
        return _per_rank(self.peak_flops, ranks_on_node)

    def nodes_used(self, tp: int) -> int:
        """Hosts that ``tp`` ranks occupy: one host is filled (``max_ranks_per_node``) before the next."""
        return max(1, min(self.nodes, math.ceil(tp / self.max_ranks_per_node)))

    def ranks_on_node(self, tp: int) -> int:
        """Ranks sharing a host: spread evenly over the hosts used."""
        return math.ceil(tp / self.nodes_used(tp))

    def collective_link(self, tp: int) -> Link:
        """The link a collective of ``tp`` ranks is bound by: the network once ranks span hosts."""
        if self.nodes_used(tp) > 1 and self.network is not None:
            return self.network
        return self.link


def _per_rank(table: dict[int, float], ranks_on_node: int) -> float:
    """The value for ``ranks_on_node``; else the one for the largest count below it, its total shared
    evenly by the ranks (a table with only key 1 means one device per rank: the value itself)."""
    if ranks_on_node in table:
        return table[ranks_on_node]
    below = max(k for k in table if k < ranks_on_node)
    if len(table) == 1:
        return table[below]
    return table[below] * below / ranks_on_node


def _need(table: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in table:
        raise ProfileError(f"{where}: missing key {key!r}")
    value = table[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ProfileError(f"{where}: {key!r} must be {_kind_name(kind)} (got {value!r})")
    return value


_KIND_NAMES = {int: "a number", float: "a number", str: "a string", bool: "true or false", dict: "a table"}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return _KIND_NAMES[kind[0] if isinstance(kind, tuple) else kind]


def _positive(table: dict[str, Any], key: str, where: str, allow_zero: bool = False) -> float:
    value = float(_need(table, key, where, (int, float)))
    if value < 0 or (value == 0 and not allow_zero):
        raise ProfileError(f"{where}: {key!r} must be {'>= 0' if allow_zero else '> 0'} (got {value:g})")
    return value


def _link(table: dict[str, Any], where: str) -> Link:
    return Link(
        _positive(table, "latency_us", where, allow_zero=True) / 1e6,
        _positive(table, "bandwidth_gbs", where) * GB,
    )


def _rank_table(device: dict[str, Any], key: str, where: str, unit: float) -> dict[int, float]:
    """A number, or a table by ranks per host (``{"1" = 11.0, "2" = 8.5}``), times ``unit``."""
    raw = device.get(key)
    if isinstance(raw, dict):
        out: dict[int, float] = {}
        for count in raw:
            if not count.isdigit() or int(count) < 1:
                raise ProfileError(f"{where}: {key} keys are rank counts >= 1 (got {count!r})")
            out[int(count)] = _positive(raw, count, f"{where} {key}") * unit
        if 1 not in out:
            raise ProfileError(f'{where}: {key} needs the value for 1 rank (key "1")')
        return out
    return {1: _positive(device, key, where) * unit}


def parse_profile(text: str, source: str) -> HardwareProfile:
    """The profile in TOML ``text``; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"hardware profile {source} is not valid TOML: {err}") from None
    where = f"hardware profile {source}"
    device = _need(data, "device", where, dict)
    link = _need(data, "link", where, dict)
    dwhere = f"{where} [device]"
    network, nodes = None, 1
    if "network" in data:
        net = _need(data, "network", where, dict)
        nodes = int(_need(net, "nodes", f"{where} [network]", int))
        if nodes < 1:
            raise ProfileError(f"{where} [network]: 'nodes' must be >= 1 (got {nodes})")
        network = _link(net, f"{where} [network]")
    max_ranks = int(_need(device, "max_ranks_per_node", dwhere, int))
    if max_ranks < 1:
        raise ProfileError(f"{dwhere}: 'max_ranks_per_node' must be >= 1 (got {max_ranks})")
    return HardwareProfile(
        name=str(_need(data, "name", where, str)),
        description=str(data.get("description", "")),
        predicted=bool(_need(data, "predicted", where, bool)),
        memory_bytes=_positive(device, "memory_gib", dwhere) * 2**30,
        memory_bandwidth=_rank_table(device, "memory_bandwidth_gbs", dwhere, GB),
        peak_flops=_rank_table(device, "peak_tflops", dwhere, 1e12),
        op_overhead_s=_positive(device, "op_overhead_us", dwhere, allow_zero=True) / 1e6,
        max_ranks_per_node=max_ranks,
        link=_link(link, f"{where} [link]"),
        nodes=nodes,
        network=network,
        source=source,
    )


def read_profile(path: Path) -> HardwareProfile:
    try:
        text = path.read_text()
    except OSError as err:
        raise ProfileError(f"cannot read hardware profile {path}: {err.strerror or err}") from None
    return parse_profile(text, str(path))


def profile_to_toml(p: HardwareProfile, comments: list[str] | None = None) -> str:
    """``p`` as a profile file (what ``tprun calibrate`` writes); ``comments`` go on top."""
    lines = [f"# {c}" for c in comments or []]
    lines += [
        f"name = {_str(p.name)}",
        f"description = {_str(p.description)}",
        f"predicted = {'true' if p.predicted else 'false'}",
        "",
        "[device]",
        f"memory_gib = {p.memory_bytes / 2**30:.3f}",
        f"op_overhead_us = {p.op_overhead_s * 1e6:.3f}",
        f"max_ranks_per_node = {p.max_ranks_per_node}",
        "[device.memory_bandwidth_gbs]",
        *(f'"{k}" = {v / GB:.3f}' for k, v in sorted(p.memory_bandwidth.items())),
        "[device.peak_tflops]",
        *(f'"{k}" = {v / 1e12:.5f}' for k, v in sorted(p.peak_flops.items())),
        "",
        "[link]",
        f"latency_us = {p.link.latency_s * 1e6:.3f}",
        f"bandwidth_gbs = {p.link.bandwidth_bytes_s / GB:.4f}",
    ]
    if p.network is not None:
        lines += [
            "",
            "[network]",
            f"nodes = {p.nodes}",
            f"latency_us = {p.network.latency_s * 1e6:.3f}",
            f"bandwidth_gbs = {p.network.bandwidth_bytes_s / GB:.4f}",
        ]
    return "\n".join(lines) + "\n"


def _str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
