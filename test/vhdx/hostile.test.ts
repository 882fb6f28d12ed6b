/**
 * Hostile disk files through the built CLI (`node bin/tidemark.js`, dist/) and through `tidemark nbd serve`
 * with qemu-io as the guest. Files are made by the real encoders, then patched:
 * - a BAT entry pointing into each region (the header section, the log, the BAT, the metadata region,
 *   another block, past the end of the file): `info`, `check`, `read`, `write`, and a write through NBD;
 * - truncated files: `check` reports which blocks lie past the end and by how much (qemu-img check agrees),
 *   writes are refused, `check --repair` makes them whole;
 * - forged sizes (virtual size, block size, sector sizes, log, region and metadata item lengths) at and
 *   beyond the limits: one typed line, never a stack trace, no output file left behind;
 * - other formats (VHD, qcow2, VMDK): NOT_SUPPORTED naming the format, nothing written.
 * Every case asserts that no byte outside the disk file changes, that a refused write changes nothing in
 * it, and that no command hangs (each runs under a time limit).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeBatEntry } from '../../src/formats/vhdx/bat.js';
import {
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_SIZE,
  MiB,
} from '../../src/formats/vhdx/constants.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import {
  decodeHeader,
  decodeRegionTable,
  encodeHeader,
  encodeRegionTable,
  type RegionTable,
} from '../../src/formats/vhdx/header.js';
import { decodeMetadataTable, encodeMetadataTable } from '../../src/formats/vhdx/metadata.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { qemuImgCheck, requirePeers, run, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { sleep } from '../helpers/async.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const MAIN = path.join(ROOT, 'dist', 'cli', 'main.js');
const KiB = 1024;
const SEED = seedFrom('TIDEMARK_HOSTILE_SEED', 1414);
/** No command may take longer than this (a hang fails the test instead of stalling it). */
const COMMAND_LIMIT_MS = 60_000;
console.log(`hostile seed ${SEED} (set TIDEMARK_HOSTILE_SEED to replay)`);

const peers = requirePeers('qemu-img', 'qemu-io');
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  if (!existsSync(MAIN)) throw new Error(`${MAIN} is missing: run \`npm run build\` first (\`npm test\` does)`);
  ({ dir, cleanup } = await tempDir('hostile'));
});
afterAll(async () => cleanup?.());

interface Result {
  status: number | null;
  stdout: Buffer;
  stderr: string;
}

function tidemark(args: string[], input?: Buffer): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    cwd: dir,
    input,
    timeout: COMMAND_LIMIT_MS,
    maxBuffer: 64 * MiB,
    env: { ...process.env, NO_COLOR: '1' },
  });
  if (r.error) throw r.error;
  expect(r.signal, `tidemark ${args.join(' ')} did not finish in ${COMMAND_LIMIT_MS} ms`).toBeNull();
  return { status: r.status, stdout: r.stdout, stderr: r.stderr.toString() };
}

/** A failure: the status, and exactly one line `tidemark: CODE: ...` on stderr, no stack trace. */
function expectFailure(r: Result, status: number, code: string, message?: RegExp): string {
  expect(r.stderr, 'no stack trace').not.toMatch(/\n\s+at /);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0);
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(new RegExp(`^tidemark: ${code}: `));
  if (message) expect(lines[0]).toMatch(message);
  expect(r.status, r.stderr).toBe(status);
  return lines[0];
}

/** SHA-256 of every regular file under `root` except `except`. */
function treeDigest(root: string, except: string[] = []): Map<string, string> {
  const out = new Map<string, string>();
  for (const e of readdirSync(root, { withFileTypes: true, recursive: true })) {
    const p = path.join(e.parentPath, e.name);
    if (!e.isFile() || except.includes(p)) continue;
    out.set(p, createHash('sha256').update(readFileSync(p)).digest('hex'));
  }
  return out;
}

