// meshkit trace viewer: framework-free, served by `meshkit traces serve`.
// Every page is built from the collector's JSON API (/api/...). Span text is only ever put
// in the page through textContent / attribute setters, never parsed as HTML.
"use strict";

(function () {
  const app = document.getElementById("app");
  const ROW_H = 22;

  // -- small helpers -------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null || value === false) continue;
        if (key === "text") node.textContent = String(value);
        else if (key === "class") node.className = value;
        else if (key === "style") node.setAttribute("style", value);
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  }

  function fmtUs(us) {
    if (us === null || us === undefined) return "–";
    if (us >= 1e6) return (us / 1e6).toFixed(2) + " s";
    if (us >= 1000) return (us / 1000).toFixed(2) + " ms";
    return us.toFixed(0) + " µs";
  }

  function fmtMs(ms) { return fmtUs(ms * 1000); }

  function fmtTime(ms) { return new Date(ms).toLocaleString(); }

  const HEX = /^[0-9a-f]{32}$/;

  function traceHref(id) { return "#/trace/" + encodeURIComponent(id); }

  async function api(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    let body;
    try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
    if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
    return body;
  }

  function showError(err) {
    app.replaceChildren(el("p", { class: "error-text", text: String(err.message || err) }));
  }

  function setNav(name) {
    for (const a of document.querySelectorAll("header nav a")) {
      a.classList.toggle("active", a.dataset.nav === name);
    }
  }

  function parseHash() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query || "") };
  }

  // -- search ----------------------------------------------------------------------------

  const selectedForCompare = new Set();

  async function searchPage(params) {
    setNav("search");
    const services = (await api("/api/services")).services;
    const field = (name, label, attrs) => el("label", null, label,
      el("input", Object.assign({ name, value: params.get(name) || "" }, attrs || {})));
    const serviceSelect = el("select", { name: "service" }, el("option", { value: "", text: "(any)" }));
    for (const s of services) {
      serviceSelect.append(el("option", { value: s.service, text: s.service, selected: params.get("service") === s.service }));
    }
    const opSelect = el("select", { name: "operation" });
    const fillOps = () => {
      const chosen = services.find((s) => s.service === serviceSelect.value);
      const ops = chosen ? chosen.operations : [...new Set(services.flatMap((s) => s.operations))].sort();
      opSelect.replaceChildren(el("option", { value: "", text: "(any)" }),
        ...ops.map((op) => el("option", { value: op, text: op, selected: params.get("operation") === op })));
    };
    serviceSelect.addEventListener("change", fillOps);
    fillOps();
    const lookback = el("select", { name: "lookback" },
      ...[["", "any time"], ["300", "last 5 min"], ["3600", "last hour"], ["86400", "last day"], ["604800", "last week"]]
        .map(([v, t]) => el("option", { value: v, text: t, selected: (params.get("lookback") || "") === v })));
    const form = el("form", { class: "search", id: "search-form" },
      el("label", null, "Service", serviceSelect),
      el("label", null, "Operation", opSelect),
      field("tags", "Tags (k=v …)", { placeholder: "meshkit.route=canary" }),
      field("min_ms", "Min duration (ms)", { size: 6 }),
      field("max_ms", "Max duration (ms)", { size: 6 }),
      el("label", null, "Time range", lookback),
      field("limit", "Limit", { size: 4, placeholder: "50" }),
      el("label", { class: "check" }, el("input", { type: "checkbox", name: "errors", value: "1", checked: params.get("errors") === "1" }), "errors only"),
      el("button", { type: "submit", text: "Find traces" }));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const query = new URLSearchParams();
      for (const [k, v] of new FormData(form).entries()) if (v) query.set(k, v);
      location.hash = "#/?" + query.toString();
    });
    const compareButton = el("button", { class: "secondary", id: "compare-selected", type: "button", disabled: true, text: "Compare selected (0/2)" });
    const updateCompare = () => {
      compareButton.disabled = selectedForCompare.size !== 2;
      compareButton.textContent = "Compare selected (" + selectedForCompare.size + "/2)";
    };
    compareButton.addEventListener("click", () => {
      const [a, b] = [...selectedForCompare];
      location.hash = "#/compare/" + encodeURIComponent(a) + "/" + encodeURIComponent(b);
    });
    selectedForCompare.clear();
    const results = el("div", { id: "results" }, el("p", { class: "muted", text: "Searching…" }));
    app.replaceChildren(el("h2", { text: "Find traces" }), form, el("p", null, compareButton), results);
    const query = new URLSearchParams(params);
    const traces = (await api("/api/traces?" + query.toString())).traces;
    if (!traces.length) {
      results.replaceChildren(el("p", { class: "muted", text: "No traces match." }));
      return;
    }
    const rows = traces.map((t) => {
      const box = el("input", { type: "checkbox", "data-trace": t.trace_id });
      box.addEventListener("change", () => {
        if (box.checked) selectedForCompare.add(t.trace_id); else selectedForCompare.delete(t.trace_id);
        updateCompare();
      });
      return el("tr", { class: t.errors ? "err result" : "result", "data-trace": t.trace_id },
        el("td", null, box),
        el("td", null, el("a", { href: traceHref(t.trace_id), text: t.root_service + " " + t.root_operation })),
        el("td", { class: "num", text: fmtMs(t.duration_ms) }),
        el("td", { class: "num", text: t.spans }),
        el("td", null, ...t.services.map((s) => el("span", { class: "badge", text: s }))),
        el("td", null, t.errors ? el("span", { class: "badge err", text: t.errors + (t.errors === 1 ? " error" : " errors") }) : ""),
        el("td", { text: fmtTime(t.start_ms) }),
        el("td", { class: "muted", text: t.trace_id }));
    });
    results.replaceChildren(el("table", { id: "result-table" },
      el("thead", null, el("tr", null, ...["", "Root", "Duration", "Spans", "Services", "Errors", "Started", "Trace id"]
        .map((h) => el("th", { text: h })))),
      el("tbody", null, ...rows)));
  }

  // -- trace -----------------------------------------------------------------------------

  function buildTree(spans) {
    const byId = new Map(spans.map((s) => [s.span_id, s]));
    const children = new Map();
    const roots = [];
    for (const s of spans) {
      if (s.parent_id && byId.has(s.parent_id) && s.parent_id !== s.span_id) {
        if (!children.has(s.parent_id)) children.set(s.parent_id, []);
        children.get(s.parent_id).push(s);
      } else roots.push(s);
    }
    for (const list of children.values()) list.sort((a, b) => a.start_us - b.start_us);
    roots.sort((a, b) => a.start_us - b.start_us);
    // Parents that form a cycle (a broken or hostile exporter) leave spans no root
    // reaches: the earliest unreached span becomes a root, cut from its parent.
    const reached = new Set();
    const reach = (root) => {
      const stack = [root];
      while (stack.length) {
        const span = stack.pop();
        if (reached.has(span.span_id)) continue;
        reached.add(span.span_id);
        for (const kid of children.get(span.span_id) || []) stack.push(kid);
      }
    };
    roots.forEach(reach);
    if (reached.size < byId.size) {
      const unreached = spans.filter((s) => !reached.has(s.span_id));
      unreached.sort((a, b) => a.start_us - b.start_us);
      for (const span of unreached) {
        if (reached.has(span.span_id)) continue;
        const siblings = children.get(span.parent_id);
        siblings.splice(siblings.indexOf(span), 1);
        roots.push(span);
        reach(span);
      }
      roots.sort((a, b) => a.start_us - b.start_us);
    }
    return { byId, children, roots };
  }

  function detailPanel(trace, span) {
    const kv = (obj) => {
      const dl = el("dl", { class: "kv" });
      for (const key of Object.keys(obj || {}).sort()) {
        const value = obj[key];
        dl.append(el("dt", { text: key }), el("dd", { text: typeof value === "string" ? value : JSON.stringify(value) }));
      }
      return dl;
    };
    const parts = [
      el("h3", { id: "detail-title", text: span.service + " · " + span.name }),
      el("dl", { class: "kv" },
        el("dt", { text: "kind" }), el("dd", { text: span.kind }),
        el("dt", { text: "start" }), el("dd", { text: "+" + fmtUs(span.start_us) }),
        el("dt", { text: "duration" }), el("dd", { text: fmtUs(span.duration_us) }),
        el("dt", { text: "self time" }), el("dd", { text: fmtUs(span.self_us) }),
        el("dt", { text: "status" }), el("dd", { class: span.error ? "error-text" : "", text: span.error ? "ERROR " + span.status : (span.status || "unset") }),
        el("dt", { text: "span id" }), el("dd", { text: span.span_id }),
        span.kept ? el("dt", { text: "kept by" }) : null, span.kept ? el("dd", { text: span.kept + " (tail sampling)" }) : null),
    ];
    if (span.deadline_ms !== null && span.deadline_ms !== undefined) {
      const used = span.duration_us / 1000;
      const pct = span.deadline_ms > 0 ? (100 * used / span.deadline_ms) : 100;
      parts.push(el("h3", { text: "Deadline budget" }),
        el("p", { id: "deadline-text", text: "budget at start " + span.deadline_ms.toFixed(1) + " ms, used " + used.toFixed(1) + " ms (" + pct.toFixed(0) + " %)" }),
        el("div", { class: "bars" }, el("div", { class: "bar", style: "width:" + Math.min(100, pct).toFixed(1) + "%;background:" + (pct > 80 ? "#d92d20" : "#8fb3f0") })));
    }
    parts.push(el("h3", { text: "Attributes" }), kv(span.attrs));
    if (span.events.length) {
      parts.push(el("h3", { text: "Events" }));
      for (const e of span.events) parts.push(el("div", null, el("b", { text: "+" + fmtUs(e.at_us) + " " + e.name })), kv(e.attrs));
    }
    if (span.links.length) {
      parts.push(el("h3", { text: "Links" }));
      for (const link of span.links) {
        const inTrace = link.trace_id === trace.trace_id;
        const target = HEX.test(link.trace_id) ? link.trace_id : "";
        parts.push(el("div", { class: "span-link" }, "→ ",
          target ? el("a", { href: traceHref(target) + (inTrace ? "" : ""), text: (inTrace ? "this trace" : "trace " + target) + " span " + link.span_id }) : el("span", { text: link.trace_id }),
          link.attrs && Object.keys(link.attrs).length ? kv(link.attrs) : null));
      }
    }
    parts.push(el("h3", { text: "Resource" }), kv(trace.resources[span.resource]));
    return parts;
  }

  async function tracePage(traceId) {
    setNav("search");
    const trace = await api("/api/traces/" + encodeURIComponent(traceId));
    // attributes, events and links come as lists parallel to spans (see the API doc)
    trace.spans.forEach((span, i) => {
      span.attrs = trace.attrs[i];
      span.events = trace.events[i];
      span.links = trace.links[i];
    });
    const { byId, children, roots } = buildTree(trace.spans);
    const critical = new Set(trace.critical_path);
    const collapsed = new Set();
    // Very large traces start collapsed below depth 2 so the first paint stays small.
    const bigTrace = trace.spans.length > 2000;
    const total = Math.max(trace.duration_us, 1);
    const side = el("div", { class: "side", id: "span-detail" }, el("p", { class: "muted", text: "Click a span for its details." }));
    const spacer = el("div", { class: "wf-spacer" });
    const pane = el("div", { class: "waterfall", id: "waterfall" }, spacer);
    let visible = [];
    let selected = null;

    function flatten() {
      visible = [];
      const stack = roots.slice().reverse().map((s) => [s, 0]);
      while (stack.length) {
        const [span, depth] = stack.pop();
        visible.push([span, depth]);
        const kids = children.get(span.span_id);
        if (kids && !collapsed.has(span.span_id)) {
          for (let i = kids.length - 1; i >= 0; i--) stack.push([kids[i], depth + 1]);
        }
      }
      spacer.style.height = (visible.length * ROW_H) + "px";
    }

    function row(span, depth, index) {
      const kids = children.get(span.span_id);
      const toggle = el("span", { class: "wf-toggle", text: kids ? (collapsed.has(span.span_id) ? "▸" : "▾") : "" });
      if (kids) {
        toggle.addEventListener("click", (event) => {
          event.stopPropagation();
          if (collapsed.has(span.span_id)) collapsed.delete(span.span_id); else collapsed.add(span.span_id);
          flatten();
          paint(true);
        });
      }
      const left = 100 * span.start_us / total;
      const width = Math.max(0.05, 100 * span.duration_us / total);
      const bar = el("div", {
        class: "wf-bar" + (critical.has(span.span_id) ? " crit" : "") + (span.error ? " err" : ""),
        style: "left:" + left.toFixed(3) + "%;width:" + width.toFixed(3) + "%",
        title: span.name + " " + fmtUs(span.duration_us),
      });
      // The duration label goes right of the bar, or left of it when the bar reaches the end.
      const labelPos = left + width > 85 ? "right:" + (100 - left + 0.4).toFixed(2) + "%" : "left:" + (left + width + 0.4).toFixed(2) + "%";
      const track = el("div", { class: "wf-track" }, bar,
        el("span", { class: "wf-label", style: labelPos, text: fmtUs(span.duration_us) }));
      if (span.deadline_ms !== null && span.deadline_ms !== undefined) {
        const at = 100 * (span.start_us + span.deadline_ms * 1000) / total;
        if (at <= 100) track.append(el("div", { class: "wf-deadline", style: "left:" + at.toFixed(3) + "%", title: "deadline (budget " + span.deadline_ms + " ms)" }));
      }
      const name = el("div", { class: "wf-name", style: "padding-left:" + (4 + depth * 12) + "px" }, toggle,
        el("span", { class: "wf-svc", text: span.service }), el("span", { text: span.name }),
        span.error ? el("span", { class: "badge err", text: "error" }) : null,
        span.kept ? el("span", { class: "badge kept", text: "kept: " + span.kept }) : null,
        span.links.length ? el("span", { class: "wf-link", title: "linked span (MQ)", text: "⇢" + (span.kind === "CONSUMER" ? " from producer" : " link") }) : null);
      const r = el("div", {
        class: "wf-row" + (selected === span.span_id ? " selected" : "") + (critical.has(span.span_id) ? " on-critical-path" : ""),
        style: "top:" + (index * ROW_H) + "px", "data-span": span.span_id,
      }, name, track);
      r.addEventListener("click", () => {
        selected = span.span_id;
        side.replaceChildren(...detailPanel(trace, span));
        paint(true);
      });
      return r;
    }

    let painted = [-1, -1];
    function paint(force) {
      const first = Math.max(0, Math.floor(pane.scrollTop / ROW_H) - 10);
      const last = Math.min(visible.length, Math.ceil((pane.scrollTop + pane.clientHeight) / ROW_H) + 10);
      if (!force && first === painted[0] && last === painted[1]) return;
      painted = [first, last];
      const nodes = [];
      for (let i = first; i < last; i++) nodes.push(row(visible[i][0], visible[i][1], i));
      spacer.replaceChildren(...nodes);
    }

    if (bigTrace) {
      for (const s of trace.spans) {
        let d = 0, cur = s;
        while (cur.parent_id && byId.has(cur.parent_id) && d < 64) { d++; cur = byId.get(cur.parent_id); }
        if (d >= 2 && children.has(s.span_id)) collapsed.add(s.span_id);
      }
    }
    let scheduled = false;
    pane.addEventListener("scroll", () => {
      if (scheduled) return;
      scheduled = true;
      requestAnimationFrame(() => { scheduled = false; paint(false); });
    });

    const breakdown = el("table", { id: "service-breakdown" },
      el("thead", null, el("tr", null, el("th", { text: "Service" }), el("th", { class: "num", text: "Self time" }), el("th", { class: "num", text: "Share" }), el("th", { class: "num", text: "Spans" }), el("th", { text: "" }))),
      el("tbody", null, ...trace.services.map((s) => {
        const share = 100 * s.self_us / total;
        return el("tr", null, el("td", { text: s.service }), el("td", { class: "num", text: fmtUs(s.self_us) }),
          el("td", { class: "num", text: share.toFixed(1) + " %" }), el("td", { class: "num", text: s.spans }),
          el("td", { style: "width:30%" }, el("div", { class: "bars" }, el("div", { class: "bar", style: "width:" + Math.min(100, share).toFixed(1) + "%" }))));
      })));
    const errors = trace.spans.filter((s) => s.error).length;
    const linkedFrom = trace.linked_from.length ? el("p", { id: "linked-from" }, "Linked from: ",
      ...trace.linked_from.map((l) => HEX.test(l.trace_id) ? el("a", { href: traceHref(l.trace_id), text: "trace " + l.trace_id + " " }) : null)) : null;
    const toolbar = el("p", null,
      el("button", { class: "secondary", type: "button", id: "expand-all", text: "Expand all", onclick: () => { collapsed.clear(); flatten(); paint(true); } }), " ",
      el("button", { class: "secondary", type: "button", id: "collapse-all", text: "Collapse all", onclick: () => { for (const id of children.keys()) collapsed.add(id); flatten(); paint(true); } }));
    app.replaceChildren(...[
      el("h2", { id: "trace-title", text: "Trace " + trace.trace_id }),
      el("div", { class: "summary" },
        el("span", null, "Duration ", el("b", { text: fmtUs(trace.duration_us) })),
        el("span", null, "Spans ", el("b", { id: "span-count", text: trace.span_count })),
        el("span", null, "Services ", el("b", { text: trace.services.length })),
        el("span", null, "Errors ", el("b", { class: errors ? "error-text" : "", text: errors })),
        el("span", null, "Critical path ", el("b", { text: trace.critical_path.length + " spans" }))),
      el("p", { class: "legend" }, el("span", null, el("i", { style: "background:#f08c00" }), "critical path"),
        el("span", null, el("i", { style: "background:#d92d20" }), "error"), el("span", null, el("i", { style: "background:#7a1fa2" }), "deadline")),
      linkedFrom, toolbar,
      el("div", { class: "cols" }, el("div", { class: "main" }, pane, el("h3", { text: "Time per service (self time)" }), breakdown), side),
    ].filter(Boolean));
    flatten();
    paint(true);
    window.__meshkitRendered = trace.trace_id;
  }

  // -- dependencies ----------------------------------------------------------------------

  async function depsPage(params) {
    setNav("deps");
    const windowS = params.get("window_s") || "3600";
    const data = await api("/api/dependencies?window_s=" + encodeURIComponent(windowS));
    const select = el("select", { id: "deps-window" }, ...[["300", "5 min"], ["3600", "1 hour"], ["86400", "1 day"], ["604800", "1 week"]]
      .map(([v, t]) => el("option", { value: v, text: t, selected: v === windowS })));
    select.addEventListener("change", () => { location.hash = "#/deps?window_s=" + select.value; });
    // Layered layout: a node's column is the length of the longest caller chain above it.
    const layer = new Map(data.nodes.map((n) => [n, 0]));
    for (let pass = 0; pass < data.nodes.length; pass++) {
      for (const e of data.edges) {
        if (e.caller !== e.callee && layer.get(e.callee) < layer.get(e.caller) + 1 && layer.get(e.caller) + 1 < data.nodes.length) {
          layer.set(e.callee, layer.get(e.caller) + 1);
        }
      }
    }
    const columns = new Map();
    for (const n of data.nodes) {
      const l = layer.get(n);
      if (!columns.has(l)) columns.set(l, []);
      columns.get(l).push(n);
    }
    const colW = 330, rowH = 90, boxW = 150, boxH = 34;
    const pos = new Map();
    let height = 120;
    for (const [l, names] of columns) {
      names.forEach((n, i) => pos.set(n, [30 + l * colW, 30 + i * rowH]));
      height = Math.max(height, 60 + names.length * rowH);
    }
    const width = 60 + Math.max(1, columns.size) * colW;
    const svg = svgEl("svg", { class: "graph", id: "deps-graph", width, height, viewBox: "0 0 " + width + " " + height });
    const defs = svgEl("defs");
    const marker = svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" });
    marker.append(svgEl("path", { d: "M0,0 L10,5 L0,10 z", fill: "#6b7385" }));
    defs.append(marker);
    svg.append(defs);
    for (const e of data.edges) {
      const [x1, y1] = pos.get(e.caller), [x2, y2] = pos.get(e.callee);
      const line = svgEl("line", { x1: x1 + boxW, y1: y1 + boxH / 2, x2: x2, y2: y2 + boxH / 2, stroke: e.error_rate > 0.01 ? "#d92d20" : "#6b7385", "stroke-width": 1.5, "marker-end": "url(#arrow)" });
      const mx = (x1 + boxW + x2) / 2, my = (y1 + y2) / 2 + boxH / 2;
      const label = svgEl("text", { x: mx, y: my - 18, "text-anchor": "middle" });
      label.textContent = e.calls_per_s.toFixed(2) + "/s · " + (100 * e.error_rate).toFixed(1) + "% err";
      const p99 = svgEl("text", { x: mx, y: my - 5, "text-anchor": "middle" });
      p99.textContent = "p99 " + e.p99_ms.toFixed(1) + " ms";
      svg.append(line, label, p99);
    }
    for (const n of data.nodes) {
      const [x, y] = pos.get(n);
      const g = svgEl("g", { class: "node" });
      g.append(svgEl("rect", { x, y, width: boxW, height: boxH, rx: 6, fill: "#e6ebf5", stroke: "#3b6fd8" }));
      const t = svgEl("text", { x: x + 8, y: y + 21 });
      t.textContent = n;
      g.append(t);
      svg.append(g);
    }
    const table = el("table", { id: "deps-table" },
      el("thead", null, el("tr", null, ...["Caller", "Callee", "Calls", "Calls/s", "Error rate", "p50", "p99"].map((h) => el("th", { text: h })))),
      el("tbody", null, ...data.edges.map((e) => el("tr", { class: e.errors ? "err" : "" },
        el("td", { text: e.caller }), el("td", { text: e.callee }), el("td", { class: "num", text: e.calls }),
        el("td", { class: "num", text: e.calls_per_s.toFixed(3) }), el("td", { class: "num", text: (100 * e.error_rate).toFixed(2) + " %" }),
        el("td", { class: "num", text: fmtMs(e.p50_ms) }), el("td", { class: "num", text: fmtMs(e.p99_ms) })))));
    app.replaceChildren(el("h2", { text: "Service dependencies" }), el("p", null, "Window ", select),
      data.edges.length ? svg : el("p", { class: "muted", text: "No calls in this window." }), el("h3", { text: "Edges" }), table);
  }

  // -- compare ---------------------------------------------------------------------------

  async function comparePage(a, b) {
    setNav("compare");
    const inputA = el("input", { id: "compare-a", value: a || "", size: 34, placeholder: "trace id A" });
    const inputB = el("input", { id: "compare-b", value: b || "", size: 34, placeholder: "trace id B" });
    const form = el("form", { class: "search" }, el("label", null, "Trace A", inputA), el("label", null, "Trace B", inputB), el("button", { type: "submit", text: "Compare" }));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      location.hash = "#/compare/" + encodeURIComponent(inputA.value.trim()) + "/" + encodeURIComponent(inputB.value.trim());
    });
    app.replaceChildren(el("h2", { text: "Compare two traces" }), form);
    if (!a || !b) return;
    const diff = await api("/api/compare?a=" + encodeURIComponent(a) + "&b=" + encodeURIComponent(b));
    const cell = (us, err) => el("td", { class: "num" + (err ? " error-text" : ""), text: us === null ? "—" : fmtUs(us) });
    const rows = diff.rows.map((r) => {
      let delta;
      if (r.in === "a") delta = el("td", { class: "only", text: "only in A" });
      else if (r.in === "b") delta = el("td", { class: "only", text: "only in B" });
      else delta = el("td", { class: "num " + (r.delta_us > 0 ? "delta-pos" : "delta-neg"), text: (r.delta_us > 0 ? "+" : "") + fmtUs(r.delta_us) });
      return el("tr", { class: "diff-row", "data-in": r.in },
        el("td", { style: "padding-left:" + (8 + r.depth * 14) + "px" }, el("span", { class: "wf-svc", text: r.service }), el("span", { text: r.name })),
        cell(r.a_us, r.a_error), cell(r.b_us, r.b_error), delta);
    });
    const head = (label, s) => el("span", null, label + " ", el("a", { href: traceHref(s.trace_id), text: s.root_service + " " + s.root_operation }), " " + fmtMs(s.duration_ms) + ", " + s.spans + " spans");
    app.append(el("div", { class: "summary" }, head("A:", diff.a), head("B:", diff.b)),
      el("table", { id: "compare-table" }, el("thead", null, el("tr", null, ...["Span", "A", "B", "B − A"].map((h) => el("th", { text: h })))), el("tbody", null, ...rows)));
  }

  // -- routing ---------------------------------------------------------------------------

  async function route() {
    const { parts, params } = parseHash();
    window.__meshkitRendered = null;
    try {
      if (parts[0] === "trace" && parts[1]) await tracePage(decodeURIComponent(parts[1]));
      else if (parts[0] === "deps") await depsPage(params);
      else if (parts[0] === "compare") await comparePage(parts[1] && decodeURIComponent(parts[1]), parts[2] && decodeURIComponent(parts[2]));
      else await searchPage(params);
    } catch (err) {
      showError(err);
    }
  }

  window.addEventListener("hashchange", route);
  route();
})();
