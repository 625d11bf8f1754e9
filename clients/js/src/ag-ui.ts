/**
 * @wsgateway/client/ag-ui: the gateway's events as AG-UI 1.0 events, and an `@ag-ui/client` agent whose
 * `connect()` attaches to the runs of one scope (a conversation, process or agent) through the gateway.
 *
 * `AguiMapper` is the TypeScript twin of the gateway's `gateway/agui_map.py` (docs/events.md, AG-UI): both are
 * tested against the repository's `tests/agui_vectors.json`, so they cannot drift. It keeps a model of the
 * thread (messages, state, the active run, sub-agents, open steps, messages, reasoning and tool calls); `feed`
 * maps one envelope, `prelude` is what a consumer joining now needs first so that AG-UI's verifier accepts
 * the deltas that follow (RUN_STARTED, MESSAGES_SNAPSHOT, STATE_SNAPSHOT, the re-opening of what is open).
 *
 * `GatewayAgent.connect()` folds the scope's retained events (`GET /v1/history`), emits the prelude, then
 * follows the scope live with `GatewayClient` from the last event folded: permission-filtered by the
 * gateway, resumed with `since` after every disconnect, each event once and in order, so the AG-UI stream
 * it returns stays one valid stream across reconnects. A gap the gateway could not fill (retention) is
 * resynchronised in the same stream: RUN_ERROR (code `wsgateway.gap`) for the run the consumer had open, then
 * the prelude of the thread rebuilt from what the stream still holds.
 */
import { AbstractAgent } from "@ag-ui/client";
import type { AgentConfig, BaseEvent, RunAgentInput } from "@ag-ui/client";
import { Observable } from "rxjs";

import { GatewayClient } from "./client.js";
import type { GapNotice, GatewayClientOptions } from "./client.js";
import { history } from "./http.js";
import type { TokenProvider } from "./http.js";
import { checkResourceScope } from "./validate.js";

type Json = any;
type Data = Record<string, Json>;
/** An AG-UI event as a plain object (the shapes of `@ag-ui/core` 1.0). */
export type AgEvent = Record<string, Json> & { type: string };
/** The envelope fields the mapping reads (docs/events.md, Envelope). */
export interface EnvelopeLike {
  type?: unknown;
  run_id?: unknown;
  data?: unknown;
}

export const MAX_MESSAGES = 1000;
const MAX_FINISHED = 1024;
const TEXT_ROLES = ["developer", "system", "assistant", "user"];

export class PatchError extends Error {}

const clone = <T>(v: T): T => (v === undefined ? v : (JSON.parse(JSON.stringify(v)) as T));
const isStr = (v: unknown): v is string => typeof v === "string";
const isObj = (v: unknown): v is Data => typeof v === "object" && v !== null && !Array.isArray(v);

function pointer(path: string): string[] {
  if (path === "") return [];
  if (!path.startsWith("/")) throw new PatchError(`bad JSON pointer ${JSON.stringify(path)}`);
  return path.slice(1).split("/").map((p) => p.replace(/~1/g, "/").replace(/~0/g, "~"));
}
const isIndex = (k: string): boolean => /^[0-9]+$/.test(k);

function parentOf(doc: Json, parts: string[]): [Json, string] {
  let cur = doc;
  for (const p of parts.slice(0, -1)) {
    if (Array.isArray(cur)) {
      if (!isIndex(p) || Number(p) >= cur.length) throw new PatchError(`no element ${p}`);
      cur = cur[Number(p)];
    } else if (isObj(cur)) {
      if (!(p in cur)) throw new PatchError(`no member ${p}`);
      cur = cur[p];
    } else throw new PatchError(`cannot descend into ${p}`);
  }
  return [cur, parts[parts.length - 1] as string];
}

function get(doc: Json, path: string): Json {
  const parts = pointer(path);
  if (parts.length === 0) return doc;
  const [parent, key] = parentOf(doc, parts);
  if (Array.isArray(parent)) {
    if (!isIndex(key) || Number(key) >= parent.length) throw new PatchError(`no element ${key}`);
    return parent[Number(key)];
  }
  if (!isObj(parent) || !(key in parent)) throw new PatchError(`no member ${key}`);
  return parent[key];
}

