/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78). Used by every VHDX checksum and by the tracking files.
 * Large inputs (a VHDX region table is 64 KiB, a tracking file's bitmaps tens of KiB, checked at every open) go
 * to the native addon (the CPU's CRC32 instruction); small ones stay on a slicing-by-8 table in JS, where the
 * call costs more than it saves. Without the addon (it did not load) the table does everything.
 */
import { nativeFs } from './native.js';

/** From this many bytes the native CRC is faster than the table, call included. */
const NATIVE_FROM = 512;

let native: ((data: Uint8Array, crc: number) => number) | null | undefined;
function nativeCrc(): ((data: Uint8Array, crc: number) => number) | null {
  if (native === undefined) {
    try {
      const addon = nativeFs();
      native = typeof addon.crc32c === 'function' ? addon.crc32c : null;
    } catch {
      native = null;
    }
  }
  return native;
}

const TABLES: Uint32Array[] = (() => {
  const tables = Array.from({ length: 8 }, () => new Uint32Array(256));
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    tables[0][n] = c >>> 0;
  }
  for (let n = 0; n < 256; n++) {
    let c = tables[0][n];
    for (let t = 1; t < 8; t++) {
      c = tables[0][c & 0xff] ^ (c >>> 8);
      tables[t][n] = c >>> 0;
    }
  }
  return tables;
})();

/** Continues a CRC-32C over `data`; start with `crc = 0`. */
export function crc32c(data: Uint8Array, crc = 0): number {
  const fast = data.length >= NATIVE_FROM ? nativeCrc() : null;
  return fast ? fast(data, crc) : crc32cTable(data, crc);
}

function crc32cTable(data: Uint8Array, crc: number): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = TABLES;
  let c = ~crc >>> 0;
  let i = 0;
  const n = data.length;
  while (n - i >= 8) {
    const lo = (c ^ (data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24))) >>> 0;
    c =
      t7[lo & 0xff] ^
      t6[(lo >>> 8) & 0xff] ^
      t5[(lo >>> 16) & 0xff] ^
      t4[lo >>> 24] ^
      t3[data[i + 4]] ^
      t2[data[i + 5]] ^
      t1[data[i + 6]] ^
      t0[data[i + 7]];
    i += 8;
  }
  while (i < n) c = t0[(c ^ data[i++]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

/** CRC-32C of `buf` computed as if the 4-byte field at `fieldOffset` were zero. */
export function crc32cWithZeroedField(buf: Uint8Array, fieldOffset: number): number {
  let c = crc32c(buf.subarray(0, fieldOffset));
  c = crc32c(new Uint8Array(4), c);
  return crc32c(buf.subarray(fieldOffset + 4), c);
}
