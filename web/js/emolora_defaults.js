// Real values in the widgets, never sentinels: picking an optimizer (or an optimizer preset) on the Optimizer node
// fills lr, betas, weight decay, ... with what that optimizer trains with; picking a training preset on the
// Trainer node fills its widgets (and the linked Training Options and Dataset nodes') with the preset's values. The values come from
// GET /emolora/defaults, computed by the trainer's own config merge. Only a user's pick changes widgets: a loaded
// workflow keeps the values it recorded, which are the values that trained.

export const OPTIMIZER = "EmoLoRA_Optimizer";
const AUTO_PRESET = "auto (the optimizer's own)";
const NO_PRESET = "none";
// trainer config key -> [widget name, value mapping]; keys without an entry use the widget of the same name
const CONFIG_TO_WIDGET = {
  mixed_precision: ["precision", (v) => ({ no: "fp32" }[v] || v)],
  auto_stop: ["auto_stop", (v) => v === "stop"],
};

let table = null;
async function defaults(api) {
  if (!table) {
    table = (async () => {
      const res = await api.fetchApi("/emolora/defaults");
      const body = await res.json();
      if (!res.ok) throw new Error(body.error || res.statusText);
      return body;
    })();
    table.catch(() => { table = null; });  // retry on the next pick
  }
  return table;
}

function widget(node, name) {
  return (node?.widgets || []).find((w) => w.name === name);
}

function setWidget(node, name, value) {
  const w = widget(node, name);
  if (!w || value === undefined || value === null) return false;
  w.value = value;
  return true;
}

async function fillOptimizer(node, api) {
  const t = await defaults(api);
  const name = widget(node, "optimizer")?.value;
  const presetW = widget(node, "preset");
  const byPreset = t.optimizers[name];
  if (!byPreset) return;
  if (presetW && !(presetW.value in byPreset)) presetW.value = AUTO_PRESET;  // a preset of another optimizer
  const values = byPreset[presetW?.value] || byPreset[AUTO_PRESET];
  for (const [k, v] of Object.entries(values)) setWidget(node, k, v);
  node.setDirtyCanvas?.(true, true);
}

function linkedNode(node, inputName) {
  const slot = (node.inputs || []).findIndex((i) => i.name === inputName);
  return slot >= 0 ? node.getInputNode?.(slot) : null;
}

async function fillTrainer(node, api) {
  const t = await defaults(api);
  const preset = widget(node, "preset")?.value;
  if (!preset || preset === NO_PRESET) return;
  const settings = t.training_presets[preset]?.settings || {};
  const linked = [linkedNode(node, "options"), linkedNode(node, "dataset")].filter(Boolean);
  for (const [key, raw] of Object.entries(settings)) {
    const [name, map] = CONFIG_TO_WIDGET[key] || [key, (v) => v];
    let value = map(raw);
    if (key === "alpha" && value === null) value = 0;  // the widget's "equal to rank"
    if (!setWidget(node, name, value)) linked.some((other) => setWidget(other, name, value));
  }
  for (const n of [node, ...linked]) n.setDirtyCanvas?.(true, true);
}

function onPick(node, names, fill) {
  for (const name of names) {
    const w = widget(node, name);
    if (!w) continue;
    const previous = w.callback;
    w.callback = function () {
      const r = previous?.apply(this, arguments);
      fill().catch((e) => console.warn(`EmoLoRA: no defaults for ${name}: ${e}`));
      return r;
    };
  }
}

export function followDefaults(nodeType, nodeName, api) {
  const created = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const r = created?.apply(this, arguments);
    if (nodeName === OPTIMIZER) onPick(this, ["optimizer", "preset"], () => fillOptimizer(this, api));
    else onPick(this, ["preset"], () => fillTrainer(this, api));
    return r;
  };
}
