/**
 * The `tidemark` command end to end, as a person or a script runs it: `node bin/tidemark.js ...` in a
 * child process (the compiled CLI in dist/, built by `npm test` before vitest starts). Exit statuses and
 * output shapes are the ones docs/cli.md documents; every failure must be exactly one line on stderr.
 */
import { spawnSync } from 'node:child_process';
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from './helpers/peers.js';
import { rng, seedFrom } from './helpers/random.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const MAIN = path.join(ROOT, 'dist', 'cli', 'main.js');
const KiB = 1024;
const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_CLI_SEED', 777);
console.log(`cli seed ${SEED} (set TIDEMARK_CLI_SEED to replay)`);

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  if (!existsSync(MAIN)) {
    throw new Error(
      `${MAIN} is missing: build the CLI first (\`npm run build\`; \`npm test\` builds before it runs vitest)`,
    );
  }
  const stale = staleSources(path.join(ROOT, 'src'));
  if (stale.length > 0) {
    console.warn(`dist/ is older than ${stale.length} source file(s), e.g. ${stale[0]}: run \`npm run build\``);
  }
  ({ dir, cleanup } = await tempDir('cli'));
});

/** Sources newer than their compiled dist/ file (a hint for people running vitest directly). */
function staleSources(srcDir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(srcDir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile() || !e.name.endsWith('.ts')) continue;
    const src = path.join(e.parentPath, e.name);
    const built = path.join(ROOT, 'dist', path.relative(srcDir, src)).replace(/\.ts$/, '.js');
    if (!existsSync(built) || statSync(built).mtimeMs < statSync(src).mtimeMs) out.push(path.relative(ROOT, src));
  }
  return out;
}
afterAll(async () => cleanup?.());

interface Result {
  status: number | null;
  stdout: Buffer;
  stderr: string;
  text: string;
}

function tidemark(args: string[], opts: { input?: Buffer | string } = {}): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    cwd: dir,
    input: opts.input,
    maxBuffer: 256 * MiB,
    env: { ...process.env, NO_COLOR: '1' },
  });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr.toString(), text: r.stdout.toString() };
}

/** Succeeds, or the assertion shows what the command said. */
function ok(args: string[], opts: { input?: Buffer | string } = {}): Result {
  const r = tidemark(args, opts);
  expect(r.status, `tidemark ${args.join(' ')}: ${r.stderr}`).toBe(0);
  return r;
}

/** Parsed `--json` output: a loose shape, checked field by field below. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

function json(args: string[]): Json {
  return JSON.parse(ok([...args, '--json']).text);
}

/** A failure: the documented exit status and exactly one line on stderr, `tidemark: CODE: message`. */
function fails(args: string[], status: number, code: string, opts: { input?: Buffer | string } = {}): Result {
  const r = tidemark(args, opts);
  expect(r.status, `tidemark ${args.join(' ')}: ${r.stderr}`).toBe(status);
  expect(r.stderr.endsWith('\n'), `stderr ends with a newline: ${JSON.stringify(r.stderr)}`).toBe(true);
  expect(r.stderr.trimEnd().split('\n'), `stderr is one line: ${JSON.stringify(r.stderr)}`).toHaveLength(1);
  expect(r.stderr).toMatch(new RegExp(`^tidemark: ${code}: \\S`));
  return r;
}

const p = (name: string) => path.join(dir, name);

/** Zeroes `length` bytes at `offset` of a file in place (simulated damage). */
function zeroAt(file: string, offset: number, length: number): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, Buffer.alloc(length), 0, length, offset);
  } finally {
    closeSync(fd);
  }
}

