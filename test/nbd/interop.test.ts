/**
 * The NBD server against independent clients, serving real VHDX files through the disk layer:
 * qemu-io (QEMU's NBD client) writes, zeroes and discards and verifies patterns; nbdinfo lists exports
 * and maps base:allocation and qemu:dirty-bitmap contexts; nbdcopy and qemu-img convert copy whole
 * exports; two clients write at once; a client killed mid-request and clients sending garbage do not
 * disturb the others. After the server closes, qemu-img check and compare judge the VHDX files.
 *
 * Seed: TIDEMARK_NBD_SEED (printed).
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockDevice, WriteOptions } from '../../src/disk/device.js';
import { openVirtualDisk, type VirtualDisk } from '../../src/disk/virtual-disk.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { NbdServer } from '../../src/nbd/index.js';
import { encodeClientFlags, encodeOption, encodeRequest, IHAVEOPT, CMD, OPT } from '../../src/nbd/protocol.js';
import { ChangeTracker } from '../../src/tracking/tracker.js';
import { qemuImgCheck, qemuImgCompare, requirePeers, run, tempDir } from '../helpers/peers.js';
import { seekAddon } from '../../src/util/holes.js';
import { rng, seedFrom } from '../helpers/random.js';
import { openExport, RawClient, sleep } from './raw-client.js';

const MiB = 2 ** 20;
const SIZE = 64 * MiB;
const SEED = seedFrom('TIDEMARK_NBD_SEED', 9001);
/** qemu-io operations in the pattern test (TIDEMARK_NBD_CASES for long runs). */
const CASES = Number(process.env.TIDEMARK_NBD_CASES ?? 60);
console.log(`nbd interop seed ${SEED}, ${CASES} cases (set TIDEMARK_NBD_SEED / TIDEMARK_NBD_CASES to replay)`);

const peers = requirePeers('qemu-io', 'qemu-img', 'nbdinfo', 'nbdcopy');

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('nbd-interop')));
afterAll(async () => cleanup?.());

/** A fresh dynamic VHDX (1 MiB blocks) and the raw image it is expected to equal. */
async function newDisk(name: string, opts: { tracked?: boolean } = {}): Promise<{ file: string; model: Buffer }> {
  const file = path.join(dir, `${name}.vhdx`);
  await createVhdx(file, { size: SIZE, blockSize: MiB });
  if (opts.tracked) {
    const probe = await VhdxFile.open(file);
    await ChangeTracker.enable(probe);
    await probe.close();
  }
  return { file, model: Buffer.alloc(SIZE) };
}

async function serve(
  exports: { name: string; device: BlockDevice; readOnly?: boolean }[],
): Promise<{ server: NbdServer; socket: string; uri: (name: string) => string }> {
  const server = new NbdServer();
  for (const e of exports) server.addExport(e.name, e.device, { readOnly: e.readOnly });
  const socket = path.join(dir, `s${Math.floor(Math.random() * 1e9)}`);
  await server.listen({ socket });
  return { server, socket, uri: (name) => `nbd+unix:///${name}?socket=${socket}` };
}

/** One qemu-io run of many commands; fails on any failed command or pattern mismatch. */
async function qemuIo(uri: string, cmds: string[]): Promise<string> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], { allowFail: true });
  const out = r.stdout + r.stderr;
  if (r.code !== 0 || /fail|error|mismatch/i.test(out)) throw new Error(`qemu-io ${uri} (exit ${r.code}): ${out}`);
  return out;
}

