/**
 * The tracking audit of an incremental (DESIGN.md "Invariants" 1): a seeded random sample of the chunks change
 * tracking calls unchanged is re-read from the same snapshot export, named as the repository names chunks, and
 * compared with the previous restore point's index. Any difference is a change tracking missed; the caller then
 * distrusts the tracker and reads the disk in full. The sample is a pure function of (seed, disk id, slot count,
 * changed slots, sample size), so a run's samples can be replayed from the seed its log and manifest record.
 */
import { createHash } from 'node:crypto';
import type { NbdClient } from '../nbd/client.js';
import type { DiskAudit, DiskIndex } from '../repository/index.js';
import { TidemarkError } from '../errors.js';
import { forEachBounded } from '../util/bounded.js';
import { isAllZero } from '../util/zero.js';
import { CONTEXT_BASE_ALLOCATION, STATE_ZERO } from '../nbd/protocol.js';

/** What to audit: nothing, a sample (a fraction of the disk's chunks), or every chunk tracking calls unchanged. */
export type AuditMode = { kind: 'off' } | { kind: 'sample'; rate: number } | { kind: 'full' };

export const DEFAULT_AUDIT_RATE = 0.01;
export const DEFAULT_AUDIT: AuditMode = { kind: 'sample', rate: DEFAULT_AUDIT_RATE };
/** A sample has at least this many chunks (all of them when fewer are unchanged). */
export const MIN_AUDIT_SAMPLE = 16;
/**
 * The default time budget of a sampled audit, per disk, counted from when the disk's changed chunks are all read
 * (the audit runs alongside them): this share of the time they took, but never less than the floor (an
 * incremental with little to read still gets its sample checked).
 */
export const AUDIT_TIME_SHARE = 0.1;
export const AUDIT_TIME_FLOOR_MS = 2000;

/** The audit figures of one disk, as the run summary and the manifest hold them (fields: manifest.ts). */
export type AuditResult = DiskAudit;

/** `--audit`: `off`, `full`, a fraction in (0, 1] (`0.01`) or a percentage in (0, 100] (`1%`). */
export function parseAuditMode(text: string): AuditMode {
  const t = text.trim().toLowerCase();
  if (t === 'off') return { kind: 'off' };
  if (t === 'full') return { kind: 'full' };
  const pct = t.endsWith('%');
  const num = pct ? t.slice(0, -1) : t;
  const value = /^(\d+(\.\d*)?|\.\d+)(e-?\d+)?$/.test(num) ? Number(num) / (pct ? 100 : 1) : NaN;
  if (!(value > 0 && value <= 1)) {
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `--audit must be off, full, a fraction in (0, 1] such as 0.01, or a percentage such as 1%, not "${text}"`,
    );
  }
  return { kind: 'sample', rate: value };
}

/** A rate as a percentage for people: 0.01 -> "1%", 0.07 -> "7%". */
export function formatRate(rate: number): string {
  return `${Number((rate * 100).toPrecision(6))}%`;
}

/** `--audit-time SECONDS`: a positive number of seconds, as milliseconds. */
export function parseAuditTime(text: string): number {
  const t = text.trim();
  const s = /^(\d+(\.\d*)?|\.\d+)$/.test(t) ? Number(t) : NaN;
  if (!(s > 0) || !Number.isFinite(s)) {
    throw new TidemarkError('INVALID_ARGUMENT', `--audit-time must be a positive number of seconds, not "${text}"`);
  }
  return s * 1000;
}

/** `--audit-seed N`: an integer from 0 to 2^32 - 1. */
export function parseAuditSeed(text: string): number {
  const t = text.trim();
  const n = /^\d{1,10}$/.test(t) ? Number(t) : NaN;
  if (!(n >= 0 && n <= 0xffffffff)) {
    throw new TidemarkError('INVALID_ARGUMENT', `--audit-seed must be an integer from 0 to 4294967295, not "${text}"`);
  }
  return n;
}

