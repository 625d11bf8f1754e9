// Drives the gateway's live viewer (GET /) in headless Debian Chromium through playwright-core.
//
// Usage: node tests/browser/viewer.mjs '<json config>'
//   {"url": "http://127.0.0.1:8080/", "mode": "check" | "shot", "out": "<png path>",
//    "chromium": "/usr/bin/chromium", "user": "alice", "waitMs": 6000}
//
// mode "check" (tests/test_viewer.py): carol sees her scope and not conversation:welcome (not even when
//   she asks for it: forbidden); bob sees answers assemble, drops the connection, resumes; bob's access
//   to conversation:welcome is revoked and granted back live. Prints one JSON line with what the page
//   held (seqs, resumes, per-scope state) for pytest to check against GET /v1/history.
// mode "shot" (scripts/viewer-screenshot.sh): one user watches, drops and resumes; screenshot to `out`.
//
// The npm dependencies live in <repo>/tools/node_modules (scripts/ensure-npm.sh), not next to this
// file, and ESM ignores NODE_PATH: resolve playwright-core from the tools directory explicitly.

import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import process from 'node:process';
import { pathToFileURL } from 'node:url';

const config = JSON.parse(process.argv[2] ?? '{}');
const toolsDir = new URL('../../tools/', import.meta.url).pathname;
const resolved = createRequire(`${toolsDir}package.json`).resolve('playwright-core');
const playwright = await import(pathToFileURL(resolved).href);
const { chromium } = playwright.chromium ? playwright : playwright.default; // CommonJS entry point

const T = 15000; // per wait; the whole check takes a few seconds at --pace 0.3


async function launch() {
  // A fresh profile per run, nothing from the network: the page is served by the local gateway.
  const profile = mkdtempSync(join(tmpdir(), 'wsgateway-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: config.chromium ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: config.width ?? 1440, height: config.height ?? 900 },
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
    ],
  });
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

const state = (page) => page.evaluate(() => JSON.parse(JSON.stringify(window.viewer)));

async function pickUser(page, name) {
  await page.click(`button.user[data-user="${name}"]`);
  await page.waitForFunction((n) => window.viewer.user === n && window.viewer.state === 'open'
    && window.viewer.principal && window.viewer.principal.subject === n, name, { timeout: T });
}

async function waitEvents(page, scope, n) {
  await page.waitForFunction(([s, k]) => (window.viewer.scopes[s]?.events ?? 0) >= k, [scope, n], { timeout: T });
}

// A positive marker instead of a quiet window: the first conversation:welcome event after `afterSeq` (read
// through the history API as alice, an org admin), once the page has received a later event of another
// scope. The gateway handles events in stream order, so by then it has decided about the marker and every
// welcome event before it: had one been delivered to the page, it would have arrived first.
async function afterWelcomeMarker(page, afterSeq) {
  const base = new URL(config.url);
  const { access_token: token } = await (await fetch(new URL('/dev/idp/token?sub=alice', base))).json();
  const url = new URL(`/v1/history?scope=conversation:welcome&after=${afterSeq}&limit=1`, base);
  const deadline = Date.now() + T;
  let marker = null;
  while (marker === null) { // until the simulator has published one (it does all the time)
    const body = await (await fetch(url, { headers: { Authorization: `Bearer ${token}` } })).json();
    if (body.events.length) marker = body.events[0].seq;
    else if (Date.now() > deadline) throw new Error(`no conversation:welcome event after seq ${afterSeq}`);
    else await new Promise((done) => setTimeout(done, 50));
  }
  await page.waitForFunction((m) => window.viewer.lastSeq !== null && window.viewer.lastSeq > m, marker,
    { timeout: T });
  return marker;
}

async function dropAndResume(page, liveAfter = 3) {
  await page.click('#drop');
  await page.waitForFunction(() => window.viewer.state === 'dropped', null, { timeout: T });
  await page.waitForFunction((k) => {
    const v = window.viewer;
    const r = v.resumes[v.resumes.length - 1];
    return v.state === 'open' && r && r.seq !== null && v.seqs.filter((s) => s > r.seq).length >= k;
  }, liveAfter, { timeout: T });
}

