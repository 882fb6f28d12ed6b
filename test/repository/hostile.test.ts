/**
 * Hostile repositories (issue 14): seeded cases, each a copy of a small real repository (plain with its integrity
 * key, or encrypted) with one to three of: flipped, overwritten, cut or extended objects; garbage; forged manifests
 * (sealed with the integrity key, as an insider would, or without it), forged disk indexes, pack indexes, pack
 * headers and configs; traversal names and huge sizes; symlinks, FIFOs and directories where objects belong, and
 * such entries beside them; hostile locks. For every case, every read command — points list, points show, verify,
 * restore (to a fresh directory), repo info, prune --dry-run, gc --dry-run — must end within 10 s with a
 * TidemarkError or a correct answer, write nothing outside its target (a snapshot of the case directory, the
 * repository included, before and after), and never be silent about damage another command sees. The commands run
 * in process (the process's peak RSS is checked at the end); a sample of cases also runs through the CLI in child
 * processes, whose peak RSS, exit status and stderr are checked.
 *
 * A seed fixes each case's plan (which object, which field, which change); the bytes of objects named or sealed at
 * random (point and pack ids, nonces, times) differ between runs, so a byte-level change may land elsewhere.
 *
 * TIDEMARK_HOSTILE_REPO_SEED (default 1414), TIDEMARK_HOSTILE_REPO_CASES (default 1000),
 * TIDEMARK_HOSTILE_REPO_CLI_CASES (default 4: one case of each kind), TIDEMARK_HOSTILE_REPO_CASE=N runs case N alone (in process and CLI).
 */
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, openSync, closeSync, constants as fsConstants } from 'node:fs';
import { lstat, mkdir, readdir, readFile, readlink, rm, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { restorePoint } from '../../src/backup/restore.js';
import { TidemarkError } from '../../src/errors.js';
import { encodeIndex, IndexBuilder } from '../../src/repository/disk-index.js';
import { EnvelopeCodec } from '../../src/repository/envelope.js';
import { LocalBackend, Repository, type PointManifest } from '../../src/repository/index.js';
import { POINT_ID } from '../../src/repository/manifest.js';
import {
  encodePackHeader,
  encodePackIndexes,
  packIndexKey,
  type PackContents,
  type PackEntry,
} from '../../src/repository/pack.js';
import { loadZstd } from '../../src/repository/pool.js';
import { rng, seedFrom } from '../helpers/random.js';
import { backup, incremental, makeDiskImage, mutate, vmSpec } from './helpers.js';

const SEED = seedFrom('TIDEMARK_HOSTILE_REPO_SEED', 1414);
const CASES = Number(process.env.TIDEMARK_HOSTILE_REPO_CASES ?? 1000);
const CLI_CASES = Number(process.env.TIDEMARK_HOSTILE_REPO_CLI_CASES ?? 4);
const ONLY = process.env.TIDEMARK_HOSTILE_REPO_CASE;
const CS = 64 * 1024;
const LIMIT_MS = 10_000;
const LIMIT_RSS_KIB = 1024 * 1024;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
/**
 * Where the cases run: TIDEMARK_HOSTILE_REPO_DIR, else /dev/shm where there is one (the commands' lock files and
 * restores flush: on a busy disk that, not the work, would set the pace; nothing here depends on the file system
 * but FIFOs and symlinks, which tmpfs has), else the temporary directory.
 */
const WORK_DIR = process.env.TIDEMARK_HOSTILE_REPO_DIR ?? (existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir());
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
console.log(
  `hostile repositories: ${CASES} cases, ${CLI_CASES} through the CLI, seed ${SEED} (TIDEMARK_HOSTILE_REPO_SEED, TIDEMARK_HOSTILE_REPO_CASES, TIDEMARK_HOSTILE_REPO_CLI_CASES, TIDEMARK_HOSTILE_REPO_CASE)`,
);

/** What a command may fail with: each a clear, typed refusal. */
const CODES = new Set([
  'REPOSITORY_CORRUPT',
  'NOT_SUPPORTED',
  'NOT_FOUND',
  'PATH_NOT_ALLOWED',
  'INVALID_ARGUMENT',
  'IO_ERROR',
  'WRONG_KEY',
  'LIMIT_EXCEEDED',
  'BUSY',
]);
/** Exit statuses of those codes (docs/errors.md), and 1: damage found. */
const STATUSES = new Set([0, 1, 2, 3, 4, 5, 6, 7]);

type R = ReturnType<typeof rng>;

interface Base {
  name: 'plain' | 'encrypted';
  where: string;
  repo: Repository;
  keyFile?: string;
  points: PointManifest[];
  /**
   * stored bytes of every object, by key, in the order the objects were made (the backups in turn; within one, by
   * key): not by name, since pack and point names are random — so that a seed picks the same objects every run
   */
  objects: Map<string, Buffer>;
  /** every index's slots (chunk id or null) and size, by index id */
  indexes: Map<string, { virtualSize: number; slots: (string | null)[] }>;
  /** every chunk's plaintext, by id */
  chunks: Map<string, Buffer>;
  packs: PackContents[];
}

let root: string;
let trustHome: string;
let trustDir: string;
let fifoSafe = false;
const bases: Base[] = [];

async function walkFiles(dir: string, rel = ''): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(path.join(dir, rel), { withFileTypes: true })) {
    const k = rel ? `${rel}/${e.name}` : e.name;
    if (e.name.startsWith('.')) continue;
    if (e.isDirectory()) out.push(...(await walkFiles(dir, k)));
    else out.push(k);
  }
  return out;
}

