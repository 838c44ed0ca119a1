/* The chat page (templates/chat.html, llmgateway/chat_views.py).
 *
 * A turn: POST the message to chat/api/turns (saved; the answer is the request to stream, with the
 * conversation trimmed to the model's window), stream it from /chat/completions, then POST what
 * arrived to the conversation's answers (its cost comes from the ledger row named by the
 * response's x-request-id). Model output only ever reaches the page through renderMarkdown:
 * markdown-it with raw HTML off, then DOMPurify with an allow-list of elements and attributes.
 * Everything else is drawn with textContent.
 */
(() => {
  "use strict";

  const boot = JSON.parse(document.getElementById("chat-boot").textContent);
  const urls = boot.urls;
  const $ = (id) => document.getElementById(id);
  const chat = $("chat");
  const log = $("log");
  const form = $("composer");
  const prompt = $("prompt");
  const modelSelect = $("model");
  const systemPrompt = $("system-prompt");
  const temperature = $("temperature");
  const sendButton = $("send");
  const stopButton = $("stop");
  const titleEl = $("title");
  const spendEl = $("spend");
  const list = $("conversations");
  const search = $("search");

  const CONNECTION_LOST = "The connection to the gateway was lost. Check your network, then retry.";
  // Django's CSRF refusal is an HTML 403: the page's token is stale (a new login elsewhere, or an
  // expired session), and only a reload gets a fresh one.
  const SESSION_EXPIRED = "Your session has expired or changed since this page was opened. Reload the page to go on.";
  const LEFT_PAGE = "Stopped: the page was left or reloaded while the answer arrived.";
  const DEFAULT_RETRY_SECONDS = 10;
  // An answer ended before the gateway's response headers came has no request id to look up, yet
  // the gateway may have called the upstream and billed the prompt: never say "not charged" then.
  const CHARGE_UNKNOWN = "Any charge for it shows in your usage on the ";
  const USAGE_POLLS = 15;
  const USAGE_POLL_MS = 300;
  const SAVED_POLL_MS = 300;
  const SAVED_WAIT_MS = 5000;

  let conversation = boot.conversation; // the open conversation with its messages, or null
  let conversations = boot.conversations; // the sidebar's list
  let streaming = null; // {controller, answer} while an answer streams
  let busy = false;
  const timers = new Set();
  let leaving = false; // set when the page is hidden for good (reload, navigation, tab closed)

  // --- Safe Markdown ----------------------------------------------------------------------

  const markdown = window.markdownit({ html: false, linkify: true, typographer: false });
  markdown.disable(["image"]); // no remote images: an answer must not make the browser fetch anything
  const ALLOWED_TAGS = [
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "blockquote", "pre", "code",
    "em", "strong", "s", "del", "a", "table", "thead", "tbody", "tr", "th", "td",
  ];
  const ALLOWED_ATTR = ["href", "title", "class", "start"];
  // A class only names a code block's language: model output cannot borrow the page's own classes.
  window.DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
    if (data.attrName === "class" && !/^language-[\w+#.-]+$/.test(data.attrValue)) data.keepAttr = false;
  });
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });

  function renderMarkdown(element, text) {
    element.innerHTML = window.DOMPurify.sanitize(markdown.render(text), { ALLOWED_TAGS, ALLOWED_ATTR });
    for (const pre of element.querySelectorAll("pre")) {
      const wrapper = document.createElement("div");
      wrapper.className = "code";
      pre.replaceWith(wrapper);
      wrapper.append(pre, copyButton(pre));
    }
  }

  function copyButton(pre) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.addEventListener("click", async () => {
      const text = pre.textContent;
      try {
        await navigator.clipboard.writeText(text);
      } catch {
        const range = document.createRange();
        range.selectNodeContents(pre);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        document.execCommand("copy");
        selection.removeAllRanges();
      }
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    return button;
  }

  // --- Small helpers ----------------------------------------------------------------------

  function el(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined) element.textContent = text;
    return element;
  }

  function button(label, className, onClick) {
    const element = el("button", className, label);
    element.type = "button";
    element.addEventListener("click", onClick);
    return element;
  }

  function later(fn, ms) {
    const id = setTimeout(() => { timers.delete(id); fn(); }, ms);
    timers.add(id);
  }

  async function api(method, url, body) {
    let response;
    try {
      response = await fetch(url, {
        method,
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": boot.csrf },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      throw new Error(CONNECTION_LOST);
    }
    if (response.status === 204) return null;
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      const fallback = response.status === 403 ? SESSION_EXPIRED : `The gateway answered ${response.status}.`;
      const error = new Error((data && data.error && data.error.message) || fallback);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function nearBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }

  function scrollToBottom() {
    log.scrollTop = log.scrollHeight;
  }

  // --- Spend ------------------------------------------------------------------------------

  function renderSpend(spend, extraWarning) {
    spendEl.replaceChildren();
    const line = el("span");
    line.append("This month ", el("strong", "", spend.month_spent), " spent");
    const isMonthlySpend = (budget) => budget.kind === "spend" && budget.period === "month";
    const monthly = spend.budgets.find(isMonthlySpend) || spend.budgets[0];
    if (monthly) {
      line.append(" · ", el("strong", "", monthly.left), ` left of ${monthly.limit}`);
      if (!isMonthlySpend(monthly)) line.append(` (${monthly.label})`);
      const bar = el("span", "bar");
      const fill = el("span");
      fill.style.width = `${Math.round(Number(monthly.share) * 100)}%`;
      bar.append(fill);
      bar.title = `${monthly.percent} of ${monthly.label} used`;
      if (spend.warnings.length) bar.classList.add("hot");
      line.append(bar);
    } else {
      line.append(" · no budget limit");
    }
    line.id = "spend-line";
    spendEl.append(line);
    const warnings = [...spend.warnings];
    if (extraWarning && !warnings.length) warnings.push(extraWarning);
    for (const warning of warnings) spendEl.append(el("span", "warning", warning));
  }

  // --- Sidebar ----------------------------------------------------------------------------

  function renderSidebar() {
    list.replaceChildren(...conversations.map(sidebarItem));
    $("no-conversations").hidden = conversations.length > 0;
  }

  function sidebarItem(summary) {
    const item = el("li");
    item.dataset.id = summary.id;
    if (conversation && conversation.id === summary.id) item.classList.add("current");
    const link = el("a", "", summary.title);
    link.href = summary.url;
    link.title = summary.title;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      openConversation(summary.id);
    });
    const actions = el("span", "item-actions");
    actions.append(
      button("Rename", "icon rename", () => startRename(item, summary)),
      button("Delete", "icon delete", () => deleteConversation(summary)),
    );
    item.append(link, actions);
    return item;
  }

  function startRename(item, summary) {
    const input = el("input");
    input.value = summary.title;
    input.maxLength = 80;
    input.setAttribute("aria-label", "Conversation title");
    item.replaceChildren(input);
    input.focus();
    input.select();
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== summary.title) {
        try {
          const renamed = await api("PATCH", `${urls.conversations}/${summary.id}`, { title });
          Object.assign(summary, renamed);
          if (conversation && conversation.id === summary.id) {
            conversation.title = renamed.title;
            titleEl.textContent = renamed.title;
            document.title = `${renamed.title} · llmgateway`;
          }
        } catch (error) {
          showComposerError(error.message);
        }
      }
      renderSidebar();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); finish(true); }
      if (event.key === "Escape") { event.preventDefault(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
  }

  async function deleteConversation(summary) {
    if (!window.confirm(`Delete “${summary.title}”? Its messages are gone for good.`)) return;
    try {
      await api("DELETE", `${urls.conversations}/${summary.id}`);
    } catch (error) {
      showComposerError(error.message);
      return;
    }
    conversations = conversations.filter((item) => item.id !== summary.id);
    if (conversation && conversation.id === summary.id) newChat();
    renderSidebar();
  }

  function remember(summary) {
    conversations = [summary, ...conversations.filter((item) => item.id !== summary.id)];
    if (!search.value.trim()) renderSidebar();
    else markCurrent();
  }

  function markCurrent() {
    for (const item of list.children) item.classList.toggle("current", Boolean(conversation) && item.dataset.id === conversation.id);
  }

  let searchTimer = null;
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(async () => {
      try {
        const found = await api("GET", `${urls.conversations}?q=${encodeURIComponent(search.value.trim())}`);
        conversations = found.conversations;
        renderSidebar();
      } catch (error) {
        showComposerError(error.message);
      }
    }, 200);
  });

  $("toggle-sidebar").addEventListener("click", () => {
    const open = chat.classList.toggle("sidebar-open");
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  });

  // On a phone the sidebar covers the conversation: a tap beside it closes it.
  document.querySelector(".conversation").addEventListener("click", (event) => {
    if (chat.classList.contains("sidebar-open") && !event.target.closest("#toggle-sidebar")) closeSidebar();
  });

  function closeSidebar() {
    chat.classList.remove("sidebar-open");
    $("toggle-sidebar").setAttribute("aria-expanded", "false");
  }

  // --- Opening conversations --------------------------------------------------------------

  function applySettings(source) {
    if (source.model && [...modelSelect.options].some((option) => option.value === source.model)) modelSelect.value = source.model;
    systemPrompt.value = source.system_prompt || "";
    temperature.value = source.temperature === null || source.temperature === undefined ? "" : source.temperature;
  }

  async function openConversation(id, { push = true } = {}) {
    if (busy) return;
    closeSidebar();
    try {
      conversation = await api("GET", `${urls.conversations}/${id}`);
    } catch (error) {
      showComposerError(error.message);
      return;
    }
    applySettings(conversation);
    if (push) history.pushState({ id }, "", conversation.url);
    renderConversation();
    markCurrent();
    prompt.focus();
  }

  function newChat({ push = true } = {}) {
    if (busy) return;
    closeSidebar();
    conversation = null;
    if (push) history.pushState({}, "", urls.page);
    renderConversation();
    markCurrent();
    prompt.focus();
  }

  $("new-chat").addEventListener("click", () => newChat());

  window.addEventListener("popstate", () => {
    const match = location.pathname.match(/\/c\/([0-9a-f-]{36})\/?$/);
    if (match) openConversation(match[1], { push: false });
    else newChat({ push: false });
  });

  // --- Drawing messages -------------------------------------------------------------------

  function renderConversation() {
    for (const id of timers) clearTimeout(id);
    timers.clear();
    const title = conversation ? conversation.title : "New chat";
    titleEl.textContent = title;
    document.title = `${title} · llmgateway`;
    log.replaceChildren();
    if (!conversation || !conversation.messages.length) {
      log.append(el("p", "muted empty", "Ask anything. Your conversations are saved, and listed on the left."));
      return;
    }
    for (const message of conversation.messages) log.append(messageElement(message));
    updateTurnActions();
    scrollToBottom();
  }

  function messageElement(message) {
    const element = el("div", `msg ${message.role}`);
    element.dataset.role = message.role;
    element.dataset.state = message.state;
    if (message.id) element.dataset.id = message.id;
    const body = el("div", message.role === "assistant" ? "body markdown" : "body");
    if (message.role === "assistant") renderMarkdown(body, message.content);
    else body.textContent = message.content;
    element.append(body);
    if (message.role === "assistant") drawAnswerFooter(element, message);
    else element.append(el("div", "meta"));
    element.message = message;
    return element;
  }

  const STATE_NOTES = {
    stopped: "Stopped. What arrived is kept.",
    cut_off: "Cut off.",
    failed: "No answer.",
  };

  function drawAnswerFooter(element, message) {
    for (const old of element.querySelectorAll(":scope > .notice, :scope > .meta")) old.remove();
    if (message.state !== "complete") {
      const notice = el("div", `notice ${message.state === "stopped" ? "info" : "problem"}`);
      notice.append(el("span", "words", message.error || STATE_NOTES[message.state]));
      if (message.unsaved) notice.append(el("span", "", " (not saved)"));
      if (message.retryAt) countdown(notice, message);
      element.append(notice);
    }
    const meta = el("div", "meta");
    if (message.model) meta.append(el("span", "model", message.model));
    if (message.usage) {
      const usage = message.usage;
      meta.append(
        el("span", "tokens", `${usage.tokens_in} in · ${usage.tokens_out} out`),
        el("span", "cost", usage.cost),
        el("span", "ttft", usage.ttft ? `first token ${usage.ttft}` : "no token arrived"),
      );
    } else if (!message.request_id) {
      // Ended before the response headers: the call may be in the ledger, under an id we never saw.
      const unknown = el("span", "charge-unknown", CHARGE_UNKNOWN);
      const link = el("a", "", "account page");
      link.href = urls.account;
      unknown.append(link, ".");
      meta.append(unknown);
    } else if (message.state === "failed") {
      // Only a call the gateway refused with a non-2xx answer is saved as failed with an id: it made
      // no ledger row (or a cost-0 one, shown above once it is read).
      meta.append(el("span", "cost", "not charged"));
    } else {
      meta.append(el("span", "pending", "cost: not in the ledger yet"));
    }
    if (message.left_out) meta.append(el("span", "left-out", `${message.left_out} earlier messages left out to fit the model's context window`));
    element.append(meta);
  }

  function countdown(notice, message) {
    const words = el("span", "countdown");
    notice.append(" ", words);
    const tick = () => {
      const left = Math.ceil((message.retryAt - Date.now()) / 1000);
      if (left > 0) {
        words.textContent = `You can retry in ${left} s.`;
        later(tick, 250);
      } else {
        words.textContent = "You can retry now.";
        message.retryAt = null;
        updateTurnActions();
      }
    };
    tick();
  }

  function updateTurnActions() {
    for (const action of log.querySelectorAll(".turn-action")) action.remove();
    if (busy || !conversation) return;
    const elements = [...log.querySelectorAll(".msg")];
    const last = elements[elements.length - 1];
    const lastUser = [...elements].reverse().find((element) => element.dataset.role === "user");
    if (last && last.dataset.role === "assistant") {
      const message = last.message;
      const label = message.state === "complete" || message.state === "stopped" ? "Regenerate" : "Retry";
      const action = button(label, "link turn-action regenerate", () => runTurn("regenerate", ""));
      action.disabled = Boolean(message.retryAt);
      (last.querySelector(".notice.problem") || last.querySelector(".meta")).append(action);
    } else if (last && last.dataset.role === "user") {
      // A message whose answer never got saved (the page lost its connection): answer it again.
      last.querySelector(".meta").append(button("Answer this", "link turn-action regenerate", () => runTurn("regenerate", "")));
    }
    if (lastUser) lastUser.querySelector(".meta").append(button("Edit", "link turn-action edit", () => startEdit(lastUser)));
  }

  function startEdit(element) {
    const body = element.querySelector(".body");
    const box = el("div", "edit-box");
    const input = el("textarea");
    input.value = element.message.content;
    input.setAttribute("aria-label", "Edit your message");
    const actions = el("div");
    const cancel = () => { box.replaceWith(body); updateTurnActions(); };
    const resend = () => {
      if (!input.value.trim()) return;
      runTurn("edit", input.value);
    };
    actions.append(button("Cancel", "secondary", cancel), button("Send", "resend", resend));
    box.append(input, actions);
    body.replaceWith(box);
    for (const action of log.querySelectorAll(".turn-action")) action.remove();
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); resend(); }
      if (event.key === "Escape") cancel();
    });
    input.focus();
  }

  // --- A turn -----------------------------------------------------------------------------

  function setBusy(value, canStop = false) {
    busy = value;
    sendButton.disabled = value;
    stopButton.hidden = !canStop;
    stopButton.disabled = !canStop;
    updateTurnActions();
  }

  function showComposerError(text) {
    const box = $("composer-error");
    box.textContent = text;
    box.hidden = false;
  }

  function hideComposerError() {
    $("composer-error").hidden = true;
  }

  async function runTurn(mode, content) {
    if (busy) return false;
    hideComposerError();
    setBusy(true);
    let turn;
    try {
      turn = await api("POST", urls.turns, {
        conversation: conversation ? conversation.id : null,
        mode,
        content,
        model: modelSelect.value,
        system_prompt: systemPrompt.value,
        temperature: temperature.value,
      });
    } catch (error) {
      showComposerError(error.message);
      setBusy(false);
      return false;
    }
    conversation = turn.conversation;
    if (location.pathname !== conversation.url) history.pushState({ id: conversation.id }, "", conversation.url);
    remember(summaryOf(conversation));
    renderConversation();
    markCurrent();
    const answer = await streamAnswer(turn.request);
    answer.left_out = turn.left_out;
    await saveAnswer(answer);
    setBusy(false);
    prompt.focus();
    return true;
  }

  function summaryOf(detail) {
    const { messages, ...summary } = detail;
    return summary;
  }

  /* Stream one answer into a new bubble; resolve with what arrived and how it ended. */
  async function streamAnswer(request) {
    const answer = { role: "assistant", content: "", state: "complete", error: "", model: request.model, request_id: null, usage: null };
    log.querySelector(".empty")?.remove();
    const element = el("div", "msg assistant");
    element.dataset.role = "assistant";
    element.dataset.state = "streaming";
    const body = el("div", "body markdown");
    element.append(body);
    log.append(element);
    scrollToBottom();
    let frame = 0;
    const draw = () => {
      frame = 0;
      const follow = nearBottom();
      renderMarkdown(body, answer.content);
      if (follow) scrollToBottom();
    };
    const controller = new AbortController();
    streaming = { controller, answer };
    setBusy(true, true);
    let warning = "";
    try {
      let response;
      try {
        response = await fetch(urls.stream, {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRFToken": boot.csrf },
          body: JSON.stringify(request),
          signal: controller.signal,
        });
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw Object.assign(new Error(CONNECTION_LOST), { kind: "network" });
      }
      answer.request_id = response.headers.get("x-request-id");
      warning = response.headers.get("x-budget-warning") || "";
      answer.refused = !response.ok;
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        throw refusal(response, data && data.error);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        let part;
        try {
          part = await reader.read();
        } catch (error) {
          if (error.name === "AbortError") throw error;
          throw Object.assign(new Error(CONNECTION_LOST), { kind: "network" });
        }
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (!event.startsWith("data: ")) continue; // heartbeat comments
          const data = event.slice(6);
          if (data === "[DONE]") { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw Object.assign(new Error(chunk.error.message), { kind: "midstream" });
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              answer.content += choice.delta.content;
              if (!frame) frame = requestAnimationFrame(draw);
            }
          }
        }
      }
      if (!done) throw Object.assign(new Error("The connection closed before the answer finished."), { kind: "midstream" });
    } catch (error) {
      if (error.name === "AbortError") {
        answer.state = "stopped";
        answer.error = "Stopped. What arrived is kept.";
      } else {
        // "failed" is only for a call that never began: no answer, or a refusal (non-2xx). After a
        // 200 the call reached the upstream and may be billed, text or not: it is cut off.
        const began = answer.request_id && !answer.refused;
        answer.state = answer.content || began ? "cut_off" : "failed";
        answer.error = answer.state === "cut_off" ? `Cut off: ${error.message}` : error.message;
        if (error.retryAfter) answer.retryAt = Date.now() + error.retryAfter * 1000;
      }
    } finally {
      if (frame) cancelAnimationFrame(frame);
      streaming = null;
      setBusy(true, false);
    }
    answer.element = element;
    answer.warning = warning;
    return answer;
  }

  /* Plain words for a refused call (an OpenAI error body with the response's status). */
  function refusal(response, error) {
    const message = (error && error.message) || `The gateway answered ${response.status}.`;
    const code = error && error.code;
    if (response.status === 429 && code === "insufficient_quota") {
      return Object.assign(new Error(`Your budget is used up: ${message}`), { kind: "budget" });
    }
    if (response.status === 429) {
      const seconds = Number(response.headers.get("retry-after")) || DEFAULT_RETRY_SECONDS;
      return Object.assign(new Error(`Too many requests right now: ${message}`), { kind: "rate_limited", retryAfter: seconds });
    }
    if (response.status === 401) return new Error("Your session has ended. Log in again to continue.");
    if (response.status === 403 && !error) return new Error(SESSION_EXPIRED);
    if (response.status >= 500) return Object.assign(new Error(`The model could not answer: ${message}`), { kind: "upstream" });
    return new Error(message);
  }

  async function saveAnswer(answer) {
    // The page is going away: the hang-up ends the stream, and the pagehide handler saves what
    // arrived (stopped). A second save, racing it as "cut off", would win as often as not.
    if (leaving) return;
    const { element, warning } = answer;
    delete answer.element;
    delete answer.warning;
    let saved = null;
    try {
      const result = await api("POST", `${urls.conversations}/${conversation.id}/answers`, {
        content: answer.content,
        state: answer.state,
        error: answer.error,
        model: answer.model,
        request_id: answer.request_id,
      });
      saved = Object.assign(result.message, { left_out: answer.left_out, retryAt: answer.retryAt });
      renderSpend(result.spend, warning);
    } catch {
      saved = Object.assign(answer, { unsaved: true });
      if (warning) renderSpend(boot.spend, warning);
    }
    conversation.messages.push(saved);
    const drawn = messageElement(saved);
    element.replaceWith(drawn);
    updateTurnActions();
    if (nearBottom()) scrollToBottom();
    if (!saved.unsaved && saved.request_id && !saved.usage && !answer.refused) awaitUsage(saved, conversation.id);
  }

  /* A stopped call reaches the ledger a moment after the page hangs up: fetch its figures then. */
  function awaitUsage(message, conversationId, attempt = 0) {
    later(async () => {
      if (!conversation || conversation.id !== conversationId) return;
      let detail;
      try {
        detail = await api("GET", `${urls.conversations}/${conversationId}`);
      } catch {
        return;
      }
      const found = detail.messages.find((item) => item.id === message.id);
      if (found && found.usage) {
        message.usage = found.usage;
        const element = [...log.querySelectorAll(".msg")].find((item) => item.message === message);
        if (element) {
          drawAnswerFooter(element, message);
          updateTurnActions();
        }
        api("GET", urls.spend).then((spend) => renderSpend(spend)).catch(() => {});
      } else if (attempt + 1 < USAGE_POLLS) {
        awaitUsage(message, conversationId, attempt + 1);
      }
    }, USAGE_POLL_MS);
  }

  /* The answer a previous page (left mid-answer) was saving: show it once it is saved. */
  function awaitSavedAnswer(conversationId, deadline) {
    later(async () => {
      if (busy || !conversation || conversation.id !== conversationId) return;
      const fresh = await api("GET", `${urls.conversations}/${conversationId}`).catch(() => null);
      if (busy || !conversation || conversation.id !== conversationId) return;
      if (fresh && fresh.messages.length > conversation.messages.length) {
        conversation = fresh;
        renderConversation();
      } else if (Date.now() < deadline) {
        awaitSavedAnswer(conversationId, deadline);
      }
    }, SAVED_POLL_MS);
  }

  // --- The composer -----------------------------------------------------------------------

  function fitPrompt() {
    prompt.style.height = "auto";
    prompt.style.height = `${prompt.scrollHeight + 2}px`;
  }

  prompt.addEventListener("input", fitPrompt);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = prompt.value;
    if (!content.trim() || busy) return;
    prompt.value = "";
    fitPrompt();
    const started = await runTurn("send", content);
    if (!started && !prompt.value) {
      prompt.value = content; // the message was not taken: give it back
      fitPrompt();
    }
  });

  stopButton.addEventListener("click", () => streaming && streaming.controller.abort());

  // Leaving or reloading the page mid-answer ends the call (the gateway sees the hang-up): keep
  // what arrived, as a stopped answer, with a request that outlives the page.
  window.addEventListener("pageshow", () => { leaving = false; }); // back from the back-forward cache
  window.addEventListener("pagehide", () => {
    leaving = true;
    if (!streaming || !conversation) return;
    const { answer } = streaming;
    fetch(`${urls.conversations}/${conversation.id}/answers`, {
      method: "POST",
      keepalive: true,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": boot.csrf },
      body: JSON.stringify({
        content: answer.content,
        state: answer.refused ? "failed" : "stopped",
        error: LEFT_PAGE,
        model: answer.model,
        request_id: answer.request_id,
      }),
    });
  });

  // --- Start ------------------------------------------------------------------------------

  for (const model of boot.models) {
    const option = el("option", "", model.label);
    option.value = model.id;
    modelSelect.append(option);
  }
  modelSelect.value = boot.default_model;
  if (conversation) applySettings(conversation);
  renderSpend(boot.spend);
  renderSidebar();
  renderConversation();
  const messages = conversation ? conversation.messages : [];
  if (messages.length && messages[messages.length - 1].role === "user") {
    // Reloaded mid-answer: the previous page's last request, saving what arrived, may land after
    // this one. Look for it every SAVED_POLL_MS until SAVED_WAIT_MS have passed.
    awaitSavedAnswer(conversation.id, Date.now() + SAVED_WAIT_MS);
  }
  prompt.focus();
})();
