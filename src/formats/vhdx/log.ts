/**
 * The metadata log (MS-VHDX 2.3): entries as decode/encode pairs, the search for the active sequence
 * (2.3.3, followed step by step rather than QEMU's shortcuts), and the replay plan it yields.
 */
import { VhdxCorruptError } from '../../errors.js';
import { crc32cWithZeroedField } from '../../util/crc32c.js';
import { guidEquals, type Guid } from '../../util/guid.js';
import {
  HEADER_OFFSETS,
  HEADER_SIZE,
  LOG_SECTOR,
  MAX_FILE_OFFSET,
  SIG_DATA_DESC,
  SIG_DATA_SECTOR,
  SIG_LOG_ENTRY,
  SIG_ZERO_DESC,
} from './constants.js';

export type LogOp =
  { kind: 'data'; fileOffset: number; data: Buffer } | { kind: 'zero'; fileOffset: number; length: number };

export interface LogEntry {
  position: number;
  entryLength: number;
  tail: number;
  sequenceNumber: bigint;
  logGuid: Guid;
  flushedFileOffset: number;
  lastFileOffset: number;
  ops: LogOp[];
}

const HEADER_DESCRIPTORS = 126;
const SECTOR_DESCRIPTORS = 128;

export function descriptorSectors(count: number): number {
  return count <= HEADER_DESCRIPTORS ? 1 : 1 + Math.ceil((count - HEADER_DESCRIPTORS) / SECTOR_DESCRIPTORS);
}

function descriptorOffset(i: number): number {
  if (i < HEADER_DESCRIPTORS) return 64 + i * 32;
  const j = i - HEADER_DESCRIPTORS;
  return LOG_SECTOR * (1 + Math.floor(j / SECTOR_DESCRIPTORS)) + (j % SECTOR_DESCRIPTORS) * 32;
}

/** How many 4 KiB data updates fit in one entry of a log of `logLength` bytes. */
export function maxDataOpsPerEntry(logLength: number): number {
  const sectors = Math.floor(logLength / LOG_SECTOR);
  let n = sectors - 1;
  while (n > 0 && descriptorSectors(n) + n > sectors) n--;
  return n;
}

export function encodeLogEntry(e: Omit<LogEntry, 'position' | 'entryLength'>): Buffer {
  const dataOps = e.ops.filter((op) => op.kind === 'data');
  const descSectors = descriptorSectors(e.ops.length);
  const entryLength = (descSectors + dataOps.length) * LOG_SECTOR;
  const b = Buffer.alloc(entryLength);
  b.writeUInt32LE(SIG_LOG_ENTRY, 0);
  b.writeUInt32LE(entryLength, 8);
  b.writeUInt32LE(e.tail, 12);
  b.writeBigUInt64LE(e.sequenceNumber, 16);
  b.writeUInt32LE(e.ops.length, 24);
  e.logGuid.copy(b, 32);
  b.writeBigUInt64LE(BigInt(e.flushedFileOffset), 48);
  b.writeBigUInt64LE(BigInt(e.lastFileOffset), 56);
  let dataIndex = 0;
  e.ops.forEach((op, i) => {
    const o = descriptorOffset(i);
    if (op.kind === 'zero') {
      b.writeUInt32LE(SIG_ZERO_DESC, o);
      b.writeBigUInt64LE(BigInt(op.length), o + 8);
    } else {
      if (op.data.length !== LOG_SECTOR) throw new Error('log data updates are whole 4 KiB sectors');
      b.writeUInt32LE(SIG_DATA_DESC, o);
      b.writeUInt32LE(op.data.readUInt32LE(4092), o + 4);
      op.data.copy(b, o + 8, 0, 8);
      const s = (descSectors + dataIndex++) * LOG_SECTOR;
      b.writeUInt32LE(SIG_DATA_SECTOR, s);
      b.writeUInt32LE(Number(e.sequenceNumber >> 32n), s + 4);
      op.data.copy(b, s + 8, 8, 4092);
      b.writeUInt32LE(Number(e.sequenceNumber & 0xffffffffn), s + 4092);
    }
    b.writeBigUInt64LE(BigInt(op.fileOffset), o + 16);
    b.writeBigUInt64LE(e.sequenceNumber, o + 24);
  });
  b.writeUInt32LE(crc32cWithZeroedField(b, 4), 4);
  return b;
}

export interface LogContext {
  logOffset: number;
  logLength: number;
  logGuid: Guid;
}

/** Reads `length` bytes of the ring buffer starting at `pos`, wrapping at the end. */
function ringSlice(log: Buffer, pos: number, length: number): Buffer {
  if (pos + length <= log.length) return log.subarray(pos, pos + length);
  const out = Buffer.alloc(length);
  const first = log.length - pos;
  log.copy(out, 0, pos);
  log.copy(out, first, 0, length - first);
  return out;
}

