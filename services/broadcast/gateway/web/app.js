// The broadcast chat page: one WebSocket to the gateway that served it (docs/protocol.md).
//
// Rules this file keeps:
// - Text from the network only ever reaches the page through textContent, never as HTML.
// - Nothing inline (scripts, styles, handlers): the gateway serves this page under a strict CSP.
// - Every message id is remembered, so a reconnect can resume with `since` and drop duplicates.
// - A token (when the gateway requires one) comes from the token field or from `#token=…` in
//   the address, never its query: the fragment is not sent to servers nor logged, and the page
//   removes it from the address bar at once. It is kept for this tab only (sessionStorage).
"use strict";

(() => {
  const HISTORY_ON_JOIN = 50; // context for someone who just arrived in a channel
  const MAX_ROWS = 1000; // older rows are dropped, so a long session stays light
  const SEEN_LIMIT = 5000; // ids remembered for de-duplication
  const BACKOFF_FIRST_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const QUIET_MS = 25000; // this long without a frame: ask the gateway for a pong
  const PONG_WAIT_MS = 10000; // and give up on the connection if none comes
  const CONNECT_TIMEOUT_MS = 15000; // a handshake lost on the way gets no close event soon
  const TEXT_LIMIT_BYTES = 4096;
  const NAME_MAX_BYTES = 32;
  const CHANNEL_RE = /^[A-Za-z0-9._-]{1,64}$/;
  const CONTROL_RE = /[\p{Cc}\p{Cf}]/u; // what the gateway refuses in names
  const NAME_START_RE = /^[\p{L}\p{N}_]/u;
  const TOKEN_RE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/; // a compact JWT
  const STORAGE = {
    name: "broadcast.name",
    channel: "broadcast.channel",
    token: "broadcast.token", // sessionStorage: this tab only
  };
  // A refused handshake reaches a page only as a failed WebSocket (no status, no body): after
  // this many in a row while the gateway itself answers, the page says what that likely means.
  const REFUSALS_BEFORE_EXPLAINING = 2;
  const CLOSE_REASONS = {
    1000: "the connection was closed",
    1001: "the server shut down",
    1006: "the connection was lost",
    1009: "a message was too big",
    1011: "the server hit an error",
    1012: "the server shut down",
    4003: "the server's operator disconnected you",
    4029: "too many messages after being told to slow down",
    4008: "the connection was too slow to keep up",
    4010: "the connection was idle too long",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    identity: $("identity"),
    name: $("name"),
    channel: $("channel"),
    token: $("token"),
    tokenField: $("token-field"),
    formNote: $("form-note"),
    join: $("join"),
    state: $("state"),
    roomName: $("room-name"),
    whoami: $("whoami"),
    log: $("log"),
    presence: $("presence"),
    count: $("count"),
    people: $("people"),
    composer: $("composer"),
    text: $("text"),
    send: $("send"),
  };

  // Everything the page knows about its connection and its channel.
  const chat = {
    socket: null,
    wanted: false, // the user asked to be connected (so a drop means "reconnect")
    welcomed: false, // the current socket got its welcome
    everWelcomed: false, // any socket in this channel did: later ones are reconnects
    name: "",
    channel: "",
    lastId: null, // newest message id seen in this channel: where a reconnect resumes
    epoch: null, // the history those ids belong to (the gateway's epoch), sent with `since`
    token: "", // for the gateway, when it requires one
    opened: false, // the current socket got past the handshake
    refusals: 0, // handshakes failed in a row while the gateway answered HTTP
    seen: new Set(),
    rows: new Map(), // message id -> its <li>, to mark it as ours when the ack comes late
    ownIds: new Set(),
    pending: new Map(), // ref -> text, published but not yet acknowledged
    unconfirmed: [], // texts whose ack a dropped connection took with it
    nextRef: 1,
    members: new Set(),
    presenceSupported: false,
    expectOwnJoin: false,
    replay: null, // "since" | "history" while a replay is under way
    replayAdded: 0,
    attempt: 0,
    retryAt: 0,
    retryTimer: 0,
    connectTimer: 0,
    countdownTimer: 0,
    whoTimer: 0,
    lastHeard: 0,
    pingSentAt: 0,
  };

  // ---- settings --------------------------------------------------------------------------

  // localStorage throws in some private modes; the page still works, it just forgets.
  function loadSetting(key) {
    try {
      return window.localStorage.getItem(key) || "";
    } catch {
      return "";
    }
  }

  function saveSetting(key, value) {
    try {
      window.localStorage.setItem(key, value);
    } catch {
      /* not remembered; nothing else to do */
    }
  }

  // The token lives as long as the tab: a secret is not worth remembering across sessions.
  function loadSession(key) {
    try {
      return window.sessionStorage.getItem(key) || "";
    } catch {
      return "";
    }
  }

  function saveSession(key, value) {
    try {
      if (value) window.sessionStorage.setItem(key, value);
      else window.sessionStorage.removeItem(key);
    } catch {
      /* not remembered; nothing else to do */
    }
  }

  // `#token=…` in the address: read it, then take it out of the address bar (and history).
  function tokenFromFragment() {
    const fragment = new URLSearchParams(window.location.hash.slice(1));
    const token = (fragment.get("token") || "").trim();
    if (fragment.has("token")) {
      fragment.delete("token");
      const rest = fragment.toString();
      const url = window.location.pathname + window.location.search + (rest ? `#${rest}` : "");
      window.history.replaceState(null, "", url);
    }
    return token;
  }

  // The same rules as the gateway's, checked here so a typo is explained before connecting.
  function nameProblem(name) {
    const bytes = new TextEncoder().encode(name).length; // the gateway counts UTF-8 bytes
    if (bytes < 1 || bytes > NAME_MAX_BYTES) return `a name is 1-${NAME_MAX_BYTES} bytes long`;
    if (name !== name.trim()) return "a name may not start or end with a space";
    if (!NAME_START_RE.test(name)) return "a name starts with a letter, a digit or _";
    if (CONTROL_RE.test(name)) return "a name may not contain control characters";
    if (name.includes(":")) return "a name may not contain a colon";
    if (name.includes("  ")) return "a name may not hold two spaces in a row";
    return "";
  }

  function tokenProblem(token) {
    if (!token || TOKEN_RE.test(token)) return "";
    return "a token is one line of letters, digits, - and _ in three parts joined by dots";
  }

  // The token's expiry (its `exp` claim), read without checking it: only to explain a refusal.
  function tokenExpired(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
      return typeof claims.exp === "number" && claims.exp * 1000 <= Date.now();
    } catch {
      return false;
    }
  }

  // Notes about the form sit under it, and go as soon as the fields are right again.
  function setFormNote(text) {
    ui.formNote.textContent = text;
    ui.formNote.hidden = !text;
  }

  function recheckForm() {
    if (ui.formNote.hidden || ui.formNote.dataset.kind !== "validation") return;
    const problem = formProblem();
    if (!problem) setFormNote("");
    else ui.formNote.textContent = problem;
  }

  function formProblem() {
    const name = ui.name.value.trim();
    const channel = ui.channel.value.trim() || "general";
    return nameProblem(name) || channelProblem(channel) || tokenProblem(ui.token.value.trim());
  }

  function channelProblem(channel) {
    return CHANNEL_RE.test(channel) ? "" : "a channel is 1-64 characters of A-Z a-z 0-9 . _ -";
  }

  // ---- connection ------------------------------------------------------------------------

  function socketUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ name: chat.name, channel: chat.channel, echo: "1" });
    // Resume where we left off; a first visit to a channel gets some context instead.
    if (chat.lastId) {
      query.set("since", chat.lastId);
      if (chat.epoch) query.set("epoch", chat.epoch);
    } else query.set("history", String(HISTORY_ON_JOIN));
    // A browser cannot set the Authorization header of a WebSocket: the query is the only way.
    if (chat.token) query.set("token", chat.token);
    return `${scheme}//${window.location.host}/?${query}`;
  }

  function connect() {
    clearTimers();
    chat.wanted = true;
    chat.welcomed = false;
    chat.replay = chat.lastId ? "since" : "history";
    chat.replayAdded = 0;
    chat.expectOwnJoin = true;
    chat.presenceSupported = false;
    setState(chat.everWelcomed ? "reconnecting" : "connecting");
    let socket;
    try {
      socket = new WebSocket(socketUrl());
    } catch (error) {
      notice(`cannot connect: ${error.message}`, "error");
      scheduleReconnect();
      return;
    }
    chat.socket = socket;
    chat.opened = false;
    socket.addEventListener("open", () => {
      if (socket === chat.socket) chat.opened = true;
    });
    // Handlers check that their socket is still the current one: an abandoned socket may
    // still report events, and they must not disturb its successor.
    socket.addEventListener("message", (event) => {
      if (socket === chat.socket) onFrame(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (socket === chat.socket) onClose(event);
    });
    chat.connectTimer = window.setTimeout(() => {
      if (socket !== chat.socket || chat.welcomed) return;
      dropSocket(1000);
      scheduleReconnect();
    }, CONNECT_TIMEOUT_MS);
  }

  // Leave the current socket behind without waiting for its closing handshake, which on a
  // dead network can take minutes.
  function dropSocket(code = 1000) {
    const socket = chat.socket;
    chat.socket = null;
    chat.welcomed = false;
    if (socket && socket.readyState <= WebSocket.OPEN) {
      try {
        socket.close(code);
      } catch {
        /* already closing */
      }
    }
    forgetPending();
  }

  // Messages sent but not acknowledged may or may not have been stored: check after the
  // next replay instead of guessing now.
  function forgetPending() {
    for (const text of chat.pending.values()) chat.unconfirmed.push(text);
    chat.pending.clear();
  }

  function onClose(event) {
    const wasWelcomed = chat.welcomed;
    const opened = chat.opened;
    chat.socket = null;
    chat.welcomed = false;
    forgetPending();
    setComposerEnabled(chat.wanted);
    if (!chat.wanted) {
      setState("disconnected");
      return;
    }
    if (event.code === 4001) {
      tokenRefused(tokenExpired(chat.token) || wasWelcomed ? "expired" : "refused");
      return;
    }
    if (!opened) {
      handshakeFailed();
      return;
    }
    chat.refusals = 0;
    if (wasWelcomed) {
      const why = CLOSE_REASONS[event.code] || `the connection closed (code ${event.code})`;
      notice(`${why}; reconnecting`, "warn");
    }
    scheduleReconnect();
  }

  // The gateway refuses a handshake with HTTP 401 (a token missing, expired or invalid) or
  // 503 (full, or not ready), but a page sees only a WebSocket that failed. If the gateway
  // answers plain HTTP meanwhile, the refusal was of this connection: an expired token is told
  // as such (its `exp` says so), the other cases as what they may be. A gateway that is not
  // ready says so on /readyz, with a Retry-After the page honours (plus jitter).
  async function handshakeFailed() {
    let serverUp = false;
    let retryAfterMs = 0;
    try {
      const response = await fetch("/readyz", { cache: "no-store" });
      serverUp = response.ok;
      if (response.status === 503) {
        retryAfterMs = 1000 * (Number(response.headers.get("Retry-After")) || 1);
      }
    } catch {
      serverUp = false;
    }
    if (!chat.wanted || chat.socket) return; // the user did something meanwhile
    if (retryAfterMs) {
      if (chat.refusals === 0) notice("the server is not ready yet; waiting as it asks", "warn");
      chat.refusals = Math.max(chat.refusals, 1);
      scheduleReconnect(retryAfterMs * (1 + Math.random() / 4));
      return;
    }
    if (serverUp && chat.token && tokenExpired(chat.token)) {
      tokenRefused("expired");
      return;
    }
    if (serverUp) chat.refusals += 1;
    if (chat.refusals === REFUSALS_BEFORE_EXPLAINING) {
      if (chat.token) {
        notice("the server refused the connection: not your token, or it is full", "error");
        setFormNote("the server refused the connection: check the token (or try again later)");
      } else {
        notice("the server refused the connection: it may require a token, or be full", "error");
        setFormNote("the server refused the connection: if it requires a token, enter it here");
        ui.tokenField.hidden = false;
      }
      ui.formNote.dataset.kind = "server";
    }
    scheduleReconnect();
  }

  // The token is no good (close 4001, or an expired one at the handshake): stop retrying with it.
  function tokenRefused(why) {
    chat.wanted = false;
    clearTimers();
    setState("disconnected", why === "expired" ? "token expired" : "token refused");
    setComposerEnabled(false);
    const text =
      why === "expired"
        ? "your token expired: paste a new one above, then Join"
        : "the server refused your token: paste a valid one above, then Join";
    notice(text, "error");
    setFormNote(text);
    ui.formNote.dataset.kind = "server";
    ui.tokenField.hidden = false;
    ui.token.value = "";
    chat.token = "";
    saveSession(STORAGE.token, "");
    ui.token.focus();
  }

  // Exponential backoff with jitter: a restarted gateway is not hit by every client at once.
  function backoffDelay(attempt) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** attempt);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  function scheduleReconnect(atLeastMs = 0) {
    clearTimers();
    const delay = Math.max(atLeastMs, backoffDelay(chat.attempt));
    chat.attempt += 1;
    chat.retryAt = Date.now() + delay;
    chat.retryTimer = window.setTimeout(connect, delay);
    showCountdown();
    chat.countdownTimer = window.setInterval(showCountdown, 250);
  }

  function showCountdown() {
    const seconds = Math.max(1, Math.ceil((chat.retryAt - Date.now()) / 1000));
    setState("reconnecting", `reconnecting in ${seconds} s`);
  }

  function clearTimers() {
    window.clearTimeout(chat.retryTimer);
    window.clearInterval(chat.countdownTimer);
    window.clearTimeout(chat.connectTimer);
    chat.retryTimer = 0;
    chat.countdownTimer = 0;
    chat.connectTimer = 0;
  }

  function disconnect() {
    chat.wanted = false;
    clearTimers();
    dropSocket(1000);
    setState("disconnected");
    setComposerEnabled(false);
    notice("you left; press Join to come back");
  }

  // The gateway pings us, but the browser answers those itself and tells us nothing; so a
  // connection that died silently (a laptop asleep, a dead NAT entry) is found with our own ping.
  function checkQuiet() {
    if (!chat.welcomed) return;
    const now = Date.now();
    if (chat.pingSentAt && now - chat.pingSentAt > PONG_WAIT_MS) {
      chat.pingSentAt = 0;
      notice("the connection stopped answering; reconnecting", "warn");
      dropSocket(1000);
      scheduleReconnect();
    } else if (!chat.pingSentAt && now - chat.lastHeard > QUIET_MS) {
      chat.pingSentAt = now;
      sendJson({ type: "ping" });
    }
  }

  function sendJson(obj) {
    if (!chat.socket || chat.socket.readyState !== WebSocket.OPEN) return false;
    chat.socket.send(JSON.stringify(obj));
    return true;
  }

  // ---- events from the gateway -----------------------------------------------------------

  function onFrame(data) {
    chat.lastHeard = Date.now();
    chat.pingSentAt = 0;
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return; // not ours to show; the protocol only sends JSON to WebSocket clients
    }
    // Only our own handlers: a "type" like "constructor" must not reach Object's methods.
    if (event && typeof event.type === "string" && Object.hasOwn(HANDLERS, event.type)) {
      HANDLERS[event.type](event);
    }
  }

  const HANDLERS = {
    welcome(event) {
      const first = !chat.welcomed; // a later welcome answers our own hello (after a gap)
      const again = first && chat.everWelcomed; // a reconnect, not a join the user asked for
      chat.welcomed = true;
      chat.everWelcomed = true;
      chat.attempt = 0;
      chat.name = String(event.name);
      setState("connected", `connected to ${event.node}`);
      if (again) notice(`reconnected to ${event.node}`, "good");
      showRoom();
      setComposerEnabled(true);
      // Until the presence snapshot arrives (or if this gateway sends none), we know of us.
      if (first) chat.members.add(chat.name);
      renderPresence();
    },

    message(event) {
      if (event.channel !== chat.channel || typeof event.id !== "string") return;
      noteEpoch(event.epoch);
      if (chat.seen.has(event.id)) return; // replayed and live both: show it once
      remember(event.id);
      if (chat.replay) chat.replayAdded += 1;
      addMessage(event);
    },

    ack(event) {
      chat.pending.delete(event.ref);
      addBounded(chat.ownIds, event.id);
      // With echo on, our own message may arrive before or after its ack.
      const row = chat.rows.get(event.id);
      if (row) markOwn(row);
    },

    recovered(event) {
      const kind = chat.replay;
      const added = chat.replayAdded;
      chat.replay = null;
      if (typeof event.epoch === "string" && event.epoch) chat.epoch = event.epoch;
      if (kind === "since") {
        if (event.reset === true && event.complete === true) {
          // The history restarted (the server came back empty): nothing was missed.
          notice("the server's history of this channel restarted; nothing was missed", "info");
          if (added > 0) notice(`${plural(added, "message")} since then`, "good");
        } else {
          if (added > 0) notice(`${plural(added, "missed message")} recovered`, "good");
          if (!event.complete) notice("some messages were lost while you were away", "warn");
        }
        reportUnconfirmed();
      } else if (added > 0) {
        notice(plural(added, "earlier message"));
      }
    },

    gap() {
      notice("some messages may have been lost (the server's link was interrupted)", "warn");
      // The history may still hold them: ask for everything after the last one we saw.
      if (chat.lastId) {
        chat.replay = "since";
        chat.replayAdded = 0;
        const hello = { type: "hello", echo: true, since: chat.lastId };
        if (chat.epoch) hello.epoch = chat.epoch;
        sendJson(hello);
      }
    },

    join(event) {
      if (event.channel !== chat.channel) return;
      const name = String(event.name);
      chat.members.add(name);
      renderPresence();
      // Our own arrival is already told by the welcome.
      if (chat.expectOwnJoin && name === chat.name) {
        chat.expectOwnJoin = false;
        return;
      }
      notice(`${name} joined`, "join");
    },

    leave(event) {
      if (event.channel !== chat.channel) return;
      const name = String(event.name);
      chat.members.delete(name);
      renderPresence();
      notice(`${name} left`, "leave");
      // Names are not unique: the same name may still be here on another connection.
      if (chat.presenceSupported) scheduleWho();
    },

    // Who came and went on one gateway lately (newer gateways send this instead of join/leave).
    presence_diff(event) {
      if (event.channel !== chat.channel) return;
      const joined = Array.isArray(event.joined) ? event.joined.map(String) : [];
      const left = Array.isArray(event.left) ? event.left.map(String) : [];
      for (const name of left) chat.members.delete(name);
      for (const name of joined) chat.members.add(name);
      renderPresence();
      const others = (names) => names.filter((name) => name !== chat.name || !chat.expectOwnJoin);
      const came = others(joined);
      if (joined.includes(chat.name)) chat.expectOwnJoin = false;
      const more = (n) => (Number.isInteger(n) && n > 0 ? [`${n} more`] : []);
      const cameAll = [...came, ...more(event.more_joined)];
      const wentAll = [...left, ...more(event.more_left)];
      if (cameAll.length) notice(`${cameAll.join(", ")} joined`, "join");
      if (wentAll.length) notice(`${wentAll.join(", ")} left`, "leave");
      // Names are not unique, and lists are capped: ask for the whole list when unsure.
      if (left.length || more(event.more_joined).length || more(event.more_left).length) {
        if (chat.presenceSupported) scheduleWho();
      }
    },

    presence(event) {
      if (event.channel !== chat.channel || !Array.isArray(event.members)) return;
      chat.presenceSupported = true;
      chat.members = new Set(event.members.map(String));
      renderPresence();
    },

    error(event) {
      const text = chat.pending.get(event.ref);
      if (text !== undefined) {
        chat.pending.delete(event.ref);
        notice(`your message was not sent: ${String(event.message)}`, "error");
        // Give it back for editing, unless something new is being typed.
        if (!ui.text.value) ui.text.value = text;
        return;
      }
      notice(`${String(event.message)} (${String(event.code)})`, "error");
    },

    pong() {
      /* onFrame already noted that the connection is alive */
    },
  };

  // A Set keeps insertion order: past the limit, the oldest entry goes.
  function addBounded(set, value) {
    set.add(value);
    if (set.size > SEEN_LIMIT) set.delete(set.values().next().value);
  }

  // Ids compare only within one history: a message of a new epoch means the history restarted,
  // and the ids seen before say nothing about the new ones.
  function noteEpoch(epoch) {
    if (typeof epoch !== "string" || !epoch || epoch === chat.epoch) return;
    if (chat.epoch) {
      chat.seen.clear();
      chat.lastId = null;
    }
    chat.epoch = epoch;
  }

  function remember(id) {
    addBounded(chat.seen, id);
    if (!chat.lastId || compareIds(id, chat.lastId) > 0) chat.lastId = id;
  }

  // Ids are "<milliseconds>-<sequence>": compare as a pair of numbers, never as strings.
  function compareIds(a, b) {
    const [am, as] = a.split("-").map(Number);
    const [bm, bs] = b.split("-").map(Number);
    return am - bm || as - bs;
  }

  // After a resume, a message whose ack was lost shows up replayed (then it is ours) or not.
  function claimUnconfirmed(event) {
    if (event.sender !== chat.name) return false;
    const index = chat.unconfirmed.indexOf(event.text);
    if (index < 0) return false;
    chat.unconfirmed.splice(index, 1);
    return true;
  }

  function reportUnconfirmed() {
    for (const text of chat.unconfirmed) {
      notice(`this message may not have been sent: “${shorten(text)}”`, "warn");
    }
    chat.unconfirmed = [];
  }

  function scheduleWho() {
    // Coalesce a burst of leaves, and spread the requests of many pages over time.
    if (chat.whoTimer) return;
    chat.whoTimer = window.setTimeout(
      () => {
        chat.whoTimer = 0;
        if (chat.welcomed) sendJson({ type: "who" });
      },
      500 + Math.random() * 1500,
    );
  }

  // ---- rendering -------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text; // text, never HTML
    return node;
  }

  function addMessage(event) {
    const row = el("li", "msg");
    row.dataset.id = event.id;
    const meta = el("div", "meta");
    const sender = el("span", `sender hue-${hue(String(event.sender))}`, String(event.sender));
    const ts = Number(event.ts);
    const when = Number.isFinite(ts) ? new Date(ts * 1000) : new Date();
    const time = el("time", "time", clock(when));
    time.dateTime = when.toISOString();
    time.title = when.toLocaleString();
    meta.append(sender, time);
    row.append(meta, el("p", "text", String(event.text)));
    if (chat.ownIds.has(event.id) || claimUnconfirmed(event)) markOwn(row);
    chat.rows.set(event.id, row);
    append(row);
  }

  function markOwn(row) {
    row.classList.add("own");
    row.querySelector(".sender").title = "you";
  }

  function notice(text, kind = "info") {
    append(el("li", `notice notice-${kind}`, text));
  }

  // Keep the view pinned to the newest line, unless the reader scrolled up to read.
  function append(row) {
    const log = ui.log;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
    log.append(row);
    while (log.childElementCount > MAX_ROWS) {
      const old = log.firstElementChild;
      if (old.dataset.id) chat.rows.delete(old.dataset.id);
      old.remove();
    }
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function clock(date) {
    const pad = (n) => String(n).padStart(2, "0");
    return `${pad(date.getHours())}:${pad(date.getMinutes())}`;
  }

  // A stable colour per sender (one of a few CSS classes), so a conversation is easy to follow.
  function hue(name) {
    let hash = 0;
    for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return hash % 8;
  }

  function plural(count, word) {
    return `${count} ${word}${count === 1 ? "" : "s"}`;
  }

  function shorten(text) {
    return text.length > 60 ? `${text.slice(0, 57)}…` : text;
  }

  function renderPresence() {
    const names = [...chat.members].sort((a, b) => a.localeCompare(b));
    const items = names.map((name) => {
      const item = el("li", name === chat.name ? "person me" : "person", name);
      if (name === chat.name) item.append(el("span", "you", " (you)"));
      return item;
    });
    ui.people.replaceChildren(...items);
    ui.count.textContent = String(names.length);
  }

  const STATE_LABELS = {
    connecting: "connecting…",
    connected: "connected",
    reconnecting: "reconnecting…",
    disconnected: "disconnected",
  };

  // data-state drives the colour of the badge (and lets tests wait for a state).
  function setState(kind, label = STATE_LABELS[kind]) {
    ui.state.dataset.state = kind;
    ui.state.textContent = label;
  }

  function showRoom() {
    ui.roomName.textContent = `#${chat.channel}`;
    ui.whoami.textContent = chat.name ? `as ${chat.name}` : "";
    ui.text.placeholder = `Message #${chat.channel}`;
    document.title = `#${chat.channel} · broadcast`;
  }

  function setComposerEnabled(enabled) {
    ui.text.disabled = !enabled;
    ui.send.disabled = !enabled;
  }

  // ---- what the user does ----------------------------------------------------------------

  // Join (or rejoin as someone else, or elsewhere) with what the form says.
  function joinFromForm() {
    const name = ui.name.value.trim();
    const channel = ui.channel.value.trim() || "general";
    const token = ui.token.value.trim();
    const problem = formProblem();
    if (problem) {
      setFormNote(problem);
      ui.formNote.dataset.kind = "validation";
      (nameProblem(name) ? ui.name : channelProblem(channel) ? ui.channel : ui.token).focus();
      return;
    }
    setFormNote("");
    ui.name.value = name;
    ui.channel.value = channel;
    saveSetting(STORAGE.name, name);
    saveSetting(STORAGE.channel, channel);
    saveSession(STORAGE.token, token);
    const sameToken = token === chat.token;
    chat.token = token;
    chat.refusals = 0;
    if (chat.wanted && chat.socket && sameToken && name === chat.name && channel === chat.channel) {
      return;
    }
    chat.everWelcomed = false; // what follows is a join the user asked for, not a reconnect
    dropSocket(1000);
    if (channel !== chat.channel) enterChannel(channel);
    if (name !== chat.name) chat.members.delete(chat.name); // our old name leaves with us
    chat.name = name;
    chat.attempt = 0;
    connect();
    showRoom();
    ui.text.focus();
  }

  // A new channel starts from a clean slate: its ids have nothing to do with the last one's.
  function enterChannel(channel) {
    chat.channel = channel;
    chat.everWelcomed = false;
    chat.lastId = null;
    chat.epoch = null;
    chat.seen.clear();
    chat.rows.clear();
    chat.ownIds.clear();
    chat.unconfirmed = [];
    chat.members = new Set();
    ui.log.replaceChildren();
    renderPresence();
  }

  function submitText() {
    const line = ui.text.value;
    if (!line.trim()) return;
    // "//text" sends "/text", as in the line protocol; other "/…" lines are commands.
    if (line.startsWith("/") && !line.startsWith("//")) {
      runCommand(line);
      return;
    }
    publish(line.startsWith("//") ? line.slice(1) : line);
  }

  function publish(text) {
    const bytes = new TextEncoder().encode(text).length;
    if (bytes > TEXT_LIMIT_BYTES) {
      notice(`that message is ${bytes} bytes; the limit is ${TEXT_LIMIT_BYTES}`, "error");
      return;
    }
    if (!chat.welcomed) {
      notice("not connected: your message was not sent (it is still in the box)", "error");
      return;
    }
    const ref = `c-${chat.nextRef++}`;
    if (!sendJson({ type: "publish", text, ref })) return;
    chat.pending.set(ref, text);
    ui.text.value = "";
  }

  function runCommand(line) {
    const [command, ...rest] = line.trim().split(/\s+/);
    const argument = rest.join(" ");
    ui.text.value = "";
    const verb = command.toLowerCase();
    if ((verb === "/join" || verb === "/name") && !argument) {
      notice(`usage: ${verb} ${verb === "/join" ? "CHANNEL" : "NAME"}`, "info");
      return;
    }
    switch (verb) {
      case "/join":
        ui.channel.value = argument;
        joinFromForm();
        break;
      case "/name":
        ui.name.value = argument;
        joinFromForm();
        break;
      case "/who":
        if (!sendJson({ type: "who" })) notice("not connected", "error");
        break;
      case "/quit":
        disconnect();
        break;
      default:
        ui.text.value = line;
        notice("commands: /join CHANNEL, /name NAME, /who, /quit; //text sends /text", "info");
    }
  }

  function wireEvents() {
    for (const field of [ui.name, ui.channel, ui.token]) {
      field.addEventListener("input", recheckForm);
    }
    ui.identity.addEventListener("submit", (event) => {
      event.preventDefault();
      joinFromForm();
    });
    ui.composer.addEventListener("submit", (event) => {
      event.preventDefault();
      submitText();
    });
    // Back online: no point waiting out the backoff.
    window.addEventListener("online", () => {
      if (chat.wanted && !chat.socket) connect();
    });
    window.setInterval(checkQuiet, 5000);
  }

  // The list sits beside the chat on a wide screen (always open), folded above it on a phone.
  function followScreenWidth() {
    const wide = window.matchMedia("(min-width: 700px)");
    ui.presence.open = wide.matches;
    wide.addEventListener("change", () => {
      ui.presence.open = wide.matches;
    });
    ui.presence.querySelector("summary").addEventListener("click", (event) => {
      if (wide.matches) event.preventDefault();
    });
  }

  function start() {
    wireEvents();
    ui.name.value = loadSetting(STORAGE.name);
    ui.channel.value = loadSetting(STORAGE.channel) || "general";
    const token = tokenFromFragment() || loadSession(STORAGE.token);
    ui.token.value = token;
    followScreenWidth();
    renderPresence();
    if (ui.name.value) joinFromForm();
    else ui.name.focus();
  }

  start();
})();
