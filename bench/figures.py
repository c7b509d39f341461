"""What a benchmark figure is, how it is measured (wall, CPU, peak RSS), and how the report
and its chart show it: library and CLI figures in separate tables, every target beside its
figure, and the figures that miss their target listed at the top."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: the report's tables, in order, with what their figures include
TABLES = {
    "lib": "Library calls (one Python process, timed around the call: no start-up; the archive "
    "engine's modules imported first by an untimed one-file apply and diff)",
    "cli": "CLI (whole `graphdriver` processes, Python start-up included; references are whole "
    "processes too)",
    "engine": "Container engines (whole client processes or gRPC calls, ms)",
    "mem": "Peak memory (max RSS of the process and its children, MiB, max of runs)",
}


@dataclass(frozen=True)
class Target:
    """What the issue asks of a figure: its ratio to the reference at most *limit*, or, when
    *absolute*, its median at most *limit* in the figure's own unit."""

    limit: float
    absolute: bool = False

    def text(self, unit: str) -> str:
        if self.absolute:
            return f"<= {self.limit:g} {unit}"
        return f"<= {self.limit:g}x"


@dataclass(frozen=True)
class Run:
    """One measured process or call: wall seconds, user+sys CPU seconds, peak RSS in KiB."""

    wall: float
    cpu: float
    rss: int


@dataclass
class Figure:
    """One measured operation beside its reference, in one table of the report."""

    name: str
    table: str = "cli"
    ours: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    ours_cpu: list[float] = field(default_factory=list)
    ref_cpu: list[float] = field(default_factory=list)
    ref_name: str = ""
    target: Target | None = None
    #: "s" (shown as s), "ms" (stored in s, shown in ms) or "MiB" (stored in MiB)
    unit: str = "s"
    #: extra notes (MB/s, files/s) computed from the median
    extra: str = ""

    @property
    def key(self) -> str:
        return f"{self.table}/{self.name}"

    def add(self, ours: Run, ref: Run | None = None) -> None:
        self.ours.append(ours.wall)
        self.ours_cpu.append(ours.cpu)
        if ref is not None:
            self.ref.append(ref.wall)
            self.ref_cpu.append(ref.cpu)

    def value(self) -> float | None:
        """The figure's number: the largest peak RSS, else the median."""
        if not self.ours:
            return None
        return max(self.ours) if self.unit == "MiB" else statistics.median(self.ours)

    def ratio(self) -> float | None:
        if not self.ours or not self.ref:
            return None
        return statistics.median(self.ours) / statistics.median(self.ref)

    def cpu_ratio(self) -> float | None:
        if not self.ours_cpu or not self.ref_cpu or statistics.median(self.ref_cpu) <= 0:
            return None
        return statistics.median(self.ours_cpu) / statistics.median(self.ref_cpu)

    def miss(self) -> str | None:
        """Why the figure misses its target, or None (met, no target, or not measured)."""
        if self.target is None:
            return None
        if self.target.absolute:
            got = self.value()
            if got is None:
                return None
            shown = got * 1e3 if self.unit == "ms" else got
            if shown <= self.target.limit:
                return None
            return f"{shown:.1f} {self.unit}, target {self.target.text(self.unit)}"
        r = self.ratio()
        if r is None or r <= self.target.limit:
            return None
        return f"{r:.2f}x of {self.ref_name}, target {self.target.text(self.unit)}"


def spread(xs: list[float], unit: str = "s") -> str:
    if not xs:
        return "-"
    if unit == "MiB":
        return f"{max(xs):.0f}"
    scale, fmt = (1e3, ".1f") if unit == "ms" else (1.0, ".3f")
    med, lo, hi = (statistics.median(xs) * scale, min(xs) * scale, max(xs) * scale)
    return f"{med:{fmt}} ({lo:{fmt}}..{hi:{fmt}})"


#: GNU time, for peak RSS: spawned from this (large) process, a command's ru_maxrss starts at
#: this process's RSS (the kernel keeps the larger across exec); time's fork resets it
TIME = "/usr/bin/time"


def timed(cmd: list[str], rss: bool = False, env: dict[str, str] | None = None) -> Run:
    """Run *cmd* (its output to a temporary file, kept for the error message; *env*, else
    this process's environment); wall time and user+sys CPU from wait4(2), at microsecond
    resolution. With *rss*, the command runs under GNU time for its peak RSS (KiB, the largest
    of it and its children; time's own fork and exec, about a millisecond, are then in the
    wall and CPU time); else the RSS is 0. A command that names a command server that did
    not run it (it says so) fails: its figure would not be what it says."""
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as peak:
        argv = [TIME, "-f", "%M", "-o", peak.name, *cmd] if rss else cmd
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        said = out.read()
        if proc.returncode != 0:
            tail = said.decode(errors="replace")[-800:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {tail}")
        if (env or os.environ).get("GRAPHDRIVER_SOCKET") and b"; running here" in said:
            raise RuntimeError(
                f"{' '.join(cmd)} was not run by the command server: {said[-400:]!r}"
            )
        kib = int(peak.read().split()[-1]) if rss else 0
    return Run(wall, usage.ru_utime + usage.ru_stime, kib)


def cpu_now() -> float:
    """User+sys CPU seconds of this process and its waited-for children so far."""
    both = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in both)


