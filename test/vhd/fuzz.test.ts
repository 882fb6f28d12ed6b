/**
 * Seeded mutation fuzzer for the VHD engine. Small base images (a dynamic disk with 512 KiB blocks, a
 * fixed disk, a differencing child with 2 MiB blocks over a dynamic parent, and a dynamic disk whose end
 * footer was lost in a crash) are built once and held in memory; every case mutates one structure of one
 * image (footer copies, dynamic header, parent locator entries and their data, BAT entries, sector
 * bitmaps, random bytes, truncation), writes the image to its file, opens it (read-only, sometimes
 * writable), reads a few ranges, maybe writes and flushes, and closes it.
 *
 * Oracle: every operation either succeeds or throws a TidemarkError with a known `code` and a one-line
 * message. Also: no case takes more than 2 s, RSS stays under 1.5 GiB, no file outside the temp directory
 * is ever opened, the engine never issues a read or write at a position Node cannot represent (Node then
 * uses the current file position, i.e. offset 0), never writes more than 64 MiB in a case, and never
 * writes into the dynamic header or a parent locator's data (nothing in the engine rewrites them).
 *
 * TIDEMARK_VHD_FUZZ_SEED (default 20261206) and TIDEMARK_VHD_FUZZ_CASES (default 10000) select the run;
 * TIDEMARK_VHD_FUZZ_CASE=n re-runs case n alone and prints the full error; TIDEMARK_VHD_FUZZ_DIR (where the
 * images live; default /dev/shm when present). Base images hold random unique ids, so a case reproduces
 * the same mutation and path, not the same id bytes.
 */