describe('tidemark vhdx create and info', () => {
  it('creates dynamic, fixed, 4096-byte-sector and differencing disks; info --json has the documented fields', () => {
    const r = ok(['vhdx', 'create', p('d.vhdx'), '--size', '64M']);
    expect(r.text).toMatch(/created dynamic VHDX/);
    const d = json(['vhdx', 'info', p('d.vhdx')]);
    expect(d).toMatchObject({
      format: 'vhdx',
      type: 'dynamic',
      virtualSize: 64 * MiB,
      blockSize: 32 * MiB,
      logicalSectorSize: 512,
      physicalSectorSize: 4096,
      hasParent: false,
      parentLocator: null,
    });
    expect(d.headers).toHaveLength(2);
    for (const h of d.headers) expect(h).toMatchObject({ valid: true, version: 1, logOffset: MiB, logLength: MiB });
    expect(d.headers.filter((h: Json) => h.current)).toHaveLength(1);
    expect(typeof d.headers[0].sequenceNumber).toBe('string');
    expect(d.regionTables).toHaveLength(2);
    for (const t of d.regionTables) {
      expect(t.valid).toBe(true);
      expect(t.entries.map((e: Json) => e.name).sort()).toEqual(['bat', 'metadata']);
    }
    expect(d.metadata.items.map((i: Json) => i.name).sort()).toEqual([
      'file_parameters',
      'logical_sector_size',
      'physical_sector_size',
      'virtual_disk_id',
      'virtual_disk_size',
    ]);
    expect(d.bat).toMatchObject({ payloadBlocks: 2, payload: { not_present: 2 }, allocatedBytes: 0 });
    expect(d.chain).toEqual([expect.objectContaining({ path: p('d.vhdx'), type: 'dynamic' })]);
    expect(d.warnings).toEqual([]);

    const f = JSON.parse(
      ok(['vhdx', 'create', p('f.vhdx'), '--size', '64M', '--type', 'fixed', '--block-size', '1M', '--json']).text,
    );
    expect(f).toMatchObject({ type: 'fixed', virtualSize: 64 * MiB, blockSize: MiB, leaveBlockAllocated: true });
    expect(f.bat.payload).toEqual({ fully_present: 64 });
    expect(statSync(p('f.vhdx')).size).toBeGreaterThanOrEqual(64 * MiB);

    ok(['vhdx', 'create', p('k.vhdx'), '--size', '16M', '--logical-sector', '4096', '--block-size', '2M']);
    expect(json(['vhdx', 'info', p('k.vhdx')])).toMatchObject({ logicalSectorSize: 4096, blockSize: 2 * MiB });

    const c = ok(['vhdx', 'create', p('d-child.avhdx'), '--parent', p('d.vhdx')]);
    expect(c.text).toMatch(/created differencing VHDX/);
    const ci = json(['vhdx', 'info', p('d-child.avhdx')]);
    expect(ci).toMatchObject({ type: 'differencing', hasParent: true, virtualSize: 64 * MiB, blockSize: 2 * MiB });
    expect(ci.metadata.items.map((i: Json) => i.name)).toContain('parent_locator');
    expect(ci.parentLocator.entries.relative_path).toBe('.\\d.vhdx');
    const parentDwg = d.headers.find((h: Json) => h.current).dataWriteGuid;
    expect(ci.parentLocator.entries.parent_linkage.toLowerCase()).toBe(`{${parentDwg}}`.toLowerCase());
    expect(ci.chain.map((l: Json) => [l.path, l.type])).toEqual([
      [p('d-child.avhdx'), 'differencing'],
      [p('d.vhdx'), 'dynamic'],
    ]);
    expect(ci.chain[0].foundBy).toBe('relative_path');

    // The text form is for people; it names the essentials.
    const t = ok(['vhdx', 'info', p('d-child.avhdx')]).text;
    expect(t).toMatch(/differencing VHDX/);
    expect(t).toMatch(/virtual size\s+64 MiB/);
    expect(t).toMatch(/chain\[1\]/);
  });
});