def timed_calls(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Each call *runs* times, interleaved: {name: wall seconds, name_cpu: CPU seconds}."""
    got: dict[str, list[float]] = {}
    for _ in range(runs):
        for name, call in calls.items():
            c, t = cpu_now(), time.perf_counter()
            call()
            got.setdefault(name, []).append(time.perf_counter() - t)
            got.setdefault(name + "_cpu", []).append(cpu_now() - c)
    return got


def peak_rss() -> int:
    """Peak RSS in KiB of this process or the largest of its waited-for children."""
    return max(
        resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )


def table(figs: list[Figure], kind: str) -> list[str]:
    rows = [f for f in figs if f.table == kind]
    if not rows:
        return []
    if kind == "mem":
        lines = ["| process | MiB | target |", "|---|---|---|"]
        for f in rows:
            target = f.target.text(f.unit) if f.target else ""
            lines.append(f"| {f.name} | {spread(f.ours, f.unit)} | {target} |")
        return [f"### {TABLES[kind]}", "", *lines, ""]
    lines = [
        "| operation | graphdriver | reference | ratio | CPU ratio | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in rows:
        r, c = f.ratio(), f.cpu_ratio()
        ref = f"{f.ref_name}: {spread(f.ref, f.unit)}" if f.ref else f.ref_name or "-"
        target = f.target.text(f.unit) if f.target else ""
        if target and f.miss():
            target += " **missed**"
        lines.append(
            f"| {f.name} | {spread(f.ours, f.unit)} | {ref} | "
            f"{'-' if r is None else f'{r:.2f}x'} | {'-' if c is None else f'{c:.2f}x'} | "
            f"{target} | {f.extra} |"
        )
    return [f"### {TABLES[kind]}", "", *lines, ""]


def misses(results: dict[str, list[Figure]]) -> list[str]:
    """The "Misses" section: every figure that misses its target, per configuration."""
    out = []
    for config, figs in results.items():
        for f in figs:
            why = f.miss()
            if why is not None:
                out.append(f"- {config}, {f.table}: **{f.name}**: {why}")
    met = sum(1 for figs in results.values() for f in figs if f.target and f.value() is not None)
    head = [f"## Misses ({len(out)} of {met} figures with a target)", ""]
    return [*head, *(out or ["None: every figure with a target meets it."]), ""]


def recorded(results_dir: Path, name: str) -> str | None:
    """The newest recorded results/<date>-<name>.md, as a Markdown link with its date."""
    found = sorted(results_dir.glob(f"????-??-??-{name}.md"))
    if not found:
        return None
    return f"[{found[-1].name}]({found[-1].name}) (recorded {found[-1].name[:10]})"


#: (figure key, label) of the chart's rows: the ratios the issue sets targets for
CHART_FIGURES = [
    ("cli/apply-diff minbase", "apply-diff minbase / tar -x (CLI)"),
    ("lib/apply-diff minbase", "apply-diff minbase / tar -x (library)"),
    ("lib/apply-diff minbase.gz", "apply-diff minbase.gz / tar --gzip -x (library)"),
    ("lib/apply-diff minbase.zst", "apply-diff minbase.zst / tar --zstd -x (library)"),
    ("cli/apply-diff apt", "apply-diff apt layer / rm -rf + tar -x (overlay: tar -x) (CLI)"),
    ("lib/apply-diff apt", "apply-diff apt layer / rm -rf + tar -x (overlay: tar -x) (library)"),
    ("cli/apply-diff small10k", "apply-diff 10k files / tar -x (CLI)"),
    ("lib/apply-diff small10k", "apply-diff 10k files / tar -x (library)"),
    ("cli/diff minbase", "diff minbase / tar -c (CLI)"),
    ("lib/diff minbase", "diff minbase / tar -c (library)"),
    ("cli/diff small10k", "diff 10k files / tar -c (CLI)"),
    ("lib/diff small10k", "diff 10k files / tar -c (library)"),
    (
        "lib/diff of a container layer, every small10k file rewritten",
        "diff of 10k rewritten files / tar -c --format=posix (library)",
    ),
    ("cli/CLI start-up (graphdriver --version)", "graphdriver --version / python -c pass"),
    ("cli/CLI start-up (graphdriver ls)", "graphdriver ls / python -c pass"),
    ("cli/mount + umount vs podman", "mount+umount / podman image mount+umount (CLI)"),
    ("lib/get + put", "get+put / mount(2)+umount2(2) (library)"),
    ("cli/apply-diff minbase vs podman import", "apply-diff minbase / podman import (CLI)"),
    (
        "lib/changes, 3 files on minbase (after one untimed call) / target",
        "changes of 3 files (library) / its 20 ms target (btrfs)",
    ),
]


def chart(
    by_config: dict[str, dict[str, float | None]],
    targets: dict[str, float],
    path: Path,
    title: str,
) -> None:
    """Horizontal bars of each configuration's ratios, each row's target as a red tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    rows = [(k, label) for k, label in CHART_FIGURES if any(k in c for c in by_config.values())]
    fig, ax = plt.subplots(figsize=(13, 1.5 + 0.5 * max(1, len(rows))))
    height = 0.8 / max(1, len(by_config))
    for i, (label, by_name) in enumerate(by_config.items()):
        ys, xs = [], []
        for j, (key, _) in enumerate(rows):
            r = by_name.get(key)
            if r is not None:
                ys.append(j + i * height)
                xs.append(r)
        bars = ax.barh(ys, xs, height=height, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    for j, (key, _) in enumerate(rows):
        if key in targets:
            ax.plot([targets[key]] * 2, [j - height / 2, j + 0.8 - height / 2], color="red",
                    linewidth=1.5)  # fmt: skip
    ax.plot([], [], color="red", linewidth=1.5, label="target of the row")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
    ax.set_yticklabels([label for _, label in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    # plain ticks (0.2 ... 5): the log scale's own labels of minor ticks overlap
    ax.xaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 50, 100]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ratio to the reference (median of runs; lower is better, log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
