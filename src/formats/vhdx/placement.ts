/**
 * Where the data of every allocated BAT entry lies, checked against everything else in the file: the
 * header section, the log, every region of the region table, the end of the file, and every other
 * allocated entry (MS-VHDX 2.5: payload and sector bitmap blocks each have space of their own). A hostile
 * or damaged entry that points into the metadata or the BAT would otherwise turn guest writes into
 * metadata (or metadata updates into guest data).
 *
 * One pass over the BAT, in 1 MiB pieces, with a bit per MiB of file: everything in the file is 1 MiB
 * aligned, so an entry's space is a run of MiB units. Memory is bounded by the file's extent (16 MiB of
 * bits for the 128 TiB limit), not by the number of entries; a second pass runs only when two entries
 * share space, to name who holds it first.
 */
import os from 'node:os';
import { guidEquals, guidToString, type Guid } from '../../util/guid.js';
import { isAllZero } from '../../util/zero.js';
import type { Geometry } from './bat.js';
import { HEADER_SECTION_SIZE, MAX_FILE_OFFSET, MiB, REGION_BAT, REGION_METADATA, SB_PRESENT } from './constants.js';

/** A fixed structure of the file: the header section, the log, a region. */
export interface Span {
  start: number;
  end: number;
  name: string;
}

/** The file's fixed structures, sorted by start. `log` only when the header describes a usable one. */
export function structureSpans(
  log: { offset: number; length: number } | undefined,
  regions: readonly { guid: Guid; fileOffset: number; length: number }[],
): Span[] {
  const spans: Span[] = [{ start: 0, end: HEADER_SECTION_SIZE, name: 'the header section' }];
  if (log && log.length > 0) spans.push({ start: log.offset, end: log.offset + log.length, name: 'the log' });
  for (const r of regions) {
    const name = guidEquals(r.guid, REGION_BAT)
      ? 'the BAT region'
      : guidEquals(r.guid, REGION_METADATA)
        ? 'the metadata region'
        : `region ${guidToString(r.guid)}`;
    spans.push({ start: r.fileOffset, end: r.fileOffset + r.length, name });
  }
  return spans.sort((a, b) => a.start - b.start || a.end - b.end);
}

/** "the metadata region [2097152, 3145728)". */
export function describeSpan(s: Span): string {
  return `${s.name} [${s.start}, ${s.end})`;
}

/** One allocated BAT entry: a payload block or a sector bitmap block. */
export interface EntryRef {
  /** Index in the BAT. */
  index: number;
  bitmap: boolean;
  /** The payload block number, or the chunk number of a sector bitmap. */
  number: number;
  state: number;
  offset: number;
  /** Bytes of file its data occupies from `offset` (the part of a block inside the virtual disk; 1 MiB for a bitmap). */
  extent: number;
}

/** "block 7", "the sector bitmap of chunk 0". */
export function describeEntry(e: Pick<EntryRef, 'bitmap' | 'number'>): string {
  return e.bitmap ? `the sector bitmap of chunk ${e.number}` : `block ${e.number}`;
}

export type Problem =
  /** Overlaps a fixed structure (the header section, the log, a region). */
  | { kind: 'structure'; span: Span }
  /** Claims space an earlier BAT entry holds (`with`: that entry, when it could be named). */
  | { kind: 'shared'; start: number; end: number; with?: EntryRef }
  /** Reaches past the end of the file by `missing` bytes (truncated). */
  | { kind: 'eof'; missing: number }
  /** Reaches past 128 TiB, where no valid file has data. */
  | { kind: 'limit' };

export interface Damaged {
  entry: EntryRef;
  problems: Problem[];
  /** None of its bytes holds data it could own: all lie in structures, past the end, or beyond the limit. */
  lost: boolean;
}

/** "points into the metadata region [..]; shares [a, b) with block 3; extends 4096 bytes past the end of the file". */
export function describeProblems(d: Damaged, fileSize: number): string {
  return d.problems
    .map((p) => {
      switch (p.kind) {
        case 'structure':
          return `points into ${describeSpan(p.span)}`;
        case 'shared':
          return `shares file space [${p.start}, ${p.end}) with ${p.with ? describeEntry(p.with) : 'another BAT entry'}`;
        case 'eof':
          return p.missing >= d.entry.extent
            ? `lies past the end of the file (${fileSize} bytes)`
            : `extends ${p.missing} bytes past the end of the file (${fileSize} bytes)`;
        case 'limit':
          return `lies beyond ${MAX_FILE_OFFSET} bytes, where no VHDX has data`;
      }
    })
    .join('; ');
}