describe('tidemark vhdx check', () => {
  it('passes a good file, warns about a damaged header, repairs it, and reports a file with none', () => {
    ok(['vhdx', 'create', p('c.vhdx'), '--size', '32M', '--block-size', '2M']);
    ok(['vhdx', 'write', p('c.vhdx'), '--offset', '1M'], { input: Buffer.alloc(100 * KiB, 0x5c) });
    const good = json(['vhdx', 'check', p('c.vhdx')]);
    expect(good).toMatchObject({ ok: true, errors: [], warnings: [], repaired: [] });
    expect(ok(['vhdx', 'check', p('c.vhdx')]).text).toMatch(/no errors/);

    // Header 1 zeroed: the other copy is used, a warning, exit 0.
    copyFileSync(p('c.vhdx'), p('c-h1.vhdx'));
    zeroAt(p('c-h1.vhdx'), 64 * KiB, 4 * KiB);
    const r = tidemark(['vhdx', 'check', p('c-h1.vhdx'), '--json']);
    expect(r.status).toBe(0);
    expect(r.stderr).toBe('');
    const damaged = JSON.parse(r.text);
    expect(damaged.ok).toBe(true);
    expect(damaged.errors).toEqual([]);
    expect(damaged.warnings.map((w: Json) => w.code)).toEqual(['HEADER_INVALID']);
    expect(damaged.warnings[0]).toMatchObject({ structure: 'header 1', offset: 64 * KiB });
    // The data still reads.
    const back = ok(['vhdx', 'read', p('c-h1.vhdx'), '--offset', '1M', '--length', '100K']).stdout;
    expect(back.equals(Buffer.alloc(100 * KiB, 0x5c))).toBe(true);

    // --repair rewrites it; afterwards there is nothing to warn about.
    const repaired = json(['vhdx', 'check', p('c-h1.vhdx'), '--repair']);
    expect(repaired.ok).toBe(true);
    expect(repaired.repaired.join('\n')).toMatch(/header 1 rewritten/);
    const after = json(['vhdx', 'check', p('c-h1.vhdx')]);
    expect(after).toMatchObject({ ok: true, errors: [], warnings: [] });
    expect(
      readFileSync(p('c-h1.vhdx'))
        .subarray(64 * KiB, 64 * KiB + 4)
        .toString('latin1'),
    ).toBe('head');
    const hs = json(['vhdx', 'info', p('c-h1.vhdx')]).headers;
    expect(hs.map((h: Json) => h.valid)).toEqual([true, true]);

    // Both headers zeroed: nothing can be opened. `check` reports it as an error finding and exits 1
    // (docs/cli.md: open failures are findings; exit 1 when errors are found)...
    copyFileSync(p('c.vhdx'), p('c-h12.vhdx'));
    zeroAt(p('c-h12.vhdx'), 64 * KiB, 4 * KiB);
    zeroAt(p('c-h12.vhdx'), 128 * KiB, 4 * KiB);
    const none = tidemark(['vhdx', 'check', p('c-h12.vhdx'), '--json']);
    expect(none.status).toBe(1);
    const report = JSON.parse(none.text);
    expect(report.ok).toBe(false);
    expect(report.errors.map((e: Json) => e.code)).toEqual(['VHDX_CORRUPT']);
    expect(tidemark(['vhdx', 'check', p('c-h12.vhdx')]).status).toBe(1);
    // ...--repair cannot help and says so...
    const rep = tidemark(['vhdx', 'check', p('c-h12.vhdx'), '--repair', '--json']);
    expect(rep.status).toBe(1);
    expect(JSON.parse(rep.text).repaired.join('\n')).toMatch(/nothing repaired/);
    // ...and every other command fails with one line and the CORRUPT status (4).
    const e = fails(['vhdx', 'info', p('c-h12.vhdx')], 4, 'VHDX_CORRUPT');
    expect(e.stderr).toMatch(/no valid header/);
    fails(['vhdx', 'read', p('c-h12.vhdx'), '--offset', '0', '--length', '512'], 4, 'VHDX_CORRUPT');
  });
});

