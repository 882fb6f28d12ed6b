/**
 * `tidemark vhd ...` end to end, as a person or a script runs it: the compiled CLI in dist/ (`npm test`
 * builds it first) in a child process. JSON shapes and exit statuses are those of docs/cli.md; every
 * failure is one line on stderr, `tidemark: CODE: message`.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/peers.js';
import { rng } from '../helpers/random.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const MiB = 2 ** 20;

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  if (!existsSync(path.join(ROOT, 'dist', 'cli', 'vhd.js')))
    throw new Error('dist/cli/vhd.js is missing: run `npm run build` first (npm test does)');
  ({ dir, cleanup } = await tempDir('vhd-cli'));
});
afterAll(async () => cleanup());

function tidemark(args: string[], input?: Buffer) {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: dir, input, maxBuffer: 64 * MiB });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, text: r.stdout.toString(), stderr: r.stderr.toString() };
}

function ok(args: string[], input?: Buffer) {
  const r = tidemark(args, input);
  expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(0);
  return r;
}

/** Fails with exactly one stderr line naming `code`, and the exit status docs/errors.md gives it. */
function fails(args: string[], status: number, code: string) {
  const r = tidemark(args);
  expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(status);
  expect(r.stderr).toMatch(new RegExp(`^tidemark: ${code}: .+\\n$`));
  return r;
}

