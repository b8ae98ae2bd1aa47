// The EmoLoRA panel (Gradio) as a ComfyUI sidebar tab, beside the graph. The first open starts the panel through
// POST /emolora/panel (once per ComfyUI process, on 127.0.0.1) and embeds it in an iframe served through ComfyUI's
// own origin (/emolora/panel/ui/, a forwarding route: ComfyUI may forbid frames from other origins, and a remote
// browser cannot reach the panel's loopback port). The tab never reads into the frame; it points it at the run
// the graph trains (?run=<run folder>); the panel also follows the newest running run by itself.

export const TAB_ID = "emolora-panel";

function frameUrl(api, run) {
  const path = api.apiURL("/emolora/panel/ui/");
  return run ? `${path}?run=${encodeURIComponent(run)}` : path;
}

function render(el, api, state) {
  el.innerHTML = "";
  const root = document.createElement("div");
  root.className = "emolora-sidebar";
  root.style.cssText = "display:flex;flex-direction:column;height:100%;min-height:70vh;gap:4px;padding:4px";
  const head = document.createElement("div");
  head.className = "emolora-sidebar-status";
  head.style.cssText = "font-size:12px;opacity:.85";
  head.textContent = "starting the EmoLoRA panel…";
  root.append(head);
  el.append(root);
  api.fetchApi("/emolora/panel", { method: "POST" })
    .then((res) => res.json())
    .then((body) => {
      if (!body.url) throw new Error(body.error || "the panel did not start");
      const run = state.run || null;
      head.innerHTML = "";
      const label = document.createElement("span");
      label.textContent = run ? `run ${run} ` : "following the newest running run ";
      const link = document.createElement("a");
      link.href = frameUrl(api, run);
      link.target = "_blank";
      link.rel = "noopener";
      link.textContent = "open in a new tab";
      head.append(label, link);
      const frame = document.createElement("iframe");
      frame.className = "emolora-panel-frame";
      frame.title = "EmoLoRA panel";
      frame.src = frameUrl(api, run);
      frame.style.cssText = "flex:1;width:100%;min-height:65vh;border:0;background:#fff";
      root.append(frame);
    })
    .catch((e) => { head.textContent = `EmoLoRA panel unavailable: ${e.message || e}`; });
}

export function registerPanelTab(app, api, state) {
  const manager = app.extensionManager;
  if (!manager?.registerSidebarTab) {
    console.info("EmoLoRA: this ComfyUI frontend has no sidebar tabs; use the panel button on the trainer node");
    return;
  }
  manager.registerSidebarTab({
    id: TAB_ID,
    icon: "pi pi-chart-line",
    title: "EmoLoRA",
    tooltip: "EmoLoRA training panel",
    label: "EmoLoRA",
    type: "custom",
    render: (el) => render(el, api, state),
  });
}
