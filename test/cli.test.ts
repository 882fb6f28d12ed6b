/** The `tidemark` command end to end: outputs, JSON shapes, exit statuses and one-line errors. */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from './helpers/peers.js';
import { rng } from './helpers/random.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const bin = path.join(root, 'bin', 'tidemark.js');

function tm(args: string[], input?: Buffer): { status: number; stdout: string; stderr: string; raw: Buffer } {
  const r = spawnSync(process.execPath, [bin, ...args], { input, maxBuffer: 256 * 2 ** 20 });
  return { status: r.status ?? -1, stdout: r.stdout.toString(), stderr: r.stderr.toString(), raw: r.stdout };
}

/** A failure: the given exit status and exactly one line on stderr naming the code. */
function expectError(r: ReturnType<typeof tm>, status: number, code: string): void {
  expect(r.status, r.stderr).toBe(status);
  expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
  expect(r.stderr).toMatch(new RegExp(`^tidemark: ${code}: `));
}

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  if (!existsSync(path.join(root, 'dist/cli/main.js'))) throw new Error('dist/ is missing: run `npm run build` (npm test does)');
  ({ dir, cleanup } = await tempDir('cli'));
});
afterAll(async () => cleanup?.());

describe('tidemark vhdx', () => {
  it('create, info --json, write, read, check', () => {
    const f = `${dir}/a.vhdx`;
    expect(tm(['vhdx', 'create', f, '--size', '64M', '--block-size', '2M', '--logical-sector', '4096']).status).toBe(0);
    const info = JSON.parse(tm(['vhdx', 'info', f, '--json']).stdout);
    expect(info).toMatchObject({ type: 'dynamic', virtualSize: 64 * 2 ** 20, blockSize: 2 * 2 ** 20, logicalSectorSize: 4096, physicalSectorSize: 4096 });
    expect(info.headers).toHaveLength(2);
    expect(info.regionTables).toHaveLength(2);
    expect(info.metadata.items.map((i: { name: string }) => i.name)).toContain('virtual_disk_size');
    expect(info.bat.payload).toEqual({ not_present: 32 });
    expect(info.chain).toHaveLength(1);

    const data = rng(5).bytes(3 * 2 ** 20 + 123);
    writeFileSync(`${dir}/in.bin`, data);
    expect(tm(['vhdx', 'write', f, '--offset', '1M', '--input', `${dir}/in.bin`]).status).toBe(0);
    expect(tm(['vhdx', 'write', f, '--offset', String(40 * 2 ** 20)], data.subarray(0, 5000)).status).toBe(0);
    const out = tm(['vhdx', 'read', f, '--offset', '1M', '--length', String(data.length)]);
    expect(out.status).toBe(0);
    expect(out.raw.equals(data)).toBe(true);
    expect(tm(['vhdx', 'read', f, '--offset', String(40 * 2 ** 20), '--length', '5000', '--output', `${dir}/out.bin`]).status).toBe(0);
    expect(readFileSync(`${dir}/out.bin`).equals(data.subarray(0, 5000))).toBe(true);
    const check = JSON.parse(tm(['vhdx', 'check', f, '--json']).stdout);
    expect(check).toMatchObject({ ok: true, errors: [] });
  });

  it('fixed and differencing disks, convert round trip, merge', () => {
    const base = `${dir}/base.vhdx`;
    expect(tm(['vhdx', 'create', base, '--size', '16M', '--type', 'fixed', '--block-size', '1M']).status).toBe(0);
    expect(JSON.parse(tm(['vhdx', 'info', base, '--json']).stdout).type).toBe('fixed');
    tm(['vhdx', 'write', base, '--offset', '0'], Buffer.alloc(2 ** 20, 7));
    const child = `${dir}/child.avhdx`;
    expect(tm(['vhdx', 'create', child, '--parent', base]).status).toBe(0);
    tm(['vhdx', 'write', child, '--offset', '4096'], Buffer.alloc(512, 9));
    const info = JSON.parse(tm(['vhdx', 'info', child, '--json']).stdout);
    expect(info.type).toBe('differencing');
    expect(info.parentLocator.entries.relative_path).toBe('.\\base.vhdx');
    expect(info.chain.map((c: { path: string }) => path.basename(c.path))).toEqual(['child.avhdx', 'base.vhdx']);

    expect(tm(['vhdx', 'convert', child, `${dir}/flat.raw`]).status).toBe(0);
    const conv = JSON.parse(tm(['vhdx', 'convert', `${dir}/flat.raw`, `${dir}/back.vhdx`, '--json']).stdout);
    expect(conv).toMatchObject({ sourceFormat: 'raw', format: 'vhdx', virtualSize: 16 * 2 ** 20 });
    const flat = readFileSync(`${dir}/flat.raw`);
    expect(flat[4096]).toBe(9);
    expect(flat[0]).toBe(7);
    expect(tm(['vhdx', 'read', `${dir}/back.vhdx`, '--offset', '0', '--length', String(16 * 2 ** 20)]).raw.equals(flat)).toBe(true);

    const merged = JSON.parse(tm(['vhdx', 'merge', child, '--json']).stdout);
    expect(merged.parentPath).toBe(base);
    expect(existsSync(child)).toBe(false);
    expect(tm(['vhdx', 'read', base, '--offset', '0', '--length', String(16 * 2 ** 20)]).raw.equals(flat)).toBe(true);
  });

  it('check finds damage, --repair fixes a damaged header', () => {
    const f = `${dir}/damaged.vhdx`;
    tm(['vhdx', 'create', f, '--size', '8M']);
    const bytes = readFileSync(f);
    bytes.fill(0, 64 * 1024, 68 * 1024); // header 1
    writeFileSync(f, bytes);
    const r = tm(['vhdx', 'check', f, '--json']);
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout).warnings.map((w: { code: string }) => w.code)).toContain('HEADER_INVALID');
    const fixed = JSON.parse(tm(['vhdx', 'check', f, '--repair', '--json']).stdout);
    expect(fixed.repaired.join(' ')).toMatch(/header 1 rewritten/);
    expect(fixed.warnings).toEqual([]);
    bytes.fill(0, 128 * 1024, 132 * 1024); // both headers
    writeFileSync(`${dir}/dead.vhdx`, bytes);
    const dead = tm(['vhdx', 'check', `${dir}/dead.vhdx`]);
    expect(dead.status).toBe(1);
    expectError(tm(['vhdx', 'info', `${dir}/dead.vhdx`]), 4, 'VHDX_CORRUPT');
  });

  it('errors: one line, stable code, exit status', () => {
    expectError(tm(['vhdx', 'info', `${dir}/nope.vhdx`]), 3, 'NOT_FOUND');
    expectError(tm(['vhdx', 'create', `${dir}/x.vhdx`, '--size', 'lots']), 2, 'INVALID_ARGUMENT');
    expectError(tm(['vhdx', 'create', `${dir}/x.vhdx`, '--size', '1M', '--block-size', '3M']), 2, 'INVALID_ARGUMENT');
    tm(['vhdx', 'create', `${dir}/small.vhdx`, '--size', '1M']);
    expectError(tm(['vhdx', 'create', `${dir}/small.vhdx`, '--size', '1M']), 6, 'ALREADY_EXISTS');
    expectError(tm(['vhdx', 'write', `${dir}/small.vhdx`, '--offset', String(2 ** 20 - 10)], Buffer.alloc(100)), 2, 'INVALID_ARGUMENT');
    expectError(tm(['vhdx', 'read', `${dir}/small.vhdx`, '--offset', '0', '--length', '2M']), 2, 'INVALID_ARGUMENT');
    writeFileSync(`${dir}/not.vhdx`, Buffer.alloc(4096, 1));
    expectError(tm(['vhdx', 'info', `${dir}/not.vhdx`]), 4, 'VHDX_CORRUPT');
    expect(tm(['vhdx', 'frobnicate']).status).toBe(2);
  });

  it('demo runs to the end', () => {
    const r = tm(['demo', `${dir}/demo`]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/equal to the chain/);
  });
});

