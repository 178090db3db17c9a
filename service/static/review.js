// The reviewer page: one item at a time; keys 1-6 label, s skips, u undoes the last answer.
// User text is written with textContent only (never parsed as HTML), so whatever it contains stays text.
// The token lives in sessionStorage: this tab only, sent as a Bearer header, never in a URL or a cookie.
"use strict";

(() => {
  const TOKEN_KEY = "guardloop.reviewToken";
  const $ = (id) => document.getElementById(id);
  let current = null; // the item on screen
  let busy = false; // one request at a time: a key pressed twice must not label two items

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  function setState(state) {
    document.body.dataset.state = state; // ready | empty | busy | login (read by tests and CSS)
  }

  function say(message, isError = false) {
    const status = $("status");
    status.textContent = message;
    status.classList.toggle("error", isError);
  }

  function showLogin(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    current = null;
    $("review").hidden = true;
    $("who-wrap").hidden = true;
    $("login").hidden = false;
    setState("login");
    if (message) say(message, true);
    $("token").focus();
  }

  class AuthError extends Error {}

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${token()}` };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      return { ok: false, status: 0, data: { detail: "the service cannot be reached; try again" } };
    }
    let data = null;
    try {
      data = await response.json();
    } catch (error) {
      data = null;
    }
    if (response.status === 401 || response.status === 403) {
      showLogin((data && data.detail) || "sign in again");
      throw new AuthError();
    }
    return { ok: response.ok, status: response.status, data };
  }

  function detail(result) {
    const text = result.data && result.data.detail;
    return typeof text === "string" ? text : `request failed (${result.status})`;
  }

  function describeReason(reason) {
    if (!reason || typeof reason !== "object") return "sampled from the pool";
    const parts = [];
    for (const [key, value] of Object.entries(reason)) {
      const shown = typeof value === "number" ? value.toFixed(3).replace(/\.?0+$/, "") : String(value);
      parts.push(`${key}: ${shown}`);
    }
    return parts.length ? parts.join(" · ") : "requested by the trainer";
  }

  function showCounts(queueLength, myLabels) {
    $("queue-length").textContent = String(queueLength);
    $("my-count").textContent = String(myLabels);
  }

  function showItem(item) {
    current = item;
    $("empty").hidden = true;
    $("item").hidden = false;
    $("item-id").textContent = `#${item.id}`;
    $("item-text").textContent = item.text;
    // The canonical form when it differs (a disguise undone: "k1ll" read as "kill"); null otherwise.
    $("item-canonical").textContent = item.canonical_text || "";
    $("item-canonical-wrap").hidden = !item.canonical_text;
    $("item-prediction").textContent = item.predicted_label;
    $("item-uncertainty").textContent = item.uncertainty.toFixed(2);
    $("item-reason").textContent = describeReason(item.reason);
    $("item-seen").textContent = item.seen_count === 1 ? "once" : `${item.seen_count} times`;
    const rows = $("item-scores");
    rows.replaceChildren();
    for (const { label, score } of item.scores.slice(0, 3)) {
      const row = document.createElement("tr");
      const name = document.createElement("td");
      const value = document.createElement("td");
      name.textContent = label;
      value.textContent = score.toFixed(3);
      row.append(name, value);
      rows.append(row);
    }
    document.body.dataset.itemId = String(item.id);
    setState("ready");
  }

  function showEmpty() {
    current = null;
    $("item").hidden = true;
    $("empty").hidden = false;
    delete document.body.dataset.itemId;
    setState("empty");
  }

  async function loadNext() {
    const result = await api("GET", "/review/queue?limit=1");
    if (!result.ok) {
      say(detail(result), true);
      return;
    }
    showCounts(result.data.queue_length, result.data.my_labels);
    if (result.data.items.length) showItem(result.data.items[0]);
    else showEmpty();
  }

  async function run(action) {
    if (busy) return;
    busy = true;
    setState("busy");
    try {
      await action();
    } catch (error) {
      if (!(error instanceof AuthError)) say(String(error), true);
    } finally {
      busy = false;
      if (document.body.dataset.state === "busy") setState(current ? "ready" : "empty");
    }
  }

  function answer(label) {
    return run(async () => {
      if (!current) return;
      const item = current;
      const comment = $("comment").value.trim();
      const result = await api("POST", `/review/items/${item.id}/label`, { label, comment: comment || null });
      if (result.ok) {
        $("comment").value = "";
        say(`Item #${item.id}: ${label}. Press u to undo.`);
      } else {
        say(detail(result), true);
        if (result.status !== 409) return; // 409: someone else finished it, or you already answered: move on
      }
      await loadNext();
    });
  }

  function undo() {
    return run(async () => {
      const result = await api("POST", "/review/undo");
      if (!result.ok) {
        say(detail(result), true);
        return;
      }
      // Counts first: the item shown (state "ready") then never sits beside the counts from before the undo.
      const stats = await api("GET", "/review/stats");
      if (stats.ok) showCounts(stats.data.queue_length, stats.data.my_labels);
      showItem(result.data.item);
      say(`Undid "${result.data.undone.label}" on item #${result.data.item.id}; answer it again.`);
    });
  }

  async function start() {
    if (!token()) {
      showLogin();
      return;
    }
    await run(async () => {
      const stats = await api("GET", "/review/stats");
      if (!stats.ok) {
        say(detail(stats), true);
        return;
      }
      $("login").hidden = true;
      $("review").hidden = false;
      $("who").textContent = stats.data.reviewer;
      $("who-wrap").hidden = false;
      say("");
      await loadNext();
    });
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (event.target instanceof Element && event.target.closest("input, textarea, select")) return;
    if ($("review").hidden) return;
    const key = event.key.toLowerCase();
    const button = document.querySelector(`.label-button[data-key="${CSS.escape(key)}"]`);
    if (button) {
      event.preventDefault();
      answer(button.dataset.label);
    } else if (key === "s") {
      event.preventDefault();
      answer("skip");
    } else if (key === "u") {
      event.preventDefault();
      undo();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (!value) {
        say("paste your reviewer token", true);
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      start();
    });
    $("sign-out").addEventListener("click", () => showLogin("signed out"));
    for (const button of document.querySelectorAll("#answer button[data-label]")) {
      button.addEventListener("click", () => answer(button.dataset.label));
    }
    $("undo").addEventListener("click", () => undo());
    document.addEventListener("keydown", onKey);
    start();
  });
})();
