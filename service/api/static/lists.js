// The jobs list (filters, paging, pick jobs to compare) and the new-job page (form or JSON).
"use strict";
(function () {
  const { h, api, badge, problemBox, teamLabel, fmtTime, idem } = App;
  const STATES = ["", "QUEUED", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"];

  function overallOf(j) {
    const o = j.progress && j.progress.overall;
    return j.state === "RUNNING" && typeof o === "number" ? ` ${Math.round(o * 100)}%` : "";
  }

  App.routes.jobs = async function (main, _arg, query) {
    const f = {
      state: h("select", { id: "flt-state" }, STATES.map((s) => h("option", { value: s }, s || "any"))),
      name: h("input", { id: "flt-name", type: "search" }),
      tag: h("input", { id: "flt-tag", type: "search" }),
      teacher: h("input", { id: "flt-teacher", type: "search", placeholder: "mdl_…" }),
      after: h("input", { id: "flt-after", type: "datetime-local" }),
      before: h("input", { id: "flt-before", type: "datetime-local" }),
    };
    for (const [k, input] of Object.entries(f)) if (query.get(k)) input.value = query.get(k);
    const tokens = [null];
    let page = 0;
    const table = h("div", { class: "scroll", "aria-live": "polite" });
    const prev = h("button", { type: "button", class: "secondary", onclick: () => { page--; load(); } }, "Previous");
    const next = h("button", { type: "button", class: "secondary", onclick: () => { page++; load(); } }, "Next");
    const picked = new Set();
    const compare = h("button", { type: "button", disabled: true, onclick: () => { location.hash = "#/compare?ids=" + [...picked].join(","); } }, "Compare selected");
    const syncCompare = () => { compare.disabled = picked.size < 2 || picked.size > 4; compare.textContent = `Compare selected (${picked.size})`; };
    let seq = 0;
    async function load() {
      const mine = ++seq;  // (an older answer arriving late must not replace a newer one)
      const q = new URLSearchParams({ page_size: "20" });
      if (f.state.value) q.append("state", f.state.value);
      if (f.name.value.trim()) q.set("name", f.name.value.trim());
      for (const t of f.tag.value.split(",").map((x) => x.trim()).filter(Boolean)) q.append("tag", t);
      if (f.teacher.value.trim()) q.set("teacher", f.teacher.value.trim());
      if (f.after.value) q.set("created_after", new Date(f.after.value).toISOString());
      if (f.before.value) q.set("created_before", new Date(f.before.value).toISOString());
      if (tokens[page]) q.set("page_token", tokens[page]);
      let body;
      try { body = await api("/v1/jobs?" + q); } catch (e) { if (mine === seq) table.replaceChildren(problemBox(e)); return; }
      if (mine !== seq) return;
      tokens[page + 1] = body.next_page_token;
      prev.disabled = page === 0;
      next.disabled = !body.next_page_token;
      table.replaceChildren(body.items.length ? h("table", {},
        h("thead", {}, h("tr", {}, ["", "Job", "State", "Tags", "Teacher", "Created"].map((c, i) => h("th", { scope: "col", class: i >= 4 ? "optional" : null }, c)))),
        h("tbody", {}, body.items.map((j) => h("tr", {},
          h("td", {}, h("input", { type: "checkbox", id: "pick-" + j.id, "aria-label": "compare " + (j.name || j.id), checked: picked.has(j.id) || null,
            onchange: (ev) => { if (ev.target.checked) picked.add(j.id); else picked.delete(j.id); syncCompare(); } })),
          h("td", {}, h("a", { href: "#/jobs/" + j.id }, j.name || j.id), " ", teamLabel(j.team_id), j.name ? h("div", { class: "help mono" }, j.id) : null),
          h("td", {}, badge(j.state), overallOf(j)), h("td", {}, (j.tags || []).join(", ")),
          h("td", { class: "mono optional" }, j.teacher_model_id), h("td", { class: "optional" }, fmtTime(j.created_at))))))
        : h("p", { class: "muted" }, "No jobs match."));
    }
    const form = h("form", { class: "stack", role: "search", "aria-label": "Filter jobs", onsubmit: (ev) => { ev.preventDefault(); tokens.length = 1; page = 0; load(); } },
      h("div", { class: "row" },
        h("div", { class: "field" }, h("label", { for: "flt-state" }, "State"), f.state),
        h("div", { class: "field" }, h("label", { for: "flt-name" }, "Name starts with"), f.name),
        h("div", { class: "field" }, h("label", { for: "flt-tag" }, "Tags"), f.tag),
        h("div", { class: "field" }, h("label", { for: "flt-teacher" }, "Teacher"), f.teacher),
        h("div", { class: "field" }, h("label", { for: "flt-after" }, "Created after"), f.after),
        h("div", { class: "field" }, h("label", { for: "flt-before" }, "Created before"), f.before),
        h("button", { type: "submit" }, "Filter")));
    main.append(h("div", { class: "row" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/new" }, "New job")), form, table,
      h("div", { class: "row" }, prev, next, compare));
    syncCompare();
    await load();
  };

  // --- new job --------------------------------------------------------------------------------
  App.routes.new = async function (main, _arg, query) {
    const all = await Forms.schemas();
    const job = Forms.resolve(all.JobCreate, all);
    let initial = {};
    const from = query.get("from");
    if (from) {
      const old = await api("/v1/jobs/" + from);
      const spec = old.spec && typeof old.spec === "object" ? old.spec : Object.fromEntries(Object.keys(job.properties).filter((k) => k in old && !Forms.OWN.has(k)).map((k) => [k, old[k]]));
      initial = { ...spec, teacher_model_id: old.teacher_model_id, dataset_id: old.dataset_id, eval_dataset_id: old.eval_dataset_id || undefined,
        name: old.name ? old.name + " (re-run)" : undefined, tags: old.tags || [] };
    }
    const [models, datasets] = await Promise.all([api("/v1/models?state=ready&page_size=100"), api("/v1/datasets?state=ready&page_size=100")]);
    const pick = (id, label, items, value, optional) => h("div", { class: "field" }, h("label", { for: id }, label),
      h("select", { id, required: !optional || null }, optional ? h("option", { value: "" }, "(a hold-out of the dataset)") : null,
        items.map((u) => h("option", { value: u.id, selected: u.id === value || null }, `${u.name} (${u.id})`))));
    const form = new Forms.JobForm(all, initial);
    const targetsMode = !!initial.targets;
    const modeArch = h("input", { type: "radio", name: "mode", id: "mode-arch", value: "arch", checked: !targetsMode || null });
    const modeTargets = h("input", { type: "radio", name: "mode", id: "mode-targets", value: "targets", checked: targetsMode || null });
    const studentPart = h("div", {});
    const targetsPart = h("div", {});
    form.fill(studentPart, { properties: Object.fromEntries(Object.entries(job.properties).filter(([k]) => !Forms.OWN.has(k))) }, []);
    targetsPart.append(form.field("targets", job.properties.targets, ["targets"]));
    const sync = () => { studentPart.querySelector("#f-student")?.toggleAttribute("hidden", modeTargets.checked); targetsPart.hidden = !modeTargets.checked; };
    modeArch.addEventListener("change", sync); modeTargets.addEventListener("change", sync);
    const name = h("input", { id: "job-name", type: "text", value: initial.name || "" });
    const tags = h("input", { id: "job-tags", type: "text", value: (initial.tags || []).join(", ") });
    const json = h("textarea", { id: "job-json", "aria-describedby": "job-json-help" });
    const out = h("div", { "aria-live": "polite" });
    const formPane = h("div", { id: "pane-form" });
    const jsonPane = h("div", { id: "pane-json", hidden: true },
      h("div", { class: "field", style: "max-width:none" }, h("label", { for: "job-json" }, "Job as JSON"), json,
        h("span", { class: "help", id: "job-json-help" }, "The body of POST /v1/jobs: teacher_model_id, dataset_id and the spec fields.")));
    const collect = () => {
      const body = form.collect(formPane, modeTargets.checked ? ["student"] : ["targets"]);
      body.teacher_model_id = document.getElementById("f-teacher").value;
      body.dataset_id = document.getElementById("f-dataset").value;
      const ev = document.getElementById("f-eval").value;
      if (ev) body.eval_dataset_id = ev;
      if (name.value.trim()) body.name = name.value.trim();
      const t = tags.value.split(",").map((x) => x.trim()).filter(Boolean);
      if (t.length) body.tags = t;
      if (modeTargets.checked && !body.targets) body.targets = {};
      return body;
    };
    const tabForm = h("button", { type: "button", role: "tab", "aria-selected": "true", "aria-controls": "pane-form" }, "Form");
    const tabJson = h("button", { type: "button", role: "tab", "aria-selected": "false", "aria-controls": "pane-json" }, "Paste JSON");
    const show = (asJson) => {
      if (asJson && !jsonPane.hidden) return;
      if (asJson) { try { json.value = JSON.stringify(collect(), null, 2); } catch (e) { /* keep the text */ } }
      formPane.hidden = asJson; jsonPane.hidden = !asJson;
      tabForm.setAttribute("aria-selected", String(!asJson)); tabJson.setAttribute("aria-selected", String(asJson));
    };
    tabForm.addEventListener("click", () => show(false)); tabJson.addEventListener("click", () => show(true));
    formPane.append(
      h("fieldset", {}, h("legend", {}, "Inputs"), pick("f-teacher", "Teacher model", models.items, initial.teacher_model_id),
        pick("f-dataset", "Dataset", datasets.items, initial.dataset_id), pick("f-eval", "Evaluation set", datasets.items, initial.eval_dataset_id, true),
        h("div", { class: "field" }, h("label", { for: "job-name" }, "Name"), name),
        h("div", { class: "field" }, h("label", { for: "job-tags" }, "Tags"), tags)),
      h("fieldset", {}, h("legend", {}, "How to choose the student"),
        h("div", { class: "field check" }, modeArch, h("label", { for: "mode-arch" }, "Describe the student (architecture, distillation, quantization)")),
        h("div", { class: "field check" }, modeTargets, h("label", { for: "mode-targets" }, "Give targets and let the search find the student"))),
      targetsPart, studentPart);
    const submit = async (ev) => {
      ev.preventDefault();
      let body;
      try { body = jsonPane.hidden ? collect() : JSON.parse(json.value); } catch (e) { out.replaceChildren(problemBox(new App.Problem(0, { title: "Not JSON", detail: e.message }))); return; }
      try {
        const created = await api("/v1/jobs", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json", "Idempotency-Key": idem() } });
        location.hash = "#/jobs/" + created.id;
      } catch (e) { form.mark(e.body && e.body.errors); out.replaceChildren(problemBox(e)); out.scrollIntoView({ block: "nearest" }); }
    };
    main.append(h("h1", {}, from ? `Re-run ${from} with changes` : "New job"),
      h("form", { class: "stack", onsubmit: submit, "aria-label": "New job" }, h("div", { class: "tabs", role: "tablist" }, tabForm, tabJson), formPane, jsonPane,
        h("button", { type: "submit", id: "submit-job" }, "Submit job"), out));
    sync();
    if (!models.items.length || !datasets.items.length) out.append(h("p", { class: "notice" }, "Upload a teacher and a dataset first: ", h("a", { href: "#/uploads" }, "Uploads")));
  };
})();
