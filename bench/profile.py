"""Summarises py-spy's collapsed stacks (C{--format raw}): the hottest frames, self and inclusive.

C{python -m bench.profile bench/out/profile-SCENARIO.txt [N]}

Samples whose innermost frame is a wait (the reactor's epoll, a thread pool's
condition) are idle and left out, so percentages are of busy samples.
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_SITE = re.compile(r"^.*?/(?:site-packages|lib/python3\.\d+)/")
IDLE = ("EPollReactor.doPoll (", "Condition.wait (", "Thread.join (", "_worker (")


def load(path: Path) -> list[tuple[list[str], int]]:
    """(frames from the root, sample count) for each line."""
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames:
            stacks.append(([_SITE.sub("", f) for f in frames.split(";")], int(count)))
    return stacks


def function(frame: str) -> str:
    """A frame without its line number: C{name (file)}."""
    return re.sub(r":\d+\)$", ")", frame)


def hottest(stacks: list[tuple[list[str], int]], n: int = 25) -> str:
    """A text table of the top C{n} functions by self and by inclusive share of busy samples."""
    busy = [(frames, count) for frames, count in stacks if not function(frames[-1]).startswith(IDLE)]
    total = sum(count for _, count in busy)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in busy:
        own[function(frames[-1])] += count
        for name in {function(f) for f in frames}:
            inclusive[name] += count
    lines = [f"{total} busy samples of {sum(count for _, count in stacks)}"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"\n-- by {title} time")
        lines += [f"{100 * c / total:5.1f}%  {name}" for name, c in counter.most_common(n)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(hottest(load(Path(sys.argv[1])), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
