/**
 * Nothing from a repository becomes a path, a size or a count unchecked: every field of a manifest is validated
 * when it is decoded (REPOSITORY_CORRUPT naming the point and the field) and when a backup commits it
 * (INVALID_ARGUMENT); restore checks every output path again and creates nothing before every disk's index reads.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, readdir } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inside, restorePoint } from '../../src/backup/restore.js';
import { TidemarkError } from '../../src/errors.js';
import { Repository, type PointManifest } from '../../src/repository/index.js';
import { checkManifest, decodeManifest, pointKey } from '../../src/repository/manifest.js';
import { tempDir } from '../helpers/peers.js';
import { rng } from '../helpers/random.js';
import { backup, makeDiskImage, vmSpec } from './helpers.js';

const CS = 64 * 1024;
const ID = '20261124-195532-3fa2b1c0';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('repo-validation'));
});
afterAll(async () => cleanup?.());

function disk(slot: string, size = 4 * CS): PointManifest['vms'][number]['disks'][number] {
  const m = /^(ide|scsi)(\d)-(\d+)$/.exec(slot)!;
  return {
    diskId: randomUUID(),
    name: slot,
    controller: { bus: m[1] as 'ide' | 'scsi', controller: Number(m[2]), location: Number(m[3]) },
    virtualSize: size,
    logicalSectorSize: 512,
    blockSize: 32 * 2 ** 20,
    format: 'vhdx',
    rctId: 'rct1:5bfde23b:ce75:4303:b54f:6c18394f105c:00000007',
    read: 'full',
    fullReason: 'first backup',
    index: { id: 'ab'.repeat(32), virtualSize: size, chunkSize: CS, storedSlots: 2 },
    stats: { bytesRead: size, bytesNew: size, bytesStored: 100 },
  };
}

function valid(): PointManifest {
  return {
    format: 'tidemark-point',
    version: 1,
    id: ID,
    time: '2026-11-24T19:55:32.120Z',
    flow: '2016',
    parentId: null,
    snapshots: 1,
    statistics: { bytesRead: 0, bytesNew: 0, bytesStored: 0, durationMs: 5 },
    vms: [
      {
        name: 'web',
        id: randomUUID(),
        definition: { name: 'web', generation: 2 },
        consistency: 'application',
        freezeWindowMs: 12,
        ioPauseMs: 3,
        disks: [disk('scsi0-0'), disk('scsi0-1')],
      },
    ],
  };
}

function depthOf(v: unknown): number {
  let d = 0;
  while (Array.isArray(v)) {
    v = v[0];
    d++;
  }
  return d;
}

function nested(depth: number): unknown {
  let v: unknown = 0;
  for (let i = 0; i < depth; i++) v = [v];
  return v;
}

type M = PointManifest & Record<string, unknown>;
/** Each: what is changed, and the field the error must name. */
const CASES: [string, (m: M) => void, RegExp][] = [
  ['a VM name that climbs out', (m) => (m.vms[0].name = '../../ESCAPED-VM'), /vms\.0\.name: not a VM name/],
  ['an absolute VM name', (m) => (m.vms[0].name = '/etc'), /vms\.0\.name/],
  ['a VM name with a separator', (m) => (m.vms[0].name = 'a/b'), /vms\.0\.name/],
  ['a VM name ..', (m) => (m.vms[0].name = '..'), /vms\.0\.name/],
  ['a VM name .', (m) => (m.vms[0].name = '.'), /vms\.0\.name/],
  ['an empty VM name', (m) => (m.vms[0].name = ''), /vms\.0\.name/],
  ['a VM name of 65 characters', (m) => (m.vms[0].name = 'x'.repeat(65)), /vms\.0\.name/],
  ['a VM name with a NUL', (m) => (m.vms[0].name = 'web\u0000'), /vms\.0\.name/],
  ['a device name', (m) => (m.vms[0].name = 'con'), /vms\.0\.name/],
  ['a device name with an extension', (m) => (m.vms[0].name = 'LPT1.txt'), /vms\.0\.name/],
  ['a disk name that climbs out', (m) => (m.vms[0].disks[0].name = '../../ESCAPED-DISK'), /disks\.0\.name: not a slot/],
  ['a disk name that is not a slot', (m) => (m.vms[0].disks[0].name = 'os.vhdx'), /disks\.0\.name/],
  ['a slot that does not exist', (m) => (m.vms[0].disks[0].name = 'scsi4-0'), /disks\.0\.name/],
  [
    'a slot its controller contradicts',
    (m) => (m.vms[0].disks[0].controller.location = 7),
    /disks\.0\.controller: scsi 0:7 is not slot scsi0-0/,
  ],
  ['a disk id that is not a GUID', (m) => (m.vms[0].disks[0].diskId = '../x'), /disks\.0\.diskId/],
  ['a VM id that is not a GUID', (m) => (m.vms[0].id = 'vm'), /vms\.0\.id/],
  ['an rct id that is not one', (m) => (m.vms[0].disks[0].rctId = 'rct1:junk'), /disks\.0\.rctId/],
  [
    'a virtual size of 2^52',
    (m) => {
      m.vms[0].disks[0].virtualSize = 2 ** 52;
      m.vms[0].disks[0].index.virtualSize = 2 ** 52;
    },
    /disks\.0\.virtualSize: more than 70368744177664 bytes/,
  ],
  ['a negative size', (m) => (m.vms[0].disks[0].virtualSize = -1), /disks\.0\.virtualSize/],
  ['a fractional size', (m) => (m.vms[0].disks[0].virtualSize = 1.5), /disks\.0\.virtualSize/],
  ['a size beyond 2^53', (m) => (m.vms[0].disks[0].virtualSize = 2 ** 64), /disks\.0\.virtualSize/],
  [
    'an index that does not cover the disk',
    (m) => (m.vms[0].disks[0].index.virtualSize = 8 * CS),
    /disks\.0\.index\.virtualSize: 524288, the disk has 262144/,
  ],
  ['a chunk size that is none', (m) => (m.vms[0].disks[0].index.chunkSize = 1000), /index\.chunkSize/],
  ['more stored slots than slots', (m) => (m.vms[0].disks[0].index.storedSlots = 5), /index\.storedSlots/],
  ['an index id that is not one', (m) => (m.vms[0].disks[0].index.id = '../../x'), /index\.id/],
  [
    'more chunks than an index holds',
    (m) => {
      const d = m.vms[0].disks[0];
      d.virtualSize = d.index.virtualSize = 2 ** 24 * CS + 1;
    },
    /disks\.0\.index: 16777217 chunks/,
  ],
  ['two VMs of one name', (m) => m.vms.push({ ...m.vms[0], id: randomUUID(), disks: [] }), /vms\.1\.name: a second/],
  ['two disks in one slot', (m) => m.vms[0].disks.push(disk('scsi0-0')), /disks\.2\.name: a second disk/],
  [
    'two disks with one id',
    (m) => (m.vms[0].disks[1].diskId = m.vms[0].disks[0].diskId),
    /disks\.1\.diskId: a second disk/,
  ],
  [
    '2000 VMs',
    (m) => {
      m.vms = Array.from({ length: 2000 }, (_, i) => ({ ...m.vms[0], name: `v${i}`, disks: [] }));
    },
    /vms: 2000 VMs, more than 1024/,
  ],
  [
    '5000 disks',
    (m) => {
      m.vms = Array.from({ length: 20 }, (_, i) => ({ ...m.vms[0], name: `v${i}`, disks: Array(250).fill({}) }));
    },
    /more than 4096 disks/,
  ],
  ['a definition 100 deep', (m) => (m.vms[0].definition = nested(100) as never), /vms\.0\.definition: nested/],
  ['a definition 200 000 deep', (m) => (m.vms[0].definition = nested(200_000) as never), /nested more than 64/],
  [
    'escape sequences in a reason',
    (m) => (m.vms[0].disks[0].fullReason = 'x\u001b[2J\u001b]0;pwned\u0007'),
    /fullReason: not printable/,
  ],
  ['a flow that is a path', (m) => (m.flow = '../x'), /flow/],
  ['a format with a space', (m) => (m.vms[0].disks[0].format = 'a b'), /format/],
  ['a sector size of 1000', (m) => (m.vms[0].disks[0].logicalSectorSize = 1000), /logicalSectorSize/],
  ['its own parent', (m) => (m.parentId = ID), /parentId: the point is its own parent/],
  ['a billion snapshots', (m) => (m.snapshots = 1e9), /snapshots/],
  ['negative statistics', (m) => (m.statistics.bytesRead = -5), /statistics\.bytesRead/],
  ['no VMs', (m) => (m.vms = []), /vms/],
  ['infinite milliseconds (1e999)', (m) => (m.vms[0].freezeWindowMs = Infinity), /freezeWindowMs/],
];

