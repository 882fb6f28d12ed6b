/**
 * Who can make Tidemark believe a restore point (docs/formats/repository.md §6a). An unencrypted repository's
 * manifests carry a MAC under an integrity key its client keeps outside the repository: a manifest forged, moved or
 * sealed under another key by whoever can write the repository is refused by a machine holding the key; a machine
 * without it still restores (and says it cannot authenticate), but will not write. A config rewritten under the
 * client (integrity dropped, encryption dropped, chunk size changed) is refused. Encrypted repositories bind every
 * object to its name.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { EnvelopeCodec } from '../../src/repository/envelope.js';
import { indexKey, Repository, type PointManifest } from '../../src/repository/index.js';
import { loadZstd } from '../../src/repository/pool.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { backup, makeDiskImage, restoreToBuffer, vmSpec, type VmSpec } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const CS = 64 * 1024;
const SEED = seedFrom('TIDEMARK_REPO_SEED', 4242);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('repo-integrity'));
});
afterAll(async () => cleanup?.());

let n = 0;
/** A repository made on "this machine" (trust directory `home`), with two points of one VM. */
async function made(
  encrypted = false,
  trustDir?: string,
): Promise<{
  where: string;
  home: string;
  repo: Repository;
  points: PointManifest[];
  vm: VmSpec;
}> {
  const where = path.join(dir, `r${++n}`);
  const home = trustDir ?? path.join(dir, `home${n}`);
  const r = rng(SEED + n);
  const repo = await Repository.init(where, {
    chunkSize: CS,
    workers: 0,
    trustDir: home,
    ...(encrypted ? { passphrase: 'pw', scryptLogN: 15 } : {}),
  });
  const vm = vmSpec('app', [{ name: 'scsi0-0', data: makeDiskImage(r, 6 * CS, CS) }]);
  const points = [await backup(repo, [vm]), await backup(repo, [vm])];
  return { where, home, repo, points, vm };
}

async function failure(p: Promise<unknown>): Promise<TidemarkError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(TidemarkError);
  return err as TidemarkError;
}

const keyless = () => new EnvelopeCodec(loadZstd(), null, 3);