import {
  closeSync,
  existsSync,
  fstatSync,
  ftruncateSync,
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
// File-system instrumentation: every open is recorded; every handle is wrapped so a timed-out case can
// be stopped, runaway writes are bounded, and unrepresentable positions are caught.

interface CaseToken {
  aborted: boolean;
  written: number;
  budgetExceeded: boolean;
  unsafe: string[];
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
  budget: 64 * 1024 * 1024,
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
        throw errno('EINVAL', `fuzzer refused ${op} at unsafe position ${position}`);
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
        if (prop === 'datasync' || prop === 'sync') return async () => check(String(prop), undefined);
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

import { TidemarkError } from '../../src/errors.js';
import { vhdChecksum } from '../../src/formats/vhd/checksum.js';
import { PLATFORM, type PlatformName } from '../../src/formats/vhd/constants.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { decodeDynamicHeader } from '../../src/formats/vhd/header.js';
import { encodeAlias, encodeLocatorData } from '../../src/formats/vhd/locator.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { rng as sharedRng, type Rng } from '../helpers/random.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const SEED = Number(process.env.TIDEMARK_VHD_FUZZ_SEED ?? 20261206) >>> 0;
const CASES = Number(process.env.TIDEMARK_VHD_FUZZ_CASES ?? 10000);
const ONLY = process.env.TIDEMARK_VHD_FUZZ_CASE === undefined ? undefined : Number(process.env.TIDEMARK_VHD_FUZZ_CASE);
const CASE_TIMEOUT_MS = 2000;
const RSS_LIMIT = 1.5 * 1024 * MiB;
const ERROR_CODES = new Set([
  'INVALID_ARGUMENT',
  'NOT_FOUND',
  'IO_ERROR',
  'READ_ONLY',
  'VHD_CORRUPT',
  'VHD_UNSUPPORTED',
  'VHD_TRUNCATED',
  'PARENT_NOT_FOUND',
  'PARENT_MISMATCH',
  'PATH_NOT_ALLOWED',
  'LIMIT_EXCEEDED',
]);

// ------------------------------------------------------------------------------------------------
// PRNG: the shared mulberry32 (helpers/prng.mjs), one stream per case so any case can be re-run alone.
// Bytes one draw each, as this file always drew them, so printed seeds replay.

function rng(seed: number): Rng {
  const r = sharedRng(seed);
  return { ...r, bytes: r.bytesEach };
}

function caseSeed(i: number): number {
  let h = (SEED ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

// ------------------------------------------------------------------------------------------------
// Base images and their structure maps.

interface Image {
  name: string;
  path: string;
  base: Buffer;
  work: Buffer;
  dirty: boolean;
  dynamic: boolean;
  isChild: boolean;
  virtualSize: number;
  blockSize: number;
  bitmapBytes: number;
  tableOffset: number;
  entries: number;
  /** Blocks with data in this file: [block, bitmap offset]. */
  present: [number, number][];
  locators: { entryAt: number; dataAt: number; length: number }[];
  /** Ranges nothing may write to: the dynamic header and the locators' data. */
  protected: [number, number][];
}

let dir: string;
let realDir: string;
let images: Image[];

function pattern(len: number, seed: number): Buffer {
  return rng(seed).bytes(len);
}

function mapImage(name: string, file: string): Image {
  const base = readFileSync(file);
  const dynamic = base.subarray(0, 8).toString('latin1') === 'conectix';
  const img: Image = {
    name,
    path: file,
    base,
    work: Buffer.from(base),
    dirty: false,
    dynamic,
    isChild: false,
    // The footer at the end, or (its end lost in a crash) the copy at 0.
    virtualSize: Number(base.readBigUInt64BE((dynamic ? 0 : base.length - 512) + 48)),
    blockSize: 0,
    bitmapBytes: 0,
    tableOffset: 0,
    entries: 0,
    present: [],
    locators: [],
    protected: [],
  };
  if (!dynamic) return img;
  const h = decodeDynamicHeader(base.subarray(512, 1536), 512);
  img.isChild = base.readUInt32BE(60) === 4;
  img.blockSize = h.blockSize;
  img.bitmapBytes = Math.ceil(h.blockSize / 512 / 8 / 512) * 512;
  img.tableOffset = h.tableOffset;
  img.entries = h.maxTableEntries;
  for (let b = 0; b < h.maxTableEntries; b++) {
    const e = base.readUInt32BE(h.tableOffset + b * 4);
    if (e !== 0xffffffff) img.present.push([b, e * 512]);
  }
  img.protected.push([512, 1536]);
  h.locators.forEach((l, i) => {
    if (l.code === 0) return;
    img.locators.push({ entryAt: 512 + 576 + i * 24, dataAt: l.dataOffset, length: l.dataLength });
    img.protected.push([l.dataOffset, l.dataOffset + l.dataLength]);
  });
  return img;
}

async function buildImages(): Promise<void> {
  const dyn = path.join(dir, 'dyn.vhd');
  await createVhd(dyn, { size: 8 * MiB, blockSize: 512 * KiB });
  let d = await VhdFile.open(dyn, { writable: true });
  await d.write(pattern(MiB + 1000, 1), 700);
  await d.write(pattern(4096, 2), 5 * MiB + 8192);
  await d.close();

  const fixed = path.join(dir, 'fixed.vhd');
  await createVhd(fixed, { size: 4 * MiB, type: 'fixed' });
  d = await VhdFile.open(fixed, { writable: true });
  await d.write(pattern(2 * MiB, 3), MiB - 512);
  await d.close();

  const parent = path.join(dir, 'parent.vhd');
  await createVhd(parent, { size: 8 * MiB, blockSize: 2 * MiB });
  d = await VhdFile.open(parent, { writable: true });
  await d.write(pattern(6 * MiB, 4), 0);
  await d.close();
  const child = path.join(dir, 'child.vhd');
  await createVhd(child, { parent, locators: ['W2ru', 'W2ku', 'MacX', 'Mac'] });
  d = await VhdFile.open(child, { writable: true });
  await d.write(pattern(512, 5), 0);
  await d.write(pattern(100 * KiB, 6), 3 * MiB + 7 * 512);
  await d.write(pattern(2 * MiB, 7), 4 * MiB);
  await d.close();

  // A dynamic disk whose session ended in a crash after a block was added: the end footer is gone.
  const lost = path.join(dir, 'lost.vhd');
  await createVhd(lost, { size: 6 * MiB, blockSize: 512 * KiB });
  d = await VhdFile.open(lost, { writable: true });
  await d.write(pattern(3000, 8), 100);
  await d.flush();
  await d.write(pattern(4096, 9), 3 * MiB);
  await d.abandon();

  images = [mapImage('dyn', dyn), mapImage('fixed', fixed), mapImage('child', child), mapImage('lost', lost)];
  symlinkSync('/etc/passwd', path.join(dir, 'link-to-passwd'));
  symlinkSync(parent, path.join(dir, 'link-to-parent.vhd'));
}

// ------------------------------------------------------------------------------------------------
// Mutations, through `Mut`, which remembers the touched ranges so the file can be restored cheaply.

class Mut {
  touched: [number, number][] = [];
  truncateTo: number | undefined;
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
    b.writeUInt16BE(v & 0xffff);
    this.set(off, b);
  }
  u32(off: number, v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    this.set(off, b);
  }
  u64(off: number, v: bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt.asUintN(64, v));
    this.set(off, b);
  }
  /** Recomputes the checksum of the footer at `off` (512 bytes, field at 64) or the header (1024, at 36). */
  fixFooter(off: number): void {
    if (off < 0 || off + 512 > this.buf.length) return;
    this.u32(off + 64, vhdChecksum(this.buf.subarray(off, off + 512), 64));
  }
  fixHeader(): void {
    if (this.buf.length >= 1536) this.u32(512 + 36, vhdChecksum(this.buf.subarray(512, 1536), 36));
  }
}

// prettier-ignore
const U32_POOL = [
  0, 1, 2, 3, 4, 7, 8, 0x7f, 0x80, 0xff, 0x100, 511, 512, 513, 1023, 1024, 1536, 2048, 4095, 4096, 4097, 0x7fff,
  0x10000, 0x10001, MiB - 1, MiB, 2 * MiB, 512 * KiB, 256 * MiB, 256 * MiB + 1, 0x7fffffff, 0x80000000,
  0xfffffffe, 0xffffffff,
];
// prettier-ignore
const U64_POOL: bigint[] = [
  0n, 1n, 511n, 512n, 513n, 1024n, 1536n, 1537n, 4096n, 1n << 20n, 8n << 20n, 1n << 32n, 1n << 40n,
  0xff000000n * 512n, 0xff000000n * 512n + 512n, (1n << 53n) - 1n, 1n << 53n, (1n << 53n) + 512n, 1n << 63n,
  (1n << 64n) - 512n, (1n << 64n) - 1n,
];
const u32Val = (r: Rng) => (r.chance(0.8) ? r.pick(U32_POOL) : r.u32());
const u64Val = (r: Rng, extra: number[] = []) => {
  const x = r.next();
  if (x < 0.25 && extra.length) return BigInt(r.pick(extra));
  if (x < 0.85) return r.pick(U64_POOL);
  return (BigInt(r.u32()) << 32n) | BigInt(r.u32());
};
const hex = (n: number | bigint) => `0x${n.toString(16)}`;

function sizesOf(img: Image): number[] {
  return [0, 512, img.virtualSize - 512, img.virtualSize, img.virtualSize + 512, img.base.length, img.base.length * 2];
}

type Mutator = (r: Rng, m: Mut) => string;

const mutateFooter: Mutator = (r, m) => {
  const img = m.img;
  const ends = img.dynamic ? r.pick([['end'], ['start'], ['end', 'start']] as const) : (['end'] as const);
  const offs = ends.map((e) => (e === 'end' ? img.work.length - 512 : 0));
  const field = r.pick([
    'features',
    'version',
    'dataOffset',
    'timeStamp',
    'creator',
    'currentSize',
    'originalSize',
    'geometry',
    'diskType',
    'diskType',
    'uniqueId',
    'savedState',
    'cookie',
    'length511',
  ] as const);
  for (const o of offs) {
    switch (field) {
      case 'features':
        m.u32(o + 8, u32Val(r));
        break;
      case 'version':
        m.u32(o + 12, r.pick([0, 0x00010001, 0x00020000, 0xffffffff, u32Val(r)]));
        break;
      case 'dataOffset':
        m.u64(o + 16, u64Val(r, [0, 512, 513, 1024, 1536, img.base.length - 512, img.base.length]));
        break;
      case 'timeStamp':
        m.u32(o + 24, r.pick([0, 1, 0xffffffff, u32Val(r)]));
        break;
      case 'creator':
        m.set(o + 28, Buffer.from(r.pick(['win ', 'vpc ', 'qem2', 'd2v ', '\0\0\0\0', 'tdmk'])));
        break;
      case 'currentSize':
        m.u64(o + 48, u64Val(r, sizesOf(img)));
        break;
      case 'originalSize':
        m.u64(o + 40, u64Val(r));
        break;
      case 'geometry':
        m.u32(o + 56, u32Val(r));
        break;
      case 'diskType':
        m.u32(o + 60, r.pick([0, 1, 2, 3, 4, 5, 6, 0xffffffff]));
        break;
      case 'uniqueId':
        m.set(o + 68, r.bytes(16));
        break;
      case 'savedState':
        m.u8(o + 84, r.pick([0, 1, 0xff]));
        break;
      case 'cookie':
        m.set(o, Buffer.from(r.pick(['conectiX', 'cxsparse', '\0\0\0\0\0\0\0\0'])));
        break;
      case 'length511':
        // The footer one byte earlier (a 511-byte footer): shifts the whole copy.
        m.set(o - 1, Buffer.from(m.buf.subarray(o, o + 512)));
        break;
    }
  }
  const fix = r.chance(0.8);
  if (fix) for (const o of offs) m.fixFooter(o);
  return `footer ${ends.join('+')} ${field} checksum=${fix ? 'fixed' : 'stale'}`;
};

const mutateHeader: Mutator = (r, m) => {
  const img = m.img;
  if (!img.dynamic) return mutateFooter(r, m);
  const field = r.pick([
    'dataOffset',
    'tableOffset',
    'tableOffset',
    'version',
    'entries',
    'entries',
    'blockSize',
    'blockSize',
    'parentId',
    'parentTime',
    'parentName',
    'cookie',
  ] as const);
  const h = 512;
  switch (field) {
    case 'dataOffset':
      m.u64(h + 8, u64Val(r));
      break;
    case 'tableOffset':
      m.u64(h + 16, u64Val(r, [0, 512, 1024, 1536, 2048, img.base.length - 512, img.base.length]));
      break;
    case 'version':
      m.u32(h + 24, r.pick([0, 0x00010001, 0x00020000, u32Val(r)]));
      break;
    case 'entries':
      m.u32(h + 28, r.pick([0, 1, img.entries - 1, img.entries + 1, 2 ** 24, 2 ** 24 + 1, u32Val(r)]));
      break;
    case 'blockSize':
      m.u32(h + 32, r.pick([0, 256, 512, 4096, 512 * KiB, 2 * MiB, 3 * MiB, 256 * MiB, 512 * MiB, u32Val(r)]));
      break;
    case 'parentId':
      m.set(h + 40, r.bytes(16));
      break;
    case 'parentTime':
      m.u32(h + 56, r.pick([0, 0xffffffff, u32Val(r)]));
      break;
    case 'parentName': {
      const name = r.pick(['../../etc/passwd', 'link-to-passwd', 'parent.vhd', 'child.vhd', '\ud800x', '']);
      const b = Buffer.from(name, 'utf16le').swap16();
      const field = Buffer.alloc(512);
      b.copy(field, 0, 0, Math.min(b.length, 510));
      m.set(h + 64, field);
      break;
    }
    case 'cookie':
      m.set(h, Buffer.from('cxsparsX'));
      break;
  }
  const fix = r.chance(0.8);
  if (fix) m.fixHeader();
  return `dynamic header ${field} checksum=${fix ? 'fixed' : 'stale'}`;
};

const HOSTILE: [PlatformName, string][] = [
  ['W2ru', `${'..\\'.repeat(12)}etc\\passwd`],
  ['W2ku', 'Z:\\etc\\passwd'],
  ['W2ku', '\\\\?\\Z:\\etc\\passwd'],
  ['W2ru', '.\\link-to-passwd'],
  ['W2ru', '.\\link-to-parent.vhd'],
  ['W2ru', '.\\child.vhd'],
  ['W2ru', '.\\sub\\..\\parent.vhd'],
  ['MacX', '/etc/passwd'],
  ['Mac', '/etc/passwd'],
  ['Wi2k', 'Z:\\etc\\passwd'],
  ['W2ku', 'D:\\parent.vhd'],
];

const mutateLocator: Mutator = (r, m) => {
  const img = m.img;
  if (!img.isChild) return mutateHeader(r, m);
  const l = r.pick(img.locators);
  const what = r.pick(['code', 'space', 'length', 'offset', 'data', 'hostile', 'hostile'] as const);
  let desc = '';
  if (what === 'code') {
    const v = r.pick([0, PLATFORM.W2ru, PLATFORM.W2ku, PLATFORM.Mac, PLATFORM.MacX, PLATFORM.Wi2k, 0x41414141]);
    m.u32(l.entryAt, v);
    desc = `code=${hex(v)}`;
  } else if (what === 'space') {
    const v = u32Val(r);
    m.u32(l.entryAt + 4, v);
    desc = `space=${v}`;
  } else if (what === 'length') {
    const v = r.pick([0, 1, 3, l.length - 1, l.length + 1, 65536, 65537, u32Val(r)]);
    m.u32(l.entryAt + 8, v);
    desc = `length=${v}`;
  } else if (what === 'offset') {
    const v = u64Val(r, [0, 512, 1024, 1536, img.tableOffset, img.base.length - 512, img.base.length]);
    m.u64(l.entryAt + 16, v);
    desc = `offset=${hex(v)}`;
  } else if (what === 'data') {
    const n = 1 + r.int(Math.max(1, l.length));
    m.set(l.dataAt + r.int(l.length), r.bytes(n));
    desc = `${n} random data bytes`;
  } else {
    // A hostile path in a locator's own room, with its code and length.
    const [platform, value] = r.pick(HOSTILE);
    const data = platform === 'Mac' ? encodeAlias(value) : encodeLocatorData(platform, value);
    if (data.length <= 512) {
      m.u32(l.entryAt, PLATFORM[platform]);
      m.u32(l.entryAt + 8, data.length);
      m.set(l.dataAt, data);
    }
    desc = `hostile ${platform} ${JSON.stringify(value)}`;
  }
  const fix = r.chance(0.85);
  if (fix) m.fixHeader();
  return `locator @${l.entryAt} ${desc} checksum=${fix ? 'fixed' : 'stale'}`;
};

const mutateBat: Mutator = (r, m) => {
  const img = m.img;
  if (!img.dynamic) return mutateFooter(r, m);
  const parts: string[] = [];
  for (let j = 1 + r.int(3); j > 0; j--) {
    const idx = r.chance(0.6) && img.present.length ? r.pick(img.present)[0] : r.int(img.entries + 2);
    const at = img.tableOffset + idx * 4;
    const other = img.present.length ? r.pick(img.present)[1] / 512 : 7;
    const v = r.chance(0.7)
      ? r.pick([
          0,
          1,
          2,
          3,
          img.tableOffset / 512,
          other,
          other + 1,
          other - 1,
          Math.floor(img.base.length / 512) - 1,
          Math.floor(img.base.length / 512),
          Math.floor(img.base.length / 512) + 1000,
          0x7fffffff,
          0xfffffffe,
          0xffffffff,
        ])
      : r.u32();
    m.u32(at, v);
    parts.push(`bat[${idx}]=${hex(v)}`);
  }
  return parts.join('; ');
};

const mutateBitmap: Mutator = (r, m) => {
  const img = m.img;
  if (!img.dynamic || img.present.length === 0) return mutateBat(r, m);
  const [block, at] = r.pick(img.present);
  const k = 1 + r.int(8);
  for (let j = 0; j < k; j++) {
    const o = at + r.int(img.bitmapBytes);
    m.u8(o, r.pick([0, 0xff, 0x10, 0x80, 0x01, r.int(256)]));
  }
  return `${k} bytes of block ${block}'s bitmap`;
};

const mutateFlips: Mutator = (r, m) => {
  const img = m.img;
  const areas: [string, number, number][] = [
    ['end footer', img.work.length - 512, 512],
    ['file', 0, img.work.length],
  ];
  if (img.dynamic) {
    areas.push(['footer copy', 0, 512], ['dynamic header', 512, 1024], ['bat', img.tableOffset, img.entries * 4]);
  }
  const [name, start, len] = r.pick(areas);
  const k = 1 + r.int(16);
  for (let j = 0; j < k; j++) {
    const at = start + r.int(len);
    m.u8(at, m.buf[at] ^ (1 + r.int(255)));
  }
  const fix = r.chance(0.5);
  if (fix) {
    m.fixFooter(img.work.length - 512);
    if (img.dynamic) {
      m.fixFooter(0);
      m.fixHeader();
    }
  }
  return `${k} byte flips in ${name} checksums=${fix ? 'fixed' : 'stale'}`;
};

const mutateTruncate: Mutator = (r, m) => {
  const size = m.img.base.length;
  const v = r.pick([
    0,
    7,
    100,
    511,
    512,
    520,
    1536,
    2047,
    4096,
    size - 1,
    size - 511,
    size - 512,
    size - 4096,
    r.int(size),
  ]);
  m.truncateTo = Math.max(0, Math.min(size, Math.floor(v)));
  return `truncate to ${m.truncateTo} of ${size}`;
};

const MUTATORS: [Mutator, number][] = [
  [mutateFooter, 16],
  [mutateHeader, 14],
  [mutateLocator, 12],
  [mutateBat, 16],
  [mutateBitmap, 8],
  [mutateFlips, 12],
  [mutateTruncate, 6],
];
const TOTAL_WEIGHT = MUTATORS.reduce((n, [, w]) => n + w, 0);

function pickMutator(r: Rng): Mutator {
  let x = r.int(TOTAL_WEIGHT);
  for (const [f, w] of MUTATORS) {
    if (x < w) return f;
    x -= w;
  }
  return MUTATORS[0][0];
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

/** Makes the file equal `img.work` cut to `length`, rewriting `ranges` (or comparing all of a dirty file). */
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
      for (const [o, n] of mergeRanges(ranges)) if (o < length) writeSync(fd, img.work, o, Math.min(n, length - o), o);
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
  if (!ERROR_CODES.has(err.code)) return `TidemarkError with unexpected code ${String(err.code)}: ${err.message}`;
  if (!err.message) return `TidemarkError ${err.code} without a message`;
  if (/[\r\n]/.test(err.message)) return `TidemarkError ${err.code} message is not one line`;
  return undefined;
}

async function exercise(
  img: Image,
  writable: boolean,
  r: Rng,
  problems: string[],
  stats: Record<string, number>,
): Promise<void> {
  const note = (err: unknown, where: string) => {
    const key = `${where.replace(/\(.*/, '')}:${(err as TidemarkError)?.code ?? 'thrown'}`;
    stats[key] = (stats[key] ?? 0) + 1;
    const p = judge(err);
    if (p) problems.push(`${where}: ${p}`);
    if (p && ONLY !== undefined) console.log(`case ${ONLY} ${where}:`, err);
  };
  let disk: VhdFile;
  try {
    disk = await VhdFile.open(img.path, { writable, allowedRoots: [dir] });
  } catch (err) {
    note(err, 'open');
    return;
  }
  stats.opened = (stats.opened ?? 0) + 1;
  try {
    const vs = disk.virtualSize;
    const bs = disk.blockSize ?? MiB;
    for (let k = 1 + r.int(4); k > 0; k--) {
      const len = Math.min(vs, r.pick([1, 512, 4096, 3 * 512 + 7, 64 * KiB, 200 * KiB]));
      const x = r.next();
      let off: number;
      if (x < 0.4 && img.present.length) off = r.pick(img.present)[0] * bs + r.pick([0, 512, 4096, 7 * 512 + 3]);
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
      try {
        await disk.allocatedExtents();
      } catch (err) {
        note(err, 'allocatedExtents');
      }
    }
    if (writable) {
      const len = Math.min(vs, r.pick([512, 4096, 3000, 64 * KiB, MiB + 4096]));
      const off = Math.max(
        0,
        Math.min(vs - len, r.chance(0.5) && img.present.length ? r.pick(img.present)[0] * bs + 512 : r.int(vs)),
      );
      try {
        const op = r.next();
        if (op < 0.7) await disk.write(Buffer.alloc(len, 1 + r.int(255)), off);
        else await disk.writeZeroes(off, len);
        if (r.chance(0.5)) await disk.flush();
        await disk.read(Buffer.alloc(Math.min(4096, vs)), Math.min(off, vs - Math.min(4096, vs)));
      } catch (err) {
        note(err, 'write');
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

async function runCase(i: number, failures: Failure[], stats: Record<string, number>): Promise<void> {
  const r = rng(caseSeed(i));
  const img = images[r.int(images.length)];
  const m = new Mut(img);
  const descs: string[] = [];
  for (let k = r.chance(0.1) ? 2 + r.int(2) : 1; k > 0; k--) descs.push(pickMutator(r)(r, m));
  const mutation = descs.join(' + ');
  const writable = r.chance(0.15);
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
    exercise(img, writable, r, problems, stats).then(() => 'done' as const),
    timeout,
  ]);
  clearTimeout(timer);
  stats.maxMs = Math.max(stats.maxMs ?? 0, Date.now() - t0);
  if (outcome === 'timeout') {
    token.aborted = true;
    img.dirty = true;
    problems.push(`no result after ${CASE_TIMEOUT_MS} ms (hang or runaway work; written ${token.written} bytes)`);
  }
  if (token.budgetExceeded) problems.push(`wrote more than ${fsState.budget} bytes`);
  for (const u of token.unsafe) problems.push(`engine issued a ${u}`);
  for (const p of fsState.opened.slice(openedBefore)) {
    let real = p;
    try {
      real = realpathSync(p);
    } catch {
      // vanished: keep the path
    }
    if (real !== realDir && !real.startsWith(realDir + path.sep))
      problems.push(`opened a file outside the temp dir: ${p}`);
  }
  for (const [o, n] of token.writes) {
    const hit = img.protected.find(([a, b]) => o < b && a < o + n);
    if (hit) problems.push(`wrote [${o}, ${o + n}) over a structure nothing rewrites [${hit[0]}, ${hit[1]})`);
  }
  const rss = process.memoryUsage().rss;
  stats.maxRss = Math.max(stats.maxRss ?? 0, rss);
  if (rss > RSS_LIMIT) problems.push(`RSS ${Math.round(rss / MiB)} MiB exceeds ${RSS_LIMIT / MiB} MiB`);
  stats[outcome] = (stats[outcome] ?? 0) + 1;
  stats[mode] = (stats[mode] ?? 0) + 1;
  for (const problem of problems) failures.push({ caseNo: i, image: img.name, mutation, mode, problem });
  if (!problems.length && ONLY !== undefined) console.log(`case ${i}: ${img.name} ${mode} ${mutation}: no problem`);

  // Restore: what the mutation touched, what the engine wrote, what was cut.
  for (const [o, len] of m.touched) img.base.copy(img.work, o, o, o + len);
  const size = img.base.length;
  const undo: [number, number][] = [...m.touched];
  for (const [o, len] of token.writes) if (o < size) undo.push([o, Math.min(len, size - o)]);
  const cut = Math.min(m.truncateTo ?? size, token.shrunk ?? size);
  if (cut < size) undo.push([cut, size - cut]);
  syncFile(img, undo);
}

// ------------------------------------------------------------------------------------------------

beforeAll(async () => {
  const parentDir = process.env.TIDEMARK_VHD_FUZZ_DIR ?? (existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir());
  dir = mkdtempSync(path.join(parentDir, 'tidemark-vhd-fuzz-'));
  realDir = realpathSync(dir);
  fsState.token = newToken();
  await buildImages();
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('VHD mutation fuzzer', () => {
  it(
    `${ONLY === undefined ? CASES : 1} seeded cases: only TidemarkErrors, no hang, no stray opens or writes`,
    async () => {
      console.log(
        `vhd fuzz seed ${SEED} (TIDEMARK_VHD_FUZZ_SEED), ${ONLY === undefined ? `${CASES} cases (TIDEMARK_VHD_FUZZ_CASES)` : `case ${ONLY} only (TIDEMARK_VHD_FUZZ_CASE)`}`,
      );
      for (const img of images) {
        console.log(
          `  base ${img.name}: ${img.base.length} bytes, ${img.virtualSize} virtual, ${img.present.length} allocated blocks, ${img.locators.length} locators`,
        );
      }
      const failures: Failure[] = [];
      const stats: Record<string, number> = {};
      const t0 = Date.now();
      const cpu0 = process.cpuUsage();
      for (const i of ONLY === undefined ? Array.from({ length: CASES }, (_, k) => k) : [ONLY]) {
        await runCase(i, failures, stats);
        if (failures.length >= 2000) break;
      }
      const cpu = process.cpuUsage(cpu0);
      stats.cpuSeconds = Math.round((cpu.user + cpu.system) / 1e5) / 10;
      console.log(
        `vhd fuzz done in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${JSON.stringify({ ...stats, maxRss: `${Math.round((stats.maxRss ?? 0) / MiB)} MiB` })}, ${failures.length} problems`,
      );
      if (failures.length) {
        const groups = new Map<string, Failure[]>();
        for (const f of failures) {
          const key = f.problem.replace(/\d+/g, 'N').slice(0, 140);
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
        expect.fail(`${failures.length} fuzz problems in ${groups.size} groups:\n${lines.slice(0, 12).join('\n')}`);
      }
    },
    Math.max(600_000, CASES * 100),
  );
});

// ------------------------------------------------------------------------------------------------
// Deterministic cases: hostile parent locators. Each must end in PATH_NOT_ALLOWED or PARENT_NOT_FOUND,
// and nothing outside the directory is ever opened, /etc/passwd least of all.

/** A copy of the clean child with locator 1 replaced by `platform`/`value` and the others removed. */
function childWith(name: string, platform: PlatformName, value: string, parentName = ''): string {
  const img = images.find((x) => x.name === 'child')!;
  const b = Buffer.from(img.base);
  const data = platform === 'Mac' ? encodeAlias(value) : encodeLocatorData(platform, value);
  const l = img.locators[0];
  for (const x of img.locators) b.fill(0, x.entryAt, x.entryAt + 24);
  b.writeUInt32BE(PLATFORM[platform], l.entryAt);
  b.writeUInt32BE(Math.ceil(data.length / 512), l.entryAt + 4);
  b.writeUInt32BE(data.length, l.entryAt + 8);
  b.writeBigUInt64BE(BigInt(l.dataAt), l.entryAt + 16);
  data.copy(b, l.dataAt);
  const nameField = Buffer.alloc(512);
  Buffer.from(parentName, 'utf16le').swap16().copy(nameField, 0, 0, 510);
  nameField.copy(b, 512 + 64);
  b.writeUInt32BE(vhdChecksum(b.subarray(512, 1536), 36), 512 + 36);
  const out = path.join(dir, name);
  writeFileSync(out, b);
  return out;
}

async function tryOpen(file: string, opts: Parameters<typeof VhdFile.open>[1] = {}) {
  fsState.token = newToken();
  const before = fsState.opened.length;
  const t0 = Date.now();
  let err: unknown;
  try {
    await (await VhdFile.open(file, opts)).close();
  } catch (e) {
    err = e;
  }
  return { err, opened: fsState.opened.slice(before), ms: Date.now() - t0 };
}

describe('the oracle', () => {
  it('flags what is not a TidemarkError, unknown codes and multi-line messages; passes the rest', () => {
    expect(judge(new RangeError('offset out of range'))).toMatch(/RangeError/);
    expect(judge(new TidemarkError('TIMEOUT', 'x'))).toMatch(/unexpected code/);
    expect(judge(new TidemarkError('VHD_CORRUPT', 'a\nb'))).toMatch(/not one line/);
    expect(judge(new TidemarkError('VHD_CORRUPT', 'footer at offset 0: bad'))).toBeUndefined();
  });
});

describe('hostile parent locators (deterministic)', () => {
  it('the rewriting used below works: a locator through a symlink inside the directory opens the chain', async () => {
    const r = await tryOpen(childWith('h-good.vhd', 'W2ru', '.\\link-to-parent.vhd'), { allowedRoots: [dir] });
    expect(r.err).toBeUndefined();
  });

  for (const [platform, value] of HOSTILE.filter(([, v]) => /passwd/.test(v))) {
    it(`${platform} ${JSON.stringify(value)}: refused, /etc/passwd never opened`, async () => {
      for (const opts of [{ allowedRoots: [dir] }, {}, { allowedRoots: [dir], writable: true }]) {
        const r = await tryOpen(childWith('h-bad.vhd', platform, value, 'passwd'), opts);
        expect(r.err).toBeInstanceOf(TidemarkError);
        expect(['PATH_NOT_ALLOWED', 'PARENT_NOT_FOUND']).toContain((r.err as TidemarkError).code);
        for (const p of r.opened) {
          expect(realpathSync(p).startsWith(realDir), `opened ${p}`).toBe(true);
          expect(p).not.toContain('passwd');
        }
      }
    });
  }

  it('a drive letter mapped to / is still confined to the allowed directories', async () => {
    const r = await tryOpen(childWith('h-map.vhd', 'W2ku', 'D:\\etc\\passwd'), {
      allowedRoots: [dir],
      pathMap: { 'D:': '/' },
    });
    expect((r.err as TidemarkError).code).toBe('PATH_NOT_ALLOWED');
    expect(r.opened.some((p) => p.includes('passwd'))).toBe(false);
  });

  it('a locator naming the disk itself: PARENT_NOT_FOUND, the file opened once', async () => {
    const file = childWith('h-self.vhd', 'W2ru', '.\\h-self.vhd', 'h-self.vhd');
    const r = await tryOpen(file, { allowedRoots: [dir] });
    expect((r.err as TidemarkError).code).toBe('PARENT_NOT_FOUND');
    expect(r.opened.filter((p) => p === file)).toHaveLength(1);
  });

  it('two children naming each other (a loop) end in a TidemarkError, quickly', async () => {
    const a = childWith('h-loop-a.vhd', 'W2ru', '.\\h-loop-b.vhd');
    const b = childWith('h-loop-b.vhd', 'W2ru', '.\\h-loop-a.vhd');
    // Each names the other's unique id and time stamp as its parent's, so the identities match.
    const fa = readFileSync(a);
    const fb = readFileSync(b);
    const idA = Buffer.from('a'.repeat(32), 'hex');
    const idB = Buffer.from('b'.repeat(32), 'hex');
    for (const [buf, own, other] of [
      [fa, idA, idB],
      [fb, idB, idA],
    ] as const) {
      for (const at of [0, buf.length - 512]) {
        own.copy(buf, at + 68);
        buf.writeUInt32BE(1000, at + 24);
        buf.writeUInt32BE(vhdChecksum(buf.subarray(at, at + 512), 64), at + 64);
      }
      other.copy(buf, 512 + 40);
      buf.writeUInt32BE(1000, 512 + 56);
      buf.writeUInt32BE(vhdChecksum(buf.subarray(512, 1536), 36), 512 + 36);
    }
    writeFileSync(a, fa);
    writeFileSync(b, fb);
    const r = await tryOpen(a, { allowedRoots: [dir] });
    expect(judge(r.err)).toBeUndefined();
    expect(r.err).toBeInstanceOf(TidemarkError);
    expect(r.ms).toBeLessThan(10_000);
  });

  it('a locator string with a newline does not break the one-line error message', async () => {
    const r = await tryOpen(childWith('h-nl.vhd', 'W2ru', 'missing.vhd\nFORGED LOG LINE'), { allowedRoots: [dir] });
    expect((r.err as TidemarkError).code).toBe('PARENT_NOT_FOUND');
    expect((r.err as Error).message).not.toMatch(/[\r\n]/);
  });
});