async function makeBase(name: Base['name'], r: R): Promise<Base> {
  const where = path.join(root, `base-${name}`);
  const keyFile = name === 'encrypted' ? path.join(root, 'enc.key') : undefined;
  if (keyFile) await writeFile(keyFile, 'k'.repeat(44) + '\n');
  const repo = await Repository.init(where, { chunkSize: CS, workers: 0, trustDir, keyFile });
  const app = vmSpec('app', [
    { name: 'scsi0-0', data: makeDiskImage(r, 6 * CS, CS) },
    { name: 'scsi0-1', data: makeDiskImage(r, 3 * CS + 512, CS) },
  ]);
  const db = vmSpec('db', [{ name: 'ide0-0', data: makeDiskImage(r, 4 * CS, CS) }]);
  const made: string[] = [];
  const step = async () => {
    for (const k of (await walkFiles(where)).sort()) if (!made.includes(k)) made.push(k);
  };
  await step();
  const p1 = await backup(repo, [app]);
  await step();
  const img = Buffer.from(app.disks[0].data);
  const changed = mutate(r, img, CS, 1);
  const next = incremental(
    p1,
    [{ ...app, disks: [{ ...app.disks[0], data: img }, app.disks[1]] }],
    new Map([[app.disks[0].diskId, changed]]),
  );
  const p2 = await backup(repo, next, { parentId: p1.id });
  await step();
  const p3 = await backup(repo, [db]);
  await step();
  const base: Base = {
    name,
    where,
    repo,
    keyFile,
    points: [p1, p2, p3],
    objects: new Map(),
    indexes: new Map(),
    chunks: new Map(),
    packs: [],
  };
  for (const k of made) base.objects.set(k, await readFile(path.join(where, k)));
  const datas = [
    [p1, [app.disks[0].data, app.disks[1].data]],
    [p2, [img, app.disks[1].data]],
    [p3, [db.disks[0].data]],
  ] as const;
  for (const [p, images] of datas) {
    const disks = p.vms[0].disks;
    for (const [i, d] of disks.entries()) {
      const index = await repo.readIndex(d.index);
      const slots: (string | null)[] = [];
      for (let s = 0; s < index.slotCount; s++) {
        const id = index.idAt(s);
        slots.push(id);
        if (id) base.chunks.set(id, Buffer.from(images[i].subarray(s * CS, s * CS + index.slotLength(s))));
      }
      base.indexes.set(d.index.id, { virtualSize: index.virtualSize, slots });
    }
  }
  const { map } = await repo.packIndexes({ reread: true });
  for (const p of map.packIds()) base.packs.push({ packId: p, entries: [...map.entriesOf(p)] });
  const order = (id: string) => made.indexOf(`packs/${id.slice(0, 2)}/${id}`);
  base.packs.sort((a, b) => order(a.packId) - order(b.packId));
  return base;
}

/** Whether the backend's get() of a FIFO returns (an error or data) instead of blocking: the safe opener's job. */
async function probeFifo(): Promise<boolean> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'tidemark-fifo-probe-'));
  const fifo = path.join(dir, 'obj');
  spawnSync('mkfifo', [fifo]);
  const backend = new LocalBackend(dir);
  let settled = false;
  const read = backend.get('obj').then(
    () => (settled = true),
    () => (settled = true),
  );
  await new Promise((r) => setTimeout(r, 1500));
  const safe = settled;
  if (!safe) {
    // Unblock the blocked open (a writer appears, then goes: the reader sees end of file).
    const fd = openSync(fifo, fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
    closeSync(fd);
  }
  await read;
  await rm(dir, { recursive: true, force: true });
  return safe;
}

beforeAll(async () => {
  root = mkdtempSync(path.join(WORK_DIR, 'tidemark-hostile-'));
  trustHome = path.join(root, 'trust');
  trustDir = path.join(trustHome, 'repositories');
  const r = rng(SEED);
  bases.push(await makeBase('plain', r), await makeBase('encrypted', r));
  fifoSafe = await probeFifo();
  if (!fifoSafe) {
    console.log(
      'hostile repositories: DEPENDENCY — the local backend blocks opening a FIFO (the safe opener of src/util/file.ts / local-backend.ts is not merged here): `points show` and `restore` are SKIPPED in cases where they would open a FIFO by name (the config, a manifest, an index or a pack); every other command still runs on them',
    );
  }
}, 120_000);