describe('tidemark vhdx write and read', () => {
  it('writes from a file and from stdin, reads to a file and to stdout: the same bytes', () => {
    const r = rng(SEED);
    ok(['vhdx', 'create', p('rw.vhdx'), '--size', '24M', '--block-size', '1M']);
    const expected = Buffer.alloc(24 * MiB);
    const a = r.bytes(3 * MiB + 123);
    writeFileSync(p('a.bin'), a);
    const w1 = ok(['vhdx', 'write', p('rw.vhdx'), '--offset', String(MiB + 7), '--input', p('a.bin')]);
    expect(w1.stderr).toMatch(new RegExp(`wrote ${a.length} bytes at offset ${MiB + 7}`));
    a.copy(expected, MiB + 7);
    const b = r.bytes(100 * KiB + 5);
    ok(['vhdx', 'write', p('rw.vhdx'), '--offset', '10M'], { input: b });
    b.copy(expected, 10 * MiB);
    const c = r.bytes(5 * MiB);
    ok(['vhdx', 'write', p('rw.vhdx'), '--offset', String(19 * MiB - 1)], { input: c }); // stdin, many chunks
    c.copy(expected, 19 * MiB - 1);

    ok(['vhdx', 'read', p('rw.vhdx'), '--offset', '0', '--length', '24M', '--output', p('all.bin')]);
    expect(readFileSync(p('all.bin')).equals(expected)).toBe(true);
    const out = ok(['vhdx', 'read', p('rw.vhdx'), '--offset', String(MiB + 5), '--length', String(4 * MiB)]);
    expect(out.stdout.equals(expected.subarray(MiB + 5, 5 * MiB + 5))).toBe(true);
    expect(out.stderr).toBe('');
    const tail = ok(['vhdx', 'read', p('rw.vhdx'), '--offset', String(24 * MiB - 1), '--length', '1']);
    expect(tail.stdout.equals(expected.subarray(24 * MiB - 1))).toBe(true);

    // The same through a 4096-byte-sector disk, unaligned.
    ok(['vhdx', 'create', p('rw4k.vhdx'), '--size', '8M', '--logical-sector', '4096', '--block-size', '1M']);
    const d = r.bytes(9999);
    ok(['vhdx', 'write', p('rw4k.vhdx'), '--offset', String(MiB - 4097)], { input: d });
    const back = ok(['vhdx', 'read', p('rw4k.vhdx'), '--offset', String(MiB - 4098), '--length', String(10001)]);
    expect(back.stdout.equals(Buffer.concat([Buffer.alloc(1), d, Buffer.alloc(1)]))).toBe(true);
  });

  it('refuses ranges past the end of the disk (exit 2, one line)', () => {
    ok(['vhdx', 'create', p('small.vhdx'), '--size', '4M', '--block-size', '1M']);
    writeFileSync(p('two-k.bin'), Buffer.alloc(2048, 0xee));
    const e1 = fails(
      ['vhdx', 'write', p('small.vhdx'), '--offset', String(4 * MiB - 1024), '--input', p('two-k.bin')],
      2,
      'INVALID_ARGUMENT',
    );
    expect(e1.stderr).toMatch(/past the/);
    // Checked before anything is written.
    const untouched = ok(['vhdx', 'read', p('small.vhdx'), '--offset', String(4 * MiB - 1024), '--length', '1K']);
    expect(untouched.stdout.equals(Buffer.alloc(1024))).toBe(true);
    fails(['vhdx', 'write', p('small.vhdx'), '--offset', '5M'], 2, 'INVALID_ARGUMENT', { input: Buffer.alloc(10) });
    fails(['vhdx', 'write', p('small.vhdx'), '--offset', String(4 * MiB - 10)], 2, 'INVALID_ARGUMENT', {
      input: Buffer.alloc(11),
    });
    fails(['vhdx', 'read', p('small.vhdx'), '--offset', '4M', '--length', '1'], 2, 'INVALID_ARGUMENT');
    fails(['vhdx', 'read', p('small.vhdx'), '--offset', '0', '--length', '5M'], 2, 'INVALID_ARGUMENT');
  });
});

