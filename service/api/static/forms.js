// The job form, built from the published job schema (/openapi.json, JobCreate): every field with
// its help text and default, advanced fields folded, discriminated unions as a choice of kind.
"use strict";
(function () {
  const BASIC = {
    "": ["student", "distillation", "quantization"],
    student: ["kind", "max_params_ratio", "max_params", "num_layers", "width_ratio", "architecture"],
    distillation: ["epochs", "temperature", "alpha", "batch_size", "lr"],
    quantization: ["method", "calibration", "max_metric_drop"],
    targets: ["metric", "min", "max_drop", "max_latency_ms", "latency_batch_size", "max_size_bytes", "time_budget_s"],
    evaluation: ["latency_batch_sizes"],
    notify: ["url"],
  };
  const OWN = new Set(["teacher_model_id", "dataset_id", "eval_dataset_id", "name", "tags", "targets"]);
  let cached = null;

  async function schemas() {
    if (!cached) {
      const r = await fetch("/openapi.json");
      cached = (await r.json()).components.schemas;
    }
    return cached;
  }

  function resolve(s, all) {
    while (s && s.$ref) s = all[s.$ref.split("/").pop()];
    return s || {};
  }

  // {schema, nullable, union: [variants] | null, tag}
  function shape(s, all) {
    s = resolve(s, all);
    let nullable = false;
    let options = s.anyOf || s.oneOf;
    if (options) {
      const rest = options.filter((o) => o.type !== "null");
      nullable = rest.length < options.length;
      if (rest.length === 1) return { ...shape(rest[0], all), nullable, outer: s };
      const variants = rest.map((o) => resolve(o, all));
      const tag = (s.discriminator && s.discriminator.propertyName) ||
        (variants.every((v) => v.properties && v.properties.kind) ? "kind" : variants.every((v) => v.properties && v.properties.method) ? "method" : null);
      if (tag && variants.every((v) => v.type === "object" || v.properties)) return { schema: s, nullable, union: variants, tag, outer: s };
      return { schema: rest[0].type ? rest[0] : resolve(rest[0], all), nullable, outer: s };
    }
    return { schema: s, nullable, outer: s };
  }

  function tagValue(v, tag) {
    const p = (v.properties || {})[tag] || {};
    return p.const ?? (p.enum && p.enum.length === 1 ? p.enum[0] : p.default);
  }

  function getAt(obj, path) {
    return path.reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);
  }
  function setAt(obj, path, value) {
    let o = obj;
    path.slice(0, -1).forEach((k) => { if (typeof o[k] !== "object" || o[k] === null) o[k] = {}; o = o[k]; });
    o[path[path.length - 1]] = value;
  }
  function label(name) {
    return name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
  }

  class JobForm {
    constructor(all, initial) {
      this.all = all;
      this.initial = initial || {};
      this.inputs = [];
    }

    // one property of an object schema
    field(name, prop, path, parentDefaults) {
      const all = this.all;
      const sh = shape(prop, all);
      const s = sh.schema;
      const id = "f-" + path.join("-");
      const def = prop.default !== undefined ? prop.default : sh.outer.default !== undefined ? sh.outer.default : (parentDefaults || {})[name];
      const help = [(prop.description || sh.outer.description || s.description || "").replace(/``/g, ""), def !== undefined && def !== null && typeof def !== "object" ? `Default: ${def}` : ""]
        .filter(Boolean).join(" ");
      const initial = getAt(this.initial, path);
      if (sh.union) return this.union(name, sh, path, initial, help);
      if (s.type === "object" && s.properties) return this.object(name, s, path, help, def);
      const wrap = document.createElement("div");
      wrap.className = "field";
      const lab = document.createElement("label");
      lab.htmlFor = id;
      lab.textContent = label(name);
      let input;
      let kind = "text";
      if (s.enum) {
        input = document.createElement("select");
        const options = (sh.nullable || def === undefined ? [""] : []).concat(s.enum);
        for (const v of options) {
          const o = document.createElement("option");
          o.value = v;
          o.textContent = v === "" ? "(not set)" : v;
          input.appendChild(o);
        }
        kind = "enum";
      } else if (s.type === "boolean") {
        input = document.createElement("input");
        input.type = "checkbox";
        wrap.className = "field check";
        kind = "bool";
      } else if (s.type === "integer" || s.type === "number") {
        input = document.createElement("input");
        input.type = "number";
        input.step = s.type === "integer" ? "1" : "any";
        kind = s.type;
      } else if (s.type === "array" && s.items && ["integer", "number", "string"].includes(resolve(s.items, all).type)) {
        input = document.createElement("input");
        input.type = "text";
        kind = "list:" + resolve(s.items, all).type;
      } else if (s.type === "object" || s.type === "array" || !s.type) {
        input = document.createElement("textarea");
        input.rows = 3;
        input.style.minHeight = "4rem";
        kind = "json";
      } else {
        input = document.createElement("input");
        input.type = "text";
      }
      input.id = id;
      input.name = path.join(".");
      const show = initial !== undefined ? initial : def;
      if (kind === "bool") input.checked = !!show;
      else if (show !== undefined && show !== null) input.value = kind === "json" ? JSON.stringify(show) : Array.isArray(show) ? show.join(", ") : String(show);
      const helpEl = document.createElement("span");
      helpEl.className = "help";
      helpEl.id = id + "-help";
      helpEl.textContent = help;
      input.setAttribute("aria-describedby", helpEl.id);
      if (kind === "bool") wrap.append(input, lab, helpEl); else wrap.append(lab, input, helpEl);
      this.inputs.push({ path, kind, input, def, force: initial !== undefined });
      return wrap;
    }

    object(name, s, path, help, defaults) {
      const fs = document.createElement("fieldset");
      fs.id = "f-" + path.join("-");
      const legend = document.createElement("legend");
      legend.textContent = label(name);
      fs.appendChild(legend);
      if (help) { const p = document.createElement("p"); p.className = "help"; p.textContent = help.replace(/``/g, ""); fs.appendChild(p); }
      this.fill(fs, s, path, defaults);
      return fs;
    }

    fill(container, s, path, defaults, skip) {
      const basic = BASIC[path[path.length - 1] || ""];
      const adv = document.createElement("details");
      const sum = document.createElement("summary");
      sum.textContent = "Advanced";
      adv.appendChild(sum);
      for (const [key, prop] of Object.entries(s.properties || {})) {
        if (skip && skip.has(key)) continue;
        const node = this.field(key, prop, [...path, key], defaults);
        if (!basic || basic.includes(key)) container.appendChild(node); else adv.appendChild(node);
      }
      if (adv.children.length > 1) container.appendChild(adv);
    }

    union(name, sh, path, initial, help) {
      const fs = document.createElement("fieldset");
      fs.id = "f-" + path.join("-");
      const legend = document.createElement("legend");
      legend.textContent = label(name);
      const id = "f-" + [...path, sh.tag].join("-");
      const wrap = document.createElement("div");
      wrap.className = "field";
      const lab = document.createElement("label");
      lab.htmlFor = id;
      lab.textContent = label(sh.tag);
      const select = document.createElement("select");
      select.id = id;
      for (const v of sh.union) {
        const o = document.createElement("option");
        o.value = o.textContent = tagValue(v, sh.tag);
        select.appendChild(o);
      }
      const chosen = (initial && initial[sh.tag]) || (sh.outer.default && sh.outer.default[sh.tag]);
      if (chosen) select.value = chosen;
      const body = document.createElement("div");
      const entry = { path: [...path, sh.tag], kind: "tag", input: select, def: select.value, force: initial !== undefined, union: body };
      const render = () => {
        this.inputs = this.inputs.filter((i) => !(i.path.length > path.length && i.path.slice(0, path.length).join(".") === path.join(".") && i !== entry));
        body.replaceChildren();
        const v = sh.union.find((u) => tagValue(u, sh.tag) === select.value) || sh.union[0];
        this.fill(body, v, path, {}, new Set([sh.tag]));
      };
      select.addEventListener("change", render);
      wrap.append(lab, select);
      if (help) { const p = document.createElement("span"); p.className = "help"; p.textContent = help; wrap.append(p); }
      fs.append(legend, wrap, body);
      this.inputs.push(entry);
      render();
      return fs;
    }

    // what the form says: only fields set to something other than their default
    collect(root, hidden) {
      const body = {};
      const skip = (p) => hidden.some((h) => p.join(".").startsWith(h));
      const touched = new Set();
      for (const f of this.inputs) {
        if (!f.input.isConnected || skip(f.path) || f.kind === "tag") continue;
        let v;
        const raw = f.kind === "bool" ? f.input.checked : f.input.value.trim();
        if (raw === "") continue;
        if (f.kind === "bool" && !raw && (f.def === null || f.def === undefined)) continue;  // (unset, not false)
        if (f.kind === "integer" || f.kind === "number") v = Number(raw);
        else if (f.kind === "bool") v = raw;
        else if (f.kind.startsWith("list:")) v = raw.split(",").map((x) => x.trim()).filter(Boolean).map((x) => (f.kind === "list:string" ? x : Number(x)));
        else if (f.kind === "json") v = JSON.parse(raw);
        else v = raw;
        if (!f.force && JSON.stringify(v) === JSON.stringify(f.def)) continue;
        setAt(body, f.path, v);
        touched.add(f.path.slice(0, -1).join("."));
      }
      for (const f of this.inputs) {
        if (f.kind !== "tag" || !f.input.isConnected || skip(f.path)) continue;
        const parent = f.path.slice(0, -1).join(".");
        if (touched.has(parent) || f.force || f.input.value !== f.def) setAt(body, f.path, f.input.value);
      }
      return body;
    }

    mark(errors) {
      document.querySelectorAll("[aria-invalid]").forEach((n) => n.removeAttribute("aria-invalid"));
      for (const e of errors || []) {
        const parts = (e.pointer || "").replace(/^#\//, "").split("/").filter(Boolean);
        for (let n = parts.length; n > 0; n--) {
          const node = document.getElementById("f-" + parts.slice(0, n).join("-"));
          if (node) { node.setAttribute("aria-invalid", "true"); break; }
        }
      }
    }
  }

  window.Forms = { schemas, shape, resolve, JobForm, OWN, getAt };
})();
