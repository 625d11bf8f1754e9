// wsgateway live viewer: one browser WebSocket through the SDK (@wsgateway/client), the documented protocol.
//
// * dev mode (GET /dev/demo answers): pick a demo user; tokens come from the INSECURE dev identity
//   provider. Otherwise: paste a token.
// * GET /v1/scopes lists the scopes the user may see; the socket subscribes to them on its URL
//   (plus `*` for org admins, who also see scopes without an ACL document).
// * The connection is the SDK's GatewayClient (clients/js, served built at /static/sdk/): it keeps the
//   cursor (the highest `seq` received), reconnects with `?since=<cursor>` after any disconnect and drops
//   duplicates. "Drop" closes the socket and resumes 2 s later: the gateway replays the gap, then
//   continues live; nothing is lost.
// * Event text is only ever put into the page through textContent (never parsed as HTML).
//
// * The inbox: the socket also subscribes to `inbox`; the list is GET /v1/inbox, fetched again when an
//   inbox event (a request, its answer, its process's end) or a `revoked` arrives, and a request is
//   hidden once its `expires_at` passes (the gateway sends no frame for that).
//
// `window.viewer` exposes the state (tests read it): state, principal, lastSeq, startSeq, seqs,
// events, duplicates, scopes {scope: {status, events, via, presence}}, resumes, drops, log,
// inbox [{seq, scope, request_id, prompt, expires_at}].
"use strict";

