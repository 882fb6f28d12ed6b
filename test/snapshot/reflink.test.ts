/**
 * The reflink provider: where the file system cannot clone (the ordinary test directory, tmpfs), it says
 * why and refuses with NOT_SUPPORTED, copying nothing; on a loop-mounted XFS made with reflink=1 it runs
 * the conformance suite, its commit clones without copying data (free space hardly moves), and its
 * snapshot is isolated from writes that bypass Tidemark's file layer too.
 *
 * The XFS part needs root and a kernel that lets this process mount a loop device; without them it is
 * skipped with one loud line (mkfs.xfs itself is a peer: missing, it fails under TIDEMARK_REQUIRE_PEERS=1).
 */
import { spawnSync } from 'node:child_process';
import { accessSync, constants, mkdtempSync, rmSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm, statfs, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ReflinkProvider } from '../../src/snapshot/reflink.js';
import { NodeFile } from '../../src/util/file.js';
import { requirePeers, run, tempDir } from '../helpers/peers.js';
import { rng } from '../helpers/random.js';
import { SEED, codeOf, expectInstant, makeFiles, providerConformance } from './conformance.js';
import { sleep } from '../helpers/async.js';

const MiB = 1024 * 1024;

/** A directory on a file system that cannot clone: tmpfs when there is one, else the temp directory. */
function plainDir(): string {
  try {
    accessSync('/dev/shm', constants.W_OK);
    return '/dev/shm';
  } catch {
    return os.tmpdir();
  }
}

/** Mounts a fresh XFS (reflink=1) on a loop device, or says why it cannot. */
async function mountXfs(): Promise<{ mnt: string; unmount: () => Promise<void> } | { reason: string }> {
  if (process.getuid?.() !== 0) return { reason: 'not running as root (mounting a loop device needs it)' };
  const mkfs = requirePeers('mkfs.xfs'); // throws under TIDEMARK_REQUIRE_PEERS=1
  if (mkfs.skip) return { reason: mkfs.reason };
  const base = mkdtempSync(path.join(os.tmpdir(), 'tidemark-xfs-'));
  const img = path.join(base, 'xfs.img');
  const mnt = path.join(base, 'mnt');
  const remove = () => rmSync(base, { recursive: true, force: true });
  try {
    await writeFile(img, '');
    await run('truncate', ['-s', '512M', img]);
    await run('mkfs.xfs', ['-q', '-m', 'reflink=1', img]);
    await run('mkdir', [mnt]);
    await run('mount', ['-o', 'loop', img, mnt]);
  } catch (err) {
    remove();
    return { reason: `cannot mount a loop XFS here: ${(err as Error).message.split('\n')[0]}` };
  }
  let mounted = true;
  const umountSync = () => {
    if (mounted) spawnSync('umount', [mnt]);
    mounted = false;
    remove();
  };
  process.on('exit', umountSync); // if the worker dies before afterAll
  return {
    mnt,
    unmount: async () => {
      for (let i = 0; i < 10 && mounted; i++) {
        if ((await run('umount', [mnt], { allowFail: true })).code === 0) mounted = false;
        else await sleep(200);
      }
      umountSync();
    },
  };
}

describe('reflink provider where the file system cannot clone', () => {
  it('supports() says why, prepare fails with NOT_SUPPORTED, and nothing is copied', async () => {
    const { dir, cleanup } = await tempDir('snap-noreflink');
    const plain = await mkdtemp(path.join(plainDir(), 'tidemark-noreflink-'));
    try {
      for (const d of [plain, dir]) {
        const files = await makeFiles(path.join(d, 'files'), 2, rng(SEED + 20), 256 * 1024);
        const root = path.join(d, 'areas');
        const provider = new ReflinkProvider();
        const reason = await provider.supports(files, { diffAreaRoot: root });
        if (d === dir && reason === undefined) {
          console.warn(`NOTE: ${dir} can clone (reflink): it cannot serve as the refusing file system`);
          continue;
        }
        expect(reason).toMatch(/cannot clone files \((ENOTSUP|EOPNOTSUPP|EXDEV|EINVAL|ENOTTY|ENOSYS)\)/);
        const err = await provider.prepare(files, { diffAreaRoot: root }).catch((e: unknown) => e);
        expect((err as { code?: string }).code).toBe('NOT_SUPPORTED');
        expect((err as Error).message).toBe(reason);
        expect(await readdir(root)).toEqual([]); // no probe left, no clone, no copy
      }
    } finally {
      rmSync(plain, { recursive: true, force: true });
      await cleanup();
    }
  });
});

