/**
 * Byte-level framing of the QEMU guest-agent channel, both directions.
 *
 * - Agent → host (what the client reads): one JSON object per line; a 0xFF byte (sent before the answer to
 *   `guest-sync-delimited`) means "forget any partial data". `LineDecoder` splits that.
 * - Host → agent (what an agent reads): JSON objects one after another, with or without newlines between them,
 *   possibly spread over several lines (qemu-ga's parser is a JSON stream, not a line reader); a 0xFF byte flushes
 *   the parser. `JsonObjectSplitter` finds where each top-level object ends without parsing it.
 *
 * Both are bounded: a line or an object over `maxBytes` is reported once and skipped, never accumulated.
 */

/** The sentinel byte: flushes the reader's parser state (invalid in UTF-8, so never part of a JSON text). */
export const DELIMITER = 0xff;
/** Default cap on one line / object: far above any real answer (guest-info is a few KiB). */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;
/** qemu's JSON parser refuses deeper nesting; so do we, before buffering further. */
export const MAX_NESTING = 1024;

const NL = 0x0a;
const CR = 0x0d;

export type LineEvent =
  /** a complete line, without its line ending; blank lines are not reported */
  | { kind: 'line'; text: string }
  /** a 0xFF byte: the partial line before it (discardedBytes long) was dropped */
  | { kind: 'delimiter'; discardedBytes: number }
  /** a line grew past the cap: it is skipped up to its end (reported once, when the cap is crossed) */
  | { kind: 'overflow'; discardedBytes: number };

/** Splits the agent's output into lines, honouring the 0xFF flush byte. */
export class LineDecoder {
  private parts: Buffer[] = [];
  private size = 0;
  /** inside a line that overflowed: drop bytes until its end */
  private skipping = false;

  constructor(readonly maxBytes: number = MAX_MESSAGE_BYTES) {}

  /** Bytes of the current partial line held in memory (never more than maxBytes). */
  get pendingBytes(): number {
    return this.size;
  }

  push(chunk: Buffer): LineEvent[] {
    const out: LineEvent[] = [];
    let pos = 0;
    // Cached positions of the next NL and 0xFF, so many short lines stay linear in the chunk size.
    let nl = -2;
    let ff = -2;
    while (pos < chunk.length) {
      if (nl !== -1 && nl < pos) nl = chunk.indexOf(NL, pos);
      if (ff !== -1 && ff < pos) ff = chunk.indexOf(DELIMITER, pos);
      const end = nl < 0 ? ff : ff < 0 ? nl : Math.min(nl, ff);
      if (end < 0) {
        this.append(chunk.subarray(pos), out);
        break;
      }
      this.append(chunk.subarray(pos, end), out);
      if (chunk[end] === DELIMITER) {
        out.push({ kind: 'delimiter', discardedBytes: this.size });
        this.reset();
      } else {
        this.endLine(out);
      }
      pos = end + 1;
    }
    return out;
  }

  /** Drops any partial line (e.g. after a timeout, before resynchronising). */
  reset(): void {
    this.parts = [];
    this.size = 0;
    this.skipping = false;
  }

  private append(seg: Buffer, out: LineEvent[]): void {
    if (seg.length === 0 || this.skipping) return;
    if (this.size + seg.length > this.maxBytes) {
      out.push({ kind: 'overflow', discardedBytes: this.size + seg.length });
      this.parts = [];
      this.size = 0;
      this.skipping = true;
      return;
    }
    // Copy: the chunk may be a pooled buffer that the stream reuses.
    this.parts.push(Buffer.from(seg));
    this.size += seg.length;
  }

  private endLine(out: LineEvent[]): void {
    if (this.skipping) {
      this.skipping = false;
      return;
    }
    let buf = this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts, this.size);
    this.parts = [];
    this.size = 0;
    if (buf.length > 0 && buf[buf.length - 1] === CR) buf = buf.subarray(0, buf.length - 1);
    const text = buf.toString('utf8');
    if (text.trim() !== '') out.push({ kind: 'line', text });
  }
}

