"""The trace viewer in a real browser: Debian's Chromium driven by Playwright.

Search, open a trace, see the critical path, open a span (a malicious attribute value
stays text), compare two traces, the dependency graph, and a 10k-span trace that
renders only what is on screen.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright
from tracing_support import (
    XSS,
    fan_out_trace,
    flushed,
    otlp_json_request,
    otlp_json_span,
    post_json,
)

from meshkit.tracing.collector import Collector

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
TRACE_A = "0af7651916cd43dd8448eb211c80319c"
TRACE_B = "1af7651916cd43dd8448eb211c80319c"


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    # bypass_csp: lets Playwright evaluate its wait conditions, and proves that escaping
    # alone keeps span text inert (the viewer's CSP is a second line of defence).
    context = await browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"JavaScript errors in the viewer: {errors}"


def rows_are(n: int) -> str:
    return f"document.querySelectorAll('#result-table tr.result').length == {n}"


async def seed(collector: Collector) -> None:
    now = time.time_ns()
    for trace_id, start, slow, xss in (
        (TRACE_A, now - 10**9, 30.0, False),
        (TRACE_B, now, 35.0, True),
    ):
        status, _ = await post_json(
            collector.url + "/v1/traces",
            otlp_json_request(
                "gateway", fan_out_trace(trace_id, start, slow_child_ms=slow, xss=xss)
            ),
        )
        assert status == 200
    await flushed(collector)


async def test_search_open_trace_critical_path_detail_and_compare(
    collector: Collector, page: Page
) -> None:
    await seed(collector)
    await page.goto(collector.url + "/")
    await page.wait_for_function(rows_are(2))  # everything, newest first
    await page.check("input[name=errors]")
    await page.click("#search-form button[type=submit]")
    await page.wait_for_function(rows_are(1))
    rows = page.locator("#result-table tr.result")
    assert await rows.first.get_attribute("data-trace") == TRACE_B
    await page.uncheck("input[name=errors]")
    await page.select_option("select[name=service]", "gateway")
    await page.select_option("select[name=operation]", "orders/list")
    await page.fill("input[name=min_ms]", "32")
    await page.click("#search-form button[type=submit]")
    await page.wait_for_function(f"location.hash.includes('min_ms=32') && {rows_are(1)}")
    assert await rows.first.get_attribute("data-trace") == TRACE_B

    # open the newest trace
    await page.click(f"tr[data-trace='{TRACE_B}'] a")
    await page.wait_for_function(f"window.__meshkitRendered === '{TRACE_B}'")
    assert await page.locator("#span-count").inner_text() == "4"
    critical = page.locator(".wf-row.on-critical-path")
    on_path = [
        await critical.nth(i).get_attribute("data-span") for i in range(await critical.count())
    ]
    assert on_path == [f"{i:016x}" for i in (1, 3, 4)]  # root → orders → db; not auth
    assert await page.locator(".wf-bar.crit").count() == 3
    assert await page.locator("#service-breakdown tbody tr").count() == 2

    # span detail: the malicious attribute is shown as text, never run
    await page.click(f".wf-row[data-span='{1:016x}']")
    await page.wait_for_selector("#detail-title")
    detail = await page.locator("#span-detail").inner_text()
    assert XSS in detail
    assert await page.evaluate("window.__xss") is None
    assert await page.locator("#span-detail img, #span-detail script").count() == 0
    assert (
        "budget at start 100.0 ms, used 50.0 ms"
        in await page.locator("#deadline-text").inner_text()
    )

    # collapse the root: only it stays visible
    await page.click(f".wf-row[data-span='{1:016x}'] .wf-toggle")
    await page.wait_for_function("document.querySelectorAll('.wf-row').length == 1")
    await page.click("#expand-all")
    await page.wait_for_function("document.querySelectorAll('.wf-row').length == 4")

    # compare the two traces from the search page
    await page.goto(collector.url + "/#/?service=gateway")
    await page.wait_for_selector("#result-table")
    await page.check(f"input[data-trace='{TRACE_A}']")
    await page.check(f"input[data-trace='{TRACE_B}']")
    await page.click("#compare-selected")
    await page.wait_for_selector("#compare-table")
    text = await page.locator("#compare-table").inner_text()
    assert "orders/list" in text and "+5.00 ms" in text


async def test_dependency_graph(collector: Collector, page: Page) -> None:
    await seed(collector)
    await page.goto(collector.url + "/#/deps")
    await page.wait_for_selector("#deps-graph")
    labels = await page.locator("#deps-graph g.node text").all_text_contents()
    assert sorted(labels) == ["auth", "db", "gateway", "orders"]
    table = await page.locator("#deps-table").inner_text()
    assert "50.00 %" in table  # orders → db: one error in two calls


async def test_ten_thousand_spans_render_virtualised(collector: Collector, page: Page) -> None:
    trace_id = "2af7651916cd43dd8448eb211c80319c"
    spans = big_trace(trace_id, 10_000)
    for i in range(0, len(spans), 2000):
        status, _ = await post_json(
            collector.url + "/v1/traces", otlp_json_request("big", spans[i : i + 2000])
        )
        assert status == 200
    await flushed(collector)
    await page.goto(f"{collector.url}/#/trace/{trace_id}")
    await page.wait_for_function(f"window.__meshkitRendered === '{trace_id}'", timeout=30_000)
    assert await page.locator("#span-count").inner_text() == "10000"
    # only the rows on screen (plus a margin) are in the DOM
    assert 0 < await page.locator(".wf-row").count() < 200
    await page.click("#expand-all")
    await page.evaluate("document.getElementById('waterfall').scrollTop = 22 * 9000")
    await page.wait_for_function(
        "[...document.querySelectorAll('.wf-row')].some(r => parseInt(r.style.top) >= 22 * 9000)"
    )
    assert await page.locator(".wf-row").count() < 200


def big_trace(trace_id: str, n: int) -> list[dict[str, Any]]:
    """A root with 100 children of 99 grandchildren each (n spans), 1 µs apart."""
    start = time.time_ns()
    spans = [otlp_json_span(trace_id, f"{1:016x}", "", "root", start, n * 1000 + 10)]
    next_id = 2
    while next_id <= n:
        parent = next_id
        spans.append(
            otlp_json_span(
                trace_id, f"{parent:016x}", f"{1:016x}", "mid", start + parent * 1000, 99_000
            )
        )
        next_id += 1
        for _ in range(99):
            if next_id > n:
                break
            spans.append(
                otlp_json_span(
                    trace_id,
                    f"{next_id:016x}",
                    f"{parent:016x}",
                    "leaf",
                    start + next_id * 1000,
                    500,
                )
            )
            next_id += 1
    return spans


async def test_spans_whose_parents_form_a_cycle_are_still_drawn(
    collector: Collector, page: Page
) -> None:
    """A broken or hostile exporter can send spans whose parents form a cycle (a's
    parent b, b's parent a): no span of the cycle is a root, so a tree walked from the
    roots would draw none of them. The earliest one is drawn as a root instead, and
    every span of the trace has its row, each once."""
    trace_id = "3af7651916cd43dd8448eb211c80319c"
    now = time.time_ns()
    a, b, c, d = (f"{i:016x}" for i in (0xA, 0xB, 0xC, 0xD))
    spans = [
        otlp_json_span(trace_id, a, b, "a", now, 3_000_000),
        otlp_json_span(trace_id, b, a, "b", now + 500_000, 1_000_000),
        otlp_json_span(trace_id, c, b, "c", now + 600_000, 500_000),
        otlp_json_span(trace_id, d, "", "d", now + 700_000, 100_000),  # a true root
    ]
    status, _ = await post_json(collector.url + "/v1/traces", otlp_json_request("svc", spans))
    assert status == 200
    await flushed(collector)
    await page.goto(f"{collector.url}/#/trace/{trace_id}")
    await page.wait_for_function(f"window.__meshkitRendered === '{trace_id}'")
    assert await page.locator("#span-count").inner_text() == "4"
    rows = page.locator(".wf-row")
    drawn = [await rows.nth(i).get_attribute("data-span") for i in range(await rows.count())]
    assert sorted(drawn) == sorted([a, b, c, d])
    # a (the earliest of the cycle) is a root: b under it, c under b; d its own root
    assert drawn == [a, b, c, d]
