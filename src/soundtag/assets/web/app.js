// soundtag serve: the page's script (vanilla JS, no build step, no other host).
//
// File:       POST /v1/tags?scores=1 (multipart: file, top_k, threshold, hop_s) -> bars, heat map, events;
//             the CSV download posts the same file again with ?format=csv.
// Microphone: getUserMedia -> AudioWorklet (inlined as a Blob URL; ScriptProcessor where there is none)
//             -> float32 PCM over WS /v1/stream -> the tags of each window as it completes.
// API key:    a 401 shows #key-form; the key is kept in sessionStorage and sent as "Authorization: Bearer"
//             (and as ?api_key= on the WebSocket, which cannot carry headers).
"use strict";

(() => {
  const KEY_STORAGE = "soundtag.apiKey";
  const HEAT_ROWS = 10; // heat-map rows: the classes with the best clip scores
  const LIVE_HOP_S = 2; // seconds between live windows
  const LIVE_MAX_WINDOWS = 200; // list items kept in #live-windows
  const SEND_FRAMES = 4096; // frames per WebSocket message (~85 ms at 48 kHz)
  const STOP_TIMEOUT_MS = 120000; // wait this long for "done" after Stop
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  const $ = (id) => document.getElementById(id);
  const el = {
    error: $("error"), errorText: $("error-text"), errorClose: $("error-close"),
    keyForm: $("key-form"), apiKey: $("api-key"),
    file: $("file"), drop: $("drop"), options: $("options"), topK: $("top-k"), threshold: $("threshold"),
    hop: $("hop"), retag: $("retag"), status: $("status"), results: $("results"), summary: $("summary"),
    tags: $("tags"), timeline: $("timeline"), timelineText: $("timeline-text"), events: $("events"),
    noEvents: $("no-events"), downloadJson: $("download-json"), downloadCsv: $("download-csv"),
    record: $("record"), liveStatus: $("live-status"), liveClock: $("live-clock"), liveResults: $("live-results"),
    liveTags: $("live-tags"),
    liveWindows: $("live-windows"), liveEvents: $("live-events"), noLiveEvents: $("no-live-events"),
  };

  // ---------------------------------------------------------------- errors in words

  class ApiError extends Error {
    constructor(status, message, retryAfter = null) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  function showError(message) {
    el.errorText.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.errorText.textContent = "";
    el.error.hidden = true;
  }

  el.errorClose.addEventListener("click", clearError);

  function withServer(intro, message) {
    return message ? `${intro} The server said: ${message}` : intro;
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return `Something went wrong in this page: ${err && err.message ? err.message : err}`;
    const m = err.message;
    switch (err.status) {
      case 0:
        return "The connection to the server was lost (or it could not be reached). Check that soundtag serve is still running, then try again.";
      case 413:
        return withServer("Too big: the file or its audio is over this server's limit.", m);
      case 415:
        return withServer("This file is not audio the server can read.", m);
      case 429: {
        const wait = err.retryAfter ? ` in ${err.retryAfter} s` : " in a moment";
        return withServer(`The server is busy (its queue is full). Try again${wait}.`, m);
      }
      case 400:
      case 422:
        return withServer("The server refused these options.", m);
      default:
        return withServer(`The server could not do it (HTTP ${err.status}).`, m);
    }
  }

  function micMessage(err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
      return "Microphone access was denied. Allow the microphone for this page in the browser's site settings, then press Record again.";
    }
    if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
      return "No microphone was found. Connect one, then press Record again.";
    }
    if (name === "NotReadableError" || name === "AbortError") {
      return "The microphone could not be opened: another program may be using it.";
    }
    return `The microphone could not be opened: ${err && err.message ? err.message : err}`;
  }

  // ---------------------------------------------------------------- API key and requests

  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return memoryKey;
    }
  }
  let memoryKey = "";
  let keyWaiters = [];

  function askForKey() {
    el.keyForm.hidden = false;
    el.apiKey.value = "";
    el.apiKey.focus();
    return new Promise((resolve) => keyWaiters.push(resolve));
  }

  el.keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = el.apiKey.value.trim();
    if (!key) {
      el.apiKey.focus();
      return;
    }
    memoryKey = key;
    try {
      sessionStorage.setItem(KEY_STORAGE, key);
    } catch {
      /* storage off: the key lasts until the page is closed */
    }
    el.keyForm.hidden = true;
    clearError();
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve(key));
  });

  async function errorText(res) {
    try {
      const body = await res.json();
      if (body && typeof body.error === "string") return body.error;
      if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch {
      /* not JSON */
    }
    return res.statusText || "";
  }

  // fetch with the API key; a 401 asks for the key and tries again; other errors throw ApiError
  async function api(path, init = {}) {
    for (;;) {
      const headers = new Headers(init.headers || {});
      const key = apiKey();
      if (key) headers.set("Authorization", `Bearer ${key}`);
      let res;
      try {
        res = await fetch(path, { ...init, headers });
      } catch (err) {
        if (err && err.name === "AbortError") throw err;
        throw new ApiError(0, "");
      }
      if (res.status === 401) {
        showError(key ? "The API key was not accepted: enter it again below." : "This server needs an API key: enter it below.");
        await askForKey();
        continue;
      }
      if (!res.ok) throw new ApiError(res.status, await errorText(res), res.headers.get("Retry-After"));
      return res;
    }
  }

  let labelsPromise = null;
  function getLabels() {
    if (!labelsPromise) {
      labelsPromise = api("/v1/labels")
        .then((res) => res.json())
        .then((rows) => {
          const names = [];
          for (const row of rows) names[row.index] = row.label;
          return names;
        })
        .catch((err) => {
          labelsPromise = null;
          throw err;
        });
    }
    return labelsPromise;
  }

  // ---------------------------------------------------------------- options

  // the options form as request fields (only those set); null (and an error shown) when one is invalid
  function readOptions() {
    const out = {};
    const topK = el.topK.value.trim();
    if (topK !== "") {
      const k = Number(topK);
      if (!Number.isInteger(k) || k < 1 || k > 527) return invalid(el.topK, "Tags (top-k) must be a whole number from 1 to 527.");
      out.top_k = String(k);
    }
    const threshold = el.threshold.value.trim();
    if (el.threshold.validity.badInput) return invalid(el.threshold, "Threshold must be a number from 0 to 1.");
    if (threshold !== "") {
      const t = Number(threshold);
      if (!Number.isFinite(t) || t < 0 || t > 1) return invalid(el.threshold, "Threshold must be a number from 0 to 1.");
      out.threshold = String(t);
    }
    const hop = el.hop.value.trim();
    if (el.hop.validity.badInput) return invalid(el.hop, "Hop must be a number of seconds, 0.1 or more.");
    if (hop !== "") {
      const h = Number(hop);
      if (!Number.isFinite(h) || h < 0.1) return invalid(el.hop, "Hop must be a number of seconds, 0.1 or more.");
      out.hop_s = String(h);
    }
    return out;
  }

  function invalid(input, message) {
    showError(message);
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return null;
  }

  for (const input of [el.topK, el.threshold, el.hop]) {
    input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
  }

  // ---------------------------------------------------------------- tagging a file

  let current = null; // {file, opts, text, rec, csv}
  let inflight = null; // AbortController of the running upload

  function setStatus(text) {
    el.status.textContent = text;
  }

  function formData(file, opts) {
    const fd = new FormData();
    fd.append("file", file, file.name || "upload");
    for (const [k, v] of Object.entries(opts)) fd.append(k, v);
    return fd;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} bytes`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function fmtS(s) {
    return Number(s).toFixed(Math.abs(s - Math.round(s)) < 1e-6 ? 0 : 1);
  }

  async function tagFile(file) {
    clearError();
    const opts = readOptions();
    if (!opts) return;
    if (inflight) inflight.abort();
    const controller = new AbortController();
    inflight = controller;
    current = null;
    el.results.hidden = true;
    el.tags.replaceChildren();
    el.retag.disabled = true;
    el.file.setAttribute("aria-busy", "true");
    setStatus(`Uploading and tagging ${file.name} (${formatBytes(file.size)})…`);
    const t0 = performance.now();
    try {
      const res = await api("/v1/tags?scores=1", { method: "POST", body: formData(file, opts), signal: controller.signal });
      const text = await res.text();
      const rec = JSON.parse(text);
      let names = null;
      try {
        names = await getLabels();
      } catch {
        /* the heat map falls back to the names in the answer */
      }
      if (inflight !== controller) return;
      current = { file, opts, text, rec, csv: null, names };
      render(rec, names);
      const secs = ((performance.now() - t0) / 1000).toFixed(1);
      setStatus(`Tagged ${rec.path || file.name} in ${secs} s.`);
    } catch (err) {
      if (err && err.name === "AbortError") return;
      if (inflight !== controller) return;
      setStatus("");
      showError(err instanceof SyntaxError ? "The server's answer was not readable JSON." : describe(err));
    } finally {
      if (inflight === controller) {
        inflight = null;
        el.file.removeAttribute("aria-busy");
        el.retag.disabled = false;
        pendingFile = file;
      }
    }
  }

  let pendingFile = null; // the last file given, for "Tag again"

  el.file.addEventListener("change", () => {
    const file = el.file.files && el.file.files[0];
    if (file) tagFile(file);
  });

  el.options.addEventListener("submit", (e) => {
    e.preventDefault();
    if (pendingFile) tagFile(pendingFile);
  });

  // drop a file anywhere on the page
  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    el.drop.classList.add("dragover");
  });
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.drop.classList.remove("dragover");
  });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    el.drop.classList.remove("dragover");
    const files = e.dataTransfer.files;
    if (!files || !files.length) {
      showError("Drop a file from your computer (not a link or text).");
      return;
    }
    tagFile(files[0]).then(() => {
      if (files.length > 1) setStatus(`${el.status.textContent} Only the first of the ${files.length} dropped files was tagged.`);
    });
  });

  function hasFiles(e) {
    return e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  }

  // ---------------------------------------------------------------- results

  function render(rec, names) {
    const windows = rec.windows || [];
    const events = rec.events || [];
    el.summary.textContent = `${rec.path}: ${fmtS(rec.duration_s)} s, ${windows.length} window${windows.length === 1 ? "" : "s"}, `
      + `${events.length} event${events.length === 1 ? "" : "s"}`;
    renderBars(el.tags, rec.tags || [], "No tags above the threshold.");
    renderEvents(events);
    el.results.hidden = false;
    lastTimeline = { rec, names: nameTable(rec, names) };
    drawTimeline();
  }

  function renderBars(list, tags, emptyText) {
    const items = tags.map((t) => {
      const li = document.createElement("li");
      li.className = "tag";
      li.dataset.index = t.index;
      const label = document.createElement("span");
      label.className = "tag-label";
      label.textContent = t.label;
      label.title = t.mid;
      const score = document.createElement("span");
      score.className = "tag-score";
      score.textContent = Number(t.score).toFixed(3);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${Math.max(0, Math.min(1, t.score)) * 100}%`;
      bar.append(fill);
      li.append(label, bar, score);
      return li;
    });
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = emptyText;
      items.push(li);
    }
    list.replaceChildren(...items);
  }

  function renderEvents(events) {
    const body = el.events.tBodies[0];
    body.replaceChildren(...events.map((ev) => {
      const tr = document.createElement("tr");
      for (const [text, cls] of [[fmtS(ev.start_s), "num"], [fmtS(ev.end_s), "num"], [ev.label, ""], [Number(ev.score).toFixed(3), "num"]]) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.append(td);
      }
      tr.title = ev.mid;
      return tr;
    }));
    el.events.hidden = !events.length;
    el.noEvents.hidden = !!events.length;
  }

  // class names for the heat map: /v1/labels, else the names the answer itself holds
  function nameTable(rec, names) {
    if (names && names.length) return names;
    const out = [];
    const add = (tags) => (tags || []).forEach((t) => { out[t.index] = t.label; });
    add(rec.tags);
    (rec.windows || []).forEach((w) => add(w.tags));
    return out;
  }

  // ---------------------------------------------------------------- heat map

  let lastTimeline = null; // {rec, names, layout}

  function viridis(v) {
    const x = Math.max(0, Math.min(1, Number.isFinite(v) ? v : 0)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    const [a, b] = [VIRIDIS[i], VIRIDIS[i + 1]];
    return `rgb(${Math.round(a[0] + f * (b[0] - a[0]))},${Math.round(a[1] + f * (b[1] - a[1]))},${Math.round(a[2] + f * (b[2] - a[2]))})`;
  }

  function niceStep(span, maxTicks) {
    const steps = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400];
    for (const s of steps) if (span / s <= maxTicks) return s;
    return steps[steps.length - 1];
  }

  function ellipsize(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    let lo = 0;
    let hi = text.length;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (ctx.measureText(`${text.slice(0, mid)}…`).width <= width) lo = mid;
      else hi = mid - 1;
    }
    return `${text.slice(0, lo)}…`;
  }

  function drawTimeline() {
    if (!lastTimeline || el.results.hidden) return;
    const { rec, names } = lastTimeline;
    const canvas = el.timeline;
    const ctx = canvas.getContext("2d");
    const css = getComputedStyle(document.documentElement);
    const textColor = css.getPropertyValue("--text").trim() || "#000";
    const mutedColor = css.getPropertyValue("--muted").trim() || "#555";
    const windows = rec.windows || [];
    const clip = rec.clip_scores;
    const width = Math.max(200, Math.floor(canvas.parentElement.clientWidth || 600));
    const narrow = width < 480;
    const fontPx = narrow ? 11 : 13;
    const font = `${fontPx}px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif`;
    const dpr = window.devicePixelRatio || 1;

    // a sound event detection model's answer (segment_s, windows[].segmentwise): one column per 320 ms
    // step, each window's steps until the next window starts; a clip model's: one column per window
    const framewise = Number(rec.segment_s) > 0 && windows.length && windows.every((w) => Array.isArray(w.segmentwise));
    const columns = [];
    windows.forEach((w, c) => {
      if (!framewise) {
        columns.push({ start: Number(w.start_s), end: Number(w.end_s), scores: w.scores });
        return;
      }
      const next = c + 1 < windows.length ? Number(windows[c + 1].start_s) : Infinity;
      w.segmentwise.forEach((scores, k) => {
        const start = Number(w.start_s) + k * Number(rec.segment_s);
        if (start < next && start < Number(w.end_s)) columns.push({ start, end: Math.min(next, start + Number(rec.segment_s)), scores });
      });
    });

    if (!clip || !windows.length || !windows.every((w) => Array.isArray(w.scores))) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(40 * dpr);
      canvas.style.height = "40px";
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.font = font;
      ctx.fillStyle = mutedColor;
      ctx.fillText("No per-window scores in the answer.", 4, 24);
      el.timelineText.textContent = "No per-window scores.";
      return;
    }

    const order = clip.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0]).slice(0, HEAT_ROWS).map((p) => p[1]);
    const label = (i) => names[i] || `class ${i}`;
    const rowH = narrow ? 20 : 22;
    const padTop = 4;
    const axisH = 34;
    const height = padTop + order.length * rowH + axisH;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.style.height = `${height}px`;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = font;

    const widest = Math.max(...order.map((i) => ctx.measureText(label(i)).width));
    const labelW = Math.min(Math.ceil(widest) + 10, Math.floor(width * (narrow ? 0.42 : 0.35)));
    const x0 = labelW;
    const x1 = width - 12;
    const starts = columns.map((col) => col.start);
    const tEnd = Math.max(Number(rec.duration_s) || 0, ...windows.map((w) => Number(w.end_s) || 0), starts[starts.length - 1] + 0.1);
    const xOf = (t) => x0 + (t / tEnd) * (x1 - x0);

    // cells: column i runs from its start to column i+1's (the last one to the end of the audio)
    for (let c = 0; c < columns.length; c++) {
      const a = xOf(starts[c]);
      const b = xOf(c + 1 < columns.length ? starts[c + 1] : tEnd);
      const scores = columns[c].scores;
      for (let r = 0; r < order.length; r++) {
        ctx.fillStyle = viridis(scores[order[r]]);
        ctx.fillRect(Math.floor(a), padTop + r * rowH, Math.max(1, Math.ceil(b) - Math.floor(a)), rowH - 1);
      }
    }

    // row labels
    ctx.fillStyle = textColor;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    order.forEach((i, r) => ctx.fillText(ellipsize(ctx, label(i), labelW - 8), labelW - 6, padTop + r * rowH + rowH / 2));

    // time axis, in seconds
    const axisY = padTop + order.length * rowH + 2;
    ctx.strokeStyle = mutedColor;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(x0, axisY + 0.5);
    ctx.lineTo(x1, axisY + 0.5);
    ctx.stroke();
    const step = niceStep(tEnd, Math.max(2, Math.floor((x1 - x0) / (narrow ? 48 : 64))));
    ctx.textBaseline = "top";
    ctx.fillStyle = mutedColor;
    for (let t = 0; t <= tEnd + 1e-9; t += step) {
      const x = xOf(t);
      ctx.beginPath();
      ctx.moveTo(Math.round(x) + 0.5, axisY);
      ctx.lineTo(Math.round(x) + 0.5, axisY + 5);
      ctx.stroke();
      ctx.textAlign = t === 0 ? "left" : (x > x1 - 20 ? "right" : "center");
      ctx.fillText(fmtS(t), x, axisY + 7);
    }
    ctx.textAlign = "right";
    ctx.fillText("time (s)", x0 - 6, axisY + 7);

    lastTimeline.layout = { order, starts, tEnd, x0, x1, padTop, rowH, xOf, columns, framewise };
    const best = order[0];
    let bestC = 0;
    columns.forEach((col, c) => { if (col.scores[best] > columns[bestC].scores[best]) bestC = c; });
    const what = framewise ? `framewise heat map of ${columns.length} steps of ${Number(rec.segment_s).toFixed(2)} s in ${windows.length} window${windows.length === 1 ? "" : "s"}`
      : `Heat map of ${windows.length} window${windows.length === 1 ? "" : "s"}`;
    el.timelineText.textContent = `${what[0].toUpperCase()}${what.slice(1)} over ${fmtS(tEnd)} s. `
      + `Rows, best first: ${order.map(label).join("; ")}. Highest: ${label(best)}, `
      + `${Number(columns[bestC].scores[best]).toFixed(2)} in the ${framewise ? "step" : "window"} from ${fmtS(columns[bestC].start)} s.`;
  }

  // the cell under the pointer, as a tooltip
  el.timeline.addEventListener("mousemove", (e) => {
    const t = lastTimeline;
    if (!t || !t.layout) return;
    const { order, starts, tEnd, x0, x1, padTop, rowH, columns, framewise } = t.layout;
    const rect = el.timeline.getBoundingClientRect();
    const x = e.clientX - rect.left;
    const r = Math.floor((e.clientY - rect.top - padTop) / rowH);
    if (x < x0 || x > x1 || r < 0 || r >= order.length) {
      el.timeline.title = "";
      return;
    }
    const time = ((x - x0) / (x1 - x0)) * tEnd;
    let c = 0;
    while (c + 1 < starts.length && starts[c + 1] <= time) c += 1;
    const w = columns[c];
    el.timeline.title = `${t.names[order[r]] || `class ${order[r]}`}: ${Number(w.scores[order[r]]).toFixed(3)} `
      + `(${framewise ? "step" : "window"} ${fmtS(w.start)}–${fmtS(w.end)} s)`;
  });

  let lastWidth = 0;
  let redrawQueued = false;
  const resized = () => {
    const w = el.timeline.parentElement.clientWidth;
    if (w === lastWidth || redrawQueued) return;
    redrawQueued = true;
    requestAnimationFrame(() => {
      redrawQueued = false;
      lastWidth = el.timeline.parentElement.clientWidth;
      drawTimeline();
    });
  };
  if (window.ResizeObserver) new ResizeObserver(resized).observe(el.timeline.parentElement);
  else window.addEventListener("resize", resized);
  if (window.matchMedia) {
    const dark = window.matchMedia("(prefers-color-scheme: dark)");
    if (dark.addEventListener) dark.addEventListener("change", drawTimeline);
  }

  // ---------------------------------------------------------------- downloads

  function baseName(name) {
    const last = String(name || "soundtag").split(/[\\/]/).pop();
    return last.replace(/\.[^.]*$/, "") || "soundtag";
  }

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  el.downloadJson.addEventListener("click", () => {
    if (!current) return;
    save(new Blob([current.text], { type: "application/json" }), `${baseName(current.file.name)}.soundtag.json`);
  });

  el.downloadCsv.addEventListener("click", async () => {
    if (!current) return;
    const job = current;
    clearError();
    try {
      if (job.csv === null) {
        el.downloadCsv.disabled = true;
        setStatus("Making the CSV…");
        const res = await api("/v1/tags?format=csv", { method: "POST", body: formData(job.file, job.opts) });
        job.csv = await res.text();
        setStatus("CSV ready.");
      }
      save(new Blob([job.csv], { type: "text/csv" }), `${baseName(job.file.name)}.soundtag.csv`);
    } catch (err) {
      setStatus("");
      showError(describe(err));
    } finally {
      el.downloadCsv.disabled = false;
    }
  });

  // ---------------------------------------------------------------- microphone

  const WORKLET_SOURCE = `
    class SoundtagCapture extends AudioWorkletProcessor {
      constructor(options) {
        super();
        this.size = options.processorOptions.frames;
        this.buf = new Float32Array(this.size);
        this.n = 0;
        this.port.onmessage = (e) => {
          if (e.data === "flush") {
            if (this.n) this.port.postMessage(this.buf.slice(0, this.n));
            this.n = 0;
            this.port.postMessage("flushed");
          }
        };
      }
      process(inputs) {
        const input = inputs[0];
        if (input && input.length) {
          const x = input[0];
          let i = 0;
          while (i < x.length) {
            const k = Math.min(x.length - i, this.size - this.n);
            this.buf.set(x.subarray(i, i + k), this.n);
            this.n += k;
            i += k;
            if (this.n === this.size) {
              this.port.postMessage(this.buf, [this.buf.buffer]);
              this.buf = new Float32Array(this.size);
              this.n = 0;
            }
          }
        }
        return true;
      }
    }
    registerProcessor("soundtag-capture", SoundtagCapture);
  `;

  const live = {
    state: "idle", // idle | starting | recording | stopping
    ws: null, ctx: null, stream: null, source: null, node: null,
    pending: [], framesSent: 0, rate: 0, windows: 0, done: false, failed: false,
    endWanted: false, flushed: false, timer: null, stopTimer: null, config: null,
  };

  function setRecordButton(state) {
    const b = el.record;
    b.classList.toggle("recording", state === "recording");
    b.disabled = state === "starting" || state === "stopping";
    b.textContent = { idle: "Record", starting: "Starting…", recording: "Stop", stopping: "Finishing…" }[state];
  }

  function setLive(state) {
    live.state = state;
    setRecordButton(state);
  }

  function clock(seconds) {
    const s = Math.floor(seconds);
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  function audioSeconds() {
    return live.rate ? live.framesSent / live.rate : 0;
  }

  // the running clock: not a live region (a screen reader would read it twice a second)
  function tickStatus() {
    if (live.state !== "recording") return;
    const n = live.windows;
    el.liveClock.textContent = `${clock(audioSeconds())} recorded; ${n} window${n === 1 ? "" : "s"} tagged.`;
  }

  el.record.addEventListener("click", () => {
    if (live.state === "idle") startRecording();
    else if (live.state === "recording") stopRecording();
  });

  async function startRecording() {
    clearError();
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("This browser gives the microphone only to secure pages: open this page over https or on localhost (127.0.0.1).");
      return;
    }
    const opts = readOptions();
    if (!opts) return;
    setLive("starting");
    live.failed = false;
    el.liveStatus.textContent = "Starting…";
    // a WebSocket cannot see a 401: check the key with an ordinary request first
    try {
      await getLabels();
    } catch (err) {
      showError(describe(err));
      resetLive("");
      return;
    }
    try {
      live.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
    } catch (err) {
      showError(micMessage(err));
      resetLive("");
      return;
    }
    try {
      const Ctx = window.AudioContext || window.webkitAudioContext;
      live.ctx = new Ctx();
      if (live.ctx.state === "suspended") await live.ctx.resume();
      live.rate = Math.round(live.ctx.sampleRate);
      live.source = live.ctx.createMediaStreamSource(live.stream);
      live.node = await captureNode(live.ctx);
      live.source.connect(live.node);
      live.node.connect(live.ctx.destination); // outputs silence; keeps the graph pulling
    } catch (err) {
      showError(`The audio could not be captured: ${err && err.message ? err.message : err}`);
      stopAudio();
      resetLive("");
      return;
    }
    Object.assign(live, { pending: [], framesSent: 0, windows: 0, done: false, endWanted: false, flushed: false });
    el.liveTags.replaceChildren();
    el.liveWindows.replaceChildren();
    el.liveEvents.replaceChildren();
    el.noLiveEvents.hidden = false;
    el.liveResults.hidden = false;
    live.config = { sample_rate: live.rate, channels: 1, encoding: "f32le", hop_s: LIVE_HOP_S };
    if (opts.top_k) live.config.top_k = Number(opts.top_k);
    if (opts.threshold) live.config.threshold = Number(opts.threshold);
    openSocket();
    setLive("recording");
    el.liveStatus.textContent = "Recording: the first tags come after 10 s of audio, then every 2 s.";
    tickStatus();
    live.timer = setInterval(tickStatus, 500);
  }

  async function captureNode(ctx) {
    if (ctx.audioWorklet && window.AudioWorkletNode) {
      const url = URL.createObjectURL(new Blob([WORKLET_SOURCE], { type: "text/javascript" }));
      try {
        await ctx.audioWorklet.addModule(url);
      } finally {
        URL.revokeObjectURL(url);
      }
      const node = new AudioWorkletNode(ctx, "soundtag-capture", {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
        channelCount: 1, channelCountMode: "explicit", channelInterpretation: "speakers",
        processorOptions: { frames: SEND_FRAMES },
      });
      node.port.onmessage = (e) => {
        if (e.data === "flushed") {
          live.flushed = true;
          sendEnd();
        } else if (e.data instanceof Float32Array) {
          sendSamples(e.data);
        }
      };
      node.flush = () => node.port.postMessage("flush");
      return node;
    }
    // older browsers: ScriptProcessorNode (deprecated, but everywhere)
    const node = ctx.createScriptProcessor(SEND_FRAMES, 1, 1);
    node.onaudioprocess = (e) => {
      if (live.state === "recording") sendSamples(new Float32Array(e.inputBuffer.getChannelData(0)));
      e.outputBuffer.getChannelData(0).fill(0);
    };
    node.flush = () => {
      live.flushed = true;
      sendEnd();
    };
    return node;
  }

  function socketUrl() {
    const url = new URL("/v1/stream", window.location.href);
    url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
    const key = apiKey();
    if (key) url.searchParams.set("api_key", key);
    return url.href;
  }

  function openSocket() {
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (err) {
      fail(`The live connection could not be opened: ${err && err.message ? err.message : err}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    live.ws = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify(live.config));
      for (const block of live.pending) ws.send(block);
      live.pending = [];
      if (live.flushed) sendEnd();
    };
    ws.onmessage = (e) => {
      if (typeof e.data !== "string") return;
      let m;
      try {
        m = JSON.parse(e.data);
      } catch {
        return;
      }
      if (m.type === "window") addWindow(m);
      else if (m.type === "event") addEvent(m);
      else if (m.type === "error") fail(withServer("The server stopped the live tagging.", m.error));
      else if (m.type === "done") live.done = true;
    };
    ws.onclose = (e) => {
      if (live.ws !== ws) return;
      live.ws = null;
      if (live.done) {
        const n = live.windows;
        resetLive(`Finished: ${clock(audioSeconds())} of audio, ${n} window${n === 1 ? "" : "s"}; `
          + "the bars show the last window.");
      } else if (!live.failed) {
        fail(closeMessage(e));
      } else {
        resetLive("Stopped.");
      }
    };
  }

  function closeMessage(e) {
    const reason = e && e.reason ? ` The server said: ${e.reason}` : "";
    if (e && (e.code === 4401 || e.code === 4001 || (e.code === 1008 && /key|auth/i.test(e.reason || "")))) {
      askForKey();
      return `This server needs an API key for live tagging: enter it below, then press Record again.${reason}`;
    }
    if (e && (e.code === 1013 || e.code === 4429)) return `The server is busy; try again in a moment.${reason}`;
    return `The connection to the server was lost (code ${e ? e.code : "?"}).${reason}`;
  }

  function sendSamples(block) {
    if (live.state !== "recording" && !(live.state === "stopping" && !live.flushed)) return;
    live.framesSent += block.length;
    const ws = live.ws;
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(block.buffer);
    else if (!ws || ws.readyState === WebSocket.CONNECTING) live.pending.push(block.buffer);
  }

  function sendEnd() {
    const ws = live.ws;
    if (live.endWanted && ws && ws.readyState === WebSocket.OPEN && live.flushed && !live.endSent) {
      ws.send(new ArrayBuffer(0)); // end of input: the server sends the last window(s), then "done"
      live.endSent = true;
    }
  }

  function stopRecording() {
    setLive("stopping");
    clearInterval(live.timer);
    el.liveClock.textContent = "";
    el.liveStatus.textContent = `Stopped after ${clock(audioSeconds())}; waiting for the last window…`;
    live.endWanted = true;
    live.endSent = false;
    if (live.stream) live.stream.getTracks().forEach((t) => t.stop());
    try {
      if (live.source) live.source.disconnect(); // no more input: the capture node's buffer is all that is left
    } catch {
      /* already disconnected */
    }
    if (live.node && live.node.flush) live.node.flush();
    else {
      live.flushed = true;
      sendEnd();
    }
    live.stopTimer = setTimeout(() => {
      if (live.state === "stopping") fail("The server did not send the last window in time.");
    }, STOP_TIMEOUT_MS);
  }

  function fail(message) {
    if (live.failed) return;
    live.failed = true;
    showError(message);
    const ws = live.ws;
    live.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
    resetLive("Stopped.");
  }

  function stopAudio() {
    if (live.stream) live.stream.getTracks().forEach((t) => t.stop());
    try {
      if (live.source) live.source.disconnect();
      if (live.node) live.node.disconnect();
    } catch {
      /* already disconnected */
    }
    if (live.ctx && live.ctx.state !== "closed") live.ctx.close().catch(() => {});
    Object.assign(live, { stream: null, source: null, node: null, ctx: null });
  }

  function resetLive(message) {
    clearInterval(live.timer);
    clearTimeout(live.stopTimer);
    stopAudio();
    setLive("idle");
    el.liveClock.textContent = "";
    if (message !== undefined) el.liveStatus.textContent = message;
  }

  function addWindow(m) {
    live.windows += 1;
    renderBars(el.liveTags, m.tags || [], "No tags above the threshold in this window.");
    const li = document.createElement("li");
    li.className = "window";
    li.dataset.start = m.start_s;
    li.dataset.end = m.end_s;
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = `${Number(m.start_s).toFixed(1)}–${Number(m.end_s).toFixed(1)} s`;
    const tags = (m.tags || []).map((t) => `${t.label} ${Number(t.score).toFixed(2)}`).join("; ");
    li.append(time, document.createTextNode(`: ${tags || "no tags"}`));
    el.liveWindows.prepend(li);
    while (el.liveWindows.children.length > LIVE_MAX_WINDOWS) el.liveWindows.lastElementChild.remove();
    tickStatus();
  }

  function addEvent(m) {
    const li = document.createElement("li");
    li.className = `event event-${m.event}`;
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = m.event === "start" ? `from ${Number(m.start_s).toFixed(1)} s`
      : `${Number(m.start_s).toFixed(1)}–${Number(m.end_s).toFixed(1)} s`;
    li.append(time, document.createTextNode(`: ${m.label} ${m.event === "start" ? "started" : "ended"} (${Number(m.score).toFixed(2)})`));
    el.liveEvents.prepend(li);
    el.noLiveEvents.hidden = true;
    while (el.liveEvents.children.length > LIVE_MAX_WINDOWS) el.liveEvents.lastElementChild.remove();
  }

  window.addEventListener("pagehide", () => {
    if (live.ws) live.ws.close();
    stopAudio();
  });

  setRecordButton("idle");
})();