/** Problems of a whole structure (not of one entry) that keep a file from being written. */
export interface StructureProblem {
  /** `bat-cut`: the file ends inside the BAT's entries; `past-eof`: a structure reaches past the end; `limit`: past 128 TiB. */
  kind: 'bat-cut' | 'past-eof' | 'limit';
  code: 'VHDX_TRUNCATED' | 'VHDX_CORRUPT';
  message: string;
}

/** Bits over MiB units of the file. */
class UnitBits {
  readonly bits: Uint8Array;
  constructor(readonly units: number) {
    this.bits = new Uint8Array(Math.ceil(units / 8));
  }
  get(u: number): boolean {
    return u < this.units && (this.bits[u >>> 3] & (1 << (u & 7))) !== 0;
  }
  set(u: number): void {
    if (u < this.units) this.bits[u >>> 3] |= 1 << (u & 7);
  }
}

export interface ScanSource {
  geometry: Geometry;
  /** The file size damage is judged against (what exists). */
  fileSize: number;
  spans: Span[];
  /** Reads BAT entries [first, first + dst.length / 8) as stored, 8 bytes each. */
  readBat(dst: Buffer, first: number): Promise<void>;
}

export interface ScanOptions {
  /** Called for each damaged entry, in BAT order, after the piece of the BAT holding it was scanned. */
  onDamaged?: (d: Damaged) => Promise<void> | void;
  /** Keep the map of occupied units (writers reuse stale locations only where it says free). */
  keepOccupied?: boolean;
  /** How many damaged entries to keep in `listed` (default 1000). */
  listLimit?: number;
}

const ENTRIES_PER_PIECE = MiB / 8;
/** Units whose first holder a second pass records (to name the other side of shared space). */
const MAX_NAMED_UNITS = 65536;

/** The result of a scan: damage found, and what reads and writes check against afterwards. */
export class Placement {
  damagedCount = 0;
  readonly listed: Damaged[] = [];
  /** Entries reaching past the end of the file: how many, and where the furthest one ends. */
  truncated = { entries: 0, end: 0 };
  /** The end of the furthest allocated entry below the limit, and of the furthest one not lost. */
  presentEnd = 0;
  keptEnd = 0;
  readonly structureProblems: StructureProblem[] = [];
  /** Disjoint pieces of the structures, sorted, each with one structure covering it. */
  private readonly pieces: Piece[];
  private occupied: UnitBits | undefined;
  private conflicts: UnitBits | undefined;

  private constructor(
    readonly fileSize: number,
    readonly spans: Span[],
  ) {
    this.pieces = disjointPieces(spans);
  }

  /** Nothing stands in the way of writing: no damaged entry, no damaged structure. */
  get clean(): boolean {
    return this.damagedCount === 0 && this.structureProblems.length === 0;
  }

