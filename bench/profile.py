"""Where a gateway process spends its CPU: py-spy samples it during a ceiling window, and the collapsed stacks
are summed into the functions with the most self time (the leaf of each sampled stack) and total time."""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

TOP = 15
SAMPLE_RATE_HZ = 200


@dataclass
class Profile:
    """Sampled stacks summed per function (`name (file)`); idle samples are not recorded by py-spy."""

    samples: int = 0
    self_samples: Counter[str] = field(default_factory=Counter)
    total_samples: Counter[str] = field(default_factory=Counter)  # samples with the function anywhere on the stack

    @classmethod
    def from_collapsed(cls, text: str) -> Profile:
        """Parse py-spy's `--format raw` output: one `frame;frame;...;leaf COUNT` line per distinct stack."""
        profile = cls()
        for line in text.splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            profile.samples += count
            profile.self_samples[frames[-1]] += count
            for frame in set(frames):
                profile.total_samples[frame] += count
        return profile

    def top(self, limit: int = TOP) -> list[tuple[str, int, int]]:
        """(function, self samples, total samples), most self time first."""
        return [(name, count, self.total_samples[name]) for name, count in self.self_samples.most_common(limit)]


def _short(frame: str) -> str:
    """`name (/long/path/to/site-packages/pkg/mod.py)` -> `name (pkg/mod.py)`: the repository's own files relative
    to it, installed packages from their top-level package on."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    root = str(procs.ROOT) + "/"
    if where.startswith(root):
        where = where[len(root) :]
    elif "site-packages/" in where:
        where = where.split("site-packages/", 1)[1]
    elif "/lib/python3" in where:
        where = "stdlib " + where.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"`{name}` ({where})" if where else f"`{name}`"


def render_table(profile: Profile, limit: int = TOP) -> str:
    """The top functions by self time as a markdown table."""
    if not profile.samples:
        return "No samples."
    lines = [
        "| # | function (file) | self % | total % |",
        "|---:|---|---:|---:|",
    ]
    for rank, (name, own, total) in enumerate(profile.top(limit), start=1):
        lines.append(
            f"| {rank} | {_short(name)} | {100 * own / profile.samples:.1f} | {100 * total / profile.samples:.1f} |"
        )
    return "\n".join(lines)


def start_recording(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """py-spy attached to `pid` for `seconds` (it needs ptrace: root, or CAP_SYS_PTRACE). Raises when py-spy is
    not installed."""
    binary = procs.py_spy_binary()
    if binary is None:
        raise RuntimeError("py-spy is not installed (make bench-setup puts it in bench/.venv-litellm)")
    argv = [str(binary), "record", "--pid", str(pid), "--duration", str(max(int(seconds), 1))]
    argv += ["--rate", str(SAMPLE_RATE_HZ), "--gil", "--format", "raw", "--nolineno", "--output", str(output)]
    with output.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


def finish_recording(recorder: subprocess.Popen[bytes], output: Path, timeout: float = 30.0) -> Profile:
    try:
        recorder.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait()
    if recorder.returncode != 0 or not output.exists():
        log = output.with_suffix(".log")
        detail = log.read_text(errors="replace").strip().splitlines()[:1] if log.exists() else []
        raise RuntimeError(f"py-spy exited with {recorder.returncode}: {' '.join(detail)[:160]}")
    return Profile.from_collapsed(output.read_text(errors="replace"))
