// fmnist's page: classify a photo or a drawing, explore the run's curves and first-layer neurons.
// Plain JavaScript, no build step, nothing fetched from anywhere but this server. Every URL is relative, so the
// page works behind a path prefix; limits and defaults (classes per answer, body size, neurons) come from the API.
"use strict";

const $ = (sel) => document.querySelector(sel);
const BARS = 5;  // the page shows the five likeliest classes (fewer if the API allows fewer)
const RETRY_MS = 2000;  // how soon the page asks again a server that stopped answering
const UNSURE = "Does not look like a Fashion-MNIST product";  // what the page says of a record with unsure: true

// ------------------------------------------------------------------ talking to the server

class ServerDown extends Error {}

// A server started with a key answers 401 without it: the page asks for it once and keeps it for this tab's
// session (sessionStorage), sending it with every call. Calls that fail together share the one question.
const KEY_STORE = "fmnist-api-key";
let keyQuestion = null;  // the question being asked: a promise of whether a key was given
let keyRefused = false;  // the person cancelled: no more questions until the page is reloaded
function askKey(sent) {
  const stored = sessionStorage.getItem(KEY_STORE);
  if (stored && stored !== sent) return Promise.resolve(true);  // another call got a newer key meanwhile
  if (keyRefused) return Promise.resolve(false);
  if (!keyQuestion) {
    keyQuestion = new Promise((resolve) => setTimeout(() => {
      const key = (window.prompt(sent ? "That API key was refused. The server's API key:" :
        "This server needs an API key. Its API key:") || "").trim();
      if (key) sessionStorage.setItem(KEY_STORE, key); else keyRefused = true;
      keyQuestion = null;
      resolve(Boolean(key));
    }, 0));
  }
  return keyQuestion;
}

// The JSON answer of one request; otherwise an Error whose message is a sentence for the page.
async function api(url, options) {
  let response, sent;
  for (;;) {
    sent = sessionStorage.getItem(KEY_STORE);
    const headers = new Headers((options && options.headers) || {});
    if (sent) headers.set("X-API-Key", sent);
    try {
      response = await fetch(url, { ...options, headers });
    } catch (err) {
      throw new ServerDown("The server is not answering: it may have stopped, or the network is down.");
    }
    if (response.status !== 401 || !(await askKey(sent))) break;
  }
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch (err) { body = { detail: text }; }  // a 413 is plain text
  if (!response.ok) {
    const d = body.detail;
    const detail = typeof d === "string" ? d : Array.isArray(d) ? d.map((e) => e.msg).join("; ") : response.statusText;
    throw new Error(`The server could not do it (${response.status}): ${detail}.`.replace(/\.\.$/, "."));
  }
  return body;
}

let limits = null;  // GET limits: body size, classes per answer
async function getLimits() {
  if (!limits) limits = await api("limits");
  return limits;
}

// ------------------------------------------------------------------ tabs (arrow keys, Home and End move between them)

const tabs = [...document.querySelectorAll('[role="tab"]')];

function select(tab, focus) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  if (tab.id === "tab-explore") { loadExplore(); redrawExplore(); }  // a hidden canvas has no size to draw at
}

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => select(tab, false));
  tab.addEventListener("keydown", (e) => {
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    select(tabs[(to + tabs.length) % tabs.length], true);
  });
});

// ------------------------------------------------------------------ canvases: CSS size, times devicePixelRatio

// Size the canvas's backing store to its CSS box on this screen; a context that draws in CSS pixels.
function fit(canvas) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const c = canvas.getContext("2d");
  c.setTransform(dpr, 0, 0, dpr, 0, 0);
  return [c, w, h];
}

// ------------------------------------------------------------------ results: one at a time, never a stale one

let asked = 0;  // the latest classification asked for: an older answer that arrives late is dropped

// state: "empty", "waiting", "done" (an answer came) or "failed"; unsure: the answer is "does not look like one"
function setResult(state, label, prob, note = "", unsure = false) {
  $("#result").dataset.state = state;
  $("#result").dataset.unsure = String(unsure);
  $("#result-label").textContent = label;
  $("#result-prob").textContent = prob;
  $("#result-note").textContent = note;
  $("#result-note").hidden = !note;
}

