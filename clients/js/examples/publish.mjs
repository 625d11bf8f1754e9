#!/usr/bin/env node
// Publishing an event to wsgateway from Node: the platform-side rules of docs/events.md, in another
// language than the Python Publisher, with the npm `nats` package.
//
//   node examples/publish.mjs --nats nats://127.0.0.1:4222 --tenant demo --scope process:onboarding \
//     --type process.progress --data '{"fraction": 0.5, "message": "half way"}' [--id <event id>] [--run-id r1]
//
// The rules it follows:
// * subject  <prefix>.<tenant>.<kind>.<id>  (prefix `events`, WSGATEWAY_SUBJECT_PREFIX), from the scope;
// * envelope {id, type, tenant, scope, time (RFC 3339, UTC), actor?, run_id?, data}; run.* types need run_id;
// * published through JetStream (an acknowledgement, not a core NATS publish), with the header
//   Nats-Msg-Id = the envelope's id: a retry with the same id within the stream's duplicate window
//   (2 minutes) is stored once, and its ack says `duplicate: true`.
// Prints one JSON line: {subject, id, stream, seq, duplicate}.
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';

import { connect, headers } from 'nats';
import { KINDS, SCOPE_PATTERN } from '@wsgateway/client'; // the gateway's own rules (generated from its models)

const NAME = /^[A-Za-z0-9_-]{1,128}$/;
const TYPE = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/;
const EVENT_ID = /^[\x21-\x7e]{1,128}$/;
const CROCKFORD = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';

/** A 26-character, time-sortable ULID-style id (48 bits of milliseconds, 80 random bits). */
export function eventId(now = Date.now()) {
  let time = '';
  for (let t = now, i = 0; i < 10; i += 1, t = Math.floor(t / 32)) time = CROCKFORD[t % 32] + time;
  const bytes = randomBytes(10);
  let bits = 0n;
  for (const b of bytes) bits = (bits << 8n) | BigInt(b);
  let rand = '';
  for (let i = 0; i < 16; i += 1, bits >>= 5n) rand = CROCKFORD[Number(bits & 31n)] + rand;
  return time + rand;
}

/** The subject and envelope of an event, checked as the gateway checks them (an Error before anything is sent). */
export function envelope({ prefix = 'events', tenant, scope, type, data = {}, id = eventId(), runId, actor }) {
  if (!NAME.test(tenant ?? '')) throw new Error(`tenant must match ${NAME}`);
  if (typeof scope !== 'string' || scope === '*' || !new RegExp(SCOPE_PATTERN).test(scope)) {
    throw new Error(`scope must be <${KINDS.join('|')}>:<id>`);
  }
  if (!TYPE.test(type ?? '') || type.length > 128) throw new Error('type must be dot-separated tokens of [A-Za-z0-9_-]');
  if (!EVENT_ID.test(id)) throw new Error('id must be 1-128 visible ASCII characters');
  if (type.startsWith('run.') && !runId) throw new Error(`${type} needs a run id (--run-id)`);
  if (data === null || typeof data !== 'object' || Array.isArray(data)) throw new Error('data must be a JSON object');
  const [kind, resource] = scope.split(':');
  const env = { id, type, tenant, scope, time: new Date().toISOString(), data };
  if (actor) env.actor = actor;
  if (runId) env.run_id = runId;
  return { subject: `${prefix}.${tenant}.${kind}.${resource}`, env };
}

/** Publish through JetStream with Nats-Msg-Id; resolves with the ack. */
export async function publish(js, { subject, env }) {
  const h = headers();
  h.set('Nats-Msg-Id', env.id);
  const ack = await js.publish(subject, new TextEncoder().encode(JSON.stringify(env)), { headers: h, timeout: 5000 });
  return { subject, id: env.id, stream: ack.stream, seq: ack.seq, duplicate: ack.duplicate };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values } = parseArgs({
    options: {
      nats: { type: 'string', default: process.env.NATS_URL ?? 'nats://127.0.0.1:4222' },
      prefix: { type: 'string', default: 'events' },
      tenant: { type: 'string' }, scope: { type: 'string' }, type: { type: 'string' },
      data: { type: 'string', default: '{}' }, id: { type: 'string' }, 'run-id': { type: 'string' },
      actor: { type: 'string' },
    },
  });
  const event = envelope({
    prefix: values.prefix, tenant: values.tenant, scope: values.scope, type: values.type,
    data: JSON.parse(values.data), id: values.id ?? eventId(), runId: values['run-id'], actor: values.actor,
  });
  const nc = await connect({ servers: values.nats.split(',') });
  try {
    process.stdout.write(`${JSON.stringify(await publish(nc.jetstream(), event))}\n`);
  } finally {
    await nc.close();
  }
}
