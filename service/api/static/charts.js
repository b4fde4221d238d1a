// Line charts drawn as SVG: no library, no CDN. Charts.line(series, {title, x, y}) -> <figure>.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490"];
  const W = 600, H = 220, L = 52, R = 12, T = 12, B = 28;

  function el(tag, attrs) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function fmt(v) {
    if (!isFinite(v)) return "";
    const a = Math.abs(v);
    return a !== 0 && (a < 0.001 || a >= 100000) ? v.toExponential(1) : (+v.toPrecision(3)).toString();
  }

  // series: [{name, points: [[x, y], ...]}]
  function draw(svg, series, opts) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[0]) && isFinite(p[1]));
    if (!pts.length) {
      const t = el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
      t.textContent = "no data yet";
      svg.appendChild(t);
      return;
    }
    let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    svg.appendChild(el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    svg.appendChild(el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
    for (const [v, y] of [[y1, T + 4], [(y0 + y1) / 2, (T + H - B) / 2], [y0, H - B]]) {
      const t = el("text", { x: L - 4, y: y + 4, "text-anchor": "end" });
      t.textContent = fmt(v);
      svg.appendChild(t);
    }
    for (const [v, anchor] of [[x0, "start"], [x1, "end"]]) {
      const t = el("text", { x: sx(v), y: H - 8, "text-anchor": anchor });
      t.textContent = fmt(v);
      svg.appendChild(t);
    }
    if (opts.x) {
      const t = el("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" });
      t.textContent = opts.x;
      svg.appendChild(t);
    }
    series.forEach((s, i) => {
      const ok = s.points.filter((p) => isFinite(p[0]) && isFinite(p[1]));
      if (!ok.length) return;
      const d = ok.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
      svg.appendChild(el("path", { d, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2 }));
      if (ok.length === 1) svg.appendChild(el("circle", { cx: sx(ok[0][0]), cy: sy(ok[0][1]), r: 3, fill: COLORS[i % COLORS.length] }));
    });
  }

  function line(series, opts) {
    opts = opts || {};
    const fig = document.createElement("figure");
    const cap = document.createElement("figcaption");
    cap.textContent = opts.title || "";
    const svg = el("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
    const legend = document.createElement("div");
    legend.className = "legend";
    fig.append(cap, svg, legend);
    fig.update = function (next) {
      series = next || series;
      draw(svg, series, opts);
      legend.replaceChildren(...series.map((s, i) => {
        const span = document.createElement("span");
        span.style.setProperty("--c", COLORS[i % COLORS.length]);
        span.textContent = s.name;
        return span;
      }));
    };
    fig.update(series);
    return fig;
  }

  // A report's curve ({run: records | columns}) as [{name, points}] for one key.
  function curves(report, pick) {
    const out = [];
    for (const [run, hist] of Object.entries((report && report.curves) || {})) {
      let rows = hist;
      if (hist && !Array.isArray(hist)) {
        const n = (hist.step || []).length;
        rows = Array.from({ length: n }, (_, i) => Object.fromEntries(Object.entries(hist).map(([k, v]) => [k, v[i]])));
      }
      if (!Array.isArray(rows)) continue;
      const key = pick(rows);
      if (!key) continue;
      const points = rows.filter((r) => typeof r[key] === "number").map((r, i) => [r.step ?? i, r[key]]);
      if (points.length) out.push({ name: `${run} ${key}`, points });
    }
    return out;
  }

  window.Charts = { line, curves };
})();