async function closeAndCheck(disk: VirtualDisk, file: string, model: Buffer): Promise<void> {
  await disk.close();
  const check = await qemuImgCheck(file);
  expect(check.ok, check.output).toBe(true);
  const raw = path.join(dir, `${path.basename(file)}.expected.raw`);
  writeFileSync(raw, model);
  const cmp = await qemuImgCompare(raw, 'raw', file, 'vhdx');
  expect(cmp.identical, cmp.output).toBe(true);
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

/** `nbdinfo --map[=CONTEXT] --json`, adjacent entries of one type merged. */
async function nbdMap(uri: string, context?: string): Promise<MapEntry[]> {
  const args = [context ? `--map=${context}` : '--map', '--json', uri];
  const entries = JSON.parse((await run('nbdinfo', args)).stdout) as MapEntry[];
  return merge(entries.map(({ offset, length, type }) => ({ offset, length, type })));
}

function merge(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of entries) {
    const last = out[out.length - 1];
    if (last && last.type === e.type && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** Delegates to a disk; its first write waits for `release()` (a request the server holds in flight). */
class GatedWrites implements BlockDevice {
  started = 0;
  private open!: () => void;
  private readonly gate = new Promise<void>((resolve) => (this.open = resolve));
  constructor(private readonly disk: VirtualDisk) {}
  get size() {
    return this.disk.size;
  }
  get readOnly() {
    return this.disk.readOnly;
  }
  get minimumBlockSize() {
    return this.disk.minimumBlockSize;
  }
  get preferredBlockSize() {
    return this.disk.preferredBlockSize;
  }
  release(): void {
    this.open();
  }
  read(o: number, n: number) {
    return this.disk.read(o, n);
  }
  async write(o: number, d: Uint8Array, opts?: WriteOptions) {
    if (++this.started === 1) await this.gate;
    return this.disk.write(o, d, opts);
  }
  flush() {
    return this.disk.flush();
  }
  trim(o: number, n: number, opts?: WriteOptions) {
    return this.disk.trim(o, n, opts);
  }
  writeZeroes(o: number, n: number, opts?: WriteOptions) {
    return this.disk.writeZeroes(o, n, opts);
  }
  blockStatus(o: number, n: number) {
    return this.disk.blockStatus(o, n);
  }
  dirtyContexts() {
    return this.disk.dirtyContexts();
  }
  dirtyStatus(name: string, o: number, n: number) {
    return this.disk.dirtyStatus(name, o, n);
  }
}

describe.skipIf(peers.skip)(`NBD interop with QEMU and libnbd (seed ${SEED})`, () => {
  it('qemu-io writes, zeroes (aligned, unaligned, -u) and discards; the VHDX then equals the model', async () => {
    const { file, model } = await newDisk('qemu-io');
    const disk = await openVirtualDisk(file);
    const srv = await serve([{ name: 'disk', device: disk }]);
    const r = rng(SEED);
    const cmds: string[] = [];
    for (let i = 0; i < CASES; i++) {
      const kind = r.int(10);
      const len = 1 + r.int(300 * 1024);
      const off = r.int(SIZE - len);
      if (kind < 6) {
        const p = 1 + r.int(255);
        cmds.push(`write -P ${p} ${off} ${len}`, `read -P ${p} ${off} ${len}`);
        model.fill(p, off, off + len);
      } else if (kind < 8) {
        cmds.push(`write -z ${kind === 7 ? '-u ' : ''}${off} ${len}`, `read -P 0 ${off} ${len}`);
        model.fill(0, off, off + len);
      } else {
        // Discards whole 1 MiB blocks (what the server deallocates); the read shows QEMU sent it.
        const blocks = 1 + r.int(3);
        const at = r.int(SIZE / MiB - blocks) * MiB;
        cmds.push(`discard ${at} ${blocks * MiB}`, `read -P 0 ${at} ${blocks * MiB}`);
        model.fill(0, at, at + blocks * MiB);
      }
      if (i % 20 === 19) cmds.push('flush');
    }
    await qemuIo(srv.uri('disk'), cmds);
    const stats = srv.server.stats();
    expect(stats.requests.NBD_CMD_WRITE).toBeGreaterThan(0);
    expect(stats.requests.NBD_CMD_WRITE_ZEROES).toBeGreaterThan(0);
    expect(stats.requests.NBD_CMD_TRIM).toBeGreaterThan(0);
    expect(stats.requests.NBD_CMD_FLUSH).toBeGreaterThan(0);
    await srv.server.close();
    await closeAndCheck(disk, file, model);
  });

  it('nbdinfo: --list, --map matches the blocks written, --map=qemu:dirty-bitmap matches the tracker', async () => {
    const { file } = await newDisk('tracked', { tracked: true });
    const disk = await openVirtualDisk(file);
    await disk.write(40 * MiB, Buffer.alloc(3 * MiB, 1));
    const id = (await disk.seal())!;
    expect(id).toMatch(/^rct2:/);
    const other = await openVirtualDisk((await newDisk('other')).file, { readOnly: true });
    const srv = await serve([
      { name: 'tracked', device: disk },
      { name: 'other', device: other },
    ]);
    const list = JSON.parse((await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${srv.socket}`])).stdout);
    const byName = Object.fromEntries(list.exports.map((e: { 'export-name': string }) => [e['export-name'], e]));
    expect(Object.keys(byName).sort()).toEqual(['other', 'tracked']);
    expect(byName.tracked['export-size']).toBe(SIZE);
    expect(byName.tracked.contexts).toEqual(['base:allocation', `qemu:dirty-bitmap:${id}`]);
    expect(byName.other.is_read_only).toBe(true);

    const writes = [
      [5 * MiB + 1000, 100_000],
      [20 * MiB, 2 * MiB],
      [63 * MiB + 512, 4096],
    ];
    await qemuIo(
      srv.uri('tracked'),
      writes.map(([o, n]) => `write -P 7 ${o} ${n}`),
    );
    const dirty = await nbdMap(srv.uri('tracked'), `qemu:dirty-bitmap:${id}`);
    const tracker = await disk.changes(id, 0, SIZE);
    const expected: MapEntry[] = [];
    let at = 0;
    for (const c of tracker.ranges) {
      if (c.offset > at) expected.push({ offset: at, length: c.offset - at, type: 0 });
      expected.push({ offset: c.offset, length: c.length, type: 1 });
      at = c.offset + c.length;
    }
    if (at < SIZE) expected.push({ offset: at, length: SIZE - at, type: 0 });
    expect(dirty).toEqual(merge(expected));
    for (const [o, n] of writes) {
      expect(dirty.some((d) => d.type === 1 && d.offset <= o && o + n <= d.offset + d.length)).toBe(true);
    }
    expect(dirty.some((d) => d.type === 1 && d.offset <= 40 * MiB && 40 * MiB < d.offset + d.length)).toBe(false);

    // Allocation: 1 MiB blocks, exactly those written (qemu-img map cannot tell for VHDX: it says all data).
    // With SEEK_DATA the parts of them never written are holes of the file: allocated zeros (type 2),
    // known to the 4 KiB of the file system's blocks.
    const alloc = await nbdMap(srv.uri('tracked'));
    const all = [[40 * MiB, 3 * MiB], ...writes];
    const written = new Set<number>();
    for (const [o, n] of all) {
      for (let blk = Math.floor(o / MiB); blk <= Math.floor((o + n - 1) / MiB); blk++) written.add(blk);
    }
    const FS_BLOCK = 4096;
    const isData = (at: number) =>
      seekAddon() === null ||
      all.some(([o, n]) => Math.floor(o / FS_BLOCK) * FS_BLOCK <= at && at < Math.ceil((o + n) / FS_BLOCK) * FS_BLOCK);
    const expectedAlloc = merge(
      Array.from({ length: SIZE / FS_BLOCK }, (_, i) => ({
        offset: i * FS_BLOCK,
        length: FS_BLOCK,
        type: !written.has(Math.floor((i * FS_BLOCK) / MiB)) ? 3 : isData(i * FS_BLOCK) ? 0 : 2,
      })),
    );
    expect(alloc).toEqual(expectedAlloc);
    const dataBytes = alloc.filter((e) => e.type === 0).reduce((n, e) => n + e.length, 0);
    if (seekAddon() === null) expect(dataBytes).toBe(7 * MiB);
    else expect(dataBytes).toBe(3 * MiB + 25 * FS_BLOCK + 2 * MiB + 2 * FS_BLOCK);
    await srv.server.close();
    await disk.close();
    await other.close();
    const check = await qemuImgCheck(file);
    expect(check.ok, check.output).toBe(true);
  });

  it('nbdcopy from and to exports and qemu-img convert read exactly the content; TCP works too', async () => {
    const src = await newDisk('copy-src');
    const dst = await newDisk('copy-dst');
    const a = await openVirtualDisk(src.file);
    const r = rng(SEED + 1);
    for (let i = 0; i < 40; i++) {
      const len = 1 + r.int(2 * MiB);
      const off = r.int(SIZE - len);
      const data = r.bytes(len);
      await a.write(off, data);
      data.copy(src.model, off);
    }
    const b = await openVirtualDisk(dst.file);
    const srv = await serve([
      { name: 'src', device: a, readOnly: true },
      { name: 'dst', device: b },
    ]);
    const out = path.join(dir, 'copy.raw');
    await run('nbdcopy', [srv.uri('src'), out]);
    expect(readFileSync(out).equals(src.model)).toBe(true);
    const conv = path.join(dir, 'convert.raw');
    await run('qemu-img', ['convert', '-f', 'raw', srv.uri('src'), '-O', 'raw', conv]);
    expect(readFileSync(conv).equals(src.model)).toBe(true);
    await run('nbdcopy', [srv.uri('src'), srv.uri('dst')]);
    src.model.copy(dst.model);

    const tcp = await srv.server.listen({ port: 0 });
    expect(tcp).toMatchObject({ type: 'tcp', host: '127.0.0.1' });
    const tcpUri = srv.server.uri('src', tcp);
    expect(tcpUri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/src$/);
    const info = JSON.parse((await run('nbdinfo', ['--json', tcpUri])).stdout);
    expect(info.exports[0]['export-size']).toBe(SIZE);
    const tcpOut = path.join(dir, 'tcp.raw');
    await run('nbdcopy', [tcpUri, tcpOut]);
    expect(readFileSync(tcpOut).equals(src.model)).toBe(true);

    await srv.server.close();
    await closeAndCheck(a, src.file, src.model);
    await closeAndCheck(b, dst.file, dst.model);
  });

  it('two clients writing different regions at once', async () => {
    const { file, model } = await newDisk('two');
    const disk = await openVirtualDisk(file);
    const srv = await serve([{ name: 'disk', device: disk }]);
    const half = SIZE / 2;
    const script = (base: number, seed: number) => {
      const r = rng(seed);
      const cmds: string[] = [];
      for (let i = 0; i < 40; i++) {
        const len = 1 + r.int(512 * 1024);
        const off = base + r.int(half - len);
        const p = 1 + r.int(255);
        cmds.push(`aio_write -P ${p} ${off} ${len}`);
        model.fill(p, off, off + len);
        if (i % 8 === 7) cmds.push('aio_flush');
      }
      return cmds;
    };
    const first = script(0, SEED + 2);
    const second = script(half, SEED + 3);
    await Promise.all([qemuIo(srv.uri('disk'), [...first, 'flush']), qemuIo(srv.uri('disk'), [...second, 'flush'])]);
    expect(srv.server.stats().connections.total).toBe(2);
    // A third client reads the result back through the server.
    const verify: string[] = [];
    for (let off = 0; off < SIZE; off += 4 * MiB) {
      verify.push(`read -P ${model[off]} ${off} 1`);
    }
    await qemuIo(srv.uri('disk'), verify);
    await srv.server.close();
    await closeAndCheck(disk, file, model);
  });

  it('a client killed mid-request and clients sending garbage disturb nobody; the VHDX stays consistent', async () => {
    const { file, model } = await newDisk('robust');
    const disk = await openVirtualDisk(file);
    // The export the killed client writes to: its first write waits until the client is dead.
    const gated = new GatedWrites(disk);
    const srv = await serve([
      { name: 'disk', device: disk },
      { name: 'victim', device: gated },
    ]);

    const victim = spawn('qemu-io', ['-f', 'raw', '-c', 'write -P 9 32M 24M', srv.uri('victim')], { stdio: 'ignore' });
    const exited = new Promise((resolve) => victim.on('exit', resolve));
    for (let i = 0; i < 500 && gated.started === 0; i++) await sleep(10);
    // Its one 24 MiB write, which the server hands to the device as 24 writes of 1 MiB (all started at once).
    expect(gated.started).toBe(24);
    victim.kill('SIGKILL');
    await exited;

    // Garbage, each on its own connection, while a good client works.
    const garbage: Buffer[] = [
      Buffer.from('not an nbd client at all\r\n'),
      Buffer.concat([encodeClientFlags(3), Buffer.from('IHAVEOPX'), Buffer.alloc(8)]),
      Buffer.concat([encodeClientFlags(3), encodeOption(999, Buffer.from('?')), encodeOption(OPT.LIST).subarray(0, 9)]),
      (() => {
        const h = encodeOption(OPT.GO);
        h.writeUInt32BE(0xffffffff, 12); // 4 GiB of option data announced, a little sent
        return Buffer.concat([encodeClientFlags(3), h, Buffer.alloc(1000)]);
      })(),
      Buffer.concat([encodeClientFlags(0xffffffff)]),
    ];
    const good = qemuIo(srv.uri('disk'), [`write -P 5 ${MiB} ${4 * MiB}`, `read -P 5 ${MiB} ${4 * MiB}`, 'flush']);
    model.fill(5, MiB, 5 * MiB);
    await Promise.all(
      garbage.map(async (g) => {
        const s = net.connect({ path: srv.socket });
        s.on('error', () => undefined);
        await new Promise((resolve) => s.once('connect', resolve));
        s.write(g);
        await sleep(100);
        s.destroy();
      }),
    );
    // In transmission: a write announcing 32 MiB + 1 and a write cut off mid-payload.
    const { client } = await openExport({ path: srv.socket }, 'disk');
    client.write(encodeRequest({ flags: 0, command: CMD.WRITE, handle: 1n, offset: 0, length: 2 ** 25 + 1 }));
    client.write(Buffer.alloc(4096));
    client.destroy();
    const { client: cut } = await openExport({ path: srv.socket }, 'disk');
    cut.write(encodeRequest({ flags: 0, command: CMD.WRITE, handle: 2n, offset: 0, length: MiB }).subarray(0, 28));
    cut.write(Buffer.alloc(1000, 0xee));
    cut.destroy();
    await good;

    gated.release(); // the dead client's write completes; its reply goes nowhere
    for (let i = 0; i < 200 && srv.server.stats().connections.active > 0; i++) await sleep(10);
    expect(srv.server.stats().connections.active).toBe(0);
    expect(srv.server.stats().connections.protocolErrors).toBeGreaterThanOrEqual(3);
    await qemuIo(srv.uri('disk'), [`read -P 5 ${MiB} ${4 * MiB}`]);
    const fresh = await RawClient.connect({ path: srv.socket });
    expect(BigInt((await fresh.read(16)).readBigUInt64BE(8))).toBe(IHAVEOPT);
    fresh.destroy();
    await srv.server.close();
    await disk.close();
    const check = await qemuImgCheck(file);
    expect(check.ok, check.output).toBe(true);
    const content = await VhdxFile.open(file);
    const all = await content.readAt(0, SIZE);
    await content.close();
    // The killed client's range holds its pattern or zeros, nothing else; the rest is the model.
    const victimRange = all.subarray(32 * MiB, 56 * MiB);
    for (let off = 0; off < victimRange.length; off += 512) {
      const v = victimRange[off];
      if (v !== 9 && v !== 0) expect.fail(`byte at ${32 * MiB + off} is ${v}`);
    }
    expect(all.subarray(0, 32 * MiB).equals(model.subarray(0, 32 * MiB))).toBe(true);
    expect(all.subarray(56 * MiB).equals(model.subarray(56 * MiB))).toBe(true);
  });
});
