// The live job page (event stream: one progress bar, curves, log; cancel; results) and compare.
"use strict";
(function () {
  const { h, api, badge, problemBox, teamLabel, fmtNum, fmtBytes, fmtTime, clock, headers } = App;
  const TERMINAL = ["SUCCEEDED", "FAILED", "CANCELLED"];
  window.kdqEvents = [];  // {at, shown} of each event drawn (ms since the epoch): bench/portal.py reads them

  // Server-Sent Events over fetch (EventSource cannot send the Authorization header), resumed
  // with Last-Event-ID when the connection drops. onEvent(kind, data); resolves when the job ends.
  async function follow(jobId, onEvent, signal) {
    let last = null;
    for (let drops = 0; drops < 30 && !signal.aborted; drops++) {
      try {
        const r = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers(last ? { "Last-Event-ID": last } : {}), signal });
        if (r.status === 204) return;
        if (!r.ok) throw new Error("HTTP " + r.status);
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "", kind = "message", data = null;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let i;
          while ((i = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, i).replace(/\r$/, "");
            buf = buf.slice(i + 1);
            if (line === "") {
              if (data) { drops = 0; if (onEvent(kind, data) === "end") return; }
              kind = "message"; data = null;
            } else if (line.startsWith("id: ")) last = line.slice(4);
            else if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data = JSON.parse(line.slice(6));
          }
        }
      } catch (e) {
        if (signal.aborted) return;
      }
      await new Promise((r) => setTimeout(r, Math.min(500 * (drops + 1), 5000)));
    }
  }

  function verdictBox(summary) {
    const v = summary && summary.verdict;
    if (!v) return null;
    const label = typeof v === "string" ? v : v.label || v.verdict || "";
    const reasons = (typeof v === "object" && v.reasons) || [];
    return h("div", { class: "verdict " + label, id: "verdict" }, h("strong", {}, "Verdict: "), badge(label),
      reasons.length ? h("ul", {}, reasons.map((r) => h("li", {}, typeof r === "string" ? r : r.detail || r.message || r.code || JSON.stringify(r)))) : null);
  }

  function metricsTable(summary) {
    const models = (summary && summary.models) || {};
    const metric = summary && summary.metric;
    if (!Object.keys(models).length) return null;
    return h("div", { class: "scroll" }, h("table", { id: "metrics" }, h("caption", { class: "muted" }, summary.final ? `delivered: ${summary.final}` : ""),
      h("thead", {}, h("tr", {}, ["Model", metric || "metric", "Size", "Parameters"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, Object.entries(models).map(([name, m]) => h("tr", {}, h("th", { scope: "row" }, name), h("td", { class: "num" }, fmtNum(m[metric])),
        h("td", { class: "num" }, fmtBytes(m.size_bytes)), h("td", { class: "num" }, fmtNum(m.parameters)))))));
  }

  async function download(jobId, art, button) {
    button.disabled = true;
    try {
      const r = await fetch(art.url, { headers: headers() });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const blob = await r.blob();
      const a = h("a", { href: URL.createObjectURL(blob), download: art.name, hidden: true });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    } catch (e) { button.after(h("span", { class: "problem", role: "alert" }, `download failed: ${e.message}`)); }
    button.disabled = false;
  }

  async function results(box, job) {
    box.replaceChildren();
    if (job.state !== "SUCCEEDED") {
      const e = job.error || {};
      box.append(h("div", { class: "problem", role: "alert", id: "job-problem" }, h("strong", {}, job.state === "CANCELLED" ? "Cancelled" : e.title || "Failed"),
        h("p", {}, e.detail || (job.state === "CANCELLED" ? "The job was cancelled before it finished." : "No reason was given.")),
        (e.errors || []).length ? h("ul", {}, e.errors.map((x) => h("li", {}, x.pointer || "", " ", x.detail))) : null));
      return;
    }
    box.append(verdictBox(job.summary) || "", h("h2", {}, "Metrics"), metricsTable(job.summary) || h("p", { class: "muted" }, "No summary."));
    const [report, arts] = await Promise.all([api(`/v1/jobs/${job.id}/metrics`).catch(() => null), api(`/v1/jobs/${job.id}/artifacts`)]);
    const reportHtml = arts.items.find((a) => a.kind === "report_html");
    // (the report is a self-contained HTML file with inline styles and plots: a page opened from this one
    // would inherit its strict Content-Security-Policy, so it is downloaded and opened from disk)
    const reportButton = reportHtml ? h("button", { type: "button", class: "secondary", id: "report" }, "Download the full report (HTML)") : null;
    if (reportButton) reportButton.addEventListener("click", () => download(job.id, reportHtml, reportButton));
    box.append(h("h2", {}, "Plots"), reportButton ? h("p", {}, reportButton) : null);
    box.append(h("div", { class: "charts" },
      Charts.line(Charts.curves(report, lossy), { title: "Training loss", x: "step" }), Charts.line(Charts.curves(report, metric), { title: "Eval metric", x: "step" })));
    box.append(h("h2", {}, "Downloads"), h("div", { class: "scroll" }, h("table", { id: "artifacts" },
      h("thead", {}, h("tr", {}, ["File", "Kind", "Size", "sha256", ""].map((c, i) => h("th", { scope: "col", class: i === 3 ? "optional" : null }, c)))),
      h("tbody", {}, arts.items.map((a) => {
        const b = h("button", { type: "button", class: "secondary", "data-artifact": a.name, "aria-label": "download " + a.name }, "Download");
        b.addEventListener("click", () => download(job.id, a, b));
        return h("tr", {}, h("td", {}, a.name), h("td", {}, a.kind), h("td", { class: "num" }, fmtBytes(a.size_bytes)), h("td", { class: "mono optional" }, a.sha256), h("td", {}, b));
      })))));
  }

  const keysOf = (rows) => [...new Set(rows.flatMap((r) => Object.keys(r).filter((k) => typeof r[k] === "number")))];
  const lossy = (rows) => keysOf(rows).find((k) => k.includes("loss"));
  const metric = (rows) => keysOf(rows).find((k) => !k.includes("loss") && !["step", "epoch", "lr", "time_s", "elapsed_s"].includes(k));

  App.routes.job = async function (main, jobId) {
    let job = await api("/v1/jobs/" + jobId);
    const ctl = new AbortController();
    App.leave = () => ctl.abort();
    const state = h("span", { id: "job-state" }, badge(job.state));
    const bar = h("progress", { id: "job-progress", max: 1, value: 0, "aria-labelledby": "job-progress-text" });
    const text = h("span", { id: "job-progress-text" }, "waiting for the worker…");
    const log = h("ol", { class: "log", role: "log", "aria-label": "job log", id: "job-log" });
    const loss = { name: "loss", points: [] }, metric = { name: "metric", points: [] };
    const lossChart = Charts.line([loss], { title: "Loss (live)", x: "report" });
    const metricChart = Charts.line([metric], { title: "Metric (live)", x: "report" });
    const resultBox = h("div", { id: "results", "aria-live": "polite" });
    const cancel = h("button", { type: "button", class: "danger", id: "cancel", hidden: TERMINAL.includes(job.state) || null, onclick: async () => {
      cancel.disabled = true;
      try { job = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); state.replaceChildren(badge(job.state)); } catch (e) { resultBox.replaceChildren(problemBox(e)); cancel.disabled = false; }
    } }, "Cancel job");
    let overall = 0, reports = 0;
    const started = job.started_at ? Date.parse(job.started_at) : null;
    let t0 = started || Date.now();
    const render = (stage) => {
      const elapsed = (Date.now() - t0) / 1000;
      const eta = overall > 0.02 ? (elapsed * (1 - overall)) / overall : null;
      bar.value = overall;
      text.textContent = `${stage || "…"} · ${Math.round(overall * 100)}% · elapsed ${clock(elapsed)} · ETA ${clock(eta)}`;
    };
    main.append(
      h("div", { class: "row" }, h("h1", {}, job.name || job.id), state, teamLabel(job.team_id)),
      h("p", { class: "muted mono" }, `${job.id} · teacher ${job.teacher_model_id} · dataset ${job.dataset_id}`, (job.tags || []).length ? ` · tags ${job.tags.join(", ")}` : ""),
      h("div", { class: "row" }, cancel, h("a", { class: "button secondary", href: "#/new?from=" + jobId }, "Re-run with changes")),
      h("div", { class: "bar" }, bar, text), h("div", { class: "charts" }, lossChart, metricChart), h("h2", {}, "Log"), log, resultBox);
    const onEvent = (kind, data) => {
      const at = data.at ? Date.parse(data.at) : null;
      if (kind === "progress") {
        reports++;
        if (typeof data.overall === "number") overall = Math.max(overall, data.overall);
        if (typeof data.loss === "number") { loss.points.push([reports, data.loss]); lossChart.update(); }
        if (typeof data.metric === "number") { metric.points.push([reports, data.metric]); metricChart.update(); }
        render(data.stage);
      } else if (kind === "log") {
        log.append(h("li", {}, `[${data.stage || "-"}] ${data.message}`));
        log.scrollTop = log.scrollHeight;
      } else if (kind === "state") {
        state.replaceChildren(badge(data.state));
        if (data.state === "RUNNING" && data.at) t0 = Date.parse(data.at);
        if (TERMINAL.includes(data.state)) { window.kdqEvents.push({ at, shown: Date.now() }); return "end"; }
      }
      if (at) window.kdqEvents.push({ at, shown: Date.now() });  // (after the page has drawn it)
    };
    if (!TERMINAL.includes(job.state)) render(job.stage);
    await follow(jobId, onEvent, ctl.signal);
    if (ctl.signal.aborted) return;
    job = await api("/v1/jobs/" + jobId);
    cancel.hidden = true;
    state.replaceChildren(badge(job.state));
    if (job.state === "SUCCEEDED") { overall = 1; render("done"); }
    if (job.started_at && job.finished_at) text.textContent = `${job.state.toLowerCase()} in ${clock((Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000)}`;
    await results(resultBox, job);
  };

  // --- compare 2–4 jobs -------------------------------------------------------------------------
  App.routes.compare = async function (main, _arg, query) {
    const ids = (query.get("ids") || "").split(",").filter(Boolean).slice(0, 4);
    main.append(h("h1", {}, "Compare jobs"));
    if (ids.length < 2) { main.append(h("p", {}, "Pick 2 to 4 jobs in the ", h("a", { href: "#/jobs" }, "jobs list"), ".")); return; }
    const jobs = await Promise.all(ids.map((id) => api("/v1/jobs/" + id)));
    const reports = await Promise.all(jobs.map((j) => (j.state === "SUCCEEDED" ? api(`/v1/jobs/${j.id}/metrics`).catch(() => null) : null)));
    const finalRow = (r) => { const rows = (r && r.models) || []; const fin = r && r.summary && r.summary.final; return rows.find((x) => x.name === fin) || rows[rows.length - 1]; };
    const p50 = (row) => { const b = ((row && row.latency && row.latency.batches) || []).slice().sort((x, y) => x.batch_size - y.batch_size)[0]; return b ? b.p50_ms : null; };
    const lines = [
      ["State", (j) => badge(j.state)],
      ["Verdict", (j) => { const v = j.summary && j.summary.verdict; return v ? badge(typeof v === "string" ? v : v.label || v.verdict) : "–"; }],
      ["Model delivered", (j, r) => (finalRow(r) || {}).name || "–"],
      ["Metric", (j, r) => { const m = j.summary && j.summary.metric; const row = finalRow(r); return row && m ? `${m} ${fmtNum((row.metric || {})[m])}` : "–"; }],
      ["Size", (j, r) => fmtBytes((finalRow(r) || {}).size_bytes)],
      ["Latency p50 (ms)", (j, r) => fmtNum(p50(finalRow(r)))],
      ["Parameters", (j, r) => fmtNum((finalRow(r) || {}).parameters)],
      ["Created", (j) => fmtTime(j.created_at)],
    ];
    main.append(h("div", { class: "scroll" }, h("table", { id: "compare" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, ""), jobs.map((j) => h("th", { scope: "col" }, h("a", { href: "#/jobs/" + j.id }, j.name || j.id), " ", teamLabel(j.team_id))))),
      h("tbody", {}, lines.map(([label, get]) => h("tr", {}, h("th", { scope: "row" }, label), jobs.map((j, i) => h("td", {}, get(j, reports[i])))))))));
    const pick = metric;
    const overlay = (fn) => jobs.flatMap((j, i) => Charts.curves(reports[i], fn).slice(0, 1).map((s) => ({ ...s, name: `${j.name || j.id}: ${s.name}` })));
    main.append(h("h2", {}, "Plots"), h("div", { class: "charts" },
      Charts.line(overlay(lossy), { title: "Training loss, every job", x: "step" }), Charts.line(overlay(pick), { title: "Eval metric, every job", x: "step" })));
  };
})();