describe('tidemark vhdx convert and merge', () => {
  it('raw → VHDX → raw round trip, as dynamic and as fixed', () => {
    const r = rng(SEED + 1);
    const raw = Buffer.alloc(20 * MiB + 512);
    r.bytes(MiB + 300).copy(raw, 5000);
    r.bytes(4096).copy(raw, 13 * MiB);
    raw.fill(0x77, 20 * MiB - 100);
    writeFileSync(p('src.raw'), raw);

    const c1 = json(['vhdx', 'convert', p('src.raw'), p('conv.vhdx'), '--block-size', '2M']);
    expect(c1).toMatchObject({ sourceFormat: 'raw', format: 'vhdx', virtualSize: raw.length });
    expect(c1.bytesSkipped).toBeGreaterThan(0);
    expect(c1.bytesWritten + c1.bytesSkipped).toBe(raw.length);
    const info = json(['vhdx', 'info', p('conv.vhdx')]);
    expect(info).toMatchObject({ type: 'dynamic', blockSize: 2 * MiB, virtualSize: raw.length });
    expect(info.bat.payload.not_present).toBeGreaterThan(0); // all-zero blocks stay unallocated
    expect(json(['vhdx', 'check', p('conv.vhdx')]).ok).toBe(true);
    const c2 = json(['vhdx', 'convert', p('conv.vhdx'), p('back.raw')]);
    expect(c2).toMatchObject({ sourceFormat: 'vhdx', format: 'raw', virtualSize: raw.length });
    expect(readFileSync(p('back.raw')).equals(raw)).toBe(true);

    ok(['vhdx', 'convert', p('src.raw'), p('conv-fixed.vhdx'), '--type', 'fixed', '--block-size', '1M']);
    expect(json(['vhdx', 'info', p('conv-fixed.vhdx')]).type).toBe('fixed');
    ok(['vhdx', 'convert', p('conv-fixed.vhdx'), p('back-fixed.img'), '--format', 'raw']);
    expect(readFileSync(p('back-fixed.img')).equals(raw)).toBe(true);

    fails(['vhdx', 'convert', p('src.raw'), p('conv.vhdx')], 6, 'ALREADY_EXISTS');
  });

  it('merges a child into its parent and deletes it', () => {
    const r = rng(SEED + 2);
    ok(['vhdx', 'create', p('m-base.vhdx'), '--size', '16M', '--block-size', '1M']);
    ok(['vhdx', 'write', p('m-base.vhdx'), '--offset', '0'], { input: Buffer.alloc(3 * MiB, 0x11) });
    ok(['vhdx', 'create', p('m-child.avhdx'), '--parent', p('m-base.vhdx'), '--block-size', '1M']);
    ok(['vhdx', 'write', p('m-child.avhdx'), '--offset', '1000'], { input: r.bytes(5000) });
    ok(['vhdx', 'write', p('m-child.avhdx'), '--offset', '7M'], { input: r.bytes(2 * MiB) });
    const before = ok(['vhdx', 'read', p('m-child.avhdx'), '--offset', '0', '--length', '16M']).stdout;
    const m = json(['vhdx', 'merge', p('m-child.avhdx')]);
    expect(m.parentPath).toBe(p('m-base.vhdx'));
    expect(m.bytesCopied).toBeGreaterThanOrEqual(2 * MiB + 5000);
    expect(existsSync(p('m-child.avhdx'))).toBe(false);
    const after = ok(['vhdx', 'read', p('m-base.vhdx'), '--offset', '0', '--length', '16M']).stdout;
    expect(after.equals(before)).toBe(true);
    expect(json(['vhdx', 'check', p('m-base.vhdx')]).ok).toBe(true);

    // A disk without a parent has nothing to merge.
    fails(['vhdx', 'merge', p('m-base.vhdx')], 2, 'INVALID_ARGUMENT');
  });
});

