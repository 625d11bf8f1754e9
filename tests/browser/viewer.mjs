// Drives the gateway's live viewer (GET /) in headless Debian Chromium through playwright-core.
//
// Usage: node tests/browser/viewer.mjs '<json config>'
//   {"url": "http://127.0.0.1:8080/", "mode": "check" | "shot", "out": "<png path>",
//    "chromium": "/usr/bin/chromium", "user": "alice", "waitMs": 6000, "width": 390, "height": 844,
//    "fullPage": true}
//
// mode "check" (tests/test_viewer.py): carol sees her scope and not conversation:welcome (not even when
//   she asks for it: forbidden); bob sees answers assemble, drops the connection, resumes; bob's access
//   to conversation:welcome is revoked and granted back live (the demo switch is offered on panels the
//   user may see, never on a forbidden one); finally the layout at phone width (390 px). Prints one JSON
//   line with what the page held (seqs, resumes, per-scope state, panels, layout) for pytest to check
//   against GET /v1/history. `phoneOut`: also a full-page PNG at phone width.
// mode "shot" (scripts/viewer_screenshot.py): one user watches, drops and resumes; screenshot to `out`
//   (`width`/`height`: the viewport, 1440x900 unless given; `fullPage`: the whole page, not just the viewport).
//
// Chromium is launched by ./chromium.mjs (shared with cors.mjs).

import process from 'node:process';

import { main } from './chromium.mjs';

const config = JSON.parse(process.argv[2] ?? '{}');

const T = 15000; // per wait; the whole check takes a few seconds at --pace 0.3

const state = (page) => page.evaluate(() => JSON.parse(JSON.stringify(window.viewer)));

// What a panel shows in its head and banner: button labels, the banner's text and its <code> parts.
const panelView = (page, scope) => page.evaluate((s) => {
  const panel = document.querySelector(`[data-scope="${s}"]`);
  const banner = panel.querySelector('.banner');
  return {
    buttons: [...panel.querySelectorAll('button')].map((b) => b.textContent),
    banner: banner.hidden ? null : banner.textContent,
    banner_code: [...banner.querySelectorAll('code')].map((c) => c.textContent),
  };
}, scope);

// At phone width (390 CSS px): nothing wider than the screen, neither the page nor a panel's feed.
async function phoneLayout(page) {
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForFunction(() => window.innerWidth === 390, null, { timeout: T });
  await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
  const layout = await page.evaluate(() => ({
    innerWidth: window.innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    wideFeeds: [...document.querySelectorAll('.feed')].filter((f) => f.scrollWidth > f.clientWidth)
      .map((f) => f.closest('[data-scope]').dataset.scope),
    panelsRight: Math.max(...[...document.querySelectorAll('.panel')].map((p) => p.getBoundingClientRect().right)),
  }));
  if (config.phoneOut) await page.screenshot({ path: config.phoneOut, fullPage: true });
  return layout;
}

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
    welcome_panel: await panelView(page, 'conversation:welcome'), // forbidden: no demo switch on it
    support_panel: await panelView(page, 'conversation:support'), // hers, live: the switch is there
    inbox: carol.inbox, // the onboarding asks bob's group and alice, never her
    inbox_badge: await page.textContent('#inbox-badge'),
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

  // bob's inbox: the onboarding's identity check (asked of group apollo-team) appears, then goes when answered
  await page.waitForSelector('#inbox .inbox-item[data-request^="verify-"]', { timeout: T });
  const asked = await state(page);
  const verify = asked.inbox.find((q) => q.request_id.startsWith('verify-'));
  out.bob_inbox = { asked: asked.inbox, badge: await page.textContent('#inbox-badge'),
    item: await page.textContent(`#inbox .inbox-item[data-request="${verify.request_id}"]`) };
  await page.waitForFunction((id) => !window.viewer.inbox.some((q) => q.request_id === id)
    && !document.querySelector(`#inbox .inbox-item[data-request="${id}"]`), verify.request_id, { timeout: T });
  out.bob_inbox.answered = (await state(page)).inbox;
  // presence: alice (another socket, opened in the page) watches conversation:welcome; bob's panel shows her
  const { access_token: aliceToken } = await (await fetch(new URL('/dev/idp/token?sub=alice', config.url))).json();
  await page.evaluate((tok) => {
    const url = new URL('/v1/ws?scope=conversation:welcome', location.href);
    url.protocol = 'ws:';
    window.__alice = new WebSocket(url, ['wsgateway.v1', 'bearer.' + tok]);
  }, aliceToken);
  await page.waitForFunction(() => !!window.viewer.scopes['conversation:welcome'].presence?.members['user:alice'],
    null, { timeout: T });
  out.presence = {
    model: (await state(page)).scopes['conversation:welcome'].presence,
    text: await page.textContent('[data-scope="conversation:welcome"] .presence'),
  };
  await page.evaluate(() => window.__alice.close());
  await page.waitForFunction(() => !window.viewer.scopes['conversation:welcome'].presence.members['user:alice'],
    null, { timeout: T });
  out.presence.after = await page.textContent('[data-scope="conversation:welcome"] .presence');

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
    panel: await panelView(page, 'conversation:welcome'),
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
  await page.waitForFunction(() => document.querySelector('[data-scope="conversation:welcome"] .panel-head button')
    ?.textContent === 'revoke access', null, { timeout: T }); // live again: the switch is back
  out.grant.panel = await panelView(page, 'conversation:welcome');
  out.phone = await phoneLayout(page);
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
  await page.screenshot({ path: config.out, fullPage: !!config.fullPage });
  const v = await state(page);
  return { events: v.events, resumes: v.resumes, scopes: Object.keys(v.scopes) };
}

await main(config, (page) => (config.mode === 'shot' ? shot(page) : check(page)));