afterAll(async () => {
  for (const b of bases) await b.repo.close();
  if (root) await rm(root, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------------------
// A case: a copy of a base, and what was done to it

interface Case {
  index: number;
  base: Base;
  dir: string;
  repo: string;
  outside: string;
  mutations: string[];
  /** keys holding (or named like) a FIFO: commands that would open them by name are skipped when !fifoSafe */
  fifos: Set<string>;
  /** indexes forged by the case that a manifest may name, with their slots */
  forgedIndexes: Map<string, { virtualSize: number; slots: (string | null)[] }>;
}

const kinds = ['config', 'points', 'indexes', 'packindex', 'packs'] as const;

function objectKeys(c: Case, kind?: (typeof kinds)[number]): string[] {
  return [...c.base.objects.keys()].filter((k) => (kind ? k === kind || k.startsWith(`${kind}/`) : true));
}

function file(c: Case, key: string): string {
  return path.join(c.repo, ...key.split('/'));
}

/** Writes an object's bytes, replacing whatever an earlier mutation left there (never writing through it). */
async function put(c: Case, key: string, bytes: string | Uint8Array): Promise<void> {
  const f = file(c, key);
  await rm(f, { recursive: true, force: true });
  await mkdir(path.dirname(f), { recursive: true });
  await writeFile(f, bytes);
}

/** A key of the repository: some kind, weighted towards the objects a reader follows. */
function pickKey(c: Case, r: R): string {
  const kind = r.pick([...kinds, 'points', 'indexes', 'packs', 'packindex'] as const);
  const keys = objectKeys(c, kind);
  return keys.length > 0 ? r.pick(keys) : 'config';
}

const TRAVERSAL_NAMES = [
  '../../ESCAPED-VM',
  '..',
  '.',
  '/tmp/ESCAPED-ABS',
  'a/b',
  '',
  'x'.repeat(65),
  'web\u0000x',
  'CON',
  'web\\..\\x',
  '../../../../../../../../tmp/ESCAPED',
  'ok\u001b[2J',
];
const TRAVERSAL_DISKS = ['../../ESCAPED-DISK', 'scsi0-0/../../x', 'os.vhdx', 'scsi9-9', '..', '/dev/null', ''];
const WEIRD_VALUES: unknown[] = [null, -1, 2 ** 60, 'x', '../..', [], {}, true, 1e308, 0.5, '\u001b]0;x\u0007'];

function nestedText(depth: number): string {
  return '['.repeat(depth) + ']'.repeat(depth);
}

/** Sets a random path of a JSON value to something it should not be (or deletes it). */
function randomJsonChange(r: R, v: unknown): void {
  const paths: { parent: Record<string, unknown> | unknown[]; key: string | number }[] = [];
  const walk = (x: unknown, depth: number) => {
    if (depth > 6 || typeof x !== 'object' || x === null) return;
    for (const [k, child] of Object.entries(x)) {
      paths.push({ parent: x as Record<string, unknown>, key: Array.isArray(x) ? Number(k) : k });
      walk(child, depth + 1);
    }
  };
  walk(v, 0);
  if (paths.length === 0) return;
  const p = r.pick(paths);
  if (r.int(3) === 0 && !Array.isArray(p.parent)) delete (p.parent as Record<string, unknown>)[p.key as string];
  else (p.parent as Record<string, unknown>)[p.key as string] = r.pick(WEIRD_VALUES);
}

/** Field changes of a manifest a forger might make (each keeps JSON): names, sizes, ids, counts, nesting. */
function manifestChange(r: R, m: PointManifest, c: Case): string {
  const vm = m.vms[0];
  const d = vm.disks[r.int(vm.disks.length)];
  const allRefs = c.base.points.flatMap((p) => p.vms.flatMap((v) => v.disks.map((x) => x.index)));
  switch (r.int(16)) {
    case 0:
      vm.name = r.pick(TRAVERSAL_NAMES);
      return `VM name ${JSON.stringify(vm.name)}`;
    case 1:
      d.name = r.pick(TRAVERSAL_DISKS);
      return `disk name ${JSON.stringify(d.name)}`;
    case 2: {
      const size = r.pick([2 ** 52, 2 ** 53 + 2, 2 ** 46 + 512, 2 ** 40, -1, 0.5, 1e308, 0]);
      d.virtualSize = size;
      if (r.int(2)) d.index.virtualSize = size;
      return `virtual size ${size}`;
    }
    case 3: {
      const other = r.pick(allRefs);
      d.index = { ...other };
      if (r.int(2)) d.virtualSize = other.virtualSize;
      return `index of another disk (${other.id.slice(0, 8)})`;
    }
    case 4:
      d.index = { ...d.index, id: randomHex(r) };
      return 'index that does not exist';
    case 5:
      d.index.storedSlots = r.pick([2 ** 40, -3, 1e9]);
      return 'stored slots';
    case 6: {
      const n = r.pick([2000, 1025, 50]);
      m.vms = Array.from({ length: n }, (_, i) => ({ ...vm, name: `v${i}`, id: randomUUID() }));
      return `${n} VMs`;
    }
    case 7:
      vm.disks = Array.from({ length: r.pick([300, 5000]) }, () => ({ ...d }));
      return `${vm.disks.length} disks`;
    case 8:
      m.vms.push({ ...vm });
      return 'a VM twice';
    case 9:
      (vm as Record<string, unknown>).definition = '__NESTED__';
      return 'definition nested deep';
    case 10:
      d.fullReason = 'x\u001b[2J\u001b]0;pwned\u0007\r';
      return 'escape sequences';
    case 11:
      d.controller = { bus: 'ide', controller: 3, location: 77 };
      return 'controller';
    case 12:
      (m as Record<string, unknown>).version = r.pick([2, 0, -1, '1', 99]);
      return 'version';
    case 13:
      m.id = r.pick(['20200101-000000-00000000', '../x', m.parentId ?? 'x']);
      return 'id';
    case 14: {
      // A valid swap: the two disks of a VM exchange their indexes (equal in form; the data follows the index).
      if (vm.disks.length < 2) return 'nothing';
      const [a, b] = [vm.disks[0].index, vm.disks[1].index];
      vm.disks[0].index = b;
      vm.disks[1].index = a;
      vm.disks[0].virtualSize = b.virtualSize;
      vm.disks[1].virtualSize = a.virtualSize;
      return 'indexes swapped between disks';
    }
    default:
      randomJsonChange(r, m);
      return 'random field';
  }
}

function randomHex(r: R): string {
  return r.bytes(32).toString('hex');
}

const keyless = new EnvelopeCodec(loadZstd(), null, 3);

/** Seals a forged object as an insider (the base repository's keys) or, for the plain base, as an outsider. */
async function seal(
  c: Case,
  r: R,
  type: 'manifest' | 'index' | 'pack-index' | 'pack-header',
  key: string,
  plain: Buffer,
) {
  if (c.base.name === 'plain' && type === 'manifest' && r.int(3) === 0) {
    c.mutations.push('(sealed without the integrity key)');
    return keyless.seal(plain, { type, name: key, checksum: true });
  }
  return c.base.repo.seal(type, key, plain);
}

async function forgeManifest(c: Case, r: R): Promise<string> {
  const p = r.pick(c.base.points);
  const m = JSON.parse(JSON.stringify(p)) as PointManifest;
  const what = manifestChange(r, m, c);
  let text = JSON.stringify(m);
  if (text.includes('"__NESTED__"')) text = text.replace('"__NESTED__"', nestedText(r.pick([100, 100_000])));
  const key = `points/${r.int(4) === 0 ? newPointId(r) : p.id}`;
  await put(c, key, await seal(c, r, 'manifest', key, Buffer.from(text)));
  return `forged manifest ${key.slice(7)}: ${what}`;
}

function newPointId(r: R): string {
  return `2030010${1 + r.int(9)}-000000-${r.bytes(4).toString('hex')}`;
}

/** A forged disk index (a valid envelope under its own hash), named by a re-sealed manifest or put over the old. */
async function forgeIndex(c: Case, r: R): Promise<string> {
  const repo = c.base.repo;
  const p = r.pick(c.base.points);
  const d = r.pick(p.vms[0].disks);
  const known = c.base.indexes.get(d.index.id)!;
  const b = IndexBuilder.empty(CS, known.virtualSize);
  known.slots.forEach((id, s) => b.set(s, id));
  let what: string;
  const body = encodeIndex(b);
  const slots = [...known.slots];
  switch (r.int(7)) {
    case 0:
      body.writeBigUInt64LE(BigInt(r.pick([2 ** 40, 2 ** 24 + 1, 0])), 24);
      what = 'slot count';
      break;
    case 1:
      body.writeBigUInt64LE(BigInt(r.pick([2 ** 52, 2 ** 63, known.virtualSize + CS])), 16);
      what = 'virtual size';
      break;
    case 2:
      body.writeUInt32LE(r.pick([CS * 2, 1, 0xffffffff]), 8);
      what = 'chunk size';
      break;
    case 3:
      body.writeBigUInt64LE(BigInt(r.int(100)), 32);
      what = 'stored slot count';
      break;
    case 4: {
      // Another chunk of the repository in a slot: a valid index of other data.
      const s = r.int(slots.length);
      const other = r.pick([...c.base.chunks.keys()]);
      const len = Math.min(CS, known.virtualSize - s * CS);
      if (c.base.chunks.get(other)!.length !== len) {
        what = 'nothing';
        break;
      }
      slots[s] = other;
      body.write(other, 40 + s * 32, 'hex');
      what = 'another chunk in a slot';
      break;
    }
    case 5: {
      const s = r.int(slots.length);
      slots[s] = randomHex(r);
      body.write(slots[s]!, 40 + s * 32, 'hex');
      what = 'a chunk that does not exist';
      break;
    }
    default:
      body[r.int(8)] ^= 1 << r.int(8);
      what = 'header bits';
  }
  const id = repo.hashId(body);
  const overOld = r.int(3) === 0;
  const key = `indexes/${overOld ? d.index.id : id}`;
  await put(c, key, await seal(c, r, 'index', key, body));
  if (!overOld) {
    c.forgedIndexes.set(id, { virtualSize: known.virtualSize, slots });
    const m = JSON.parse(JSON.stringify(p)) as PointManifest;
    for (const x of m.vms[0].disks) if (x.diskId === d.diskId) x.index = { ...x.index, id };
    const mk = `points/${p.id}`;
    await put(c, mk, await seal(c, r, 'manifest', mk, Buffer.from(JSON.stringify(m))));
  }
  return `forged index (${what})${overOld ? ' over the old one' : ''}`;
}

async function forgePackIndex(c: Case, r: R): Promise<string> {
  const packs: PackContents[] = JSON.parse(JSON.stringify(c.base.packs)) as PackContents[];
  const p = r.pick(packs);
  const e = r.pick(p.entries);
  let what: string;
  let raw: Buffer | null = null;
  switch (r.int(8)) {
    case 0:
      e.length = r.pick([2 ** 31, 17, CS + 49]);
      what = 'entry length';
      break;
    case 1:
      e.offset = r.pick([2 ** 32 - 100, 0, e.offset + 1]);
      what = 'entry offset';
      break;
    case 2: {
      const other = r.pick(packs.flatMap((x) => x.entries));
      [e.id, other.id] = [other.id, e.id];
      what = 'chunk ids swapped';
      break;
    }
    case 3:
      p.packId = randomHex(r);
      what = 'a pack that does not exist';
      break;
    case 4:
      raw = encodePackIndexes(packs)[0];
      raw.writeUInt32LE(r.pick([0xffffffff, packs.length + 1]), 8);
      what = 'pack count';
      break;
    case 5:
      raw = encodePackIndexes(packs)[0];
      raw.writeUInt32LE(r.pick([0, 16385, 0xffffffff]), 16 + 32);
      what = 'record count';
      break;
    case 6:
      raw = Buffer.concat([encodePackIndexes(packs)[0], r.bytes(1 + r.int(50))]);
      what = 'bytes after the end';
      break;
    default:
      raw = encodePackIndexes(packs)[0];
      raw = raw.subarray(0, 16 + r.int(raw.length - 16));
      what = 'cut short';
  }
  const body = raw ?? encodePackIndexes(packs)[0];
  const id = c.base.repo.hashId(body);
  const key = packIndexKey(id);
  await put(c, key, await seal(c, r, 'pack-index', key, body));
  if (r.int(2)) {
    for (const k of objectKeys(c, 'packindex')) if (k !== key) await rm(file(c, k), { recursive: true, force: true });
    what += ', the only pack index';
  }
  return `forged pack index (${what})`;
}

async function forgePackHeader(c: Case, r: R): Promise<string> {
  const key = r.pick(objectKeys(c, 'packs'));
  const bytes = c.base.objects.get(key)!;
  const h = bytes.readUInt32LE(bytes.length - 4);
  const data = bytes.subarray(0, bytes.length - 4 - h);
  const p = c.base.packs.find((x) => key.endsWith(x.packId));
  let header: Buffer;
  let what: string;
  switch (r.int(4)) {
    case 0: {
      const entries: PackEntry[] = (p?.entries ?? []).map((e) => ({ ...e, offset: e.offset + data.length }));
      header = await c.base.repo.seal('pack-header', key, encodePackHeader(entries));
      what = 'entries past the data';
      break;
    }
    case 1: {
      const body = encodePackHeader(p?.entries ?? []);
      body.writeUInt32LE(16385, 8);
      header = await c.base.repo.seal('pack-header', key, body);
      what = 'count';
      break;
    }
    case 2:
      header = r.bytes(r.int(2000));
      what = 'garbage';
      break;
    default:
      header = await c.base.repo.seal('pack-header', key, encodePackHeader(p?.entries ?? []));
      what = 'trailer';
  }
  const trailer = Buffer.alloc(4);
  trailer.writeUInt32LE(what === 'trailer' ? r.pick([0, 0xffffffff, bytes.length]) : header.length);
  await put(c, key, Buffer.concat([data, header, trailer]));
  // An unlisted pack (gc reads its header): also a copy under a new name.
  if (r.int(2)) {
    const id = randomHex(r);
    await mkdir(file(c, `packs/${id.slice(0, 2)}`), { recursive: true });
    await writeFile(file(c, `packs/${id.slice(0, 2)}/${id}`), Buffer.concat([data, header, trailer]));
  }
  return `forged pack header (${what}) in ${key}`;
}

async function forgeConfig(c: Case, r: R): Promise<string> {
  const text = c.base.objects.get('config')!.toString();
  const cfg = JSON.parse(text) as Record<string, unknown>;
  let out: string;
  let what: string;
  switch (r.int(10)) {
    case 0:
      cfg.chunkSize = r.pick([131072, 1000, 2 ** 40, -1]);
      what = 'chunk size';
      break;
    case 1:
      cfg.version = r.pick([1, 3, 99, '2', null]);
      what = 'version';
      break;
    case 2:
      cfg.id = randomUUID();
      what = 'another id';
      break;
    case 3:
      cfg.createdAt = r.pick(['\u001b[2Jx', 'yesterday', 'x'.repeat(10_000)]);
      what = 'createdAt';
      break;
    case 4:
      cfg.encryption = {
        cipher: 'aes-256-gcm',
        keys: [
          {
            kind: 'passphrase',
            kdf: { name: 'scrypt', logN: r.pick([30, 20]), r: r.pick([8, 1024]), p: r.pick([1, 64]), salt: 'AAAA' },
            wrapped: 'AAAA',
          },
        ],
        mac: 'AAAA',
      };
      cfg.chunkId = 'hmac-sha256';
      delete cfg.integrity;
      what = 'hostile key slot';
      break;
    case 5:
      if (cfg.integrity) (cfg.integrity as Record<string, unknown>).mac = 'AAAA';
      else if (cfg.encryption) (cfg.encryption as Record<string, unknown>).mac = 'AAAA';
      what = 'MAC';
      break;
    case 6:
      delete cfg.integrity;
      cfg.encryption = null;
      cfg.chunkId = 'sha256';
      what = 'protection dropped';
      break;
    case 7:
      out = r.pick(['[]', 'null', '"x"', nestedText(100_000), ' '.repeat(70_000) + '{}']);
      await put(c, 'config', out);
      return 'config not an object';
    default:
      randomJsonChange(r, cfg);
      what = 'random field';
  }
  await put(c, 'config', JSON.stringify(cfg));
  return `forged config (${what})`;
}

async function forgeLock(c: Case, r: R): Promise<string> {
  await mkdir(file(c, 'locks'), { recursive: true });
  const key = `locks/${r.pick(['shared', 'exclusive'])}-${r.bytes(8).toString('hex')}`;
  const choice = r.int(4);
  const info = {
    kind: 'exclusive',
    operation: 'gc',
    pid: 1,
    hostname: 'elsewhere.example',
    createdAt: '2026-01-01T00:00:00Z',
  };
  const body = [JSON.stringify(info), 'garbage', JSON.stringify({ ...info, hostname: 'x\u001b[2J' }), 'x'.repeat(5000)][
    choice
  ];
  await put(c, key, body);
  return `lock ${['of another host', 'garbage', 'with escapes', 'too large'][choice]}`;
}

/** Replaces an object (or puts a new entry named like one) with a symlink, a FIFO or a directory. */
async function replaceEntry(c: Case, r: R, extra: boolean): Promise<string> {
  let key: string;
  if (extra) {
    const kind = r.pick(['points', 'indexes', 'packindex', 'packs', 'locks'] as const);
    const id = kind === 'points' ? newPointId(r) : randomHex(r);
    key =
      kind === 'packs'
        ? `packs/${id.slice(0, 2)}/${id}`
        : kind === 'locks'
          ? `locks/shared-${id.slice(0, 16)}`
          : `${kind}/${id}`;
    if (r.int(5) === 0) key = `${kind}/${r.pick(['bad name', '.hidden', 'x'.repeat(250), 'ünï'])}`;
    await mkdir(path.dirname(file(c, key)), { recursive: true });
  } else {
    key = r.int(8) === 0 ? 'config' : pickKey(c, r);
    const copy = path.join(c.outside, `copy-${r.bytes(4).toString('hex')}`);
    await writeFile(copy, c.base.objects.get(key)!);
    await rm(file(c, key), { recursive: true, force: true });
    if (r.int(2)) {
      await symlink(copy, file(c, key));
      return `${key}: a symlink to a copy of itself`;
    }
  }
  const f = file(c, key);
  switch (r.int(6)) {
    case 0:
      spawnSync('mkfifo', [f]);
      c.fifos.add(key);
      return `${key}: a FIFO`;
    case 1:
      await mkdir(f);
      if (r.int(2)) await writeFile(path.join(f, 'inner'), 'x');
      return `${key}: a directory`;
    case 2:
      await symlink(path.join(c.outside, 'nowhere'), f);
      return `${key}: a dangling symlink`;
    case 3:
      await symlink(f, f);
      return `${key}: a symlink to itself`;
    case 4:
      await symlink(c.outside, f);
      return `${key}: a symlink to a directory`;
    default:
      await symlink(path.join(c.outside, 'sentinel'), f);
      return `${key}: a symlink to a file outside`;
  }
}

async function bytesMutation(c: Case, r: R): Promise<string> {
  const key = pickKey(c, r);
  const data = Buffer.from(c.base.objects.get(key)!);
  switch (r.int(5)) {
    case 0: {
      const n = 1 + r.int(8);
      for (let i = 0; i < n; i++) data[r.int(data.length)] ^= 1 << r.int(8);
      await put(c, key, data);
      return `${key}: ${n} bits flipped`;
    }
    case 1: {
      const at = r.int(data.length);
      r.bytes(Math.min(1 + r.int(64), data.length - at)).copy(data, at);
      await put(c, key, data);
      return `${key}: bytes overwritten at ${at}`;
    }
    case 2: {
      const len = r.int(data.length);
      await put(c, key, data.subarray(0, len));
      return `${key}: cut to ${len} bytes`;
    }
    case 3:
      await put(c, key, Buffer.concat([data, r.bytes(1 + r.int(4096))]));
      return `${key}: extended`;
    default:
      await put(c, key, r.int(4) === 0 ? Buffer.alloc(0) : r.bytes(r.int(10_000)));
      return `${key}: garbage`;
  }
}

async function applyMutations(c: Case, r: R): Promise<void> {
  const n = 1 + (r.int(4) === 0 ? 1 + r.int(2) : 0);
  for (let i = 0; i < n; i++) {
    const pick = r.int(100);
    const m =
      pick < 18
        ? await bytesMutation(c, r)
        : pick < 38
          ? await forgeManifest(c, r)
          : pick < 48
            ? await forgeIndex(c, r)
            : pick < 58
              ? await forgePackIndex(c, r)
              : pick < 64
                ? await forgePackHeader(c, r)
                : pick < 72
                  ? await forgeConfig(c, r)
                  : pick < 76
                    ? await forgeLock(c, r)
                    : await replaceEntry(c, r, pick >= 90);
    c.mutations.push(m);
  }
}

/**
 * Where cases run. In process, one workspace per base is reused: after a case, only what differs from the base
 * (by inode and times) is removed and written again — far cheaper than a fresh copy. CLI cases get fresh ones.
 */
interface Workspace {
  dir: string;
  base: Base;
  /** the snapshot of the workspace as the base left it */
  stamps: Map<string, string>;
}
const workspaces = new Map<string, Workspace>();

async function writeBase(dir: string, base: Base): Promise<void> {
  const repo = path.join(dir, 'repo');
  const dirs = new Set<string>();
  for (const k of base.objects.keys()) dirs.add(path.dirname(path.join(repo, ...k.split('/'))));
  for (const d of dirs) await mkdir(d, { recursive: true });
  for (const [k, bytes] of base.objects) {
    const f = path.join(repo, ...k.split('/'));
    const st = await lstat(f).catch(() => null);
    if (!st?.isFile()) await rm(f, { recursive: true, force: true });
    await writeFile(f, bytes);
  }
}

/** The workspace of a base, as the base left it: every change of the last case undone. */
async function cleanWorkspace(base: Base, fresh: string | null): Promise<string> {
  if (fresh !== null) {
    await mkdir(path.join(fresh, 'outside'), { recursive: true });
    await writeFile(path.join(fresh, 'sentinel'), 'do not touch\n');
    await writeFile(path.join(fresh, 'outside', 'sentinel'), 'do not touch\n');
    await writeBase(fresh, base);
    return fresh;
  }
  let ws = workspaces.get(base.name);
  if (!ws) {
    const dir = path.join(root, `ws-${base.name}`);
    await cleanWorkspace(base, dir);
    ws = { dir, base, stamps: await snapshot(dir) };
    workspaces.set(base.name, ws);
    return dir;
  }
  await rm(path.join(ws.dir, 'target'), { recursive: true, force: true });
  await rm(path.join(ws.dir, 'repo', 'locks'), { recursive: true, force: true });
  const now = await snapshot(ws.dir);
  let changed = false;
  for (const [p, v] of now) {
    if (ws.stamps.get(p) !== v) {
      await rm(p, { recursive: true, force: true });
      changed = true;
    }
  }
  for (const p of ws.stamps.keys()) if (!now.has(p)) changed = true;
  if (changed) {
    await mkdir(path.join(ws.dir, 'outside'), { recursive: true });
    await writeFile(path.join(ws.dir, 'outside', 'sentinel'), 'do not touch\n');
    await writeFile(path.join(ws.dir, 'sentinel'), 'do not touch\n');
    await writeBase(ws.dir, base);
    ws.stamps = await snapshot(ws.dir);
  }
  return ws.dir;
}

async function newCase(i: number, fresh: boolean): Promise<{ c: Case; r: R }> {
  const r = rng((SEED * 7919 + i * 104729) >>> 0);
  const base = bases[r.int(4) === 0 ? 1 : 0];
  const dir = await cleanWorkspace(base, fresh ? path.join(root, 'cli', String(i)) : null);
  const c: Case = {
    index: i,
    base,
    dir,
    repo: path.join(dir, 'repo'),
    outside: path.join(dir, 'outside'),
    mutations: [],
    fifos: new Set(),
    forgedIndexes: new Map(),
  };
  await applyMutations(c, r);
  return { c, r };
}

/**
 * Every entry under a case directory but the target, the locks and temporary files: its type and, for a file,
 * its inode, size and modification and change times (any write changes them), for a link its target.
 */
async function snapshot(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const skip = new Set([path.join(dir, 'target'), path.join(dir, 'repo', 'locks'), path.join(dir, 'repo', '.tmp')]);
  const walk = async (d: string) => {
    for (const name of await readdir(d)) {
      const p = path.join(d, name);
      if (skip.has(p)) continue;
      const st = await lstat(p, { bigint: true });
      if (st.isDirectory()) {
        out.set(p, 'dir');
        await walk(p);
      } else if (st.isSymbolicLink()) out.set(p, `link ${await readlink(p)}`);
      else if (st.isFile()) out.set(p, `file ${st.ino} ${st.size} ${st.mtimeNs} ${st.ctimeNs}`);
      else out.set(p, `other ${st.mode} ${st.ino} ${st.ctimeNs}`);
    }
  };
  await walk(dir);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Running the commands in process

type Outcome<T> = { ok: true; value: T; ms: number } | { ok: false; error: unknown; ms: number } | { skipped: true };

async function timed<T>(fn: () => Promise<T>): Promise<Outcome<T>> {
  const t0 = performance.now();
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`did not end within ${LIMIT_MS} ms`)), LIMIT_MS);
  });
  try {
    const value = await Promise.race([fn(), hang]);
    return { ok: true, value, ms: performance.now() - t0 };
  } catch (error) {
    return { ok: false, error, ms: performance.now() - t0 };
  } finally {
    clearTimeout(timer);
  }
}