function remove(doc: Json, path: string): Json {
  const parts = pointer(path);
  if (parts.length === 0) throw new PatchError("cannot remove the whole document");
  const [parent, key] = parentOf(doc, parts);
  if (Array.isArray(parent)) {
    if (!isIndex(key) || Number(key) >= parent.length) throw new PatchError(`no element ${key}`);
    return parent.splice(Number(key), 1)[0];
  }
  if (!isObj(parent) || !(key in parent)) throw new PatchError(`no member ${key}`);
  const v = parent[key];
  delete parent[key];
  return v;
}

function add(doc: Json, path: string, value: Json): Json {
  const parts = pointer(path);
  if (parts.length === 0) return value;
  const [parent, key] = parentOf(doc, parts);
  if (Array.isArray(parent)) {
    if (key === "-") parent.push(value);
    else if (isIndex(key) && Number(key) <= parent.length) parent.splice(Number(key), 0, value);
    else throw new PatchError(`bad index ${key}`);
  } else if (isObj(parent)) parent[key] = value;
  else throw new PatchError(`cannot add to ${key}`);
  return doc;
}

/** RFC 6902 on a copy of `doc` (all or nothing). */
export function applyPatch(doc: Json, patch: Data[]): Json {
  let d = clone(doc);
  for (const op of patch) {
    const path = String(op.path ?? "");
    switch (op.op) {
      case "add": d = add(d, path, clone(op.value)); break;
      case "remove": remove(d, path); break;
      case "replace":
        get(d, path);
        if (pointer(path).length) remove(d, path);
        d = add(d, path, clone(op.value));
        break;
      case "move": d = add(d, path, remove(d, String(op.from ?? ""))); break;
      case "copy": d = add(d, path, clone(get(d, String(op.from ?? "")))); break;
      case "test":
        if (JSON.stringify(get(d, path)) !== JSON.stringify(op.value)) throw new PatchError(`test failed at ${path}`);
        break;
      default: throw new PatchError(`unknown op ${String(op.op)}`);
    }
  }
  return d;
}

function text(content: Json): string {
  if (isStr(content)) return content;
  if (Array.isArray(content)) {
    return content.filter((p) => isObj(p) && p.type === "text").map((p) => String(p.text ?? "")).join("");
  }
  return "";
}

function userContent(content: Json): Json {
  if (Array.isArray(content)) {
    return content.filter((p) => isObj(p) && p.type === "text").map((p) => ({ type: "text", text: String(p.text ?? "") }));
  }
  return text(content);
}

