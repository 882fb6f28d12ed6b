/**
 * Image locks in one process and across processes: Tidemark's writer and reader hold exactly the lock bytes
 * QEMU's qemu-io holds read-write and read-only (read from /proc/locks), several opens of one file in one
 * process share one lock descriptor and never refuse each other, the locks go with the last close, with
 * abandon, and with a process killed by SIGKILL; a refused open names the holder and leaves nothing held.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { imageLockState } from '../../src/util/image-lock.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { requirePeers, run, sha256File, tempDir } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const BIN = path.join(REPO_ROOT, 'bin', 'tidemark.js');
const peers = requirePeers('qemu-io', 'qemu-img');

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('image-lock')));
afterAll(async () => cleanup?.());

let n = 0;
async function newDisk(): Promise<string> {
  const file = path.join(dir, `d${++n}.vhdx`);
  await createVhdx(file, { size: 16 * MiB });
  return file;
}

const identity = (file: string) => {
  const st = statSync(file, { bigint: true });
  return `${st.dev}:${st.ino}`;
};

/** Every byte some process holds a lock on in `file`, from /proc/locks (ranges expanded). */
function lockedBytes(file: string): number[] {
  const ino = statSync(file).ino;
  const bytes = new Set<number>();
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    const m = /\s[0-9a-f]+:[0-9a-f]+:(\d+)\s+(\d+)\s+(\d+)\s*$/.exec(line);
    if (!m || Number(m[1]) !== ino) continue;
    for (let b = Number(m[2]); b <= Number(m[3]); b++) bytes.add(b);
  }
  return [...bytes].sort((a, b) => a - b);
}

async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (ok()) return;
    await sleep(20);
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** qemu-io kept running (reading commands from a pipe we never close) on `file`. */
async function qemuIoHolding(file: string, args: string[]): Promise<ChildProcess> {
  const q = spawn('qemu-io', [...args, file], { stdio: ['pipe', 'ignore', 'ignore'] });
  await until(`qemu-io to lock ${file}`, () => lockedBytes(file).length > 0);
  return q;
}

async function stop(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  await gone;
}

/** qemu-io writing 64 KiB: its exit code and output. */
async function qemuWrite(file: string): Promise<{ code: number; out: string }> {
  const r = await run('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0xcd 0 64k', file], { allowFail: true });
  return { code: r.code, out: r.stdout + r.stderr };
}