/** The point ids under points/ (any kind of entry named like one), read from the file system. */
async function pointEntries(c: Case): Promise<string[]> {
  try {
    return (await readdir(path.join(c.repo, 'points'))).filter((n) => POINT_ID.test(n)).sort();
  } catch {
    return [];
  }
}

/** The point a case restores: picked from the base's points in the order they were made, then forged ones. */
function pickTarget(c: Case, r: R, ids: string[]): string {
  const rank = (id: string) => {
    const i = c.base.points.findIndex((p) => p.id === id);
    return i < 0 ? c.base.points.length : i;
  };
  const ordered = [...ids].sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : 1));
  return r.pick(ordered.length > 0 ? ordered : [c.base.points[0].id]);
}

interface Results {
  open: Outcome<Repository>;
  list: Outcome<Awaited<ReturnType<Repository['listPoints']>>>;
  show: Map<string, Outcome<PointManifest>>;
  verify: Outcome<Awaited<ReturnType<Repository['verify']>>>;
  restorePoint: string;
  restore: Outcome<Awaited<ReturnType<typeof restorePoint>>>;
  info: Outcome<Awaited<ReturnType<Repository['info']>>>;
  prune: Outcome<Awaited<ReturnType<Repository['prune']>>>;
  gc: Outcome<Awaited<ReturnType<Repository['gc']>>>;
}

