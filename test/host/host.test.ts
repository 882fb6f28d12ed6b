/**
 * The host under a live guest: a VM whose two disks are written continuously by the project's workload
 * generator over NBD while recovery checkpoints are created, converted to reference points (online merge)
 * and deleted. At every checkpoint the frozen parent holds exactly what the client had written at the
 * cut; after every merge the live disk equals the client's view; GetVirtualDiskChanges between two
 * reference points covers every unit written between them. Also the API: token, validation, and two
 * clients checkpointing one VM at once (serialized, never interleaved).
 *
 * Seed: TIDEMARK_HOST_SEED; rounds: TIDEMARK_HOST_ROUNDS.
 */
import { access, readdir } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Workload } from '../../src/workload/generator.js';
import { qemuImgCheck, requirePeers, tempDir } from '../helpers/peers.js';
import { seedFrom } from '../helpers/random.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_HOST_SEED', 777);
const ROUNDS = Number(process.env.TIDEMARK_HOST_ROUNDS ?? 4);
console.log(`host seed ${SEED}, ${ROUNDS} rounds (TIDEMARK_HOST_SEED, TIDEMARK_HOST_ROUNDS)`);

let dir: string;
let cleanup: () => Promise<void>;
let running: RunningHost;
let api: HostClient;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('host'));
  running = await startHost({ store: path.join(dir, 'store'), log: HostLog.silent() });
  api = await HostClient.connect({ store: path.join(dir, 'store') });
});
afterAll(async () => {
  await running?.close();
  await cleanup?.();
});

async function withFile<T>(file: string, allowedRoots: string[], fn: (d: VhdxFile) => Promise<T>): Promise<T> {
  const d = await VhdxFile.open(file, { allowedRoots });
  try {
    return await fn(d);
  } finally {
    await d.close();
  }
}

async function readWhole(nbd: NbdClient, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  for (let at = 0; at < length; at += 16 * MiB) (await nbd.read(at, Math.min(16 * MiB, length - at))).copy(out, at);
  return out;
}

