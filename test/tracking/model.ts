/**
 * Test support for the change-tracking tests: a seeded PRNG, a copy-on-write model of a virtual disk's
 * content (cheap snapshots at every seal), and the never-miss check itself (every byte that differs
 * between two contents lies inside the ranges a change query returned).
 */
import type { ChangeRange } from '../../src/tracking/tracker.js';
import { mulberry32Words } from '../helpers/random.js';

/** mulberry32 (helpers/prng.mjs), seeded: the same stream for the same seed. */
export function prng(seed: number): {
  next(): number;
  int(n: number): number;
  bytes(n: number): Buffer;
} {
  const word = mulberry32Words(seed);
  const next = () => word() / 4294967296;
  return {
    next,
    int: (n: number) => Math.floor(next() * n),
    bytes: (n: number) => {
      // Whole words through an aligned view (fast); the tail byte by byte, the low byte of a word each.
      const words = n >>> 2;
      const u32 = new Uint32Array(words + 1);
      for (let i = 0; i < words; i++) u32[i] = word();
      const b = Buffer.from(u32.buffer, 0, n);
      for (let i = words * 4; i < n; i++) b[i] = word() & 0xff;
      return b;
    },
  };
}

export const PAGE = 4096;
const ZERO_PAGE = Buffer.alloc(PAGE);

/**
 * The content of a virtual disk as an array of immutable 4 KiB pages: a write replaces the pages it
 * touches, so a snapshot is a shallow copy and two snapshots share every page nothing wrote since.
 */
export class PagedImage {
  pages: Buffer[];

  constructor(readonly size: number) {
    if (size % PAGE !== 0) throw new Error('the model wants a size that is a multiple of 4 KiB');
    this.pages = new Array<Buffer>(size / PAGE).fill(ZERO_PAGE);
  }

  /** Pages that are views of `content` (no copy): the image never writes into a page it did not make. */
  static view(content: Buffer): PagedImage {
    const m = new PagedImage(content.length);
    for (let p = 0; p < m.pages.length; p++) m.pages[p] = content.subarray(p * PAGE, (p + 1) * PAGE);
    return m;
  }

  static fromBuffer(content: Buffer): PagedImage {
    const m = new PagedImage(content.length);
    for (let p = 0; p < m.pages.length; p++) {
      const src = content.subarray(p * PAGE, (p + 1) * PAGE);
      m.pages[p] = src.equals(ZERO_PAGE) ? ZERO_PAGE : Buffer.from(src);
    }
    return m;
  }

  write(offset: number, data: Uint8Array): void {
    this.each(offset, data.length, (p, inPage, pos, n) => {
      const page = n === PAGE ? Buffer.allocUnsafe(PAGE) : Buffer.from(this.pages[p]);
      page.set(data.subarray(pos, pos + n), inPage);
      this.pages[p] = page;
    });
  }

  zero(offset: number, length: number): void {
    this.each(offset, length, (p, inPage, _pos, n) => {
      if (n === PAGE) this.pages[p] = ZERO_PAGE;
      else {
        const page = Buffer.from(this.pages[p]);
        page.fill(0, inPage, inPage + n);
        this.pages[p] = page;
      }
    });
  }

  read(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    this.each(offset, length, (p, inPage, pos, n) => this.pages[p].copy(out, pos, inPage, inPage + n));
    return out;
  }

  snapshot(): Buffer[] {
    return this.pages.slice();
  }

  toBuffer(): Buffer {
    return Buffer.concat(this.pages);
  }

  private each(offset: number, length: number, fn: (p: number, inPage: number, pos: number, n: number) => void) {
    for (let pos = 0; pos < length;) {
      const v = offset + pos;
      const p = Math.floor(v / PAGE);
      const inPage = v - p * PAGE;
      const n = Math.min(PAGE - inPage, length - pos);
      fn(p, inPage, pos, n);
      pos += n;
    }
  }
}

/**
 * The first byte that differs between two paged contents and lies outside `ranges` (sorted, disjoint),
 * or undefined: the never-miss property. Pages both snapshots share are equal by construction.
 */
export function firstUncoveredDifference(a: Buffer[], b: Buffer[], ranges: ChangeRange[]): number | undefined {
  let ri = 0;
  for (let p = 0; p < a.length; p++) {
    if (a[p] === b[p]) continue;
    const start = p * PAGE;
    const end = start + PAGE;
    while (ri < ranges.length && ranges[ri].offset + ranges[ri].length <= start) ri++;
    let pos = start;
    let k = ri;
    while (pos < end) {
      if (k < ranges.length && ranges[k].offset <= pos) {
        pos = Math.max(pos, ranges[k].offset + ranges[k].length);
        k++;
        continue;
      }
      const stop = k < ranges.length ? Math.min(end, ranges[k].offset) : end;
      const x = a[p].subarray(pos - start, stop - start);
      const y = b[p].subarray(pos - start, stop - start);
      if (!x.equals(y)) {
        for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return pos + i;
      }
      pos = stop;
    }
  }
  return undefined;
}

/** The same check over flat buffers (the crash test reads whole disks): compares only what is not covered. */
export function firstUncoveredDifferenceFlat(a: Buffer, b: Buffer, ranges: ChangeRange[]): number | undefined {
  let pos = 0;
  const check = (from: number, to: number): number | undefined => {
    if (to <= from) return undefined;
    const x = a.subarray(from, to);
    const y = b.subarray(from, to);
    if (x.equals(y)) return undefined;
    for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return from + i;
    return undefined;
  };
  for (const r of ranges) {
    const d = check(pos, r.offset);
    if (d !== undefined) return d;
    pos = Math.max(pos, r.offset + r.length);
  }
  return check(pos, a.length);
}

/**
 * What a change query may return: sorted, disjoint, coalesced (no two ranges touch), inside the window,
 * and granule-aligned except where the window clips them. Returns a problem, or undefined.
 */
export function rangeShapeProblem(
  ranges: ChangeRange[],
  granularity: number,
  offset: number,
  length: number,
  diskSize: number,
): string | undefined {
  let prevEnd = -1;
  for (const r of ranges) {
    const end = r.offset + r.length;
    if (!(r.length > 0)) return `empty range at ${r.offset}`;
    if (r.offset < offset || end > offset + length) return `range [${r.offset}, ${end}) outside the window`;
    if (r.offset <= prevEnd) return `range at ${r.offset} overlaps or touches the previous one (ends ${prevEnd})`;
    if (r.offset % granularity !== 0 && r.offset !== offset) return `range at ${r.offset} is not granule-aligned`;
    if (end % granularity !== 0 && end !== offset + length && end !== diskSize)
      return `range ending at ${end} is not granule-aligned`;
    prevEnd = end;
  }
  return undefined;
}

/** Granule-aligned, coalesced ranges of the granules for which `changed(g)` holds. */
export function granuleRanges(
  granules: number,
  granularity: number,
  diskSize: number,
  changed: (g: number) => boolean,
): ChangeRange[] {
  const out: ChangeRange[] = [];
  for (let g = 0; g < granules; g++) {
    if (!changed(g)) continue;
    const from = g * granularity;
    const to = Math.min(diskSize, from + granularity);
    const last = out[out.length - 1];
    if (last && last.offset + last.length === from) last.length += to - from;
    else out.push({ offset: from, length: to - from });
  }
  return out;
}

export function totalBytes(ranges: ChangeRange[]): number {
  return ranges.reduce((n, r) => n + r.length, 0);
}
