/**
 * The repository commands end to end, as a person or a script runs them: `node bin/tidemark.js ...` in child
 * processes on the compiled CLI (dist/, built by `npm test`). Restore points are made by a child process using
 * the compiled library the way the backup application does — one of them is killed with SIGKILL in the middle
 * of its backup, a real crash.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Repository } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { makeDiskImage } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const LIB = path.join(ROOT, 'dist', 'repository', 'index.js');
const SEED = seedFrom('TIDEMARK_CLI_SEED', 777);
const KiB = 1024;
const VM_WEB = '6b1a3d2e-0f4c-4b8a-9e7d-1c2b3a4f5e60';
const VM_DB = '9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b';
const DISK_WEB = 'a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d';
const DISK_DB = 'f0e1d2c3-b4a5-4968-8776-655443322110';

let dir: string;
let cleanup: () => Promise<void>;
let writer: string;

beforeAll(async () => {
  if (!existsSync(LIB) || !existsSync(path.join(ROOT, 'dist', 'cli', 'repo.js'))) {
    throw new Error(`${LIB} is missing: build first (\`npm run build\`; \`npm test\` builds before it runs vitest)`);
  }
  ({ dir, cleanup } = await tempDir('repo-cli'));
  writer = path.join(dir, 'writer.mjs');
  writeFileSync(writer, WRITER.replace('LIB', JSON.stringify(LIB)));
});
afterAll(async () => cleanup?.());

/** A backup application in miniature: full backups of image files, or a backup that stops and waits to die. */
const WRITER = `
import { readFileSync } from 'node:fs';
import { Repository } from LIB;
const [repoPath, keyFile, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const repo = await Repository.open(repoPath, { keyFile, ...(spec.packSize ? { packSize: spec.packSize } : {}) });
const s = await repo.startBackup();
const vms = [];
for (const vm of spec.vms) {
  const disks = [];
  for (const d of vm.disks) {
    const data = readFileSync(d.file);
    const w = await s.openIndex({ virtualSize: data.length });
    for (let off = 0; off < data.length; off += w.chunkSize) await w.put(off, data.subarray(off, off + w.chunkSize));
    const index = await s.writeIndex(w);
    const st = w.stats();
    disks.push({ diskId: d.diskId, name: d.name, controller: { bus: 'scsi', controller: 0, location: disks.length },
      virtualSize: data.length, logicalSectorSize: 512, blockSize: 1048576, format: 'vhdx', rctId: 'rct1:5bfde23b:ce75:4303:b54f:6c18394f105c:00000007',
      read: 'full', fullReason: 'first backup', index,
      stats: { bytesRead: st.bytesRead, bytesNew: st.bytesNew, bytesStored: st.bytesStored } });
  }
  vms.push({ name: vm.name, id: vm.id, definition: { name: vm.name }, consistency: 'application',
    freezeWindowMs: 20, ioPauseMs: 2, disks });
}
if (spec.hold) {
  process.stdout.write('HOLDING\\n');
  setInterval(() => {}, 1000);
} else {
  const m = await s.commit({ flow: '2016', parentId: null, snapshots: 1, time: spec.time, vms });
  process.stdout.write(JSON.stringify({ id: m.id }) + '\\n');
  await repo.close();
}
`;

interface Result {
  status: number;
  stdout: string;
  stderr: string;
}

function tm(args: string[], env: Record<string, string> = {}): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, TIDEMARK_REPO: '', TIDEMARK_PASSPHRASE: '', ...env },
    timeout: 60_000,
  });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** A failure is exactly one line on stderr: `tidemark: CODE: message`. */
function expectFailure(r: Result, status: number, code: string): void {
  expect(r.status, r.stderr + r.stdout).toBe(status);
  expect(r.stderr).toMatch(new RegExp(`^tidemark: ${code}: [^\\n]+\\n$`));
}

function json<T = Record<string, unknown>>(r: Result): T {
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as T;
}