describe('tidemark errors', () => {
  it('a file that does not exist: exit 3, one line', () => {
    const e = fails(['vhdx', 'info', p('nope.vhdx')], 3, 'NOT_FOUND');
    expect(e.stderr).toContain('nope.vhdx');
    fails(['vhdx', 'read', p('nope.vhdx'), '--offset', '0', '--length', '1'], 3, 'NOT_FOUND');
    // A file that cannot be read at all is not a finding of `check`: exit 3, one line.
    fails(['vhdx', 'check', p('nope.vhdx'), '--json'], 3, 'NOT_FOUND');
    fails(['vhdx', 'convert', p('nope.raw'), p('nope-out.vhdx')], 3, 'NOT_FOUND');
    expect(existsSync(p('nope-out.vhdx'))).toBe(false);
    fails(['vhdx', 'create', p('nope-child.avhdx'), '--parent', p('nope.vhdx')], 3, 'NOT_FOUND');
  });

  it('a missing --input file for write: exit 3, one line', () => {
    ok(['vhdx', 'create', p('io-in.vhdx'), '--size', '1M', '--block-size', '1M']);
    fails(['vhdx', 'write', p('io-in.vhdx'), '--offset', '0', '--input', p('nope.bin')], 3, 'NOT_FOUND');
  });

  it('an --output in a missing directory for read: exit 3, one line', () => {
    ok(['vhdx', 'create', p('io-out.vhdx'), '--size', '1M', '--block-size', '1M']);
    fails(
      ['vhdx', 'read', p('io-out.vhdx'), '--offset', '0', '--length', '1', '--output', p('no-such-dir/out.bin')],
      3,
      'NOT_FOUND',
    );
  });

  it('a bad size: exit 2, one line, no file left behind', () => {
    for (const size of ['12Q', 'lots', '-5M', '']) {
      fails(['vhdx', 'create', p('bad.vhdx'), '--size', size], 2, 'INVALID_ARGUMENT');
      expect(existsSync(p('bad.vhdx')), `--size ${size}`).toBe(false);
    }
    fails(['vhdx', 'create', p('bad.vhdx'), '--size', '1000'], 2, 'INVALID_ARGUMENT'); // not a whole sector
    fails(['vhdx', 'create', p('bad.vhdx'), '--size', '64M', '--block-size', '3M'], 2, 'INVALID_ARGUMENT');
    fails(['vhdx', 'create', p('bad.vhdx'), '--size', '65T'], 2, 'INVALID_ARGUMENT');
    fails(['vhdx', 'create', p('bad.vhdx'), '--size', '0'], 2, 'INVALID_ARGUMENT');
    fails(['vhdx', 'read', p('bad.vhdx'), '--offset', '-1', '--length', '1'], 2, 'INVALID_ARGUMENT');
    expect(existsSync(p('bad.vhdx'))).toBe(false);
  });

  it('a file that is not a VHDX, or an output that exists', () => {
    writeFileSync(p('plain.txt'), 'hello\n'.repeat(1000));
    fails(['vhdx', 'info', p('plain.txt')], 4, 'VHDX_CORRUPT');
    ok(['vhdx', 'create', p('exists.vhdx'), '--size', '1M', '--block-size', '1M']);
    fails(['vhdx', 'create', p('exists.vhdx'), '--size', '1M'], 6, 'ALREADY_EXISTS');
  });

  it('parents: outside the allowed directories (6) until --allow-dir; modified after the child (6)', () => {
    ok(['vhdx', 'create', p('pa.vhdx'), '--size', '8M', '--block-size', '1M']);
    // A child in a subdirectory, its parent one level up: outside the child's directory.
    const sub = p('sub');
    mkdirSync(sub);
    ok(['vhdx', 'create', path.join(sub, 'ch.avhdx'), '--parent', p('pa.vhdx')]);
    const e = fails(
      ['vhdx', 'read', path.join(sub, 'ch.avhdx'), '--offset', '0', '--length', '1'],
      6,
      'PATH_NOT_ALLOWED',
    );
    expect(e.stderr).toMatch(/outside the allowed directories/);
    ok(['vhdx', 'read', path.join(sub, 'ch.avhdx'), '--offset', '0', '--length', '1', '--allow-dir', dir]);
    const info = json(['vhdx', 'info', path.join(sub, 'ch.avhdx')]);
    expect(info.chain[0].error.code).toBe('PATH_NOT_ALLOWED'); // info reports the link, it does not fail

    ok(['vhdx', 'create', p('pb.vhdx'), '--size', '8M', '--block-size', '1M']);
    ok(['vhdx', 'create', p('pb-child.avhdx'), '--parent', p('pb.vhdx')]);
    ok(['vhdx', 'write', p('pb.vhdx'), '--offset', '0'], { input: Buffer.alloc(512, 1) });
    fails(['vhdx', 'read', p('pb-child.avhdx'), '--offset', '0', '--length', '1'], 6, 'PARENT_MISMATCH');
    const chk = tidemark(['vhdx', 'check', p('pb-child.avhdx'), '--json']);
    expect(chk.status).toBe(1);
    expect((JSON.parse(chk.text) as Json).errors.map((x: Json) => x.code)).toEqual(['PARENT_MISMATCH']);
  });

  it('create --parent names the parent it was given, also one in another directory', () => {
    ok(['vhdx', 'create', p('np.vhdx'), '--size', '8M', '--block-size', '1M']);
    mkdirSync(p('np-sub'));
    const here = ok(['vhdx', 'create', p('np-child.avhdx'), '--parent', p('np.vhdx')]);
    expect(here.text).toContain(`parent ${p('np.vhdx')}`);
    const there = ok(['vhdx', 'create', p('np-sub/child.avhdx'), '--parent', p('np.vhdx')]);
    expect(there.text).toContain(`parent ${p('np.vhdx')}`); // today: "parent undefined"
  });

  it('usage errors (unknown option, bad choice, missing argument): exit 2, one line in the documented form', () => {
    const cases = [
      ['vhdx', 'create', p('u.vhdx'), '--size', '64M', '--bogus'],
      ['vhdx', 'create', p('u.vhdx'), '--size', '64M', '--logical-sector', '1024'],
      ['vhdx', 'read', p('d.vhdx'), '--offset', '0'],
      ['vhdx', 'info'],
      ['vhdx', 'frobnicate'],
    ];
    for (const args of cases) {
      const r = tidemark(args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr.trimEnd().split('\n'), args.join(' ')).toHaveLength(1);
      // docs/cli.md: "Every failure prints one line on stderr, `tidemark: CODE: message`".
      expect(r.stderr, args.join(' ')).toMatch(/^tidemark: INVALID_ARGUMENT: /);
    }
    expect(existsSync(p('u.vhdx'))).toBe(false);
  });

  it('--help and --version exit 0', () => {
    expect(ok(['--help']).text).toMatch(/vhdx/);
    expect(ok(['vhdx', 'create', '--help']).text).toMatch(/--block-size/);
    expect(ok(['--version']).text.trim()).toMatch(/^\d+\.\d+\.\d+/);
  });
});

