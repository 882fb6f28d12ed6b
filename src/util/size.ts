import { InvalidArgumentError } from '../errors.js';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/** Parses `512`, `64K`, `32M`, `10G`, `2T` (also `64KiB`, `64kb`) into bytes. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new InvalidArgumentError(`${what} "${text}" is not a size (examples: 512, 64K, 32M, 10G, 2T)`);
  const value = Number(m[1]) * UNITS[m[2].toUpperCase()];
  if (!Number.isSafeInteger(value)) throw new InvalidArgumentError(`${what} "${text}" is not a whole number of bytes`);
  return value;
}

/** Parses a non-negative integer byte offset/length (plain digits or a size with a unit). */
export function parseByteCount(text: string, what: string): number {
  return parseSize(text, what);
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    i++;
  }
  if (i === 0 && bytes >= 1024) {
    // not a round number: show one decimal in the best unit
    let u = 0;
    let x = bytes;
    while (x >= 1024 && u < units.length - 1) {
      x /= 1024;
      u++;
    }
    return `${x.toFixed(1)} ${units[u]}`;
  }
  return `${v} ${units[i]}`;
}
