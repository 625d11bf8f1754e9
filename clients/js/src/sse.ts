/** A Server-Sent Events parser (the WHATWG event-stream format), fed with text chunks as they arrive. */

export interface SseMessage {
  /** `message` for events (the gateway's `id:` = seq), else the control frame's type. */
  event: string;
  data: string;
  id: string | null;
}

export class SseParser {
  private buffer = "";
  private event = "";
  private data: string[] = [];
  private id: string | null = null;
  private sawCr = false;

  /** Feed a chunk; returns the messages it completes. */
  push(chunk: string): SseMessage[] {
    const out: SseMessage[] = [];
    let text = chunk;
    if (this.sawCr && text.startsWith("\n")) text = text.slice(1); // a CRLF split across chunks
    this.sawCr = text.endsWith("\r");
    this.buffer += text;
    const lines = this.buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop() ?? "";
    for (const line of lines) {
      if (line === "") {
        if (this.data.length > 0) {
          out.push({ event: this.event || "message", data: this.data.join("\n"), id: this.id });
        }
        this.event = "";
        this.data = [];
        this.id = null;
        continue;
      }
      if (line.startsWith(":")) continue; // a comment (the gateway's `: keepalive`)
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
      else if (field === "id" && !value.includes("\0")) this.id = value;
    }
    return out;
  }
}
