// Enhancements only: every page works without this script.
// On the undo-cycle page, follow a replay live over Server-Sent Events and reload when the mode changes.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (!live) return;
  if (live.dataset.poll) { setTimeout(() => window.location.reload(), 1000 * live.dataset.poll); return; }
  if (!window.EventSource) return;
  const bar = document.getElementById("progress");
  const text = document.getElementById("progress-text");
  const source = new EventSource(live.dataset.events);
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    if (bar) { bar.max = Math.max(p.total, 1); bar.value = p.replayed; }
    if (text) text.textContent = p.replayed + " / " + p.total;
  });
  source.addEventListener("mode", (e) => {
    if (JSON.parse(e.data).mode !== live.dataset.mode) { source.close(); window.location.reload(); }
  });
  window.addEventListener("beforeunload", () => source.close());
});