/**
 * Decodes and validates the entry at `pos` of the in-memory log. Returns the problem as a string when
 * the sectors there do not hold a valid entry for this LogGuid (that is normal while scanning).
 */
export function decodeLogEntryAt(log: Buffer, pos: number, ctx: LogContext): LogEntry | string {
  const L = log.length;
  const h = log.subarray(pos, pos + LOG_SECTOR);
  if (h.readUInt32LE(0) !== SIG_LOG_ENTRY) return 'no entry signature';
  const entryLength = h.readUInt32LE(8);
  const tail = h.readUInt32LE(12);
  const sequenceNumber = h.readBigUInt64LE(16);
  const count = h.readUInt32LE(24);
  const logGuid = Buffer.from(h.subarray(32, 48));
  const flushed = h.readBigUInt64LE(48);
  const last = h.readBigUInt64LE(56);
  if (entryLength < LOG_SECTOR || entryLength % LOG_SECTOR !== 0 || entryLength > L)
    return `bad entry length ${entryLength}`;
  if (tail % LOG_SECTOR !== 0 || tail >= L) return `bad tail ${tail}`;
  if (sequenceNumber === 0n) return 'sequence number is zero';
  if (!guidEquals(logGuid, ctx.logGuid)) return 'LogGuid does not match the header';
  if (flushed > BigInt(MAX_FILE_OFFSET) || last > BigInt(MAX_FILE_OFFSET)) return 'file offsets out of range';
  const descSectors = descriptorSectors(count);
  if (descSectors > entryLength / LOG_SECTOR) return `${count} descriptors do not fit in the entry`;
  const entry = ringSlice(log, pos, entryLength);
  if (entry.readUInt32LE(4) !== crc32cWithZeroedField(entry, 4)) return 'checksum mismatch';
  const ops: LogOp[] = [];
  let dataIndex = 0;
  for (let i = 0; i < count; i++) {
    const o = descriptorOffset(i);
    const sig = entry.readUInt32LE(o);
    const fileOffset = entry.readBigUInt64LE(o + 16);
    if (entry.readBigUInt64LE(o + 24) !== sequenceNumber) return `descriptor ${i} sequence number mismatch`;
    if (fileOffset % BigInt(LOG_SECTOR) !== 0n || fileOffset > BigInt(MAX_FILE_OFFSET)) {
      return `descriptor ${i} file offset ${fileOffset} is unaligned or out of range`;
    }
    const target = Number(fileOffset);
    if (sig === SIG_ZERO_DESC) {
      const length = entry.readBigUInt64LE(o + 8);
      if (length % BigInt(LOG_SECTOR) !== 0n || fileOffset + length > BigInt(MAX_FILE_OFFSET)) {
        return `zero descriptor ${i} length ${length} is unaligned or out of range`;
      }
      ops.push({ kind: 'zero', fileOffset: target, length: Number(length) });
    } else if (sig === SIG_DATA_DESC) {
      const s = (descSectors + dataIndex++) * LOG_SECTOR;
      if (s + LOG_SECTOR > entryLength) return `data sector for descriptor ${i} lies outside the entry`;
      if (entry.readUInt32LE(s) !== SIG_DATA_SECTOR) return `data sector ${dataIndex - 1} has no signature`;
      const seq = (BigInt(entry.readUInt32LE(s + 4)) << 32n) | BigInt(entry.readUInt32LE(s + 4092));
      if (seq !== sequenceNumber) return `data sector ${dataIndex - 1} sequence number mismatch`;
      const data = Buffer.alloc(LOG_SECTOR);
      entry.copy(data, 0, o + 8, o + 16);
      entry.copy(data, 8, s + 8, s + 4092);
      data.writeUInt32LE(entry.readUInt32LE(o + 4), 4092);
      ops.push({ kind: 'data', fileOffset: target, data });
    } else {
      return `descriptor ${i} has an unknown signature`;
    }
  }
  for (const op of ops) {
    const end = op.fileOffset + (op.kind === 'data' ? LOG_SECTOR : op.length);
    // The log must never rewrite the file identifier or the headers, nor itself.
    if (op.fileOffset < HEADER_OFFSETS[1] + HEADER_SIZE) return `an update targets the header area at ${op.fileOffset}`;
    if (op.fileOffset < ctx.logOffset + L && ctx.logOffset < end)
      return `an update targets the log itself at ${op.fileOffset}`;
  }
  return {
    position: pos,
    entryLength,
    tail,
    sequenceNumber,
    logGuid,
    flushedFileOffset: Number(flushed),
    lastFileOffset: Number(last),
    ops,
  };
}