const xfs = await mountXfs();
if ('reason' in xfs) {
  console.warn(`SKIPPED reflink on XFS: ${xfs.reason}`);
} else {
  afterAll(() => xfs.unmount());
}
const onXfs = 'reason' in xfs ? undefined : xfs;
const xfsDir = async () => {
  const dir = await mkdtemp(path.join(onXfs!.mnt, 'snap-'));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
};

describe.skipIf(!onXfs)('reflink provider on XFS (reflink=1, loop-mounted)', () => {
  if (onXfs) providerConformance('reflink', () => new ReflinkProvider(), xfsDir);

  it('commit clones without copying data, much faster than a copy', async () => {
    const { dir, cleanup } = await xfsDir();
    try {
      const file = path.join(dir, 'big.img');
      const r = rng(SEED + 21);
      const chunk = r.bytes(4 * MiB);
      const h = await NodeFile.open(file, 'wx');
      for (let i = 0; i < 32; i++) await h.write(chunk, i * chunk.length); // 128 MiB
      await h.datasync();
      await h.close();
      const free = async () => {
        const s = await statfs(dir);
        return s.bfree * s.bsize;
      };
      const provider = new ReflinkProvider();
      const p = await provider.prepare([file], { diffAreaRoot: path.join(dir, 'areas') });
      const before = await free();
      const t0 = performance.now();
      const snap = await p.commit();
      const commitMs = performance.now() - t0;
      const used = before - (await free());
      expect(used).toBeLessThan(8 * MiB); // a copy would take 128 MiB
      const t1 = performance.now();
      await run('cp', ['--reflink=never', file, path.join(dir, 'copy.img')]);
      const copyMs = performance.now() - t1;
      console.log(
        `reflink commit of a 128 MiB file: ${commitMs.toFixed(1)} ms, ${used} bytes of space; ` +
          `a copy: ${copyMs.toFixed(1)} ms (commit/copy ${(commitMs / copyMs).toFixed(3)})`,
      );
      await snap.release();
    } finally {
      await cleanup();
    }
  });

  it('a write that bypasses the file layer (another process, fs.writeFile) does not reach the clone', async () => {
    const { dir, cleanup } = await xfsDir();
    try {
      const files = await makeFiles(path.join(dir, 'files'), 2, rng(SEED + 22));
      const snap = await (await new ReflinkProvider().prepare(files, { diffAreaRoot: path.join(dir, 'a') })).commit();
      const expected = await Promise.all(files.map((f) => readFile(f)));
      await run('dd', ['if=/dev/zero', `of=${files[0]}`, 'bs=4096', 'count=16', 'conv=notrunc', 'status=none']);
      await writeFile(files[1], 'replaced in place\n');
      await expectInstant(snap, files, expected);
      await snap.release();
    } finally {
      await cleanup();
    }
  });

  it('refuses files on another file system than its root', async () => {
    const { dir, cleanup } = await xfsDir();
    const plain = await mkdtemp(path.join(plainDir(), 'tidemark-xdev-'));
    try {
      const files = await makeFiles(plain, 1, rng(SEED + 23), 200 * 1024);
      const provider = new ReflinkProvider();
      const o = { diffAreaRoot: path.join(dir, 'areas') };
      expect(await provider.supports(files, o)).toMatch(/another file system/);
      expect(await codeOf(provider.prepare(files, o))).toBe('NOT_SUPPORTED');
    } finally {
      rmSync(plain, { recursive: true, force: true });
      await cleanup();
    }
  });
});