  static async scan(src: ScanSource, opts: ScanOptions = {}): Promise<Placement> {
    const p = new Placement(src.fileSize, src.spans);
    const g = src.geometry;
    const listLimit = opts.listLimit ?? 1000;
    // A file shorter than its structures was truncated (a region extended past the end would also place
    // new blocks far away); one whose BAT is cut off has lost entries. Structures past 128 TiB are corrupt.
    const batSpan = src.spans.find((s) => s.name === 'the BAT region');
    for (const s of src.spans) {
      if (s.end > MAX_FILE_OFFSET) {
        p.structureProblems.push({
          kind: 'limit',
          code: 'VHDX_CORRUPT',
          message: `${describeSpan(s)} lies beyond ${MAX_FILE_OFFSET} bytes`,
        });
      } else if (s === batSpan && s.start + g.batEntries * 8 > src.fileSize) {
        p.structureProblems.push({
          kind: 'bat-cut',
          code: 'VHDX_TRUNCATED',
          message: `the BAT's ${g.batEntries} entries end at ${s.start + g.batEntries * 8}, past the end of the file (${src.fileSize} bytes): entries were lost`,
        });
      } else if (s.end > src.fileSize) {
        p.structureProblems.push({
          kind: 'past-eof',
          code: 'VHDX_TRUNCATED',
          message: `${describeSpan(s)} extends past the end of the file (${src.fileSize} bytes)`,
        });
      }
    }
    const limitUnits = MAX_FILE_OFFSET / MiB;
    const spanEnd = src.spans.reduce((m, s) => Math.max(m, Math.min(s.end, MAX_FILE_OFFSET)), 0);
    const units = Math.min(limitUnits, Math.ceil(Math.max(src.fileSize, spanEnd) / MiB));
    const occupied = new UnitBits(units);
    for (const s of src.spans) {
      for (let u = Math.floor(s.start / MiB); u < Math.ceil(Math.min(s.end, MAX_FILE_OFFSET) / MiB); u++)
        occupied.set(u);
    }
    p.occupied = occupied;

    const cr1 = g.chunkRatio + 1;
    const buf = Buffer.alloc(Math.min(MiB, g.batEntries * 8));
    const lows = lowWords(buf);
    // For the inline case: blocks before the last (which may be short), whole units inside the file.
    const lastWholeBlock = g.dataBlocks - 1;
    const unitsPerBlock = g.blockSize / MiB;
    const wholeUnits = Math.min(Math.floor(src.fileSize / MiB), occupied.units);
    let fastEndUnits = 0;
    // Entries past the end of the file read as zeros (NOT_PRESENT; a cut BAT is reported above): a forged
    // size cannot make a small file cost a pass over 64 Mi entries.
    const entries = entriesInFile(g, batSpan, src.fileSize);
    for (let first = 0; first < entries; first += ENTRIES_PER_PIECE) {
      const n = Math.min(ENTRIES_PER_PIECE, entries - first);
      const view = buf.subarray(0, n * 8);
      await src.readBat(view, first);
      if (isAllZero(view)) continue; // a piece of a sparse disk's BAT: nothing allocated
      const found: Damaged[] = [];
      // The common case inline (a payload block inside the file on free units claims them): 64 Mi entries
      // cost seconds otherwise. Everything else goes through entryAt and place.
      const bits = occupied.bits;
      let chunk = Math.floor(first / cr1);
      let pos = first - chunk * cr1;
      for (let i = 0; i < n; i++, pos === g.chunkRatio ? ((pos = 0), chunk++) : pos++) {
        const lo = lows ? lows[2 * i] : view.readUInt32LE(i * 8);
        if ((lo & 6) !== 6) continue; // only states 6 and 7 allocate space
        const hi = lows ? lows[2 * i + 1] : view.readUInt32LE(i * 8 + 4);
        if (pos !== g.chunkRatio && chunk * g.chunkRatio + pos < lastWholeBlock) {
          const u0 = (lo >>> 20) + hi * 4096;
          const u1 = u0 + unitsPerBlock;
          if (u1 <= wholeUnits) {
            let free = true;
            for (let u = u0; u < u1 && free; u++) free = (bits[u >>> 3] & (1 << (u & 7))) === 0;
            if (free) {
              for (let u = u0; u < u1; u++) bits[u >>> 3] |= 1 << (u & 7);
              if (u1 > fastEndUnits) fastEndUnits = u1;
              continue;
            }
          }
        }
        const entry = p.entryAt(g, first + i, lo, hi, cr1);
        if (!entry) continue;
        const d = p.place(entry, occupied);
        if (!d) continue;
        p.damagedCount++;
        if (d.problems.some((x) => x.kind === 'eof')) {
          p.truncated.entries++;
          p.truncated.end = Math.max(p.truncated.end, entry.offset + entry.extent);
        }
        found.push(d);
        if (p.listed.length < listLimit) p.listed.push(d);
      }
      if (opts.onDamaged) for (const d of found) await opts.onDamaged(d);
    }
    p.presentEnd = Math.max(p.presentEnd, fastEndUnits * MiB);
    p.keptEnd = Math.max(p.keptEnd, fastEndUnits * MiB);
    if (p.conflicts) await p.nameHolders(src, cr1);
    if (!opts.keepOccupied) p.occupied = undefined;
    return p;
  }

