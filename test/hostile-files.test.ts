/**
 * Hostile files where Tidemark expects its own (issue 14): tracking files (.rct, .mrt) that are symbolic
 * links to another file, and FIFOs as a disk, a parent, a .rct, a .mrt, a repository's config and a VM
 * definition. Every command ends promptly (a FIFO opened the old way waited forever for a writer) with a
 * typed one-line error and writes nothing: the link's target, the disk and its tracking files are
 * unchanged. Through the host API, a VM created with a FIFO as its disk is refused at once and does not
 * hold up the creation of another VM.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../src/api/client.js';
import { TidemarkError } from '../src/errors.js';
import { createVhdx } from '../src/formats/vhdx/create.js';
import { VhdxFile } from '../src/formats/vhdx/vhdx.js';
import { startHost } from '../src/daemon/daemon.js';
import { HostLog } from '../src/host/log.js';
import { ChangeTracker } from '../src/tracking/tracker.js';
import { REPO_ROOT } from './helpers/fixtures.js';
import { tempDir } from './helpers/peers.js';

const MiB = 2 ** 20;
const BIN = path.join(REPO_ROOT, 'bin', 'tidemark.js');
/** A command that waited on a FIFO would never end: each must end well within this (CLI start-up included). */
const BOUND_MS = 15_000;

let dir: string;
let cleanup: () => Promise<void>;
let input: string;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('hostile'));
  input = path.join(dir, 'input.bin');
  writeFileSync(input, Buffer.alloc(4096, 0x77));
});
afterAll(async () => cleanup?.());

interface Outcome {
  status: number | null;
  stderr: string;
  ms: number;
}

/** `tidemark ARGS`, killed after 4 × BOUND_MS so a hang fails the test instead of the suite. */
async function tm(args: string[]): Promise<Outcome> {
  const started = performance.now();
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 4 * BOUND_MS);
  const status = await new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  clearTimeout(timer);
  return { status, stderr, ms: performance.now() - started };
}

/** Ended in time with `status` and one line `tidemark: CODE: ...` matching `message`. */
function expectRefused(o: Outcome, status: number, code: string, message: RegExp): void {
  expect(o.ms, `took ${o.ms} ms: ${o.stderr}`).toBeLessThan(BOUND_MS);
  expect(o.status, o.stderr).toBe(status);
  expect(o.stderr).toMatch(new RegExp(`^tidemark: ${code}: [^\\n]+\\n$`));
  expect(o.stderr).toMatch(message);
}

