"""Stacked bar charts as geometry for an inline SVG template: no script, no inline style (CSP), colours by
CSS class. Each bar segment carries a <title> with its number, and the page shows the same data as a table."""

from __future__ import annotations

import dataclasses
import math

WIDTH, HEIGHT = 760, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 12, 36  # room for the axis labels
_MAX_LABELS = 10  # day labels under the bars; more would overlap


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    series: str  # CSS class suffix: the colour
    title: str  # what a hover (or a screen reader) reads


@dataclasses.dataclass(frozen=True, slots=True)
class Label:
    x: float
    y: float
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Chart:
    id: str
    title: str
    description: str
    segments: list[Segment]
    ticks: list[Label]  # y axis: value labels, with a grid line at each y
    days: list[Label]  # x axis
    legend: list[tuple[str, str]]  # (series, name)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    right_edge: int = WIDTH - _RIGHT
    baseline: int = HEIGHT - _BOTTOM


def nice_ceiling(value: int) -> int:
    """The axis top: 1, 2 or 5 times a power of ten, at least `value` (and at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def stacked_bars(chart_id: str, title: str, days: list[str], series: list[tuple[str, str]],
                 values: dict[str, dict[str, int]]) -> Chart:
    """One bar per day, stacked by `series` ([(key, name)], bottom first); `values[day][key]` (missing = 0)."""
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    top = nice_ceiling(max((sum(values.get(d, {}).get(k, 0) for k, _ in series) for d in days), default=0))
    slot = plot_w / max(1, len(days))
    bar = max(1.0, slot * 0.7)
    segments = []
    for i, day in enumerate(days):
        x, y = _LEFT + i * slot + (slot - bar) / 2, float(HEIGHT - _BOTTOM)
        for key, name in series:
            amount = values.get(day, {}).get(key, 0)
            if amount <= 0:
                continue
            h = amount / top * plot_h
            y -= h
            segments.append(Segment(round(x, 2), round(y, 2), round(bar, 2), round(h, 2), key,
                                    f"{day}: {amount:,} {name}"))
    steps = (0, 0.5, 1) if top >= 2 else (0, 1)
    ticks = [Label(_LEFT - 6, round(HEIGHT - _BOTTOM - f * plot_h, 2), f"{round(top * f):,}") for f in steps]
    every = math.ceil(len(days) / _MAX_LABELS) if days else 1
    labels = [Label(round(_LEFT + i * slot + slot / 2, 2), HEIGHT - _BOTTOM + 18, day[5:])
              for i, day in enumerate(days) if i % every == 0]
    description = f"{len(days)} days from {days[0]} to {days[-1]}" if days else "no days"
    return Chart(chart_id, title, description, segments, ticks, labels, series)
