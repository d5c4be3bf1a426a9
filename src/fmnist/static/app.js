// fmnist's page: classify a photo or a drawing, explore the run's curves and first-layer neurons.
// Plain JavaScript, no build step, nothing fetched from anywhere but this server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOP_K = 5;

// ------------------------------------------------------------------ tabs

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === tab.dataset.panel);
    if (tab.dataset.panel === "explore") loadExplore();
  });
}

// ------------------------------------------------------------------ results

function showResult(rec) {
  $("#error").hidden = true;
  $("#result-label").textContent = rec.label;
  $("#result-prob").textContent = `${(rec.probability * 100).toFixed(1)} %`;
  $("#input-img").src = rec.input;
  $("#input-note").textContent = `The 28x28 image the model classified (${rec.preprocess} preprocessing).`;
  const bars = $("#bars");
  bars.replaceChildren();
  for (const t of rec.top) {
    const row = document.createElement("div");
    row.className = "barrow";
    row.innerHTML = `<span></span><span class="track"><span class="fill"></span></span><span class="p"></span>`;
    row.children[0].textContent = t.label;
    row.querySelector(".fill").style.width = `${(t.probability * 100).toFixed(1)}%`;
    row.children[2].textContent = `${(t.probability * 100).toFixed(1)} %`;
    bars.appendChild(row);
  }
}

function showError(text) {
  $("#error").textContent = text;
  $("#error").hidden = false;
}

async function send(url, options) {
  try {
    const response = await fetch(url, options);
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch (err) { body = { detail: text }; }  // a 413 is plain text
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      showError(`${response.status}: ${detail}`);
      return;
    }
    showResult(body);
  } catch (err) {
    showError(`the server did not answer (${err})`);
  }
}

// ------------------------------------------------------------------ a file: chosen or dropped

function classifyFile(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  send(`/predict?top_k=${TOP_K}&input=true`, { method: "POST", body: form });
}

$("#file-input").addEventListener("change", (e) => { if (e.target.files[0]) classifyFile(e.target.files[0]); });
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classifyFile(e.dataTransfer.files[0]);
});

// ------------------------------------------------------------------ drawing: mouse, pen or finger

const pad = $("#draw");
const ink = pad.getContext("2d");
function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
}
clearPad();
let last = null;

function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}
pad.addEventListener("pointerdown", (e) => { pad.setPointerCapture(e.pointerId); last = point(e); stroke(last); });
pad.addEventListener("pointermove", (e) => { if (last) { const p = point(e); stroke(p); last = p; } });
pad.addEventListener("pointerup", () => { last = null; classifyDrawing(); });
pad.addEventListener("pointercancel", () => { last = null; });
$("#clear").addEventListener("click", clearPad);

function stroke(p) {
  ink.strokeStyle = "#fff";
  ink.lineWidth = 18;
  ink.lineCap = ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(last[0], last[1]);
  ink.lineTo(p[0], p[1]);
  ink.stroke();
}

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
  send(`/predict/pixels?top_k=${TOP_K}&input=true`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ pixels }),
  });
}

// ------------------------------------------------------------------ explore: facts, curves, neurons

let explored = false;
let neuronInfo = null;
let neuron = null;  // {neuron, labels, scale, frames}

async function loadExplore() {
  if (explored) return;
  explored = true;
  const [model, history, neurons] = await Promise.all(
    ["/model", "/history", "/neurons"].map((u) => fetch(u).then((r) => (r.ok ? r.json() : null))));
  if (model) {
    const pct = (v) => (v == null ? "–" : `${(v * 100).toFixed(2)} %`);
    const facts = [["model", model.model], ["parameters", model.parameters.toLocaleString("en")],
      ["best epoch", model.epoch], ["validation accuracy", pct(model.validation_accuracy)],
      ["test accuracy", pct(model.test_accuracy)]];
    $("#facts").innerHTML = facts.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("");
  }
  if (history) {
    chart($("#loss-chart"), history, "train_loss", "val_loss");
    chart($("#acc-chart"), history, "train_acc", "val_acc");
  }
  if (neurons) {
    neuronInfo = neurons;
    const input = $("#neuron-input");
    input.max = neurons.count;
    input.value = neurons.default;
    $("#neuron-count").textContent = `of ${neurons.count}` +
      (neurons.tracked.length ? `; every epoch for ${neurons.tracked.join(", ")}` : "");
    await loadNeuron(neurons.default);
  }
}