interface Spec {
  vms: { name: string; id: string; disks: { diskId: string; name: string; file: string }[] }[];
  time?: string;
  hold?: boolean;
  packSize?: number;
}

function writePoint(repo: string, keyFile: string, spec: Spec): string {
  const r = spawnSync(process.execPath, [writer, repo, keyFile, JSON.stringify(spec)], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  expect(r.status, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as { id: string }).id;
}

describe(`repository CLI (seed ${SEED})`, () => {
  it('init, points, show, verify, damage, wrong key, prune, gc, a crashed backup, locks', async () => {
    const r = rng(SEED);
    const repo = path.join(dir, 'repo');
    const key = path.join(dir, 'repo.key');
    const env = { TIDEMARK_REPO: repo };
    const k = ['--key-file', key];

    // init creates the key file (private) and an encrypted repository.
    const init = json<{ encryption: string[]; keyFileCreated: boolean; chunkSize: number }>(
      tm(['repo', 'init', repo, '--chunk-size', '64K', '--key-file', key, '--json']),
    );
    expect(init).toMatchObject({ encryption: ['key-file'], keyFileCreated: true, chunkSize: 64 * KiB });
    expect(statSync(key).mode & 0o077).toBe(0);
    expectFailure(tm(['repo', 'init', repo, '--key-file', key]), 6, 'ALREADY_EXISTS');

    // Three points of VM web, one of VM db (a day apart).
    const img = (name: string, size: number) => {
      const f = path.join(dir, name);
      writeFileSync(f, makeDiskImage(r, size, 64 * KiB));
      return f;
    };
    const web = {
      name: 'web',
      id: VM_WEB,
      disks: [{ diskId: DISK_WEB, name: 'scsi0-0', file: img('web.img', 10 * 64 * KiB + 5) }],
    };
    const db = {
      name: 'db',
      id: VM_DB,
      disks: [{ diskId: DISK_DB, name: 'scsi0-0', file: img('db.img', 6 * 64 * KiB) }],
    };
    const ids: string[] = [];
    for (const day of [1, 2, 3]) {
      writeFileSync(web.disks[0].file, makeDiskImage(r, 10 * 64 * KiB + 5, 64 * KiB));
      ids.push(writePoint(repo, key, { vms: [web], time: `2026-05-0${day}T12:00:00Z` }));
    }
    const dbPoint = writePoint(repo, key, { vms: [db], time: '2026-05-03T13:00:00Z' });

    const list = json<{ points: { id: string; vms: { name: string }[] }[]; damaged: unknown[] }>(
      tm(['points', 'list', '--json', ...k], env),
    );
    expect(list.points.map((p) => p.id)).toEqual([...ids, dbPoint]);
    expect(
      json<{ points: { id: string }[] }>(tm(['points', 'list', '--vm', 'db', '--json', ...k], env)).points.map(
        (p) => p.id,
      ),
    ).toEqual([dbPoint]);
    const human = tm(['points', 'list', '--repo', repo, ...k]);
    expect(human.stdout).toMatch(/^ID\s+TIME\s+FLOW\s+VMS/);
    expect(human.stdout).toContain('2026-05-03 13:00:00Z');
    const show = tm(['points', 'show', dbPoint.slice(0, 19), ...k], env);
    expect(show.status).toBe(0);
    expect(show.stdout).toMatch(new RegExp(`VM db \\(${VM_DB}\\): application-consistent, frozen 20 ms`));
    expect(show.stdout).toContain('full (first backup)');
    expect(
      json<{ vms: { definition: unknown }[] }>(tm(['points', 'show', dbPoint, '--json', ...k], env)).vms[0].definition,
    ).toEqual({ name: 'db' });

    // Keys: no key → usage error; another key file → WRONG_KEY; a passphrase → WRONG_KEY (no such slot).
    expectFailure(tm(['points', 'list'], env), 2, 'INVALID_ARGUMENT');
    const other = path.join(dir, 'other.key');
    writeFileSync(other, 'another key file that is long enough to be one\n');
    expectFailure(tm(['verify', '--key-file', other], env), 6, 'WRONG_KEY');
    expectFailure(tm(['verify'], { ...env, TIDEMARK_PASSPHRASE: 'guess' }), 6, 'WRONG_KEY');
    expectFailure(tm(['points', 'list', ...k]), 2, 'INVALID_ARGUMENT');

    const ok = tm(['verify', ...k], env);
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/verified all restore points: 4 points, 4 indexes, \d+ chunks/);
    expect(ok.stdout).toContain('no damage found');

    // Damage a chunk only the first web point holds (found with the library, in this process).
    const lib = await Repository.open(repo, { keyFile: key, workers: 0 });
    const chunksOf = async (id: string) =>
      (await lib.readIndex((await lib.readPoint(id)).vms[0].disks[0].index)).chunkIds();
    const others = new Set([...(await chunksOf(ids[1])), ...(await chunksOf(ids[2])), ...(await chunksOf(dbPoint))]);
    const victim = [...(await chunksOf(ids[0]))].find((c) => !others.has(c))!;
    expect(victim).toBeDefined();
    const where = (await lib.locateChunk(victim))!;
    await lib.close();
    const victimFile = path.join(repo, ...where.key.split('/'));
    const raw = readFileSync(victimFile);
    raw[where.offset + 20] ^= 0xff;
    writeFileSync(victimFile, raw);
    const bad = tm(['verify', ...k], env);
    expect(bad.status).toBe(1);
    expect(bad.stdout).toContain(`DAMAGED chunk ${victim.slice(0, 16)}`);
    expect(bad.stdout).toMatch(
      new RegExp(`affects ${ids[0]} VM web disk scsi0-0 \\(${DISK_WEB}\\), \\d+ chunks? at offsets? `),
    );
    expect(bad.stdout).toContain(`1 restore point affected: ${ids[0]}`);
    const badJson = JSON.parse(tm(['verify', ids[1], '--json', ...k], env).stdout) as {
      ok: boolean;
      affectedPoints: string[];
    };
    expect(badJson).toMatchObject({ ok: true, affectedPoints: [] });

    // Prune: a dry run removes nothing; then keep one web point (and db's, another VM set); gc frees the rest —
    // including the damaged chunk, which only removed points referenced.
    const dry = json<{ removed: { id: string }[] }>(
      tm(['prune', '--keep-last', '1', '--dry-run', '--json', ...k], env),
    );
    expect(dry.removed.map((x) => x.id).sort()).toEqual([ids[0], ids[1]].sort());
    expect(json<{ points: unknown[] }>(tm(['points', 'list', '--json', ...k], env)).points).toHaveLength(4);
    const pr = tm(['prune', '--keep-last', '1', '--keep-daily', '1', ...k], env);
    expect(pr.status, pr.stderr).toBe(0);
    expect(pr.stdout).toMatch(/removed 2 restore points, kept 2 \(run `tidemark gc`/);
    const gc = json<{ chunksRemoved: number; points: number }>(tm(['gc', '--json', ...k], env));
    expect(gc.points).toBe(2);
    expect(gc.chunksRemoved).toBeGreaterThan(0);
    expect(tm(['verify', ...k], env).status).toBe(0);

    // A backup in progress in another process: gc is BUSY. Then that process is killed mid-backup (a crash):
    // its lock is stale, gc breaks it and removes what it stored; every point still verifies.
    const fresh = {
      name: 'new',
      id: '0d9c1f0e-5b55-4d0a-8f43-6a2f1c0b7e21',
      disks: [{ diskId: '3c5e7a90-1b2d-4e6f-8a9b-0c1d2e3f4a5b', name: 'scsi0-0', file: img('new.img', 4 * 64 * KiB) }],
    };
    // Packs of one chunk: the killed backup has stored some before it dies.
    const spec = { vms: [fresh], hold: true, packSize: 64 * KiB };
    const holder = spawn(process.execPath, [writer, repo, key, JSON.stringify(spec)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    await new Promise<void>((resolve, reject) => {
      holder.stdout.on('data', (d: Buffer) => d.toString().includes('HOLDING') && resolve());
      holder.on('exit', (code) => reject(new Error(`writer exited ${code}`)));
    });
    const busy = tm(['gc', ...k], env);
    expectFailure(busy, 6, 'BUSY');
    expect(busy.stderr).toContain(`pid ${holder.pid}`);
    const info = json<{ locks: { kind: string; pid: number; stale: boolean }[] }>(
      tm(['repo', 'info', '--json', ...k], env),
    );
    expect(info.locks).toEqual([expect.objectContaining({ kind: 'shared', pid: holder.pid, stale: false })]);
    const exited = new Promise((resolve) => holder.on('exit', resolve));
    holder.kill('SIGKILL');
    await exited;
    const after = json<{ chunksRemoved: number; indexesRemoved: number }>(tm(['gc', '--json', ...k], env));
    expect(after.indexesRemoved).toBe(1);
    // Its packs were staged (written, not yet in place): they are temporary files, never objects, and gc's
    // grace period sweeps them later; no chunk of a crashed backup can be mistaken for a complete one.
    expect(after.chunksRemoved).toBe(0);
    expect((await readdir(path.join(repo, '.tmp'))).length).toBeGreaterThan(0);
    expect(json<{ ok: boolean }>(tm(['verify', '--json', ...k], env)).ok).toBe(true);
    expect(json<{ locks: unknown[] }>(tm(['repo', 'info', '--json', ...k], env)).locks).toEqual([]);
    const infoText = tm(['repo', 'info', ...k], env).stdout;
    expect(infoText).toMatch(/encryption\s+aes-256-gcm, opens with: key-file/);
    expect(infoText).toMatch(/restore points\s+2/);
  });

  it('passphrases from the environment or a file; usage errors are one line', () => {
    const repo = path.join(dir, 'pw-repo');
    const pwFile = path.join(dir, 'pw.txt');
    writeFileSync(pwFile, 'from a file\n');
    expectFailure(tm(['repo', 'init', repo, '--encrypt']), 2, 'INVALID_ARGUMENT');
    const init = json<{ encryption: string[] }>(
      tm(['repo', 'init', repo, '--encrypt', '--kdf-cost', '15', '--json'], { TIDEMARK_PASSPHRASE: 'from a file' }),
    );
    expect(init.encryption).toEqual(['passphrase']);
    // The file's final newline is not part of the passphrase.
    expect(tm(['repo', 'info', '--repo', repo, '--passphrase-file', pwFile]).status).toBe(0);
    expectFailure(tm(['repo', 'info', '--repo', repo], { TIDEMARK_PASSPHRASE: 'wrong' }), 6, 'WRONG_KEY');
    expectFailure(tm(['repo', 'info']), 2, 'INVALID_ARGUMENT');
    expectFailure(tm(['repo', 'init', path.join(dir, 'x'), '--chunk-size', '100K']), 2, 'INVALID_ARGUMENT');
    expectFailure(tm(['repo', 'info', '--repo', path.join(dir, 'none')]), 3, 'NOT_FOUND');
    expectFailure(
      tm(['prune', '--keep-last', 'two', '--repo', repo], { TIDEMARK_PASSPHRASE: 'from a file' }),
      2,
      'INVALID_ARGUMENT',
    );
    expectFailure(
      tm(['points', 'show', '2099', '--repo', repo], { TIDEMARK_PASSPHRASE: 'from a file' }),
      3,
      'NOT_FOUND',
    );
    const plain = path.join(dir, 'plain-repo');
    expect(tm(['repo', 'init', plain]).stdout).toContain('not encrypted');
    expect(tm(['points', 'list', '--repo', plain]).stdout).toContain('no restore points');
    expect(tm(['repo', 'unlock', '--repo', plain]).stdout).toContain('removed 0 locks');
  });
});