async function check(page) {
  const out = {};
  await page.goto(config.url, { waitUntil: 'load' });
  await page.waitForSelector('button.user[data-user="carol"]', { timeout: T });

  // carol: member of conversation:support only
  await pickUser(page, 'carol');
  await waitEvents(page, 'conversation:support', 5);
  await page.fill('#follow-scope', 'conversation:welcome');
  await page.click('#follow-form button');
  await page.waitForFunction(() => window.viewer.scopes['conversation:welcome']?.status === 'forbidden',
    null, { timeout: T });
  // welcome traffic flows all the time: none of it may reach carol
  await afterWelcomeMarker(page, (await state(page)).lastSeq ?? 0);
  const carol = await state(page);
  out.carol = {
    scopes: carol.scopes,
    banner: await page.textContent('[data-scope="conversation:welcome"] .banner'),
    welcome_panel_events: await page.getAttribute('[data-scope="conversation:welcome"]', 'data-events'),
  };

  // bob: viewer of project apollo; answers assemble, tool calls, process progress
  await pickUser(page, 'bob');
  await waitEvents(page, 'conversation:welcome', 1);
  await page.waitForFunction(() => [...document.querySelectorAll('[data-scope="conversation:welcome"] .answer')]
    .some((a) => a.textContent.length > 20), null, { timeout: T });
  await page.waitForSelector('[data-scope="process:onboarding"] .bar > div', { timeout: T });
  await page.waitForSelector('[data-scope="agent:researcher"] .tool .tname', { timeout: T });
  out.bob_answer = await page.evaluate(() => [...document.querySelectorAll('[data-scope="conversation:welcome"] .answer')]
    .map((a) => a.textContent).filter((t) => t.length > 20)[0]);
  const before = await state(page);
  await page.waitForFunction((n) => window.viewer.seqs.length > n, before.seqs.length, { timeout: T });
  await dropAndResume(page);
  const bob = await state(page);
  out.bob = {
    startSeq: bob.startSeq, lastSeq: bob.lastSeq, seqs: bob.seqs, resumes: bob.resumes, drops: bob.drops,
    duplicates: bob.duplicates, scopes: bob.scopes, seqs_before_drop: before.seqs.length,
    resume_note: await page.textContent('#resume-note'),
  };
  await page.screenshot({ path: config.out });

  // live revocation: bob loses conversation:welcome, then gets it back
  const revokeButton = '[data-scope="conversation:welcome"] .panel-head button';
  await page.click(revokeButton);
  await page.waitForFunction(() => window.viewer.scopes['conversation:welcome'].status === 'revoked',
    null, { timeout: T });
  const revokedAt = await state(page);
  const atRevoke = revokedAt.scopes['conversation:welcome'].events;
  // the revoked frame came after every frame sent before it: a welcome event after this seq came later
  await afterWelcomeMarker(page, revokedAt.lastSeq);
  const afterWait = await state(page);
  out.revoke = {
    banner: await page.textContent('[data-scope="conversation:welcome"] .banner'),
    events_at_revoke: atRevoke,
    events_after_wait: afterWait.scopes['conversation:welcome'].events,
    others_still_flowing: afterWait.scopes['process:onboarding'].events,
    log: afterWait.log.map((l) => l.text),
  };
  if (config.revokedOut) await page.screenshot({ path: config.revokedOut });
  await page.click(revokeButton); // now "grant back"
  await page.waitForFunction(() => window.viewer.scopes['conversation:welcome'].status === 'live',
    null, { timeout: T });
  await waitEvents(page, 'conversation:welcome', out.revoke.events_after_wait + 1);
  out.grant = {
    banner: await page.textContent('[data-scope="conversation:welcome"] .banner'),
    events: (await state(page)).scopes['conversation:welcome'].events,
  };
  return out;
}

async function shot(page) {
  await page.goto(config.url, { waitUntil: 'load' });
  const user = config.user ?? 'alice';
  await page.waitForSelector(`button.user[data-user="${user}"]`, { timeout: T });
  await pickUser(page, user);
  await page.waitForTimeout(config.waitMs ?? 6000);
  await dropAndResume(page, 5);
  await page.waitForTimeout(config.settleMs ?? 2500);
  await page.screenshot({ path: config.out });
  const v = await state(page);
  return { events: v.events, resumes: v.resumes, scopes: Object.keys(v.scopes) };
}

const problems = [];
let result;
let code = 0;
let close = async () => {};
try {
  const launched = await launch();
  close = launched.close;
  const context = launched.context;
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
  result = config.mode === 'shot' ? await shot(page) : await check(page);
} catch (e) {
  result = { error: String(e.stack || e), ...(e.extra ?? {}) };
  code = 1;
} finally {
  await close();
}
process.stdout.write(`${JSON.stringify({ ...result, problems })}\n`);
process.exit(code);