function expectTreeUnchanged(before: Map<string, string>, root: string, except: string[]): void {
  const after = treeDigest(root, except);
  for (const [p, h] of before) expect(after.get(p), `${p} changed or vanished`).toBe(h);
  for (const p of after.keys()) expect(before.has(p), `${p} appeared`).toBe(true);
}

// ------------------------------------------------------------------------------------------------
// Crafting

interface Disk {
  file: string;
  bat: number;
  md: number;
  log: number;
  b0: number;
  data: Buffer;
}

/** A 16 MiB dynamic disk in its own directory beside a sentinel file, 1 MiB blocks, blocks 0..5 written. */
async function makeDisk(name: string): Promise<Disk> {
  const caseDir = path.join(dir, name);
  mkdirSync(caseDir);
  writeFileSync(path.join(caseDir, 'sentinel.bin'), rng(SEED + 7).bytes(MiB));
  const file = path.join(caseDir, 'disk.vhdx');
  await createVhdx(file, { size: 16 * MiB, blockSize: MiB });
  const data = rng(SEED + name.length).bytes(6 * MiB);
  const d = await VhdxFile.open(file, { writable: true });
  try {
    await d.write(data, 0);
    const b0 = (await d.payloadEntry(0)).offset;
    return { file, bat: d.batRegion.fileOffset, md: d.metadataRegion.fileOffset, log: d.header.logOffset, b0, data };
  } finally {
    await d.close();
  }
}

function patchBat(d: Disk, index: number, state: number, offset: number): void {
  const buf = readFileSync(d.file);
  const [lo, hi] = encodeBatEntry(state, offset);
  buf.writeUInt32LE(lo, d.bat + index * 8);
  buf.writeUInt32LE(hi, d.bat + index * 8 + 4);
  writeFileSync(d.file, buf);
}

// ------------------------------------------------------------------------------------------------
// NBD

interface Served {
  child: ChildProcess;
  uri: string;
  stderr: () => string;
  exit: Promise<number | null>;
}