function resetResult() {
  setResult("empty", "–", "nothing classified yet");
  $("#bars").replaceChildren();
  $("#bars-title").hidden = true;
  $("#input-img").hidden = true;
  $("#input-img").removeAttribute("src");
  $("#input-empty").hidden = false;
  $("#input-note").textContent = "The 28x28 image the model classified appears here.";
  $("#error").hidden = true;
  seen = null;
  whyOff(true);
}

function failed(prob, message) {  // no answer: nothing of the last one stays beside the message
  resetResult();
  setResult("failed", "–", prob);
  $("#error").textContent = message;
  $("#error").hidden = false;
  $("#error").scrollIntoView({ block: "nearest" });
}

// A record of POST predict: its class and calibrated probability, or, where the record is unsure (the image is
// far from every product the model was trained on), that it is not one, with the class only as a muted guess.
function showResult(rec) {
  $("#error").hidden = true;
  const pct = (p) => `${(p * 100).toFixed(1)} %`;
  if (rec.unsure === true) {
    setResult("done", UNSURE, "", `If it had to choose, the model would guess ${rec.label} ` +
      `(${pct(rec.probability)}), but this image is unlike the products it was trained on.`, true);
  } else {
    setResult("done", rec.label, `${pct(rec.probability)} (calibrated)`);
  }
  $("#bars-title").textContent = rec.unsure === true ? "The model's guess, calibrated probabilities:" :
    "Calibrated probabilities:";
  $("#bars-title").hidden = false;
  $("#input-img").src = rec.input;
  $("#input-img").hidden = false;
  seen = rec;
  whyOff(false);
  $("#input-empty").hidden = true;
  $("#input-note").textContent = `The 28x28 image the model classified (${rec.preprocess} preprocessing).`;
  const bars = $("#bars");
  bars.classList.remove("stale");
  bars.classList.toggle("guess", rec.unsure === true);
  bars.replaceChildren();
  for (const t of rec.top) {
    const row = document.createElement("div");
    row.className = "barrow";
    row.innerHTML = `<span></span><span class="track" aria-hidden="true"><span class="fill"></span></span>` +
      `<span class="p"></span>`;
    row.children[0].textContent = t.label;
    row.querySelector(".fill").style.width = `${(t.probability * 100).toFixed(1)}%`;
    row.children[2].textContent = pct(t.probability);
    bars.appendChild(row);
  }
  // On a phone the answer is below the photos and the pad: scrolled into view (a screen showing it stays put).
  $("#result").scrollIntoView({ block: "nearest" });
}

async function classify(url, options) {
  const ask = ++asked;
  $("#error").hidden = true;
  setResult("waiting", "classifying…", "");
  whyOff(true);  // the reason for the last answer is not the reason for the next
  $("#bars").classList.add("stale");  // the previous answer stays in grey until this one comes
  try {
    const { top_k } = await getLimits();
    const rec = await api(`${url}?top_k=${Math.min(BARS, top_k.max)}&input=true`, options);
    if (ask === asked) showResult(rec);
  } catch (err) {
    if (ask === asked) failed("no answer", err.message);
  }
}

// ------------------------------------------------------------------ why: the attribution over the input the model saw

let seen = null;  // the record whose answer is shown (its input: the 28x28 PNG the model saw); null while none is
let whyAsked = 0;  // the latest explanation asked for: an older one that arrives late is dropped

// The plain input again, the button off; disabled while there is no answer to explain.
function whyOff(disabled) {
  ++whyAsked;
  const button = $("#why");
  button.setAttribute("aria-pressed", "false");
  button.disabled = disabled;
  $("#why-canvas").hidden = true;
  $("#why-legend").hidden = true;
  $("#why-status").textContent = "";
  $("#input-img").hidden = !$("#input-img").getAttribute("src");
}

function pngBlob(dataUrl) {  // a data: URL's bytes (fetching it would need the policy to allow data: connections)
  const bytes = atob(dataUrl.split(",")[1]);
  return new Blob([Uint8Array.from(bytes, (ch) => ch.charCodeAt(0))], { type: "image/png" });
}

