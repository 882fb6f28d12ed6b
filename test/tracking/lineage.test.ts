/**
 * Lineage and foreign writers (invariant 1): an id names the one file instance that sealed it.
 *
 * - Forks: a copy of the disk and its tracking files is another lineage (its ids and the original's refuse
 *   each other, both ways); an older state put back in place (the same inodes) seals the same counters
 *   with other nonces, so ids from the discarded future are refused.
 * - Writers that ignore locks while a session writes: `dd` into the head's payload, `dd` into a parent of a
 *   chain, `qemu-io` with `file.locking=off`, a process that keeps the file open for writing: the next query
 *   refuses every earlier id and names the writer; a reader (`cat`, `dd` reading) costs nothing.
 *   Without fanotify (TIDEMARK_NO_FANOTIFY=1), QEMU's header rewrite is still caught.
 * - Offline: `dd` into a closed disk is caught at the next open (modification time and size).
 * - Another product's tracking files: never modified by reads, writes, seals or queries; `rct enable`
 *   refuses until `--replace-foreign`, which moves them aside.
 * - Reads never write: `rct status` / `rct changes` on a disk whose tracking must reset leave the file alone.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { VirtualDisk } from '../../src/disk/virtual-disk.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { ChangeTracker, trackingPaths, type ChangeRange } from '../../src/tracking/tracker.js';
import { missingPeers, tempDir } from '../helpers/peers.js';
import { waitFor } from '../helpers/async.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const KiB = 1024;
const here = path.dirname(fileURLToPath(import.meta.url));
const bin = path.resolve(here, '../../bin/tidemark.js');

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  if (!existsSync(path.resolve(here, '../../dist/cli/main.js')))
    throw new Error('dist/ is missing: run `npm run build` (npm test does)');
  ({ dir, cleanup } = await tempDir('rct-lineage'));
});
afterAll(async () => cleanup?.());

async function sub(name: string): Promise<string> {
  const d = path.join(dir, name);
  await rm(d, { recursive: true, force: true });
  await mkdir(d, { recursive: true });
  return d;
}

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [bin, ...args]);
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** A tracked 64 MiB disk (1 MiB blocks, 64 KiB granularity) with data in its first 8 MiB, closed. */
async function trackedDisk(d: string, name = 'disk.vhdx'): Promise<string> {
  const file = path.join(d, name);
  await createVhdx(file, { size: 64 * MiB, blockSize: MiB });
  let disk = await VhdxFile.open(file, { writable: true });
  await disk.write(Buffer.alloc(8 * MiB, 0x5a), 0);
  await disk.close();
  disk = await VhdxFile.open(file);
  await ChangeTracker.enable(disk, 64 * KiB);
  await disk.close();
  return file;
}

async function session<T>(file: string, fn: (t: ChangeTracker, disk: VhdxFile) => Promise<T>): Promise<T> {
  const disk = await VhdxFile.open(file, { writable: true });
  try {
    const t = await ChangeTracker.attach(disk, { writable: true });
    if (!t) throw new Error(`${file}: not tracked`);
    return await fn(t, disk);
  } finally {
    await disk.close();
  }
}

async function look<T>(file: string, fn: (t: ChangeTracker) => Promise<T>): Promise<T> {
  const disk = await VhdxFile.open(file);
  try {
    const t = await ChangeTracker.attach(disk, { writable: false });
    if (!t) throw new Error(`${file}: not tracked`);
    return await fn(t);
  } finally {
    await disk.close();
  }
}

async function refusal(p: Promise<unknown>): Promise<TidemarkError | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    if (err instanceof TidemarkError) return err;
    throw err;
  }
}

async function changes(t: ChangeTracker, id: string): Promise<ChangeRange[]> {
  return (await t.changes(id)).ranges;
}

