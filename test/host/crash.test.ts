/**
 * The host killed with SIGKILL while a guest writes over NBD and a checkpoint is being created, converted
 * to a reference point (online merge) or deleted, at seeded random moments. After every restart:
 * nothing is left pending, no stray .avhdx remains, the VM's disks open and serve, every write a flush
 * made durable before the kill is there (and nothing else changed), and, every few trials with the VM
 * stopped, qemu-img check passes on every file of every chain.
 *
 * Trials: TIDEMARK_HOST_CRASH_TRIALS (default 50); seed: TIDEMARK_HOST_CRASH_SEED.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Workload } from '../../src/workload/generator.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { qemuImgCheck, requirePeers, sevenZipExtract, sha256File, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const TRIALS = Number(process.env.TIDEMARK_HOST_CRASH_TRIALS ?? 50);
const SEED = seedFrom('TIDEMARK_HOST_CRASH_SEED', 20261124);
const CHECK_EVERY = 10;
console.log(`host crash: ${TRIALS} trials, seed ${SEED} (TIDEMARK_HOST_CRASH_TRIALS, TIDEMARK_HOST_CRASH_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('host-crash')));
afterAll(async () => cleanup?.());

let hostLog = '';
async function startHostProcess(store: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, [path.join(REPO_ROOT, 'bin', 'tidemark.js'), 'host', '--store', store], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d) => ((err += d), (hostLog += d)));
  for (let i = 0; i < 300; i++) {
    try {
      const info = JSON.parse(await readFile(path.join(store, 'host.json'), 'utf8'));
      if (info.pid === child.pid) return child;
    } catch {
      // not yet
    }
    if (child.exitCode !== null) throw new Error(`host exited: ${err}`);
    await sleep(20);
  }
  throw new Error(`host did not start: ${err}`);
}

async function kill(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await gone;
}

async function readAll(nbd: NbdClient): Promise<Buffer> {
  const out = Buffer.alloc(nbd.size);
  for (let at = 0; at < nbd.size; at += 8 * MiB) (await nbd.read(at, Math.min(8 * MiB, nbd.size - at))).copy(out, at);
  return out;
}

describe.skipIf(requirePeers('qemu-img').skip)(`host crash (seed ${SEED})`, () => {
  it(
    `${TRIALS} kills during checkpoints and merges lose no durable write and leave nothing behind`,
    { timeout: 900_000 },
    async () => {
      const store = path.join(dir, 'store');
      const r = rng(SEED);
      let host = await startHostProcess(store);
      let api = await HostClient.connect({ store });
      await api.createVm({
        name: 'app',
        disks: [
          { slot: 'scsi0-0', size: 8 * MiB },
          { slot: 'ide0-0', size: 6 * MiB },
        ],
      });
      await api.startVm('app');
      const slots = ['scsi0-0', 'ide0-0'];
      const baseline = new Map<string, Buffer>();
      const kinds = new Map<string, number>();
      let restartMs = 0;
      const checkedChains = new Map<number, number>();
      for (let trial = 0; trial < TRIALS; trial++) {
        const vm = await api.showVm('app');
        const clients = await Promise.all(
          slots.map((s) => NbdClient.connect({ socket: path.join(store, 'nbd.sock'), exportName: `app/${s}` })),
        );
        for (const [i, s] of slots.entries()) if (!baseline.has(s)) baseline.set(s, await readAll(clients[i]));
        const workloads = clients.map(
          (c, i) => new Workload(c, { seed: SEED * 31 + trial * 7 + i, concurrency: 3, flushEvery: 1 + r.int(12) }),
        );
        for (const w of workloads) w.start();
        await sleep(10 + r.int(40));
        // The operation the kill interrupts: create a checkpoint, or merge the one there is (convert to a
        // reference point, or delete). Half the time a created checkpoint is let finish and its merge is killed.
        const mergeOp = (cp: { id: string; type: string }) =>
          cp.type === 'recovery'
            ? { kind: 'convert', op: api.convertToReferencePoint('app', cp.id) }
            : { kind: 'delete', op: api.deleteCheckpoint('app', cp.id) };
        const cps = vm.definition.checkpoints;
        let step: { kind: string; op: Promise<unknown> };
        if (cps.length > 0) step = mergeOp(cps[0]);
        else {
          const type = r.int(2) ? 'recovery' : 'standard';
          const create = api.createCheckpoint('app', { type, consistency: 'crash' });
          step = { kind: `checkpoint ${type}`, op: create };
          if (r.int(2)) {
            const cp = await create;
            await sleep(r.int(20));
            step = mergeOp(cp);
          }
        }
        const kind = step.kind;
        kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
        step.op.catch(() => undefined);
        await sleep(r.int(60));
        const tKill = performance.now();
        await kill(host);
        await Promise.all(workloads.map((w) => w.stop({ flush: false }).catch(() => undefined)));
        await Promise.all(clients.map((c) => c.close().catch(() => undefined)));

        const r0 = performance.now();
        host = await startHostProcess(store);
        restartMs += performance.now() - r0;
        api = await HostClient.connect({ store });
        const after = await api.showVm('app');
        expect(after.definition.pending, `trial ${trial}: pending after restart`).toBeNull();
        expect(after.state).toBe('Running');
        // No stray children: every .avhdx is the head or a checkpoint's file.
        const disksDir = path.join(store, 'vms', 'app', 'disks');
        const referenced = new Set([
          ...after.definition.disks.map((d) => path.basename(d.head)),
          ...after.definition.checkpoints.flatMap((c) => c.disks.map((d) => path.basename(d.file))),
        ]);
        const strays = (await readdir(disksDir)).filter((f) => f.endsWith('.avhdx') && !referenced.has(f));
        expect(strays, `trial ${trial} (${kind}): stray children`).toEqual([]);
        // Every durable write is there; units this trial did not write are unchanged.
        const readers = await Promise.all(
          slots.map((s) => NbdClient.connect({ socket: path.join(store, 'nbd.sock'), exportName: `app/${s}` })),
        );
        for (const [i, s] of slots.entries()) {
          const img = await readAll(readers[i]);
          const w = workloads[i];
          const base = baseline.get(s)!;
          const problems = await w.verifyAfterCrash(
            async (u) => img.subarray(u * w.unit, (u + 1) * w.unit),
            tKill,
            (u) => base.subarray(u * w.unit, (u + 1) * w.unit),
          );
          if (problems.length) {
            const seqs = [...problems.join(' ').matchAll(/expected write (\d+)/g)].map((m) => Number(m[1]));
            for (const q of seqs) {
              const rec = w.log[q];
              console.log(
                `trial ${trial} ${kind} ${s} write ${q}: issued ${(rec.issuedAt - tKill).toFixed(1)} acked ${rec.ackedAt ? (rec.ackedAt - tKill).toFixed(1) : '-'} durable ${rec.durableAt ? (rec.durableAt - tKill).toFixed(1) : '-'} ms from kill; host log: ${hostLog.slice(-600)}`,
              );
            }
          }
          expect(problems, `trial ${trial} (${kind}) ${s}`).toEqual([]);
          const touched = new Set(w.log.map((x) => x.unit));
          for (let u = 0; u < w.units; u++) {
            if (touched.has(u)) continue;
            const same = img.subarray(u * w.unit, (u + 1) * w.unit).equals(base.subarray(u * w.unit, (u + 1) * w.unit));
            expect(same, `trial ${trial} (${kind}) ${s}: unit ${u} changed though nobody wrote it`).toBe(true);
          }
          baseline.set(s, img);
        }
        await Promise.all(readers.map((c) => c.close()));
        if ((trial + 1) % CHECK_EVERY === 0 || trial === TRIALS - 1) {
          // With the VM stopped (files closed cleanly), qemu-img agrees on every file of every chain.
          await api.stopVm('app');
          const def = (await api.showVm('app')).definition;
          for (const d of def.disks) {
            const headPath = path.resolve(store, 'vms', 'app', d.head);
            const head = await VhdxFile.open(headPath, { allowedRoots: [store] });
            const files = head.chain().map((f) => f.path);
            const ours = createHash('sha256')
              .update(await head.readAt(0, head.virtualSize))
              .digest('hex');
            await head.close();
            // qemu-img reads no differencing VHDX: it checks the base; 7zz reads the whole chain.
            const check = await qemuImgCheck(files.at(-1)!);
            expect(check.ok, `trial ${trial}: qemu-img check ${files.at(-1)}: ${check.output}`).toBe(true);
            if (!requirePeers('7zz').skip) {
              const raw = await sevenZipExtract(headPath, path.join(dir, 'seven.raw'));
              expect(await sha256File(raw), `trial ${trial}: 7zz reads ${d.head} as we do`).toBe(ours);
            }
            checkedChains.set(files.length, (checkedChains.get(files.length) ?? 0) + 1);
          }
          await api.startVm('app');
        }
      }
      await kill(host);
      console.log(
        `host crash: ${[...kinds].map(([k, n]) => `${n} × ${k}`).join(', ')}; restarts took ${(restartMs / TRIALS).toFixed(0)} ms each; peers checked chains of length ${[...checkedChains].map(([k, n]) => `${k} (${n}×)`).join(', ')}`,
      );
    },
  );
});