function opensFifo(c: Case, keys: string[]): boolean {
  return !fifoSafe && keys.some((k) => c.fifos.has(k));
}

async function runInProcess(c: Case, r: R): Promise<Results> {
  const ids = await pointEntries(c);
  const target = pickTarget(c, r, ids);
  const skipAll = opensFifo(c, ['config']);
  const skipped = { skipped: true } as const;
  const open: Outcome<Repository> = skipAll
    ? skipped
    : await timed(() => Repository.open(c.repo, { workers: 0, trustDir, keyFile: c.base.keyFile }));
  const repo = 'ok' in open && open.ok ? open.value : null;
  const run = async <T>(fn: (repo: Repository) => Promise<T>, skip = false): Promise<Outcome<T>> => {
    if (skipAll || skip) return skipped;
    if (!repo) return open as Outcome<T>;
    return timed(() => fn(repo));
  };
  try {
    const list = await run((x) => x.listPoints());
    const show = new Map<string, Outcome<PointManifest>>();
    for (const id of ids) show.set(id, await run((x) => x.readPoint(id), opensFifo(c, [`points/${id}`])));
    const verify = await run((x) => x.verify());
    // What restore opens by name: the point's manifest, its indexes, its packs.
    const restoreOpens = [`points/${target}`, ...c.fifos].filter(
      (k) => k === `points/${target}` || k.startsWith('indexes/') || k.startsWith('packs/'),
    );
    const to = path.join(c.dir, 'target', 'restore');
    const restore = await run(
      (x) => restorePoint(x, target, { to, format: r.int(8) === 0 ? 'vhdx' : 'raw', parallel: 4 }),
      opensFifo(c, restoreOpens),
    );
    const info = await run((x) => x.info());
    const prune = await run((x) => x.prune({ keepLast: 1, dryRun: true }));
    const gc = await run((x) => x.gc({ dryRun: true }));
    return { open, list, show, verify, restorePoint: target, restore, info, prune, gc };
  } finally {
    await repo?.close().catch(() => undefined);
  }
}

