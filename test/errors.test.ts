/**
 * One error tree: every code has a meaning, an exit status and an HTTP status (compile-time Records, checked
 * here at run time too); docs/errors.md's table is the one scripts/errors-doc.mjs generates from them; details
 * are typed per code; every error class in src/ is a TidemarkError; an unexpected failure is INTERNAL in
 * process, through a route and through a job alike.
 */
import { readFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { between, normalizeTable } from '../src/api/route-doc.js';
import { asTidemarkError } from '../src/api/server.js';
import { HTTP_STATUS } from '../src/api/status.js';
import { EXIT, EXIT_BY_CODE, exitCodeFor } from '../src/cli/output.js';
import { ERROR_MEANINGS, TidemarkError, hasCode, type ErrorCode } from '../src/errors.js';
import { JobManager } from '../src/host/jobs.js';
import { IndexFormatError } from '../src/repository/disk-index.js';
import { PackFormatError } from '../src/repository/pack.js';
import { CodecError } from '../src/repository/pool.js';
import { FreezeError } from '../src/guest/freezer.js';
import { QmpError } from '../src/host/qmp.js';
import { ERRORS_BEGIN, ERRORS_END, errorTable } from '../scripts/errors-doc.mjs';
import { REPO_ROOT } from './helpers/fixtures.js';

const CODES = Object.keys(ERROR_MEANINGS) as ErrorCode[];

describe('error codes', () => {
  it('every code has a one-line meaning, an exit status and an HTTP status, and nothing else has', () => {
    expect(CODES.length).toBeGreaterThan(30);
    expect(Object.keys(EXIT_BY_CODE).sort()).toEqual([...CODES].sort());
    expect(Object.keys(HTTP_STATUS).sort()).toEqual([...CODES].sort());
    for (const code of CODES) {
      expect(ERROR_MEANINGS[code], code).toMatch(/^[^\n]{10,120}$/);
      expect(Object.values(EXIT), code).toContain(EXIT_BY_CODE[code]);
      expect(HTTP_STATUS[code], code).toBeGreaterThanOrEqual(400);
    }
  });

  it("docs/errors.md's table is the generated one (node scripts/errors-doc.mjs rewrites it)", async () => {
    const doc = await readFile(path.join(REPO_ROOT, 'docs', 'errors.md'), 'utf8');
    const table = between(doc, ERRORS_BEGIN, ERRORS_END);
    expect(table, 'table markers in docs/errors.md').toBeDefined();
    expect(normalizeTable(table!)).toBe(
      normalizeTable(errorTable({ meanings: ERROR_MEANINGS, exit: EXIT_BY_CODE, http: HTTP_STATUS })),
    );
  });

  it('docs/errors.md says where every code comes from, and names no code that does not exist', async () => {
    const doc = await readFile(path.join(REPO_ROOT, 'docs', 'errors.md'), 'utf8');
    const where = doc.slice(doc.indexOf('## Where each code comes from'));
    const named = new Set([...where.matchAll(/^\| `([A-Z_]+)`/gm)].map((m) => m[1]));
    expect([...named].filter((c) => !(c in ERROR_MEANINGS))).toEqual([]);
    expect(CODES.filter((c) => !named.has(c))).toEqual([]);
  });

  it('README.md and docs/cli.md point to docs/errors.md', async () => {
    for (const f of ['README.md', 'docs/cli.md']) {
      expect(await readFile(path.join(REPO_ROOT, f), 'utf8'), f).toMatch(/\]\((docs\/)?errors\.md\)/);
    }
  });
});

describe('details typed per code', () => {
  it('are checked when compiled, and narrowed by hasCode', () => {
    const locked = new TidemarkError('LOCKED', 'held', { path: '/d.vhdx', holder: 'qemu (pid 7)', byte: 100 });
    // @ts-expect-error LOCKED names its holder
    void new TidemarkError('LOCKED', 'held', { path: '/d.vhdx', byte: 100 });
    // @ts-expect-error a field no code of that kind has
    void new TidemarkError('CONFLICT', 'running', { vm: 'web' });
    // @ts-expect-error a field of the wrong type
    void new TidemarkError('NOT_FOUND', 'gone', { path: 7 });
    const err: unknown = locked;
    expect(hasCode(err, 'LOCKED') && err.details.holder).toBe('qemu (pid 7)');
    expect(hasCode(err, 'BUSY')).toBe(false);
    // A subclass with one code has that code's details.
    const qmp: TidemarkError<'QMP_ERROR'> = new QmpError('stop', 'GenericError', 'no');
    expect(qmp.details.qmpClass).toBe('GenericError');
    expect(qmp).toBeInstanceOf(TidemarkError);
    // An error read off the wire: any code, any details.
    const code = 'BUSY' as ErrorCode;
    expect(new TidemarkError(code, 'x', { whatever: 1 }).details.whatever).toBe(1);
  });
});

describe('one error tree', () => {
  it('the error classes of the engines are TidemarkErrors with codes', () => {
    const cases: [Error, ErrorCode][] = [
      [new IndexFormatError('corrupt', 'bad magic'), 'REPOSITORY_CORRUPT'],
      [new PackFormatError('truncated', 'cut'), 'REPOSITORY_CORRUPT'],
      [new CodecError('NOT_SUPPORTED', 'corrupt', 'version 9'), 'NOT_SUPPORTED'],
      [new FreezeError('hook failed'), 'GUEST_AGENT_ERROR'],
    ];
    for (const [err, code] of cases) {
      expect(err, err.name).toBeInstanceOf(TidemarkError);
      expect((err as TidemarkError).code, err.name).toBe(code);
    }
  });

  it('no class in src/ extends Error but TidemarkError', async () => {
    const files = (await readdir(path.join(REPO_ROOT, 'src'), { recursive: true })).filter((f) => f.endsWith('.ts'));
    const offenders: string[] = [];
    for (const f of files) {
      const text = await readFile(path.join(REPO_ROOT, 'src', f), 'utf8');
      for (const m of text.matchAll(/class (\w+)(?:<[^>]*>)? extends Error\b/g)) offenders.push(`${f}: ${m[1]}`);
    }
    // The codec worker runs built (pool.ts), so even envelope.ts's EnvelopeError is a TidemarkError.
    expect(offenders.sort()).toEqual(['errors.ts: TidemarkErrorBase']);
  });

  it('an unexpected failure is INTERNAL in process, through a route and through a job', async () => {
    const bug = new TypeError('x is not a function');
    expect(exitCodeFor(bug)).toBe(EXIT.INTERNAL);
    expect(exitCodeFor(new TidemarkError('INTERNAL', 'bug'))).toBe(EXIT.INTERNAL);
    const routed = asTidemarkError(bug);
    expect(routed.code).toBe('INTERNAL');
    expect(HTTP_STATUS[routed.code]).toBe(500);
    const jobs = new JobManager();
    const { id } = jobs.start('test', 't', async () => {
      throw bug;
    });
    const info = await jobs.wait(id, 5000);
    expect(info.state).toBe('Failed');
    expect(info.error?.code).toBe('INTERNAL');
    expect(exitCodeFor(new TidemarkError(info.error!.code, info.error!.message))).toBe(EXIT.INTERNAL);
  });
});