/** How many chunks a sampled audit checks: `rate` of the disk's chunks, at least 16, at most all unchanged ones. */
export function sampleSize(mode: AuditMode, slotCount: number, unchanged: number): number {
  if (mode.kind === 'off') return 0;
  if (mode.kind === 'full') return unchanged;
  return Math.min(unchanged, Math.max(MIN_AUDIT_SAMPLE, Math.ceil(mode.rate * slotCount)));
}

/** The seed of one disk's sample: the run's seed mixed with the disk's id (disks of a run sample independently). */
export function diskSeed(seed: number, diskId: string): number {
  return createHash('sha256')
    .update(`${seed >>> 0}:${diskId}`)
    .digest()
    .readUInt32LE(0);
}

/** mulberry32: small, fast, and the same sequence on every platform. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * `n` distinct slots of [0, slotCount) outside `changed` (sorted, distinct), uniformly at random, in the random
 * order they were drawn (a prefix of the answer is itself a uniform sample: the time bound keeps it honest).
 * Deterministic in its arguments.
 */
export function auditSample(seed: number, slotCount: number, changed: readonly number[], n: number): number[] {
  const isChanged = new Uint8Array(slotCount);
  for (const c of changed) if (c >= 0 && c < slotCount) isChanged[c] = 1;
  const unchanged = slotCount - changed.filter((c) => c >= 0 && c < slotCount).length;
  const want = Math.max(0, Math.min(n, unchanged));
  const rand = prng(seed);
  const out: number[] = [];
  if (want * 4 <= unchanged) {
    // Sparse: draw slots and skip changed or repeated ones (few draws: at least 3 of 4 are fresh).
    const picked = new Set<number>();
    while (out.length < want) {
      const s = Math.floor(rand() * slotCount);
      if (isChanged[s] || picked.has(s)) continue;
      picked.add(s);
      out.push(s);
    }
    return out;
  }
  // Dense: a partial Fisher–Yates shuffle of the unchanged slots.
  const pool = new Uint32Array(unchanged);
  for (let s = 0, k = 0; s < slotCount; s++) if (!isChanged[s]) pool[k++] = s;
  for (let i = 0; i < want; i++) {
    const j = i + Math.floor(rand() * (unchanged - i));
    const t = pool[i];
    pool[i] = pool[j];
    pool[j] = t;
    out.push(pool[i]);
  }
  return out;
}

/** Every slot of [0, slotCount) outside `changed` (sorted, distinct), in disk order. */
export function unchangedSlots(slotCount: number, changed: readonly number[]): number[] {
  const out: number[] = [];
  let c = 0;
  for (let s = 0; s < slotCount; s++) {
    while (c < changed.length && changed[c] < s) c++;
    if (c < changed.length && changed[c] === s) continue;
    out.push(s);
  }
  return out;
}

export interface CheckOptions {
  /** the disk's virtual size */
  size: number;
  /** the repository's chunk naming (SHA-256, or its keyed HMAC when encrypted): Repository.hashId */
  hashId: (data: Uint8Array) => string;
  /** reads in flight (default 8) */
  parallel?: number;
  /** performance.now() after which no further chunk is started (default: none); asked before every chunk */
  deadline?: number | (() => number);
  /** slots per batch (default 256) */
  batch?: number;
}

export interface CheckResult {
  checked: number;
  bytesRead: number;
  mismatches: number;
  firstMismatchOffset: number | null;
  stoppedEarly: boolean;
}

/** Block-status requests ask for at most this much (the length is 32 bits). */
const MAX_STATUS_REQUEST = 2 ** 31;

/**
 * The slots of `sorted` (distinct, ascending) that read as zeros all through, from the export's `base:allocation`
 * status; empty when the server offers no such context. A sample is scattered: each request spans from the first
 * slot not yet known to the farthest one within reach (one request can answer many slots of a sparse disk), and
 * the next starts at the first slot its answer did not reach, so there are never more requests than slots.
 */