async function openError(file: string, writable: boolean): Promise<TidemarkError> {
  const err = await VhdxFile.open(file, { writable }).then(
    async (d) => {
      await d.close();
      return new Error('it opened');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(TidemarkError);
  return err as TidemarkError;
}

describe.skipIf(peers.skip)('image locks', () => {
  it('a writer holds the bytes qemu-io holds read-write, a reader those of qemu-io -r; -U takes byte 100 only', async () => {
    const file = await newDisk();
    const expected: Record<string, number[]> = {};
    for (const [mode, args] of [
      ['writer', ['-f', 'vhdx']],
      ['reader', ['-r', '-f', 'vhdx']],
      ['force-share', ['-r', '-U', '-f', 'vhdx']],
    ] as const) {
      const q = await qemuIoHolding(file, [...args]);
      expected[mode] = lockedBytes(file);
      await stop(q);
    }
    expect(expected.writer).toEqual([100, 101, 103, 201, 203]);
    expect(expected.reader).toEqual([100, 201, 203]);
    expect(expected['force-share']).toEqual([100]);
    for (const writable of [true, false]) {
      const d = await VhdxFile.open(file, { writable });
      expect(lockedBytes(file)).toEqual(writable ? expected.writer : expected.reader);
      await d.close();
      expect(lockedBytes(file)).toEqual([]);
    }
  });

  it('opens of one file in one process share one lock descriptor; the last close frees the file', async () => {
    const file = await newDisk();
    const before = await sha256File(file);
    const a = await VhdxFile.open(file, { writable: true });
    const b = await VhdxFile.open(file);
    const c = await VhdxFile.open(file, { writable: true });
    expect(imageLockState(identity(file))).toEqual({ users: 3, bytes: [100, 101, 103, 201, 203] });
    // One open file description holds them: /proc/locks shows each byte once.
    const lines = readFileSync('/proc/locks', 'utf8')
      .split('\n')
      .filter((l) => l.includes(`:${statSync(file).ino} `));
    expect(lines.length).toBeLessThanOrEqual(5);
    const refused = await qemuWrite(file);
    expect(refused.code).not.toBe(0);
    expect(refused.out).toMatch(/Failed to get "write" lock/);
    expect(await sha256File(file)).toBe(before);
    await a.close();
    await c.close();
    // The reader left: writers are still kept out, readers let in.
    expect(imageLockState(identity(file))).toEqual({ users: 1, bytes: [100, 201, 203] });
    expect((await qemuWrite(file)).out).toMatch(/Failed to get "write" lock/);
    await run('qemu-img', ['info', '-f', 'vhdx', file]);
    await b.close();
    expect(imageLockState(identity(file))).toBeUndefined();
    expect(lockedBytes(file)).toEqual([]);
    const ok = await qemuWrite(file);
    expect(ok.code, ok.out).toBe(0);
  });

  it('abandon (a give-up without a clean close) releases the locks too', async () => {
    const file = await newDisk();
    const d = await VhdxFile.open(file, { writable: true });
    await d.write(Buffer.alloc(4096, 7), 0);
    expect((await qemuWrite(file)).code).not.toBe(0);
    await d.abandon();
    expect(lockedBytes(file)).toEqual([]);
    const ok = await qemuWrite(file);
    expect(ok.code, ok.out).toBe(0);
  });

  it('a retired head (a frozen parent) lets readers in and keeps writers out', async () => {
    const file = await newDisk();
    const d = await VhdxFile.open(file, { writable: true });
    await expect(run('qemu-img', ['info', '-f', 'vhdx', file])).rejects.toThrow(/Failed to get shared "write" lock/);
    await d.retire();
    expect(lockedBytes(file)).toEqual([100, 201, 203]);
    await run('qemu-img', ['info', '-f', 'vhdx', file]);
    expect((await qemuWrite(file)).out).toMatch(/Failed to get "write" lock/);
    await d.close();
  });

  it('a refusal names the QEMU tool and leaves nothing held; after it exits the open works', async () => {
    const file = await newDisk();
    const q = await qemuIoHolding(file, ['-f', 'vhdx']);
    try {
      const w = await openError(file, true);
      expect(w.code).toBe('LOCKED');
      expect(w.message).toBe(
        `cannot open ${file} for writing: failed to get "write" lock: held by qemu-io (pid ${q.pid})`,
      );
      const r = await openError(file, false);
      expect(r.message).toBe(
        `cannot open ${file} for reading: failed to get shared "write" lock: held by qemu-io (pid ${q.pid})`,
      );
      expect(imageLockState(identity(file))).toBeUndefined();
      expect(lockedBytes(file)).toEqual([100, 101, 103, 201, 203]);
    } finally {
      await stop(q);
    }
    const d = await VhdxFile.open(file, { writable: true });
    await d.close();
  });

  it('an exclusive POSIX lock on a lock byte (another program) refuses the open, naming its owner', async () => {
    const file = await newDisk();
    const script =
      'import fcntl, os, sys, time\n' +
      'fd = os.open(sys.argv[1], os.O_RDWR)\n' +
      'fcntl.lockf(fd, fcntl.LOCK_EX, 1, 100)\n' +
      'print("ready", flush=True)\n' +
      'time.sleep(60)\n';
    const py = spawn('python3', ['-c', script, file], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      await new Promise<void>((resolve, reject) => {
        py.stdout!.once('data', () => resolve());
        py.once('exit', () => reject(new Error('python3 exited')));
      });
      const err = await openError(file, false);
      expect(err.code).toBe('LOCKED');
      expect(err.message).toBe(
        `cannot open ${file} for reading: failed to lock byte 100: held by python3 (pid ${py.pid})`,
      );
      expect(imageLockState(identity(file))).toBeUndefined();
    } finally {
      await stop(py, 'SIGKILL');
    }
  });

  it('a process killed with SIGKILL while it holds a disk leaves no lock behind', async () => {
    const file = await newDisk();
    const before = await sha256File(file);
    // `tidemark vhdx write` reading stdin from a pipe nobody writes: it holds the disk open for writing.
    const child = spawn(process.execPath, [BIN, 'vhdx', 'write', file, '--offset', '0'], {
      stdio: ['pipe', 'ignore', 'pipe'],
    });
    try {
      await until('tidemark vhdx write to lock the disk', () => lockedBytes(file).length === 5);
      const err = await openError(file, false);
      expect(err.code).toBe('LOCKED');
      expect(err.message).toMatch(new RegExp(`held by tidemark vhdx write \\(pid ${child.pid}\\)$`));
      expect((await qemuWrite(file)).out).toMatch(/Failed to get "write" lock/);
      expect(await sha256File(file)).toBe(before);
    } finally {
      await stop(child, 'SIGKILL');
    }
    expect(lockedBytes(file)).toEqual([]);
    const ok = await qemuWrite(file);
    expect(ok.code, ok.out).toBe(0);
  });
});
