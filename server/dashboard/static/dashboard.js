// The dashboard's little JavaScript: the Status page refreshes itself, the time slider shows its date and reloads.
"use strict";

function utcLabel(seconds) {
  return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

function refreshEvery(seconds) {
  // Replaces the page's main part in place (no flash, scroll kept); stops while the tab is hidden.
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("main");
      if (fresh) document.getElementById("main").replaceChildren(...fresh.childNodes);
    } catch (error) {
      // The server restarting: try again at the next tick.
    }
  }, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const refresh = document.body.dataset.refresh;
  if (refresh) refreshEvery(Number(refresh));
  const slider = document.getElementById("at-slider");
  if (slider) {
    const label = document.getElementById("at-label");
    slider.addEventListener("input", () => { label.textContent = utcLabel(Number(slider.value)); });
    slider.addEventListener("change", () => { document.getElementById("preview-form").submit(); });
  }
});