// POST explain with the very 28x28 input the model classified (preprocess=dataset: taken as it is).
async function askWhy() {
  const button = $("#why");
  if (button.getAttribute("aria-pressed") === "true") { whyOff(false); return; }
  const ask = ++whyAsked, answer = asked;
  button.setAttribute("aria-pressed", "true");
  $("#why-status").textContent = "working out why…";
  try {
    const form = new FormData();
    form.append("file", pngBlob(seen.input), "input.png");
    const rec = await api("explain?preprocess=dataset", { method: "POST", body: form });
    if (ask === whyAsked && answer === asked) drawWhy(rec);
  } catch (err) {
    if (ask !== whyAsked || answer !== asked) return;
    button.setAttribute("aria-pressed", "false");
    $("#why-status").textContent = err.message;
  }
}
$("#why").addEventListener("click", askWhy);  // a button: Enter and Space too

// The input in grey (dimmed to 60 %), each pixel tinted by its attribution: red towards the class, blue against,
// the stronger the more opaque, on one scale symmetric about 0 (as fmnist explain's figure).
function drawWhy(rec) {
  const a = rec.attribution.flat(), px = rec.input.flat();
  const sorted = a.map(Math.abs).sort((u, v) => u - v);  // the 99th percentile of |a|, as fmnist explain's figure
  const at = 0.99 * (sorted.length - 1), lo = Math.floor(at);
  const scale = (sorted[lo] + (sorted[Math.min(lo + 1, sorted.length - 1)] - sorted[lo]) * (at - lo)) ||
    sorted[sorted.length - 1] || 1;
  const small = document.createElement("canvas");
  small.width = small.height = 28;
  const img = small.getContext("2d").createImageData(28, 28);
  a.forEach((v, i) => {
    const alpha = 0.9 * Math.sqrt(Math.min(Math.abs(v) / scale, 1)), tint = colour(0.5 + v / (2 * scale));
    img.data.set([...tint.map((t) => Math.round(t * alpha + 0.6 * px[i] * (1 - alpha))), 255], i * 4);
  });
  small.getContext("2d").putImageData(img, 0, 0);
  const canvas = $("#why-canvas");
  canvas.hidden = false;
  $("#input-img").hidden = true;
  const [c, w, h] = fit(canvas);
  c.imageSmoothingEnabled = false;  // each pixel one sharp square
  c.drawImage(small, 0, 0, w, h);
  canvas.dataset.target = rec.target;
  canvas.setAttribute("aria-label", `Why the model said ${rec.target}: the 28x28 image it saw, each pixel tinted ` +
    `red where it pushed the model towards ${rec.target}, blue where it pushed against.`);
  $("#why-class").textContent = rec.target;
  $("#why-legend").hidden = false;
  $("#why-status").textContent = "";
}

// What the probabilities mean, from GET model: the run's temperature and out-of-distribution score.
function showCalibration(model) {
  const c = model.calibration;
  if (!c) return;  // a model that does not describe itself
  $("#calibration-note").textContent = c.ood_threshold == null ?
    "This run was trained before fmnist calibrated: its probabilities are the model's own, and no image is " +
    "called unsure." :
    `Probabilities are calibrated (temperature ${Number(c.temperature.toPrecision(3))}): an answer given 90 % ` +
    "is right about 90 % of the time. An image whose out-of-distribution score " +
    `(${c.ood_method}) passes the run's threshold is called unsure.`;
  $("#calibration-note").hidden = false;
}

// ------------------------------------------------------------------ a file: chosen (button or keyboard) or dropped

async function classifyFile(file) {
  let most = null;
  try { most = (await getLimits()).max_body_bytes; } catch (err) { /* classify says why */ }
  if (most !== null && file.size > most) {
    const mib = (n) => `${(n / 2 ** 20).toFixed(1)} MiB`;
    ++asked;
    failed("not sent", `${file.name} is ${mib(file.size)}; this server takes files up to ${mib(most)}.`);
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  classify("predict", { method: "POST", body: form });
}

const fileInput = $("#file-input");
const drop = $("#drop");
drop.addEventListener("click", () => fileInput.click());  // a button: Enter and Space click it too
fileInput.addEventListener("change", () => {
  if (fileInput.files[0]) classifyFile(fileInput.files[0]);
  fileInput.value = "";  // the same file chosen again is classified again
});
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classifyFile(e.dataTransfer.files[0]);
});

