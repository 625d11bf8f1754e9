/** The HTTP API: the history pager (`GET /v1/history`) and the visible scopes (`GET /v1/scopes`). */
import { GatewayHttpError, GatewayInputError } from "./errors.js";
import { checkInt, checkResourceScope, checkSeq, checkToken, gatewayUrls } from "./validate.js";
export function checkTokenProvider(token) {
    if (typeof token === "function")
        return token;
    return checkToken(token);
}
export async function resolveToken(token) {
    return checkToken(typeof token === "function" ? await token() : token, "token (from the token provider)");
}
function fetchOf(f) {
    const impl = f ?? globalThis.fetch;
    if (typeof impl !== "function")
        throw new GatewayInputError("fetch", "no fetch available: pass one in the options");
    return impl.bind(globalThis);
}
/** GET `url` with the bearer token; the JSON body, or GatewayHttpError with the gateway's error code. */
export async function getJson(url, opts) {
    const token = await resolveToken(opts.token);
    const init = { headers: { Authorization: `Bearer ${token}`, Accept: "application/json" }, cache: "no-store" };
    if (opts.signal)
        init.signal = opts.signal;
    const r = await fetchOf(opts.fetch)(url, init);
    const body = (await r.json().catch(() => null));
    if (!r.ok) {
        throw new GatewayHttpError(r.status, body?.error?.code ?? "http_error", body?.error?.message ?? r.statusText);
    }
    return body;
}
/**
 * The history pager: the retained events of one scope after `after`, oldest first, page by page, until
 * a page is empty (`for await (const page of history({...}))`). `events()` flattens the pages.
 */
export class HistoryPager {
    scope;
    after;
    limit;
    urls;
    opts;
    constructor(opts) {
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
    get cursor() {
        return this.after;
    }
    /** The next page (empty `events` at the end of the stream); moves the cursor. */
    async next() {
        const url = new URL(this.urls.history.href);
        url.searchParams.set("scope", this.scope);
        url.searchParams.set("after", String(this.after));
        url.searchParams.set("limit", String(this.limit));
        if (this.opts.compact)
            url.searchParams.set("compact", "true");
        const page = await getJson(url, this.opts);
        this.after = page.next_after;
        return page;
    }
    async *[Symbol.asyncIterator]() {
        for (;;) {
            const page = await this.next();
            if (page.events.length === 0)
                return;
            yield page;
        }
    }
    /** Every event, oldest first, across pages. */
    async *events() {
        for await (const page of this)
            yield* page.events;
    }
}
/** `new HistoryPager(opts)`. */
export function history(opts) {
    return new HistoryPager(opts);
}
/** Every scope the caller may see now (`GET /v1/scopes`, all pages), and whether the caller is an org admin. */
export async function visibleScopes(opts) {
    const urls = gatewayUrls(opts.url);
    checkTokenProvider(opts.token);
    const limit = checkInt(opts.limit ?? 100, "limit", 1, 1000);
    const scopes = [];
    let after = "";
    for (;;) {
        const url = new URL(urls.scopes.href);
        if (after)
            url.searchParams.set("after", after);
        url.searchParams.set("limit", String(limit));
        const body = await getJson(url, opts);
        scopes.push(...body.scopes);
        if (body.scopes.length < limit || body.next_after === after) {
            return { tenant: body.tenant, principal: body.principal, orgAdmin: body.org_admin, scopes };
        }
        after = body.next_after;
    }
}