describe('unencrypted repositories: the integrity key', () => {
  it('is made at init and kept outside the repository (0600); manifests carry its MAC', async () => {
    const f = await made();
    try {
      expect(f.repo.integrity).toMatchObject({ mode: 'hmac-sha256', authenticated: true, keyMissing: false });
      const trust = f.repo.integrity.trustFile;
      expect(path.dirname(trust)).toBe(f.home);
      expect((await stat(trust)).mode & 0o077).toBe(0);
      const config = JSON.parse(await readFile(path.join(f.where, 'config'), 'utf8')) as { integrity: unknown };
      expect(config.integrity).toMatchObject({ algorithm: 'hmac-sha256' });
      // Nothing in the repository holds the key.
      const key = JSON.parse(await readFile(trust, 'utf8')) as { integrityKey: string };
      expect((await readFile(path.join(f.where, 'config'), 'utf8')).includes(key.integrityKey)).toBe(false);
      const stored = await readFile(path.join(f.where, 'points', f.points[0].id));
      expect(stored[6]).toBe(4 | 8 | (stored[6] & 1)); // checksum + MAC (+ zstd)
    } finally {
      await f.repo.close();
    }
  });

  it('a manifest forged without the key, sealed under another key, or moved to another name is refused', async () => {
    const f = await made();
    const other = await made();
    try {
      const victim = f.points[1].id;
      const key = `points/${victim}`;
      // The attacker rewrites the point to restore the other disk's index... with a valid checksum and no MAC.
      const forged: PointManifest = JSON.parse(JSON.stringify(f.points[1])) as PointManifest;
      forged.vms[0].name = 'app2';
      const body = Buffer.from(JSON.stringify(forged));
      await writeFile(path.join(f.where, key), keyless().seal(body, { type: 'manifest', name: key, checksum: true }));
      let e = await failure(f.repo.readPoint(victim));
      expect(e.code).toBe('REPOSITORY_CORRUPT');
      expect(e.message).toMatch(/not authenticated with the repository's integrity key/);
      // Under another repository's key (the other repository's seal, so its MAC key).
      await writeFile(path.join(f.where, key), await other.repo.seal('manifest', key, body));
      e = await failure(f.repo.readPoint(victim));
      expect(e.message).toMatch(/MAC does not match/);
      // A real manifest of this repository, moved to another point's name.
      await writeFile(path.join(f.where, key), await readFile(path.join(f.where, 'points', f.points[0].id)));
      e = await failure(f.repo.readPoint(victim));
      expect(e.message).toMatch(/MAC does not match/);
      // Never silent: listed as damaged, reported by verify, refused by restore.
      expect((await f.repo.listPoints()).damaged.map((d) => d.id)).toEqual([victim]);
      const report = await f.repo.verify();
      expect(report.damage.map((d) => [d.object, d.id])).toEqual([['manifest', victim]]);
      expect((await failure(restoreToBuffer(f.repo, victim, f.vm.disks[0].diskId))).code).toBe('REPOSITORY_CORRUPT');
      // The point sealed with the key still reads.
      expect((await f.repo.readPoint(f.points[0].id)).id).toBe(f.points[0].id);
    } finally {
      await f.repo.close();
      await other.repo.close();
    }
  });

  it('a machine without the key restores and verifies, says it cannot authenticate, and does not write', async () => {
    const f = await made();
    await f.repo.close();
    const elsewhere = path.join(dir, `elsewhere${n}`);
    const repo = await Repository.open(f.where, { workers: 0, trustDir: elsewhere });
    try {
      expect(repo.integrity).toMatchObject({ mode: 'hmac-sha256', authenticated: false, keyMissing: true });
      expect((await restoreToBuffer(repo, f.points[1].id, f.vm.disks[0].diskId)).equals(f.vm.disks[0].data)).toBe(true);
      const report = await repo.verify();
      expect(report).toMatchObject({ ok: true, authenticated: false });
      expect((await repo.info()).integrity).toEqual({ mode: 'hmac-sha256', authenticated: false, keyMissing: true });
      const e = await failure(repo.startBackup());
      expect(e.code).toBe('INVALID_ARGUMENT');
      expect(e.message).toMatch(/repo key import/);
      // What "cannot authenticate" means: a manifest forged without the key is read here (the warning says so).
      const key = `points/${f.points[0].id}`;
      const forged = { ...f.points[0], flow: 'forged' };
      await writeFile(
        path.join(f.where, key),
        keyless().seal(Buffer.from(JSON.stringify(forged)), { type: 'manifest', name: key, checksum: true }),
      );
      expect((await repo.readPoint(f.points[0].id)).flow).toBe('forged');
    } finally {
      await repo.close();
    }
    // The key carried over: the forgery is refused there too now.
    const original = await Repository.open(f.where, { workers: 0, trustDir: f.home });
    try {
      const entry = original.exportTrust();
      const there = await Repository.open(f.where, { workers: 0, trustDir: elsewhere });
      expect(await there.importTrust(entry)).toBe(path.join(elsewhere, `${entry.repository}.json`));
      await there.close();
      const again = await Repository.open(f.where, { workers: 0, trustDir: elsewhere });
      try {
        expect(again.integrity.authenticated).toBe(true);
        expect((await failure(again.readPoint(f.points[0].id))).message).toMatch(/not authenticated/);
        await again.forgetPoint(f.points[0].id);
        // And it may write now.
        await backup(again, [f.vm]);
      } finally {
        await again.close();
      }
    } finally {
      await original.close();
    }
  });

  it('a key that is not the repository’s is refused on import; a config rewritten under the client is refused on open', async () => {
    const f = await made();
    const other = await made();
    await f.repo.close();
    try {
      const stranger = path.join(dir, `stranger${n}`);
      const repo = await Repository.open(f.where, { workers: 0, trustDir: stranger });
      try {
        // Another repository's key, relabelled with this repository's id: the config's MAC says no.
        const wrong = { ...other.repo.exportTrust(), repository: repo.config.id };
        expect((await failure(repo.importTrust(wrong))).code).toBe('WRONG_KEY');
        expect((await failure(repo.importTrust(other.repo.exportTrust()))).code).toBe('INVALID_ARGUMENT');
      } finally {
        await repo.close();
      }
      const configFile = path.join(f.where, 'config');
      const original = await readFile(configFile, 'utf8');
      const rewrite = async (change: (c: Record<string, unknown>) => void) => {
        const c = JSON.parse(original) as Record<string, unknown>;
        change(c);
        await writeFile(configFile, JSON.stringify(c));
        return failure(Repository.open(f.where, { workers: 0, trustDir: f.home }));
      };
      let e = await rewrite((c) => (c.chunkSize = 128 * 1024));
      expect(e.message).toMatch(/does not match the integrity key/);
      e = await rewrite((c) => delete c.integrity);
      expect(e.message).toMatch(/names none/);
      expect(e.code).toBe('REPOSITORY_CORRUPT');
      // Another id, so that this machine would hold no key for it: it knows the repository by where it is.
      e = await rewrite((c) => {
        c.id = '00000000-0000-4000-8000-000000000000';
        delete c.integrity;
      });
      expect(e.message).toMatch(/knows the repository at .* as .*, but its config now says 00000000-/);
      await writeFile(configFile, original);
      await (await Repository.open(f.where, { workers: 0, trustDir: f.home })).close();
    } finally {
      await other.repo.close();
    }
  });
});

describe('encrypted repositories', () => {
  it('a config rewritten to drop the encryption is refused by the machine that made it', async () => {
    const f = await made(true);
    await f.repo.close();
    const configFile = path.join(f.where, 'config');
    const c = JSON.parse(await readFile(configFile, 'utf8')) as Record<string, unknown>;
    await writeFile(configFile, JSON.stringify({ ...c, encryption: null, chunkId: 'sha256' }));
    const e = await failure(Repository.open(f.where, { workers: 0, trustDir: f.home }));
    expect(e.code).toBe('REPOSITORY_CORRUPT');
    expect(e.message).toMatch(/was encrypted/);
  });

  it('manifests and indexes are bound to their names: one copied over another does not open', async () => {
    const f = await made(true);
    try {
      const [a, b] = f.points;
      await writeFile(path.join(f.where, 'points', b.id), await readFile(path.join(f.where, 'points', a.id)));
      expect((await failure(f.repo.readPoint(b.id))).message).toMatch(/authentication failed/);
      // An index sealed under its own name, copied to the name of a (made-up) other index.
      const ia = a.vms[0].disks[0].index;
      const fake = 'ab'.repeat(32);
      await writeFile(path.join(f.where, indexKey(fake)), await readFile(path.join(f.where, indexKey(ia.id))));
      expect((await failure(f.repo.readIndex({ ...ia, id: fake }))).message).toMatch(/authentication failed/);
    } finally {
      await f.repo.close();
    }
  });
});

describe('CLI', () => {
  it('repo key export / import; a machine without the key warns on stderr, once', async () => {
    if (!existsSync(path.join(ROOT, 'dist', 'cli', 'repo.js'))) throw new Error('build first (`npm run build`)');
    // A CLI's trust directory is $TIDEMARK_CONFIG_DIR/repositories: "this machine" made the repository.
    const hereHome = path.join(dir, `cli-here${n}`);
    const thereHome = path.join(dir, `cli-there${n}`);
    const f = await made(false, path.join(hereHome, 'repositories'));
    await f.repo.close();
    const tm = (home: string, args: string[]) => {
      const r = spawnSync(process.execPath, [BIN, ...args, '--repo', f.where], {
        encoding: 'utf8',
        env: { ...process.env, TIDEMARK_CONFIG_DIR: home, TIDEMARK_REPO: '', TIDEMARK_PASSPHRASE: '' },
        timeout: 60_000,
      });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    const ok = tm(hereHome, ['points', 'list']);
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stderr).toBe('');
    const info = tm(hereHome, ['repo', 'info']);
    expect(info.stdout).toMatch(/integrity +restore points authenticated with the integrity key held here/);

    const missing = tm(thereHome, ['points', 'list']);
    expect(missing.status).toBe(0);
    expect(missing.stderr).toMatch(
      /^tidemark: warning: this machine does not hold the integrity key of repository [^\n]+\n$/,
    );
    expect(tm(thereHome, ['repo', 'info']).stdout).toMatch(/integrity +NOT authenticated here/);

    const file = path.join(dir, `exported${n}.json`);
    const exported = tm(hereHome, ['repo', 'key', 'export', file, '--json']);
    expect(JSON.parse(exported.stdout)).toEqual({ repository: f.repo.config.id, file });
    expect((await stat(file)).mode & 0o077).toBe(0);
    expect(tm(hereHome, ['repo', 'key', 'export', file]).status).toBe(6); // never overwritten (ALREADY_EXISTS)
    const imported = tm(thereHome, ['repo', 'key', 'import', file]);
    expect(imported.status, imported.stderr).toBe(0);
    expect(imported.stderr).toBe('');
    const now = tm(thereHome, ['points', 'list']);
    expect(now.stderr).toBe('');
    // A file that is not a key: a usage error, one line.
    await writeFile(file + '.bad', 'nonsense');
    const bad = tm(thereHome, ['repo', 'key', 'import', file + '.bad']);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/^tidemark: INVALID_ARGUMENT: [^\n]+\n$/);
  });
});