/** The file offset of the VHDX block holding virtual offset `virtual` (the block must be allocated). */
async function payloadOffset(file: string, virtual: number): Promise<number> {
  const disk = await VhdxFile.open(file, { noParent: true });
  try {
    const entry = await disk.payloadEntry(Math.floor(virtual / disk.blockSize));
    if (entry.state !== 6) throw new Error(`block of ${virtual} is not fully present (state ${entry.state})`);
    return entry.offset + (virtual % disk.blockSize);
  } finally {
    await disk.close();
  }
}

async function dd(file: string, at: number, bytes: number, fill = 0xcd): Promise<void> {
  const src = path.join(path.dirname(file), `dd-src-${fill}`);
  await writeFile(src, Buffer.alloc(bytes, fill));
  await execFileP('dd', [`if=${src}`, `of=${file}`, 'bs=1', `seek=${at}`, 'conv=notrunc', 'status=none']);
}

describe('forks: a copy is another lineage, and so is an older state put back', () => {
  it('ids sealed on a copy and on the original after the copy refuse each other; the copy says it is a copy', async () => {
    const d = await sub('fork-copy');
    const file = await trackedDisk(d);
    const id1 = await session(file, async (t, disk) => {
      await disk.write(Buffer.alloc(4096, 1), 1 * MiB);
      return t.seal();
    });
    const other = await sub('fork-copy-other');
    const copy = path.join(other, 'disk.vhdx');
    for (const [a, b] of [
      [file, copy],
      [`${file}.rct`, `${copy}.rct`],
      [`${file}.mrt`, `${copy}.mrt`],
    ])
      await copyFile(a, b);
    // Both branches write different places and seal the same counter.
    const onOriginal = await session(file, async (t, disk) => {
      await disk.write(Buffer.alloc(4096, 2), 20 * MiB);
      return t.seal();
    });
    const onCopy = await session(copy, async (t, disk) => {
      expect(t.status().reason).toMatch(/copy/);
      await disk.write(Buffer.alloc(4096, 3), 12 * MiB);
      return t.seal();
    });
    await look(file, async (t) => {
      expect(await changes(t, id1)).toEqual([{ offset: 20 * MiB, length: 64 * KiB }]);
      const e = await refusal(t.changes(onCopy));
      expect(e?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
    });
    await look(copy, async (t) => {
      for (const id of [id1, onOriginal])
        expect((await refusal(t.changes(id)))?.code, id).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(await changes(t, onCopy)).toEqual([]);
    });
  });

  it('an older state of disk and tracking files put back in place: ids of the discarded future are refused by their nonce', async () => {
    const d = await sub('fork-revert');
    const file = await trackedDisk(d);
    const id1 = await session(file, async (t, disk) => {
      await disk.write(Buffer.alloc(4096, 1), 1 * MiB);
      return t.seal();
    });
    // An image of the three files at this state (a file-level snapshot).
    const saved = await Promise.all([file, `${file}.rct`, `${file}.mrt`].map((f) => readFile(f)));
    const savedTimes = (
      await Promise.all([file, `${file}.rct`, `${file}.mrt`].map((f) => stat(f, { bigint: true })))
    ).map((s) => s.mtimeNs);
    const future = await session(file, async (t, disk) => {
      await disk.write(Buffer.alloc(4096, 2), 30 * MiB);
      return t.seal();
    });
    // Reverted in place: the same inodes (writeFile truncates and rewrites), the older bytes, and even the
    // older modification times put back to the nanosecond (as a careful revert tool would): only the
    // nonces tell.
    await Promise.all([file, `${file}.rct`, `${file}.mrt`].map((f, i) => writeFile(f, saved[i])));
    for (const [i, f] of [file, `${file}.rct`, `${file}.mrt`].entries()) {
      const ns = savedTimes[i];
      await execFileP('touch', [
        '-m',
        '-d',
        `@${ns / 1_000_000_000n}.${String(ns % 1_000_000_000n).padStart(9, '0')}`,
        f,
      ]);
    }
    // The reverted branch seals the same counter as the discarded future, with another nonce.
    const again = await session(file, async (t, disk) => {
      await disk.write(Buffer.alloc(4096, 4), 40 * MiB);
      return t.seal();
    });
    expect(again.split(':').slice(0, 7)).toEqual(future.split(':').slice(0, 7)); // same epoch and counter
    expect(again).not.toBe(future);
    await look(file, async (t) => {
      const e = await refusal(t.changes(future));
      expect(e?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(e?.message).toMatch(/another copy or another state/);
      // What the reverted branch itself sealed still answers, completely.
      expect(await changes(t, id1)).toEqual([{ offset: 40 * MiB, length: 64 * KiB }]);
    });
  });
});

describe('an online merge: tracking continues on the merged parent, open as it is', () => {
  /** A tracked disk under a VirtualDisk, an id sealed, a write, then a checkpoint (the child is the head). */
  async function checkpointed(d: string): Promise<{ file: string; disk: VirtualDisk; id0: string }> {
    const file = await trackedDisk(d);
    const disk = await VirtualDisk.open(file);
    const id0 = (await disk.seal())!;
    await disk.write(1 * MiB, Buffer.alloc(4096, 1));
    await disk.pause();
    await disk.cutCheckpoint(path.join(d, 'disk_1.avhdx'));
    disk.resume();
    await disk.write(2 * MiB, Buffer.alloc(4096, 2)); // into the child
    return { file, disk, id0 };
  }
  const at = (...mib: number[]) => mib.map((m) => ({ offset: m * MiB, length: 64 * KiB }));

  it('no reset, no miss: writes before, into the child and after the merge all answer, then and after a re-open', async () => {
    const d = await sub('merge-continues');
    const { file, disk, id0 } = await checkpointed(d);
    try {
      await disk.mergeHeadOnline();
      expect(disk.path).toBe(file);
      await disk.write(3 * MiB, Buffer.alloc(4096, 3)); // into the merged parent
      expect((await disk.changes(id0)).ranges).toEqual(at(1, 2, 3));
      expect(disk.changeTracker!.status().state).toBe('valid');
    } finally {
      await disk.close();
    }
    await look(file, async (t) => {
      expect(t.status().reason).toBeNull();
      expect(await changes(t, id0)).toEqual(at(1, 2, 3));
    });
  });

  it('dd writing the child during a copy pass: the session on the merged parent refuses earlier ids and names it', async () => {
    const d = await sub('merge-dd-child');
    const { file, disk, id0 } = await checkpointed(d);
    const child = path.join(d, 'disk_1.avhdx');
    try {
      await disk.mergeHeadOnline({
        // Synchronous on purpose: dd runs inside the copy pass, while the child is still the head. It writes
        // the file's first 16 bytes back as they are: the content is unchanged, the write is not.
        onProgress: () =>
          execFileSync('dd', [`if=${child}`, `of=${child}`, 'bs=16', 'count=1', 'conv=notrunc', 'status=none']),
      });
      expect((await refusal(disk.changes(id0)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(disk.changeTracker!.status().reason).toMatch(
        /(dd \(pid \d+\)|process \d+ \(gone before it could be named\)) wrote disk_1\.avhdx/,
      );
    } finally {
      await disk.close();
    }
    await look(file, async (t) => expect(t.status().reason).toMatch(/wrote disk_1\.avhdx/));
  });

  it('dd writing the parent as the merge switches onto it: found, with no gap between the two heads', async () => {
    const d = await sub('merge-dd-parent');
    const { file, disk, id0 } = await checkpointed(d);
    try {
      await disk.mergeHeadOnline({
        beforeSwitch: async () => dd(file, await payloadOffset(file, 5 * MiB), 512),
      });
      expect((await refusal(disk.changes(id0)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(disk.changeTracker!.status().reason).toMatch(
        /(dd \(pid \d+\)|process \d+ \(gone before it could be named\)) wrote disk\.vhdx/,
      );
    } finally {
      await disk.close();
    }
  });

  it('killed once the child is deleted, before the host records the switch: the parent opens with tracking intact', async () => {
    const d = await sub('merge-crash');
    const { file, disk, id0 } = await checkpointed(d);
    // The host's definition write fails (as a kill there would end it): the disk gives up without a clean close.
    await expect(
      disk.mergeHeadOnline({
        beforeSwitch: async () => {
          throw new Error('killed');
        },
      }),
    ).rejects.toThrow('killed');
    expect(existsSync(path.join(d, 'disk_1.avhdx'))).toBe(false);
    await session(file, async (t, vhdx) => {
      expect(t.status().reason).toBeNull();
      expect(await changes(t, id0)).toEqual(at(1, 2));
      await vhdx.write(Buffer.alloc(4096, 4), 4 * MiB);
      expect(await changes(t, id0)).toEqual(at(1, 2, 4));
    });
  });
});

describe('writers that ignore locks while a session writes', () => {
  it('dd into the head while a tracker is attached: the next query refuses and names dd; the new epoch answers', async () => {
    const d = await sub('dd-running');
    const file = await trackedDisk(d);
    await session(file, async (t, disk) => {
      const id1 = await t.seal();
      await disk.write(Buffer.alloc(4096, 1), 2 * MiB);
      expect(await changes(t, id1)).toEqual([{ offset: 2 * MiB, length: 64 * KiB }]);
      expect(t.status().foreignWriterWatch).toEqual({ active: true, why: null });
      await dd(file, await payloadOffset(file, 5 * MiB), 4096);
      const e = await refusal(t.changes(id1));
      expect(e?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(t.status().reason).toMatch(
        /(dd \(pid \d+\)|process \d+ \(gone before it could be named\)) wrote disk\.vhdx/,
      );
      // Tracking goes on in the new epoch.
      const id2 = await t.seal();
      await disk.write(Buffer.alloc(10, 7), 9 * MiB);
      expect(await changes(t, id2)).toEqual([{ offset: 9 * MiB, length: 64 * KiB }]);
    });
    // The reset was recorded: a later open agrees.
    await look(file, async (t) => expect(t.status().reason).toMatch(/wrote disk\.vhdx/));
  });

  it('dd into a parent of the chain while the child is written: refused', async () => {
    const d = await sub('dd-parent');
    const file = await trackedDisk(d);
    const child = path.join(d, 'disk-1.avhdx');
    await createVhdx(child, { parent: file });
    await session(child, async (t, disk) => {
      const id1 = await t.seal();
      await disk.write(Buffer.alloc(4096, 1), 2 * MiB);
      await dd(file, await payloadOffset(file, 6 * MiB), 512);
      const e = await refusal(t.changes(id1));
      expect(e?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(t.status().reason).toMatch(
        /(dd \(pid \d+\)|process \d+ \(gone before it could be named\)) wrote disk\.vhdx/,
      );
    });
  });

  it('a process holding the disk open for writing is refused for as long as it holds it', async () => {
    const d = await sub('holder');
    const file = await trackedDisk(d);
    await session(file, async (t) => {
      const id1 = await t.seal();
      // A shell holding the file open read-write (fd 3) without writing yet.
      const holder = spawn('sh', ['-c', `exec 3<>"${file}"; sleep 30`], { stdio: 'ignore' });
      try {
        await waitFor(async () => {
          const fds: string[] = await readdir(`/proc/${holder.pid}/fd`).catch(() => []);
          return fds.includes('3');
        });
        expect((await refusal(t.changes(id1)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
        expect(t.status().reason).toMatch(/holds open for writing disk\.vhdx/);
        // Still held: an id sealed now is refused at once too (the holder could have written after it).
        const id2 = await t.seal();
        expect((await refusal(t.changes(id2)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      } finally {
        holder.kill('SIGKILL');
        await new Promise((r) => holder.once('exit', r));
      }
      // It is gone (and it closed after "writing"): one more reset for that, then ids answer again.
      await refusal(t.changes(await t.seal()));
      const id3 = await t.seal();
      expect(await changes(t, id3)).toEqual([]);
    });
  });

  it('a process that opened the disk for writing before the session attached is found by the scan at attach', async () => {
    const d = await sub('early-holder');
    const file = await trackedDisk(d);
    const id1 = await session(file, (t) => t.seal());
    const holder = spawn('sh', ['-c', `exec 3<>"${file}"; sleep 30`], { stdio: 'ignore' });
    try {
      await waitFor(async () => {
        const fds: string[] = await readdir(`/proc/${holder.pid}/fd`).catch(() => []);
        return fds.includes('3');
      });
      // Two sessions attaching at once: the one whose disk is held finds the holder, the other does not.
      const other = await trackedDisk(await sub('early-holder-other'));
      await Promise.all([
        session(file, async (t) => {
          expect((await refusal(t.changes(id1)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
          expect(t.status().reason).toMatch(/holds open for writing disk\.vhdx/);
        }),
        session(other, async (t) => expect(t.status().reason ?? '').not.toMatch(/holds open/)),
      ]);
    } finally {
      holder.kill('SIGKILL');
      await new Promise((r) => holder.once('exit', r));
    }
  });

  it('readers cost nothing: cat and dd reading while the session writes', async () => {
    const d = await sub('readers');
    const file = await trackedDisk(d);
    await session(file, async (t, disk) => {
      const id1 = await t.seal();
      await disk.write(Buffer.alloc(4096, 1), 3 * MiB);
      await execFileP('cat', [file], { maxBuffer: 256 * MiB, encoding: 'buffer' });
      await execFileP('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', 'status=none']);
      expect(await changes(t, id1)).toEqual([{ offset: 3 * MiB, length: 64 * KiB }]);
      expect(t.status().state).toBe('valid');
    });
  });

  it.skipIf(missingPeers('qemu-io'))(
    'qemu-io with file.locking=off writes: refused, with fanotify and also without it (headers rewritten)',
    async () => {
      for (const off of [false, true]) {
        const d = await sub(`qemu-io-${off ? 'nofan' : 'fan'}`);
        const file = await trackedDisk(d);
        const saved = process.env.TIDEMARK_NO_FANOTIFY;
        if (off) process.env.TIDEMARK_NO_FANOTIFY = '1';
        try {
          await session(file, async (t) => {
            const id1 = await t.seal();
            if (off)
              expect(t.status().foreignWriterWatch).toMatchObject({ active: false, why: /TIDEMARK_NO_FANOTIFY/ });
            await execFileP('qemu-io', [
              '--image-opts',
              `driver=vhdx,file.driver=file,file.filename=${file},file.locking=off`,
              '-c',
              'write -P 0xcd 0 64k',
            ]);
            const e = await refusal(t.changes(id1));
            expect(e?.code, `fanotify ${off ? 'off' : 'on'}`).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
            expect(t.status().reason).toMatch(
              off
                ? /another program rewrote the headers/
                : /(qemu-io \(pid \d+\)|process \d+ \(gone before it could be named\)) wrote/,
            );
          });
        } finally {
          if (saved === undefined) delete process.env.TIDEMARK_NO_FANOTIFY;
          else process.env.TIDEMARK_NO_FANOTIFY = saved;
        }
      }
    },
  );
});

describe('writers while Tidemark has the disk closed', () => {
  it('dd into the payload of a closed disk (no header changes): the next open refuses, modification time named', async () => {
    const d = await sub('dd-offline');
    const file = await trackedDisk(d);
    const id1 = await session(file, async (t, disk) => {
      const id = await t.seal();
      await disk.write(Buffer.alloc(4096, 1), 2 * MiB);
      return id;
    });
    await look(file, async (t) => expect(await changes(t, id1)).toEqual([{ offset: 2 * MiB, length: 64 * KiB }]));
    await dd(file, await payloadOffset(file, 7 * MiB), 4096);
    await look(file, async (t) => {
      expect((await refusal(t.changes(id1)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(t.status().reason).toMatch(/was written by another program while Tidemark had it closed/);
    });
    const st = await cli('rct', 'status', file, '--json');
    expect(JSON.parse(st.stdout)).toMatchObject({ state: 'reset' });
  });
});

describe("another product's tracking files", () => {
  it('are never modified by reads, writes, seals or queries; enable refuses until --replace-foreign', async () => {
    const d = await sub('foreign');
    const file = path.join(d, 'disk.vhdx');
    expect((await cli('vhdx', 'create', file, '--size', '64M')).code).toBe(0);
    // Stand-ins for Hyper-V's own files (same names, another layout).
    const rct = Buffer.concat([Buffer.from('hyperv-rct-v9'), Buffer.alloc(70000, 0x42)]);
    const mrt = Buffer.concat([Buffer.from('hyperv-mrt-v9'), Buffer.alloc(9000, 0x43)]);
    const paths = trackingPaths(file);
    await writeFile(paths.rct, rct);
    await writeFile(paths.mrt, mrt);
    const before = await Promise.all([stat(paths.rct), stat(paths.mrt)]);

    const status = await cli('rct', 'status', file, '--json');
    expect(status.code, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({
      enabled: false,
      foreign: expect.stringMatching(/not written by Tidemark/),
    });
    const text = await cli('rct', 'status', file);
    expect(text.stdout).toMatch(/tracked by another product/);
    const data = path.join(d, 'data');
    await writeFile(data, Buffer.alloc(5000, 1));
    expect((await cli('vhdx', 'write', file, '--offset', '0', '--input', data)).code).toBe(0);
    const seal = await cli('rct', 'seal', file);
    expect(seal.code).toBe(3);
    expect(seal.stderr).toMatch(/TRACKING_NOT_ENABLED: .*tracked by another product/);
    const ch = await cli('rct', 'changes', file, '--since', '*');
    expect(ch.code).toBe(3);
    const dis = await cli('rct', 'disable', file);
    expect(dis.code).not.toBe(0);
    const en = await cli('rct', 'enable', file);
    expect(en.code).toBe(6);
    expect(en.stderr).toMatch(/CONFLICT: .*another product.*--replace-foreign/);
    // Nothing touched them: same bytes, same modification times.
    expect((await readFile(paths.rct)).equals(rct)).toBe(true);
    expect((await readFile(paths.mrt)).equals(mrt)).toBe(true);
    const after = await Promise.all([stat(paths.rct), stat(paths.mrt)]);
    expect(after.map((s) => s.mtimeMs)).toEqual(before.map((s) => s.mtimeMs));

    const replace = await cli('rct', 'enable', file, '--replace-foreign');
    expect(replace.code, replace.stderr).toBe(0);
    expect(replace.stdout).toMatch(/moved another product's tracking file aside/);
    const aside = (await readdir(d)).filter((f) => f.includes('.foreign-'));
    expect(aside).toHaveLength(2);
    expect(
      (
        await readFile(
          path.join(
            d,
            aside.find((f) => f.includes('.rct.'))!,
          ),
        )
      ).equals(rct),
    ).toBe(true);
    expect(JSON.parse((await cli('rct', 'status', file, '--json')).stdout)).toMatchObject({
      enabled: true,
      state: 'valid',
    });
  });
});

describe('reads never write', () => {
  it('rct status and rct changes on a disk whose tracking must reset leave every file as it was', async () => {
    const d = await sub('reads');
    const file = await trackedDisk(d);
    const id1 = await session(file, async (t) => t.seal());
    await dd(file, await payloadOffset(file, 3 * MiB), 100); // tracking must reset at the next open
    const files = [file, `${file}.rct`, `${file}.mrt`];
    const before = await Promise.all(files.map(async (f) => ({ bytes: await readFile(f), st: await stat(f) })));
    expect(JSON.parse((await cli('rct', 'status', file, '--json')).stdout)).toMatchObject({ state: 'reset' });
    expect((await cli('rct', 'changes', file, '--since', id1)).code).toBe(6);
    const after = await Promise.all(files.map(async (f) => ({ bytes: await readFile(f), st: await stat(f) })));
    for (let i = 0; i < files.length; i++) {
      expect(after[i].bytes.equals(before[i].bytes), files[i]).toBe(true);
      expect(after[i].st.mtimeMs, files[i]).toBe(before[i].st.mtimeMs);
    }
  });
});