describe('tidemark rct', () => {
  it('enable, tracked writes, seal, changes, status, disable', () => {
    const f = `${dir}/t.vhdx`;
    tm(['vhdx', 'create', f, '--size', '256M']);
    expect(tm(['rct', 'enable', f, '--granularity', '64K']).status).toBe(0);
    expectError(tm(['rct', 'enable', f]), 6, 'ALREADY_EXISTS');
    const id1 = tm(['rct', 'seal', f]).stdout.trim();
    expect(id1).toMatch(/^rct1:[0-9a-f]{8}(:[0-9a-f]{4}){3}:[0-9a-f]{12}:00000001$/);
    tm(['vhdx', 'write', f, '--offset', '100000'], Buffer.alloc(70000, 1));
    tm(['vhdx', 'write', f, '--offset', '200M'], Buffer.alloc(10, 1));
    const ch = JSON.parse(tm(['rct', 'changes', f, '--since', id1, '--json']).stdout);
    expect(ch.ranges).toEqual([
      { offset: 65536, length: 131072 },
      { offset: 200 * 2 ** 20, length: 65536 },
    ]);
    expect(ch.totalBytes).toBe(196608);
    const paged = JSON.parse(tm(['rct', 'changes', f, '--since', id1, '--max-ranges', '1', '--json']).stdout);
    expect(paged.ranges).toHaveLength(1);
    expect(paged.processedLength).toBe(200 * 2 ** 20);
    const status = JSON.parse(tm(['rct', 'status', f, '--json']).stdout);
    expect(status).toMatchObject({ enabled: true, state: 'valid', lastId: id1, granularity: 65536, inUse: false });
    expectError(tm(['rct', 'changes', f, '--since', 'rct1:nonsense']), 6, 'MISSING_CHANGE_TRACKING_INFORMATION');
    expect(tm(['rct', 'disable', f]).status).toBe(0);
    expect(JSON.parse(tm(['rct', 'status', f, '--json']).stdout).enabled).toBe(false);
    expectError(tm(['rct', 'seal', f]), 3, 'TRACKING_NOT_ENABLED');
  });
});