export type SplitEvent =
  /** the text of one complete top-level JSON object or array (not yet parsed) */
  | { kind: 'value'; text: string }
  /** a top-level run of other characters (a scalar, a stray bracket, noise), cut at whitespace */
  | { kind: 'garbage'; text: string }
  /** a value or token over the cap or nested too deeply: skipped up to the next newline or 0xFF */
  | { kind: 'overflow'; reason: string }
  /** a 0xFF byte: any partial value was dropped */
  | { kind: 'flush'; discardedBytes: number };

type Mode = 'idle' | 'value' | 'token' | 'skip';

function isSpace(b: number): boolean {
  return b === 0x20 || b === 0x09 || b === NL || b === CR;
}

/**
 * Finds the boundaries of the JSON objects a client sends, tracking only strings, escapes and bracket depth
 * (the structural bytes are ASCII, so multi-byte UTF-8 never confuses it). Parsing is left to JSON.parse.
 */
export class JsonObjectSplitter {
  private mode: Mode = 'idle';
  private depth = 0;
  private inString = false;
  private escape = false;
  private parts: Buffer[] = [];
  private size = 0;

  constructor(
    readonly maxBytes: number = MAX_MESSAGE_BYTES,
    readonly maxNesting: number = MAX_NESTING,
  ) {}

  get pendingBytes(): number {
    return this.size;
  }

  push(chunk: Buffer): SplitEvent[] {
    const out: SplitEvent[] = [];
    // Start in this chunk of the value or token being recorded (0: it began in an earlier chunk).
    let segStart = this.mode === 'value' || this.mode === 'token' ? 0 : -1;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i];
      if (b === DELIMITER) {
        const discarded = this.size + (segStart >= 0 ? i - segStart : 0);
        this.reset();
        segStart = -1;
        out.push({ kind: 'flush', discardedBytes: discarded });
        continue;
      }
      switch (this.mode) {
        case 'skip':
          if (b === NL) this.mode = 'idle';
          continue;
        case 'idle':
          if (isSpace(b)) continue;
          segStart = i;
          if (b === 0x7b || b === 0x5b) {
            this.mode = 'value';
            this.depth = 1;
          } else {
            this.mode = 'token';
          }
          break;
        case 'token':
          if (isSpace(b) || b === 0x7b || b === 0x5b) {
            out.push({ kind: 'garbage', text: this.take(chunk, segStart, i) });
            segStart = -1;
            this.mode = 'idle';
            i--; // this byte starts whatever comes next
            continue;
          }
          break;
        case 'value':
          if (this.inString) {
            if (this.escape) this.escape = false;
            else if (b === 0x5c) this.escape = true;
            else if (b === 0x22) this.inString = false;
          } else if (b === 0x22) {
            this.inString = true;
          } else if (b === 0x7b || b === 0x5b) {
            if (++this.depth > this.maxNesting) {
              out.push({ kind: 'overflow', reason: `nesting deeper than ${this.maxNesting}` });
              this.startSkip(b);
              segStart = -1;
              continue;
            }
          } else if (b === 0x7d || b === 0x5d) {
            if (--this.depth === 0) {
              out.push({ kind: 'value', text: this.take(chunk, segStart, i + 1) });
              segStart = -1;
              this.mode = 'idle';
              continue;
            }
          }
          break;
      }
      // Recording a value or token: enforce the cap before it grows any further.
      if (this.size + (i - segStart + 1) > this.maxBytes) {
        out.push({ kind: 'overflow', reason: `more than ${this.maxBytes} bytes` });
        this.startSkip(b);
        segStart = -1;
      }
    }
    if (segStart >= 0) {
      this.parts.push(Buffer.from(chunk.subarray(segStart)));
      this.size += chunk.length - segStart;
    }
    return out;
  }

  reset(): void {
    this.mode = 'idle';
    this.depth = 0;
    this.inString = false;
    this.escape = false;
    this.parts = [];
    this.size = 0;
  }

  private startSkip(current: number): void {
    this.reset();
    this.mode = current === NL ? 'idle' : 'skip';
  }

  private take(chunk: Buffer, start: number, end: number): string {
    const tail = chunk.subarray(start, end);
    const buf = this.parts.length === 0 ? tail : Buffer.concat([...this.parts, tail]);
    this.parts = [];
    this.size = 0;
    this.depth = 0;
    this.inString = false;
    this.escape = false;
    return buf.toString('utf8');
  }
}