// ------------------------------------------------------------------ example photos: classified as an upload is

async function classifyExample(example) {
  const ask = ++asked;
  let file;
  try {
    const response = await fetch(example.url);
    if (!response.ok) throw new Error(`The example ${example.file} could not be fetched (${response.status}).`);
    const blob = await response.blob();
    file = new File([blob], example.file, { type: blob.type });
  } catch (err) {
    if (ask === asked) {
      failed("no answer", err instanceof TypeError ?
        "The server is not answering: it may have stopped, or the network is down." : err.message);
    }
    return;
  }
  if (ask === asked) classifyFile(file);  // the same path as a chosen or dropped file
}

async function loadExamples() {
  const examples = await api("examples");
  const box = $("#examples");
  box.replaceChildren();
  for (const example of examples) {
    const button = document.createElement("button");
    const img = document.createElement("img");
    button.type = "button";
    button.className = "example";
    button.title = example.name;
    img.src = example.url;
    img.alt = `example photo: ${example.name}`;  // the button's accessible name
    img.addEventListener("error", () => { button.hidden = true; });  // no broken image
    button.appendChild(img);
    button.addEventListener("click", () => classifyExample(example));
    box.appendChild(button);
  }
  $("#examples-box").hidden = examples.length === 0;
}

// ------------------------------------------------------------------ drawing: mouse, pen or finger

const pad = $("#draw");
let ink = null;
let last = null;

function fitPad() {  // on a screen with 2 device pixels per CSS pixel the pad holds twice the pixels each way
  const old = pad.width ? pad : null;
  const copy = old && document.createElement("canvas");
  if (copy) { copy.width = pad.width; copy.height = pad.height; copy.getContext("2d").drawImage(pad, 0, 0); }
  const dpr = window.devicePixelRatio || 1;
  pad.width = Math.round(pad.clientWidth * dpr);
  pad.height = Math.round(pad.clientHeight * dpr);
  ink = pad.getContext("2d");
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  if (copy) ink.drawImage(copy, 0, 0, pad.width, pad.height);
}

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
}

function point(e) {  // in the pad's own pixels
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function stroke(p) {
  ink.strokeStyle = "#fff";
  ink.lineWidth = pad.width * 18 / 280;  // 18 of 280 pixels: as thick, once scaled to 28, as the dataset's lines
  ink.lineCap = ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(last[0], last[1]);
  ink.lineTo(p[0], p[1]);
  ink.stroke();
}

pad.addEventListener("pointerdown", (e) => { pad.setPointerCapture(e.pointerId); last = point(e); stroke(last); });
pad.addEventListener("pointermove", (e) => { if (last) { const p = point(e); stroke(p); last = p; } });
pad.addEventListener("pointerup", () => { last = null; classifyDrawing(); });
pad.addEventListener("pointercancel", () => { last = null; });
$("#clear").addEventListener("click", () => {
  clearPad();
  ++asked;  // an answer still on its way is for a drawing that is gone
  resetResult();
});

// As the dataset: the drawing's bounding box scaled so that its longest edge fills 28 pixels, centred.
function classifyDrawing() {
  const { data, width, height } = ink.getImageData(0, 0, pad.width, pad.height);
  let top = height, left = width, bottom = -1, right = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[(y * width + x) * 4] > 20) {
        top = Math.min(top, y); bottom = Math.max(bottom, y);
        left = Math.min(left, x); right = Math.max(right, x);
      }
    }
  }
  if (bottom < 0) return;  // nothing drawn
  const w = right - left + 1, h = bottom - top + 1, scale = 28 / Math.max(w, h);
  const small = document.createElement("canvas");
  small.width = small.height = 28;
  const sctx = small.getContext("2d");
  sctx.fillStyle = "#000";
  sctx.fillRect(0, 0, 28, 28);
  sctx.imageSmoothingQuality = "high";
  const dw = Math.max(1, Math.round(w * scale)), dh = Math.max(1, Math.round(h * scale));
  sctx.drawImage(pad, left, top, w, h, Math.floor((28 - dw) / 2), Math.floor((28 - dh) / 2), dw, dh);
  const px = sctx.getImageData(0, 0, 28, 28).data;
  const pixels = [];
  for (let y = 0; y < 28; y++) pixels.push(Array.from({ length: 28 }, (_, x) => px[(y * 28 + x) * 4]));
  classify("predict/pixels", {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ pixels }),
  });
}

