// The kdq portal: sign in, uploads, new job, jobs list. The job page and compare are in job.js.
"use strict";
const KEY = "kdq.key";
const App = { me: null, routes: {} };

function h(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "for") node.htmlFor = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined && kid !== false) node.append(kid instanceof Node ? kid : String(kid));
  return node;
}
const fmtNum = (v) => (typeof v === "number" ? (Math.abs(v) >= 1000 ? v.toLocaleString() : +v.toPrecision(4)) : "–");
function fmtBytes(n) {
  if (typeof n !== "number") return "–";
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (n >= 1024 && i < 3) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
const fmtTime = (s) => (s ? new Date(s).toLocaleString() : "–");
function clock(sec) {
  if (sec === null || sec === undefined || !isFinite(sec) || sec < 0) return "–";
  sec = Math.round(sec);
  const m = Math.floor(sec / 60), s = sec % 60;
  return m >= 60 ? `${Math.floor(m / 60)}:${String(m % 60).padStart(2, "0")}:${String(s).padStart(2, "0")}` : `${m}:${String(s).padStart(2, "0")}`;
}
function headers(extra) {
  const key = sessionStorage.getItem(KEY);
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}
class Problem extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || "HTTP " + status);
    this.status = status;
    this.body = body || {};
  }
}
async function api(path, opts) {
  opts = opts || {};
  let r;
  try {
    r = await fetch(path, { ...opts, headers: headers(opts.headers) });
  } catch (e) {
    throw new Problem(0, { title: "Unreachable", detail: "the service cannot be reached: " + e.message });
  }
  if (r.status === 401 && !opts.signin) { signOut("Your key is not accepted any more; sign in again."); throw new Problem(401, {}); }
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    throw new Problem(r.status, body);
  }
  return r.status === 204 ? null : r.json();
}
function problemBox(err) {
  const b = err.body || {};
  return h("div", { class: "problem", role: "alert" },
    h("strong", {}, b.title || "Error", b.status ? ` (${b.status})` : ""), h("p", {}, b.detail || err.message),
    (b.errors || []).length ? h("ul", {}, b.errors.map((e) => h("li", {}, h("code", {}, e.pointer || e.parameter || ""), " ", e.detail))) : null);
}
function badge(text) { return h("span", { class: "badge " + text }, text); }
function teamLabel(teamId) { return App.me && App.me.scope === "admin" && teamId ? h("span", { class: "team", title: "team" }, teamId) : null; }
function idem() { return Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join(""); }

// --- sign in ---------------------------------------------------------------------------------
async function whoami() {
  try { App.me = await api("/v1/me", { signin: true }); } catch (e) { App.me = null; }
  const who = document.getElementById("who");
  document.getElementById("nav").hidden = !App.me;
  if (!App.me) { who.replaceChildren(); return false; }
  const scope = App.me.scope === "admin" ? " (admin: sees every team)" : "";
  who.replaceChildren(h("span", {}, "Team ", h("strong", {}, App.me.team_id), scope),
    App.me.auth === "keys" ? h("button", { class: "secondary", type: "button", onclick: () => signOut() }, "Sign out") : null);
  return true;
}
function signOut(message) {
  sessionStorage.removeItem(KEY);
  App.me = null;
  location.hash = "#/signin";
  if (message) App.signinMessage = message;
  whoami();
}
App.routes.signin = function (main) {
  const input = h("input", { id: "key", type: "password", autocomplete: "off", required: true, "aria-describedby": "key-help" });
  const out = h("div", { "aria-live": "polite" }, App.signinMessage ? h("p", { class: "notice" }, App.signinMessage) : null);
  App.signinMessage = null;
  const form = h("form", { class: "stack", onsubmit: async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    if (await whoami()) location.hash = "#/jobs";
    else { sessionStorage.removeItem(KEY); out.replaceChildren(h("p", { class: "problem", role: "alert" }, "This key is not accepted: check it (kdq_…) and try again.")); }
  } },
  h("div", { class: "field" }, h("label", { for: "key" }, "Team API key"), input,
    h("span", { class: "help", id: "key-help" }, "Kept in this tab only (sessionStorage) and sent as Authorization: Bearer; never in a URL.")),
  h("button", { type: "submit" }, "Sign in"), out);
  main.append(h("h1", {}, "Sign in"), form);
  input.focus();
};

// --- uploads ---------------------------------------------------------------------------------
// A dataset's other options (images, text, audio, forecasting, policies), from the published DataSpec
// schema: every field with its help, folded; only the ones changed from their defaults are sent.
function dataOptions(all) {
  const spec = Forms.resolve(all.DataSpec, all);
  const shown = Object.fromEntries(Object.entries(spec.properties || {}).filter(([k]) => !["format", "label_column"].includes(k)));
  const form = new Forms.JobForm(all);
  const box = h("details", { id: "d-options" }, h("summary", {}, "More options: images, text, audio, forecasting, policies"));
  form.fill(box, { properties: shown }, ["data"], {});
  const values = () => Object.entries(form.collect(box, []).data || {}).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)]);
  return { box, values };
}