export async function zeroSlots(
  nbd: NbdClient,
  sorted: readonly number[],
  chunkSize: number,
  size: number,
  parallel = 8,
): Promise<Set<number>> {
  const zero = new Set<number>();
  if (!nbd.hasContext(CONTEXT_BASE_ALLOCATION) || sorted.length === 0) return zero;
  const slotEnd = (s: number) => Math.min(size, (s + 1) * chunkSize);
  const walk = async (from: number, to: number) => {
    for (let i = from; i < to;) {
      const start = sorted[i] * chunkSize;
      let j = i;
      while (j + 1 < to && slotEnd(sorted[j + 1]) - start <= MAX_STATUS_REQUEST) j++;
      const extents = await nbd.blockStatus(start, slotEnd(sorted[j]) - start, CONTEXT_BASE_ALLOCATION);
      // Zero ranges (neighbours joined) of what the answer covers, contiguously from `start`.
      const zeros: [number, number][] = [];
      let reached = start;
      for (const e of extents) {
        if (e.offset > reached) break;
        const end = e.offset + e.length;
        if (end <= reached) continue;
        if ((e.flags & STATE_ZERO) !== 0) {
          const last = zeros[zeros.length - 1];
          if (last && last[1] === reached) last[1] = end;
          else zeros.push([reached, end]);
        }
        reached = end;
      }
      if (reached <= start) throw new TidemarkError('PROTOCOL_ERROR', `block status at ${start} answered nothing`);
      const first = i;
      let z = 0;
      for (; i <= j && slotEnd(sorted[i]) <= reached; i++) {
        const a = sorted[i] * chunkSize;
        const b = slotEnd(sorted[i]);
        while (z < zeros.length && zeros[z][1] < b) z++;
        if (z < zeros.length && zeros[z][0] <= a && zeros[z][1] >= b) zero.add(sorted[i]);
      }
      // The next request starts at the first slot the answer did not reach whole. Should an answer not cover even
      // its first slot, that slot is left out (it is read instead): every request settles at least one slot.
      if (i === first) i++;
    }
  };
  // Contiguous shares of the slots, walked side by side.
  const shares = Math.max(1, Math.min(parallel, sorted.length));
  const per = Math.ceil(sorted.length / shares);
  await Promise.all(Array.from({ length: shares }, (_, k) => walk(k * per, Math.min(sorted.length, (k + 1) * per))));
  return zero;
}

/**
 * Slots whose zero status is asked at once (one batch of block-status runs, then its reads): a sample goes in
 * small batches (the time bound may end it after any), a full audit in large ones (in disk order: long runs).
 */
const SAMPLE_BATCH = 256;
const FULL_BATCH = 4096;

/**
 * Compares the chunks at `slots` (in that order, a batch at a time) of the export with `expected`'s ids: a zero
 * slot must read all zeros (the export's `base:allocation` may say so without a read), any other must name the
 * same chunk. Stops at the first batch holding a mismatch, or when the deadline passes.
 */
export async function checkChunks(
  nbd: NbdClient,
  expected: DiskIndex,
  slots: readonly number[],
  opts: CheckOptions,
): Promise<CheckResult> {
  const cs = expected.chunkSize;
  const parallel = Math.max(1, opts.parallel ?? 8);
  const d = opts.deadline ?? Infinity;
  const late = typeof d === 'number' ? () => performance.now() > d : () => performance.now() > d();
  const r: CheckResult = { checked: 0, bytesRead: 0, mismatches: 0, firstMismatchOffset: null, stoppedEarly: false };
  const mismatch = (slot: number) => {
    r.mismatches++;
    const offset = slot * cs;
    if (r.firstMismatchOffset === null || offset < r.firstMismatchOffset) r.firstMismatchOffset = offset;
  };
  const buffers: Buffer[] = [];
  const size = Math.max(1, opts.batch ?? SAMPLE_BATCH);
  for (let b = 0; b < slots.length && r.mismatches === 0; b += size) {
    if (late()) {
      r.stoppedEarly = true;
      break;
    }
    const batch = slots.slice(b, b + size);
    const zero = await zeroSlots(
      nbd,
      [...batch].sort((x, y) => x - y),
      cs,
      opts.size,
      parallel,
    );
    const toRead: number[] = [];
    for (const slot of batch) {
      if (!zero.has(slot)) toRead.push(slot);
      else {
        r.checked++;
        if (expected.idAt(slot) !== null) mismatch(slot);
      }
    }
    // Slots handed out one at a time, none once a mismatch is found or the time bound passes.
    function* untilDone(): Generator<number> {
      for (const slot of toRead) {
        if (r.mismatches !== 0) return;
        if (late()) {
          r.stoppedEarly = true;
          return;
        }
        yield slot;
      }
    }
    await forEachBounded(untilDone(), Math.min(parallel, toRead.length), async (slot, w) => {
      const buf = (buffers[w] ??= Buffer.allocUnsafe(cs));
      const data = buf.subarray(0, expected.slotLength(slot));
      const { holeBytes } = await nbd.readInto(data, slot * cs);
      r.bytesRead += data.length;
      r.checked++;
      const actual = holeBytes === data.length || isAllZero(data) ? null : opts.hashId(data);
      if (actual !== expected.idAt(slot)) mismatch(slot);
    });
  }
  // A mismatch ends the audit on purpose; only the time bound counts as stopping early.
  if (r.mismatches > 0) r.stoppedEarly = false;
  return r;
}

