// The reviewer page: one item at a time. Keys: 1-6 label, n unsure, s skip, u undo the last answer,
// d label definitions (Esc closes them).
// User text is written with textContent only (never parsed as HTML), so whatever it contains stays text.
// The token lives in sessionStorage: this tab only, sent as a Bearer header, never in a URL or a cookie.
"use strict";

(() => {
  const TOKEN_KEY = "guardloop.reviewToken";
  const $ = (id) => document.getElementById(id);
  let current = null; // the item on screen
  let busy = false; // one request at a time: a key pressed twice must not label two items
  // Anchoring: with the setting on (the default) the model's guess is shown only once the reviewer has answered.
  const hideGuess = () => document.body.dataset.hideGuess === "true";

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  function setState(state) {
    document.body.dataset.state = state; // ready | empty | busy | login (read by tests and CSS)
  }

  function say(message, isError = false) {
    const status = $("review").hidden ? $("login-status") : $("status");
    status.textContent = message;
    status.classList.toggle("error", isError);
  }

  function showLogin(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    current = null;
    $("review").hidden = true;
    $("who-wrap").hidden = true;
    $("login").hidden = false;
    toggleDefinitions(false);
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

  // Local midnight with its UTC offset: "done today" means the reviewer's day, not the server's.
  function dayStart() {
    const midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    const pad = (n) => String(n).padStart(2, "0");
    const offset = -midnight.getTimezoneOffset();
    const sign = offset >= 0 ? "+" : "-";
    const abs = Math.abs(offset);
    const date = `${midnight.getFullYear()}-${pad(midnight.getMonth() + 1)}-${pad(midnight.getDate())}`;
    return encodeURIComponent(`${date}T00:00:00${sign}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`);
  }

  function showProgress(progress) {
    $("done-today").textContent = String(progress.done_today);
    $("cycle-left").textContent =
      progress.cycle_id === null ? "no cycle waiting" : `${progress.cycle_left} of ${progress.cycle_requested}`;
    $("queue-length").textContent = String(progress.queue_length);
    $("my-count").textContent = String(progress.my_labels);
  }

  function setAnswerable(answerable) {
    for (const button of document.querySelectorAll("#answer button[data-label]")) button.disabled = !answerable;
  }

  function showItem(item) {
    current = item;
    const explained = item.explanation;
    $("empty").hidden = true;
    $("item").hidden = false;
    $("item-id").textContent = `#${item.id}`;
    $("item-text").textContent = item.text;
    $("item-text").scrollTop = 0;
    // The normalized form when it differs (a disguise undone: "k1ll" read as "kill"); null otherwise.
    $("item-canonical").textContent = item.canonical_text || "";
    $("item-canonical-wrap").hidden = !item.canonical_text;
    $("item-text-caption").hidden = !item.canonical_text;
    $("item-why").textContent = explained.why;
    $("item-uncertainty").textContent = explained.uncertainty.toFixed(2);
    $("item-seen").textContent = item.seen_count === 1 ? "once" : `${item.seen_count} times`;
    $("item-guess").textContent = explained.model_guess;
    const rows = $("item-scores");
    rows.replaceChildren();
    for (const { label, score } of explained.scores.slice(0, 3)) {
      const row = document.createElement("tr");
      const name = document.createElement("td");
      const value = document.createElement("td");
      name.textContent = label;
      value.textContent = score.toFixed(2);
      row.append(name, value);
      rows.append(row);
    }
    document.body.dataset.guess = hideGuess() ? "hidden" : "shown";
    document.body.dataset.itemId = String(item.id);
    setAnswerable(true);
    setState("ready");
  }

  function showEmpty() {
    current = null;
    $("item").hidden = true;
    $("empty").hidden = false;
    delete document.body.dataset.itemId;
    setAnswerable(false); // undo and the definitions stay: the last answer can still be taken back
    setState("empty");
  }

  async function loadNext() {
    const result = await api("GET", `/review/queue?limit=1&day_start=${dayStart()}`);
    if (!result.ok) {
      say(detail(result), true);
      return;
    }
    showProgress(result.data.progress);
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
    if (!current) {
      say("The queue is empty: there is nothing to answer.");
      return Promise.resolve();
    }
    return run(async () => {
      const item = current;
      const comment = $("comment").value.trim();
      const result = await api("POST", `/review/items/${item.id}/label`, { label, comment: comment || null });
      if (result.ok) {
        $("comment").value = "";
        // Now that the reviewer has answered, the model's guess can no longer sway them: show it.
        const guess = hideGuess() ? ` ${item.explanation.model_guess}` : "";
        say(`Item #${item.id}: ${label}.${guess} Press u to undo.`);
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
      const progress = await api("GET", `/review/progress?day_start=${dayStart()}`);
      if (progress.ok) showProgress(progress.data);
      showItem(result.data.item);
      say(`Undid "${result.data.undone.label}" on item #${result.data.item.id}; answer it again.`);
    });
  }

  function toggleDefinitions(open = $("definitions").hidden) {
    const panel = $("definitions");
    if (panel.hidden === !open) return;
    panel.hidden = !open;
    $("definitions-toggle").setAttribute("aria-expanded", String(open));
    if (open) $("definitions-title").focus();
    else if (panel.contains(document.activeElement) || document.activeElement === document.body) {
      $("definitions-toggle").focus();
    }
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
    if (key === "escape") {
      toggleDefinitions(false);
      return;
    }
    if (key === "d") {
      event.preventDefault();
      toggleDefinitions();
      return;
    }
    if (key === "u") {
      event.preventDefault();
      undo();
      return;
    }
    const button = document.querySelector(`#answer button[data-key="${CSS.escape(key)}"]`);
    if (button) {
      event.preventDefault();
      answer(button.dataset.label);
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
    $("definitions-toggle").addEventListener("click", () => toggleDefinitions());
    document.addEventListener("keydown", onKey);
    start();
  });
})();