/** How the commands ended over all cases (printed at the end: what the cases exercised). */
const tally = new Map<string, Map<string, number>>();
function count(command: string, o: Outcome<unknown>): void {
  note(command, 'skipped' in o ? 'skipped' : o.ok ? 'answer' : ((o.error as TidemarkError).code ?? 'crash'));
}
function note(command: string, how: string): void {
  const t = tally.get(command) ?? new Map<string, number>();
  t.set(how, (t.get(how) ?? 0) + 1);
  tally.set(command, t);
}

function describeCase(c: Case): string {
  return `case ${c.index} (${c.base.name}; seed ${SEED}): ${c.mutations.join('; ')}`;
}

/** A failure is a TidemarkError with a known code and one printable line; a hang or anything else is a bug. */
function checkFailure(c: Case, what: string, error: unknown): TidemarkError {
  const where = `${describeCase(c)} — ${what}`;
  expect(error, `${where}: ${(error as Error)?.stack ?? String(error)}`).toBeInstanceOf(TidemarkError);
  const e = error as TidemarkError;
  expect(CODES.has(e.code), `${where}: unexpected code ${e.code}: ${e.message}`).toBe(true);
  expect(e.message.length, where).toBeGreaterThan(0);
  expect(e.message.length, `${where}: ${e.message.slice(0, 200)}…`).toBeLessThan(2000);
  expect(
    [...e.message].some((ch) => ch.charCodeAt(0) < 0x20 || (ch.charCodeAt(0) >= 0x7f && ch.charCodeAt(0) <= 0x9f)),
    `${where}: control characters in ${JSON.stringify(e.message)}`,
  ).toBe(false);
  return e;
}

