"""CPU of processes and of the machine over a window, and waiting for a quiet machine.

Figures are percentages of one core over the window's wall time (200% is both cores of a
2-core machine). On a shared machine, what the others used meanwhile is machine busy time
minus ours: report it next to the figures, so a reader can tell a slow run from a busy one.
Needs ``psutil`` (the ``bench`` extra).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable

import psutil


def cpu_seconds(pids: Iterable[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by the processes ``pids`` (gone ones count 0)."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            user += times.user
            system += times.system
    return user, system


class CpuWindow:
    """CPU used by some processes between ``start()`` and ``stop()``, as % of one core.

    The processes are given by PID when the window starts; their CPU is read from ``psutil``
    (children are not included: list them).
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self._cpu = (0.0, 0.0)
        self._wall = 0.0
        self.percent: float | None = None
        self.system_percent: float | None = None  # the part spent in the kernel
        self.cpu_s: float | None = None

    def start(self) -> None:
        self._cpu, self._wall = cpu_seconds(self.pids), time.monotonic()

    def stop(self) -> float | None:
        wall = time.monotonic() - self._wall
        if wall > 0:
            user, system = cpu_seconds(self.pids)
            self.cpu_s = (user - self._cpu[0]) + (system - self._cpu[1])
            self.system_percent = 100 * (system - self._cpu[1]) / wall
            self.percent = 100 * self.cpu_s / wall
        return self.percent


class MachineCpuWindow(CpuWindow):
    """CPU busy on the whole machine (all cores) over the window, as % of one core, and the
    CPU its hypervisor gave to other guests meanwhile (``steal_percent``).

    Steal is time this virtual machine's cores were ready to run and did not: on a host shared
    with busy neighbours every timing of the run (latency, throughput) is worse by it while the
    CPU each process used is not, so the report shows it next to the figures.
    """

    def __init__(self) -> None:
        super().__init__([])
        self._busy_at_start = 0.0
        self._steal_at_start = 0.0
        self.steal_percent: float | None = None

    def start(self) -> None:
        self._busy_at_start, self._steal_at_start, self._wall = self._busy(), self._steal(), time.monotonic()

    def stop(self) -> float | None:
        wall = time.monotonic() - self._wall
        if wall > 0:
            self.cpu_s = self._busy() - self._busy_at_start
            self.percent = 100 * self.cpu_s / wall
            self.steal_percent = 100 * (self._steal() - self._steal_at_start) / wall
        return self.percent

    @staticmethod
    def _steal() -> float:
        return getattr(psutil.cpu_times(), "steal", 0.0)  # Linux only: elsewhere 0

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()  # Linux: user already includes guest time
        return (
            times.user
            + times.nice
            + times.system
            + getattr(times, "irq", 0.0)
            + getattr(times, "softirq", 0.0)
        )


def machine_busy(seconds: float = 2.0) -> float:
    """The machine's busy CPU over the next ``seconds``, as % of one core."""
    window = MachineCpuWindow()
    window.start()
    time.sleep(seconds)
    return window.stop() or 0.0


def wait_quiet(limit: float, busy_below: float = 25.0) -> float:
    """Wait (at most ``limit`` s) until the machine is busy below ``busy_below``% of a core.

    Return the last busy figure; say on stderr how long it waited, or that it gave up.
    """
    began = time.monotonic()
    busy = machine_busy()
    while busy >= busy_below and time.monotonic() - began < limit:
        print(
            f"waiting for a quiet machine: {busy:.0f}% of a core busy", file=sys.stderr, flush=True
        )
        busy = machine_busy()
    waited = time.monotonic() - began
    if busy < busy_below:
        print(
            f"machine quiet ({busy:.0f}% of a core busy) after {waited:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            f"the machine is still busy ({busy:.0f}%) after {limit:.0f} s; measuring anyway",
            file=sys.stderr,
            flush=True,
        )
    return busy