// ------------------------------------------------------------------ explore: facts, curves, neurons

let explore = "idle";  // "idle" (not loaded, or failed), "loading", "done"
let retry = null;
let history = null;
let neuronInfo = null;  // GET neurons: count, shape, tracked, default

async function loadExplore() {
  if (explore !== "idle") return;
  explore = "loading";
  clearTimeout(retry);
  say("Loading the run…");
  try {
    const [model, neurons] = await Promise.all([api("model"), api("neurons")]);
    let note = "";
    try {
      history = await api("history");
    } catch (err) {
      if (err instanceof ServerDown) throw err;
      history = null;
      note = err.message;  // a run without history.jsonl: the rest still works
    }
    showFacts(model);
    $("#history-note").textContent = note;
    $("#history-note").hidden = !note;
    drawCharts();
    neuronInfo = neurons;
    const input = $("#neuron-input");
    if (!neurons.count) {  // an exported model: no layers to picture; say so instead of an empty figure
      $("#neuron-count").textContent = "";
      input.disabled = true;
      showNeuron(null, "", neurons.note);
      explore = "done";
      say("");
      return;
    }
    $("#neuron-count").textContent = `of ${neurons.count}` +
      (neurons.tracked.length ? `; every epoch for ${neurons.tracked.join(", ")}` : "");
    input.value = String(neurons.default);
    loadNeuron(neurons.default);
    explore = "done";
    say("");
  } catch (err) {
    explore = "idle";
    if (err instanceof ServerDown) {
      say(`${err.message} Trying again every ${RETRY_MS / 1000} seconds.`);
      retry = setTimeout(loadExplore, RETRY_MS);
    } else {
      say(err.message);
    }
  }
}

function say(text) {  // Explore's own status line: loading, or why nothing is shown
  $("#explore-status").textContent = text;
  $("#explore-status").hidden = !text;
}

function showFacts(model) {
  const pct = (v) => (v == null ? "–" : `${(v * 100).toFixed(2)} %`);
  const facts = [["model", model.model], ["parameters", model.parameters.toLocaleString("en")],
    ["best epoch", model.epoch], ["validation accuracy", pct(model.validation_accuracy)],
    ["test accuracy", pct(model.test_accuracy)]];
  const dl = $("#facts");
  dl.replaceChildren();
  for (const [k, v] of facts) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

function drawCharts() {
  if (!history || !history.length || $("#explore").hidden) return;
  const n = (v) => v.toFixed(3), pct = (v) => `${(v * 100).toFixed(1)} %`;
  chart($("#loss-chart"), "Loss", history, "train_loss", "val_loss", n);
  chart($("#acc-chart"), "Accuracy", history, "train_acc", "val_acc", pct);
}

function chart(canvas, title, rows, a, b, show) {
  const [c, W, H] = fit(canvas);
  const L = 44, R = 10, T = 10, B = 24;
  const values = rows.flatMap((r) => [r[a], r[b]]);
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const x = (i) => L + (W - L - R) * (rows.length > 1 ? i / (rows.length - 1) : 0.5);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / span);
  c.clearRect(0, 0, W, H);
  c.font = "11px system-ui, sans-serif";
  c.fillStyle = "#5a5f6b";
  c.strokeStyle = "#dde";
  c.lineWidth = 1;
  for (let k = 0; k <= 4; k++) {
    const v = lo + span * k / 4;
    c.beginPath(); c.moveTo(L, y(v)); c.lineTo(W - R, y(v)); c.stroke();
    c.fillText(v.toFixed(3), 2, y(v) + 4);
  }
  const first = rows[0].epoch, end = rows[rows.length - 1].epoch;
  c.fillText(`epoch ${first}`, L, H - 6);
  c.textAlign = "right";
  c.fillText(`${end}`, W - R, H - 6);
  c.textAlign = "left";
  for (const [key, colour] of [[a, "#3465a4"], [b, "#cc5a00"]]) {
    c.strokeStyle = colour;
    c.lineWidth = 2;
    c.beginPath();
    rows.forEach((r, i) => (i ? c.lineTo(x(i), y(r[key])) : c.moveTo(x(i), y(r[key]))));
    c.stroke();
  }
  const at = (key) => `${show(rows[0][key])} to ${show(rows[rows.length - 1][key])}`;
  canvas.setAttribute("aria-label", `${title} by epoch, ${first} to ${end}: training ${at(a)}, ` +
    `validation ${at(b)}.`);
}