function outcomeOk<T>(c: Case, what: string, o: Outcome<T>): T | null {
  if ('skipped' in o) return null;
  expect(o.ms, `${describeCase(c)} — ${what} took ${o.ms} ms`).toBeLessThan(LIMIT_MS);
  if (!o.ok) {
    checkFailure(c, what, o.error);
    return null;
  }
  return o.value;
}

function codeOf<T>(o: Outcome<T>): string | null {
  if ('skipped' in o || o.ok) return null;
  return (o.error as TidemarkError).code;
}

/** What a disk restored from index `indexId` must hold, or null when no such index was ever valid. */
function expectedDisk(c: Case, indexId: string): Buffer | null {
  const ix = c.base.indexes.get(indexId) ?? c.forgedIndexes.get(indexId);
  if (!ix) return null;
  const out = Buffer.alloc(ix.virtualSize);
  for (const [s, id] of ix.slots.entries()) {
    if (id === null) continue;
    const chunk = c.base.chunks.get(id);
    if (!chunk) return null;
    chunk.copy(out, s * CS);
  }
  return out;
}

async function checkResults(c: Case, res: Results): Promise<void> {
  const where = describeCase(c);
  for (const [name, o] of [
    ['points list', res.list],
    ['verify', res.verify],
    ['restore', res.restore],
    ['repo info', res.info],
    ['prune --dry-run', res.prune],
    ['gc --dry-run', res.gc],
    ...[...res.show.values()].map((o) => ['points show', o] as const),
  ] as const) {
    count(name, o);
  }
  if ('ok' in res.verify && res.verify.ok) {
    note('verify answers', res.verify.value.ok ? 'no damage' : 'damage reported');
  }
  const ids = await pointEntries(c);
  const open = 'skipped' in res.open ? null : outcomeOk(c, 'open', res.open);
  const list = outcomeOk(c, 'points list', res.list);
  const verify = outcomeOk(c, 'verify', res.verify);
  const info = outcomeOk(c, 'repo info', res.info);
  const prune = outcomeOk(c, 'prune --dry-run', res.prune);
  outcomeOk(c, 'gc --dry-run', res.gc);
  const shown = new Map<string, PointManifest | null>();
  for (const [id, o] of res.show) shown.set(id, outcomeOk(c, `points show ${id}`, o));
  const restored = outcomeOk(c, `restore ${res.restorePoint}`, res.restore);

  if (list) {
    // Every entry under points/ is listed once: readable, or damaged. None is skipped.
    const seen = [...list.points.map((p) => p.id), ...list.damaged.map((d) => d.id)].sort();
    expect(seen, `${where}: points list`).toEqual(ids);
    for (const p of list.points) {
      const m = shown.get(p.id);
      if (m) expect(m.id, where).toBe(p.id);
      if (res.show.get(p.id) && codeOf(res.show.get(p.id)!) === 'REPOSITORY_CORRUPT') {
        expect.fail(`${where}: points list reads ${p.id}, points show calls it damaged`);
      }
    }
  }
  if (prune) {
    const seen = [...prune.kept, ...prune.removed, ...prune.damaged].map((p) => p.id).sort();
    expect(seen, `${where}: prune --dry-run`).toEqual(ids);
  }
  // A pristine manifest reads as it was written.
  for (const p of c.base.points) {
    const m = shown.get(p.id);
    const f = file(c, `points/${p.id}`);
    const st = await lstat(f).catch(() => null);
    if (m && st?.isFile() && (await readFile(f)).equals(c.base.objects.get(`points/${p.id}`)!)) {
      expect(m, where).toEqual(p);
    }
  }
  if (verify) {
    // Damage is never silent: what another command found damaged, verify reports.
    const affected = new Set(verify.affectedPoints);
    if (verify.ok) {
      expect(list?.damaged ?? [], `${where}: verify ok, points list damaged`).toEqual([]);
      expect(info?.damage ?? [], `${where}: verify ok, repo info damaged`).toEqual([]);
      const rc = codeOf(res.restore);
      expect(
        rc === null || rc === 'BUSY' || rc === 'INVALID_ARGUMENT',
        `${where}: verify ok, restore failed (${rc})`,
      ).toBe(true);
    }
    for (const d of list?.damaged ?? [])
      expect(affected.has(d.id), `${where}: ${d.id} damaged, not in verify`).toBe(true);
    for (const [id, o] of res.show) {
      if (codeOf(o) === 'REPOSITORY_CORRUPT')
        expect(affected.has(id), `${where}: show ${id} corrupt, verify silent`).toBe(true);
    }
    if (codeOf(res.restore) === 'REPOSITORY_CORRUPT') {
      expect(verify.ok, `${where}: restore found damage, verify did not`).toBe(false);
    }
    if ((info?.damage.length ?? 0) > 0) expect(verify.ok, `${where}: repo info found damage`).toBe(false);
  }
  if (restored) {
    // A correct answer: exactly the point's disks, each holding what its index holds.
    const m = shown.get(res.restorePoint) ?? (open ? await open.readPoint(res.restorePoint).catch(() => null) : null);
    const files = (await readdir(path.join(c.dir, 'target', 'restore'), { recursive: true })).map(String).sort();
    const want: string[] = [];
    for (const d of restored.disks) {
      want.push(d.vm, `${d.vm}/vm.json`, path.relative(path.join(c.dir, 'target', 'restore'), d.file));
      expect(path.dirname(path.dirname(d.file)), where).toBe(path.join(c.dir, 'target', 'restore'));
      const entry = m?.vms.find((v) => v.name === d.vm)?.disks.find((x) => x.diskId === d.diskId);
      const expected = entry ? expectedDisk(c, entry.index.id) : null;
      expect(expected, `${where}: restored ${d.file} from an index no one wrote`).not.toBeNull();
      if (d.file.endsWith('.raw')) expect((await readFile(d.file)).equals(expected!), `${where}: ${d.file}`).toBe(true);
    }
    expect(files, where).toEqual([...new Set(want)].sort());
  }
}

/** For the CLI sample: a case of each kind the in-process run met (traversal names, huge sizes, entries, config). */
const sample = new Map<string, number>();
const KINDS: [string, RegExp][] = [
  ['traversal', /(VM|disk) name "[^"]*(\.\.|\/)/],
  ['huge', /virtual size \d{10,}|slot count|\d{4} (VMs|disks)|nested/],
  ['entry', /a FIFO|symlink|a directory/],
  ['config', /^config|forged config/],
];
let peakChildRss = 0;

async function runCase(i: number): Promise<void> {
  const { c, r } = await newCase(i, false);
  for (const [kind, re] of KINDS) if (!sample.has(kind) && c.mutations.some((m) => re.test(m))) sample.set(kind, i);
  const before = await snapshot(c.dir);
  const res = await runInProcess(c, r);
  try {
    await checkResults(c, res);
  } finally {
    // Checked before anything is cleaned; the workspace is then set back for the next case.
    const after = await snapshot(c.dir);
    expect(Object.fromEntries(after), `${describeCase(c)}: something outside the target changed`).toEqual(
      Object.fromEntries(before),
    );
  }
}