/**
 * Finds the active sequence (MS-VHDX 2.3.3): the newest valid, complete sequence of entries.
 * Returns the entries to replay, oldest first, or an empty list when none is valid.
 */
export function findActiveSequence(log: Buffer, ctx: LogContext): LogEntry[] {
  const L = log.length;
  const memo = new Map<number, LogEntry | string>();
  // Checksums cost EntryLength each; crafted overlapping entry headers must not make the scan quadratic.
  let budget = 8 * L;
  const entryAt = (pos: number): LogEntry | string => {
    let e = memo.get(pos);
    if (e === undefined) {
      if (log.readUInt32LE(pos) === SIG_LOG_ENTRY) {
        budget -= Math.min(L, log.readUInt32LE(pos + 8));
        if (budget < 0) {
          throw new VhdxCorruptError('log', ctx.logOffset, 'too many overlapping log entry headers; scan abandoned');
        }
      }
      e = decodeLogEntryAt(log, pos, ctx);
      memo.set(pos, e);
    }
    return e;
  };
  let candidate: LogEntry[] = [];
  let candidateSeq = 0n;
  let currentTail = 0;
  let oldTail = 0;
  const maxSteps = L / LOG_SECTOR + 1;
  for (let step = 0; step < maxSteps; step++) {
    const seq: LogEntry[] = [];
    let head = currentTail;
    while (seq.length < maxSteps) {
      const e = entryAt(head);
      if (typeof e === 'string') break;
      if (seq.length > 0 && e.sequenceNumber !== seq[seq.length - 1].sequenceNumber + 1n) break;
      seq.push(e);
      head = (head + e.entryLength) % L;
      if (head === currentTail) break; // the sequence filled the whole ring
    }
    const last = seq[seq.length - 1];
    const tailIndex = last ? seq.findIndex((e) => e.position === last.tail) : -1;
    const valid = tailIndex >= 0;
    if (valid && last.sequenceNumber > candidateSeq) {
      candidate = seq.slice(tailIndex);
      candidateSeq = last.sequenceNumber;
    }
    currentTail = valid ? head % L : (currentTail + LOG_SECTOR) % L;
    if (currentTail < oldTail || (valid && currentTail === oldTail && step > 0)) break;
    oldTail = currentTail;
  }
  return candidate;
}

/** Validates the active sequence against the file and returns what replay must do. */
export function planReplay(
  log: Buffer,
  ctx: LogContext,
  fileSize: number,
): { entries: LogEntry[]; lastFileOffset: number } {
  const entries = findActiveSequence(log, ctx);
  if (entries.length === 0) {
    throw new VhdxCorruptError(
      'log',
      ctx.logOffset,
      'the header names a log (LogGuid set) but no valid log sequence was found',
    );
  }
  const head = entries[entries.length - 1];
  if (fileSize < head.flushedFileOffset) {
    throw new VhdxCorruptError(
      'log',
      ctx.logOffset,
      `file is ${fileSize} bytes but the log says at least ${head.flushedFileOffset} were flushed: the file was truncated`,
      'VHDX_TRUNCATED',
    );
  }
  return { entries, lastFileOffset: head.lastFileOffset };
}

/** Appends entries to the ring. Every entry's tail is itself: earlier entries are applied and flushed first. */
export class LogWriter {
  private head = 0;
  private sequence: bigint;

  constructor(
    private readonly ctx: LogContext,
    firstSequence = 1n,
  ) {
    this.sequence = firstSequence;
  }

  get maxDataOps(): number {
    return maxDataOpsPerEntry(this.ctx.logLength);
  }

  /** Encodes the next entry; returns the writes (one, or two when it wraps) to issue to the file. */
  nextEntry(ops: LogOp[], flushedFileOffset: number, lastFileOffset: number): { offset: number; data: Buffer }[] {
    const entry = encodeLogEntry({
      tail: this.head,
      sequenceNumber: this.sequence,
      logGuid: this.ctx.logGuid,
      flushedFileOffset,
      lastFileOffset,
      ops,
    });
    if (entry.length > this.ctx.logLength) throw new Error('log entry larger than the log');
    // tail must point at this entry itself
    const writes: { offset: number; data: Buffer }[] = [];
    const pos = this.head;
    const first = Math.min(entry.length, this.ctx.logLength - pos);
    writes.push({ offset: this.ctx.logOffset + pos, data: entry.subarray(0, first) });
    if (first < entry.length) writes.push({ offset: this.ctx.logOffset, data: entry.subarray(first) });
    this.head = (pos + entry.length) % this.ctx.logLength;
    this.sequence++;
    return writes;
  }
}