describe('tidemark demo', () => {
  it('runs its tour in a temporary directory and exits 0', () => {
    const work = p('demo');
    const r = ok(['demo', work]);
    expect(r.text).toMatch(/Tidemark VHDX demo in/);
    expect(r.text).toMatch(/\(equal\)/);
    expect(r.text).toMatch(/equal to the chain/);
    expect(r.text).not.toMatch(/DIFFERENT/);
    expect(r.stderr).toBe('');
    expect(readdirSync(work).sort()).toEqual(['base.vhdx', 'flattened.raw', 'flattened.vhdx']);
    expect(json(['vhdx', 'check', path.join(work, 'base.vhdx')]).ok).toBe(true);
  });
});

describe('tidemark rct', () => {
  it('enable, tracked writes, seal, changes, status, disable', () => {
    const f = p('t.vhdx');
    ok(['vhdx', 'create', f, '--size', '256M']);
    ok(['rct', 'enable', f, '--granularity', '64K']);
    fails(['rct', 'enable', f], 6, 'ALREADY_EXISTS');
    const id1 = ok(['rct', 'seal', f]).text.trim();
    expect(id1).toMatch(/^rct2:[0-9a-f]{8}(:[0-9a-f]{4}){3}:[0-9a-f]{12}:00000001:[0-9a-f]{16}$/);
    ok(['vhdx', 'write', f, '--offset', '100000'], { input: Buffer.alloc(70000, 1) });
    ok(['vhdx', 'write', f, '--offset', '200M'], { input: Buffer.alloc(10, 1) });
    const ch = json(['rct', 'changes', f, '--since', id1]);
    expect(ch.ranges).toEqual([
      { offset: 65536, length: 131072 },
      { offset: 200 * MiB, length: 65536 },
    ]);
    expect(ch.totalBytes).toBe(196608);
    const paged = json(['rct', 'changes', f, '--since', id1, '--max-ranges', '1']);
    expect(paged.ranges).toHaveLength(1);
    expect(paged.processedLength).toBe(200 * MiB);
    const status = json(['rct', 'status', f]);
    expect(status).toMatchObject({ enabled: true, state: 'valid', lastId: id1, granularity: 65536, inUse: false });
    fails(['rct', 'changes', f, '--since', 'rct1:nonsense'], 6, 'MISSING_CHANGE_TRACKING_INFORMATION');
    ok(['rct', 'disable', f]);
    expect(json(['rct', 'status', f]).enabled).toBe(false);
    fails(['rct', 'seal', f], 3, 'TRACKING_NOT_ENABLED');
  });
});
