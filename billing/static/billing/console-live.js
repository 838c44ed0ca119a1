// The cost console's live figures: the running calls of every gateway process and the period
// cards' spend, from the WebSocket at /ws/console/ (llmgateway/console_live.py). Staff with the
// "Can stop a running call" permission get a Stop button on each call. Text only (textContent):
// nothing the server sends is parsed as HTML.
(function () {
  "use strict";

  const MAX_RETRY_MS = 10000;

  function start() {
    const section = document.getElementById("console-live");
    if (!section || !("WebSocket" in window)) return;
    const status = section.querySelector("[data-live-status]");
    const summary = section.querySelector("[data-live-summary]");
    const table = section.querySelector("table.live-calls");
    const body = table.querySelector("tbody");
    const empty = section.querySelector("[data-live-empty]");
    const note = section.querySelector("[data-live-note]");
    const stopping = new Set();
    let socket = null;
    let mayStop = false;
    let retryMs = 500;

    function setState(state, text) {
      section.dataset.state = state;
      status.textContent = text;
    }

    function say(text) {
      note.textContent = text;
      note.hidden = !text;
    }

    function cell(row, text, className, title) {
      const td = document.createElement("td");
      td.textContent = text;
      if (className) td.className = className;
      if (title) td.title = title;
      row.appendChild(td);
      return td;
    }

    function renderCalls(message) {
      const rows = [];
      for (const call of message.calls) {
        const row = document.createElement("tr");
        row.dataset.requestId = call.request_id;
        const user = document.createElement("th");
        user.scope = "row";
        user.textContent = call.user;
        row.appendChild(user);
        cell(row, call.key, "key");
        cell(row, call.model + (call.stream ? "" : " (not streamed)"), "model");
        cell(row, call.running_for, "running-for", "Started " + new Date(call.started_at * 1000).toLocaleString());
        cell(row, call.tokens, "num tokens");
        cell(row, call.cost, "num cost", call.cost_exact);
        const actions = cell(row, "", "actions");
        if (mayStop) {
          const button = document.createElement("button");
          button.type = "button";
          button.className = "stop";
          button.textContent = stopping.has(call.request_id) ? "Stopping…" : "Stop";
          button.disabled = stopping.has(call.request_id);
          button.dataset.requestId = call.request_id;
          button.setAttribute("aria-label", "Stop " + call.user + "'s call on " + call.model);
          actions.appendChild(button);
        }
        if (stopping.has(call.request_id)) row.classList.add("stopping");
        rows.push(row);
      }
      body.replaceChildren(...rows);
      const running = new Set(message.calls.map((call) => call.request_id));
      for (const id of stopping) if (!running.has(id)) stopping.delete(id);
      table.hidden = rows.length === 0;
      empty.hidden = rows.length !== 0;
      const hidden = message.hidden ? " · " + message.hidden + " more not shown" : "";
      summary.textContent = rows.length + " call" + (rows.length === 1 ? "" : "s") + hidden;
    }

    function renderSpend(message) {
      for (const period of message.periods) {
        const card = document.querySelector('.card[data-period="' + period.kind + '"]');
        if (!card) continue;
        const value = card.querySelector(".value");
        if (value.textContent.trim() !== period.spent) {
          value.textContent = period.spent;
          value.classList.remove("changed");
          void value.offsetWidth; // restart the highlight
          value.classList.add("changed");
        }
        value.title = period.spent_exact;
        const change = card.querySelector(".change");
        if (change) {
          change.textContent = period.change;
          change.className = "change " + period.direction;
        }
      }
    }

    function onMessage(event) {
      const message = JSON.parse(event.data);
      if (message.type === "hello") {
        mayStop = message.may_stop;
      } else if (message.type === "streams") {
        renderCalls(message);
      } else if (message.type === "spend") {
        renderSpend(message);
      } else if (message.type === "stop_sent") {
        say("Stop sent. The call ends with an error event for its client; its ledger row will say “stopped by staff”.");
      } else if (message.type === "error") {
        if (message.request_id) stopping.delete(message.request_id);
        say(message.message);
      }
    }

    function connect() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      socket = new WebSocket(scheme + "//" + location.host + section.dataset.url);
      let opened = false;
      socket.addEventListener("open", function () {
        opened = true;
        retryMs = 500;
        setState("live", "live");
      });
      socket.addEventListener("message", onMessage);
      socket.addEventListener("close", function () {
        socket = null;
        if (!opened && retryMs >= MAX_RETRY_MS) {
          setState("refused", "not connected: reload the page, or log in again");
          return;
        }
        setState("reconnecting", "reconnecting…");
        setTimeout(connect, retryMs);
        retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
      });
    }

    body.addEventListener("click", function (event) {
      const button = event.target.closest("button.stop");
      if (!button || !socket || socket.readyState !== WebSocket.OPEN) return;
      const row = button.closest("tr");
      const who = row.querySelector("th").textContent;
      if (!window.confirm("Stop " + who + "'s running call? Their client gets an error and is billed for what was produced.")) return;
      stopping.add(button.dataset.requestId);
      button.disabled = true;
      button.textContent = "Stopping…";
      row.classList.add("stopping");
      socket.send(JSON.stringify({ action: "stop", request_id: button.dataset.requestId }));
    });

    connect();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