// ------------------------------------------------------------------ a neuron: the number and picture always agree

// matplotlib's RdBu_r: blue for negative weights, white for 0, red for positive
const RDBU = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d",
  "#b2182b", "#67001f"].map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));

function colour(t) {  // t in [0, 1]
  const s = Math.min(Math.max(t, 0), 1) * (RDBU.length - 1), i = Math.min(Math.floor(s), RDBU.length - 2), f = s - i;
  return RDBU[i].map((v, k) => Math.round(v + (RDBU[i + 1][k] - v) * f));
}

let neuron = null;  // GET neurons/k: {neuron, tracked, labels, scale, frames}, or null while none is shown
let neuronAsked = 0;  // the latest neuron asked for: an older answer that arrives late is dropped

function neuronProblem(text) {  // why the field names no neuron, or null
  const n = neuronInfo.count, t = text.trim();
  if (!/^[+-]?\d+$/.test(t)) {
    return t ? `“${t}” is not a whole number: enter a neuron from 1 to ${n}.` : `Enter a neuron from 1 to ${n}.`;
  }
  const k = Number(t);
  return k >= 1 && k <= n ? null : `There is no neuron ${k}: the first layer has neurons 1 to ${n}.`;
}

function showProfile(profile, message) {  // what the neuron responds to, or none, with a message
  $("#profile-message").textContent = message;
  $("#profile-body").hidden = !profile;
  const top = $("#profile-top"), classes = $("#profile-classes");
  top.replaceChildren();
  classes.replaceChildren();
  if (!profile) return;
  for (const t of profile.top) {  // each test image as a 28x28 picture, white on black as the dataset has it
    const small = document.createElement("canvas");
    small.width = 28;
    small.height = 28;
    const img = small.getContext("2d").createImageData(28, 28);
    t.pixels.flat().forEach((v, i) => img.data.set([v, v, v, 255], i * 4));
    small.getContext("2d").putImageData(img, 0, 0);
    const li = document.createElement("li"), pic = document.createElement("img"), cap = document.createElement("span");
    pic.src = small.toDataURL();
    pic.alt = `test image ${t.index}, a ${profile.classes[t.label]}, response ${t.activation.toFixed(2)}`;
    cap.textContent = profile.classes[t.label];
    cap.setAttribute("aria-hidden", "true");
    li.append(pic, cap);
    top.append(li);
  }
  const most = Math.max(...profile.per_class.map(Math.abs)) || 1;
  profile.classes.forEach((name, c) => {
    const li = document.createElement("li"), label = document.createElement("span");
    const bar = document.createElement("span");
    const mean = profile.per_class[c], vote = profile.votes[c];
    label.className = "profile-name";
    label.textContent = name;
    bar.className = "profile-bar" + (mean < 0 ? " negative" : "");
    bar.style.width = `${(100 * Math.abs(mean)) / most}%`;
    bar.setAttribute("aria-hidden", "true");
    const figures = document.createElement("span");
    figures.className = "profile-figures";
    figures.textContent = `${mean.toFixed(2)}, vote ${vote >= 0 ? "+" : ""}${vote.toFixed(2)}`;
    li.append(label, bar, figures);
    classes.append(li);
  });
}

async function loadProfile(k, ask) {
  showProfile(null, `finding the test images that excite neuron ${k} most…`);
  try {
    const profile = await api(`neurons/${k}/profile`);
    if (ask === neuronAsked) showProfile(profile, `The ${profile.top.length} test images that excite ${profile.kind} ` +
      `${k} most, most first:`);
  } catch (err) {
    if (ask === neuronAsked) showProfile(null, err.message);
  }
}