  /** The entry at BAT `index` when it is an allocated one the engine uses, else undefined. */
  private entryAt(g: Geometry, index: number, lo: number, hi: number, cr1: number): EntryRef | undefined {
    const state = lo & 7;
    const chunk = Math.floor(index / cr1);
    const pos = index - chunk * cr1;
    const bitmap = pos === g.chunkRatio;
    // Sector bitmaps exist only in differencing disks (elsewhere check reports a present one); their state 7 is unknown.
    if (bitmap && (state !== SB_PRESENT || !g.hasParent || chunk >= g.bitmapBlocks)) return undefined;
    const block = chunk * g.chunkRatio + pos;
    if (!bitmap && block >= g.dataBlocks) return undefined; // padding of a differencing BAT: never read
    const offset = ((lo >>> 20) + hi * 4096) * MiB;
    const extent = bitmap ? MiB : Math.min(g.blockSize, g.virtualSize - block * g.blockSize);
    return { index, bitmap, number: bitmap ? chunk : block, state, offset, extent };
  }

  /** Claims the entry's units; returns its damage, if any. */
  private place(e: EntryRef, occupied: UnitBits): Damaged | undefined {
    const end = e.offset + e.extent;
    if (end > MAX_FILE_OFFSET) return { entry: e, problems: [{ kind: 'limit' }], lost: true };
    this.presentEnd = Math.max(this.presentEnd, end);
    const problems: Problem[] = [];
    let shared: { kind: 'shared'; start: number; end: number } | undefined;
    const first = e.offset / MiB;
    const last = Math.min(Math.ceil(end / MiB), occupied.units);
    for (let u = first; u < last; u++) {
      if (!occupied.get(u)) {
        occupied.set(u);
        continue;
      }
      const span = this.spanAt(u * MiB);
      if (span) {
        if (!problems.some((x) => x.kind === 'structure' && x.span === span))
          problems.push({ kind: 'structure', span });
        continue;
      }
      (this.conflicts ??= new UnitBits(occupied.units)).set(u);
      const from = Math.max(e.offset, u * MiB);
      const to = Math.min(end, (u + 1) * MiB);
      if (!shared) problems.push((shared = { kind: 'shared', start: from, end: to }));
      else shared.end = to;
    }
    if (end > this.fileSize) problems.push({ kind: 'eof', missing: end - Math.max(e.offset, this.fileSize) });
    if (problems.length === 0) {
      this.keptEnd = Math.max(this.keptEnd, end);
      return undefined;
    }
    const lost = !shared && this.readableBytes(e.offset, e.extent) === 0;
    if (!lost) this.keptEnd = Math.max(this.keptEnd, end);
    return { entry: e, problems, lost };
  }

  /** Second pass: the first holder of each shared unit (bounded), named in the listed damage. */
  private async nameHolders(src: ScanSource, cr1: number): Promise<void> {
    const wanted = new Map<number, EntryRef | undefined>();
    for (const d of this.listed) {
      for (const x of d.problems)
        if (x.kind === 'shared' && wanted.size < MAX_NAMED_UNITS) wanted.set(Math.floor(x.start / MiB), undefined);
    }
    if (wanted.size === 0) return;
    const g = src.geometry;
    let open = wanted.size;
    const buf = Buffer.alloc(Math.min(MiB, g.batEntries * 8));
    const lows = lowWords(buf);
    const entries = entriesInFile(
      g,
      src.spans.find((s) => s.name === 'the BAT region'),
      src.fileSize,
    );
    for (let first = 0; first < entries && open > 0; first += ENTRIES_PER_PIECE) {
      const n = Math.min(ENTRIES_PER_PIECE, entries - first);
      const view = buf.subarray(0, n * 8);
      await src.readBat(view, first);
      for (let i = 0; i < n && open > 0; i++) {
        const lo = lows ? lows[2 * i] : view.readUInt32LE(i * 8);
        if ((lo & 6) !== 6) continue;
        const e = this.entryAt(g, first + i, lo, view.readUInt32LE(i * 8 + 4), cr1);
        if (!e || e.offset + e.extent > MAX_FILE_OFFSET) continue;
        for (let u = e.offset / MiB; u < Math.ceil((e.offset + e.extent) / MiB); u++) {
          if (wanted.has(u) && wanted.get(u) === undefined) {
            wanted.set(u, e);
            open--;
          }
        }
      }
    }
    for (const d of this.listed) {
      for (const x of d.problems) {
        if (x.kind !== 'shared') continue;
        const holder = wanted.get(Math.floor(x.start / MiB));
        if (holder && holder.index !== d.entry.index) x.with = holder;
      }
    }
  }

  /** Bytes of [offset, offset+length) inside the file and outside every structure. */
  readableBytes(offset: number, length: number): number {
    let n = 0;
    for (const [a, b] of this.readablePieces(offset, length)) n += b - a;
    return n;
  }

