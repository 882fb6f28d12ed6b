/**
 * Real virtual machines (TCG): the guest image boots under QEMU launched by the host, its data disk a VHDX
 * served by Tidemark's own NBD server. One guest, booted twice, carries the whole story in order:
 * agent ping, the sqlite counter on the console, freeze/thaw through our guest client, a SCSI disk hot-added
 * and removed, the host object dropped and re-created under the running guest (QEMU adopted through its
 * QMP socket, its NBD client reconnecting: no I/O error in the guest), a clean stop (agent shutdown) after
 * which the data disk passes `e2fsck -fn`, a copy of that disk booting in another VM (and its QEMU killed: a
 * reported crash), a second boot that continues the counter, save and restore, and
 * a power-off from inside the guest that makes the VM Off. Timings are printed.
 */
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgentClient } from '../../src/guest/client.js';
import { buildGuestImage } from '../../src/guest-image/builder.js';
import { Host } from '../../src/host/host.js';
import { HostLog } from '../../src/host/log.js';
import { missingPeers, run } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const PEERS = ['qemu-system-x86_64', 'qemu-img', 'apt-get', 'dpkg-deb', 'xz', 'e2fsck'];
const skip = missingPeers(...PEERS);

interface Counter {
  boot: number;
  n: number;
}

describe.skipIf(skip)('a real guest on Tidemark disks (TCG)', () => {
  let store: string;
  let imageDir: string;
  let host: Host;
  const logLines: string[] = [];
  const log = new HostLog((l) => logLines.push(l));
  const timings: Record<string, number> = {};
  const openHost = () =>
    Host.open({
      store,
      log,
      qemu: { accel: 'tcg', reconnectDelay: 60, stop: { agentTimeoutMs: 90_000, acpiTimeoutMs: 5_000 } },
    });

  beforeAll(async () => {
    store = mkdtempSync(path.join(os.tmpdir(), 'tm-vm-'));
    const built = await buildGuestImage({ log: (l) => console.log(`guest-image: ${l}`) });
    imageDir = built.dir;
    host = await openHost();
  }, 900_000);

  afterAll(async () => {
    // Whatever happened, no QEMU outlives the test.
    try {
      if (host) {
        for (const v of await host.listVms().catch(() => []))
          if (v.qemu?.pid) await host.stopVm(v.name, { turnOff: true }).catch(() => undefined);
        await host.close();
      }
    } finally {
      console.log(`timings: ${JSON.stringify(timings)}`);
      if (process.env.TIDEMARK_KEEP_VM_TEST) console.log(`kept ${store}`);
      else rmSync(store, { recursive: true, force: true });
    }
  }, 120_000);

  const consoleText = async (vm = 'g1') => (await host.readConsole(vm, 0, 1 << 20)).data;
  const counters = async (vm = 'g1'): Promise<Counter[]> =>
    [...(await consoleText(vm)).matchAll(/tidemark-wl boot=(\d+) n=(\d+)/g)].map((m) => ({
      boot: Number(m[1]),
      n: Number(m[2]),
    }));
  const last = async (vm = 'g1') => (await counters(vm)).at(-1) ?? { boot: 0, n: 0 };
  async function waitFor<T>(what: string, ms: number, fn: () => Promise<T | undefined | false>): Promise<T> {
    const end = Date.now() + ms;
    for (;;) {
      const v = await fn().catch(() => undefined);
      if (v) return v;
      if (Date.now() > end)
        throw new Error(`timed out waiting for ${what}; console tail: ${(await consoleText()).slice(-1500)}`);
      await sleep(250);
    }
  }
  const agent = () => GuestAgentClient.connect(`unix:${host.runtime('g1').guestSocket}`, { timeoutMs: 10_000 });
  /** guest-exec, waiting for the process: its stdout. */
  async function exec(file: string, args: string[] = []): Promise<string> {
    const c = await agent();
    try {
      const { pid } = (await c.execute('guest-exec', { path: file, arg: args, 'capture-output': true })) as {
        pid: number;
      };
      for (;;) {
        const st = (await c.execute('guest-exec-status', { pid }, { idempotent: true })) as {
          exited: boolean;
          exitcode?: number;
          'out-data'?: string;
        };
        if (st.exited) return Buffer.from(st['out-data'] ?? '', 'base64').toString();
        await sleep(100);
      }
    } finally {
      await c.close();
    }
  }
  async function pingTime(): Promise<number> {
    const t0 = performance.now();
    await waitFor('the guest agent', 180_000, async () => {
      const c = await agent();
      try {
        await c.ping({ timeoutMs: 2000 });
        return true;
      } finally {
        await c.close();
      }
    });
    return performance.now() - t0;
  }

  it('boots from the image, the agent answers, the sqlite counter advances, freeze and thaw work', async () => {
    await host.createVm({
      name: 'g1',
      image: imageDir,
      workload: 'sqlite',
      memoryMiB: 256,
      disks: [{ slot: 'scsi0-0', size: '256M' }],
    });
    const t0 = performance.now();
    const v = await host.startVm('g1');
    expect(v.state).toBe('Running');
    expect(v.qemu?.pid).toBeGreaterThan(0);
    expect(v.qemu?.accel).toBe('tcg');
    expect(v.disks[0].nbdUri).toMatch(/^nbd\+unix:\/\/\/g1%2Fscsi0-0\?socket=/);
    expect(v.guest).toBe(`unix:${host.runtime('g1').guestSocket}`);
    await pingTime();
    timings.bootToPingMs = Math.round(performance.now() - t0);
    await waitFor('the counter to reach 3', 120_000, async () => (await last()).n >= 3);
    const c1 = await last();
    expect(c1.boot).toBe(1);
    expect(await consoleText()).toContain('formatting /dev/sda as ext4');

    const c = await agent();
    try {
      let t = performance.now();
      expect(await c.fsfreezeFreeze({ timeoutMs: 60_000 })).toBeGreaterThanOrEqual(1);
      timings.freezeMs = Math.round(performance.now() - t);
      expect(await c.fsfreezeStatus()).toBe('frozen');
      t = performance.now();
      try {
        expect(await c.fsfreezeThaw({ timeoutMs: 60_000 })).toBeGreaterThanOrEqual(1);
      } finally {
        await c.fsfreezeThaw().catch(() => undefined);
      }
      timings.thawMs = Math.round(performance.now() - t);
      expect(await c.fsfreezeStatus()).toBe('thawed');
    } finally {
      await c.close();
    }
    const afterThaw = (await last()).n;
    await waitFor('the counter to go on after the thaw', 60_000, async () => (await last()).n > afterThaw);
  });

  it('hot-adds a SCSI disk the guest sees, and removes it', async () => {
    await host.modifyVm('g1', { attach: [{ slot: 'scsi0-1', size: '64M' }] });
    expect(
      await waitFor(
        'sdb in the guest',
        60_000,
        async () => (await exec('/bin/ls', ['/sys/block'])).includes('sdb') && true,
      ),
    ).toBe(true);
    await host.modifyVm('g1', { detach: ['scsi0-1'] });
    await waitFor(
      'sdb gone from the guest',
      60_000,
      async () => !(await exec('/bin/ls', ['/sys/block'])).includes('sdb'),
    );
    expect((await host.showVm('g1')).disks.map((d) => d.slot)).toEqual(['scsi0-0']);
    // A SCSI slot beyond the VM's controllers, and IDE changes (the VM must be off), change nothing.
    await expect(host.modifyVm('g1', { attach: [{ slot: 'scsi1-0', size: '64M' }] })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(/1 SCSI controller\(s\): scsi1-0 needs controller 1/),
    });
    expect((await host.showVm('g1')).disks.map((d) => d.slot)).toEqual(['scsi0-0']);
    await expect(host.modifyVm('g1', { attach: [{ slot: 'ide0-0', size: '64M' }] })).rejects.toMatchObject({
      code: 'CONFLICT',
    });
  });

  it('survives the host going away and coming back: QEMU adopted, its NBD client reconnects, no I/O error', async () => {
    const pid = (await host.showVm('g1')).qemu!.pid;
    const before = (await last()).n;
    await host.close(); // the NBD server goes with it: the guest's writes wait (reconnect-delay)
    await sleep(3000);
    host = await openHost();
    const v = await host.showVm('g1');
    expect(v.state).toBe('Running');
    expect(v.qemu?.pid).toBe(pid);
    expect(logLines.some((l) => l.includes(`adopted QEMU pid ${pid}`))).toBe(true);
    await waitFor('the counter to go on under the new host', 120_000, async () => (await last()).n >= before + 3);
    const dmesg = await exec('/bin/dmesg');
    expect(dmesg).not.toMatch(/I\/O error|blk_update_request|Buffer I\/O|EXT4-fs error/i);
    expect(await consoleText()).not.toMatch(/insert failed/);
  });

  it("a standard checkpoint holds the guest's memory: applied, the VM is Saved and resumes where it was", async () => {
    const before = (await last()).n;
    let t = performance.now();
    const cp = await host.createCheckpoint('g1', { type: 'standard', name: 'with memory' });
    timings.standardCheckpointMs = Math.round(performance.now() - t);
    const after = (await last()).n;
    expect(cp.type).toBe('standard');
    expect(cp.memoryState).toMatch(/^disks\/memory_[0-9a-f]{8}\.vmrs$/);
    const memoryFile = path.join(store, 'vms', 'g1', cp.memoryState!);
    expect(statSync(memoryFile).size).toBeGreaterThan(1 << 20);
    expect(cp.consistencyNote).toMatch(/with the guest's memory/);
    // The guest went on after the checkpoint; then it is turned off, losing that memory.
    await waitFor('the counter to pass the checkpoint', 120_000, async () => (await last()).n >= after + 3);
    expect((await host.stopVm('g1', { turnOff: true })).state).toBe('Off');
    const offset = (await host.readConsole('g1', 0, 1)).size;

    t = performance.now();
    await host.applyCheckpoint('g1', cp.id);
    timings.standardApplyMs = Math.round(performance.now() - t);
    expect((await host.showVm('g1')).state).toBe('Saved');
    t = performance.now();
    expect((await host.startVm('g1')).state).toBe('Running');
    timings.standardResumeMs = Math.round(performance.now() - t);
    const resumed = await waitFor('the counter after the resume', 120_000, async () => {
      const text = (await host.readConsole('g1', offset, 1 << 20)).data;
      const m = [...text.matchAll(/tidemark-wl boot=(\d+) n=(\d+)/g)];
      return m.length > 0 && { boot: Number(m[0][1]), n: Number(m[0][2]) };
    });
    // Boot 1 still (memory, not a reboot), and the counter back where the checkpoint caught it.
    expect(resumed.boot).toBe(1);
    expect(resumed.n).toBeGreaterThan(before);
    expect(resumed.n).toBeLessThanOrEqual(after + 1);
    const dmesg = await exec('/bin/dmesg');
    expect(dmesg).not.toMatch(/I\/O error|EXT4-fs error/i);

    // Deleting the checkpoint merges online and removes its memory state with it.
    await host.deleteCheckpoint('g1', cp.id);
    expect(existsSync(memoryFile)).toBe(false);
    expect((await host.showVm('g1')).disks[0].head).toMatch(/\.vhdx$/);
  });

  it('stops cleanly through the guest agent; the data disk then passes e2fsck -fn', async () => {
    const t0 = performance.now();
    const v = await host.stopVm('g1');
    timings.stopMs = Math.round(performance.now() - t0);
    expect(v.state).toBe('Off');
    expect(v.lastExit?.reason).toBe('poweroff');
    expect(logLines.some((l) => /g1: stopped by guest-agent/.test(l))).toBe(true);
    expect(await consoleText()).toContain('data disk unmounted; poweroff');
    const raw = path.join(store, 'data.raw');
    await run('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', v.disks[0].head, raw]);
    const fsck = await run('e2fsck', ['-fn', raw], { allowFail: true });
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
    rmSync(raw);
  });

  it('a copy of the disk boots in another VM and continues the counter; QEMU killed under it is a reported crash', async () => {
    const end1 = (await last()).n;
    const copy = path.join(store, 'copies', 'g1-data.vhdx');
    mkdirSync(path.dirname(copy));
    copyFileSync((await host.showVm('g1')).disks[0].head, copy);
    await host.createVm({
      name: 'g2',
      image: imageDir,
      workload: 'sqlite',
      memoryMiB: 256,
      disks: [{ slot: 'scsi0-0', path: copy }],
    });
    const v = await host.startVm('g2');
    await waitFor('the copy counting', 180_000, async () => (await last('g2')).n >= end1 + 2);
    const first = (await counters('g2'))[0];
    expect(first).toEqual({ boot: 2, n: end1 + 1 }); // the copy's second boot, its counter where g1 stopped
    expect(await consoleText('g2')).not.toContain('formatting');
    process.kill(v.qemu!.pid!, 'SIGKILL');
    await waitFor('Off after QEMU was killed', 60_000, async () => (await host.showVm('g2')).state === 'Off');
    const after = await host.showVm('g2');
    expect(after.lastExit?.reason).toBe('crash');
    expect(after.lastExit?.detail).toMatch(/QEMU ended unexpectedly \(killed by SIGKILL\)/);
    expect(after.disks[0].export).toBeNull();
    expect(logLines.some((l) => / warn g2: QEMU ended unexpectedly/.test(l))).toBe(true);
  });

  it('boots a second time on the same disk: boot 2, the counter continues; save and restore; power-off from inside', async () => {
    const end1 = (await last()).n;
    await host.startVm('g1');
    await waitFor('boot 2 counting', 180_000, async () => {
      const c = await last();
      return c.boot === 2 && c.n >= end1 + 2;
    });
    const firstOf2 = (await counters()).find((c) => c.boot === 2)!;
    expect(firstOf2.n).toBe(end1 + 1);

    const t0 = performance.now();
    const saved = await host.saveVm('g1');
    timings.saveMs = Math.round(performance.now() - t0);
    expect(saved.state).toBe('Saved');
    expect(saved.qemu?.pid ?? null).toBeNull();
    const atSave = (await last()).n;
    const t1 = performance.now();
    expect((await host.startVm('g1')).state).toBe('Running');
    timings.restoreMs = Math.round(performance.now() - t1);
    await waitFor('the counter to go on after the restore', 120_000, async () => (await last()).n > atSave);
    expect((await last()).boot).toBe(2); // the same boot, not a reboot

    void exec('/sbin/poweroff').catch(() => undefined);
    await waitFor('Off after the guest powered off', 120_000, async () => (await host.showVm('g1')).state === 'Off');
    const v = await host.showVm('g1');
    expect(v.lastExit?.reason).toBe('poweroff');
    expect(v.disks[0].export).toBeNull();
    expect(v.definition.state).toBe('Off');
  });
});
