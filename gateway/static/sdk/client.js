/**
 * `GatewayClient`: one ordered, de-duplicated stream of a user's events across reconnects.
 *
 * `seq` (the JetStream stream sequence) is one cursor across all scopes. The client remembers the
 * highest `seq` it handed out; after any disconnect it reconnects with the scopes and `since=<cursor>`
 * on the URL (the gateway replays what was missed as ONE ordered stream, then goes live) and drops
 * anything at or below the cursor, so the application sees every event once, in order
 * (docs/protocol.md#resume). Close codes 4400 and 4401 are final; everything else is retried with
 * capped, jittered exponential backoff. Over Server-Sent Events (`transport: "sse"`, or `"auto"` when
 * WebSockets are unavailable or refused) the same happens with `Last-Event-ID`.
 */
import { GatewayClosedError, GatewayInputError } from "./errors.js";
import { FINAL_CLOSE_CODES, SUBPROTOCOL } from "./generated/constants.js";
import { checkTokenProvider, resolveToken } from "./http.js";
import { SseParser } from "./sse.js";
import { AsyncQueue, Emitter } from "./stream.js";
import { checkInt, checkScope, checkScopes, checkSeq, gatewayUrls, isResourceScope } from "./validate.js";
/** Whether `event` is of the catalogue type `type` (narrows `event.data` to its model). */
export function isEventType(event, type) {
    return event.type === type;
}
const CLOSE_CLIENT = 1000;
const ABNORMAL = 1006;
async function defaultWebSocket() {
    const g = globalThis;
    if (typeof g.WebSocket === "function")
        return g.WebSocket;
    const name = "ws"; // Node 20 has no stable global WebSocket: the `ws` package, when installed
    try {
        const mod = (await import(/* @vite-ignore */ /* webpackIgnore: true */ name));
        return mod.WebSocket ?? mod.default ?? null;
    }
    catch {
        return null;
    }
}
export class GatewayClient extends Emitter {
    urls;
    tokenProvider;
    scopeList;
    transportOption;
    wsOption;
    fetchOption;
    initialMs;
    maxMs;
    refreshLeadS;
    openTimeoutMs;
    presenceOption;
    listedOption;
    compactOption;
    cursorValue;
    stateValue = "idle";
    link = null;
    transportValue = null;
    running = null;
    stopped = false;
    finalError = null;
    wake = null;
    nextDelayMs = null;
    refreshTimer = null;
    nextId = 1;
    pending = new Map();
    queues = new Set();
    welcomeWaiters = [];
    /** Connections made (every `welcome`). */
    connects = 0;
    /** Event frames dropped because their `seq` was at or below the cursor (a resume's overlap). */
    duplicates = 0;
    /** The last disconnect. */
    lastClose = null;
    /** The last `welcome`. */
    welcome = null;
    constructor(options) {
        super();
        if (options === null || typeof options !== "object") {
            throw new GatewayInputError("options", "must be an object with at least url and token");
        }
        this.urls = gatewayUrls(options.url);
        this.tokenProvider = checkTokenProvider(options.token);
        this.scopeList = checkScopes(options.scopes ?? ["*"]);
        this.cursorValue = options.since === undefined || options.since === null ? null : checkSeq(options.since);
        for (const flag of ["presence", "listed", "compact"]) {
            if (options[flag] !== undefined && typeof options[flag] !== "boolean") {
                throw new GatewayInputError(flag, `must be a boolean (got ${JSON.stringify(options[flag])})`);
            }
        }
        this.presenceOption = options.presence ?? false;
        this.listedOption = options.listed ?? true;
        this.compactOption = options.compact ?? false;
        const transport = options.transport ?? "auto";
        if (!["auto", "websocket", "sse"].includes(transport)) {
            throw new GatewayInputError("transport", `must be "auto", "websocket" or "sse" (got ${JSON.stringify(transport)})`);
        }
        this.transportOption = transport;
        if (options.WebSocket !== undefined && typeof options.WebSocket !== "function") {
            throw new GatewayInputError("WebSocket", "must be a WebSocket constructor");
        }
        this.wsOption = options.WebSocket;
        if (options.fetch !== undefined && typeof options.fetch !== "function") {
            throw new GatewayInputError("fetch", "must be a fetch function");
        }
        this.fetchOption = options.fetch;
        this.initialMs = checkInt(options.backoff?.initialMs ?? 250, "backoff.initialMs", 1, 600_000);
        this.maxMs = checkInt(options.backoff?.maxMs ?? 10_000, "backoff.maxMs", this.initialMs, 3_600_000);
        this.refreshLeadS = checkInt(options.refreshLeadS ?? 30, "refreshLeadS", 0, 86_400);
        this.openTimeoutMs = checkInt(options.openTimeoutMs ?? 15_000, "openTimeoutMs", 100, 600_000);
        const signal = options.signal;
        if (signal !== undefined) {
            if (typeof signal?.addEventListener !== "function")
                throw new GatewayInputError("signal", "must be an AbortSignal");
            if (signal.aborted)
                this.stopped = true;
            else
                signal.addEventListener("abort", () => this.close(), { once: true });
        }
    }
    /** The highest `seq` handed to the application (or the live start position): save it to resume later. */
    get cursor() {
        return this.cursorValue;
    }
    get state() {
        return this.stateValue;
    }
    /** The transport of the current (or last) connection. */
    get transport() {
        return this.transportValue;
    }
    /** The scopes followed (in order). */
    get scopes() {
        return [...this.scopeList];
    }
    /** Start connecting (idempotent); the stream runs until `close()`, an abort, or a final close. */
    start() {
        if (this.running === null && !this.stopped) {
            this.running = this.run();
        }
        return this;
    }
    /** Start, and wait for the first `welcome` (rejects with GatewayClosedError on a final close before). */
    connect() {
        if (this.finalError)
            return Promise.reject(this.finalError);
        if (this.stopped)
            return Promise.reject(new Error("the client is closed"));
        if (this.welcome && this.stateValue === "open")
            return Promise.resolve(this.welcome);
        const p = new Promise((resolve, reject) => this.welcomeWaiters.push({ resolve, reject }));
        this.start();
        return p;
    }
    /** Every server frame, events once each and in order, plus `gap` and `disconnected` notices, from the
     * moment it is called (so call it before awaiting anything else, or use `on()`). Ends after `close()`;
     * throws GatewayClosedError after a final close. Starts the client. */
    frames() {
        const q = new AsyncQueue(() => this.queues.delete(q));
        if (this.finalError)
            q.end(this.finalError);
        else if (this.stopped)
            q.end();
        else
            this.queues.add(q);
        this.start();
        return q;
    }
    /** Only the event frames (each once, in `seq` order). Like `frames()`, it sees what arrives from the
     * moment it is called (call it before awaiting anything else). */
    events() {
        const frames = this.frames(); // now, not at the first next(): nothing arriving meanwhile is missed
        const it = {
            async next() {
                for (;;) {
                    const r = await frames.next();
                    if (r.done)
                        return { value: undefined, done: true };
                    if (r.value.type === "event")
                        return { value: r.value, done: false };
                }
            },
            async return() {
                await frames.return?.();
                return { value: undefined, done: true };
            },
            [Symbol.asyncIterator]: () => it,
        };
        return it;
    }
    [Symbol.asyncIterator]() {
        return this.events();
    }
    /** Follow one more scope. On an open WebSocket, sends `subscribe` (from the client's cursor) and resolves
     * with the answer (`subscribed`, or `error`: `forbidden` keeps it pending); otherwise the scope goes on the
     * next connection's URL (SSE: reconnects now) and resolves with `null`. */
    subscribe(scope) {
        checkScope(scope);
        if (this.stopped)
            return Promise.reject(new Error("the client is closed"));
        if (!this.scopeList.includes(scope))
            this.scopeList.push(scope);
        const since = this.cursorValue;
        const resource = isResourceScope(scope); // presence is per resource scope (not `*`, not `inbox`)
        return this.request({
            op: "subscribe", scope, ...(since !== null ? { since } : {}),
            ...(resource && this.presenceOption ? { presence: true } : {}),
            ...(resource && !this.listedOption ? { listed: false } : {}),
            ...(since !== null && this.compactOption ? { compact: true } : {}),
        });
    }
    /** Stop following a scope (`unsubscribe`); resolves with the answer, or `null` when not connected. */
    unsubscribe(scope) {
        checkScope(scope);
        const i = this.scopeList.indexOf(scope);
        if (i !== -1)
            this.scopeList.splice(i, 1);
        return this.request({ op: "unsubscribe", scope });
    }
    /** An application-level round trip (`ping` -> `pong`); `null` when not connected over a WebSocket. */
    async ping() {
        const link = this.link;
        if (!link || link.transport !== "websocket" || this.stateValue !== "open")
            return null;
        const id = `sdk-${this.nextId++}`;
        const answer = new Promise((resolve) => this.pending.set(id, resolve));
        if (!link.send({ op: "ping", id }))
            return null;
        return (await answer);
    }
    /** Drop the connection as a network failure would; the client resumes from its cursor after
     * `reconnectInMs` (default: right away). */
    drop(options = {}) {
        const wait = options.reconnectInMs ?? 0;
        checkInt(wait, "reconnectInMs", 0, 3_600_000);
        this.nextDelayMs = wait;
        this.link?.close(CLOSE_CLIENT, "dropped by the client");
    }
    /** Stop for good: closes the connection, ends every iterator. */
    close() {
        if (this.stopped && this.stateValue === "closed")
            return;
        this.stopped = true;
        this.clearRefresh();
        this.link?.close(CLOSE_CLIENT, "client closed");
        this.wake?.();
        this.finish(null);
    }
    /** Resolves once the client has stopped: `null` after `close()`, the error after a final close. */
    async closed() {
        if (this.stateValue === "closed")
            return this.finalError;
        return new Promise((resolve) => {
            const off = this.on("closed", (e) => {
                off();
                resolve(e);
            });
        });
    }
    // --- internals ----------------------------------------------------------------------------------
    async request(frame) {
        const link = this.link;
        if (!link || this.stateValue !== "open")
            return null;
        if (link.transport === "sse") {
            // SSE cannot send frames: reconnect with the new scope list (from the cursor: nothing is lost)
            this.nextDelayMs = 0;
            link.close(CLOSE_CLIENT, "scopes changed");
            return null;
        }
        const id = `sdk-${this.nextId++}`;
        const answer = new Promise((resolve) => this.pending.set(id, resolve));
        if (!link.send({ ...frame, id })) {
            this.pending.delete(id);
            return null;
        }
        return answer;
    }
    setState(state) {
        if (this.stateValue === state)
            return;
        this.stateValue = state;
        this.emit("state", state);
    }
    publish(message) {
        for (const q of this.queues)
            q.push(message);
    }
    finish(error) {
        if (this.stateValue === "closed")
            return;
        this.finalError = error;
        this.stopped = true;
        this.clearRefresh();
        this.setState("closed");
        for (const q of this.queues)
            q.end(error);
        this.queues.clear();
        for (const w of this.welcomeWaiters.splice(0))
            w.reject(error ?? new Error("the client is closed"));
        for (const resolve of this.pending.values())
            resolve({ type: "error", code: "unavailable", message: "closed" });
        this.pending.clear();
        this.emit("closed", error);
    }
    connectUrl(base, withSince) {
        const url = new URL(base.href);
        if (this.scopeList.length)
            url.searchParams.set("scope", this.scopeList.join(","));
        if (withSince && this.cursorValue !== null)
            url.searchParams.set("since", String(this.cursorValue));
        if (this.presenceOption)
            url.searchParams.set("presence", "true");
        if (!this.listedOption)
            url.searchParams.set("listed", "false");
        if (this.compactOption)
            url.searchParams.set("compact", "true"); // applies to the resume replay only
        return url;
    }
    async run() {
        let delay = this.initialMs;
        let wsFailures = 0;
        let useSse = this.transportOption === "sse";
        const WS = useSse ? null : (this.wsOption ?? (await defaultWebSocket()));
        if (!useSse && WS === null) {
            if (this.transportOption === "websocket") {
                this.finish(null);
                throw new GatewayInputError("WebSocket", "no WebSocket available: pass one (npm ws in Node 20) or use transport \"sse\"");
            }
            useSse = true;
        }
        while (!this.stopped) {
            this.setState(this.connects === 0 && this.lastClose === null ? "connecting" : "reconnecting");
            let outcome;
            let opened = false;
            const transport = useSse ? "sse" : "websocket";
            this.transportValue = transport;
            try {
                const token = await resolveToken(this.tokenProvider);
                if (this.stopped)
                    break;
                const before = this.connects;
                outcome = useSse ? await this.runSse(token) : await this.runWebSocket(WS, token);
                opened = this.connects > before;
            }
            catch (e) {
                outcome = { code: ABNORMAL, reason: e instanceof Error ? e.message : String(e) };
            }
            this.link = null;
            this.clearRefresh();
            this.lastClose = outcome;
            for (const resolve of this.pending.values()) {
                resolve({ type: "error", code: "unavailable", message: `disconnected (${outcome.code})` });
            }
            this.pending.clear();
            if (this.stopped)
                break;
            const final = FINAL_CLOSE_CODES.includes(outcome.code);
            if (final) {
                const error = new GatewayClosedError(outcome.code, outcome.reason);
                const notice = { type: "disconnected", ...outcome, transport, final: true, retryInMs: null };
                this.emit("disconnected", notice);
                this.publish(notice);
                this.finish(error);
                return;
            }
            const wasSse = useSse;
            if (opened) {
                delay = this.initialMs;
                wsFailures = 0;
            }
            else if (!useSse && outcome.code === ABNORMAL) {
                wsFailures += 1;
                if (this.transportOption === "auto" && wsFailures >= 2)
                    useSse = true; // upgrades refused: try SSE
            }
            if (wasSse && this.transportOption === "auto" && WS !== null) {
                // "auto" falls back per reconnect: after an SSE session (or a failed SSE attempt) the WebSocket gets
                // one more chance, so a gateway restart does not leave the client on SSE for good; one refused
                // upgrade sends it back to SSE.
                useSse = false;
                wsFailures = 1;
            }
            let wait = Math.min(this.maxMs, Math.round(delay * (0.5 + Math.random())));
            delay = Math.min(delay * 2, this.maxMs);
            if (this.nextDelayMs !== null) {
                wait = this.nextDelayMs;
                this.nextDelayMs = null;
            }
            const notice = { type: "disconnected", ...outcome, transport, final: false, retryInMs: wait };
            this.emit("disconnected", notice);
            this.publish(notice);
            await this.sleep(wait);
        }
        this.finish(this.finalError);
    }
    sleep(ms) {
        return new Promise((resolve) => {
            const timer = setTimeout(done, ms);
            function done() {
                clearTimeout(timer);
                resolve();
            }
            this.wake = () => {
                this.wake = null;
                done();
            };
        });
    }
    runWebSocket(WS, token) {
        return new Promise((resolve) => {
            let settled = false;
            let sock;
            let openTimer;
            const end = (o) => {
                if (settled)
                    return;
                settled = true;
                clearTimeout(openTimer);
                resolve(o);
            };
            try {
                sock = new WS(this.connectUrl(this.urls.ws, true).href, [SUBPROTOCOL, `bearer.${token}`]);
            }
            catch (e) {
                end({ code: ABNORMAL, reason: e instanceof Error ? e.message : String(e) });
                return;
            }
            openTimer = setTimeout(() => {
                if (!this.welcomeSeen) {
                    try {
                        sock.close(CLOSE_CLIENT, "no welcome in time");
                    }
                    catch {
                        /* closing already */
                    }
                    end({ code: ABNORMAL, reason: `no welcome within ${this.openTimeoutMs} ms` });
                }
            }, this.openTimeoutMs);
            this.welcomeSeen = false;
            const link = {
                transport: "websocket",
                send: (frame) => {
                    if (sock.readyState !== 1)
                        return false;
                    sock.send(JSON.stringify(frame));
                    return true;
                },
                close: (code, reason) => {
                    try {
                        sock.close(code, reason);
                    }
                    catch {
                        /* already closing */
                    }
                },
            };
            this.link = link;
            sock.onmessage = (msg) => {
                if (settled || typeof msg.data !== "string")
                    return;
                let frame;
                try {
                    frame = JSON.parse(msg.data);
                }
                catch {
                    return;
                }
                this.onFrame(frame, link);
            };
            sock.onerror = () => {
                /* the close event follows */
            };
            sock.onclose = (e) => end({ code: e.code || ABNORMAL, reason: e.reason || "connection lost" });
        });
    }
    welcomeSeen = false;
    async runSse(token) {
        const f = this.fetchOption ?? globalThis.fetch;
        if (typeof f !== "function")
            throw new GatewayInputError("fetch", "no fetch available for SSE: pass one in the options");
        if (this.scopeList.length === 0) {
            // nothing to follow (SSE without a scope would mean `*`): wait until something is subscribed
            await new Promise((resolve) => {
                this.link = { transport: "sse", send: () => false, close: () => resolve() };
                this.setState("open");
            });
            return { code: CLOSE_CLIENT, reason: "scopes changed" };
        }
        const abort = new AbortController();
        let closeFrame = null;
        const link = { transport: "sse", send: () => false, close: () => abort.abort() };
        this.link = link;
        this.welcomeSeen = false;
        const headers = { Authorization: `Bearer ${token}`, Accept: "text/event-stream" };
        if (this.cursorValue !== null)
            headers["Last-Event-ID"] = String(this.cursorValue);
        const openTimer = setTimeout(() => {
            if (!this.welcomeSeen)
                abort.abort();
        }, this.openTimeoutMs);
        try {
            const r = await f.call(globalThis, this.connectUrl(this.urls.sse, false), { headers, signal: abort.signal, cache: "no-store" });
            if (r.status !== 200 || !r.body) {
                const body = (await r.json().catch(() => null));
                const reason = body?.error?.message ?? `HTTP ${r.status}`;
                clearTimeout(openTimer);
                // the HTTP answers of docs/protocol.md#server-sent-events-get-v1sse, as the WebSocket's close codes
                if (r.status === 401)
                    return { code: 4401, reason };
                if (r.status === 400)
                    return { code: 4400, reason };
                return { code: r.status === 503 ? 4429 : 1011, reason };
            }
            const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
            const parser = new SseParser();
            for (;;) {
                const { value, done } = await reader.read();
                if (done)
                    break;
                for (const m of parser.push(value)) {
                    let frame;
                    try {
                        frame = JSON.parse(m.data);
                    }
                    catch {
                        continue;
                    }
                    if (frame.type === "close")
                        closeFrame = { code: frame.code, reason: frame.reason };
                    this.onFrame(frame, link);
                }
            }
            return closeFrame ?? { code: ABNORMAL, reason: "stream ended" };
        }
        catch (e) {
            if (abort.signal.aborted)
                return closeFrame ?? { code: this.welcomeSeen ? CLOSE_CLIENT : ABNORMAL, reason: "aborted" };
            return { code: ABNORMAL, reason: e instanceof Error ? e.message : String(e) };
        }
        finally {
            clearTimeout(openTimer);
            abort.abort();
        }
    }
    onFrame(frame, link) {
        if (link !== this.link)
            return; // a frame of a connection being replaced
        switch (frame.type) {
            case "event": {
                if (this.cursorValue !== null && frame.seq <= this.cursorValue) {
                    this.duplicates += 1;
                    return;
                }
                this.cursorValue = frame.seq;
                break;
            }
            case "welcome":
                this.welcomeSeen = true;
                this.welcome = frame;
                this.connects += 1;
                this.setState("open");
                if (link.transport === "websocket")
                    this.scheduleRefresh(frame.expires_at);
                for (const w of this.welcomeWaiters.splice(0))
                    w.resolve(frame);
                break;
            case "subscribed":
                // live from here: a valid cursor even before the first event (nothing after seq is missed)
                if (this.cursorValue === null && frame.since === undefined)
                    this.cursorValue = frame.seq;
                break;
            case "refreshed":
                this.scheduleRefresh(frame.expires_at);
                break;
            default:
                break;
        }
        if ("id" in frame && frame.id !== undefined && frame.id !== null) {
            const resolve = this.pending.get(String(frame.id));
            if (resolve) {
                this.pending.delete(String(frame.id));
                resolve(frame);
            }
        }
        this.emit("frame", frame);
        this.emit(frame.type, frame);
        this.publish(frame);
        if (frame.type === "subscribed" && frame.recovered === false) {
            const gap = {
                type: "gap", scope: frame.scope, since: frame.since ?? 0, earliest: frame.earliest ?? 0, seq: frame.seq,
            };
            this.emit("gap", gap);
            this.publish(gap);
        }
    }
    clearRefresh() {
        if (this.refreshTimer !== null)
            clearTimeout(this.refreshTimer);
        this.refreshTimer = null;
    }
    /** Send `refresh` with a fresh token `refreshLeadS` (at most a third of the remaining life) before `expiresAt`. */
    scheduleRefresh(expiresAt) {
        this.clearRefresh();
        if (typeof this.tokenProvider !== "function" || this.refreshLeadS === 0)
            return; // 4408, then a reconnect
        const remainingS = expiresAt - Date.now() / 1000;
        const leadS = Math.min(this.refreshLeadS, remainingS / 3);
        const delayMs = Math.max(0, (remainingS - leadS) * 1000);
        if (remainingS < 1)
            return; // too late: the gateway closes with 4408 and the client reconnects
        this.refreshTimer = setTimeout(() => void this.refresh(), Math.min(delayMs, 2 ** 31 - 1));
    }
    async refresh() {
        this.refreshTimer = null;
        const link = this.link;
        if (!link || link.transport !== "websocket")
            return;
        let token;
        try {
            token = await resolveToken(this.tokenProvider);
        }
        catch {
            return; // no fresh token now: at expiry the gateway closes with 4408 and the reconnect asks again
        }
        if (link !== this.link)
            return;
        const id = `sdk-${this.nextId++}`;
        link.send({ op: "refresh", id, token });
    }
}