function hash(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

function mkfifo(file: string): void {
  rmSync(file, { force: true });
  execFileSync('mkfifo', [file]);
}

let n = 0;
/** A tracked disk with a victim file beside it; returns their paths. */
async function trackedDisk(): Promise<{ disk: string; rct: string; mrt: string; victim: string }> {
  const sub = path.join(dir, `case${++n}`);
  mkdirSync(sub);
  const disk = path.join(sub, 'd.vhdx');
  await createVhdx(disk, { size: 8 * MiB });
  const d = await VhdxFile.open(disk);
  await ChangeTracker.enable(d);
  await d.close();
  const victim = path.join(sub, 'victim.bin');
  writeFileSync(victim, Buffer.alloc(256 * 1024, 0xee));
  return { disk, rct: `${disk}.rct`, mrt: `${disk}.mrt`, victim };
}

/** Every file under `where` (FIFOs as "fifo") by content: a command that writes nothing leaves it equal. */
function snapshot(files: string[]): Record<string, string> {
  return Object.fromEntries(files.map((f) => [f, statSync(f).isFIFO() ? 'fifo' : hash(f)]));
}

describe('tracking files that are symbolic links are never followed', () => {
  for (const which of ['rct', 'mrt'] as const) {
    it(`.${which} → another file: rct status, rct seal and vhdx write leave the target unchanged`, async () => {
      const t = await trackedDisk();
      const link = t[which];
      rmSync(link);
      symlinkSync(t.victim, link);
      const before = snapshot([t.disk, t.victim, which === 'rct' ? t.mrt : t.rct]);
      const symlink = /is a symbolic link; it is not followed/;
      // Even a status (which reads only the .rct of a cleanly closed disk) looks at both and refuses the link.
      expectRefused(await tm(['rct', 'status', t.disk]), 6, 'PATH_NOT_ALLOWED', symlink);
      expectRefused(await tm(['rct', 'seal', t.disk]), 6, 'PATH_NOT_ALLOWED', symlink);
      expectRefused(
        await tm(['vhdx', 'write', t.disk, '--offset', '0', '--input', input]),
        6,
        'PATH_NOT_ALLOWED',
        symlink,
      );
      expect(snapshot(Object.keys(before))).toEqual(before);
      expect(statSync(link, { throwIfNoEntry: true }).isFile()).toBe(true); // still the link to the victim
    });
  }
});

describe('repository objects that are symbolic links are never followed', () => {
  it('a config linked to a real one elsewhere: points list refuses it', async () => {
    const repo = path.join(dir, 'repo-link');
    const init = await tm(['repo', 'init', repo]);
    expect(init.status, init.stderr).toBe(0);
    const real = path.join(dir, 'config.elsewhere');
    renameSync(path.join(repo, 'config'), real);
    symlinkSync(real, path.join(repo, 'config'));
    const before = hash(real);
    expectRefused(
      await tm(['points', 'list', '--repo', repo]),
      4,
      'REPOSITORY_CORRUPT',
      /config is a symbolic link; it is not followed/,
    );
    expect(hash(real)).toBe(before);
  });
});

describe('FIFOs where files are expected: every command ends at once with a typed error', () => {
  it('a FIFO as the disk', async () => {
    const fifo = path.join(dir, 'fifo.vhdx');
    mkfifo(fifo);
    const isFifo = /fifo\.vhdx is a FIFO, not a disk file/;
    expectRefused(await tm(['vhdx', 'info', fifo]), 2, 'INVALID_ARGUMENT', isFifo);
    expectRefused(await tm(['vhdx', 'write', fifo, '--offset', '0', '--input', input]), 2, 'INVALID_ARGUMENT', isFifo);
    expectRefused(await tm(['rct', 'status', fifo]), 2, 'INVALID_ARGUMENT', isFifo);
    expect(statSync(fifo).isFIFO()).toBe(true);
  });

  it('a FIFO in place of a parent', async () => {
    const sub = path.join(dir, 'parent-fifo');
    mkdirSync(sub);
    const base = path.join(sub, 'base.vhdx');
    const child = path.join(sub, 'child.avhdx');
    await createVhdx(base, { size: 8 * MiB });
    await createVhdx(child, { parent: base });
    mkfifo(base);
    const before = snapshot([child]);
    expectRefused(
      await tm(['vhdx', 'read', child, '--offset', '0', '--length', '4096', '--output', path.join(sub, 'out')]),
      3,
      'PARENT_NOT_FOUND',
      /base\.vhdx" \(a FIFO, not a disk file\)/,
    );
    expectRefused(
      await tm(['vhdx', 'write', child, '--offset', '0', '--input', input]),
      3,
      'PARENT_NOT_FOUND',
      /a FIFO, not a disk file/,
    );
    expect(snapshot([child])).toEqual(before);
  });

  for (const which of ['rct', 'mrt'] as const) {
    it(`a FIFO as the .${which}`, async () => {
      const t = await trackedDisk();
      mkfifo(t[which]);
      const before = snapshot([t.disk, t.rct, t.mrt]);
      const isFifo = new RegExp(`d\\.vhdx\\.${which} is a FIFO, not a regular file`);
      if (which === 'rct') expectRefused(await tm(['rct', 'status', t.disk]), 2, 'INVALID_ARGUMENT', isFifo);
      expectRefused(await tm(['rct', 'seal', t.disk]), 2, 'INVALID_ARGUMENT', isFifo);
      expectRefused(
        await tm(['vhdx', 'write', t.disk, '--offset', '0', '--input', input]),
        2,
        'INVALID_ARGUMENT',
        isFifo,
      );
      expect(snapshot(Object.keys(before))).toEqual(before);
    });
  }

  it("a FIFO as a repository's config: points list and repo info end at once", async () => {
    const repo = path.join(dir, 'repo');
    const init = await tm(['repo', 'init', repo]);
    expect(init.status, init.stderr).toBe(0);
    mkfifo(path.join(repo, 'config'));
    const isFifo = /config is a FIFO, not a regular file/;
    expectRefused(await tm(['points', 'list', '--repo', repo]), 2, 'INVALID_ARGUMENT', isFifo);
    expectRefused(await tm(['repo', 'info', '--repo', repo]), 2, 'INVALID_ARGUMENT', isFifo);
    expect(statSync(path.join(repo, 'config')).isFIFO()).toBe(true);
  });

  it('a FIFO as a VM definition: the host refuses to start, at once, and writes no host.json', async () => {
    const store = path.join(dir, 'fifo-store');
    // Private already (as a host makes it), so the host has nothing to tighten and log before it refuses.
    mkdirSync(path.join(store, 'vms', 'ghost'), { recursive: true, mode: 0o700 });
    mkfifo(path.join(store, 'vms', 'ghost', 'vm.json'));
    expectRefused(
      await tm(['host', '--store', store]),
      2,
      'INVALID_ARGUMENT',
      /VM definition .*vm\.json is a FIFO, not a regular file/,
    );
    expect(() => statSync(path.join(store, 'host.json'))).toThrow();
  });
});

describe('a FIFO as a disk through the host API', () => {
  it('is refused at once, and another VM is created meanwhile', async () => {
    const store = path.join(dir, 'api-store');
    const running = await startHost({ store, log: HostLog.silent() });
    try {
      const api = await HostClient.connect({ store });
      const fifo = path.join(dir, 'api-disk.vhdx');
      mkfifo(fifo);
      const started = performance.now();
      const hostile = api.createVm({ name: 'hostile', disks: [{ slot: 'scsi0-0', path: fifo }] }).then(
        () => new Error('created'),
        (e: unknown) => e,
      );
      const good = api.createVm({ name: 'good', disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
      const timeout = new Promise<Error>((resolve) =>
        setTimeout(() => resolve(new Error('timed out')), BOUND_MS).unref(),
      );
      const [err, created] = await Promise.race([Promise.all([hostile, good]), timeout.then((e) => [e, e])]);
      expect(performance.now() - started).toBeLessThan(BOUND_MS);
      expect(err).toBeInstanceOf(TidemarkError);
      expect((err as TidemarkError).code).toBe('INVALID_ARGUMENT');
      expect((err as TidemarkError).message).toBe(`${fifo} is a FIFO, not a disk file`);
      expect((created as { name: string }).name).toBe('good');
      expect((await api.listVms()).map((v) => v.name)).toEqual(['good']);
      expect(statSync(fifo).isFIFO()).toBe(true);
    } finally {
      await running.close();
    }
  });

  it('a disk replaced by a FIFO after the VM was made: vm start is refused at once, the host stays usable', async () => {
    const store = path.join(dir, 'api-store-2');
    const running = await startHost({ store, log: HostLog.silent() });
    try {
      const api = await HostClient.connect({ store });
      const vm = await api.createVm({ name: 'later', disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
      const head = vm.disks[0].head;
      renameSync(head, `${head}.moved`);
      mkfifo(head);
      const err = await api.startVm('later').then(
        () => new Error('started'),
        (e: unknown) => e,
      );
      expect((err as TidemarkError).code).toBe('INVALID_ARGUMENT');
      expect((err as TidemarkError).message).toMatch(/is a FIFO, not a disk file/);
      expect((await api.createVm({ name: 'next' })).name).toBe('next');
    } finally {
      await running.close();
    }
  });
});
