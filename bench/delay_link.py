"""A point-to-point link with a fixed one-way delay between two network namespaces, in user space: one TUN
device in each namespace, and this process forwarding every packet from one to the other after
``--delay-ms``. It stands in for a veth pair with `tc netem` on kernels without the netem qdisc.

    python bench/delay_link.py NS_A ADDR_A NS_B ADDR_B --delay-ms 2

Prints ``ready`` once both devices are up; runs until SIGTERM / SIGINT; the devices vanish with it.
Packets keep their order (a constant delay is a FIFO per direction).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def _enter(ns: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    finally:
        os.close(fd)


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ns_a")
    ap.add_argument("addr_a")
    ap.add_argument("ns_b")
    ap.add_argument("addr_b")
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--dev", default="tpc2h-t")
    args = ap.parse_args()
    fds = []
    for ns, me, peer, side in (
        (args.ns_a, args.addr_a, args.addr_b, "a"),
        (args.ns_b, args.addr_b, args.addr_a, "b"),
    ):
        _enter(ns)
        dev = f"{args.dev}{side}"
        fds.append(_tun(dev))
        subprocess.run(["ip", "-n", ns, "addr", "add", me, "peer", peer, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    delay = args.delay_ms / 1e3
    queues: list[collections.deque[tuple[float, bytes]]] = [collections.deque(), collections.deque()]
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        for i, q in enumerate(queues):  # queue i holds packets read from fds[i], bound for the other end
            while q and q[0][0] <= now:
                try:
                    os.write(fds[1 - i], q.popleft()[1])
                except BlockingIOError:
                    break
        due = [q[0][0] for q in queues if q]
        timeout = max(0.0, min(due) - time.monotonic()) if due else 0.2
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in readable:
            i = fds.index(fd)
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                queues[i].append((now + delay, packet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
