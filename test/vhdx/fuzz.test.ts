/**
 * Seeded mutation fuzzer for the VHDX engine. Small base images (a dynamic disk with a live log, a fixed
 * disk with 4 KiB sectors, a clean and a dirty differencing child over a parent) are built once and held
 * in memory; every case mutates one structure of one image (headers, region tables, metadata table and
 * items, parent locators, BAT entries, log entries, random bytes, truncation), writes the image to its
 * file, opens it (read-only, or writable in a quarter of the cases, which then write, write zeroes or trim
 * one to three ranges, mostly in allocated blocks), reads a few ranges and closes it.
 *
 * Oracle: every operation either succeeds or throws a TidemarkError with a known `code` and a one-line
 * message. Also: no case takes more than 2 s, RSS stays under 1.5 GiB, no file outside the temp directory
 * is ever opened, the engine never issues a write at a position Node cannot represent (Node then writes at
 * the current file position, i.e. offset 0), a writable open never changes the first 64 KiB (MS-VHDX 2.2.1)
 * and never writes more than 256 MiB, and no payload write ever lands in the header section, the log or a
 * region (the BAT, the metadata, any other): whatever a mutated BAT entry says.
 *
 * TIDEMARK_FUZZ_SEED (default 20240611) and TIDEMARK_FUZZ_CASES (default 10000) select the run;
 * TIDEMARK_FUZZ_CASE=n re-runs case n of that seed alone and prints the full error. Also:
 * TIDEMARK_FUZZ_DIR (where the images live; default /dev/shm when present, else the OS temp dir),
 * TIDEMARK_FUZZ_SLOW=ms (log cases slower than that), TIDEMARK_FUZZ_VERIFY=1 (self-check of the restores).
 * Base images hold random GUIDs, so a case reproduces the same mutation and path, not the same GUID bytes.
 */
