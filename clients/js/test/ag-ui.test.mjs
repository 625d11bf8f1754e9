// @wsgateway/client/ag-ui: the TypeScript mapping against the shared vectors (tests/agui_vectors.json), every
// vector's output through @ag-ui/client's own pipeline (enforce, verify, defaultApplyEvents: AbstractAgent's
// connectAgent), and GatewayAgent on a real gateway (started by tests/test_agui_js.py): a join in the middle of
// a message and a drop in the middle of it, verified and applied by that same pipeline.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import test from 'node:test';

import { AbstractAgent, runHttpRequest, transformHttpEventStream } from '@ag-ui/client';
import { connect as natsConnect, headers as natsHeaders } from 'nats';
import { Observable, from } from 'rxjs';
import WebSocket from 'ws';

import { AguiMapper, GatewayAgent } from '../dist/ag-ui.js';

const VECTORS = JSON.parse(readFileSync(new URL('../../../tests/agui_vectors.json', import.meta.url), 'utf8'));
const HANG_MS = 30_000; // a hang guard, not a speed threshold

class Replay extends AbstractAgent {
  constructor(events, threadId) {
    super({ threadId });
    this.events = events;
  }
  run() { throw new Error('replay only connects'); }
  connect() { return from(this.events); }
}

for (const c of VECTORS.cases) {
  test(`vector: ${c.name}`, async () => {
    const m = new AguiMapper(c.thread);
    for (const ev of c.fold) m.feed(ev);
    const out = c.fold.length ? [m.prelude()] : [];
    for (const ev of c.events) out.push(m.feed(ev));
    assert.deepStrictEqual(out, c.out);
    assert.deepStrictEqual(m.messages, c.messages);
    assert.deepStrictEqual(m.state, c.state);
    // AG-UI's own verifier and state-applying pipeline accept the output and reach the same thread
    const agent = new Replay(out.flat(), c.thread);
    await agent.connectAgent();
    assert.deepStrictEqual(agent.messages, c.messages);
    assert.deepStrictEqual(agent.state, c.state ?? {});
  });
}

test('an out-of-order sequence is what the verifier refuses (the check above is not vacuous)', async () => {
  const agent = new Replay([
    { type: 'RUN_STARTED', threadId: 't', runId: 'r' },
    { type: 'TEXT_MESSAGE_CONTENT', messageId: 'm', delta: 'x' },
  ], 't');
  await assert.rejects(agent.connectAgent(), /No active text message/);
});

// --- a real gateway -----------------------------------------------------------------------------------

const env = (name) => {
  const v = process.env[name];
  assert.ok(v, `${name}: run through tests/test_agui_js.py`);
  return v;
};

async function publisher() {
  const nc = await natsConnect({ servers: env('NATS_URL') });
  const js = nc.jetstream();
  const send = async (scope, type, runId, data) => {
    const [kind, rid] = scope.split(':');
    const id = randomUUID().replaceAll('-', '');
    const env = { id, type, tenant: 'acme', scope, time: new Date().toISOString(), run_id: runId, data };
    const h = natsHeaders();
    h.set('Nats-Msg-Id', id);
    return (await js.publish(`events.acme.${kind}.${rid}`, JSON.stringify(env), { headers: h })).seq;
  };
  const purgeBefore = async (seq) => (await nc.jetstreamManager()).streams.purge('EVENTS', { seq });
  return { send, purgeBefore, close: () => nc.close() };
}