// ---------------------------------------------------------------------------------------------------------
// The CLI, for a sample

const RSS_HOOK = `process.on('exit', () => { try { require('node:fs').writeFileSync(process.env.TIDEMARK_RSS_FILE, String(process.resourceUsage().maxRSS)); } catch {} });`;

async function runCaseCli(i: number): Promise<void> {
  const { c, r } = await newCase(i, true);
  const hook = path.join(root, 'rss-hook.cjs');
  if (!existsSync(hook)) await writeFile(hook, RSS_HOOK);
  const ids = await pointEntries(c);
  const target = pickTarget(c, r, ids);
  const before = await snapshot(c.dir);
  const repoArgs = ['--repo', c.repo, ...(c.base.keyFile ? ['--key-file', c.base.keyFile] : [])];
  const commands: [string, string[], string[]][] = [
    ['points list', ['points', 'list', '--json'], ['config']],
    ['points show', ['points', 'show', target], ['config', `points/${target}`]],
    ['verify', ['verify', '--json'], ['config']],
    [
      'restore',
      ['restore', target, '--to', path.join(c.dir, 'target', 'restore'), '--format', 'raw', '--json'],
      ['config', `points/${target}`, ...[...c.fifos].filter((k) => k.startsWith('indexes/') || k.startsWith('packs/'))],
    ],
    ['repo info', ['repo', 'info', '--json'], ['config']],
    ['prune --dry-run', ['prune', '--keep-last', '1', '--dry-run', '--json'], ['config']],
    ['gc --dry-run', ['gc', '--dry-run', '--json'], ['config']],
  ];
  try {
    for (const [name, args, opens] of commands) {
      if (opensFifo(c, opens)) continue;
      const rssFile = path.join(root, `rss-${i}`);
      const t0 = performance.now();
      const p = spawnSync(process.execPath, ['--require', hook, BIN, ...args, ...repoArgs], {
        encoding: 'utf8',
        env: {
          ...process.env,
          TIDEMARK_CONFIG_DIR: trustHome,
          TIDEMARK_RSS_FILE: rssFile,
          TIDEMARK_REPO: '',
          TIDEMARK_PASSPHRASE: '',
        },
        timeout: LIMIT_MS,
        maxBuffer: 64 * 2 ** 20,
      });
      const ms = performance.now() - t0;
      const where = `${describeCase(c)} — CLI ${name}`;
      expect(p.error, `${where}: ${String(p.error)}`).toBeUndefined();
      expect(ms, `${where} took ${ms} ms`).toBeLessThan(LIMIT_MS);
      expect(STATUSES.has(p.status ?? -1), `${where}: exit ${p.status}: ${p.stderr}`).toBe(true);
      const lines = p.stderr.split('\n').filter((l) => l !== '');
      for (const l of lines) expect(l, where).toMatch(/^tidemark: (warning: |[A-Z_]+: )\S/);
      expect(lines.filter((l) => !l.startsWith('tidemark: warning:')).length, where).toBeLessThanOrEqual(1);
      if (p.status !== 0 && p.status !== 1) {
        const code = /^tidemark: ([A-Z_]+): /.exec(lines.at(-1) ?? '')?.[1];
        expect(code && CODES.has(code), `${where}: ${p.stderr}`).toBe(true);
      }
      // Damage found is exit 1, and only then.
      if ((p.status === 0 || p.status === 1) && name === 'points list') {
        const damaged = (JSON.parse(p.stdout) as { damaged: unknown[] }).damaged;
        expect(damaged.length > 0, where).toBe(p.status === 1);
      }
      if ((p.status === 0 || p.status === 1) && name === 'verify') {
        expect((JSON.parse(p.stdout) as { ok: boolean }).ok, where).toBe(p.status === 0);
      }
      if ((p.status === 0 || p.status === 1) && name === 'repo info') {
        expect((JSON.parse(p.stdout) as { damage: unknown[] }).damage.length > 0, where).toBe(p.status === 1);
      }
      if (['points show', 'restore', 'prune --dry-run', 'gc --dry-run'].includes(name)) {
        expect(p.status, `${where}: exit 1 is for damage found`).not.toBe(1);
      }
      const rss = Number(await readFile(rssFile, 'utf8'));
      peakChildRss = Math.max(peakChildRss, rss);
      expect(rss, `${where}: peak RSS ${rss} KiB`).toBeLessThan(LIMIT_RSS_KIB);
    }
    const after = await snapshot(c.dir);
    expect(Object.fromEntries(after), `${describeCase(c)}: something outside the target changed`).toEqual(
      Object.fromEntries(before),
    );
  } finally {
    await rm(c.dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------------------

describe('hostile repositories', () => {
  it(
    `${CASES} cases in process: every read command ends in a clear error or a correct answer, within 10 s, writing nothing outside its target`,
    async () => {
      const cases = ONLY !== undefined ? [Number(ONLY)] : Array.from({ length: CASES }, (_, i) => i);
      const t0 = performance.now();
      for (const i of cases) await runCase(i);
      const rss = process.resourceUsage().maxRSS;
      console.log(
        `hostile repositories: ${cases.length} cases in ${((performance.now() - t0) / 1000).toFixed(1)} s, peak RSS of this process ${(rss / 1024).toFixed(0)} MiB`,
      );
      for (const [command, t] of tally) {
        console.log(`  ${command}: ${[...t].map(([how, n]) => `${how} ${n}`).join(', ')}`);
      }
      expect(rss, 'peak RSS of the process that ran every case').toBeLessThan(LIMIT_RSS_KIB);
    },
    Math.max(600_000, CASES * 600),
  ); // long runs get time in proportion (each case is bounded at 10 s anyway)

  it(
    `${CLI_CASES} cases through the CLI (child processes: exit status, one-line errors, peak RSS)`,
    async () => {
      if (!existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) throw new Error('build first (`npm run build`)');
      // One of each kind the in-process run met, then others spread over the run.
      const cases = ONLY !== undefined ? [Number(ONLY)] : [...new Set(sample.values())].slice(0, CLI_CASES);
      for (let k = 0; cases.length < CLI_CASES && k < CLI_CASES * 4; k++) {
        const i = (k * 7919 + 13) % Math.max(CASES, 1);
        if (!cases.includes(i)) cases.push(i);
      }
      for (const i of cases) await runCaseCli(i);
      console.log(
        `hostile repositories: CLI cases ${cases.join(', ')} (${[...sample].map(([k, i]) => `${k}: ${i}`).join(', ')}); peak RSS of a child ${(peakChildRss / 1024).toFixed(0)} MiB`,
      );
    },
    Math.max(600_000, CLI_CASES * 30_000),
  );
});