import {
  closeSync,
  existsSync,
  fstatSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

// ------------------------------------------------------------------------------------------------
// File-system instrumentation: every open by the engine is recorded, and every handle is wrapped so a
// timed-out case can be stopped, runaway writes are bounded, and unrepresentable positions are caught.

interface CaseToken {
  aborted: boolean;
  written: number;
  budgetExceeded: boolean;
  unsafe: string[];
  /** Byte ranges the engine wrote, and the smallest length it truncated to: what a restore must undo. */
  writes: [number, number][];
  shrunk: number | undefined;
}

const newToken = (): CaseToken => ({
  aborted: false,
  written: 0,
  budgetExceeded: false,
  unsafe: [],
  writes: [],
  shrunk: undefined,
});

const fsState = vi.hoisted(() => ({
  opened: [] as string[],
  token: {
    aborted: false,
    written: 0,
    budgetExceeded: false,
    unsafe: [] as string[],
    writes: [] as [number, number][],
    shrunk: undefined as number | undefined,
  },
  budget: 256 * 1024 * 1024,
  /** Let writes at unrepresentable positions through (to show what the engine would do to the file). */
  passthroughUnsafe: false,
}));

vi.mock('node:fs/promises', async (importOriginal) => {
  const orig = await importOriginal<typeof import('node:fs/promises')>();
  const errno = (code: string, message: string) => Object.assign(new Error(`${code}: ${message}`), { code });
  const wrap = (h: import('node:fs/promises').FileHandle) => {
    const token = fsState.token;
    const check = (op: string, position: unknown) => {
      if (token.aborted) throw errno('EIO', 'case aborted by the fuzzer (timeout)');
      if (typeof position === 'number' && !Number.isSafeInteger(position)) {
        token.unsafe.push(`${op} at position ${position}`);
        if (!fsState.passthroughUnsafe) throw errno('EINVAL', `fuzzer refused ${op} at unsafe position ${position}`);
      }
    };
    return new Proxy(h, {
      get(target, prop) {
        const v = Reflect.get(target, prop, target) as unknown;
        if (prop === 'write') {
          return async (buf: Uint8Array, offset?: number, length?: number, position?: number) => {
            check('write', position);
            token.written += length ?? buf.length;
            if (token.written > fsState.budget) {
              token.budgetExceeded = true;
              throw errno('ENOSPC', 'fuzzer write budget exceeded');
            }
            if (typeof position === 'number') token.writes.push([position, length ?? buf.length]);
            return target.write(buf, offset, length, position);
          };
        }
        if (prop === 'read') {
          return async (buf: Uint8Array, offset?: number, length?: number, position?: number) => {
            check('read', position);
            return target.read(buf, offset, length, position);
          };
        }
        if (prop === 'datasync' || prop === 'sync') {
          // Durability does not matter here; skipping the flush keeps cases cheap.
          return async () => check(String(prop), undefined);
        }
        if (prop === 'truncate') {
          return async (len?: number) => {
            check('truncate', undefined);
            const n = len ?? 0;
            if (Number.isSafeInteger(n)) token.shrunk = Math.min(token.shrunk ?? n, n);
            return target.truncate(len);
          };
        }
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
  };
  const open = async (p: unknown, ...rest: unknown[]) => {
    fsState.opened.push(String(p));
    const h = await (orig.open as (...a: unknown[]) => Promise<import('node:fs/promises').FileHandle>)(p, ...rest);
    return wrap(h);
  };
  return { ...orig, open, default: { ...(orig as unknown as { default: object }).default, open } };
});

// Imports of engine code come after vi.mock (which vitest hoists anyway).
import { TidemarkError } from '../../src/errors.js';
import { computeGeometry, type Geometry } from '../../src/formats/vhdx/bat.js';
import {
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PARENT_LOCATOR,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_ID,
  ITEM_VIRTUAL_DISK_SIZE,
  PARENT_LOCATOR_TYPE_VHDX,
  REGION_BAT,
  REGION_METADATA,
} from '../../src/formats/vhdx/constants.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import {
  decodeHeader,
  decodeRegionTable,
  pickCurrentHeader,
  validateRegionTable,
  type VhdxHeader,
} from '../../src/formats/vhdx/header.js';
import { decodeLogEntryAt, encodeLogEntry, type LogOp } from '../../src/formats/vhdx/log.js';
import { decodeMetadataTable, encodeParentLocator, formatLinkage } from '../../src/formats/vhdx/metadata.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { crc32cWithZeroedField } from '../../src/util/crc32c.js';
import { newGuid } from '../../src/util/guid.js';
import { rng, type Rng } from '../helpers/random.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const SEED = Number(process.env.TIDEMARK_FUZZ_SEED ?? 20240611) >>> 0;
const CASES = Number(process.env.TIDEMARK_FUZZ_CASES ?? 10000);
const ONLY = process.env.TIDEMARK_FUZZ_CASE === undefined ? undefined : Number(process.env.TIDEMARK_FUZZ_CASE);
const CASE_TIMEOUT_MS = 2000;
const RSS_LIMIT = 1.5 * 1024 * MiB;
const ERROR_CODES = new Set([
  'INVALID_ARGUMENT',
  'NOT_FOUND',
  'ALREADY_EXISTS',
  'IO_ERROR',
  'READ_ONLY',
  'CLOSED',
  'VHDX_CORRUPT',
  'VHDX_UNSUPPORTED',
  'VHDX_TRUNCATED',
  'PARENT_NOT_FOUND',
  'PARENT_MISMATCH',
  'PATH_NOT_ALLOWED',
  'LIMIT_EXCEEDED',
  'TRACKING_NOT_ENABLED',
  'TRACKING_CORRUPT',
  'MISSING_CHANGE_TRACKING_INFORMATION',
]);

// ------------------------------------------------------------------------------------------------
// PRNG: the shared mulberry32 (helpers/prng.mjs), one stream per case so any case can be re-run alone.

function caseSeed(i: number): number {
  let h = (SEED ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

// ------------------------------------------------------------------------------------------------
// Base images and their structure maps.

interface ItemRef {
  tablePos: number; // file offset of the metadata table entry
  pos: number; // file offset of the item data
  length: number;
}

interface LogEntryRef {
  pos: number; // offset inside the log
  length: number;
  count: number;
  seq: bigint;
  dataSectors: number;
  descSectors: number;
}

interface Image {
  name: string;
  path: string;
  base: Buffer;
  work: Buffer;
  dirty: boolean; // the file's state is unknown (after a timeout): compare it whole before the next case
  header: VhdxHeader;
  slot: 0 | 1;
  logOffset: number;
  logLength: number;
  logEntries: LogEntryRef[];
  regionCount: number;
  bat: { offset: number; length: number };
  md: { offset: number; length: number };
  mdCount: number;
  items: Partial<Record<'fp' | 'size' | 'id' | 'lss' | 'pss' | 'loc', ItemRef>>;
  geometry: Geometry;
  virtualSize: number;
  blockSize: number;
  present: number[]; // payload blocks with data in this file
  isChild: boolean;
}

let dir: string;
let images: Image[];
let parentPath: string;
let parentDataWriteGuid: Buffer;

function mapImage(name: string, file: string, isChild: boolean): Image {
  const base = readFileSync(file);
  const h1 = decodeHeader(base.subarray(64 * KiB, 68 * KiB), 64 * KiB);
  const h2 = decodeHeader(base.subarray(128 * KiB, 132 * KiB), 128 * KiB);
  const picked = pickCurrentHeader(h1, h2)!;
  const header = picked.header;
  const rt = decodeRegionTable(base.subarray(192 * KiB, 256 * KiB));
  if (typeof rt === 'string') throw new Error(`${name}: ${rt}`);
  const { bat, metadata } = validateRegionTable(rt, 192 * KiB);
  const mdEntries = decodeMetadataTable(
    base.subarray(metadata.fileOffset, metadata.fileOffset + 64 * KiB),
    metadata.fileOffset,
    metadata.length,
  );
  const items: Image['items'] = {};
  const names: [Buffer, keyof Image['items']][] = [
    [ITEM_FILE_PARAMETERS, 'fp'],
    [ITEM_VIRTUAL_DISK_SIZE, 'size'],
    [ITEM_VIRTUAL_DISK_ID, 'id'],
    [ITEM_LOGICAL_SECTOR_SIZE, 'lss'],
    [ITEM_PHYSICAL_SECTOR_SIZE, 'pss'],
    [ITEM_PARENT_LOCATOR, 'loc'],
  ];
  mdEntries.forEach((e, i) => {
    const n = names.find(([g]) => g.equals(e.itemId));
    if (n && !e.isUser) {
      items[n[1]] = {
        tablePos: metadata.fileOffset + 32 + i * 32,
        pos: metadata.fileOffset + e.offset,
        length: e.length,
      };
    }
  });
  const fp = base.subarray(items.fp!.pos, items.fp!.pos + 8);
  const blockSize = fp.readUInt32LE(0);
  const hasParent = (fp.readUInt32LE(4) & 2) !== 0;
  const lss = base.readUInt32LE(items.lss!.pos);
  const virtualSize = Number(base.readBigUInt64LE(items.size!.pos));
  const geometry = computeGeometry(virtualSize, blockSize, lss, hasParent);
  const present: number[] = [];
  for (let b = 0; b < geometry.dataBlocks; b++) {
    const idx = b + Math.floor(b / geometry.chunkRatio);
    const state = base.readUInt32LE(bat.fileOffset + idx * 8) & 7;
    if (state === 6 || state === 7) present.push(b);
  }
  const logEntries: LogEntryRef[] = [];
  if (!header.logGuid.equals(Buffer.alloc(16))) {
    const log = base.subarray(header.logOffset, header.logOffset + header.logLength);
    const ctx = { logOffset: header.logOffset, logLength: header.logLength, logGuid: header.logGuid };
    for (let pos = 0; pos < log.length; pos += 4 * KiB) {
      const e = decodeLogEntryAt(log, pos, ctx);
      if (typeof e === 'string') continue;
      const dataSectors = e.ops.filter((o) => o.kind === 'data').length;
      logEntries.push({
        pos,
        length: e.entryLength,
        count: e.ops.length,
        seq: e.sequenceNumber,
        dataSectors,
        descSectors: e.entryLength / (4 * KiB) - dataSectors,
      });
    }
    if (logEntries.length === 0) throw new Error(`${name}: dirty image without log entries`);
  }
  return {
    name,
    path: file,
    base,
    work: Buffer.from(base),
    dirty: false,
    header,
    slot: picked.slot,
    logOffset: header.logOffset,
    logLength: header.logLength,
    logEntries,
    regionCount: rt.entries.length,
    bat: { offset: bat.fileOffset, length: bat.length },
    md: { offset: metadata.fileOffset, length: metadata.length },
    mdCount: mdEntries.length,
    items,
    geometry,
    virtualSize,
    blockSize,
    present,
    isChild,
  };
}

function pattern(len: number, seed: number): Buffer {
  const r = rng(seed);
  return r.bytes(len);
}

async function buildImages(): Promise<void> {
  // dyn: 16 MiB dynamic, 1 MiB blocks, data flushed through the log, then abandoned with the log live.
  const dyn = path.join(dir, 'dyn.vhdx');
  await createVhdx(dyn, { size: 16 * MiB, blockSize: MiB });
  let d = await VhdxFile.open(dyn, { writable: true });
  await d.write(pattern(3 * MiB + 1024, 1), 512);
  await d.write(pattern(4096, 2), 9 * MiB + 8192);
  await d.flush();
  await d.write(pattern(MiB, 3), 12 * MiB);
  await d.trim(2 * MiB, MiB);
  await d.flush();
  await d.abandon();

  // fixed: 8 MiB fixed disk with 4 KiB logical sectors, closed cleanly.
  const fixed = path.join(dir, 'fixed.vhdx');
  await createVhdx(fixed, { size: 8 * MiB, type: 'fixed', blockSize: MiB, logicalSectorSize: 4096 });
  d = await VhdxFile.open(fixed, { writable: true });
  await d.write(pattern(2 * MiB, 4), 3 * MiB - 4096);
  await d.close();

  // parent + two differencing children with partially present blocks; child2 is left with its log live.
  parentPath = path.join(dir, 'parent.vhdx');
  await createVhdx(parentPath, { size: 16 * MiB, blockSize: MiB });
  d = await VhdxFile.open(parentPath, { writable: true });
  await d.write(pattern(10 * MiB, 5), 0);
  await d.close();
  d = await VhdxFile.open(parentPath);
  parentDataWriteGuid = Buffer.from(d.header.dataWriteGuid);
  await d.close();

  const child = path.join(dir, 'child.avhdx');
  await createVhdx(child, { parent: parentPath, blockSize: MiB });
  d = await VhdxFile.open(child, { writable: true });
  await d.write(pattern(512, 6), 0);
  await d.write(pattern(4096, 7), MiB + 4096);
  await d.write(pattern(100 * KiB, 8), 3 * MiB + 7 * 512);
  await d.write(pattern(MiB, 9), 5 * MiB);
  await d.write(pattern(3000, 10), 12 * MiB + 100);
  await d.close();

  const child2 = path.join(dir, 'child2.avhdx');
  await createVhdx(child2, { parent: parentPath, blockSize: 2 * MiB });
  d = await VhdxFile.open(child2, { writable: true });
  await d.write(pattern(1536, 11), 2 * MiB + 512);
  await d.flush();
  await d.write(pattern(8192, 12), 7 * MiB);
  await d.flush();
  await d.abandon();

  images = [
    mapImage('dyn', dyn, false),
    mapImage('fixed', fixed, false),
    mapImage('child', child, true),
    mapImage('child2', child2, true),
  ];
  // Symlinks for locator mutations: one leading out of the directory, one to the real parent.
  symlinkSync('/etc/passwd', path.join(dir, 'link-to-passwd'));
  symlinkSync(parentPath, path.join(dir, 'link-to-parent.vhdx'));
  mkdirSync(path.join(dir, 'sub'));
}

// ------------------------------------------------------------------------------------------------
// Mutations. They write through `Mut`, which remembers the touched ranges so the file and the working
// copy can be restored cheaply.

class Mut {
  touched: [number, number][] = [];
  truncateTo: number | undefined;
  /** Blocks a mutation pointed somewhere: writable cases write there more often. */
  hot: number[] = [];
  constructor(readonly img: Image) {}
  get buf(): Buffer {
    return this.img.work;
  }
  set(off: number, bytes: Uint8Array): void {
    if (off < 0 || off >= this.buf.length) return;
    const n = Math.min(bytes.length, this.buf.length - off);
    this.buf.set(bytes.subarray(0, n), off);
    this.touched.push([off, n]);
  }
  u8(off: number, v: number): void {
    this.set(off, Buffer.from([v & 0xff]));
  }
  u16(off: number, v: number): void {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(v & 0xffff);
    this.set(off, b);
  }
  u32(off: number, v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    this.set(off, b);
  }
  u64(off: number, v: bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt.asUintN(64, v));
    this.set(off, b);
  }
  fixCrc(off: number, len: number): void {
    this.u32(off + 4, crc32cWithZeroedField(this.buf.subarray(off, off + len), 4));
  }
  /** Recomputes the CRC of the log entry at `pos` over its (possibly wrapping) EntryLength. */
  fixLogCrc(pos: number): void {
    const { logOffset: lo, logLength: L } = this.img;
    let len = this.buf.readUInt32LE(lo + pos + 8);
    if (len < 4 * KiB || len > L) len = 4 * KiB;
    const entry = Buffer.alloc(len);
    const first = Math.min(len, L - pos);
    this.buf.copy(entry, 0, lo + pos, lo + pos + first);
    if (first < len) this.buf.copy(entry, first, lo, lo + len - first);
    this.u32(lo + pos + 4, crc32cWithZeroedField(entry, 4));
  }
}

// prettier-ignore
const U32_POOL = [
  0, 1, 2, 3, 7, 8, 0x7f, 0x80, 0xff, 0x100, 511, 512, 513, 4095, 4096, 4097, 0x7fff, 0x8000, 0xffff, 0x10000,
  MiB - 1, MiB, MiB + 1, 2 * MiB, 3 * MiB, 64 * MiB, 256 * MiB, 256 * MiB + 1, 512 * MiB, 0x7fffffff, 0x80000000,
  0xfff00000, 0xffffffff,
];
// prettier-ignore
const U64_POOL: bigint[] = [
  0n, 1n, 4096n, 4097n, 1n << 20n, 2n << 20n, 3n << 20n, 4n << 20n, 16n << 20n, 1n << 32n, 1n << 40n, 1n << 44n,
  1n << 46n, (1n << 46n) + 4096n, 1n << 47n, (1n << 47n) + (1n << 20n), (1n << 53n) - 1n, 1n << 53n,
  (1n << 53n) + (1n << 20n), 1n << 63n, (1n << 64n) - (1n << 20n), (1n << 64n) - 1n,
];

function u32Val(r: Rng): number {
  return r.chance(0.8) ? r.pick(U32_POOL) : r.u32();
}
function u64Val(r: Rng, extra: number[] = []): bigint {
  const x = r.next();
  if (x < 0.25 && extra.length) return BigInt(r.pick(extra));
  if (x < 0.85) return r.pick(U64_POOL);
  return (BigInt(r.u32()) << 32n) | BigInt(r.u32());
}
function fileOffsets(img: Image): number[] {
  return [
    0,
    64 * KiB,
    128 * KiB,
    192 * KiB,
    256 * KiB,
    img.logOffset,
    img.md.offset,
    img.bat.offset,
    img.base.length - MiB,
    img.base.length,
    img.base.length + MiB,
    img.base.length + 4096,
  ];
}

type Mutator = (r: Rng, m: Mut) => string;

const mutateHeader: Mutator = (r, m) => {
  const img = m.img;
  const which = r.pick(['current', 'other', 'both'] as const);
  const slots = which === 'both' ? [0, 1] : which === 'current' ? [img.slot] : [1 - img.slot];
  const fix = r.chance(0.5);
  const field = r.pick([
    'sequence',
    'logOffset',
    'logLength',
    'logGuid',
    'dataWriteGuid',
    'version',
    'logVersion',
    'signature',
    'bytes',
    'reserved',
  ] as const);
  let what = '';
  const seqVal = r.pick([
    0n,
    1n,
    img.header.sequenceNumber + 1n,
    img.header.sequenceNumber - 1n,
    (1n << 64n) - 1n,
    BigInt(r.u32()),
  ]);
  const logOff = u64Val(r, fileOffsets(img));
  const logLen = u32Val(r);
  const guid = r.pick([Buffer.alloc(16), newGuid(), img.header.logGuid, img.header.dataWriteGuid]);
  const ver = r.pick([0, 1, 2, 0xffff]);
  const bytesAt = r.int(80);
  const bytes = r.bytes(1 + r.int(8));
  for (const s of slots) {
    const o = s === 0 ? 64 * KiB : 128 * KiB;
    switch (field) {
      case 'sequence':
        m.u64(o + 8, seqVal);
        what = `sequence=${seqVal}`;
        break;
      case 'logOffset':
        m.u64(o + 72, logOff);
        what = `logOffset=${hex(logOff)}`;
        break;
      case 'logLength':
        m.u32(o + 68, logLen);
        what = `logLength=${hex(logLen)}`;
        break;
      case 'logGuid':
        m.set(o + 48, guid);
        what = `logGuid=${guid.toString('hex')}`;
        break;
      case 'dataWriteGuid':
        m.set(o + 32, guid);
        what = `dataWriteGuid=${guid.toString('hex')}`;
        break;
      case 'version':
        m.u16(o + 66, ver);
        what = `version=${ver}`;
        break;
      case 'logVersion':
        m.u16(o + 64, ver);
        what = `logVersion=${ver}`;
        break;
      case 'signature':
        m.u32(o, r.pick([0, 0x64616569, r.u32()]));
        what = 'signature';
        break;
      case 'bytes':
        m.set(o + bytesAt, bytes);
        what = `bytes@${bytesAt}=${bytes.toString('hex')}`;
        break;
      case 'reserved':
        m.u8(o + 80 + r.int(4016), 1 + r.int(255));
        what = 'reserved byte';
        break;
    }
    if (fix) m.fixCrc(o, 4 * KiB);
  }
  return `header[${which}] ${what} crc=${fix ? 'fixed' : 'stale'}`;
};

const mutateRegion: Mutator = (r, m) => {
  const img = m.img;
  const mode = r.pick(['t1', 't2', 'both', 'break1+t2'] as const);
  const copies = mode === 't1' ? [0] : mode === 't2' || mode === 'break1+t2' ? [1] : [0, 1];
  if (mode === 'break1+t2') m.u8(192 * KiB + 20, m.buf[192 * KiB + 20] ^ 0x40); // table 1 fails its CRC
  const fix = r.chance(0.5);
  const n = Math.max(img.regionCount, 1);
  const i = r.chance(0.8) ? r.int(n) : r.int(n + 3);
  const field = r.pick(['count', 'guid', 'offset', 'length', 'required', 'swap', 'dup', 'extra', 'bytes'] as const);
  const count = r.pick([0, 1, 3, 2047, 2048, 0xffffffff, r.u32()]);
  const off = u64Val(r, fileOffsets(img));
  const len = u32Val(r);
  const req = r.pick([0, 1, 2, 0xffffffff]);
  const guid = r.pick([REGION_BAT, REGION_METADATA, newGuid(), Buffer.alloc(16)]);
  const bytesAt = 16 + r.int(32 * (n + 1));
  const bytes = r.bytes(1 + r.int(8));
  let what = '';
  for (const c of copies) {
    const t = c === 0 ? 192 * KiB : 256 * KiB;
    const e = t + 16 + i * 32;
    switch (field) {
      case 'count':
        m.u32(t + 8, count);
        what = `count=${count}`;
        break;
      case 'guid':
        m.set(e, guid);
        what = `entry ${i} guid=${guid.toString('hex')}`;
        break;
      case 'offset':
        m.u64(e + 16, off);
        what = `entry ${i} fileOffset=${hex(off)}`;
        break;
      case 'length':
        m.u32(e + 24, len);
        what = `entry ${i} length=${hex(len)}`;
        break;
      case 'required':
        m.u32(e + 28, req);
        what = `entry ${i} required=${req}`;
        break;
      case 'swap': {
        const a = Buffer.from(m.buf.subarray(t + 16, t + 48));
        const b = Buffer.from(m.buf.subarray(t + 48, t + 80));
        m.set(t + 16, b);
        m.set(t + 48, a);
        what = 'entries 0 and 1 swapped';
        break;
      }
      case 'dup':
        m.set(t + 48, Buffer.from(m.buf.subarray(t + 16, t + 48)));
        what = 'entry 1 = entry 0';
        break;
      case 'extra': {
        const x = Buffer.alloc(32);
        newGuid().copy(x);
        x.writeBigUInt64LE(BigInt.asUintN(64, off), 16);
        x.writeUInt32LE(len, 24);
        x.writeUInt32LE(req, 28);
        m.set(t + 16 + img.regionCount * 32, x);
        m.u32(t + 8, img.regionCount + 1);
        what = `extra unknown region at ${hex(off)} +${hex(len)} required=${req}`;
        break;
      }
      case 'bytes':
        m.set(t + bytesAt, bytes);
        what = `bytes@${bytesAt}=${bytes.toString('hex')}`;
        break;
    }
    if (fix) m.fixCrc(t, 64 * KiB);
  }
  return `region[${mode}] ${what} crc=${fix ? 'fixed' : 'stale'}`;
};

const mutateMetadataTable: Mutator = (r, m) => {
  const img = m.img;
  const t = img.md.offset;
  const i = r.chance(0.85) ? r.int(img.mdCount) : r.int(img.mdCount + 3);
  const e = t + 32 + i * 32;
  switch (
    r.pick(['count', 'id', 'offset', 'length', 'flags', 'signature', 'dup', 'unknownRequired', 'bytes'] as const)
  ) {
    case 'count': {
      const v = r.pick([0, 1, img.mdCount - 1, img.mdCount + 1, 2047, 2048, 0xffff]);
      m.u16(t + 10, v);
      return `metadata table count=${v}`;
    }
    case 'id': {
      const g = r.pick([
        ITEM_FILE_PARAMETERS,
        ITEM_VIRTUAL_DISK_SIZE,
        ITEM_PARENT_LOCATOR,
        ITEM_LOGICAL_SECTOR_SIZE,
        newGuid(),
      ]);
      m.set(e, g);
      return `metadata entry ${i} id=${g.toString('hex')}`;
    }
    case 'offset': {
      const v = r.chance(0.7)
        ? r.pick([
            0,
            1,
            4096,
            64 * KiB - 1,
            64 * KiB,
            64 * KiB + 8,
            img.md.length - 8,
            img.md.length,
            img.md.length - 1,
            0xffffffff,
            0xfffffff8,
          ])
        : u32Val(r);
      m.u32(e + 16, v);
      return `metadata entry ${i} offset=${hex(v)}`;
    }
    case 'length': {
      const v = r.chance(0.7)
        ? r.pick([0, 1, 3, 4, 7, 8, 15, 16, 19, 20, 64 * KiB, MiB, MiB + 1, 0xffffffff])
        : u32Val(r);
      m.u32(e + 20, v);
      return `metadata entry ${i} length=${hex(v)}`;
    }
    case 'flags': {
      const v = r.pick([0, 1, 2, 3, 4, 5, 6, 7, 0xffffffff, r.u32()]);
      m.u32(e + 24, v);
      return `metadata entry ${i} flags=${hex(v)}`;
    }
    case 'signature':
      m.u8(t + r.int(8), r.u32());
      return 'metadata table signature';
    case 'dup': {
      const j = r.int(img.mdCount);
      m.set(e, Buffer.from(m.buf.subarray(t + 32 + j * 32, t + 64 + j * 32)));
      return `metadata entry ${i} = entry ${j}`;
    }
    case 'unknownRequired': {
      const x = Buffer.alloc(32);
      newGuid().copy(x);
      x.writeUInt32LE(r.pick([0, 64 * KiB, img.md.length - 8]), 16);
      x.writeUInt32LE(r.pick([0, 8]), 20);
      x.writeUInt32LE(r.pick([4, 5, 6, 7]), 24);
      m.set(t + 32 + img.mdCount * 32, x);
      m.u16(t + 10, img.mdCount + 1);
      return 'extra unknown required metadata item';
    }
    case 'bytes': {
      const at = 32 + r.int(32 * img.mdCount);
      const b = r.bytes(1 + r.int(6));
      m.set(t + at, b);
      return `metadata table bytes@${at}=${b.toString('hex')}`;
    }
  }
};

const mutateItems: Mutator = (r, m) => {
  const img = m.img;
  const it = img.items;
  switch (r.pick(['blockSize', 'fpFlags', 'size', 'lss', 'pss', 'id', 'fpFlags', 'blockSize', 'size'] as const)) {
    case 'blockSize': {
      const v = r.pick([
        0,
        1,
        512 * KiB,
        MiB,
        2 * MiB,
        3 * MiB,
        4 * MiB,
        32 * MiB,
        256 * MiB,
        512 * MiB,
        0x80000000,
        0xffffffff,
        u32Val(r),
      ]);
      m.u32(it.fp!.pos, v);
      return `file parameters blockSize=${hex(v)}`;
    }
    case 'fpFlags': {
      const v = r.pick([0, 1, 2, 3, 4, 0xfffffffc, r.u32()]);
      m.u32(it.fp!.pos + 4, v);
      return `file parameters flags=${hex(v)}`;
    }
    case 'size': {
      const vs = BigInt(img.virtualSize);
      const v = r.chance(0.6)
        ? r.pick([
            0n,
            1n,
            512n,
            4096n,
            vs - 512n,
            vs + 512n,
            vs + 4096n,
            vs * 2n,
            vs * 1024n,
            1n << 46n,
            (1n << 46n) + 4096n,
            (1n << 64n) - 1n,
          ])
        : u64Val(r);
      m.u64(it.size!.pos, v);
      return `virtual size=${v}`;
    }
    case 'lss':
    case 'pss': {
      const which = r.chance(0.6) ? 'lss' : 'pss';
      const v = r.pick([0, 512, 4096, 1024, 8192, 0xffffffff, r.u32()]);
      m.u32(it[which]!.pos, v);
      return `${which}=${v}`;
    }
    case 'id':
      m.set(it.id!.pos, r.bytes(16));
      return 'virtual disk id random';
  }
};

/** Locator contents, including hostile ones. */
function locatorChoices(img: Image): { rel: string[]; abs: string[]; vol: string[]; linkage: string[] } {
  const self = path.basename(img.path);
  const up = '..\\'.repeat(12);
  return {
    rel: [
      '.\\parent.vhdx',
      'parent.vhdx',
      `${up}etc\\passwd`,
      '..\\..\\etc\\passwd',
      '..\\..\\..\\..\\..\\..\\..\\..\\etc\\passwd',
      '/etc/passwd',
      '\\etc\\passwd',
      `.\\${self}`,
      `.\\sub\\..\\${self}`,
      '.\\dyn.vhdx',
      '.\\fixed.vhdx',
      '.\\child.avhdx',
      '.\\link-to-passwd',
      '.\\link-to-parent.vhdx',
      '.\\sub',
      '.\\nonexistent.vhdx',
      '',
      '.',
      '..',
      '.\\',
      'C:\\Windows\\parent.vhdx',
      'parent.vhdx\nPARENT_FORGED: injected line',
      'a'.repeat(4000),
      '.\\\u0000parent.vhdx',
    ],
    abs: [
      '\\\\?\\Z:\\etc\\passwd',
      `\\\\?\\Z:${parentPath.split('/').join('\\')}`,
      `\\\\?\\Z:${img.path.split('/').join('\\')}`,
      `\\\\?\\Z:${dir.split('/').join('\\')}\\link-to-passwd`,
      '\\\\?\\Z:\\proc\\self\\fd\\0',
      '\\\\?\\C:\\Windows\\x.vhdx',
      'Z:\\etc\\shadow',
      '\\\\?\\UNC\\server\\share\\p.vhdx',
      '\\\\server\\share\\p.vhdx',
      '\\\\?\\Z:',
      '\\\\?\\',
      '',
    ],
    vol: [
      '\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\parent.vhdx',
      '\\\\?\\Volume{}\\x',
      'Volume{26a21bda-a627-11d7-9931-806e6f6e6963}',
    ],
    linkage: [
      formatLinkage(parentDataWriteGuid),
      formatLinkage(parentDataWriteGuid).toUpperCase(),
      formatLinkage(newGuid()),
      'not a guid',
      '',
      formatLinkage(img.header.dataWriteGuid),
    ],
  };
}

const mutateLocator: Mutator = (r, m) => {
  const img = m.img;
  const loc = img.items.loc;
  if (!loc) {
    // A disk without a parent: claim one (HasParent) with or without a locator item.
    m.u32(img.items.fp!.pos + 4, 2);
    return 'file parameters HasParent set on a disk without a locator';
  }
  const kind = r.pick(['rewrite', 'rewrite', 'rewrite', 'count', 'entry', 'strings', 'type'] as const);
  if (kind === 'rewrite') {
    const c = locatorChoices(img);
    const entries: [string, string][] = [];
    if (r.chance(0.9)) entries.push(['parent_linkage', r.pick(c.linkage)]);
    if (r.chance(0.2)) entries.push(['parent_linkage2', r.pick(c.linkage)]);
    if (r.chance(0.8)) entries.push(['relative_path', r.pick(c.rel)]);
    if (r.chance(0.3)) entries.push(['volume_path', r.pick(c.vol)]);
    if (r.chance(0.6)) entries.push(['absolute_win32_path', r.pick(c.abs)]);
    if (r.chance(0.1)) entries.push([r.pick(['relative_path', 'x', '']), 'dup']);
    const valid = entries.filter(([k, v]) => k !== '' && v !== '');
    const bytes = encodeParentLocator({ locatorType: PARENT_LOCATOR_TYPE_VHDX, entries: valid });
    const room = img.md.offset + img.md.length - loc.pos;
    if (bytes.length > room) return 'locator rewrite skipped (does not fit)';
    m.set(loc.pos, bytes);
    m.u32(loc.tablePos + 20, bytes.length);
    return `locator rewrite ${JSON.stringify(valid.map(([k, v]) => `${k}=${v.length > 60 ? `${v.slice(0, 20)}...(${v.length})` : v}`))}`;
  }
  if (kind === 'count') {
    const v = r.pick([0, 1, 2, 4, 5, 100, 0xffff]);
    m.u16(loc.pos + 18, v);
    return `locator count=${v}`;
  }
  if (kind === 'type') {
    m.set(loc.pos, r.pick([newGuid(), Buffer.alloc(16)]));
    return 'locator type changed';
  }
  if (kind === 'entry') {
    const n = m.buf.readUInt16LE(loc.pos + 18);
    const k = r.int(Math.max(1, n));
    const e = loc.pos + 20 + k * 12;
    const field = r.pick(['keyOffset', 'valueOffset', 'keyLength', 'valueLength'] as const);
    if (field === 'keyOffset' || field === 'valueOffset') {
      const v = r.pick([
        0,
        1,
        19,
        20,
        21,
        loc.length - 2,
        loc.length,
        loc.length + 2,
        0xffff,
        0xfffffffe,
        0xffffffff,
        u32Val(r),
      ]);
      m.u32(e + (field === 'keyOffset' ? 0 : 4), v);
      return `locator entry ${k} ${field}=${hex(v)}`;
    }
    const v = r.pick([0, 1, 2, 3, 28, 76, 0xfffe, 0xffff, r.int(65536)]);
    m.u16(e + (field === 'keyLength' ? 8 : 10), v);
    return `locator entry ${k} ${field}=${v}`;
  }
  // strings: overwrite some UTF-16 code units with hostile characters
  const n = m.buf.readUInt16LE(loc.pos + 18);
  const start = loc.pos + 20 + n * 12;
  const end = loc.pos + loc.length;
  const units = ['\n', '/', '\\', '.', '\u0000', ':', '?', 'Z', '\ud800', '\uffff', 'é'];
  const k = 1 + r.int(6);
  let what = '';
  for (let j = 0; j < k && end - start >= 2; j++) {
    const at = start + 2 * r.int((end - start) >> 1);
    const u = r.pick(units);
    m.set(at, Buffer.from(u, 'utf16le'));
    what += `@${at - loc.pos}=${JSON.stringify(u)} `;
  }
  return `locator strings ${what.trim()}`;
};

const mutateBat: Mutator = (r, m) => {
  const img = m.img;
  const g = img.geometry;
  const n = 1 + r.int(3);
  const parts: string[] = [];
  for (let j = 0; j < n; j++) {
    let idx: number;
    const x = r.next();
    if (x < 0.5 && img.present.length) {
      const b = r.pick(img.present);
      idx = b + Math.floor(b / g.chunkRatio);
    } else if (x < 0.65 && g.hasParent) {
      idx = g.chunkRatio; // sector bitmap entry of chunk 0
    } else if (x < 0.95) {
      idx = r.int(g.batEntries);
    } else {
      idx = g.batEntries + r.int(4);
    }
    const at = img.bat.offset + idx * 8;
    const lo = m.buf.readUInt32LE(at);
    const hi = m.buf.readUInt32LE(at + 4);
    const kind = r.pick(['state', 'state', 'offset', 'reserved', 'raw', 'hi'] as const);
    if (kind === 'state') {
      const s = r.int(8);
      m.u32(at, ((lo & ~7) | s) >>> 0);
      parts.push(`bat[${idx}] state=${s}`);
    } else if (kind === 'offset') {
      const mb = r.chance(0.7)
        ? r.pick([
            0,
            1,
            img.logOffset / MiB,
            img.md.offset / MiB,
            img.bat.offset / MiB,
            Math.floor(img.base.length / MiB) - 1,
            Math.floor(img.base.length / MiB),
            Math.floor(img.base.length / MiB) + 1000,
            0xfff,
            0x1000,
            2 ** 31,
            2 ** 43,
            2 ** 44 - 1,
          ])
        : r.u32();
      const newLo = (((mb % 4096) << 20) | (lo & 0xfffff)) >>> 0;
      const newHi = Math.floor(mb / 4096) >>> 0;
      m.u32(at, newLo);
      m.u32(at + 4, newHi);
      parts.push(`bat[${idx}] offset=${mb} MiB state=${lo & 7}`);
    } else if (kind === 'reserved') {
      const bits = 1 + r.int(0x1ffff);
      m.u32(at, (lo | (bits << 3)) >>> 0);
      parts.push(`bat[${idx}] reserved=${hex(bits)}`);
    } else if (kind === 'raw') {
      const v = u64Val(r);
      m.u64(at, v);
      parts.push(`bat[${idx}] raw=${hex(v)}`);
    } else {
      const v = r.pick([1, 0xfff, 0x100000, 0x7fffffff, 0xffffffff, r.u32()]);
      m.u32(at + 4, v);
      parts.push(`bat[${idx}] hi=${hex(v)} (lo ${hex(lo)}, was hi ${hex(hi)})`);
    }
  }
  return parts.join('; ');
};

function craftLogEntry(r: Rng, m: Mut): string {
  const img = m.img;
  const head = img.logEntries.reduce((a, b) => (b.seq > a.seq ? b : a));
  const pos = (head.pos + head.length) % img.logLength;
  const ops: LogOp[] = [];
  const nOps = r.pick([0, 1, 2, 3, 8]);
  const targets = [
    img.bat.offset,
    img.md.offset,
    192 * KiB,
    256 * KiB,
    img.bat.offset + 4096,
    img.base.length,
    img.base.length + 64 * MiB,
  ];
  const what: string[] = [];
  for (let k = 0; k < nOps; k++) {
    const target = r.chance(0.8) ? r.pick(targets) : Math.floor(Number(u64Val(r)) / 4096) * 4096;
    if (!Number.isSafeInteger(target) || target > 2 ** 47) continue;
    if (r.chance(0.35)) {
      const length = r.pick([
        4096,
        64 * KiB,
        MiB,
        1 << 30,
        2 ** 40,
        2 ** 46,
        2 ** 47 - target - ((2 ** 47 - target) % 4096),
      ]);
      ops.push({ kind: 'zero', fileOffset: target, length });
      what.push(`zero@${hex(target)}+${hex(length)}`);
    } else {
      let data: Buffer;
      const current = m.buf.subarray(target, target + 4096);
      if (current.length === 4096 && r.chance(0.7)) {
        // A plausible update: the current sector with a few bytes changed.
        data = Buffer.from(current);
        for (let f = 0; f < 1 + r.int(8); f++) data[r.int(4096)] = r.u32() & 0xff;
      } else data = r.bytes(4096);
      ops.push({ kind: 'data', fileOffset: target, data });
      what.push(`data@${hex(target)}`);
    }
  }
  const flushed = r.pick([0, Math.floor(img.base.length / MiB) * MiB, img.base.length + MiB, 2 ** 47]);
  const last = r.pick([0, img.base.length, img.base.length + 16 * MiB, 2 ** 40, 2 ** 47]);
  const entry = encodeLogEntry({
    tail: r.chance(0.8) ? pos : head.pos,
    sequenceNumber: head.seq + 1n,
    logGuid: img.header.logGuid,
    flushedFileOffset: flushed,
    lastFileOffset: last,
    ops,
  });
  if (entry.length > img.logLength) return 'crafted log entry skipped (too long)';
  const first = Math.min(entry.length, img.logLength - pos);
  m.set(img.logOffset + pos, entry.subarray(0, first));
  if (first < entry.length) m.set(img.logOffset, entry.subarray(first));
  return `crafted log entry at ${pos} seq ${head.seq + 1n} flushed=${hex(flushed)} last=${hex(last)} ops [${what.join(', ')}]`;
}

const mutateLog: Mutator = (r, m) => {
  const img = m.img;
  if (img.logEntries.length === 0) {
    // A clean file: claim a log that is not there, or point at garbage.
    const o = img.slot === 0 ? 64 * KiB : 128 * KiB;
    m.set(o + 48, newGuid());
    m.fixCrc(o, 4 * KiB);
    return 'header (current) names a LogGuid with no entries';
  }
  if (r.chance(0.25)) return craftLogEntry(r, m);
  const ent = r.pick(img.logEntries);
  const h = img.logOffset + ent.pos;
  const fix = r.chance(0.5);
  const L = img.logLength;
  let what = '';
  const field = r.pick([
    'signature',
    'length',
    'tail',
    'seq',
    'count',
    'reserved',
    'guid',
    'flushed',
    'last',
    'descSig',
    'descOffset',
    'descSeq',
    'descLength',
    'dataSig',
    'dataSeq',
    'bytes',
  ] as const);
  const descAt = (i: number) =>
    i < 126 ? h + 64 + i * 32 : h + 4096 * (1 + Math.floor((i - 126) / 128)) + ((i - 126) % 128) * 32;
  const di = r.int(Math.max(1, ent.count));
  switch (field) {
    case 'signature':
      m.u32(h, r.pick([0, r.u32()]));
      what = 'signature';
      break;
    case 'length': {
      const v = r.pick([
        0,
        4096,
        ent.length - 4096,
        ent.length + 4096,
        ent.length + 1,
        L,
        L + 4096,
        0xfffff000,
        0xffffffff,
        u32Val(r),
      ]);
      m.u32(h + 8, v >>> 0);
      what = `entryLength=${hex(v >>> 0)}`;
      break;
    }
    case 'tail': {
      const other = r.pick(img.logEntries).pos;
      const v = r.pick([0, other, ent.pos, ent.pos + 1, L, L - 4096, 0xffffffff, (ent.pos + ent.length) % L]);
      m.u32(h + 12, v >>> 0);
      what = `tail=${hex(v >>> 0)}`;
      break;
    }
    case 'seq': {
      const v = r.pick([0n, ent.seq - 1n, ent.seq + 1n, ent.seq + 100n, (1n << 64n) - 1n]);
      m.u64(h + 16, v);
      what = `sequence=${v}`;
      break;
    }
    case 'count': {
      const v = r.pick([0, ent.count - 1, ent.count + 1, 126, 127, 128, 254, 255, 0xffff, 0x7fffffff, 0xffffffff]);
      m.u32(h + 24, v >>> 0);
      what = `descriptorCount=${v >>> 0}`;
      break;
    }
    case 'reserved':
      m.u32(h + 28, r.u32() | 1);
      what = 'reserved';
      break;
    case 'guid':
      m.set(h + 32, r.pick([Buffer.alloc(16), newGuid()]));
      what = 'logGuid';
      break;
    case 'flushed': {
      const v = u64Val(r, [img.base.length, img.base.length + MiB, Math.floor(img.base.length / MiB) * MiB]);
      m.u64(h + 48, v);
      what = `flushedFileOffset=${hex(v)}`;
      break;
    }
    case 'last': {
      const v = u64Val(r, [img.base.length, img.base.length + MiB, 2 ** 47]);
      m.u64(h + 56, v);
      what = `lastFileOffset=${hex(v)}`;
      break;
    }
    case 'descSig':
      m.u32(descAt(di), r.pick([0x6f72657a, 0x63736564, 0x61746164, 0, r.u32()]));
      what = `descriptor ${di} signature`;
      break;
    case 'descOffset': {
      const v = u64Val(r, [...fileOffsets(img), img.logOffset + 4096, 4096, 68 * KiB]);
      m.u64(descAt(di) + 16, v);
      what = `descriptor ${di} fileOffset=${hex(v)}`;
      break;
    }
    case 'descSeq':
      m.u64(descAt(di) + 24, ent.seq + BigInt(r.pick([-1, 1, 2])));
      what = `descriptor ${di} sequence`;
      break;
    case 'descLength': {
      // As a zero descriptor: its length field (bytes 8..15).
      m.u32(descAt(di), 0x6f72657a);
      const v = u64Val(r, [4096, MiB, 2 ** 30, 2 ** 46]);
      m.u64(descAt(di) + 8, v);
      what = `descriptor ${di} -> zero, length=${hex(v)}`;
      break;
    }
    case 'dataSig':
    case 'dataSeq': {
      if (ent.dataSectors === 0) {
        m.u32(h + 24, ent.count + 1);
        what = 'descriptorCount+1 (no data sectors)';
        break;
      }
      const s = h + (ent.descSectors + r.int(ent.dataSectors)) * 4096;
      if (field === 'dataSig') m.u32(s, r.pick([0, 0x63736564, r.u32()]));
      else m.u32(r.chance(0.5) ? s + 4 : s + 4092, r.u32());
      what = `data sector ${field}`;
      break;
    }
    case 'bytes': {
      const at = r.int(ent.length);
      const b = r.bytes(1 + r.int(8));
      m.set(h + at, b);
      what = `bytes@${at}=${b.toString('hex')}`;
      break;
    }
  }
  if (fix) m.fixLogCrc(ent.pos);
  return `log entry @${ent.pos} (seq ${ent.seq}) ${what} crc=${fix ? 'fixed' : 'stale'}`;
};

const mutateFlips: Mutator = (r, m) => {
  const img = m.img;
  const areas: [string, number, number][] = [
    ['header section', 0, MiB],
    ['headers', 64 * KiB, 4 * KiB],
    ['region tables', 192 * KiB, 128 + 64 * KiB],
    ['metadata', img.md.offset, 64 * KiB + 256],
    ['bat', img.bat.offset, Math.max(8, img.geometry.batEntries * 8)],
    ['file', 0, img.base.length],
  ];
  if (img.logEntries.length) areas.push(['log', img.logOffset, img.logLength]);
  const [name, start, len] = r.pick(areas);
  const k = 1 + r.int(16);
  for (let j = 0; j < k; j++) {
    const at = start + r.int(len);
    m.u8(at, m.buf[at] ^ (1 + r.int(255)));
  }
  const fix = r.chance(0.5);
  if (fix) {
    // Make every structure's checksum right again, so the flips reach the field checks.
    for (const o of [64 * KiB, 128 * KiB]) if (m.buf.readUInt32LE(o) === 0x64616568) m.fixCrc(o, 4 * KiB);
    for (const o of [192 * KiB, 256 * KiB]) if (m.buf.readUInt32LE(o) === 0x69676572) m.fixCrc(o, 64 * KiB);
    for (const e of img.logEntries) if (m.buf.readUInt32LE(img.logOffset + e.pos) === 0x65676f6c) m.fixLogCrc(e.pos);
  }
  return `${k} byte flips in ${name} crcs=${fix ? 'fixed' : 'stale'}`;
};

const mutateTruncate: Mutator = (r, m) => {
  const img = m.img;
  const size = img.base.length;
  const v = r.pick([
    0,
    7,
    100,
    520,
    64 * KiB,
    MiB - 1,
    MiB,
    MiB + 4096,
    2 * MiB,
    3 * MiB + 4096,
    4 * MiB,
    size - 1,
    size - 512,
    size - img.blockSize / 2,
    size - MiB,
    r.int(size),
  ]);
  m.truncateTo = Math.max(0, Math.min(size, Math.floor(v)));
  return `truncate to ${m.truncateTo} of ${size}`;
};

/**
 * A present (or absent) block, or a sector bitmap, pointed into a structure of the file, another block's
 * space, or past the end: placements the engine must refuse to read or write through.
 */
const mutatePlacement: Mutator = (r, m) => {
  const img = m.img;
  const g = img.geometry;
  const block = img.present.length && r.chance(0.7) ? r.pick(img.present) : r.int(g.dataBlocks);
  const bitmap = img.isChild && r.chance(0.25);
  const idx = bitmap ? g.chunkRatio : block + Math.floor(block / g.chunkRatio);
  const others = img.present.filter((b) => b !== block);
  const offsetOf = (b: number) => {
    const at = img.bat.offset + (b + Math.floor(b / g.chunkRatio)) * 8;
    return ((m.buf.readUInt32LE(at) >>> 20) + m.buf.readUInt32LE(at + 4) * 4096) * MiB;
  };
  const targets: [string, number][] = [
    ['header section', 0],
    ['log', img.logOffset],
    ['metadata', img.md.offset],
    ['bat', img.bat.offset],
    ['past the end', Math.ceil(img.base.length / MiB) * MiB + r.int(4) * MiB],
    ['last MiB', Math.floor(img.base.length / MiB) * MiB - MiB],
  ];
  if (others.length) targets.push(['another block', offsetOf(r.pick(others))]);
  const [name, offset] = r.pick(targets);
  const state = bitmap ? 6 : r.pick([6, 6, 7]);
  const mb = offset / MiB;
  m.u32(img.bat.offset + idx * 8, (((mb % 4096) << 20) | state) >>> 0);
  m.u32(img.bat.offset + idx * 8 + 4, Math.floor(mb / 4096));
  m.hot.push(block);
  return `${bitmap ? 'sector bitmap of chunk 0' : `block ${block}`} (state ${state}) -> ${name} (${offset})`;
};

const MUTATORS: [Mutator, number, string][] = [
  [mutatePlacement, 10, 'placement'],
  [mutateHeader, 12, 'header'],
  [mutateRegion, 10, 'region'],
  [mutateMetadataTable, 10, 'metadata table'],
  [mutateItems, 10, 'items'],
  [mutateLocator, 12, 'locator'],
  [mutateBat, 14, 'bat'],
  [mutateLog, 14, 'log'],
  [mutateFlips, 12, 'flips'],
  [mutateTruncate, 6, 'truncate'],
];
const TOTAL_WEIGHT = MUTATORS.reduce((n, [, w]) => n + w, 0);

function pickMutator(r: Rng, img: Image): Mutator {
  for (;;) {
    let x = r.int(TOTAL_WEIGHT);
    for (const [f, w, name] of MUTATORS) {
      if (x < w) {
        if (name === 'locator' && !img.isChild && r.chance(0.8)) break; // mostly on children
        return f;
      }
      x -= w;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Syncing the working copy to the file, and the exercise run on each case.

function mergeRanges(ranges: [number, number][]): [number, number][] {
  const s = ranges.filter(([, n]) => n > 0).sort((a, b) => a[0] - b[0]);
  const out: [number, number][] = [];
  for (const [o, n] of s) {
    const last = out[out.length - 1];
    if (last && o <= last[0] + last[1]) last[1] = Math.max(last[1], o + n - last[0]);
    else out.push([o, n]);
  }
  return out;
}

const scratch = Buffer.alloc(MiB);

/**
 * Makes the file equal `img.work` cut to `length`, rewriting only `ranges` (the file is known to match
 * `img.work` elsewhere), or, for a file in an unknown state (`img.dirty`), comparing it chunk by chunk.
 */
function syncFile(img: Image, ranges: [number, number][], length = img.work.length): void {
  const fd = openSync(img.path, 'r+');
  try {
    const size = fstatSync(fd).size;
    if (img.dirty) {
      for (let o = 0; o < length; o += MiB) {
        const n = Math.min(MiB, length - o);
        if (o + n <= size) {
          readSync(fd, scratch, 0, n, o);
          if (scratch.subarray(0, n).equals(img.work.subarray(o, o + n))) continue;
        }
        writeSync(fd, img.work, o, n, o);
      }
    } else {
      for (const [o, n] of mergeRanges(ranges)) {
        if (o < length) writeSync(fd, img.work, o, Math.min(n, length - o), o);
      }
    }
    if (size !== length) ftruncateSync(fd, length);
  } finally {
    closeSync(fd);
  }
  img.dirty = false;
}

interface Failure {
  caseNo: number;
  image: string;
  mutation: string;
  mode: string;
  problem: string;
}

function judge(err: unknown): string | undefined {
  if (!(err instanceof TidemarkError)) {
    const e = err as { name?: string; code?: string; message?: string; stack?: string };
    const at = (e?.stack ?? '').split('\n').find((l) => l.includes('/src/')) ?? '';
    return `${e?.name ?? typeof err}${e?.code ? ` [${e.code}]` : ''}: ${e?.message ?? String(err)} ${at.trim()}`;
  }
  if (typeof err.code !== 'string' || !ERROR_CODES.has(err.code))
    return `TidemarkError with unknown code ${String(err.code)}`;
  if (typeof err.message !== 'string' || err.message.length === 0) return `TidemarkError ${err.code} without a message`;
  if (/[\r\n]/.test(err.message))
    return `TidemarkError ${err.code} message is not one line: ${JSON.stringify(err.message.slice(0, 300))}`;
  return undefined;
}

async function exercise(img: Image, writable: boolean, r: Rng, problems: string[], hot: number[]): Promise<void> {
  const note = (err: unknown, where: string) => {
    const p = judge(err);
    if (p) problems.push(`${where}: ${p}`);
    if (p && ONLY !== undefined) console.log(`case ${ONLY} ${where}:`, err);
  };
  let disk: VhdxFile;
  try {
    disk = await VhdxFile.open(img.path, { writable, allowedRoots: [dir] });
  } catch (err) {
    note(err, 'open');
    return;
  }
  try {
    const vs = disk.virtualSize;
    const bs = disk.blockSize;
    const reads = 1 + r.int(4);
    for (let k = 0; k < reads; k++) {
      const len = Math.min(vs, r.pick([1, 512, 4096, 3 * 512 + 7, 64 * KiB, 200 * KiB]));
      let off: number;
      const x = r.next();
      if (x < 0.4 && img.present.length)
        off = r.pick(img.present) * img.blockSize + r.pick([0, 512, 4096, 7 * 512 + 3]);
      else if (x < 0.6) off = (1 + r.int(Math.max(1, Math.floor(vs / bs)))) * bs - r.int(4096);
      else if (x < 0.7) off = vs - len;
      else off = r.int(vs);
      off = Math.max(0, Math.min(off, vs - len));
      try {
        await disk.read(Buffer.alloc(len), off);
      } catch (err) {
        note(err, `read(${off}, ${len})`);
      }
    }
    if (r.chance(0.3)) {
      const off = r.int(vs);
      try {
        await disk.allocatedExtents(off, Math.min(vs - off, 64 * MiB));
      } catch (err) {
        note(err, 'allocatedExtents');
      }
    }
    if (writable) {
      // The structures as the engine sees them (header section, log, regions): payload writes never land
      // there. The session's header and log updates happen first (markDataChanged), so every write the
      // engine issues during a write, write-zeroes or trim below is a payload write.
      const spans = disk.placement.spans;
      let prepared = false;
      try {
        await disk.markDataChanged();
        prepared = true;
      } catch (err) {
        note(err, 'markDataChanged');
      }
      const ops = 1 + r.int(3);
      for (let k = 0; k < ops; k++) {
        const len = r.pick([512, 4096, 3000, 64 * KiB, MiB + 4096]);
        const x = r.next();
        const block = hot.length && x < 0.5 ? r.pick(hot) : img.present.length && x < 0.8 ? r.pick(img.present) : -1;
        const off = Math.max(0, Math.min(vs - len, block >= 0 ? block * img.blockSize + r.pick([0, 512]) : r.int(vs)));
        const issuedBefore = fsState.token.writes.length;
        const op = r.next();
        try {
          if (op < 0.6) await disk.write(Buffer.alloc(Math.min(len, vs), 1 + r.int(255)), off);
          else if (op < 0.8) await disk.writeZeroes(off, Math.min(len, vs - off));
          else await disk.trim(off, Math.min(r.pick([len, bs, 2 * bs]), vs - off));
        } catch (err) {
          note(err, 'write');
        }
        if (prepared) {
          for (const [pos, n] of fsState.token.writes.slice(issuedBefore)) {
            const hit = spans.find((x) => pos < x.end && x.start < pos + n);
            if (hit)
              problems.push(
                `a payload ${op < 0.6 ? 'write' : op < 0.8 ? 'write-zeroes' : 'trim'} at ${off} wrote [${pos}, +${n}) into ${hit.name} [${hit.start}, ${hit.end})`,
              );
          }
        }
      }
      try {
        if (r.chance(0.5)) await disk.flush();
        await disk.read(Buffer.alloc(Math.min(4096, vs)), 0);
      } catch (err) {
        note(err, 'flush/read');
      }
    }
  } finally {
    try {
      await disk.close();
    } catch (err) {
      note(err, 'close');
    }
  }
}

let realDir: string;

async function runCase(i: number, failures: Failure[], stats: Record<string, number>): Promise<void> {
  const r = rng(caseSeed(i));
  const img = images[r.int(images.length)];
  const m = new Mut(img);
  const descs: string[] = [];
  const n = r.chance(0.1) ? 2 + r.int(2) : 1;
  for (let k = 0; k < n; k++) descs.push(pickMutator(r, img)(r, m));
  const mutation = descs.join(' + ');
  const writable = r.chance(0.25);
  const mode = writable ? 'writable' : 'read-only';
  syncFile(img, m.touched, m.truncateTo);

  const token = newToken();
  fsState.token = token;
  const openedBefore = fsState.opened.length;
  const problems: string[] = [];
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), CASE_TIMEOUT_MS);
  });
  const t0 = Date.now();
  const outcome = await Promise.race([
    exercise(img, writable, r, problems, m.hot).then(() => 'done' as const),
    timeout,
  ]);
  clearTimeout(timer);
  const elapsed = Date.now() - t0;
  if (outcome === 'timeout') {
    token.aborted = true;
    problems.push(
      `no result after ${CASE_TIMEOUT_MS} ms (hang or runaway work; written so far ${token.written} bytes)`,
    );
  }
  stats.maxMs = Math.max(stats.maxMs ?? 0, elapsed);
  if (process.env.TIDEMARK_FUZZ_SLOW && elapsed > Number(process.env.TIDEMARK_FUZZ_SLOW))
    console.log(`slow case ${i}: ${elapsed} ms ${img.name} ${mode} ${mutation}`);
  if (token.budgetExceeded) problems.push(`wrote more than ${fsState.budget} bytes`);
  for (const u of token.unsafe)
    problems.push(`engine issued a ${u} (Node would use the current file position: offset 0)`);
  for (const p of fsState.opened.slice(openedBefore)) {
    let real = p;
    try {
      real = realpathSync(p);
    } catch {
      // opened then vanished? keep the path as is
    }
    if (real !== realDir && !real.startsWith(realDir + path.sep))
      problems.push(`opened a file outside the temp dir: ${p} (${real})`);
  }
  if (writable || outcome === 'timeout') {
    // MS-VHDX 2.2.1: nothing may rewrite the first 64 KiB after creation.
    const fd = openSync(img.path, 'r');
    const first = Buffer.alloc(64 * KiB);
    readSync(fd, first, 0, first.length, 0);
    closeSync(fd);
    const expected = img.work.subarray(0, 64 * KiB);
    const cut = m.truncateTo ?? img.work.length;
    const want = Buffer.alloc(64 * KiB);
    expected.copy(want, 0, 0, Math.min(64 * KiB, cut));
    if (!first.equals(want)) problems.push('the first 64 KiB (file identifier) changed');
  }
  // A timed-out case may still have work in flight: compare the whole file next time.
  if (outcome === 'timeout') img.dirty = true;
  const rss = process.memoryUsage().rss;
  stats.maxRss = Math.max(stats.maxRss ?? 0, rss);
  if (rss > RSS_LIMIT) problems.push(`RSS ${Math.round(rss / MiB)} MiB exceeds ${RSS_LIMIT / MiB} MiB`);
  stats[outcome] = (stats[outcome] ?? 0) + 1;
  stats[mode] = (stats[mode] ?? 0) + 1;
  if (problems.length) {
    for (const problem of problems) failures.push({ caseNo: i, image: img.name, mutation, mode, problem });
  } else if (ONLY !== undefined) {
    console.log(`case ${i}: ${img.name} ${mode} ${mutation}: no problem`);
  }

  // Restore the working copy and the file: what the mutation touched, what the engine wrote, what was cut.
  for (const [o, len] of m.touched) img.base.copy(img.work, o, o, o + len);
  const size = img.base.length;
  const undo: [number, number][] = [...m.touched];
  for (const [o, len] of token.writes) if (o < size) undo.push([o, Math.min(len, size - o)]);
  const cut = Math.min(m.truncateTo ?? size, token.shrunk ?? size);
  if (cut < size) undo.push([cut, size - cut]);
  syncFile(img, undo);
  if (process.env.TIDEMARK_FUZZ_VERIFY && (!readFileSync(img.path).equals(img.base) || !img.work.equals(img.base))) {
    // A self-check of the harness (TIDEMARK_FUZZ_VERIFY=1): the restore must give back the base image.
    failures.push({
      caseNo: i,
      image: img.name,
      mutation,
      mode,
      problem: 'harness: the restore did not give back the base image',
    });
    img.work = Buffer.from(img.base);
    img.dirty = true;
  }
}

// ------------------------------------------------------------------------------------------------

beforeAll(async () => {
  // tmpfs when there is one: the cases do many small writes and a few whole-file restores.
  const parentDir = process.env.TIDEMARK_FUZZ_DIR ?? (existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir());
  dir = mkdtempSync(path.join(parentDir, 'tidemark-fuzz-'));
  realDir = realpathSync(dir);
  fsState.token = newToken();
  await buildImages();
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('VHDX mutation fuzzer', () => {
  it(
    `${ONLY === undefined ? CASES : 1} seeded cases: only TidemarkErrors, no hang, no stray opens`,
    async () => {
      console.log(
        `fuzz seed ${SEED} (TIDEMARK_FUZZ_SEED), ${ONLY === undefined ? `${CASES} cases (TIDEMARK_FUZZ_CASES)` : `case ${ONLY} only (TIDEMARK_FUZZ_CASE)`}`,
      );
      for (const img of images) {
        console.log(
          `  base ${img.name}: ${img.base.length} bytes, ${img.virtualSize} virtual, ${img.blockSize} block, ${img.present.length} present blocks, ${img.logEntries.length} live log entries`,
        );
      }
      const failures: Failure[] = [];
      const stats: Record<string, number> = {};
      const t0 = Date.now();
      const cpu0 = process.cpuUsage();
      const list = ONLY === undefined ? Array.from({ length: CASES }, (_, i) => i) : [ONLY];
      for (const i of list) {
        await runCase(i, failures, stats);
        if (failures.length >= 2000) break;
      }
      const secs = (Date.now() - t0) / 1000;
      const cpu = process.cpuUsage(cpu0);
      stats.cpuSeconds = Math.round((cpu.user + cpu.system) / 1e5) / 10;
      console.log(
        `fuzz done in ${secs.toFixed(1)} s: ${JSON.stringify({ ...stats, maxRss: `${Math.round((stats.maxRss ?? 0) / MiB)} MiB` })}, ${failures.length} problems`,
      );
      if (failures.length) {
        // Group by the problem's first words (the thrown type and message shape) to show distinct causes.
        const groups = new Map<string, Failure[]>();
        for (const f of failures) {
          const key = f.problem
            .replace(/\d+/g, 'N')
            .replace(/0xN[0-9a-f]*/g, 'H')
            .slice(0, 140);
          groups.set(key, [...(groups.get(key) ?? []), f]);
        }
        const lines = [...groups.values()].map(
          (fs) =>
            `${fs.length} x ${fs[0].problem}\n    first: seed ${SEED} case ${fs[0].caseNo} (${fs[0].image}, ${fs[0].mode}): ${fs[0].mutation}` +
            (fs.length > 1
              ? `\n    also cases ${fs
                  .slice(1, 6)
                  .map((f) => f.caseNo)
                  .join(', ')}`
              : ''),
        );
        console.log(
          `fuzz problems (re-run one with TIDEMARK_FUZZ_SEED=${SEED} TIDEMARK_FUZZ_CASE=n):\n${lines.join('\n')}`,
        );
        expect.fail(
          `${failures.length} fuzz problems in ${groups.size} groups; first ones:\n${lines.slice(0, 12).join('\n')}`,
        );
      }
    },
    Math.max(600_000, CASES * 100),
  );
});

// ------------------------------------------------------------------------------------------------
// Deterministic cases: hostile parent locators, and one minimal reproduction per engine bug the fuzzer
// found (these fail until the engine is fixed; see the messages).

function imageNamed(name: string): Image {
  return images.find((i) => i.name === name)!;
}

/** A copy of the clean child with its locator replaced; returns its path. */
function childWithLocator(file: string, entries: [string, string][], from = 'child'): string {
  const img = imageNamed(from);
  const buf = Buffer.from(img.base);
  const loc = encodeParentLocator({ locatorType: PARENT_LOCATOR_TYPE_VHDX, entries });
  const item = img.items.loc!;
  loc.copy(buf, item.pos);
  buf.writeUInt32LE(loc.length, item.tablePos + 20);
  const out = path.join(dir, file);
  writeFileSync(out, buf);
  return out;
}

/** Opens (and closes) `file`; returns the error, the paths opened and the time it took. */
async function tryOpen(
  file: string,
  opts: Parameters<typeof VhdxFile.open>[1] = {},
  act?: (d: VhdxFile) => Promise<void>,
): Promise<{ err: unknown; opened: string[]; ms: number; token: CaseToken }> {
  const token = newToken();
  fsState.token = token;
  const before = fsState.opened.length;
  const t0 = Date.now();
  let err: unknown;
  try {
    const d = await VhdxFile.open(file, opts);
    try {
      if (act) await act(d);
    } finally {
      await d.close();
    }
  } catch (e) {
    err = e;
  }
  return { err, opened: fsState.opened.slice(before), ms: Date.now() - t0, token };
}

function expectOnlyInside(opened: string[]): void {
  for (const p of opened) {
    const real = realpathSync(p);
    expect(real === realDir || real.startsWith(realDir + path.sep), `opened ${p} (${real})`).toBe(true);
    expect(p).not.toContain('passwd');
  }
}

describe('hostile parent locators (deterministic)', () => {
  const linkage = () => formatLinkage(parentDataWriteGuid);

  it('the locator rewriting used below works: a good locator (through a symlink inside the dir) opens the chain', async () => {
    const file = childWithLocator('det-good.avhdx', [
      ['parent_linkage', linkage()],
      ['relative_path', '.\\link-to-parent.vhdx'],
    ]);
    let parentSeen: string | undefined;
    const r = await tryOpen(file, { allowedRoots: [dir] }, async (d) => {
      parentSeen = d.parentLink?.path;
      await d.read(Buffer.alloc(4096), 0);
    });
    expect(r.err).toBeUndefined();
    expect(parentSeen).toBe(realpathSync(parentPath));
    expectOnlyInside(r.opened);
  });

  const hostile: [string, [string, string][], Record<string, string> | undefined][] = [
    ['relative ..\\..\\etc\\passwd', [['relative_path', `${'..\\'.repeat(16)}etc\\passwd`]], undefined],
    ['absolute \\\\?\\Z:\\etc\\passwd', [['absolute_win32_path', '\\\\?\\Z:\\etc\\passwd']], undefined],
    [
      'volume path mapped to /etc',
      [['volume_path', '\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\passwd']],
      { 'Volume{26a21bda-a627-11d7-9931-806e6f6e6963}': '/etc' },
    ],
    ['drive letter mapped to /', [['absolute_win32_path', 'D:\\etc\\passwd']], { 'D:': '/' }],
    ['a symlink inside the dir to /etc/passwd', [['relative_path', '.\\link-to-passwd']], undefined],
    [
      'all of them at once',
      [
        ['relative_path', '..\\..\\..\\..\\..\\..\\..\\..\\..\\etc\\passwd'],
        ['volume_path', '\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\etc\\passwd'],
        ['absolute_win32_path', '\\\\?\\Z:\\etc\\passwd'],
      ],
      undefined,
    ],
  ];
  for (const [name, entries, pathMap] of hostile) {
    it(`${name}: PATH_NOT_ALLOWED or PARENT_NOT_FOUND, and /etc/passwd is never opened`, async () => {
      const file = childWithLocator('det-hostile.avhdx', [['parent_linkage', linkage()], ...entries]);
      for (const opts of [
        { allowedRoots: [dir], pathMap },
        { pathMap },
        { allowedRoots: [dir], pathMap, writable: true },
      ]) {
        const r = await tryOpen(file, opts);
        expect(r.err).toBeInstanceOf(TidemarkError);
        expect(['PATH_NOT_ALLOWED', 'PARENT_NOT_FOUND']).toContain((r.err as TidemarkError).code);
        expectOnlyInside(r.opened);
      }
    });
  }

  it('a locator naming the disk itself: PARENT_NOT_FOUND, the file is opened once', async () => {
    const file = path.join(dir, 'det-self.avhdx');
    childWithLocator('det-self.avhdx', [
      ['parent_linkage', linkage()],
      ['relative_path', '.\\det-self.avhdx'],
      ['absolute_win32_path', `\\\\?\\Z:${file.split('/').join('\\')}`],
    ]);
    const r = await tryOpen(file, { allowedRoots: [dir] });
    expect(r.err).toBeInstanceOf(TidemarkError);
    expect((r.err as TidemarkError).code).toBe('PARENT_NOT_FOUND');
    expect(r.opened.filter((p) => p === file)).toHaveLength(1);
  });

  it('two children naming each other as parent (a loop) end in a TidemarkError, quickly', async () => {
    // Each names the other, with the other's DataWriteGuid as linkage: the chain never reaches a base.
    const a = path.join(dir, 'det-loop-a.avhdx');
    const b = path.join(dir, 'det-loop-b.avhdx');
    const img = imageNamed('child');
    const dwgA = newGuid();
    const dwgB = newGuid();
    const make = (file: string, own: Buffer, other: string, otherDwg: Buffer) => {
      childWithLocator(path.basename(file), [
        ['parent_linkage', formatLinkage(otherDwg)],
        ['relative_path', `.\\${path.basename(other)}`],
      ]);
      const buf = readFileSync(file);
      for (const o of [64 * KiB, 128 * KiB]) {
        own.copy(buf, o + 32);
        buf.writeUInt32LE(crc32cWithZeroedField(buf.subarray(o, o + 4 * KiB), 4), o + 4);
      }
      writeFileSync(file, buf);
    };
    make(a, dwgA, b, dwgB);
    make(b, dwgB, a, dwgA);
    void img;
    const r = await tryOpen(a, { allowedRoots: [dir] });
    expect(judge(r.err)).toBeUndefined();
    expect(r.err).toBeInstanceOf(TidemarkError);
    expect(r.ms).toBeLessThan(10_000);
  });
});

describe('engine bugs found by the fuzzer (minimal reproductions)', () => {
  it('a locator string with a newline does not break the one-line error message', async () => {
    const file = childWithLocator('det-newline.avhdx', [
      ['parent_linkage', formatLinkage(parentDataWriteGuid)],
      ['relative_path', 'missing.vhdx\nFORGED LOG LINE'],
    ]);
    const r = await tryOpen(file, { allowedRoots: [dir] });
    expect(r.err).toBeInstanceOf(TidemarkError);
    expect((r.err as TidemarkError).code).toBe('PARENT_NOT_FOUND');
    expect((r.err as Error).message).not.toMatch(/[\r\n]/);
  });

  /** The fixed image with block 0's BAT entry (FULLY_PRESENT) pointing at FileOffsetMB = `mb`; writes 4 KiB at 0. */
  async function writeThroughBat(name: string, mb: number) {
    const img = imageNamed('fixed');
    const buf = Buffer.from(img.base);
    buf.writeUInt32LE((((mb % 4096) << 20) | 6) >>> 0, img.bat.offset);
    buf.writeUInt32LE(Math.floor(mb / 4096) >>> 0, img.bat.offset + 4);
    const file = path.join(dir, name);
    writeFileSync(file, buf);
    fsState.passthroughUnsafe = true;
    try {
      const r = await tryOpen(file, { writable: true, allowedRoots: [dir] }, async (d) => {
        await d.write(Buffer.alloc(4096, 0xee), 0);
        await d.flush();
      });
      return { ...r, head: readFileSync(file).subarray(0, 8).toString('latin1') };
    } finally {
      fsState.passthroughUnsafe = false;
    }
  }

  it('a present BAT entry at FileOffsetMB 2^44-1 (just under 2^64 bytes): a write fails cleanly, no RangeError', async () => {
    const r = await writeThroughBat('det-bat-2e64.vhdx', 2 ** 44 - 1);
    // today: RangeError from encodeLogEntry: the file end computed from the BAT is 2^64 (vhdx.ts scanFileEnd)
    expect(r.err === undefined ? undefined : judge(r.err)).toBeUndefined();
    expect(r.head).toBe('vhdxfile');
  });

  it('a present BAT entry at 2^60 bytes: the write does not land at file offset 0 (over the file identifier)', async () => {
    const r = await writeThroughBat('det-bat-2e60.vhdx', 2 ** 40);
    expect(r.err === undefined ? undefined : judge(r.err)).toBeUndefined();
    // today: NodeFile.write is asked for position 2^60, which Node (not a safe integer) turns into "the
    // current file position" = 0: the guest's 4 KiB overwrite the "vhdxfile" signature, and the open succeeds.
    expect.soft(r.token.unsafe).toEqual([]);
    expect(r.head).toBe('vhdxfile');
  });

  it('a fixed disk block in UNMAPPED state whose offset points at the metadata region: a write there keeps the disk', async () => {
    // MS-VHDX 2.5.1.1: FileOffsetMB of a non-present entry is reserved (ZERO, NOT_PRESENT) or must point at
    // the block's old content. The engine "reuses the preallocated location" of a fixed disk's block without
    // checking it: here block 7's location is the metadata region, which the write zero-fills.
    const img = imageNamed('fixed');
    const buf = Buffer.from(img.base);
    const idx = 7; // chunk ratio is large: payload BAT index == block number
    const mb = img.md.offset / MiB;
    buf.writeUInt32LE((((mb % 4096) << 20) | 3) >>> 0, img.bat.offset + idx * 8);
    buf.writeUInt32LE(Math.floor(mb / 4096), img.bat.offset + idx * 8 + 4);
    const file = path.join(dir, 'det-reuse-metadata.vhdx');
    writeFileSync(file, buf);
    let before: Buffer | undefined;
    const r0 = await tryOpen(file, { allowedRoots: [dir] }, async (d) => {
      before = await d.readAt(3 * MiB, 4096);
    });
    expect(r0.err).toBeUndefined();
    expect(before!.equals(Buffer.alloc(4096))).toBe(false); // block 3 holds data
    const r = await tryOpen(file, { writable: true, allowedRoots: [dir] }, async (d) => {
      await d.write(Buffer.alloc(4096, 0x77), 7 * MiB + 8192);
    });
    expect(r.err === undefined ? undefined : judge(r.err)).toBeUndefined();
    let after: Buffer | undefined;
    const r2 = await tryOpen(file, { allowedRoots: [dir] }, async (d) => {
      after = await d.readAt(3 * MiB, 4096);
    });
    // Either the write was refused (corrupt entry) or it went elsewhere: block 3 must read as before.
    expect(r2.err === undefined ? undefined : judge(r2.err)).toBeUndefined();
    expect(after?.equals(before!), `block 3 after writing into block 7 (reopen: ${(r2.err as Error)?.message})`).toBe(
      true,
    );
  });

  it('a header LogOffset of 2^53 (no log to replay): a writable session does not write its log entry at offset 0', async () => {
    // LogOffset is checked for 1 MiB alignment only. The first change of a session writes a log entry at
    // LogOffset + 0 = 2^53, not a safe integer: Node writes it at the current file position, 0.
    const img = imageNamed('fixed');
    const buf = Buffer.from(img.base);
    for (const o of [64 * KiB, 128 * KiB]) {
      buf.writeBigUInt64LE(1n << 53n, o + 72);
      buf.writeUInt32LE(crc32cWithZeroedField(buf.subarray(o, o + 4 * KiB), 4), o + 4);
    }
    const file = path.join(dir, 'det-log-offset.vhdx');
    writeFileSync(file, buf);
    fsState.passthroughUnsafe = true;
    let r: Awaited<ReturnType<typeof tryOpen>>;
    try {
      r = await tryOpen(file, { writable: true, allowedRoots: [dir] }, async (d) => {
        await d.write(Buffer.alloc(4096, 0x55), 0);
      });
    } finally {
      fsState.passthroughUnsafe = false;
    }
    expect(r.err === undefined ? undefined : judge(r.err)).toBeUndefined();
    expect.soft(r.token.unsafe).toEqual([]);
    expect(readFileSync(file).subarray(0, 8).toString('latin1')).toBe('vhdxfile');
  });

  it('a header sequence number of 2^64-1: a writable session fails cleanly instead of RangeError', async () => {
    const img = imageNamed('fixed');
    const buf = Buffer.from(img.base);
    for (const o of [64 * KiB, 128 * KiB]) {
      buf.writeBigUInt64LE((1n << 64n) - 1n, o + 8);
      buf.writeUInt32LE(crc32cWithZeroedField(buf.subarray(o, o + 4 * KiB), 4), o + 4);
    }
    const file = path.join(dir, 'det-seq-max.vhdx');
    writeFileSync(file, buf);
    const r = await tryOpen(file, { writable: true, allowedRoots: [dir] }, async (d) => {
      await d.write(Buffer.alloc(512, 1), 0);
    });
    expect(r.err === undefined ? undefined : judge(r.err)).toBeUndefined(); // today: RangeError from encodeHeader (sequence 2^64)
  });

  it('a log zero descriptor of 1 TiB: a writable open (replay) does not write a terabyte of zeros', async () => {
    const img = imageNamed('dyn');
    const buf = Buffer.from(img.base);
    const head = img.logEntries.reduce((a, b) => (b.seq > a.seq ? b : a));
    const pos = (head.pos + head.length) % img.logLength;
    const entry = encodeLogEntry({
      tail: pos,
      sequenceNumber: head.seq + 1n,
      logGuid: img.header.logGuid,
      flushedFileOffset: 0,
      lastFileOffset: img.base.length,
      ops: [{ kind: 'zero', fileOffset: img.base.length, length: 2 ** 40 }],
    });
    entry.copy(buf, img.logOffset + pos);
    const file = path.join(dir, 'det-zero-tib.vhdx');
    writeFileSync(file, buf);
    // Read-only replay is in memory and cheap:
    const ro = await tryOpen(file, { allowedRoots: [dir] });
    expect(ro.err === undefined ? undefined : judge(ro.err)).toBeUndefined();
    const r = await Promise.race([
      tryOpen(file, { writable: true, allowedRoots: [dir] }),
      new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 5000)),
    ]);
    fsState.token.aborted = true;
    expect(r, 'writable open did not finish within 5 s').toBeDefined();
    expect(r!.token.budgetExceeded, `wrote ${r!.token.written} bytes`).toBe(false);
    expect(r!.token.written).toBeLessThan(64 * MiB);
  });

  it('log scan cost is bounded: a 3 MiB log of entry headers that each claim the whole ring opens (and fails) fast', async () => {
    // Every 4 KiB sector is an entry header with the right LogGuid claiming EntryLength = the whole log and
    // a wrong checksum: the scan computes a CRC over the whole ring at every sector (quadratic work). With
    // the 64 MiB logs the engine accepts, that is 16384 x 64 MiB = 1 TiB of CRC-32C: the open never ends.
    const img = imageNamed('fixed');
    const L = 3 * MiB;
    const logOffset = MiB;
    const buf = Buffer.alloc(logOffset + L);
    img.base.copy(buf, 0, 0, MiB);
    const logGuid = newGuid();
    for (const o of [64 * KiB, 128 * KiB]) {
      logGuid.copy(buf, o + 48);
      buf.writeUInt32LE(L, o + 68);
      buf.writeBigUInt64LE(BigInt(logOffset), o + 72);
      buf.writeUInt32LE(crc32cWithZeroedField(buf.subarray(o, o + 4 * KiB), 4), o + 4);
    }
    for (let pos = 0; pos < L; pos += 4 * KiB) {
      const h = logOffset + pos;
      buf.write('loge', h, 'latin1');
      buf.writeUInt32LE(0xdeadbeef, h + 4); // wrong checksum
      buf.writeUInt32LE(L, h + 8); // EntryLength: the whole ring
      buf.writeUInt32LE(pos, h + 12); // Tail: itself
      buf.writeBigUInt64LE(1n + BigInt(pos / 4096), h + 16);
      buf.writeUInt32LE(0, h + 24); // no descriptors
      logGuid.copy(buf, h + 32);
    }
    const file = path.join(dir, 'det-log-scan.vhdx');
    writeFileSync(file, buf);
    const r = await tryOpen(file, { allowedRoots: [dir] });
    expect(judge(r.err)).toBeUndefined();
    expect(r.err).toBeInstanceOf(TidemarkError);
    expect(r.ms, 'read-only open of a 3 MiB crafted log (a bounded scan takes milliseconds)').toBeLessThan(1000);
  }, 300_000);
});
