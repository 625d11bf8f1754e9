/** The HTTP API: the history pager (`GET /v1/history`) and the visible scopes (`GET /v1/scopes`). */

import { GatewayHttpError, GatewayInputError } from "./errors.js";
import type { HistoryBody, ScopesBody, StoredEvent, VisibleScope } from "./generated/protocol.js";
import { checkInt, checkResourceScope, checkSeq, checkToken, gatewayUrls } from "./validate.js";
import type { GatewayUrls } from "./validate.js";

/** A token, or a function returning one (called for every request and every connect). */
export type TokenProvider = string | (() => string | Promise<string>);

export interface HttpOptions {
  /** The gateway: `ws(s)://host/v1/ws` or its base `http(s)://host`. */
  url: string | URL;
  token: TokenProvider;
  /** `fetch` to use (default: `globalThis.fetch`). */
  fetch?: typeof fetch;
  signal?: AbortSignal;
}

export function checkTokenProvider(token: unknown): TokenProvider {
  if (typeof token === "function") return token as TokenProvider;
  return checkToken(token);
}

export async function resolveToken(token: TokenProvider): Promise<string> {
  return checkToken(typeof token === "function" ? await token() : token, "token (from the token provider)");
}

function fetchOf(f: typeof fetch | undefined): typeof fetch {
  const impl = f ?? globalThis.fetch;
  if (typeof impl !== "function") throw new GatewayInputError("fetch", "no fetch available: pass one in the options");
  return impl.bind(globalThis);
}

/** GET `url` with the bearer token; the JSON body, or GatewayHttpError with the gateway's error code. */
export async function getJson<T>(url: URL, opts: { token: TokenProvider; fetch?: typeof fetch; signal?: AbortSignal }): Promise<T> {
  const token = await resolveToken(opts.token);
  const init: RequestInit = { headers: { Authorization: `Bearer ${token}`, Accept: "application/json" }, cache: "no-store" };
  if (opts.signal) init.signal = opts.signal;
  const r = await fetchOf(opts.fetch)(url, init);
  const body = (await r.json().catch(() => null)) as { error?: { code?: string; message?: string } } | null;
  if (!r.ok) {
    throw new GatewayHttpError(r.status, body?.error?.code ?? "http_error", body?.error?.message ?? r.statusText);
  }
  return body as T;
}

export interface HistoryOptions extends HttpOptions {
  /** One scope (`*` is refused by the history API). */
  scope: string;
  /** Events with `seq > after` (default 0: from the start of the stream). */
  after?: number | string;
  /** Page size, 1..WSGATEWAY_HISTORY_MAX_LIMIT (default 100). */
  limit?: number;
  /** Merge each message's, reasoning's and tool call's deltas within a page (docs/protocol.md, Compact catch-up). */
  compact?: boolean;
}

/** One page of `GET /v1/history`. */
export type HistoryPage = HistoryBody;

/**
 * The history pager: the retained events of one scope after `after`, oldest first, page by page, until
 * a page is empty (`for await (const page of history({...}))`). `events()` flattens the pages.
 */
export class HistoryPager implements AsyncIterable<HistoryPage> {
  readonly scope: string;
  private after: number;
  private readonly limit: number;
  private readonly urls: GatewayUrls;
  private readonly opts: HistoryOptions;

  constructor(opts: HistoryOptions) {
    this.urls = gatewayUrls(opts.url);
    this.scope = checkResourceScope(opts.scope);
    this.after = checkSeq(opts.after ?? 0, "after");
    this.limit = checkInt(opts.limit ?? 100, "limit", 1, 10000);
    checkTokenProvider(opts.token);
    if (opts.compact !== undefined && typeof opts.compact !== "boolean") {
      throw new GatewayInputError("compact", `must be a boolean (got ${JSON.stringify(opts.compact)})`);
    }
    this.opts = opts;
  }

  /** The `after` of the next page. */
  get cursor(): number {
    return this.after;
  }

  /** The next page (empty `events` at the end of the stream); moves the cursor. */
  async next(): Promise<HistoryPage> {
    const url = new URL(this.urls.history.href);
    url.searchParams.set("scope", this.scope);
    url.searchParams.set("after", String(this.after));
    url.searchParams.set("limit", String(this.limit));
    if (this.opts.compact) url.searchParams.set("compact", "true");
    const page = await getJson<HistoryPage>(url, this.opts);
    this.after = page.next_after;
    return page;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<HistoryPage> {
    for (;;) {
      const page = await this.next();
      if (page.events.length === 0) return;
      yield page;
    }
  }

  /** Every event, oldest first, across pages. */
  async *events(): AsyncGenerator<StoredEvent> {
    for await (const page of this) yield* page.events;
  }
}

/** `new HistoryPager(opts)`. */
export function history(opts: HistoryOptions): HistoryPager {
  return new HistoryPager(opts);
}

/** Every scope the caller may see now (`GET /v1/scopes`, all pages), and whether the caller is an org admin. */
export async function visibleScopes(opts: HttpOptions & { limit?: number }): Promise<{
  tenant: string; principal: string; orgAdmin: boolean; scopes: VisibleScope[];
}> {
  const urls = gatewayUrls(opts.url);
  checkTokenProvider(opts.token);
  const limit = checkInt(opts.limit ?? 100, "limit", 1, 1000);
  const scopes: VisibleScope[] = [];
  let after = "";
  for (;;) {
    const url = new URL(urls.scopes.href);
    if (after) url.searchParams.set("after", after);
    url.searchParams.set("limit", String(limit));
    const body = await getJson<ScopesBody>(url, opts);
    scopes.push(...body.scopes);
    if (body.scopes.length < limit || body.next_after === after) {
      return { tenant: body.tenant, principal: body.principal, orgAdmin: body.org_admin, scopes };
    }
    after = body.next_after;
  }
}