/** Python's json.dumps(v, separators=(",", ":"), ensure_ascii=False, sort_keys=True). */
function canonical(v: Json): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  if (isObj(v)) return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`;
  if (typeof v === "number" && Number.isInteger(v)) return String(v);
  return JSON.stringify(v);
}

function resultText(result: Json): string {
  if (result === undefined || result === null) return "";
  return isStr(result) ? result : canonical(result);
}

function message(id: string, role: string, content: Json, sub: string | null): Data | null {
  if (!TEXT_ROLES.includes(role)) return null;
  const msg: Data = { id, role, content: role === "user" ? userContent(content) : text(content) };
  if (sub !== null) msg.subagentRunId = sub;
  return msg;
}

/** Gateway envelopes in, AG-UI events out, for one thread (scope). Same algorithm as gateway/agui_map.py. */
export class AguiMapper {
  main: string | null = null;
  mainParent: string | null = null;
  subs = new Map<string, { name: string; parent: string | null }>();
  finished = new Map<string, true>();
  steps = new Map<string, { run: string; name: string }>(); // key: JSON [run, step_id]
  texts = new Map<string, string>();
  reasoning = new Map<string, string>();
  tools = new Map<string, string>();
  messages: Data[] = [];
  state: Json = null;
  pending = true;

  constructor(readonly thread: string) {}

  private find(id: string): Data | undefined {
    return this.messages.find((m) => m.id === id);
  }

  private put(msg: Data): void {
    const old = this.find(msg.id as string);
    if (old) {
      for (const k of Object.keys(old)) delete old[k];
      Object.assign(old, msg);
      return;
    }
    this.messages.push(msg);
    if (this.messages.length > MAX_MESSAGES) this.messages.shift();
  }

  private toolOwner(id: string): Data | undefined {
    return this.messages.find((m) => m.role === "assistant" && (m.toolCalls ?? []).some((tc: Data) => tc.id === id));
  }

  private toolCall(id: string): Data | undefined {
    return (this.toolOwner(id)?.toolCalls as Data[] | undefined)?.find((tc) => tc.id === id);
  }

  private snapshots(): AgEvent[] {
    const out: AgEvent[] = [];
    if (this.messages.length) out.push({ type: "MESSAGES_SNAPSHOT", messages: clone(this.messages) });
    if (this.state !== null && this.state !== undefined) out.push({ type: "STATE_SNAPSHOT", snapshot: clone(this.state) });
    return out;
  }

  private tag(run: string): Data {
    return run === this.main ? {} : { subagentRunId: run };
  }

  private runStarted(): AgEvent {
    const ev: AgEvent = { type: "RUN_STARTED", threadId: this.thread, runId: this.main };
    if (this.mainParent !== null) ev.parentRunId = this.mainParent;
    return ev;
  }

  private subStarted(run: string): AgEvent {
    const info = this.subs.get(run)!;
    const ev: AgEvent = { type: "SUBAGENT_STARTED", subagentRunId: run, name: info.name };
    if (info.parent !== null) ev.parentSubagentRunId = info.parent;
    return ev;
  }

  private start(run: string, data: Data): AgEvent[] {
    if (run === this.main || this.subs.has(run)) return [];
    if (this.main === null) {
      this.main = run;
      this.mainParent = isStr(data.parent_run_id) ? data.parent_run_id : null;
      const out = [this.runStarted()];
      if (this.pending) {
        out.push(...this.snapshots());
        this.pending = false;
      }
      return out;
    }
    const parent = data.parent_run_id;
    this.subs.set(run, {
      name: isStr(data.agent_id) ? data.agent_id : run,
      parent: isStr(parent) && this.subs.has(parent) ? parent : null,
    });
    return [this.subStarted(run)];
  }

  private closeOwned(run: string): AgEvent[] {
    const out: AgEvent[] = [];
    const tag = this.tag(run);
    for (const [id, r] of [...this.texts]) {
      if (r !== run) continue;
      this.texts.delete(id);
      out.push({ type: "TEXT_MESSAGE_END", messageId: id, ...tag });
    }
    for (const [id, r] of [...this.tools]) {
      if (r !== run) continue;
      this.tools.delete(id);
      out.push({ type: "TOOL_CALL_END", toolCallId: id, ...tag });
    }
    for (const [id, r] of [...this.reasoning]) {
      if (r !== run) continue;
      this.reasoning.delete(id);
      out.push({ type: "REASONING_MESSAGE_END", messageId: id, ...tag }, { type: "REASONING_END", messageId: id, ...tag });
    }
    for (const [key, step] of [...this.steps]) {
      if (step.run !== run) continue;
      this.steps.delete(key);
      out.push({ type: "STEP_FINISHED", stepName: step.name, ...tag });
    }
    return out;
  }

  private done(run: string): void {
    this.finished.set(run, true);
    if (this.finished.size > MAX_FINISHED) this.finished.delete(this.finished.keys().next().value as string);
  }

  private finish(run: string, data: Data): AgEvent[] {
    const outcome = data.outcome;
    const out = this.closeOwned(run);
    if (run !== this.main) {
      this.subs.delete(run);
      this.done(run);
      if (outcome === "success" || outcome === "interrupted") {
        const ev: AgEvent = {
          type: "SUBAGENT_FINISHED", subagentRunId: run,
          outcome: { type: outcome === "success" ? "success" : "suspended" },
        };
        if ("result" in data && outcome === "success") ev.result = data.result;
        return [...out, ev];
      }
      const msg = outcome === "error" ? data.error : "cancelled";
      return [...out, {
        type: "SUBAGENT_ERROR", subagentRunId: run, message: isStr(msg) && msg ? msg : "run failed", code: String(outcome),
      }];
    }
    for (const sub of [...this.subs.keys()]) {
      out.push(...this.closeOwned(sub));
      out.push({ type: "SUBAGENT_ERROR", subagentRunId: sub, message: "the parent run ended first", code: "parent_finished" });
      this.done(sub);
    }
    this.subs.clear();
    this.main = null;
    this.done(run);
    if (outcome === "error") {
      const err = data.error;
      return [...out, { type: "RUN_ERROR", message: isStr(err) && err ? err : "run failed", code: "error" }];
    }
    const fin: AgEvent = { type: "RUN_FINISHED", threadId: this.thread, runId: run };
    if (outcome === "cancelled") fin.outcome = { type: "cancelled" };
    else if (outcome === "interrupted") {
      fin.outcome = { type: "interrupt", interrupts: [{ id: `${run}.interrupt`, reason: "input_required" }] };
    } else {
      fin.outcome = { type: "success" };
      if ("result" in data) fin.result = data.result;
    }
    const usage = data.usage;
    if (isObj(usage)) {
      const u: Data = {};
      for (const [snake, camel] of [["input_tokens", "inputTokens"], ["output_tokens", "outputTokens"],
        ["total_tokens", "totalTokens"]] as const) {
        if (snake in usage) u[camel] = usage[snake];
      }
      if (Object.keys(u).length) fin.usage = [u];
    }
    return [...out, fin];
  }

  /** The AG-UI events one gateway event stands for (possibly none). */
  feed(env: EnvelopeLike): AgEvent[] {
    const etype = env.type;
    const data: Data = isObj(env.data) ? env.data : {};
    if (!isStr(etype)) return [];
    if (etype.startsWith("run.")) {
      const run = env.run_id;
      if (!isStr(run) || this.finished.has(run)) return [];
      if (etype === "run.started") return this.start(run, data);
      const out: AgEvent[] = [];
      if (run !== this.main && !this.subs.has(run)) out.push(...this.start(run, {}));
      if (etype === "run.finished") return [...out, ...this.finish(run, data)];
      return [...out, ...this.runEvent(run, etype, data)];
    }
    if (etype.startsWith("conversation.message.")) {
      if (!this.conversation(etype, data)) return [];
      if (this.main === null) {
        this.pending = true;
        return [];
      }
      return [{ type: "MESSAGES_SNAPSHOT", messages: clone(this.messages) }];
    }
    if (this.main === null) return [];
    return [{ type: "CUSTOM", name: etype, value: clone(data) }];
  }

  private conversation(etype: string, data: Data): boolean {
    const id = data.message_id;
    if (!isStr(id)) return false;
    if (etype === "conversation.message.created") {
      const msg = message(id, String(data.role), data.content, null);
      if (msg === null) return false;
      this.put(msg);
      return true;
    }
    const old = this.find(id);
    if (!old) return false;
    if (etype === "conversation.message.updated") {
      old.content = old.role === "user" ? userContent(data.content) : text(data.content);
      return true;
    }
    if (etype === "conversation.message.deleted") {
      this.messages.splice(this.messages.indexOf(old), 1);
      return true;
    }
    return false;
  }

  private runEvent(run: string, etype: string, data: Data): AgEvent[] {
    const tag = this.tag(run);
    if (etype === "run.message.started" || etype === "run.message.delta" || etype === "run.message.finished") {
      return this.textEvent(run, etype, data, tag);
    }
    if (etype === "run.reasoning.started" || etype === "run.reasoning.delta" || etype === "run.reasoning.finished") {
      return this.reasoningEvent(run, etype, data, tag);
    }
    if (etype.startsWith("run.tool_call.")) return this.toolEvent(run, etype, data, tag);
    if (etype === "run.step.started" || etype === "run.step.finished") {
      const sid = data.step_id;
      const name = data.name;
      if (!isStr(sid) || !isStr(name)) return [];
      const key = JSON.stringify([run, sid]);
      if (etype === "run.step.started") {
        if (this.steps.has(key) || [...this.steps.values()].some((s) => s.run === run && s.name === name)) return [];
        this.steps.set(key, { run, name });
        return [{ type: "STEP_STARTED", stepName: name, ...tag }];
      }
      const step = this.steps.get(key);
      if (!step) return [];
      this.steps.delete(key);
      return [{ type: "STEP_FINISHED", stepName: step.name, ...tag }];
    }
    if (etype === "run.state.snapshot") {
      this.state = clone(data.state);
      return [{ type: "STATE_SNAPSHOT", snapshot: clone(data.state), ...tag }];
    }
    if (etype === "run.state.delta") {
      const patch = data.patch;
      if (!Array.isArray(patch)) return [];
      try {
        this.state = applyPatch(this.state ?? {}, patch as Data[]);
      } catch (e) {
        if (!(e instanceof PatchError)) throw e;
      }
      return [{ type: "STATE_DELTA", delta: clone(patch), ...tag }];
    }
    if (etype === "run.messages.snapshot") {
      const msgs = data.messages;
      if (!Array.isArray(msgs)) return [];
      const sub = run === this.main ? null : run;
      const snap = new Map<string, Data>();
      for (const m of msgs) {
        if (!isObj(m) || !isStr(m.message_id)) continue;
        const msg = message(m.message_id, String(m.role), m.content, sub);
        if (msg !== null) snap.set(msg.id as string, msg);
      }
      const keepReasoning = ![...snap.values()].some((m) => m.role === "reasoning");
      const merged = this.messages
        .filter((m) => snap.has(m.id as string) || (keepReasoning && m.role === "reasoning"))
        .map((m) => snap.get(m.id as string) ?? m);
      const have = new Set(merged.map((m) => m.id));
      this.messages = [...merged, ...[...snap.values()].filter((m) => !have.has(m.id))].slice(-MAX_MESSAGES);
      return [{ type: "MESSAGES_SNAPSHOT", messages: clone(this.messages) }];
    }
    return [{ type: "CUSTOM", name: etype, value: clone(data), ...tag }];
  }

  private textEvent(run: string, etype: string, data: Data, tag: Data): AgEvent[] {
    const id = data.message_id;
    if (!isStr(id)) return [];
    const out: AgEvent[] = [];
    if (!this.texts.has(id)) {
      if (etype === "run.message.started" || this.find(id) === undefined || etype === "run.message.delta") {
        const role = data.role ?? "assistant";
        out.push(this.openText(run, id, TEXT_ROLES.includes(role) ? role : "assistant", tag));
      } else return [];
    }
    const msg = this.find(id);
    if (etype === "run.message.started") return out;
    if (etype === "run.message.delta") {
      const delta = String(data.delta ?? "");
      if (msg) msg.content = String(msg.content || "") + delta;
      return [...out, { type: "TEXT_MESSAGE_CONTENT", messageId: id, delta, ...tag }];
    }
    const full = data.content;
    if (msg && isStr(full)) {
      const have = String(msg.content || "");
      if (full.startsWith(have) && full.length > have.length) {
        out.push({ type: "TEXT_MESSAGE_CONTENT", messageId: id, delta: full.slice(have.length), ...tag });
      }
      msg.content = full;
    }
    this.texts.delete(id);
    return [...out, { type: "TEXT_MESSAGE_END", messageId: id, ...tag }];
  }

  private openText(run: string, id: string, role: string, tag: Data): AgEvent {
    this.texts.set(id, run);
    if (this.find(id) === undefined) {
      const msg: Data = { id, role, content: "" };
      if (Object.keys(tag).length) msg.subagentRunId = run;
      this.put(msg);
    }
    return { type: "TEXT_MESSAGE_START", messageId: id, role, ...tag };
  }

  private reasoningEvent(run: string, etype: string, data: Data, tag: Data): AgEvent[] {
    const id = data.message_id;
    if (!isStr(id)) return [];
    const out: AgEvent[] = [];
    if (!this.reasoning.has(id)) {
      if (etype === "run.reasoning.finished" && this.find(id) !== undefined) return [];
      this.reasoning.set(id, run);
      if (this.find(id) === undefined) {
        const msg: Data = { id, role: "reasoning", content: "" };
        if (Object.keys(tag).length) msg.subagentRunId = run;
        this.put(msg);
      }
      out.push({ type: "REASONING_START", messageId: id, ...tag },
        { type: "REASONING_MESSAGE_START", messageId: id, role: "reasoning", ...tag });
    }
    const msg = this.find(id);
    if (etype === "run.reasoning.started") return out;
    if (etype === "run.reasoning.delta") {
      const delta = String(data.delta ?? "");
      if (msg) msg.content = String(msg.content || "") + delta;
      return [...out, { type: "REASONING_MESSAGE_CONTENT", messageId: id, delta, ...tag }];
    }
    const full = data.content;
    if (msg && isStr(full)) {
      const have = String(msg.content || "");
      if (full.startsWith(have) && full.length > have.length) {
        out.push({ type: "REASONING_MESSAGE_CONTENT", messageId: id, delta: full.slice(have.length), ...tag });
      }
      msg.content = full;
    }
    this.reasoning.delete(id);
    return [...out, { type: "REASONING_MESSAGE_END", messageId: id, ...tag }, { type: "REASONING_END", messageId: id, ...tag }];
  }

  private toolEvent(run: string, etype: string, data: Data, tag: Data): AgEvent[] {
    const id = data.tool_call_id;
    if (!isStr(id)) return [];
    const call = this.toolCall(id);
    if (etype === "run.tool_call.started") {
      const name = data.name;
      if (call !== undefined || !isStr(name)) return [];
      const parent = data.message_id;
      let owner = isStr(parent) ? this.find(parent) : undefined;
      if (owner === undefined || owner.role !== "assistant") {
        owner = { id: owner !== undefined || !isStr(parent) ? id : parent, role: "assistant", toolCalls: [] };
        if (Object.keys(tag).length) owner.subagentRunId = run;
        this.put(owner);
      }
      (owner.toolCalls ??= []).push({ id, type: "function", function: { name, arguments: "" } });
      this.tools.set(id, run);
      const ev: AgEvent = { type: "TOOL_CALL_START", toolCallId: id, toolCallName: name, ...tag };
      if (isStr(parent)) ev.parentMessageId = parent;
      return [ev];
    }
    if (call === undefined) return [];
    if (etype === "run.tool_call.args.delta" || etype === "run.tool_call.args.finished") {
      if (!this.tools.has(id)) return [];
      const fn = call.function as Data;
      if (etype === "run.tool_call.args.delta") {
        const delta = String(data.delta ?? "");
        fn.arguments += delta;
        return [{ type: "TOOL_CALL_ARGS", toolCallId: id, delta, ...tag }];
      }
      const out: AgEvent[] = [];
      const full = data.arguments;
      if (isStr(full)) {
        if (full.startsWith(fn.arguments) && full.length > fn.arguments.length) {
          out.push({ type: "TOOL_CALL_ARGS", toolCallId: id, delta: full.slice(fn.arguments.length), ...tag });
        }
        fn.arguments = full;
      }
      this.tools.delete(id);
      return [...out, { type: "TOOL_CALL_END", toolCallId: id, ...tag }];
    }
    if (etype !== "run.tool_call.finished" && etype !== "run.tool_call.error") {
      return [{ type: "CUSTOM", name: etype, value: clone(data), ...tag }];
    }
    const rid = `${id}.result`;
    if (this.find(rid) !== undefined) return [];
    const out: AgEvent[] = [];
    if (this.tools.has(id)) {
      this.tools.delete(id);
      out.push({ type: "TOOL_CALL_END", toolCallId: id, ...tag });
    }
    const failed = etype === "run.tool_call.error";
    const content = failed ? String(data.error ?? "") : resultText(data.result);
    const result: AgEvent = { type: "TOOL_CALL_RESULT", messageId: rid, toolCallId: id, content, role: "tool", ...tag };
    const toolMsg: Data = { id: rid, role: "tool", toolCallId: id, content };
    if (failed) {
      result.metadata = { wsgateway: { error: true } };
      toolMsg.error = content;
    }
    if (Object.keys(tag).length) toolMsg.subagentRunId = run;
    const owner = this.toolOwner(id);
    let at = this.messages.length;
    if (owner !== undefined) {
      at = this.messages.indexOf(owner) + 1;
      while (at < this.messages.length && this.messages[at]?.role === "tool") at++;
    }
    this.messages.splice(at, 0, toolMsg);
    return [...out, result];
  }

  /** What a consumer joining now gets first (nothing when no run is active: the next RUN_STARTED brings the
   * snapshots). */
  prelude(): AgEvent[] {
    if (this.main === null) {
      this.pending = true;
      return [];
    }
    const out: AgEvent[] = [this.runStarted()];
    for (const sub of this.subs.keys()) out.push(this.subStarted(sub));
    out.push(...this.snapshots());
    this.pending = false;
    for (const step of this.steps.values()) out.push({ type: "STEP_STARTED", stepName: step.name, ...this.tag(step.run) });
    for (const [id, run] of this.texts) {
      const msg = this.find(id);
      const role = msg && TEXT_ROLES.includes(msg.role) ? msg.role : "assistant";
      out.push({ type: "TEXT_MESSAGE_START", messageId: id, role, ...this.tag(run) });
    }
    for (const [id, run] of this.reasoning) {
      out.push({ type: "REASONING_START", messageId: id, ...this.tag(run) },
        { type: "REASONING_MESSAGE_START", messageId: id, role: "reasoning", ...this.tag(run) });
    }
    for (const [id, run] of this.tools) {
      const call = this.toolCall(id);
      const owner = this.toolOwner(id);
      if (call === undefined || owner === undefined) continue;
      const ev: AgEvent = { type: "TOOL_CALL_START", toolCallId: id, toolCallName: (call.function as Data).name, ...this.tag(run) };
      if (owner.id !== id) ev.parentMessageId = owner.id;
      out.push(ev);
    }
    return out;
  }
}

export interface GatewayAgentOptions extends AgentConfig {
  /** The gateway: `ws(s)://host/v1/ws` or its base `http(s)://host`. */
  url: string | URL;
  token: TokenProvider;
  /** The thread: one `<conversation|process|agent>:<id>` (`threadId` is set to it). */
  scope: string;
  /** Passed to the GatewayClient (e.g. `WebSocket` from the `ws` package in Node before 22, `backoff`). */
  client?: Partial<Omit<GatewayClientOptions, "url" | "token" | "scopes" | "since">>;
  fetch?: typeof fetch;
  /** Page size of the history read on attach and after a gap (default 1000, the gateway's default
   * WSGATEWAY_HISTORY_MAX_LIMIT; lower it for a gateway configured lower). */
  historyPageSize?: number;
  /** Called when the gateway could not fill a gap (retention): events were lost; the agent rebuilds the thread
   * from what the stream still holds and goes on (RUN_ERROR code `wsgateway.gap`, then a new prelude). */
  onGap?: (gap: GapNotice) => void;
}