async function serve(file: string, sock: string): Promise<Served> {
  const child = spawn(process.execPath, [BIN, 'nbd', 'serve', file, '--socket', sock], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const deadline = Date.now() + 20_000;
  while (!out.includes('\n') || !err.includes('serving')) {
    if (child.exitCode !== null) throw new Error(`nbd serve exited ${child.exitCode}: ${err}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`nbd serve printed nothing in time: ${err}`);
    }
    await sleep(20);
  }
  return { child, uri: out.split('\n')[0].split('\t')[1], stderr: () => err, exit };
}

async function stop(s: Served): Promise<number | null> {
  s.child.kill('SIGTERM');
  const code = await Promise.race([s.exit, new Promise<'hang'>((r) => setTimeout(() => r('hang'), 30_000))]);
  if (code === 'hang') {
    s.child.kill('SIGKILL');
    throw new Error('nbd serve did not stop within 30 s of SIGTERM');
  }
  return code;
}

async function qemuIo(uri: string, cmd: string): Promise<{ code: number; out: string }> {
  const r = await run('qemu-io', ['-f', 'raw', '-c', cmd, uri], { allowFail: true, timeoutMs: COMMAND_LIMIT_MS });
  return { code: r.code, out: r.stdout + r.stderr };
}

// ------------------------------------------------------------------------------------------------

/** `qemu`: whether qemu-img check (7.2) reports it too; it does not look at the header section or shared space. */
const REGIONS: { name: string; where: (d: Disk) => number; message: RegExp; code: string; qemu: boolean }[] = [
  {
    name: 'the header section',
    where: () => 0,
    message: /points into the header section/,
    code: 'VHDX_CORRUPT',
    qemu: false,
  },
  { name: 'the log', where: (d) => d.log, message: /points into the log/, code: 'VHDX_CORRUPT', qemu: true },
  { name: 'the BAT', where: (d) => d.bat, message: /points into the BAT region/, code: 'VHDX_CORRUPT', qemu: true },
  {
    name: 'the metadata',
    where: (d) => d.md,
    message: /points into the metadata region/,
    code: 'VHDX_CORRUPT',
    qemu: true,
  },
  { name: 'another block', where: (d) => d.b0, message: /shares file space/, code: 'VHDX_CORRUPT', qemu: false },
  {
    name: 'past the end',
    where: () => 64 * MiB,
    message: /past the end of the file/,
    code: 'VHDX_TRUNCATED',
    qemu: true,
  },
];

describe.skipIf(peers.skip)('a BAT entry pointing into each region', () => {
  for (const region of REGIONS) {
    it(`${region.name}: info, check, read and write through the CLI, a write through NBD; then --repair`, async () => {
      const d = await makeDisk(`into-${region.name.replace(/\W+/g, '-')}`);
      patchBat(d, 4, 6, region.where(d));
      const original = readFileSync(d.file);
      const outside = treeDigest(dir, [d.file]);
      const unchanged = () => {
        expect(readFileSync(d.file).equals(original), 'the damaged disk changed').toBe(true);
        expectTreeUnchanged(outside, dir, [d.file]);
      };

      const info = tidemark(['vhdx', 'info', d.file, '--json']);
      expect(info.status, info.stderr).toBe(0);
      const warnings = JSON.parse(info.stdout.toString()).warnings as string[];
      expect(warnings.join('\n')).toMatch(/^damaged: 1 BAT entry is damaged: block 4 \(BAT entry 4\)/m);
      expect(warnings.join('\n')).toMatch(region.message);

      const check = tidemark(['vhdx', 'check', d.file, '--json']);
      expect(check.status, check.stderr).toBe(1);
      const report = JSON.parse(check.stdout.toString());
      const finding = report.errors.find((e: { message: string }) => /block 4 \(BAT entry 4\)/.test(e.message));
      expect(finding?.message, JSON.stringify(report.errors)).toMatch(region.message);
      expect(finding.offset).toBe(d.bat + 4 * 8);

      const bad = tidemark(['vhdx', 'read', d.file, '--offset', String(4 * MiB), '--length', '4096']);
      expectFailure(bad, 4, region.code, /block 4 at file offset \d+/);
      expect(bad.stderr).toMatch(region.message);
      expect(bad.stdout.length).toBe(0);
      const good = tidemark(['vhdx', 'read', d.file, '--offset', String(2 * MiB), '--length', String(MiB)]);
      expect(good.status, good.stderr).toBe(0);
      expect(good.stdout.equals(d.data.subarray(2 * MiB, 3 * MiB))).toBe(true);

      // qemu-img check agrees where it looks (it refuses to open the file: "VHDX region … overlaps …",
      // "… points after end of file"), and misses the header section and shared space.
      const peerCheck = await run('qemu-img', ['check', '-f', 'vhdx', d.file], { allowFail: true });
      if (region.qemu) expect(peerCheck.code, peerCheck.stdout + peerCheck.stderr).toBe(2);
      else console.log(`qemu-img check, block 4 into ${region.name}: exit ${peerCheck.code}`);

      for (const at of [4 * MiB, 9 * MiB, 100]) {
        const w = tidemark(['vhdx', 'write', d.file, '--offset', String(at)], Buffer.alloc(4096, 0xee));
        expectFailure(
          w,
          4,
          region.code,
          /is open read-only: .*run `tidemark vhdx check --repair`|tidemark vhdx check --repair/,
        );
      }
      unchanged();

      // Through NBD: the export serves reads; every write fails with an I/O error and lands nowhere.
      const sock = path.join(dir, `s-${process.pid}.sock`);
      const s = await serve(d.file, sock);
      try {
        expect(s.stderr()).toMatch(/warning: disk: damaged: /);
        for (const at of [4 * MiB, 8 * MiB]) {
          const w = await qemuIo(s.uri, `write -P 0xcd ${at} 64k`);
          expect(w.code, w.out).not.toBe(0);
          expect(w.out).toMatch(/write failed: Input\/output error/);
        }
        const r = await qemuIo(s.uri, `read -P 0 8M 64k`);
        expect(r.code, r.out).toBe(0);
        const rb = await qemuIo(s.uri, `read 4M 64k`);
        expect(rb.out).toMatch(/read failed: Input\/output error/);
      } finally {
        expect(await stop(s)).toBe(0);
      }
      unchanged();

      // --repair, then a write through NBD changes the written block and the metadata that maps it only.
      const repair = tidemark(['vhdx', 'check', '--repair', d.file]);
      expect(repair.status, repair.stdout.toString() + repair.stderr).toBe(0);
      expect(repair.stdout.toString()).toMatch(/repaired: block 4 \(BAT entry 4\)/);
      const repaired = readFileSync(d.file);
      const s2 = await serve(d.file, sock);
      try {
        const w = await qemuIo(s2.uri, `write -P 0xcd ${8 * MiB} 64k`);
        expect(w.code, w.out).toBe(0);
      } finally {
        expect(await stop(s2)).toBe(0);
      }
      const after = readFileSync(d.file);
      // The metadata region, the region tables and every block that was there are as they were.
      expect(after.subarray(d.md, d.md + MiB).equals(repaired.subarray(d.md, d.md + MiB))).toBe(true);
      expect(after.subarray(192 * KiB, 320 * KiB).equals(repaired.subarray(192 * KiB, 320 * KiB))).toBe(true);
      expect(after.subarray(d.b0, repaired.length).equals(repaired.subarray(d.b0))).toBe(true);
      expectTreeUnchanged(outside, dir, [d.file]);
      const q = await qemuImgCheck(d.file);
      expect(q.ok, q.output).toBe(true);
      const all = tidemark(['vhdx', 'read', d.file, '--offset', '0', '--length', String(16 * MiB)]);
      expect(all.status, all.stderr).toBe(0);
      for (const b of [0, 1, 2, 3, 5])
        expect(all.stdout.subarray(b * MiB, (b + 1) * MiB).equals(d.data.subarray(b * MiB, (b + 1) * MiB))).toBe(true);
      expect(all.stdout.subarray(8 * MiB, 8 * MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB, 0xcd))).toBe(true);
      const b4 = all.stdout.subarray(4 * MiB, 5 * MiB);
      if (region.name === 'another block')
        expect(b4.equals(d.data.subarray(0, MiB)), 'block 4 reads as before').toBe(true);
      else expect(b4.equals(Buffer.alloc(MiB)), 'block 4 had no data of its own: it reads zeros').toBe(true);
    });
  }
});

describe.skipIf(peers.skip)('truncated files', () => {
  it('check reports the blocks past the end and by how much, as qemu-img check does; writes are refused; --repair', async () => {
    const caseDir = path.join(dir, 'truncated');
    mkdirSync(caseDir);
    writeFileSync(path.join(caseDir, 'sentinel.bin'), rng(SEED + 3).bytes(64 * KiB));
    const file = path.join(caseDir, 'q.vhdx');
    await run('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', 'subformat=dynamic,block_size=1048576', file, '16M']);
    await run('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x11 0 4M', file]);
    const full = statSync(file).size;
    const cut = full - 2 * MiB - 512 * KiB; // blocks 2 and 3 wholly past the end, block 1 half
    truncateSync(file, cut);
    const original = readFileSync(file);
    const outside = treeDigest(dir, [file]);

    const check = tidemark(['vhdx', 'check', file, '--json']);
    expect(check.status).toBe(1);
    const report = JSON.parse(check.stdout.toString());
    const truncation = report.errors.find((e: { code: string }) => e.code === 'FILE_TRUNCATED');
    expect(truncation?.message).toMatch(
      new RegExp(
        `the file is ${cut} bytes but its BAT references data up to ${full} \\(${full - cut} bytes missing\\): 3 entries lie past its end \\(block 1, block 2, block 3\\)`,
      ),
    );
    const beyond = report.errors
      .filter((e: { code: string }) => e.code === 'BAT_BEYOND_EOF')
      .map((e: { message: string }) => e.message);
    expect(beyond).toHaveLength(3);
    expect(beyond[0]).toMatch(/block 1 .* extends 524288 bytes past the end/);
    // qemu-img check: the same three entries, "Image has probably been truncated", exit 2 (corruptions).
    const q = await run('qemu-img', ['check', '-f', 'vhdx', file], { allowFail: true });
    expect(q.code).toBe(2);
    const qemuEntries = [...(q.stdout + q.stderr).matchAll(/VHDX BAT entry (\d+) .* points after end of file/g)].map(
      (m) => Number(m[1]),
    );
    expect([...new Set(qemuEntries)]).toEqual([1, 2, 3]);

    const w = tidemark(['vhdx', 'write', file, '--offset', String(2 * MiB)], Buffer.alloc(512, 1));
    expectFailure(w, 4, 'VHDX_TRUNCATED', /is truncated|past the end/);
    const w2 = tidemark(['vhdx', 'write', file, '--offset', String(12 * MiB)], Buffer.alloc(512, 1));
    expectFailure(w2, 4, 'VHDX_TRUNCATED');
    // Reads: what exists reads, what is missing fails instead of reading zeros.
    const inFile = tidemark(['vhdx', 'read', file, '--offset', String(MiB), '--length', String(512 * KiB)]);
    expect(inFile.status).toBe(0);
    expect(inFile.stdout.equals(Buffer.alloc(512 * KiB, 0x11))).toBe(true);
    expectFailure(
      tidemark(['vhdx', 'read', file, '--offset', String(3 * MiB), '--length', '512']),
      4,
      'VHDX_TRUNCATED',
      /block 3/,
    );
    const sock = path.join(dir, `t-${process.pid}.sock`);
    const s = await serve(file, sock);
    try {
      const nw = await qemuIo(s.uri, `write -P 0xcd ${12 * MiB} 64k`);
      expect(nw.out).toMatch(/write failed: Input\/output error/);
    } finally {
      expect(await stop(s)).toBe(0);
    }
    expect(readFileSync(file).equals(original), 'the truncated disk changed').toBe(true);
    expectTreeUnchanged(outside, dir, [file]);

    const repair = tidemark(['vhdx', 'check', '--repair', file]);
    expect(repair.status, repair.stdout.toString()).toBe(0);
    expect((await qemuImgCheck(file)).ok).toBe(true);
    const all = tidemark(['vhdx', 'read', file, '--offset', '0', '--length', String(4 * MiB)]);
    expect(all.status).toBe(0);
    const expected = Buffer.alloc(4 * MiB);
    expected.fill(0x11, 0, MiB + 512 * KiB); // block 0 and what existed of block 1
    expect(all.stdout.equals(expected)).toBe(true);
    const ok = tidemark(['vhdx', 'write', file, '--offset', String(2 * MiB)], Buffer.alloc(512, 1));
    expect(ok.status, ok.stderr).toBe(0);
    expect((await qemuImgCheck(file)).ok).toBe(true);
  });
});

// ------------------------------------------------------------------------------------------------
// Forged sizes

type Forge = (buf: Buffer) => void;

function regionTables(buf: Buffer, edit: (t: RegionTable) => void): void {
  for (const at of [192 * KiB, 256 * KiB]) {
    const t = decodeRegionTable(buf.subarray(at, at + 64 * KiB));
    if (typeof t === 'string') throw new Error(t);
    edit(t);
    encodeRegionTable(t.entries).copy(buf, at);
  }
}

function headers(buf: Buffer, edit: (h: { logOffset: number; logLength: number }) => void): void {
  for (const at of [64 * KiB, 128 * KiB]) {
    const h = decodeHeader(buf.subarray(at, at + 4 * KiB), at);
    if (typeof h === 'string') throw new Error(h);
    edit(h);
    encodeHeader(h).copy(buf, at);
  }
}

function metadataItem(buf: Buffer, id: Buffer, edit: (data: Buffer, entry: { length: number }) => void): void {
  const t = decodeRegionTable(buf.subarray(192 * KiB, 256 * KiB)) as RegionTable;
  const md = t.entries.find((e) =>
    e.guid.equals(
      Buffer.from([0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e]),
    ),
  )!;
  const entries = decodeMetadataTable(buf.subarray(md.fileOffset, md.fileOffset + 64 * KiB), md.fileOffset, md.length);
  const e = entries.find((x) => x.itemId.equals(id))!;
  edit(buf.subarray(md.fileOffset + e.offset, md.fileOffset + e.offset + 8), e);
  encodeMetadataTable(entries).copy(buf, md.fileOffset);
}

const FORGED: [string, Forge][] = [
  ['virtual size 2^52', (b) => metadataItem(b, ITEM_VIRTUAL_DISK_SIZE, (d) => d.writeBigUInt64LE(1n << 52n))],
  [
    'virtual size 64 TiB + 512',
    (b) => metadataItem(b, ITEM_VIRTUAL_DISK_SIZE, (d) => d.writeBigUInt64LE((1n << 46n) + 512n)),
  ],
  [
    'virtual size 2^64 - 1',
    (b) => metadataItem(b, ITEM_VIRTUAL_DISK_SIZE, (d) => d.writeBigUInt64LE((1n << 64n) - 1n)),
  ],
  [
    'virtual size 64 TiB (the BAT cannot hold it)',
    (b) => metadataItem(b, ITEM_VIRTUAL_DISK_SIZE, (d) => d.writeBigUInt64LE(1n << 46n)),
  ],
  [
    'virtual size 64 TiB with a BAT region of 513 MiB past the end',
    (b) => {
      metadataItem(b, ITEM_VIRTUAL_DISK_SIZE, (d) => d.writeBigUInt64LE(1n << 46n));
      regionTables(b, (t) => {
        const bat = t.entries.find((e) => e.guid.readUInt32LE(0) === 0x2dc27766)!;
        bat.length = 513 * MiB;
      });
    },
  ],
  ['block size 0', (b) => metadataItem(b, ITEM_FILE_PARAMETERS, (d) => d.writeUInt32LE(0))],
  ['block size 2^31', (b) => metadataItem(b, ITEM_FILE_PARAMETERS, (d) => d.writeUInt32LE(2 ** 31))],
  ['block size 2^32 - 1', (b) => metadataItem(b, ITEM_FILE_PARAMETERS, (d) => d.writeUInt32LE(2 ** 32 - 1))],
  ['block size 3 MiB', (b) => metadataItem(b, ITEM_FILE_PARAMETERS, (d) => d.writeUInt32LE(3 * MiB))],
  ['logical sector size 0', (b) => metadataItem(b, ITEM_LOGICAL_SECTOR_SIZE, (d) => d.writeUInt32LE(0))],
  [
    'logical sector size 2^32 - 1',
    (b) => metadataItem(b, ITEM_LOGICAL_SECTOR_SIZE, (d) => d.writeUInt32LE(2 ** 32 - 1)),
  ],
  ['physical sector size 1', (b) => metadataItem(b, ITEM_PHYSICAL_SECTOR_SIZE, (d) => d.writeUInt32LE(1))],
  [
    'metadata item length 2^32 - 1',
    (b) => metadataItem(b, ITEM_VIRTUAL_DISK_SIZE, (_d, e) => (e.length = 2 ** 32 - 1)),
  ],
  ['metadata item length 1 MiB + 1', (b) => metadataItem(b, ITEM_VIRTUAL_DISK_SIZE, (_d, e) => (e.length = MiB + 1))],
  ['log length 4 GiB - 1 MiB', (b) => headers(b, (h) => (h.logLength = 2 ** 32 - MiB))],
  ['log length 0', (b) => headers(b, (h) => (h.logLength = 0))],
  ['log offset 2^53', (b) => headers(b, (h) => (h.logOffset = 2 ** 53))],
  ['log offset 2^52 (aligned, far past the end)', (b) => headers(b, (h) => (h.logOffset = 2 ** 52))],
  [
    'BAT region length 4 GiB - 1 MiB',
    (b) =>
      regionTables(b, (t) => (t.entries.find((e) => e.guid.readUInt32LE(0) === 0x2dc27766)!.length = 2 ** 32 - MiB)),
  ],
  [
    'metadata region length 4 GiB - 1 MiB',
    (b) =>
      regionTables(b, (t) => (t.entries.find((e) => e.guid.readUInt32LE(0) === 0x8b7ca206)!.length = 2 ** 32 - MiB)),
  ],
  [
    'BAT region at 2^52',
    (b) => regionTables(b, (t) => (t.entries.find((e) => e.guid.readUInt32LE(0) === 0x2dc27766)!.fileOffset = 2 ** 52)),
  ],
];

/** Exit statuses a typed error may have (docs/errors.md); 70 is an internal error. */
const TYPED = new Set([1, 2, 3, 4, 5, 6, 7]);

describe('forged sizes at and beyond the limits', () => {
  it('info, check, read, write and convert: a typed one-line error or a correct answer; convert leaves nothing behind', async () => {
    const base = path.join(dir, 'forge-base.vhdx');
    await createVhdx(base, { size: 64 * MiB, blockSize: MiB });
    const d = await VhdxFile.open(base, { writable: true });
    await d.write(Buffer.alloc(2 * MiB, 0x5a), MiB);
    await d.close();
    const pristine = readFileSync(base);
    const outcomes: string[] = [];
    const forgeDir = path.join(dir, 'forged');
    mkdirSync(forgeDir);
    for (const [name, forge] of FORGED) {
      const file = path.join(forgeDir, `${name.replace(/\W+/g, '-')}.vhdx`);
      const buf = Buffer.from(pristine);
      forge(buf);
      writeFileSync(file, buf);
      const outside = treeDigest(dir, [file]);
      const commands: [string, string[], Buffer?][] = [
        ['info', ['vhdx', 'info', file]],
        ['check', ['vhdx', 'check', file]],
        ['write', ['vhdx', 'write', file, '--offset', String(MiB)], Buffer.alloc(4096, 0x77)],
        ['convert vhdx', ['vhdx', 'convert', file, path.join(forgeDir, 'out.vhdx')]],
      ];
      if (name.startsWith('virtual size')) {
        // Sizes drive reads and raw output most directly.
        commands.push(
          [
            'read',
            [
              'vhdx',
              'read',
              file,
              '--offset',
              String(MiB),
              '--length',
              '4096',
              '--output',
              path.join(forgeDir, 'read.out'),
            ],
          ],
          ['convert raw', ['vhdx', 'convert', file, path.join(forgeDir, 'out.raw')]],
        );
      }
      for (const [label, args, input] of commands) {
        const r = tidemark(args, input);
        outcomes.push(`${name}: ${label} -> ${r.status}${r.status ? ` ${r.stderr.split(':')[1]?.trim() ?? ''}` : ''}`);
        const where = `${name}: ${label}: status ${r.status}: ${r.stderr}`;
        expect(r.stderr, where).not.toMatch(/\n\s+at |internal error/);
        expect(r.status === 0 || TYPED.has(r.status!), where).toBe(true);
        // check reports findings with status 1 and prints them; every other failure is one typed line.
        if (r.status !== 0 && !(label === 'check' && r.status === 1)) expectFailure(r, r.status!, '[A-Z_]+');
        if (label.startsWith('convert')) {
          const out = args[3];
          if (r.status !== 0) expect(existsSync(out), `${where}: ${out} left behind`).toBe(false);
          else rmSync(out);
        }
        rmSync(path.join(forgeDir, 'read.out'), { force: true });
      }
      expectTreeUnchanged(outside, dir, [file]);
    }
    console.log(`forged sizes, exit statuses:\n  ${outcomes.join('\n  ')}`);
  }, 600_000);
});

// ------------------------------------------------------------------------------------------------
// Other formats

describe.skipIf(peers.skip)('other formats through the CLI', () => {
  it('qcow2 and VMDK: every vhdx command says NOT_SUPPORTED naming the format, convert writes nothing; a VHD converts, and every other vhdx command refuses it', async () => {
    const fdir = path.join(dir, 'formats');
    mkdirSync(fdir);
    const files: [string, string, string[], RegExp][] = [
      ['legacy.vhd', 'vpc', [], /is a VHD disk/],
      ['fixed.vhd', 'vpc', ['-o', 'subformat=fixed'], /is a VHD disk \(a "conectix" footer at the end\)/],
      ['d.qcow2', 'qcow2', [], /is a qcow2 disk/],
      ['d.vmdk', 'vmdk', [], /is a VMDK disk/],
    ];
    for (const [name, fmt, opts, label] of files) {
      const file = path.join(fdir, name);
      await run('qemu-img', ['create', '-q', '-f', fmt, ...opts, file, '64M']);
      const before = readFileSync(file);
      const dst = path.join(fdir, `${name}.out.vhdx`);
      if (fmt === 'vpc') {
        // VHD is read by the VHD engine: convert takes it (the issue's case: never a 2560-byte "raw" disk).
        const c = tidemark(['vhdx', 'convert', file, dst]);
        expect(c.status, c.stderr).toBe(0);
        expect(c.stdout.toString()).toMatch(/converted vhd /);
        const info = JSON.parse(tidemark(['vhdx', 'info', dst, '--json']).stdout.toString());
        expect(info.virtualSize).toBeGreaterThanOrEqual(64 * 2 ** 20);
      } else {
        expectFailure(tidemark(['vhdx', 'convert', file, dst]), 5, 'NOT_SUPPORTED', label);
        expect(existsSync(dst)).toBe(false);
      }
      expectFailure(tidemark(['vhdx', 'info', file]), 5, 'NOT_SUPPORTED', label);
      expectFailure(
        tidemark(['vhdx', 'write', file, '--offset', '0'], Buffer.alloc(512, 1)),
        5,
        'NOT_SUPPORTED',
        label,
      );
      if (name === 'legacy.vhd') {
        // The issue's case, every other command: a VHD is not a VHDX (`tidemark vhd ...` reads it).
        const raw = tidemark(['vhdx', 'convert', file, `${dst}.raw`, '--format', 'raw']);
        expect(raw.status, raw.stderr).toBe(0);
        expect(statSync(`${dst}.raw`).size).toBeGreaterThanOrEqual(64 * 2 ** 20);
        expectFailure(tidemark(['vhdx', 'check', file]), 5, 'NOT_SUPPORTED', label);
        expectFailure(tidemark(['vhdx', 'check', '--repair', file]), 5, 'NOT_SUPPORTED', label);
        expectFailure(tidemark(['vhdx', 'read', file, '--offset', '0', '--length', '512']), 5, 'NOT_SUPPORTED', label);
        expectFailure(tidemark(['vhdx', 'merge', file]), 5, 'NOT_SUPPORTED', label);
        expectFailure(
          tidemark(['vhdx', 'create', path.join(fdir, 'child.avhdx'), '--parent', file]),
          5,
          'NOT_SUPPORTED',
          label,
        );
        expect(existsSync(path.join(fdir, 'child.avhdx'))).toBe(false);
      }
      expect(readFileSync(file).equals(before), `${name} changed`).toBe(true);
    }
    // A raw copy on purpose: the VHD's bytes as they are.
    const vhd = path.join(fdir, 'legacy.vhd');
    const asRaw = path.join(fdir, 'legacy-bytes.vhdx');
    const r = tidemark(['vhdx', 'convert', vhd, asRaw, '--source-format', 'raw', '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.toString())).toMatchObject({
      sourceFormat: 'raw',
      virtualSize: Math.ceil(statSync(vhd).size / 512) * 512,
    });
  });
});