function chart(canvas, rows, a, b) {
  const c = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 44, R = 10, T = 10, B = 24;
  const values = rows.flatMap((r) => [r[a], r[b]]);
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const x = (i) => L + (W - L - R) * (rows.length > 1 ? i / (rows.length - 1) : 0.5);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / span);
  c.clearRect(0, 0, W, H);
  c.font = "11px system-ui, sans-serif";
  c.fillStyle = "#667";
  c.strokeStyle = "#dde";
  for (let k = 0; k <= 4; k++) {
    const v = lo + span * k / 4;
    c.beginPath(); c.moveTo(L, y(v)); c.lineTo(W - R, y(v)); c.stroke();
    c.fillText(v.toFixed(3), 2, y(v) + 4);
  }
  c.fillText(`epoch ${rows[0].epoch}`, L, H - 6);
  c.fillText(`${rows[rows.length - 1].epoch}`, W - R - 14, H - 6);
  for (const [key, colour] of [[a, "#3465a4"], [b, "#cc5a00"]]) {
    c.strokeStyle = colour;
    c.lineWidth = 2;
    c.beginPath();
    rows.forEach((r, i) => (i ? c.lineTo(x(i), y(r[key])) : c.moveTo(x(i), y(r[key]))));
    c.stroke();
  }
  c.lineWidth = 1;
}

// matplotlib's RdBu_r: blue for negative weights, white for 0, red for positive
const RDBU = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d",
  "#b2182b", "#67001f"].map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));

function colour(t) {  // t in [0, 1]
  const s = Math.min(Math.max(t, 0), 1) * (RDBU.length - 1), i = Math.min(Math.floor(s), RDBU.length - 2), f = s - i;
  return RDBU[i].map((v, k) => Math.round(v + (RDBU[i + 1][k] - v) * f));
}

async function loadNeuron(k) {
  const r = await fetch(`/neurons/${k}`);
  if (!r.ok) { $("#epoch-label").textContent = (await r.json()).detail; return; }
  neuron = await r.json();
  const slider = $("#epoch-slider");
  slider.max = neuron.frames.length - 1;
  slider.value = neuron.frames.length - 1;
  slider.disabled = neuron.frames.length === 1;
  $("#scale-low").textContent = (-neuron.scale).toFixed(3);
  $("#scale-high").textContent = neuron.scale.toFixed(3);
  drawNeuron(neuron.frames.length - 1);
}

function drawNeuron(e) {
  const frame = neuron.frames[e], h = frame.length, w = frame[0].length;
  const canvas = $("#neuron-canvas");
  canvas.width = w;
  canvas.height = h;
  const c = canvas.getContext("2d");
  const img = c.createImageData(w, h);
  frame.flat().forEach((v, i) => {
    const [r, g, b] = colour(0.5 + v / (2 * neuron.scale));
    img.data.set([r, g, b, 255], i * 4);
  });
  c.putImageData(img, 0, 0);
  $("#epoch-label").textContent = neuron.labels[e];
}

$("#epoch-slider").addEventListener("input", (e) => drawNeuron(Number(e.target.value)));
$("#neuron-input").addEventListener("change", (e) => {
  const k = Number(e.target.value);
  if (neuronInfo && k >= 1 && k <= neuronInfo.count) loadNeuron(k);
});

fetch("/health").then((r) => r.json()).then((h) => { $("#model-name").textContent = `${h.model} (${h.backend})`; });
