/**
 * A running VM's recovery checkpoint and its conversion to a reference point, the host killed (SIGKILL, a child
 * process) after each durable step in turn (HostOptions.hooks.checkpoints). After every restart: nothing pending,
 * no child or memory file in the VM's folder that its definition does not name, the disk reads what was written,
 * and change tracking answers for the id sealed before the checkpoint with what was written since (no reset,
 * nothing missed). A checkpoint writes no journal (the restart's removal of unnamed files is its roll-back), and a
 * merge moves its tracking session onto the parent without closing it (one persist names both sides of the child's
 * deletion): these are the windows this test opens one by one.
 */
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Host } from '../../src/host/host.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { runKilledAt } from '../helpers/kill-child.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;
const KiB = 1024;
const VM = 'cut';
const SLOT = 'scsi0-0';
const SIZE = 16 * MiB;

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('checkpoint-crash')));
afterAll(async () => cleanup?.());

const open = (store: string) =>
  Host.open({ store, log: HostLog.silent(), nbd: { socket: path.join(store, 'nbd.sock') } });

async function nbdWrite(host: Host, offset: number, data: Buffer): Promise<void> {
  const c = await NbdClient.connect({ socket: host.nbdSocket, exportName: `${VM}/${SLOT}` });
  try {
    await c.write(offset, data);
    await c.flush();
  } finally {
    await c.close();
  }
}

async function nbdRead(host: Host): Promise<Buffer> {
  const c = await NbdClient.connect({ socket: host.nbdSocket, exportName: `${VM}/${SLOT}` });
  try {
    return await c.read(0, SIZE);
  } finally {
    await c.close();
  }
}

/** A fresh store with a running disk-only VM: data, a reference point (its id), then more data. */
async function prepare(store: string): Promise<{ image: Buffer; id0: string }> {
  const host = await open(store);
  const image = Buffer.alloc(SIZE);
  try {
    await host.createVm({ name: VM, disks: [{ slot: SLOT, size: SIZE }] });
    await host.startVm(VM);
    const a = Buffer.alloc(64 * KiB, 0xa1);
    await nbdWrite(host, 1 * MiB, a);
    a.copy(image, 1 * MiB);
    const rp = await host.createReferencePoint(VM);
    const b = Buffer.alloc(64 * KiB, 0xb2);
    await nbdWrite(host, 5 * MiB, b);
    b.copy(image, 5 * MiB);
    return { image, id0: rp.resilientChangeTrackingIdentifiers[0]! };
  } finally {
    await host.close();
  }
}

/** A host in a child process: a recovery checkpoint, then its conversion; SIGKILLed after its `killAt`-th step. */
const CHILD = `
const [store, vm, killAt] = process.argv.slice(1);
const { Host } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist', 'host', 'host.js'))});
const { HostLog } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist', 'host', 'log.js'))});
const { writeSync } = await import('node:fs');
let n = 0;
const hook = (step) => {
  if (++n === Number(killAt)) {
    writeSync(1, step + '\\n');
    process.kill(process.pid, 'SIGKILL');
  }
};
const host = await Host.open({ store, log: HostLog.silent(), nbd: { socket: store + '/nbd.sock' }, hooks: { checkpoints: hook } });
const cp = await host.createCheckpoint(vm, { type: 'recovery', consistency: 'crash' });
await host.convertToReferencePoint(vm, cp.id);
await host.close();
process.stdout.write('done\\n');
`;

const runChild = (store: string, killAt: number) => runKilledAt(CHILD, [store, VM, String(killAt)]);

describe('a running VM checkpointed and converted, the host killed after each durable step', () => {
  it('each restart: nothing pending, no stray file, the disk as written, tracking intact since the earlier id', async () => {
    const outcomes: string[] = [];
    for (let killAt = 1; ; killAt++) {
      const store = path.join(dir, `kill-${killAt}`);
      const { image, id0 } = await prepare(store);
      const { killed, step } = await runChild(store, killAt);
      const label = killed ? `killed after "${step}"` : 'not killed';
      const host = await open(store);
      try {
        const def = host.getVm(VM);
        expect(def.pending, label).toBeNull();
        // Every child or memory file in the VM's folder is one its definition names.
        const named = new Set([
          ...def.disks.map((d) => path.basename(d.head)),
          ...def.checkpoints.flatMap((c) => c.disks.map((d) => path.basename(d.file))),
        ]);
        const files = await readdir(path.join(store, 'vms', VM, 'disks'));
        const strays = files.filter((f) => /\.(avhdx|avhd|vmrs)$/.test(f) && !named.has(f));
        expect(strays, label).toEqual([]);
        expect((await nbdRead(host)).equals(image), `${label}: the disk reads what was written`).toBe(true);
        // No reset and nothing missed: the write made after id0 answers, the one before does not.
        const changes = await host
          .virtualDiskChanges({ vm: VM, slot: SLOT }, id0)
          .catch((err: Error) => Promise.reject(new Error(`${label}: ${err.message}`)));
        const covers = (at: number) => changes.ranges.some((r) => r.offset <= at && at < r.offset + r.length);
        expect(covers(5 * MiB), `${label}: the write since the id`).toBe(true);
        expect(covers(1 * MiB), `${label}: the write before the id`).toBe(false);
        const state =
          def.checkpoints.length > 0 ? 'checkpoint kept' : def.referencePoints.length > 1 ? 'converted' : 'rolled back';
        outcomes.push(`${label}: ${state}`);
      } finally {
        await host.close();
      }
      if (!killed) break;
      expect(killAt).toBeLessThan(20);
    }
    console.log(outcomes.join('\n'));
    expect(outcomes).toEqual([
      'killed after "children made": rolled back',
      'killed after "sealed": rolled back',
      'killed after "recorded": checkpoint kept',
      'killed after "switched": checkpoint kept',
      'killed after "outcome": checkpoint kept',
      'killed after "merge journaled": converted',
      'killed after "merged": converted',
      'killed after "tracking moved": converted',
      'killed after "child deleted": converted',
      'killed after "removed": converted',
      'not killed: converted',
    ]);
  }, 300_000);
});