async function until(cond, what) {
  const deadline = Date.now() + HANG_MS;
  for (;;) {
    if (cond()) return;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('GatewayAgent joins in the middle of a message and survives a drop in the middle of it', async () => {
  const pub = await publisher();
  const scope = 'conversation:agui-live';
  try {
    await pub.send(scope, 'conversation.message.created', undefined, { message_id: 'm-0', role: 'user', content: 'Hi' });
    await pub.send(scope, 'run.started', 'run-1', {});
    await pub.send(scope, 'run.message.started', 'run-1', { message_id: 'm-1' });
    await pub.send(scope, 'run.message.delta', 'run-1', { message_id: 'm-1', delta: 'Hel' });
    await pub.send(scope, 'run.state.snapshot', 'run-1', { state: { step: 1 } });

    const agent = new GatewayAgent({
      url: env('GW_HTTP'), token: env('TOKEN_ALICE'), scope,
      client: { WebSocket, transport: 'websocket', backoff: { initialMs: 10, maxMs: 50 } },
    });
    const seen = [];
    let finished = false;
    agent.subscribe({
      onEvent: ({ event }) => { seen.push(event); },
      onRunFinishedEvent: () => { finished = true; },
    });
    const attached = agent.connectAgent();
    await until(() => seen.some((e) => e.type === 'TEXT_MESSAGE_START'), 'the prelude');
    await pub.send(scope, 'run.message.delta', 'run-1', { message_id: 'm-1', delta: 'lo' });
    await until(() => seen.some((e) => e.delta === 'lo'), 'the live delta');

    let drops = 0;
    agent.client.on('disconnected', () => { drops += 1; });
    agent.client.drop({ reconnectInMs: 50 }); // in the middle of the message
    await pub.send(scope, 'run.message.delta', 'run-1', { message_id: 'm-1', delta: ', world' });
    await pub.send(scope, 'run.state.delta', 'run-1', { patch: [{ op: 'replace', path: '/step', value: 2 }] });
    await pub.send(scope, 'run.message.finished', 'run-1', { message_id: 'm-1' });
    await pub.send(scope, 'run.finished', 'run-1', { outcome: 'success' });
    await until(() => finished, 'RUN_FINISHED');
    await agent.detachActiveRun();
    await attached; // rejects if AG-UI's verifier had refused anything

    assert.equal(drops, 1);
    assert.deepStrictEqual(seen.map((e) => e.type), [
      'RUN_STARTED', 'MESSAGES_SNAPSHOT', 'STATE_SNAPSHOT', 'TEXT_MESSAGE_START', 'TEXT_MESSAGE_CONTENT',
      'TEXT_MESSAGE_CONTENT', 'STATE_DELTA', 'TEXT_MESSAGE_END', 'RUN_FINISHED',
    ]);
    assert.deepStrictEqual(agent.messages, [
      { id: 'm-0', role: 'user', content: 'Hi' }, { id: 'm-1', role: 'assistant', content: 'Hello, world' },
    ]);
    assert.deepStrictEqual(agent.state, { step: 2 });
    assert.equal(agent.threadId, scope);
    const twin = agent.clone(); // what frameworks do with agents: it must attach the same way
    assert.ok(twin instanceof GatewayAgent);
    assert.equal(twin.scope, scope);
    assert.deepStrictEqual(twin.messages, agent.messages);
  } finally {
    await pub.close();
  }
});

/** The server's GET /v1/agui read by AG-UI's own HTTP stack (runHttpRequest, transformHttpEventStream: its SSE
 * parser), as a stock HTTP agent would; `lastEventId` is the Last-Event-ID of the next connect. */
class SseAgent extends AbstractAgent {
  constructor(scope) {
    super({ threadId: scope });
    this.scope = scope;
    this.lastEventId = null;
  }
  run() { throw new Error('attach only'); }
  connect() {
    const url = new URL('/v1/agui', env('GW_HTTP'));
    url.searchParams.set('scope', this.scope);
    const headers = { Authorization: `Bearer ${env('TOKEN_ALICE')}`, Accept: 'text/event-stream' };
    if (this.lastEventId !== null) headers['Last-Event-ID'] = String(this.lastEventId);
    return new Observable((sub) => {
      const abort = new AbortController();
      const s = transformHttpEventStream(runHttpRequest(() => fetch(url, { headers, signal: abort.signal })))
        .subscribe(sub);
      return () => { s.unsubscribe(); abort.abort(); };
    });
  }
}

test('GET /v1/agui through AG-UI\'s own SSE parser, verifier and apply: a join and a resume with Last-Event-ID, both in the middle of a message', async () => {
  const pub = await publisher();
  const scope = 'conversation:agui-sse';
  try {
    await pub.send(scope, 'run.started', 'run-2', {});
    await pub.send(scope, 'run.message.started', 'run-2', { message_id: 'm-1' });
    await pub.send(scope, 'run.message.delta', 'run-2', { message_id: 'm-1', delta: 'Hel' });
    const agent = new SseAgent(scope);
    let seen = [];
    agent.subscribe({ onEvent: ({ event }) => { seen.push(event); } });
    const first = agent.connectAgent();
    await until(() => seen.some((e) => e.type === 'TEXT_MESSAGE_START'), 'the prelude');
    const seq = await pub.send(scope, 'run.message.delta', 'run-2', { message_id: 'm-1', delta: 'lo' });
    await until(() => seen.some((e) => e.delta === 'lo'), 'the live delta');
    await agent.detachActiveRun(); // the connection drops in the middle of the message
    await first;
    assert.deepStrictEqual(seen.map((e) => e.type), [
      'RUN_STARTED', 'MESSAGES_SNAPSHOT', 'TEXT_MESSAGE_START', 'TEXT_MESSAGE_CONTENT']);
    await pub.send(scope, 'run.message.delta', 'run-2', { message_id: 'm-1', delta: ', world' });
    await pub.send(scope, 'run.message.finished', 'run-2', { message_id: 'm-1' });
    await pub.send(scope, 'run.finished', 'run-2', { outcome: 'success' });

    seen = [];
    agent.lastEventId = seq;
    const again = agent.connectAgent();
    await until(() => seen.some((e) => e.type === 'RUN_FINISHED'), 'RUN_FINISHED');
    await agent.detachActiveRun();
    await again; // rejects if AG-UI's verifier had refused anything
    assert.deepStrictEqual(seen.map((e) => e.type), [
      'RUN_STARTED', 'MESSAGES_SNAPSHOT', 'TEXT_MESSAGE_START', 'TEXT_MESSAGE_CONTENT', 'TEXT_MESSAGE_END',
      'RUN_FINISHED']);
    assert.deepStrictEqual(agent.messages, [{ id: 'm-1', role: 'assistant', content: 'Hello, world' }]);
  } finally {
    await pub.close();
  }
});

test('a gap the gateway cannot fill (retention) is resynchronised inside the same, still valid, AG-UI stream', async () => {
  const pub = await publisher();
  const scope = 'conversation:agui-gap';
  try {
    await pub.send(scope, 'run.started', 'run-3', {});
    await pub.send(scope, 'run.message.started', 'run-3', { message_id: 'm-3' });
    await pub.send(scope, 'run.message.delta', 'run-3', { message_id: 'm-3', delta: 'A' });
    let gate = Promise.resolve();
    let open = () => {};
    const gaps = [];
    const agent = new GatewayAgent({
      url: env('GW_HTTP'), token: async () => { await gate; return env('TOKEN_ALICE'); }, scope,
      client: { WebSocket, transport: 'websocket', backoff: { initialMs: 10, maxMs: 50 } },
      onGap: (gap) => gaps.push(gap),
    });
    const seen = [];
    let finished = false;
    agent.subscribe({
      onEvent: ({ event }) => { seen.push(event); },
      onRunFinishedEvent: () => { finished = true; },
    });
    const attached = agent.connectAgent();
    await until(() => seen.some((e) => e.type === 'TEXT_MESSAGE_START'), 'the prelude');
    // drop, and keep the client from reconnecting (its token provider waits) until retention took events
    gate = new Promise((resolve) => { open = resolve; });
    let dropped = false;
    agent.client.on('disconnected', () => { dropped = true; });
    agent.client.drop();
    await until(() => dropped, 'the drop');
    await pub.send(scope, 'run.message.delta', 'run-3', { message_id: 'm-3', delta: 'B' });
    const kept = await pub.send(scope, 'run.message.delta', 'run-3', { message_id: 'm-3', delta: 'C' });
    await pub.purgeBefore(kept); // "B" (and everything before it) is gone from the stream
    open();
    await until(() => gaps.length === 1, 'the gap notice');
    await until(() => seen.filter((e) => e.type === 'TEXT_MESSAGE_START').length === 2, 'the new prelude');
    await pub.send(scope, 'run.message.finished', 'run-3', { message_id: 'm-3' });
    await pub.send(scope, 'run.finished', 'run-3', { outcome: 'success' });
    await until(() => finished, 'RUN_FINISHED');
    await agent.detachActiveRun();
    await attached; // rejects if AG-UI's verifier had refused anything
    assert.deepStrictEqual(seen.map((e) => e.type), [
      'RUN_STARTED', 'MESSAGES_SNAPSHOT', 'TEXT_MESSAGE_START', // the join
      'RUN_ERROR', 'RUN_STARTED', 'MESSAGES_SNAPSHOT', 'TEXT_MESSAGE_START', // the resynchronisation
      'TEXT_MESSAGE_END', 'RUN_FINISHED',
    ]);
    assert.equal(seen[3].code, 'wsgateway.gap');
    assert.deepStrictEqual(agent.messages, [{ id: 'm-3', role: 'assistant', content: 'C' }]); // "B" is lost
  } finally {
    await pub.close();
  }
});

test('GatewayAgent is permission-filtered: a scope the caller may not see is refused', async () => {
  const agent = new GatewayAgent({ url: env('GW_HTTP'), token: env('TOKEN_MIA'), scope: 'conversation:agui-live',
    client: { WebSocket, transport: 'websocket' } });
  await assert.rejects(agent.connectAgent(), (err) => err.status === 403 || /403|forbidden/.test(String(err)));
  assert.throws(() => new GatewayAgent({ url: env('GW_HTTP'), token: 'x', scope: '*' }), /not allowed|scope/);
});
