import { randomBytes } from 'node:crypto';

/**
 * GUIDs as 16 raw bytes in Microsoft mixed-endian order (Data1 u32 LE, Data2 u16 LE, Data3 u16 LE,
 * 8 raw bytes), which is how VHDX stores them. Text form is lowercase 8-4-4-4-12.
 */
export type Guid = Buffer;

export const GUID_ZERO: Guid = Buffer.alloc(16);

export function newGuid(): Guid {
  const b = randomBytes(16);
  // RFC 4122 version 4 in the text form: Data3's high nibble lives in byte 7 of the mixed-endian layout.
  b[7] = (b[7] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return b;
}

export function guidToString(g: Uint8Array): string {
  const h = (i: number) => g[i].toString(16).padStart(2, '0');
  return (
    h(3) +
    h(2) +
    h(1) +
    h(0) +
    '-' +
    h(5) +
    h(4) +
    '-' +
    h(7) +
    h(6) +
    '-' +
    h(8) +
    h(9) +
    '-' +
    h(10) +
    h(11) +
    h(12) +
    h(13) +
    h(14) +
    h(15)
  );
}

const GUID_TEXT = /^\{?([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})\}?$/i;

/** Parses `xxxxxxxx-xxxx-...` with or without braces; returns undefined when malformed. */
export function parseGuid(text: string): Guid | undefined {
  const m = GUID_TEXT.exec(text.trim());
  if (!m) return undefined;
  const hex = m.slice(1).join('');
  const raw = Buffer.from(hex, 'hex');
  const g = Buffer.alloc(16);
  g[0] = raw[3];
  g[1] = raw[2];
  g[2] = raw[1];
  g[3] = raw[0];
  g[4] = raw[5];
  g[5] = raw[4];
  g[6] = raw[7];
  g[7] = raw[6];
  raw.copy(g, 8, 8, 16);
  return g;
}

export function guidFromString(text: string): Guid {
  const g = parseGuid(text);
  if (!g) throw new Error(`malformed GUID constant ${text}`);
  return g;
}

export function guidEquals(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(a, b) === 0;
}

export function isZeroGuid(g: Uint8Array): boolean {
  return guidEquals(g, GUID_ZERO);
}