export interface AuditDiskOptions {
  mode: Exclude<AuditMode, { kind: 'off' }>;
  /** the run's seed */
  seed: number;
  diskId: string;
  /** the disk's virtual size */
  size: number;
  /** slots change tracking reported changed (sorted, distinct) */
  changed: readonly number[];
  hashId: (data: Uint8Array) => string;
  parallel?: number;
  /**
   * A sampled audit's time bound: performance.now() after which no further chunk starts, asked before each
   * (it may move: the backup sets it once the changed chunks are read). A full audit has none.
   */
  deadline?: () => number;
  /** the budget to record (null: none) */
  timeBudgetMs?: number | null;
}

/**
 * Audits one incremental disk: `previous` holds the previous restore point's id in every slot outside `changed`
 * (so does the index being built: only the changed slots are replaced, and the audit may run alongside that).
 * Chunks are read from `nbd`, the same snapshot export the incremental reads.
 */
export async function auditDisk(nbd: NbdClient, previous: DiskIndex, o: AuditDiskOptions): Promise<AuditResult> {
  const started = performance.now();
  const unchanged = previous.slotCount - o.changed.length;
  const n = sampleSize(o.mode, previous.slotCount, unchanged);
  const slots =
    o.mode.kind === 'full'
      ? unchangedSlots(previous.slotCount, o.changed)
      : auditSample(diskSeed(o.seed, o.diskId), previous.slotCount, o.changed, n);
  const r = await checkChunks(nbd, previous, slots, {
    size: o.size,
    hashId: o.hashId,
    parallel: o.parallel,
    deadline: o.mode.kind === 'full' ? undefined : o.deadline,
    batch: o.mode.kind === 'full' ? FULL_BATCH : SAMPLE_BATCH,
  });
  return {
    mode: o.mode.kind,
    rate: o.mode.kind === 'sample' ? o.mode.rate : null,
    seed: o.seed,
    unchanged,
    sampled: slots.length,
    checked: r.checked,
    bytesRead: r.bytesRead,
    mismatches: r.mismatches,
    firstMismatchOffset: r.firstMismatchOffset,
    missedChunks: null,
    timeMs: performance.now() - started,
    timeBudgetMs: o.mode.kind === 'full' ? null : (o.timeBudgetMs ?? null),
    stoppedEarly: r.stoppedEarly,
  };
}

/** How many slots outside `changed` (sorted, distinct) hold different ids in two indexes of the same geometry. */
export function countDifferences(a: DiskIndex, b: DiskIndex, changed: readonly number[]): number {
  let n = 0;
  let c = 0;
  for (let s = 0; s < a.slotCount; s++) {
    while (c < changed.length && changed[c] < s) c++;
    if (c < changed.length && changed[c] === s) continue;
    if (!a.rawId(s).equals(b.rawId(s))) n++;
  }
  return n;
}