  /** The pieces of [offset, offset+length) inside the file and outside every structure, in order. */
  readablePieces(offset: number, length: number): [number, number][] {
    const end = Math.min(offset + length, this.fileSize);
    const out: [number, number][] = [];
    let at = offset;
    for (let i = this.pieceAfter(offset); i < this.pieces.length && at < end; i++) {
      const s = this.pieces[i];
      if (s.start >= end) break;
      if (s.start > at) out.push([at, s.start]);
      at = Math.max(at, s.end);
    }
    if (at < end) out.push([at, end]);
    return out;
  }

  /** The index of the first piece ending after `pos` (pieces.length when none). */
  private pieceAfter(pos: number): number {
    const ps = this.pieces;
    let lo = 0;
    let hi = ps.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (ps[mid].end <= pos) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** The structure covering file offset `pos`, if any. */
  private spanAt(pos: number): Span | undefined {
    const p = this.pieces[this.pieceAfter(pos)];
    return p && p.start <= pos ? p.span : undefined;
  }

  /** The first structure [offset, offset+length) overlaps, if any. */
  structureIn(offset: number, length: number): Span | undefined {
    const p = this.pieces[this.pieceAfter(offset)];
    return p && p.start < offset + length ? p.span : undefined;
  }

  /**
   * Why the data of an entry at [offset, offset+length) must not be used, or undefined: it overlaps a
   * structure, lies beyond the limit, or shares space with another entry (known after a scan).
   * Cheap: what reads and writes ask about the block they touch.
   */
  problemAt(offset: number, length: number): string | undefined {
    if (offset + length > MAX_FILE_OFFSET) return `lies beyond ${MAX_FILE_OFFSET} bytes, where no VHDX has data`;
    const s = this.structureIn(offset, length);
    if (s) return `points into ${describeSpan(s)}`;
    if (this.conflicts) {
      for (let u = Math.floor(offset / MiB); u < Math.ceil((offset + length) / MiB); u++) {
        if (this.conflicts.get(u)) return `shares file space [${u * MiB}, ${(u + 1) * MiB}) with another BAT entry`;
      }
    }
    return undefined;
  }

  /**
   * Whether [offset, offset+length) is free for a writer to reuse (a fixed disk's stale block location):
   * inside the scanned file, outside every structure and every allocated entry. Claims it when free.
   */
  claimIfFree(offset: number, length: number): boolean {
    const occ = this.occupied;
    if (!occ || offset % MiB !== 0) return false;
    const first = offset / MiB;
    const last = Math.ceil((offset + length) / MiB);
    if (last > occ.units) return false;
    for (let u = first; u < last; u++) if (occ.get(u)) return false;
    for (let u = first; u < last; u++) occ.set(u);
    return true;
  }
}

/**
 * The buffer as 32-bit words when the host is little-endian and the buffer aligned (entries' low words at
 * even indexes): a scan of 64 Mi entries then costs a fraction of a second. Undefined otherwise.
 */
export function lowWords(buf: Buffer): Uint32Array | undefined {
  if (os.endianness() !== 'LE' || buf.byteOffset % 4 !== 0) return undefined;
  return new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
}

/** How many of the BAT's entries lie inside the file. */
function entriesInFile(g: Geometry, bat: Span | undefined, fileSize: number): number {
  if (!bat) return g.batEntries;
  return Math.max(0, Math.min(g.batEntries, Math.floor((fileSize - bat.start) / 8)));
}

interface Piece {
  start: number;
  end: number;
  span: Span;
}

/** Disjoint pieces of `spans` (sorted by start; they may overlap), each with the first structure covering it. */
function disjointPieces(spans: readonly Span[]): Piece[] {
  const cuts = [...new Set(spans.flatMap((s) => [s.start, s.end]))].sort((a, b) => a - b);
  const out: Piece[] = [];
  let k = 0; // spans before k start at or before the current cut
  let active: Span[] = [];
  for (let i = 0; i + 1 < cuts.length; i++) {
    const a = cuts[i];
    const b = cuts[i + 1];
    while (k < spans.length && spans[k].start <= a) active.push(spans[k++]);
    active = active.filter((s) => s.end > a);
    const cover = active.find((s) => s.end >= b);
    if (!cover) continue;
    const last = out[out.length - 1];
    if (last && last.end === a && last.span === cover) last.end = b;
    else out.push({ start: a, end: b, span: cover });
  }
  return out;
}