describe('tidemark vhd', () => {
  it('create, write, read, info: a differencing chain made and inspected from the command line', () => {
    const c = JSON.parse(ok(['vhd', 'create', 'base.vhd', '--size', '6M', '--block-size', '512K', '--json']).text);
    expect(c).toMatchObject({ format: 'vhd', type: 'dynamic', virtualSize: 6 * MiB, blockSize: 512 * 1024 });
    const data = rng(99).bytes(MiB + 777);
    writeFileSync(path.join(dir, 'in.bin'), data);
    const w = ok(['vhd', 'write', 'base.vhd', '--offset', '1000', '--input', 'in.bin']);
    expect(w.stderr).toBe(`wrote ${data.length} bytes at offset 1000\n`);
    ok(['vhd', 'create', 'child.vhd', '--parent', 'base.vhd']);
    ok(['vhd', 'write', 'child.vhd', '--offset', '2000'], Buffer.from('from stdin'));
    const read = ok(['vhd', 'read', 'child.vhd', '--offset', '1000', '--length', String(data.length)]).stdout;
    const want = Buffer.from(data);
    Buffer.from('from stdin').copy(want, 1000);
    expect(read.equals(want)).toBe(true);
    ok(['vhd', 'read', 'child.vhd', '--offset', '0', '--length', '6M', '--output', 'out.raw']);
    expect(statSync(path.join(dir, 'out.raw')).size).toBe(6 * MiB);

    const info = JSON.parse(ok(['vhd', 'info', 'child.vhd', '--json']).text);
    expect(Object.keys(info)).toEqual([
      'path',
      'format',
      'type',
      'creator',
      'formatVersion',
      'fileSize',
      'virtualSize',
      'originalSize',
      'blockSize',
      'uniqueId',
      'timeStamp',
      'features',
      'savedState',
      'geometry',
      'qemuVirtualSize',
      'footers',
      'dynamicHeader',
      'parentLocators',
      'bat',
      'chain',
      'warnings',
    ]);
    expect(info.creator).toEqual({ application: 'tdmk', version: '1.0', hostOs: 'Wi2k' });
    expect(
      info.footers.map((x: { where: string; valid: boolean; inUse: boolean }) => [x.where, x.valid, x.inUse]),
    ).toEqual([
      ['end', true, true],
      ['start', true, false],
    ]);
    expect(info.dynamicHeader.parentName).toBe('base.vhd');
    expect(info.parentLocators.map((l: { platform: string }) => l.platform)).toEqual(['W2ru', 'W2ku', 'MacX']);
    expect(info.bat).toMatchObject({ entries: 12, dataBlocks: 12, allocatedBlocks: 1 });
    expect(info.chain.map((l: { path: string; foundBy?: string }) => [path.basename(l.path), l.foundBy])).toEqual([
      ['child.vhd', 'W2ru'],
      ['base.vhd', undefined],
    ]);
    const text = ok(['vhd', 'info', 'child.vhd']).text;
    expect(text).toMatch(/differencing VHD, created by "tdmk" 1\.0/);
    expect(text).toMatch(/locator 1 W2ru\s+\.\\base\.vhd/);
  });

  it('check: exit 0 clean, 1 with errors; --repair restores a lost footer', () => {
    ok(['vhd', 'create', 'chk.vhd', '--size', '4M']);
    ok(['vhd', 'write', 'chk.vhd', '--offset', '0'], Buffer.alloc(3 * MiB, 7));
    const file = path.join(dir, 'chk.vhd');
    const size = statSync(file).size;
    truncateSync(file, size - 512);
    const r = JSON.parse(ok(['vhd', 'check', 'chk.vhd', '--json']).text);
    expect(r).toMatchObject({ ok: true, errors: [], repaired: [] });
    expect(r.warnings.map((w: { code: string }) => w.code)).toEqual(['FOOTER_INVALID']);
    const fixed = ok(['vhd', 'check', 'chk.vhd', '--repair']).text;
    expect(fixed).toMatch(/^repaired: footer at the end restored/m);
    expect(fixed).toMatch(/chk\.vhd: no errors\n$/);
    expect(statSync(file).size).toBe(size);
    // A BAT entry past the end: an error, exit status 1.
    const b = readFileSync(file);
    b.writeUInt32BE(0x00ffffff, 1536 + 4);
    writeFileSync(file, b);
    const bad = tidemark(['vhd', 'check', 'chk.vhd', '--json']);
    expect(bad.status).toBe(1);
    expect(JSON.parse(bad.text).errors.map((e: { code: string }) => e.code)).toEqual(['BAT_BEYOND_EOF']);
  });

  it('convert between vhd, vhdx and raw; merge', () => {
    ok(['vhd', 'create', 'cb.vhd', '--size', '4M', '--type', 'fixed']);
    ok(['vhd', 'write', 'cb.vhd', '--offset', '1M'], Buffer.alloc(MiB, 0x31));
    ok(['vhd', 'create', 'cc.vhd', '--parent', 'cb.vhd', '--block-size', '512K']);
    ok(['vhd', 'write', 'cc.vhd', '--offset', '1536K'], Buffer.alloc(4096, 0x32));
    const a = JSON.parse(ok(['vhd', 'convert', 'cc.vhd', 'flat.vhdx', '--json']).text);
    expect(a).toEqual({
      sourceFormat: 'vhd',
      format: 'vhdx',
      virtualSize: 4 * MiB,
      bytesRead: expect.any(Number),
      bytesWritten: MiB,
      bytesSkipped: 3 * MiB,
    });
    ok(['vhdx', 'check', 'flat.vhdx']);
    const b = JSON.parse(ok(['vhd', 'convert', 'flat.vhdx', 'back.img', '--format', 'vhd', '--json']).text);
    expect(b).toMatchObject({ sourceFormat: 'vhdx', format: 'vhd' });
    ok(['vhd', 'convert', 'back.img', 'back.raw']);
    const raw = readFileSync(path.join(dir, 'back.raw'));
    const want = Buffer.alloc(4 * MiB);
    want.fill(0x31, MiB, 2 * MiB);
    want.fill(0x32, 1536 * 1024, 1536 * 1024 + 4096);
    expect(raw.equals(want)).toBe(true);
    const m = JSON.parse(ok(['vhd', 'merge', 'cc.vhd', '--json']).text);
    expect(m).toEqual({ parentPath: path.join(dir, 'cb.vhd'), bytesCopied: 4096, bytesZeroed: 0, blocks: 1 });
    expect(existsSync(path.join(dir, 'cc.vhd'))).toBe(false);
    expect(ok(['vhd', 'read', 'cb.vhd', '--offset', '0', '--length', '4M']).stdout.equals(want)).toBe(true);
  });

  it('errors: one line, the documented exit status', () => {
    fails(['vhd', 'create', 'bad.vhd', '--size', '1000'], 2, 'INVALID_ARGUMENT');
    fails(['vhd', 'create', 'bad.vhd', '--size', '1M', '--block-size', '4M'], 2, 'INVALID_ARGUMENT');
    fails(['vhd', 'create', 'bad.vhd'], 2, 'INVALID_ARGUMENT');
    fails(['vhd', 'create', 'base.vhd', '--size', '1M'], 6, 'ALREADY_EXISTS');
    fails(['vhd', 'info', 'missing.vhd'], 3, 'NOT_FOUND');
    writeFileSync(path.join(dir, 'junk.vhd'), Buffer.alloc(2048, 0x55));
    fails(['vhd', 'info', 'junk.vhd'], 4, 'VHD_CORRUPT');
    fails(['vhd', 'read', 'base.vhd', '--offset', '6M', '--length', '1'], 2, 'INVALID_ARGUMENT');
    fails(['vhd', 'merge', 'base.vhd'], 2, 'INVALID_ARGUMENT');
    fails(['vhd', 'info', 'child.vhd', '--map', 'nonsense'], 2, 'INVALID_ARGUMENT');
    // The parent changed after the child was made.
    ok(['vhd', 'write', 'base.vhd', '--offset', '0'], Buffer.from('change'));
    fails(['vhd', 'read', 'child.vhd', '--offset', '0', '--length', '1'], 6, 'PARENT_MISMATCH');
    const info = JSON.parse(ok(['vhd', 'info', 'child.vhd', '--json']).text);
    expect(info.chain[0].error.code).toBe('PARENT_MISMATCH');
    fails(['vhd', 'create', 'k2.vhd', '--parent', 'base.vhd', '--chs-size'], 2, 'INVALID_ARGUMENT');
    fails(['vhd', 'convert', 'base.vhd', 'x.raw', '--type', 'fixed'], 2, 'INVALID_ARGUMENT');
  });
});