(() => {
  const MAX_CARDS = 10; // top-level items kept per scope panel
  const MAX_SEQS = 20000;
  const MAX_LOG = 80;
  const MAX_URL_SCOPES = 100;
  const DROP_PAUSE_MS = 2000;
  const SCOPE_RE = /^(conversation|process|agent):[A-Za-z0-9_-]{1,128}$/;

  const viewer = (window.viewer = {
    mode: null, // "dev" | "token"
    user: null,
    principal: null,
    state: "idle",
    lastSeq: null, // the cursor: highest seq received (or the live start position)
    startSeq: null, // position of the first `subscribed` of this session
    events: 0,
    duplicates: 0,
    seqs: [],
    scopes: {},
    orgAdmin: false,
    resumes: [],
    drops: 0,
    log: [],
    inbox: [],
  });

  const $ = (id) => document.getElementById(id);

  /** A new element with a class and text (text through textContent: never HTML). */
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function short(value, max = 160) {
    let s;
    try {
      s = typeof value === "string" ? value : JSON.stringify(value);
    } catch (_) {
      s = String(value);
    }
    if (s === undefined) s = "";
    return s.length > max ? s.slice(0, max - 1) + "\u2026" : s;
  }

  function clock() {
    return new Date().toTimeString().slice(0, 8);
  }

  function logLine(kind, text) {
    viewer.log.push({ kind, text });
    if (viewer.log.length > MAX_LOG) viewer.log.shift();
    const li = el("li", "k-" + kind);
    li.append(el("span", "t", clock()), document.createTextNode(text));
    const log = $("log");
    log.prepend(li);
    while (log.children.length > MAX_LOG) log.lastChild.remove();
  }

  // ----------------------------------------------------------------------------------------------
  // session: who we are, which scopes, the socket
  // ----------------------------------------------------------------------------------------------

  let demo = null; // GET /dev/demo
  let getToken = null; // async () => jwt
  let sdk = null; // import("/static/sdk/index.js"): the built @wsgateway/client, loaded once
  let client = null; // the session's GatewayClient
  let session = 0; // bumped on every user switch: callbacks of older clients are ignored
  let dropping = false;
  let followed = []; // scopes added with the "follow" form
  let wildcard = false;
  let sockResume = null; // the resume of the current socket, once its first `subscribed` says so

  function setState(state) {
    viewer.state = state;
    const pill = $("conn-state");
    pill.dataset.state = state;
    pill.textContent = state;
    $("drop").disabled = state !== "open";
    $("follow-form").querySelector("button").disabled = state !== "open";
  }

  function updateStats() {
    $("last-seq").textContent = viewer.lastSeq === null ? "-" : String(viewer.lastSeq);
    $("event-count").textContent = String(viewer.events);
    $("resume-count").textContent = String(viewer.resumes.length);
  }

  async function devToken(user) {
    const q = new URLSearchParams({ sub: user.name, tenant: demo.tenant, groups: user.groups.join(",") });
    const r = await fetch("/dev/idp/token?" + q.toString(), { cache: "no-store" });
    if (!r.ok) throw new Error("dev identity provider: HTTP " + r.status);
    return (await r.json()).access_token;
  }

  function resetSession() {
    session += 1;
    if (client) {
      const old = client;
      client = null;
      old.close();
    }
    Object.assign(viewer, {
      principal: null, lastSeq: null, startSeq: null, events: 0, duplicates: 0, seqs: [], scopes: {},
      orgAdmin: false, resumes: [], drops: 0, inbox: [],
    });
    inboxToken = null;
    renderInbox();
    followed = [];
    wildcard = false;
    panels.clear();
    $("panels").replaceChildren(el("div", "empty", "Loading\u2026"));
    $("scopes").replaceChildren();
    $("principal").textContent = "-";
    $("resume-note").hidden = true;
    updateStats();
  }

  async function startSession(label, tokenFn) {
    resetSession();
    const mine = session;
    getToken = tokenFn;
    setState("connecting");
    logLine("info", "user " + label);
    let token;
    try {
      token = await getToken();
    } catch (e) {
      setState("error");
      logLine("error", String(e.message || e));
      return;
    }
    if (mine !== session) return;
    let r = null;
    let body = {};
    try {
      r = await fetch("/v1/scopes?limit=" + MAX_URL_SCOPES, {
        headers: { Authorization: "Bearer " + token }, cache: "no-store",
      });
      body = await r.json().catch(() => ({}));
    } catch (e) {
      body = { error: { message: String(e.message || e) } };
    }
    if (mine !== session) return;
    if (!r || !r.ok) {
      setState("error");
      const msg = (body.error && body.error.message) || "HTTP " + (r ? r.status : "error");
      logLine("error", "/v1/scopes: " + msg);
      $("panels").replaceChildren(el("div", "empty", "The gateway refused the token: " + msg));
      return;
    }
    viewer.orgAdmin = !!body.org_admin;
    wildcard = viewer.orgAdmin || body.scopes.length >= MAX_URL_SCOPES;
    $("panels").replaceChildren();
    for (const s of body.scopes) ensureScope(s.scope, s.via, "requested");
    $("scopes-hint").textContent = body.scopes.length
      ? (viewer.orgAdmin ? "Org admin: every scope of tenant " + body.tenant + " (the socket also subscribes to *)." : "Tenant " + body.tenant + ".")
      : "None yet: this user may see no scope of tenant " + body.tenant + ".";
    if (!body.scopes.length && !wildcard) {
      $("panels").replaceChildren(el("div", "empty", "Nothing to show: no scope is visible to " + body.principal + "."));
    }
    connect(token);
  }

  async function connect(token) {
    const mine = session;
    if (!sdk) sdk = import("/static/sdk/index.js");
    const { GatewayClient } = await sdk;
    if (mine !== session) return;
    const scopes = Object.keys(viewer.scopes); // pending (revoked, forbidden) ones too: they restart on a grant
    if (wildcard) scopes.push("*");
    scopes.push("inbox");
    let first = token; // the token the scopes were listed with; then a fresh one for every reconnect
    const url = new URL("/v1/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const c = new GatewayClient({
      url: url.href, scopes, transport: "websocket", presence: true, backoff: { initialMs: 1000, maxMs: 10000 },
      token: async () => {
        const t = first || (await getToken());
        first = null;
        inboxToken = t;
        return t;
      },
    });
    client = c;
    c.on("state", (state) => {
      if (c !== client || (state !== "connecting" && state !== "reconnecting")) return;
      const resume = c.cursor !== null;
      sockResume = null;
      setState(resume ? "resuming" : "connecting");
      logLine("info", (resume ? "reconnect " : "connect ") + url.pathname + "?scope=" + c.scopes.join(",") +
        (resume ? "&since=" + c.cursor : ""));
    });
    c.on("frame", (frame) => {
      if (c === client) onFrame(frame);
    });
    c.on("disconnected", (d) => {
      if (c === client) onClose(d);
    });
    c.start();
  }

  function onClose(d) {
    const reason = d.reason ? " " + d.reason : "";
    if (dropping) {
      dropping = false;
      setState("dropped");
      logLine("close", "dropped by the button at seq " + viewer.lastSeq + "; resuming in " + DROP_PAUSE_MS / 1000 + " s");
      note("pending", "Connection dropped at seq " + viewer.lastSeq + ". Events keep flowing on the server; reconnecting with since=" + viewer.lastSeq + " in " + DROP_PAUSE_MS / 1000 + " s\u2026");
      return; // the client resumes after DROP_PAUSE_MS (drop() said so)
    }
    logLine("close", "closed " + d.code + reason);
    if (d.final || (d.code === 4408 && viewer.mode === "token")) {
      if (client) client.close(); // 4400, 4401: final; 4408 with a pasted token: it will not get fresher
      setState("error");
      note("lossy", "Closed " + d.code + reason + ": not retried (fix the token or URL).");
      return;
    }
    setState("closed"); // 1001, 1006, 4408 (fresh dev token), 4429, ...: the client resumes with the cursor
  }

  function note(kind, text) {
    const n = $("resume-note");
    n.className = "resume-note" + (kind ? " " + kind : "");
    n.textContent = text;
    n.hidden = false;
  }

  function drop() {
    if (!client || viewer.state !== "open") return;
    dropping = true;
    viewer.drops += 1;
    client.drop({ reconnectInMs: DROP_PAUSE_MS });
  }

  // ----------------------------------------------------------------------------------------------
  // frames
  // ----------------------------------------------------------------------------------------------

  function showResume(r) {
    const lost = r.recovered === false;
    note(lost ? "lossy" : "", "Resumed from seq " + r.since + ": " + r.replayed + " missed event" +
      (r.replayed === 1 ? "" : "s") + " replayed (seq " + r.since + " < seq \u2264 " + r.seq + "), then live. " +
      (lost ? "recovered: false: the stream no longer holds part of the gap." : "recovered: true: nothing lost, nothing twice."));
  }

  function onFrame(f) {
    switch (f.type) {
      case "welcome":
        viewer.principal = f.principal;
        $("principal").textContent = f.principal.id + (f.principal.groups.length ? " [" + f.principal.groups.join(", ") + "]" : "");
        setState("open");
        logLine("welcome", "welcome " + f.principal.id + ", tenant " + f.principal.tenant);
        loadInbox();
        break;
      case "subscribed": {
        if (viewer.startSeq === null) viewer.startSeq = f.seq;
        if (viewer.lastSeq === null) viewer.lastSeq = f.seq; // live from here: a valid resume cursor
        if (f.since !== undefined && !sockResume) {
          // a resume: the replay delivers (since, seq], then live events follow
          sockResume = { since: f.since, seq: f.seq, recovered: f.recovered, replayed: 0 };
          viewer.resumes.push(sockResume);
          logLine("resume", "resumed from seq " + f.since + " (replay up to " + f.seq + ", recovered " + f.recovered + ")");
          showResume(sockResume);
        }
        if (f.scope !== "*" && f.scope !== "inbox") {
          const s = ensureScope(f.scope, null, "live");
          const was = s.status;
          setScopeStatus(f.scope, "live");
          if (was === "revoked" || was === "forbidden") {
            banner(f.scope, "good", ["Access granted: ", code("subscribed"), " frame, live again from seq " + f.seq +
              " (events published meanwhile are not replayed)."]);
          }
        }
        logLine("subscribed", "subscribed " + f.scope + " at seq " + f.seq + (f.since !== undefined ? " since " + f.since : ""));
        updateStats();
        break;
      }
      case "revoked":
        if (f.scope.startsWith("process:")) loadInbox(); // its requests leave the inbox
        if (f.scope !== "*" && f.scope !== "inbox") {
          ensureScope(f.scope, null, "revoked");
          setScopeStatus(f.scope, "revoked");
          banner(f.scope, "", [code("revoked"), " frame: access to " + f.scope + " was removed. Nothing more is delivered; " +
            "the subscription stays pending and restarts if access comes back."]);
        }
        logLine("revoked", "revoked " + f.scope);
        break;
      case "error":
        if (f.code === "forbidden" && f.scope) {
          ensureScope(f.scope, null, "forbidden");
          setScopeStatus(f.scope, "forbidden");
          banner(f.scope, "", ["No access (", code("forbidden"), "): the subscription is pending and starts if access is granted."]);
        }
        logLine("error", "error " + f.code + (f.scope ? " " + f.scope : "") + ": " + f.message);
        break;
      case "unsubscribed":
        logLine("info", "unsubscribed " + f.scope);
        break;
      case "event":
        onEvent(f);
        break;
      case "presence":
        onPresence(f);
        break;
      default:
        break; // pong, refreshed, and types this viewer does not know
    }
  }

  function onEvent(f) {
    if (viewer.lastSeq !== null && f.seq <= viewer.lastSeq) {
      viewer.duplicates += 1; // already handled (cannot happen on one connection; cheap to guard)
      return;
    }
    viewer.lastSeq = f.seq;
    viewer.events += 1;
    viewer.seqs.push(f.seq);
    if (viewer.seqs.length > MAX_SEQS) viewer.seqs.splice(0, viewer.seqs.length - MAX_SEQS);
    if (sockResume && f.seq <= sockResume.seq) {
      sockResume.replayed += 1;
      showResume(sockResume);
    }
    const ev = f.event || {};
    const scope = String(ev.scope || "");
    if (INBOX_TYPES.has(ev.type)) loadInbox();
    if (!SCOPE_RE.test(scope)) return;
    const s = ensureScope(scope, null, "live");
    s.events += 1;
    render(scope, ev);
    updatePanelHead(scope);
    updateStats();
  }

  /**
   * A `presence` frame: a snapshot replaces the panel's model, a delta changes it (docs/protocol.md,
   * Presence). viewer.scopes[scope].presence = {count, members: {id: {id, name?}}, agents: {run_id: {...}}}.
   */
  function onPresence(f) {
    const scope = String(f.scope || "");
    const s = viewer.scopes[scope];
    if (!s) return;
    let m = s.presence;
    if (f.snapshot || !m) {
      m = s.presence = { count: 0, members: {}, agents: {} };
      for (const x of f.members || []) m.members[x.id] = x;
      for (const a of f.agents || []) m.agents[a.run_id] = a;
    }
    if (!f.snapshot) {
      for (const id of f.left || []) delete m.members[id];
      for (const x of f.joined || []) m.members[x.id] = x;
      for (const id of f.agents_finished || []) delete m.agents[id];
      for (const a of f.agents_started || []) m.agents[a.run_id] = a;
    }
    m.count = Number(f.count) || 0;
    renderPresence(scope);
  }

  function renderPresence(scope) {
    const p = panels.get(scope);
    const m = viewer.scopes[scope] && viewer.scopes[scope].presence;
    if (!p || !m) return;
    const me = viewer.principal ? viewer.principal.id : null;
    const others = Object.values(m.members).filter((x) => x.id !== me);
    const names = others.map((x) => short(x.name || String(x.id).replace(/^user:/, ""), 40));
    const hidden = Math.max(0, m.count - Object.keys(m.members).length);
    const agents = Object.values(m.agents).map((a) => short(a.agent_id || a.run_id, 40));
    const parts = [];
    parts.push(names.length || hidden ? "watching: " + names.join(", ") + (hidden ? " (+" + hidden + " more)" : "")
                                      : "nobody else watching");
    if (agents.length) parts.push("agents active: " + agents.join(", "));
    p.presence.textContent = parts.join(" \u00b7 ");
    p.presence.dataset.count = String(m.count);
    p.presence.hidden = false;
  }

  // ----------------------------------------------------------------------------------------------
  // scopes and panels
  // ----------------------------------------------------------------------------------------------

  const panels = new Map(); // scope -> {root, feed, runs, msgs, tools, reasoning, answers, procs}

  function ensureScope(scope, via, status) {
    let s = viewer.scopes[scope];
    if (!s) {
      s = viewer.scopes[scope] = { status, events: 0, via: via || (wildcard ? "org admin (via *)" : "") };
      makePanel(scope);
      renderScopeList();
    } else if (via) {
      s.via = via;
    }
    return s;
  }

  function setScopeStatus(scope, status) {
    const s = viewer.scopes[scope];
    if (!s) return;
    s.status = status;
    const p = panels.get(scope);
    if (p) {
      p.root.classList.toggle("revoked", status === "revoked");
      p.root.classList.toggle("forbidden", status === "forbidden");
      p.badge.dataset.status = status;
      p.badge.textContent = status;
      syncAction(scope);
    }
    renderScopeList();
  }

  /** A protocol name (frame type, error code) shown as code: an element, never markup in a string. */
  function code(text) {
    return el("code", "", text);
  }

  /** The panel's banner: `parts` are strings (text) and nodes (from `code`). */
  function banner(scope, kind, parts) {
    const p = panels.get(scope);
    if (!p) return;
    p.banner.className = "banner" + (kind ? " " + kind : "");
    p.banner.replaceChildren(...parts.map((x) => (typeof x === "string" ? document.createTextNode(x) : x)));
    p.banner.hidden = false;
  }

  function updatePanelHead(scope) {
    const p = panels.get(scope);
    if (p) {
      const n = viewer.scopes[scope].events;
      p.count.textContent = n + " event" + (n === 1 ? "" : "s");
      p.root.dataset.events = String(n);
    }
  }

  function isDemoScope(scope) {
    return !!demo && demo.scopes.indexOf(scope) >= 0;
  }

  function makePanel(scope) {
    const root = el("article", "panel");
    root.dataset.scope = scope;
    root.dataset.events = "0";
    const head = el("div", "panel-head");
    const badge = el("span", "badge", viewer.scopes[scope].status);
    badge.dataset.status = viewer.scopes[scope].status;
    const count = el("span", "count", "0 events");
    head.append(el("span", "scope-name", scope), badge, count);
    let action = null;
    if (viewer.mode === "dev" && isDemoScope(scope) && !viewer.orgAdmin) {
      action = el("button", "small danger", "revoke access");
      action.type = "button";
      action.addEventListener("click", () => toggleAccess(scope, action));
    }
    const pres = el("div", "presence");
    pres.hidden = true;
    const ban = el("div", "banner");
    ban.hidden = true;
    const feed = el("div", "feed");
    feed.append(el("div", "waiting", "waiting for events\u2026"));
    root.append(head, pres, ban, feed);
    const container = $("panels");
    const empty = container.querySelector(".empty");
    if (empty) empty.remove();
    container.append(root);
    const s = viewer.scopes[scope];
    panels.set(scope, {
      root, head, feed, badge, count, action, banner: ban, presence: pres, runs: new Map(), msgs: new Map(), tools: new Map(),
      streams: new Map(), proc: null, requests: new Map(),
      visible: s.status === "live" || (!!s.via && s.via !== "followed"), // listed by /v1/scopes or seen live
    });
    syncAction(scope);
  }

  /**
   * The demo switch on a panel (dev mode, demo scopes, users who are not org admins), only for a scope
   * this user may see (listed by /v1/scopes, or live in this session): "revoke access" while it is live,
   * "grant back" while the switch restricts it. A panel the user is forbidden from gets neither: revoking
   * would restrict the scope for everyone else and take nothing from this user.
   */
  function syncAction(scope) {
    const p = panels.get(scope);
    if (!p || !p.action) return;
    const restricted = !!demo && demo.restricted.indexOf(scope) >= 0;
    const status = viewer.scopes[scope] ? viewer.scopes[scope].status : null;
    if (status === "live") p.visible = true;
    const b = p.action;
    if (!p.visible) {
      b.remove();
      return;
    }
    if (restricted) {
      b.dataset.action = "grant";
      b.textContent = "grant back";
      b.className = "small";
      b.title = "Give this demo scope back to its members (rewrites its ACL document): a subscribed frame follows";
    } else if (status === "live") {
      b.dataset.action = "revoke";
      b.textContent = "revoke access";
      b.className = "small danger";
      b.title = "Restrict this demo scope to org admins (rewrites its ACL document): a revoked frame follows";
    } else {
      b.remove();
      return;
    }
    if (!b.isConnected) p.head.append(b);
  }

  function renderScopeList() {
    const ul = $("scopes");
    ul.replaceChildren();
    for (const scope of Object.keys(viewer.scopes).sort()) {
      const s = viewer.scopes[scope];
      const li = el("li");
      const dot = el("span", "dot");
      dot.dataset.status = s.status;
      li.title = s.status;
      const text = el("div", "scope-text");
      text.append(el("span", "scope-name", scope), el("span", "via", s.via || s.status));
      li.append(dot, text);
      ul.append(li);
    }
  }

  async function toggleAccess(scope, button) {
    const grant = button ? button.dataset.action === "grant" : true;
    if (button) button.disabled = true;
    try {
      const r = await fetch("/dev/demo/access", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ scope, grant }),
      });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error ? body.error.message : "HTTP " + r.status);
      logLine("info", (grant ? "demo: granted back " : "demo: restricted to org admins ") + scope);
      if (demo) {
        demo.restricted = demo.restricted.filter((x) => x !== scope).concat(grant ? [] : [scope]);
        syncAction(scope);
      }
    } catch (e) {
      logLine("error", "demo access: " + (e.message || e));
    } finally {
      if (button) button.disabled = false;
      refreshDemo();
    }
  }

  async function refreshDemo() {
    if (viewer.mode !== "dev") return;
    const r = await fetch("/dev/demo", { cache: "no-store" });
    if (!r.ok) return;
    demo = await r.json();
    const ul = $("demo-acl");
    ul.replaceChildren();
    for (const scope of demo.scopes) {
      const restricted = demo.restricted.indexOf(scope) >= 0;
      const li = el("li");
      const b = el("button", restricted ? "small" : "small ghost", restricted ? "grant back" : "restrict");
      b.type = "button";
      b.dataset.action = restricted ? "grant" : "revoke";
      b.addEventListener("click", () => toggleAccess(scope, b)); // refreshDemo() then syncs the panels
      li.append(el("span", "scope-name", scope), el("span", "via", restricted ? "restricted" : "as seeded"), b);
      ul.append(li);
    }
    for (const scope of panels.keys()) syncAction(scope);
  }

  // ----------------------------------------------------------------------------------------------
  // renderers: one per event family; unknown types get a compact line
  // ----------------------------------------------------------------------------------------------

  function append(p, node) {
    const feed = p.feed;
    const waiting = feed.querySelector(".waiting");
    if (waiting) waiting.remove();
    feed.append(node);
    while (feed.children.length > MAX_CARDS) feed.firstChild.remove();
    return node;
  }

  function forget(map) {
    for (const [k, v] of map) if (!(v.root || v).isConnected) map.delete(k);
  }

  function runCard(p, ev, lateJoin) {
    const id = String(ev.run_id || "");
    let run = p.runs.get(id);
    if (run) return run;
    const root = el("div", "card run");
    root.dataset.run = id;
    const head = el("div", "card-head");
    const outcome = el("span", "outcome", "running");
    outcome.dataset.outcome = "running";
    head.append(el("span", "title", (ev.actor ? String(ev.actor).replace(/^agent:/, "agent ") : "agent") + " run"),
      el("span", "", id), outcome);
    const input = el("div", "input");
    const steps = el("div", "steps");
    root.append(head, input, steps);
    if (lateJoin) input.textContent = "(joined mid-run)";
    run = { root, outcome, input, steps, stepEls: new Map() };
    p.runs.set(id, run);
    if (p.runs.size > 4 * MAX_CARDS) forget(p.runs);
    append(p, root);
    return run;
  }

  function stream(p, run, key, cls) {
    let s = p.streams.get(key);
    if (!s) {
      s = el("div", cls);
      p.streams.set(key, s);
      if (p.streams.size > 8 * MAX_CARDS) forget(p.streams);
      run.root.append(s);
    }
    return s;
  }

  function toolBox(p, run, id, name) {
    let t = p.tools.get(id);
    if (!t) {
      const root = el("div", "tool");
      const tname = el("span", "tname", name || "tool");
      const targs = el("span", "targs");
      const tresult = el("span", "tresult");
      tresult.hidden = true;
      root.append(tname, document.createTextNode("("), targs, document.createTextNode(")"), tresult);
      t = { root, tname, targs, tresult };
      p.tools.set(id, t);
      if (p.tools.size > 4 * MAX_CARDS) forget(p.tools);
      run.root.append(root);
    }
    return t;
  }

  function renderRun(p, ev) {
    const d = ev.data || {};
    const type = ev.type;
    const run = runCard(p, ev, type !== "run.started");
    switch (type) {
      case "run.started":
        run.input.replaceChildren(document.createTextNode("asked: "), el("b", "", short(d.input === undefined ? "" : d.input, 200)));
        break;
      case "run.step.started":
      case "run.step.finished": {
        let chip = run.stepEls.get(d.step_id);
        if (!chip) {
          chip = el("span", "step", d.name || d.step_id);
          run.stepEls.set(d.step_id, chip);
          run.steps.append(chip);
        }
        chip.className = "step " + (type === "run.step.started" ? "active" : "done");
        chip.textContent = (type === "run.step.finished" ? "\u2713 " : "\u2026 ") + (d.name || d.step_id);
        break;
      }
      case "run.reasoning.started":
      case "run.reasoning.delta":
      case "run.reasoning.finished": {
        const s = stream(p, run, "r:" + d.message_id, "reasoning");
        if (type === "run.reasoning.delta") s.textContent += String(d.delta || "");
        if (type === "run.reasoning.finished" && typeof d.content === "string") s.textContent = d.content;
        break;
      }
      case "run.message.started":
      case "run.message.delta":
      case "run.message.finished": {
        const s = stream(p, run, "m:" + d.message_id, "answer streaming");
        if (type === "run.message.delta") s.textContent += String(d.delta || "");
        if (type === "run.message.finished") {
          if (typeof d.content === "string") s.textContent = d.content; // repairs missed deltas
          s.classList.remove("streaming");
        }
        break;
      }
      case "run.tool_call.started":
      case "run.tool_call.args.delta":
      case "run.tool_call.args.finished":
      case "run.tool_call.finished":
      case "run.tool_call.error": {
        const t = toolBox(p, run, String(d.tool_call_id), d.name);
        if (type === "run.tool_call.started" && d.name) t.tname.textContent = d.name;
        if (type === "run.tool_call.args.delta") t.targs.textContent += String(d.delta || "");
        if (type === "run.tool_call.args.finished" && typeof d.arguments === "string") t.targs.textContent = d.arguments;
        if (type === "run.tool_call.finished") {
          t.tresult.hidden = false;
          t.tresult.className = "tresult";
          t.tresult.textContent = "\u2192 " + short(d.result === undefined ? "done" : d.result, 220);
        }
        if (type === "run.tool_call.error") {
          t.tresult.hidden = false;
          t.tresult.className = "tresult err";
          t.tresult.textContent = "\u2717 " + short(d.error, 220);
        }
        break;
      }
      case "run.finished": {
        const outcome = String(d.outcome || "finished");
        run.outcome.textContent = outcome;
        run.outcome.dataset.outcome = outcome;
        for (const s of run.root.querySelectorAll(".streaming")) s.classList.remove("streaming");
        if (d.error) run.root.append(el("div", "run-error", short(d.error, 200)));
        if (d.usage && typeof d.usage === "object") {
          run.root.append(el("div", "usage", "tokens in " + (d.usage.input_tokens ?? "?") + " / out " +
            (d.usage.output_tokens ?? "?")));
        }
        break;
      }
      default:
        run.root.append(el("div", "other", type + " " + short(d, 120)));
    }
  }

  function renderConversation(p, ev) {
    const d = ev.data || {};
    switch (ev.type) {
      case "conversation.message.created": {
        const m = el("div", "msg");
        m.append(el("span", "author", d.author_id || d.role || "?"), document.createTextNode(short(d.content, 400)));
        p.msgs.set(String(d.message_id), m);
        if (p.msgs.size > 4 * MAX_CARDS) forget(p.msgs);
        append(p, m);
        break;
      }
      case "conversation.message.updated": {
        const m = p.msgs.get(String(d.message_id));
        if (m) m.lastChild.textContent = short(d.content, 400) + " (edited)";
        break;
      }
      case "conversation.message.deleted": {
        const m = p.msgs.get(String(d.message_id));
        if (m) m.classList.add("deleted");
        break;
      }
      case "conversation.participant.joined": {
        const line = el("div", "sys");
        line.append(el("b", "", d.participant_id), document.createTextNode(" joined" + (d.role ? " as " + d.role : "")));
        append(p, line);
        break;
      }
      case "conversation.participant.left": {
        const line = el("div", "sys");
        line.append(el("b", "", d.participant_id), document.createTextNode(" left" + (d.reason ? " (" + d.reason + ")" : "")));
        append(p, line);
        break;
      }
      default:
        append(p, el("div", "other", ev.type + " " + short(d, 160)));
    }
  }

  function procCard(p, name) {
    const root = el("div", "card proc");
    root.dataset.outcome = "running";
    const head = el("div", "card-head");
    const outcome = el("span", "outcome", "running");
    outcome.dataset.outcome = "running";
    head.append(el("span", "title", name || "process"), outcome);
    const stages = el("div", "stages");
    const bar = el("div", "bar");
    const fill = el("div");
    bar.append(fill);
    const msg = el("div", "pmsg");
    root.append(head, stages, bar, msg);
    p.proc = { root, outcome, stages, fill, msg, stageEls: [] };
    append(p, root);
    return p.proc;
  }

  function setOutcome(proc, outcome) {
    proc.root.dataset.outcome = outcome;
    proc.outcome.dataset.outcome = outcome;
    proc.outcome.textContent = outcome;
  }

  function renderProcess(p, ev) {
    const d = ev.data || {};
    let proc = p.proc && p.proc.root.isConnected ? p.proc : null;
    if (ev.type === "process.started" || !proc) {
      proc = procCard(p, ev.type === "process.started" ? d.name : "process (joined mid-way)");
      if (Array.isArray(d.stages)) {
        for (const name of d.stages) {
          const chip = el("span", "stage", name);
          proc.stageEls.push(chip);
          proc.stages.append(chip);
        }
      }
      if (ev.type === "process.started") return;
    }
    switch (ev.type) {
      case "process.stage_changed": {
        const i = Number(d.index);
        while (proc.stageEls.length < Number(d.total || 0)) {
          const chip = el("span", "stage", "stage " + (proc.stageEls.length + 1));
          proc.stageEls.push(chip);
          proc.stages.append(chip);
        }
        proc.stageEls.forEach((chip, k) => {
          chip.className = "stage" + (k < i ? " done" : k === i ? " current" : "");
        });
        if (proc.stageEls[i]) proc.stageEls[i].textContent = d.stage;
        proc.msg.textContent = "stage " + (i + 1) + " of " + d.total + ": " + d.stage;
        break;
      }
      case "process.progress":
        if (typeof d.fraction === "number") proc.fill.style.width = Math.round(d.fraction * 100) + "%";
        proc.msg.textContent = (typeof d.fraction === "number" ? Math.round(d.fraction * 100) + "% " : "") + (d.message || "");
        break;
      case "process.input_required": {
        const n = el("div", "notice");
        n.textContent = "Input required: " + short(d.prompt, 200) +
          (Array.isArray(d.assignees) && d.assignees.length ? " (asked: " + d.assignees.join(", ") + ")" : "");
        p.requests.set(String(d.request_id), n);
        setOutcome(proc, "waiting");
        proc.root.append(n);
        break;
      }
      case "process.input_received": {
        const n = p.requests.get(String(d.request_id));
        if (n) {
          n.className = "notice answered";
          n.textContent = "Answered by " + d.by + (d.value !== undefined ? ": " + short(d.value, 80) : "");
          p.requests.delete(String(d.request_id));
        }
        setOutcome(proc, "running");
        break;
      }
      case "process.completed":
        proc.fill.style.width = "100%";
        proc.stageEls.forEach((chip) => (chip.className = "stage done"));
        proc.msg.textContent = "completed" + (d.result !== undefined ? ": " + short(d.result, 120) : "");
        setOutcome(proc, "completed");
        break;
      case "process.failed":
        setOutcome(proc, "failed");
        proc.root.append(el("div", "perr", "failed: " + short(d.error, 200)));
        break;
      default:
        proc.root.append(el("div", "other", ev.type + " " + short(d, 120)));
    }
  }

  function render(scope, ev) {
    const p = panels.get(scope);
    if (!p) return;
    const feed = p.feed;
    // follow the newest content unless the reader scrolled up (decided before the feed changes)
    const stick = feed.scrollHeight - feed.scrollTop - feed.clientHeight < 60;
    const type = String(ev.type || "");
    if (type.startsWith("run.")) renderRun(p, ev);
    else if (type.startsWith("conversation.")) renderConversation(p, ev);
    else if (type.startsWith("process.")) renderProcess(p, ev);
    else append(p, el("div", "other", type + " " + short(ev.data, 160)));
    if (stick) feed.scrollTop = feed.scrollHeight;
  }

  // ----------------------------------------------------------------------------------------------
  // inbox: the requests for input open for this user (GET /v1/inbox)
  // ----------------------------------------------------------------------------------------------

  const INBOX_TYPES = new Set(["process.input_required", "process.input_received", "process.completed",
    "process.failed", "process.cancelled"]);
  let inboxToken = null; // the token of the current socket
  let inboxLoading = null; // a fetch in flight; one more is queued behind it at most
  let inboxAgain = false;
  let expiryTimer = null;

  async function loadInbox() {
    if (inboxLoading) {
      inboxAgain = true;
      return;
    }
    const mine = session;
    const token = inboxToken;
    if (!token) return;
    inboxLoading = (async () => {
      try {
        const r = await fetch("/v1/inbox?limit=100", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
        const body = await r.json().catch(() => ({}));
        if (mine !== session) return;
        if (!r.ok) {
          logLine("error", "/v1/inbox: " + ((body.error && body.error.message) || "HTTP " + r.status));
          return;
        }
        viewer.inbox = body.requests.map((q) => ({
          seq: q.seq, scope: q.event.scope, request_id: String(q.event.data.request_id),
          prompt: String(q.event.data.prompt), expires_at: q.event.data.expires_at || null,
        }));
        renderInbox();
      } catch (e) {
        logLine("error", "/v1/inbox: " + String(e.message || e));
      }
    })();
    await inboxLoading;
    inboxLoading = null;
    if (inboxAgain && mine === session) {
      inboxAgain = false;
      loadInbox();
    }
  }

  function renderInbox() {
    if (expiryTimer) clearTimeout(expiryTimer);
    expiryTimer = null;
    const now = Date.now();
    viewer.inbox = viewer.inbox.filter((q) => !q.expires_at || Date.parse(q.expires_at) > now);
    const next = Math.min(...viewer.inbox.filter((q) => q.expires_at).map((q) => Date.parse(q.expires_at)));
    if (Number.isFinite(next)) expiryTimer = setTimeout(renderInbox, Math.max(0, next - now) + 50);
    const n = viewer.inbox.length;
    for (const id of ["inbox-count", "inbox-badge"]) {
      $(id).textContent = String(n);
      $(id).dataset.count = String(n);
    }
    $("inbox").replaceChildren(...viewer.inbox.map((q) => {
      const li = el("li", "inbox-item");
      li.dataset.request = q.request_id;
      li.append(el("span", "prompt", q.prompt), el("span", "where", q.scope + " \u00b7 " + q.request_id +
        (q.expires_at ? " \u00b7 until " + q.expires_at : "")));
      return li;
    }));
    $("inbox-hint").textContent = viewer.principal
      ? (n ? "Waiting for your answer (assigned to you, one of your groups, or everyone who may see the process)."
        : "Nothing waits for " + viewer.principal.id + ".")
      : "Pick a user first.";
  }

  // ----------------------------------------------------------------------------------------------
  // start
  // ----------------------------------------------------------------------------------------------

  function follow(scope) {
    if (!SCOPE_RE.test(scope)) {
      logLine("error", "not a scope: " + scope);
      return;
    }
    followed.push(scope);
    ensureScope(scope, "followed", "requested");
    if (client) client.subscribe(scope).catch(() => {}); // now, or on the next connection's URL
  }

  async function init() {
    $("drop").addEventListener("click", drop);
    $("follow-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("follow-scope");
      const scope = input.value.trim();
      if (scope) follow(scope);
      input.value = "";
    });
    let r = null;
    try {
      r = await fetch("/dev/demo", { cache: "no-store" });
    } catch (_) {
      r = null;
    }
    if (r && r.ok) {
      viewer.mode = "dev";
      demo = await r.json();
      $("users-box").hidden = false;
      $("demo-acl-box").hidden = false;
      const box = $("users");
      for (const u of demo.users) {
        const b = el("button", "user");
        b.type = "button";
        b.dataset.user = u.name;
        b.setAttribute("aria-pressed", "false");
        b.title = u.sees; // the line itself is hidden at phone width
        b.append(el("span", "name", u.name), el("span", "groups", u.groups.length ? u.groups.join(", ") : "no groups"),
          el("span", "sees", u.sees));
        b.addEventListener("click", () => {
          for (const other of box.children) other.setAttribute("aria-pressed", String(other === b));
          viewer.user = u.name;
          startSession(u.name, () => devToken(u));
        });
        box.append(b);
      }
      refreshDemo();
      $("empty").textContent = "Pick a demo user on the left to watch their live stream.";
    } else {
      viewer.mode = "token";
      $("token-box").hidden = false;
      $("token-form").addEventListener("submit", (e) => {
        e.preventDefault();
        const token = $("token").value.trim();
        if (token) startSession("with pasted token", async () => token);
      });
      $("empty").textContent = "Paste an access token on the left to watch your live stream.";
      $("scopes-hint").textContent = "Connect with a token first.";
    }
    setState("idle");
  }

  init();
})();