function uploadForm(kind, formats, onDone, all) {
  const p = kind === "model" ? "m" : "d";
  const options = kind === "dataset" && all ? dataOptions(all) : null;
  const file = h("input", { id: p + "-file", type: "file", required: true });
  const fmt = h("select", { id: p + "-format" }, formats.map((f) => h("option", { value: f }, f)));
  const name = h("input", { id: p + "-name", type: "text" });
  const tags = h("input", { id: p + "-tags", type: "text", "aria-describedby": p + "-tags-help" });
  const labelCol = kind === "dataset" ? h("input", { id: p + "-label", type: "text" }) : null;
  const bar = h("progress", { id: p + "-progress", max: 1, value: 0, hidden: true, "aria-label": `upload of the ${kind}` });
  const status = h("div", { "aria-live": "polite", id: p + "-status" });
  const form = h("form", { class: "stack", "aria-labelledby": p + "-title", onsubmit: (ev) => {
    ev.preventDefault();
    const data = new FormData();
    data.append("file", file.files[0]);
    data.append("format", fmt.value);
    if (name.value.trim()) data.append("name", name.value.trim());
    if (tags.value.trim()) data.append("tags", tags.value.trim());
    if (labelCol && labelCol.value.trim()) data.append("label_column", labelCol.value.trim());
    if (options) for (const [k, v] of options.values()) data.append(k, v);
    const xhr = new XMLHttpRequest();  // (fetch reports no upload progress)
    xhr.open("POST", `/v1/${kind}s`);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    bar.hidden = false; bar.value = 0;
    status.textContent = "Uploading…";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
    xhr.onerror = () => status.replaceChildren(problemBox(new Problem(0, { title: "Upload failed", detail: "the connection broke" })));
    xhr.onload = async () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status !== 201) { status.replaceChildren(problemBox(new Problem(xhr.status, body))); return; }
      bar.value = 1;
      status.replaceChildren(h("p", {}, `Uploaded as ${body.id}; validating…`));
      let up = body;
      while (up.state === "validating") { await new Promise((r) => setTimeout(r, 400)); up = await api(`/v1/${kind}s/${body.id}`); }
      status.replaceChildren(up.state === "ready"
        ? h("div", { class: "notice", "data-state": "ready" }, h("strong", {}, `${up.name} is ready `), badge("ready"), h("p", { class: "mono" }, up.id),
            h("p", {}, Object.entries(up.summary || {}).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ")))
        : h("div", { class: "problem", role: "alert", "data-state": "invalid" }, h("strong", {}, `${up.name} is invalid: `), (up.error && up.error.detail) || "no reason given"));
      onDone && onDone(up);
    };
    xhr.send(data);
  } },
  h("h2", { id: p + "-title" }, kind === "model" ? "Teacher model" : "Dataset"),
  h("div", { class: "field" }, h("label", { for: p + "-file" }, "File"), file),
  h("div", { class: "field" }, h("label", { for: p + "-format" }, "Format"), fmt),
  h("div", { class: "field" }, h("label", { for: p + "-name" }, "Name"), name),
  h("div", { class: "field" }, h("label", { for: p + "-tags" }, "Tags"), tags, h("span", { class: "help", id: p + "-tags-help" }, "comma-separated")),
  labelCol ? h("div", { class: "field" }, h("label", { for: p + "-label" }, "Label column (CSV, Parquet)"), labelCol) : null,
  options ? options.box : null,
  h("button", { type: "submit" }, kind === "model" ? "Upload teacher" : "Upload dataset"), bar, status);
  return form;
}
App.routes.uploads = async function (main) {
  const all = await Forms.schemas();
  const modelFormats = ["auto", "zoo_zip", "hf_zip", "onnx"];
  const dataFormats = (Forms.resolve(all.DataSpec, all).properties.format || {}).enum || ["auto"];
  const list = h("div", { class: "scroll" });
  const refresh = async () => {
    const [m, d] = await Promise.all([api("/v1/models?page_size=20"), api("/v1/datasets?page_size=20")]);
    const rows = [...m.items, ...d.items].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    list.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Id", "Format", "State", "Size", "Tags", "Created"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows.map((u) => h("tr", {}, h("td", {}, u.name, " ", teamLabel(u.team_id)), h("td", { class: "mono" }, u.id), h("td", {}, u.format),
        h("td", {}, badge(u.state), u.error ? h("div", { class: "help" }, u.error.detail) : null), h("td", { class: "num" }, fmtBytes(u.size_bytes)),
        h("td", {}, (u.tags || []).join(", ")), h("td", {}, fmtTime(u.created_at)))))));
  };
  main.append(h("h1", {}, "Uploads"), h("div", { class: "grid2" }, uploadForm("model", modelFormats, refresh), uploadForm("dataset", dataFormats, refresh, all)),
    h("h2", {}, "Recent uploads"), list);
  await refresh();
};

// --- routing ---------------------------------------------------------------------------------
async function route() {
  const main = document.getElementById("main");
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  if (!App.me && parts[0] !== "signin") { if (!(await whoami())) { location.hash = "#/signin"; return; } }
  let page = parts[0] || "jobs";
  let arg = parts[1];
  if (page === "jobs" && arg) page = "job";
  document.querySelectorAll("nav a").forEach((a) => a.removeAttribute("aria-current"));
  document.querySelectorAll("nav a").forEach((a) => { if (a.getAttribute("href") === "#/" + (parts[0] || "jobs") && !arg) a.setAttribute("aria-current", "page"); });
  if (App.leave) { App.leave(); App.leave = null; }
  main.replaceChildren();
  const handler = App.routes[page];
  if (!handler) { main.append(h("h1", {}, "Not found"), h("p", {}, "No such page. ", h("a", { href: "#/jobs" }, "Jobs"))); return; }
  try { await handler(main, arg, new URLSearchParams(query || "")); } catch (e) { if (e.status !== 401) main.append(problemBox(e)); }
  if (!main.contains(document.activeElement)) main.focus({ preventScroll: true });  // (for screen readers)
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
Object.assign(App, { h, api, badge, problemBox, teamLabel, fmtNum, fmtBytes, fmtTime, clock, headers, idem, Problem });
window.App = App;
