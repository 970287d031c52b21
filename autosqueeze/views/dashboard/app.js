// The autosqueeze dashboard: every view is drawn from one JSON "study view".
// Live: polls api/study every 2 s. Static report: the view is embedded, no polling.
(function () {
  "use strict";
  // the study's objectives as autosqueeze.settings.objectives describes them: name, label, scale, log
  const objective = key => view.objective_info.find(o => o.name === key);
  const label = key => objective(key).label;
  let view = window.AUTOSQUEEZE_DATA;
  let selected = null;
  let sortKey = "number", sortUp = true;

  const value = (t, key) => t[key] === null || t[key] === undefined ? null : t[key] * objective(key).scale;
  const fmt = (x, d = 4) => x === null || x === undefined ? "" : (typeof x === "number" ? +x.toFixed(d) : x);

  const budgetLine = key => objective(key).budget;  // in plotted units; null: no budget

  // titles sit on the left and plotly's toolbar (top right, on hover) keeps the buttons these
  // plots use, so the two do not overlap
  const title = text => ({ text, font: { size: 14 }, x: 0, xref: "paper", xanchor: "left" });
  const CONFIG = {
    displaylogo: false, responsive: true,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "zoomIn2d", "zoomOut2d", "autoScale2d", "resetCameraLastSave3d", "hoverClosest3d"],
  };
  // uirevision: a zoom, pan or 3D rotation the user made outlives the next poll's redraw
  const draw = (id, traces, layout) => Plotly.react(id, traces, { uirevision: "user", ...layout }, CONFIG);

  function pairs() {  // every two of the study's objectives, in order
    const names = view.objective_info.map(o => o.name);
    return names.flatMap((x, i) => names.slice(i + 1).map(y => [x, y]));
  }

  function pairCards() {  // one card per pair, made once
    const row = document.getElementById("pairs");
    const ids = pairs().map(([x, y]) => `pareto-${x}-${y}`);
    if (row.dataset.ids === ids.join(",")) return;
    row.innerHTML = ids.map(id => `<div class="card"><div class="plot" id="${id}"></div></div>`).join("");
    row.dataset.ids = ids.join(",");
  }

  function metricRange(key) {
    // open on the region that matters: ten metric budgets below the original (double-click: all)
    if (key !== "metric" || !view.reference) return undefined;
    const metrics = view.trials.filter(t => t.metric !== null).map(t => t.metric);
    const span = 10 * (view.budgets.max_metric_drop || 0.01);
    const hi = Math.max(...metrics), lo = Math.max(Math.min(...metrics), view.reference.metric - span);
    const pad = (hi - lo) * 0.05 || 0.005;
    return [lo - pad, hi + pad];
  }

  function groups() {
    // PRUNED trials missed a budget before they were timed: they have a metric and a size
    const done = view.trials.filter(t => t.state === "COMPLETE" || t.state === "PRUNED");
    const timed = t => t.state === "COMPLETE";
    return [
      { name: "baseline", rows: done.filter(t => t.baseline), marker: { symbol: "diamond", size: 11, color: "#d62728" }, text: true },
      { name: "Pareto front", rows: done.filter(t => !t.baseline && t.on_front), marker: { symbol: "star", size: 12, color: "#ff7f0e" } },
      { name: "feasible", rows: done.filter(t => !t.baseline && !t.on_front && t.feasible), marker: { size: 7, color: "#1f77b4" } },
      { name: "infeasible", rows: done.filter(t => !t.baseline && !t.feasible && timed(t)), marker: { symbol: "x", size: 6, color: "#a0a7b0" } },
      { name: "stopped (missed a budget, not timed)", rows: done.filter(t => !t.baseline && !timed(t)), marker: { symbol: "x", size: 5, color: "#d3d7dc" } },
      // ONNX Runtime's one-call quantizers (a study shipping there): what the search must beat
      { name: "ONNX Runtime one-call", rows: view.one_call || [], marker: { symbol: "square", size: 10, color: "#2ca02c" }, text: true },
    ];
  }

  function edges(key, values) {
    // where a value sits across the axis's shown span, 0 to 1 (log axes: in decades)
    const f = objective(key).log ? Math.log10 : v => v;
    const [lo, hi] = (metricRange(key) || [Math.min(...values), Math.max(...values)]).map(f);
    return v => hi > lo ? (f(v) - lo) / (hi - lo) : 0.5;
  }

  function drawPair(x, y) {
    const id = `pareto-${x}-${y}`;
    const has = t => value(t, x) !== null && value(t, y) !== null;
    const shown = groups().map(g => ({ ...g, rows: g.rows.filter(has) })).filter(g => g.rows.length);
    const rows = shown.flatMap(g => g.rows);
    const ax = edges(x, rows.map(t => value(t, x))), ay = edges(y, rows.map(t => value(t, y)));
    const inside = t => [ax(value(t, x)), ay(value(t, y))].every(f => f >= 0 && f <= 1);
    // a label leans away from the nearest edge, so the plot does not cut it ("napsack");
    // a point outside the shown range (the metric axis opens zoomed in) has none
    const place = t => (ay(value(t, y)) > 0.8 ? "bottom " : "top ") +
      (ax(value(t, x)) > 0.75 ? "left" : ax(value(t, x)) < 0.25 ? "right" : "center");
    const traces = shown.map(g => ({
      type: "scatter", mode: g.text ? "markers+text" : "markers", name: g.name,
      x: g.rows.map(t => value(t, x)), y: g.rows.map(t => value(t, y)),
      text: g.text ? g.rows.map(t => inside(t) ? t.baseline : "") : undefined, textposition: g.rows.map(place),
      customdata: g.rows.map(t => t.number), marker: g.marker,
      hovertemplate: "trial %{customdata}<br>" + label(x) + " %{x}<br>" + label(y) + " %{y}<extra></extra>",
    }));
    const shapes = [];
    const bx = budgetLine(x), by = budgetLine(y);
    if (bx !== null) shapes.push({ type: "line", xref: "x", yref: "paper", x0: bx, x1: bx, y0: 0, y1: 1, line: { dash: "dash", color: "#d62728" } });
    if (by !== null) shapes.push({ type: "line", xref: "paper", yref: "y", x0: 0, x1: 1, y0: by, y1: by, line: { dash: "dash", color: "#d62728" } });
    draw(id, traces, {
      title: title(`${label(x)} vs ${label(y)}`), margin: { t: 34, r: 10, b: 40, l: 50 },
      xaxis: { title: { text: label(x) }, type: objective(x).log ? "log" : "linear", range: metricRange(x) },
      yaxis: { title: { text: label(y) }, type: objective(y).log ? "log" : "linear", range: metricRange(y) },
      shapes, showlegend: pairs()[0].join() === [x, y].join(), legend: { orientation: "h", y: -0.25 },
    });
    const el = document.getElementById(id);
    if (!el._clickBound) { el.on("plotly_click", e => e.points[0].customdata !== null && select(e.points[0].customdata)); el._clickBound = true; }
  }

  function draw3d() {  // the study's first three objectives, where it has three
    const card = document.getElementById("pareto-3d").parentElement;
    const keys = view.objective_info.slice(0, 3).map(o => o.name);
    card.style.display = keys.length === 3 ? "block" : "none";
    if (keys.length < 3) return;
    const [kx, ky, kz] = keys;
    const has = t => keys.every(k => value(t, k) !== null);
    const traces = groups().map(g => ({ ...g, rows: g.rows.filter(has) })).map(g => ({
      type: "scatter3d", mode: "markers", name: g.name, customdata: g.rows.map(t => t.number),
      x: g.rows.map(t => value(t, kx)), y: g.rows.map(t => value(t, ky)), z: g.rows.map(t => value(t, kz)),
      // scatter3d draws only some symbols as shapes: keep to diamond and circle there
      marker: { ...g.marker, symbol: g.marker.symbol === "diamond" ? "diamond" : "circle",
                size: (g.marker.size || 7) / 2 },
      hovertemplate: "trial %{customdata}<extra></extra>",
    }));
    traces.push(...budgetPlanes(keys));
    const axis = k => ({ title: { text: label(k) }, type: objective(k).log ? "log" : "linear" });
    draw("pareto-3d", traces, {
      title: title(keys.map(label).join(", ")), margin: { t: 34, r: 0, b: 0, l: 0 }, showlegend: false,
      scene: {
        xaxis: axis(kx), yaxis: axis(ky), zaxis: axis(kz),
        // a flat box, seen from a little further: the whole of it fits the wide, short card
        aspectmode: "manual", aspectratio: { x: 1.2, y: 1.2, z: 0.7 },
        camera: { eye: { x: 1.6, y: 1.6, z: 0.9 }, center: { x: 0, y: 0, z: -0.15 } },
      },
    });
    const el = document.getElementById("pareto-3d");
    if (!el._clickBound) { el.on("plotly_click", e => e.points[0].customdata !== null && select(e.points[0].customdata)); el._clickBound = true; }
  }

  function budgetPlanes(keys) {
    // each budget as a translucent plane across the other two axes' span of the data
    const done = view.trials.filter(t => t.state === "COMPLETE" && keys.every(k => value(t, k) !== null));
    if (!done.length) return [];
    const span = k => [Math.min(...done.map(t => value(t, k))), Math.max(...done.map(t => value(t, k)))];
    return keys.filter(k => budgetLine(k) !== null).map(k => {
      const [a, b] = keys.filter(o => o !== k).map(span);
      const corners = [[a[0], b[0]], [a[1], b[0]], [a[1], b[1]], [a[0], b[1]]];
      const at = (i, key) => key === k ? budgetLine(k) : corners[i][keys.filter(o => o !== k).indexOf(key)];
      return {
        type: "mesh3d", name: `budget: ${label(k)}`, opacity: 0.18, color: "#d62728", hoverinfo: "name",
        x: [0, 1, 2, 3].map(i => at(i, keys[0])), y: [0, 1, 2, 3].map(i => at(i, keys[1])),
        z: [0, 1, 2, 3].map(i => at(i, keys[2])), i: [0, 0], j: [1, 2], k: [2, 3],
      };
    });
  }

  function drawHypervolume() {
    draw("hypervolume", [{
      type: "scatter", mode: "lines+markers", line: { shape: "hv" },
      x: view.hypervolume.map(p => p[0]), y: view.hypervolume.map(p => p[1]),
    }], {
      title: title("hypervolume of feasible trials (vs the original model)"),
      margin: { t: 34, r: 10, b: 40, l: 60 }, xaxis: { title: { text: "trial" } }, yaxis: { title: { text: "hypervolume" } },
    });
  }

  function select(number) {
    selected = number;
    const t = view.trials.find(r => r.number === number);
    if (!t) return;
    document.getElementById("selected-title").textContent = `Trial ${t.number}` + (t.baseline ? ` (${t.baseline})` : "") + ` · ${t.state}`;
    const ref = view.reference || {};
    const rows = [
      [view.metric_name, fmt(t.metric), t.metric !== null && ref.metric ? `drop ${fmt(ref.metric - t.metric)}` : ""],
      ["size", t.size_bytes !== null ? `${(t.size_bytes / 1e3).toFixed(1)} kB` : "", t.size_bytes ? `${(ref.size_bytes / t.size_bytes).toFixed(1)}x smaller` : ""],
      ["latency", t.latency_ms !== null ? `${fmt(t.latency_ms, 3)} ms` : "not timed", t.speedup ? `${t.speedup.toFixed(2)}x speed (timed beside the original)` : ""],
      ["memory", t.memory_mb != null ? `${fmt(t.memory_mb, 2)} MB` : "", t.memory_mb && ref.memory_mb ? `${(t.memory_mb / ref.memory_mb).toFixed(2)}x of original` : ""],
    ];
    const shown = ["metric", "size_bytes", "latency_ms", "memory_mb"];  // the rows above
    view.objective_info.filter(o => !shown.includes(o.name)).forEach(o =>
      rows.push([o.label, fmt(value(t, o.name)), ""]));
    rows.push(["feasible", t.feasible ? "yes" : "no", t.on_front ? "on the Pareto front" : ""]);
    if (t.fail_reason) rows.push([t.state === "PRUNED" ? "stopped" : "failed", t.fail_reason, ""]);
    const esc = x => String(x).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
    document.getElementById("selected-measurements").innerHTML =
      rows.map(r => `<tr><td class="muted">${esc(r[0])}</td><td>${esc(r[1])}</td><td class="muted">${esc(r[2])}</td></tr>`).join("");
    document.getElementById("selected-cli").textContent = view.export_command.replaceAll("{n}", t.number);
    const layers = Object.keys(t.plan), knobs = view.knobs;  // as autosqueeze.compression.techniques registers them
    const strength = (k, v) => (view.knob_strength[k] || {})[String(v)] ?? 0;
    draw("plan-heatmap", [{
      type: "heatmap", x: knobs, y: layers, colorscale: "YlOrRd", reversescale: true, zmin: 0, zmax: 1,
      z: layers.map(l => knobs.map(k => strength(k, t.plan[l][k]))),
      text: layers.map(l => knobs.map(k => String(fmt(t.plan[l][k] ?? "", 3)).replace("_weight_only", " w/o").replace("_dynamic", " dyn"))), texttemplate: "%{text}",
      hovertemplate: "%{y} %{x}: %{text}<extra></extra>", colorbar: { title: "compression" },
    }], {
      title: title(`plan of trial ${t.number} (layers x knobs)`),
      margin: { t: 34, r: 10, b: 30, l: 110 }, yaxis: { autorange: "reversed" }, xaxis: { automargin: true },  // knob names whole
    });
    document.getElementById("plan-heatmap").dataset.trial = String(t.number);
    drawTable();
  }

  function drawSensitivity() {  // layers x knob values: the metric each value lost alone
    const card = document.getElementById("sensitivity-card");
    const table = view.sensitivity;
    card.style.display = table ? "block" : "none";
    if (!table) return;
    const groups = table.groups || [...new Set(table.cells.map(c => c[0]))];
    const columns = table.columns || [...new Set(table.cells.map(c => c[1]))];
    const lost = new Map(table.cells.map(c => [c[0] + "\u0000" + c[1], c[2]]));
    const budget = view.budgets.max_metric_drop || 0.01;
    const z = groups.map(g => columns.map(c => {
      const key = g + "\u0000" + c;
      if (!lost.has(key)) return null;
      const v = lost.get(key);
      return v === null || v === "skipped" ? 3 * budget : Math.max(0, Math.min(v, 3 * budget));
    }));
    const text = groups.map(g => columns.map(c => {
      const key = g + "\u0000" + c;
      const v = lost.get(key);
      return !lost.has(key) ? "" : v === null ? "failed" : v === "skipped" ? "more (not probed: a weaker value broke it)" : fmt(v, 4);
    }));
    draw("sensitivity-heatmap", [{
      type: "heatmap", x: columns, y: groups, z, text, colorscale: "YlOrRd", reversescale: true, zmin: 0, zmax: 3 * budget,
      hovertemplate: "%{y} %{x}: lost %{text}<extra></extra>", colorbar: { title: `${view.metric_name} lost` },
    }], {
      title: title(`sensitivity: ${view.metric_name} lost when one layer takes one value (first ${table.samples} samples; colour capped at 3x the budget)`),
      margin: { t: 34, r: 10, b: 150, l: 160 }, yaxis: { autorange: "reversed" }, xaxis: { tickangle: -60, automargin: true },
    });
  }

  function drawTable() {
    const cols = [["number", "trial"], ["state", "state"], ["baseline", "baseline"], ["metric", view.metric_name],
      ["size_bytes", "size (kB)"], ["latency_ms", "latency (ms)"], ["memory_mb", "memory (MB)"], ["feasible", "feasible"], ["on_front", "front"]];
    const rows = [...view.trials].sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      const c = x === y ? 0 : (x === null ? 1 : y === null ? -1 : x < y ? -1 : 1);
      return sortUp ? c : -c;
    });
    const table = document.getElementById("trials");
    table.innerHTML = "<thead><tr>" + cols.map(([k, l]) =>
      `<th data-key="${k}">${l}${k === sortKey ? (sortUp ? " ▲" : " ▼") : ""}</th>`).join("") + "</tr></thead><tbody>" +
      [...rows, ...(view.one_call || [])].map(t => `<tr${t.number === null ? ' class="one-call"' : ` data-trial="${t.number}" class="${t.number === selected ? "chosen" : ""}"`}>` + cols.map(([k]) =>
        `<td>${k === "size_bytes" && t[k] !== null ? (t[k] / 1e3).toFixed(1) : k === "feasible" || k === "on_front" ? (t[k] ? "✓" : "") : fmt(t[k])}</td>`).join("") + "</tr>").join("") +
      "</tbody>";
    table.querySelectorAll("th").forEach(th => th.onclick = () => {
      sortUp = th.dataset.key === sortKey ? !sortUp : true; sortKey = th.dataset.key; drawTable();
    });
    table.querySelectorAll("tbody tr[data-trial]").forEach(tr => tr.onclick = () => select(Number(tr.dataset.trial)));
  }

  function render() {
    document.getElementById("study-name").textContent = view.name;
    const message = document.getElementById("message");
    message.textContent = view.message || "";
    message.style.display = view.message ? "block" : "none";
    if (!view.trials) { document.getElementById("status").textContent = `storage ${view.storage}`; return; }
    const done = view.trials.filter(t => t.state === "COMPLETE").length;
    const feasible = view.trials.filter(t => t.feasible).length;
    document.getElementById("status").textContent =
      `${view.trials.length} trials · ${done} complete · ${feasible} feasible · ${view.front.length} on the front · ${window.AUTOSQUEEZE_LIVE ? "live, updated " + view.updated : "report of " + view.updated}`;
    pairCards(); pairs().forEach(([x, y]) => drawPair(x, y));
    draw3d(); drawHypervolume(); drawSensitivity();
    if (selected === null && view.front.length) selected = view.front[0];
    if (selected !== null) select(selected); else drawTable();
  }

  async function poll() {
    try {
      const response = await fetch("api/study" + location.search, { cache: "no-store" });
      view = await response.json();
      render();
    } catch (err) {
      document.getElementById("status").textContent = `cannot reach the dashboard server (${err})`;
    }
    setTimeout(poll, 2000);
  }

  if (window.AUTOSQUEEZE_LIVE) poll(); else render();
})();