function showNeuron(shown, label, message) {  // the picture of `shown`, or none, with a label and a message
  neuron = shown;
  if (!shown) showProfile(null, "");
  $("#neuron-figure").hidden = !shown;
  $("#epoch-label").textContent = label;
  const m = $("#neuron-message");
  m.textContent = message || "";
  m.hidden = !message;
  $("#neuron-input").setAttribute("aria-invalid", String(Boolean(message)));
}

async function loadNeuron(k) {
  const ask = ++neuronAsked;
  showNeuron(null, `loading neuron ${k}…`, "");
  try {
    const answer = await api(`neurons/${k}`);
    if (ask !== neuronAsked) return;
    showNeuron(answer, "", "");
    const slider = $("#epoch-slider");
    slider.max = answer.frames.length - 1;
    slider.value = answer.frames.length - 1;
    $("#slider-row").hidden = answer.frames.length === 1;  // final weights only: nothing to scrub through
    $("#scale-low").textContent = (-answer.scale).toFixed(3);
    $("#scale-high").textContent = answer.scale.toFixed(3);
    drawNeuron(answer.frames.length - 1);
    loadProfile(k, ask);
  } catch (err) {
    if (ask !== neuronAsked) return;
    showNeuron(null, "", err.message);
    if (err instanceof ServerDown) setTimeout(() => { if (ask === neuronAsked) loadNeuron(k); }, RETRY_MS);
  }
}

function drawNeuron(e) {
  const frame = neuron.frames[e], h = frame.length, w = frame[0].length;
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const img = small.getContext("2d").createImageData(w, h);
  frame.flat().forEach((v, i) => {
    const [r, g, b] = colour(0.5 + v / (2 * neuron.scale));
    img.data.set([r, g, b, 255], i * 4);
  });
  small.getContext("2d").putImageData(img, 0, 0);
  const canvas = $("#neuron-canvas");
  const [c, cw, ch] = fit(canvas);
  c.imageSmoothingEnabled = false;  // each weight one sharp square
  c.drawImage(small, 0, 0, cw, ch);
  canvas.dataset.neuron = String(neuron.neuron);
  const label = neuron.labels[e];
  $("#epoch-label").textContent = label;
  $("#epoch-slider").setAttribute("aria-valuetext", label);
  canvas.setAttribute("aria-label", `Neuron ${neuron.neuron}, ${label}: its ${w * h} incoming weights as a ` +
    `${w}x${h} picture, from ${(-neuron.scale).toFixed(3)} (blue) to ${neuron.scale.toFixed(3)} (red).`);
}

function redrawExplore() {
  drawCharts();
  if (neuron && !$("#explore").hidden) drawNeuron(Number($("#epoch-slider").value));
}

let typing = null;
$("#epoch-slider").addEventListener("input", (e) => { if (neuron) drawNeuron(Number(e.target.value)); });
$("#neuron-input").addEventListener("input", (e) => {
  if (!neuronInfo) return;
  clearTimeout(typing);
  ++neuronAsked;  // whatever was on its way is for another number
  const problem = neuronProblem(e.target.value);
  if (problem) { showNeuron(null, "", problem); return; }
  showNeuron(null, `neuron ${Number(e.target.value.trim())}…`, "");
  typing = setTimeout(() => loadNeuron(Number(e.target.value.trim())), 250);  // once the typing pauses
});
$("#neuron-input").addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || !neuronInfo || neuronProblem(e.target.value)) return;
  clearTimeout(typing);
  loadNeuron(Number(e.target.value.trim()));
});

// ------------------------------------------------------------------ start

let width = window.innerWidth;
window.addEventListener("resize", () => {  // a phone turned, a window resized: redraw at the new size
  if (window.innerWidth === width) return;  // a phone's address bar sliding away changes only the height
  width = window.innerWidth;
  fitPad();
  redrawExplore();
});

fitPad();
getLimits().catch(() => {});  // asked again when a classification needs them (and the key asked for, if needed)
api("model").then((m) => {
  $("#model-name").textContent = `${m.name} (${m.backend})`;
  showCalibration(m);
}).catch(() => {});
loadExamples().catch(() => {});  // no server, no examples: the upload and the pad still say why
