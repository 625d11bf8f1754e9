/**
 * @wsgateway/client: the TypeScript client of wsgateway (docs/protocol.md).
 *
 * `GatewayClient` follows scopes over a WebSocket (or Server-Sent Events), resumes after any disconnect
 * with one cursor, and hands every event to the application once, in order; `history()` pages
 * `GET /v1/history`; the frame and event types are generated from the gateway's own models.
 */
export { GatewayClient, isEventType } from "./client.js";
export { GatewayClosedError, GatewayHttpError, GatewayInputError } from "./errors.js";
export { HistoryPager, history, visibleScopes } from "./http.js";
export { SseParser } from "./sse.js";
export { checkScope, checkSeq, gatewayUrls, isScope } from "./validate.js";
export { CLOSE_CODES, DELIVERY_CLASSES, EVENT_TYPES, FINAL_CLOSE_CODES, KINDS, SCOPE_PATTERN, SUBPROTOCOL, VERSION, } from "./generated/constants.js";
