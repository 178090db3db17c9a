// The ops page: fetches the latest pool map with the admin token (sessionStorage, this tab only, a Bearer
// header, never in a URL) and shows it from a blob URL; the page itself holds no data.
"use strict";

(() => {
  const TOKEN_KEY = "guardloop.adminToken";
  const $ = (id) => document.getElementById(id);

  async function show() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) return;
    const answer = await fetch("/admin/ops/pool-map.png", { headers: { Authorization: `Bearer ${token}` } });
    if (!answer.ok) {
      let detail = `HTTP ${answer.status}`;
      try {
        detail = (await answer.json()).detail || detail;
      } catch (_) {}
      if (answer.status === 401 || answer.status === 403) sessionStorage.removeItem(TOKEN_KEY);
      $("status").textContent = detail;
      document.body.dataset.state = answer.status === 404 ? "empty" : "login";
      return;
    }
    const image = $("map");
    image.src = URL.createObjectURL(await answer.blob());
    image.hidden = false;
    $("drawn").textContent = `drawn ${answer.headers.get("X-Drawn-At") || ""}`;
    $("status").textContent = "";
    document.body.dataset.state = "ready";
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    show();
  });
  show();
})();
