// EmoLoRA frontend extension: a live mini chart (loss and emo_scalar) on the trainer node, fed by the
// "emolora.telemetry" websocket events the trainer sends (throttled to ~4/s; a "warning" event's message is
// written under the chart), a button that opens the panel, the
// real defaults in the Optimizer and Trainer widgets (emolora_defaults.js) and the panel as a sidebar tab
// (emolora_sidebar.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { OPTIMIZER, followDefaults } from "./emolora_defaults.js";
import { registerPanelTab } from "./emolora_sidebar.js";

// The compact Trainer and the v0.1.0 all-options node kept for saved workflows: both train and draw the chart.
const TRAINERS = ["EmoLoRA_SDXLTrainer", "EmoLoRA_Trainer"];
const EVENT = "emolora.telemetry";
const MAX_POINTS = 2000;
const CHART_H = 140;

// Read by the browser test: how many events arrived and how many times a chart was drawn.
const state = (window.__emolora = window.__emolora || { events: 0, draws: 0, last: null });

function series(node) {
  if (!node.__emolora) node.__emolora = { step: [], loss: [], emo: [], status: "idle", total: 0, lora: null };
  return node.__emolora;
}

function range(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) {
    if (v === null || v === undefined || !Number.isFinite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (lo === Infinity) return null;
  if (hi - lo < 1e-12) { lo -= 0.5 * (Math.abs(lo) || 1); hi += 0.5 * (Math.abs(hi) || 1); }
  return [lo, hi];
}

function drawLine(ctx, xs, ys, x0, x1, y0, y1, color, s0, s1) {
  const r = range(ys);
  if (!r) return;
  const [lo, hi] = r;
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let started = false;
  for (let i = 0; i < xs.length; i++) {
    const v = ys[i];
    if (v === null || v === undefined || !Number.isFinite(v)) continue;
    const x = x0 + ((xs[i] - s0) / Math.max(1, s1 - s0)) * (x1 - x0);
    const y = y1 - ((v - lo) / (hi - lo)) * (y1 - y0);
    if (!started) { ctx.moveTo(x, y); started = true; } else ctx.lineTo(x, y);
  }
  ctx.stroke();
}

function draw(node) {
  const w = node.__emolora_canvas;
  if (!w) return;
  const s = series(node);
  const canvas = w;
  const width = Math.max(200, Math.floor(canvas.clientWidth || 300));
  canvas.width = width;
  canvas.height = CHART_H;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, width, CHART_H);
  const x0 = 6, x1 = width - 6, y0 = 18, y1 = CHART_H - 6;
  ctx.strokeStyle = "#444";
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  const s0 = s.step.length ? s.step[0] : 0;
  const s1 = Math.max(s.total || 0, s.step.length ? s.step[s.step.length - 1] : 1);
  drawLine(ctx, s.step, s.loss, x0, x1, y0, y1, "#4da3ff", s0, s1);
  drawLine(ctx, s.step, s.emo, x0, x1, y0, y1, "#ff9a3c", s0, s1);
  ctx.font = "11px sans-serif";
  const n = s.step.length;
  const lastLoss = n ? s.loss[n - 1] : null;
  const lastEmo = n ? s.emo[n - 1] : null;
  ctx.fillStyle = "#4da3ff";
  ctx.fillText(`loss ${lastLoss == null ? "-" : lastLoss.toFixed(4)}`, 6, 12);
  ctx.fillStyle = "#ff9a3c";
  ctx.fillText(`emo ${lastEmo == null ? "-" : lastEmo.toFixed(3)}`, 100, 12);
  ctx.fillStyle = "#bbb";
  const step = n ? s.step[n - 1] : 0;
  ctx.fillText(`${s.status} ${step}/${s.total || "?"}`, Math.max(180, width - 110), 12);
  if (s.warning) {  // the trainer's "barely changed the LoRA" warning, wrapped at the foot of the chart
    ctx.fillStyle = "#ff6b6b";
    const lines = [];
    for (const word of s.warning.split(" ")) {
      const last = lines.length ? lines[lines.length - 1] : null;
      if (last !== null && ctx.measureText(`${last} ${word}`).width <= x1 - x0 - 8) lines[lines.length - 1] += ` ${word}`;
      else lines.push(word);
    }
    lines.forEach((line, i) => ctx.fillText(line, x0 + 4, y1 - 6 - 13 * (lines.length - 1 - i)));
  }
  state.draws += 1;
  node.setDirtyCanvas?.(true, false);
}

async function openPanel() {
  try {
    const res = await api.fetchApi("/emolora/panel", { method: "POST" });
    const body = await res.json();
    if (body.url) window.open(body.url, "_blank", "noopener");
    else alert(`EmoLoRA panel: ${body.error || "unavailable"}`);
  } catch (e) {
    alert(`EmoLoRA panel: ${e}`);
  }
}

function onTelemetry(event) {
  const d = event.detail || {};
  state.events += 1;
  state.last = d;
  const graph = app.graph;
  if (!graph || d.node === null || d.node === undefined) return;
  const node = graph.getNodeById(Number(d.node)) || graph.getNodeById(d.node);
  if (!node || !TRAINERS.includes(node.type)) return;
  const s = series(node);
  if (d.status === "starting") {
    s.step = []; s.loss = []; s.emo = []; s.lora = null; s.warning = null;
  }
  if (d.status === "warning") { s.warning = d.message || null; state.warning = s.warning; }  // a line, not a status
  else if (d.status === "sample") { s.samples = (s.samples || 0) + 1; state.samples = (state.samples || 0) + 1; }
  else if (d.status) s.status = d.status;
  if (d.run_dir) state.run = d.run_dir.split(/[\\/]/).filter(Boolean).pop();
  if (d.steps_total) s.total = d.steps_total;
  if (d.lora) s.lora = d.lora;
  if (d.status === "running" && Number.isFinite(d.step)) {
    s.step.push(d.step);
    s.loss.push(d.loss ?? null);
    s.emo.push(d.emo_scalar ?? null);
    if (s.step.length > MAX_POINTS) { s.step.shift(); s.loss.shift(); s.emo.shift(); }
  }
  draw(node);
}

app.registerExtension({
  name: "emolora.trainer",
  async setup() {
    api.addEventListener(EVENT, onTelemetry);
    registerPanelTab(app, api, state);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === OPTIMIZER || TRAINERS.includes(nodeData.name)) followDefaults(nodeType, nodeData.name, api);
    if (TRAINERS.includes(nodeData.name)) {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        const canvas = document.createElement("canvas");
        canvas.className = "emolora-chart";
        canvas.style.width = "100%";
        canvas.style.height = `${CHART_H}px`;
        this.__emolora_canvas = canvas;
        const widget = this.addDOMWidget("emolora_chart", "emolora_chart", canvas, {
          serialize: false,
          hideOnZoom: false,
          getMinHeight: () => CHART_H,
          getHeight: () => CHART_H,
        });
        if (widget) widget.serialize = false;
        const button = this.addWidget("button", "open EmoLoRA panel", null, openPanel);
        if (button) { button.serialize = false; button.options = { ...(button.options || {}), serialize: false }; }
        requestAnimationFrame(() => draw(this));
        return r;
      };
    }
    if (nodeData.name === "EmoLoRA_Panel") {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        const button = this.addWidget("button", "open EmoLoRA panel", null, openPanel);
        if (button) button.serialize = false;
        return r;
      };
    }
  },
});
