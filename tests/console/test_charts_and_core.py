"""The chart geometry, and the core page's probe when the core is down or serves another bundle."""

from __future__ import annotations

import asyncio
from pathlib import Path

from admin.console.charts import HEIGHT, WIDTH, nice_ceiling, stacked_bars
from cloaking.secretbox import KeySource
from edge_proxy.core_health import core_health_probe
from edge_proxy.edge_model import EdgeModel
from edge_proxy.generate import Engine
from edge_proxy.metrics import EdgeMetrics
from tests.console.conftest import console_settings
from veil.errors import CoreUnavailable


def test_nice_ceiling() -> None:
    assert [nice_ceiling(v) for v in (0, 1, 2, 3, 7, 10, 11, 180, 999, 1001)] == [1, 1, 2, 5, 10, 10, 20, 200, 1000,
                                                                                   2000]


def test_stacked_bars_fit_the_plot_and_stack_in_order() -> None:
    days = ["2025-01-01", "2025-01-02", "2025-01-03"]
    values = {"2025-01-01": {"a": 30, "b": 10}, "2025-01-03": {"a": 5}}
    chart = stacked_bars("t", "Tokens", days, [("a", "A"), ("b", "B")], values)
    assert [s.series for s in chart.segments] == ["a", "b", "a"]
    first, second = chart.segments[:2]
    assert abs(first.height - 3 * second.height) < 0.05 and abs(second.y + second.height - first.y) < 0.05
    assert all(0 <= s.x and s.x + s.width <= WIDTH and 0 <= s.y and s.y + s.height <= HEIGHT for s in chart.segments)
    assert chart.segments[0].title == "2025-01-01: 30 A" and [t.text for t in chart.ticks] == ["0", "25", "50"]
    assert [d.text for d in chart.days] == ["01-01", "01-02", "01-03"]
    empty = stacked_bars("e", "Nothing", days, [("a", "A")], {})
    assert empty.segments == [] and [t.text for t in empty.ticks] == ["0", "1"]
    many = stacked_bars("m", "Many", [f"2025-01-{d:02d}" for d in range(1, 31)], [("a", "A")], {})
    assert len(many.days) <= 10


class _DownCore:
    async def info(self) -> dict:
        raise CoreUnavailable("the core is not reachable", code="core_unreachable")


class _OtherBundleCore:
    async def info(self) -> dict:
        return {"bundle_id": "another", "max_tokens_per_session": 64, "identity": {"fingerprint": "SHA256:abc"}}


def test_the_core_probe_reports_instead_of_raising(tiny_bundles, key_file: Path, tmp_path: Path) -> None:
    _, edge_dir, _ = tiny_bundles["llama"]
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    settings = console_settings(tmp_path, auth=False)
    down = asyncio.run(core_health_probe(settings, Engine(model, _DownCore(), EdgeMetrics()))())
    assert down["ok"] is False and down["code"] == "core_unreachable" and down["bundle_id"] == model.spec.bundle_id
    other = asyncio.run(core_health_probe(settings, Engine(model, _OtherBundleCore(), EdgeMetrics()))())
    assert other["ok"] is False and other["code"] == "bundle_mismatch"