/**
 * An AG-UI agent attached to one scope's runs through the gateway. `connectAgent()` (AG-UI's attach) streams
 * until `detachActiveRun()`; `run()` is not offered: the gateway is read-only.
 */
export class GatewayAgent extends AbstractAgent {
  readonly scope: string;
  /** The GatewayClient of the current attachment (for `drop()` in tests, state, metrics). */
  client: GatewayClient | null = null;
  private readonly opts: GatewayAgentOptions;

  constructor(options: GatewayAgentOptions) {
    const scope = checkResourceScope(options.scope);
    super({ ...options, threadId: scope });
    this.scope = scope;
    this.opts = options;
  }

  /** AbstractAgent's clone copies only its own fields: the clone needs the scope and options too. */
  override clone(): GatewayAgent {
    const copy = super.clone() as GatewayAgent;
    (copy as { scope: string }).scope = this.scope;
    (copy as unknown as { opts: GatewayAgentOptions }).opts = this.opts;
    copy.client = null;
    return copy;
  }

  override run(_input: RunAgentInput): Observable<BaseEvent> {
    throw new Error("GatewayAgent only attaches (connectAgent): the gateway does not start runs");
  }

  override connect(_input: RunAgentInput): Observable<BaseEvent> {
    return new Observable<BaseEvent>((sub) => {
      const stop = new AbortController();
      let mapper = new AguiMapper(this.scope);
      let client: GatewayClient | null = null;
      let held: EnvelopeLike[] | null = null; // events that arrive while a gap is being resynchronised
      let heldUpto = 0; // ... and the last sequence the resynchronising fold covers
      const fail = (err: unknown): void => {
        if (!stop.signal.aborted) sub.error(err);
      };
      const emit = (events: AgEvent[]): void => {
        for (const ev of events) sub.next(ev as unknown as BaseEvent);
      };
      const fold = async (into: AguiMapper, upto: number | null): Promise<number> => {
        let last = 0;
        for await (const page of history({
          url: this.opts.url, token: this.opts.token, scope: this.scope, fetch: this.opts.fetch, signal: stop.signal,
          limit: this.opts.historyPageSize ?? 1000,
        })) {
          for (const item of page.events) {
            if (upto !== null && item.seq > upto) return last;
            into.feed(item.event as EnvelopeLike);
            last = item.seq;
          }
          last = Math.max(last, page.next_after);
        }
        return last;
      };
      // A gap the gateway could not fill (retention): the thread model is stale. Rebuild it from what the
      // stream still holds, up to where the subscription went live, and start over inside the same AG-UI
      // stream: RUN_ERROR (code wsgateway.gap) ends the run the consumer had open, the new prelude follows.
      const resync = async (gap: GapNotice): Promise<void> => {
        const fresh = new AguiMapper(this.scope);
        await fold(fresh, gap.seq);
        if (stop.signal.aborted) return;
        const out: AgEvent[] = [];
        if (mapper.main !== null) {
          out.push({ type: "RUN_ERROR", message: "events were lost (stream retention): resynchronised", code: "wsgateway.gap" });
        }
        out.push(...fresh.prelude());
        mapper = fresh;
        emit(out);
        const later = held ?? [];
        held = null;
        for (const env of later) emit(mapper.feed(env));
      };
      (async () => {
        const upto = await fold(mapper, null);
        if (stop.signal.aborted) return;
        emit(mapper.prelude());
        client = new GatewayClient({
          ...this.opts.client, url: this.opts.url, token: this.opts.token, scopes: [this.scope], since: upto,
          signal: stop.signal,
        });
        this.client = client;
        client.on("event", (frame) => {
          if (held !== null) {
            if (frame.seq > heldUpto) held.push(frame.event as EnvelopeLike); // the fold covers the others
            return;
          }
          try {
            emit(mapper.feed(frame.event as EnvelopeLike));
          } catch (err) {
            fail(err);
          }
        });
        client.on("gap", (gap) => {
          this.opts.onGap?.(gap);
          held = held ?? [];
          heldUpto = gap.seq;
          resync(gap).catch(fail);
        });
        client.on("closed", (err) => {
          if (err) sub.error(err);
          else sub.complete();
        });
        client.start();
      })().catch(fail);
      return () => {
        stop.abort();
        client?.close();
      };
    });
  }
}