describe(`host (seed ${SEED})`, () => {
  it('checkpoints, reference points and merges under a continuous NBD writer lose nothing and miss nothing', async () => {
    const vm = await api.createVm({
      name: 'web',
      disks: [
        { slot: 'scsi0-0', size: 48 * MiB },
        { slot: 'scsi0-1', size: 32 * MiB },
      ],
    });
    expect(vm.disks.map((d) => d.tracking)).toEqual(['enabled', 'enabled']);
    const started = await api.startVm('web');
    const store = path.join(dir, 'store');
    const roots = [store];
    const workloads = await Promise.all(
      started.disks.map(async (d, i) => {
        const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: d.export! });
        expect(nbd.size).toBe(d.virtualSize);
        const w = new Workload(nbd, { seed: SEED + i, concurrency: 4, flushEvery: 16 });
        w.start();
        return { nbd, w, slot: d.slot };
      }),
    );
    let previous: { rctIds: (string | null)[]; t1: number } | undefined;
    const pauses: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      await sleep(60);
      const t0 = performance.now();
      const cp = await api.createCheckpoint('web', { type: 'recovery', consistency: 'crash' });
      const t1 = performance.now();
      pauses.push(cp.ioPauseMs!);
      expect(cp.consistency).toBe('crash');
      // The frozen parent of every disk is exactly the client's writes at the cut.
      for (const [i, d] of cp.disks.entries()) {
        const file = path.resolve(store, 'vms', 'web', d.file);
        const w = workloads[i].w;
        const problems = await withFile(file, roots, (f) => w.verifyCut((u) => f.readAt(u * w.unit, w.unit), t0, t1));
        expect(problems, `round ${round} ${d.slot}`).toEqual([]);
      }
      await sleep(40);
      const rp = await api.convertToReferencePoint('web', cp.id);
      expect(rp.virtualDiskIdentifiers).toEqual(cp.disks.map((d) => d.virtualDiskId));
      // Changes since the previous reference point cover every unit written since its cut.
      if (previous) {
        for (const [i, d] of started.disks.entries()) {
          const { ranges } = await api.allChanges({
            vm: 'web',
            slot: d.slot,
            limitId: previous.rctIds[i]!,
            length: d.virtualSize,
          });
          const unit = workloads[i].w.unit;
          for (const w of workloads[i].w.log) {
            // Issued after the previous cut ended: a change since its id (in-flight ones may sit on either side).
            if (w.issuedAt < previous.t1 || w.issuedAt > t0) continue;
            const off = w.unit * unit;
            expect(
              ranges.some((r) => r.offset <= off && off + unit <= r.offset + r.length),
              `unit ${w.unit} written after the reference point must be reported`,
            ).toBe(true);
          }
        }
        await api.destroyReferencePoint('web', (await api.listReferencePoints('web'))[0].id);
      }
      previous = { rctIds: rp.resilientChangeTrackingIdentifiers, t1 };
    }
    // A standard checkpoint deleted again while the writer runs (online merge of the head).
    const std = await api.createCheckpoint('web', { type: 'standard', name: 'before-upgrade' });
    expect((await api.listCheckpoints('web')).map((c) => c.name)).toEqual(['before-upgrade']);
    await sleep(40);
    await api.deleteCheckpoint('web', 'before-upgrade');
    expect(await api.listCheckpoints('web')).toEqual([]);
    expect(std.type).toBe('standard');
    for (const x of workloads) await x.w.stop();
    // After every merge the live disk equals the client's view, read back through NBD.
    for (const x of workloads) {
      const img = await readWhole(x.nbd, x.w.units * x.w.unit);
      const want = x.w.expectedImage();
      const wrong: string[] = [];
      for (let u = 0; u < x.w.units && wrong.length < 5; u++) {
        const a = img.subarray(u * x.w.unit, (u + 1) * x.w.unit);
        const b = want.subarray(u * x.w.unit, (u + 1) * x.w.unit);
        if (!a.equals(b)) wrong.push(`unit ${u}: has write ${a.readUInt32LE(0)}, client wrote ${b.readUInt32LE(0)}`);
      }
      expect(wrong, x.slot).toEqual([]);
      await x.nbd.close();
    }
    console.log(
      `host: ${workloads.map((x) => x.w.writes).join('+')} writes, I/O pauses ${pauses.map((p) => p.toFixed(1)).join(', ')} ms`,
    );
    await api.stopVm('web');
    const disksDir = path.join(store, 'vms', 'web', 'disks');
    expect((await readdir(disksDir)).filter((f) => f.endsWith('.avhdx'))).toEqual([]);
    if (!requirePeers('qemu-img').skip) {
      for (const f of (await readdir(disksDir)).filter((f) => f.endsWith('.vhdx'))) {
        expect((await qemuImgCheck(path.join(disksDir, f))).ok).toBe(true);
      }
    }
  });

  it('refuses requests without the token and malformed bodies, with stable codes', async () => {
    const socket = path.join(dir, 'store', 'api.sock');
    const raw = (method: string, url: string, body?: string, token?: string) =>
      new Promise<{ status: number; json: { error?: { code: string; message: string } } }>((resolve, reject) => {
        const req = http.request(
          {
            socketPath: socket,
            path: url,
            method,
            headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), 'content-type': 'application/json' },
          },
          (res) => {
            let text = '';
            res.on('data', (c) => (text += c));
            res.on('end', () => resolve({ status: res.statusCode!, json: JSON.parse(text) }));
          },
        );
        req.on('error', reject);
        req.end(body);
      });
    const noToken = await raw('GET', '/v1/vms');
    expect(noToken.status).toBe(401);
    expect(noToken.json.error!.code).toBe('UNAUTHORIZED');
    const wrong = await raw('GET', '/v1/vms', undefined, 'not-the-token');
    expect(wrong.status).toBe(401);
    const token = running.token;
    const notJson = await raw('POST', '/v1/vms', '{"name": ', token);
    expect(notJson.status).toBe(400);
    expect(notJson.json.error!.message).toMatch(/not JSON/);
    const badName = await raw('POST', '/v1/vms', JSON.stringify({ name: '../etc' }), token);
    expect(badName.status).toBe(400);
    expect(badName.json.error!.message).toMatch(/name/);
    const extra = await raw('POST', '/v1/vms', JSON.stringify({ name: 'ok', bogus: 1 }), token);
    expect(extra.status).toBe(400);
    const badSlot = await raw(
      'POST',
      '/v1/vms',
      JSON.stringify({ name: 'ok', disks: [{ slot: 'sata9-9', size: 1 }] }),
      token,
    );
    expect(badSlot.status).toBe(400);
    const missing = await raw('GET', '/v1/vms/nope', undefined, token);
    expect(missing.status).toBe(404);
    expect(missing.json.error!.code).toBe('NOT_FOUND');
    const doc = (await api.openApi()) as { openapi: string; paths: Record<string, unknown> };
    expect(doc.openapi).toBe('3.1.0');
    expect(Object.keys(doc.paths)).toContain('/v1/vms/{vm}/checkpoints');
  });

  it('serializes two clients checkpointing the same VM at once', async () => {
    await api.createVm({ name: 'db', disks: [{ slot: 'scsi0-0', size: 16 * MiB }] });
    await api.startVm('db');
    const other = await HostClient.connect({ store: path.join(dir, 'store') });
    const [a, b] = await Promise.all([
      api.createCheckpoint('db', { type: 'standard', name: 'a' }),
      other.createCheckpoint('db', { type: 'standard', name: 'b' }),
    ]);
    const list = await api.listCheckpoints('db');
    expect(list).toHaveLength(2);
    // One after the other: the second checkpoint's parent is the first, and its frozen file is the first's child.
    const [first, second] = a.createdAt <= b.createdAt ? [a, b] : [b, a];
    expect(second.parentId).toBe(first.id);
    expect(second.disks[0].file).not.toBe(first.disks[0].file);
    const def = (await api.showVm('db')).definition;
    expect(def.pending).toBeNull();
    expect(list.find((c) => c.current)!.id).toBe(second.id);
    // Both delete cleanly, newest first; the older one refuses while the newer depends on it.
    await expect(api.deleteCheckpoint('db', first.id)).rejects.toMatchObject({ code: 'NOT_SUPPORTED' });
    await api.deleteCheckpoint('db', second.id);
    await api.deleteCheckpoint('db', first.id);
    await api.stopVm('db');
    await expect(access(path.join(dir, 'store', 'vms', 'db', 'disks', 'scsi0-0.vhdx'))).resolves.toBeUndefined();
  });
});