/** A manifest as stored: JSON text (Infinity written as 1e999, which JSON.parse reads back as Infinity). */
function stored(m: unknown): Buffer {
  // Too deep for JSON.stringify (recursive): written out by hand.
  const deep = (m as PointManifest).vms?.[0]?.definition as unknown;
  if (Array.isArray(deep) && depthOf(deep) > 1000) {
    const d = depthOf(deep);
    const text = JSON.stringify({
      ...(m as object),
      vms: [{ ...(m as PointManifest).vms[0], definition: '__DEEP__' }],
    });
    return Buffer.from(text.replace('"__DEEP__"', '['.repeat(d) + '0' + ']'.repeat(d)));
  }
  return Buffer.from(
    JSON.stringify(m, (_k, v: unknown) => (v === Infinity ? '__INF__' : v)).replace(/"__INF__"/g, '1e999'),
  );
}

describe('manifest validation', () => {
  it('a valid manifest decodes and checks', () => {
    expect(decodeManifest(stored(valid()), ID).vms[0].name).toBe('web');
    expect(checkManifest(valid()).id).toBe(ID);
  });

  for (const [what, change, field] of CASES) {
    it(`refuses ${what}, naming the field`, () => {
      const m = valid() as M;
      change(m);
      let err: unknown;
      try {
        decodeManifest(stored(m), ID);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(TidemarkError);
      expect((err as TidemarkError).code).toBe('REPOSITORY_CORRUPT');
      expect((err as TidemarkError).message).toMatch(new RegExp(`^manifest of restore point ${ID} is damaged: `));
      expect((err as TidemarkError).message).toMatch(field);
      // A message is one line without control characters, whatever the manifest held.
      expect([...(err as TidemarkError).message].some((c) => c.charCodeAt(0) < 0x20)).toBe(false);
      // A backup cannot write what a reader refuses.
      expect(() => checkManifest(JSON.parse(stored(m).toString()) as unknown)).toThrow(
        expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
      );
    });
  }

  it('refuses a newer version (NOT_SUPPORTED), another point, and garbage with control characters in it', () => {
    expect(() => decodeManifest(stored({ ...valid(), version: 2 }), ID)).toThrow(
      expect.objectContaining({ code: 'NOT_SUPPORTED' }),
    );
    expect(() => decodeManifest(stored(valid()), '20261124-195532-00000000')).toThrow(/it says it is point/);
    try {
      decodeManifest(Buffer.from('{"a":\u001b[31m}'), ID);
      expect.unreachable();
    } catch (err) {
      expect((err as Error).message).toMatch(/not JSON/);
      expect((err as Error).message.includes('\u001b')).toBe(false);
    }
  });
});

describe('restore paths', () => {
  it('only a single entry directly inside the target is allowed', () => {
    const root = '/srv/restore';
    expect(inside(root, 'web', 'VM')).toBe('/srv/restore/web');
    expect(inside(root, 'scsi0-0.vhdx', 'disk')).toBe('/srv/restore/scsi0-0.vhdx');
    for (const bad of ['../../ESCAPED', '..', '.', '', 'a/b', '/etc', 'a/../b', 'x/']) {
      expect(() => inside(root, bad, 'VM'), JSON.stringify(bad)).toThrow(
        expect.objectContaining({ code: 'PATH_NOT_ALLOWED' }),
      );
    }
  });

  it('a forged manifest (sealed with the key) naming ../ or claiming 2^52 bytes: refused, nothing created', async () => {
    const where = path.join(dir, 'repo');
    const repo = await Repository.init(where, { chunkSize: CS, workers: 0, trustDir: path.join(dir, 'trust') });
    try {
      const vm = vmSpec('app', [{ name: 'scsi0-0', data: makeDiskImage(rng(5), 6 * CS, CS) }]);
      const p = await backup(repo, [vm]);
      const forge = async (change: (m: PointManifest) => void) => {
        const m = JSON.parse(JSON.stringify(p)) as PointManifest;
        change(m);
        const key = pointKey(p.id);
        await repo.backend.put(key, await repo.seal('manifest', key, Buffer.from(JSON.stringify(m))));
      };
      const attempt = async (label: string, code: string, format: 'raw' | 'vhdx' = 'raw') => {
        const work = path.join(dir, label);
        const to = path.join(work, 'a', 'b', 'target');
        await mkdir(work);
        const err = await restorePoint(repo, p.id, { to, format }).then(
          () => null,
          (e: unknown) => e,
        );
        expect(err, label).toBeInstanceOf(TidemarkError);
        expect((err as TidemarkError).code, label).toBe(code);
        // Nothing at all was created: not the target, not anything beside it.
        expect(await readdir(work, { recursive: true }), label).toEqual([]);
      };
      await forge((m) => (m.vms[0].name = '../../ESCAPED-VM'));
      await attempt('vm-name', 'REPOSITORY_CORRUPT');
      await forge((m) => (m.vms[0].disks[0].name = '../../ESCAPED-DISK'));
      await attempt('disk-name', 'REPOSITORY_CORRUPT');
      await forge((m) => {
        const d = m.vms[0].disks[0];
        d.virtualSize = d.index.virtualSize = 2 ** 52;
      });
      await attempt('huge', 'REPOSITORY_CORRUPT');
      // Within the limits, but not what the index holds: the index check refuses it before any file exists.
      await forge((m) => {
        const d = m.vms[0].disks[0];
        d.virtualSize = d.index.virtualSize = 2 ** 40;
      });
      await attempt('index-mismatch', 'REPOSITORY_CORRUPT');
      // A size VHDX cannot take (not whole sectors): refused before anything, with the way out.
      await forge((m) => {
        const d = m.vms[0].disks[0];
        d.virtualSize = d.index.virtualSize = 6 * CS - 3;
      });
      await attempt('sectors', 'INVALID_ARGUMENT', 'vhdx');
    } finally {
      await repo.close();
    }
  });
});
