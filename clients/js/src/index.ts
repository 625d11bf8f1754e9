/** @wsgateway/client: the TypeScript client of wsgateway (docs/protocol.md). */
export const VERSION = "0.1.0";
