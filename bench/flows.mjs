#!/usr/bin/env node
// The backup flows side by side at scale: N disk-only VMs with small disks through each flow, on one host.
//
// The setup: `tidemark host` as its own process (as an administrator runs it); N VMs, each with one small VHDX
// (BENCH_DISK_MIB, default 4 MiB) served over NBD ("running": the host pauses their I/O around checkpoints and
// the storage snapshot, as it would a guest's), each written with 256 KiB of seeded data, then backed up once
// (the 2016 flow: a full). Then, for each flow, 64 KiB more per disk and one backup run of the whole set, timed
// (an incremental: the flows differ in orchestration, which is what this measures):
//   2016         checkpoints of every VM, ONE storage snapshot, reference points, the data phase
//   2016-serial  the same with the data phase one VM at a time (vmParallel 1: how it was before it ran in parallel)
//   per-vm       2012 R2-style coupling: a storage snapshot per VM (batch 1)
//   2012r2       a storage snapshot per VM, then each disk hot-added to its guest for the auto-recovery inside the
//                VM (disk-only VMs: modelled, the overlay made and served, no guest)
//   2008r2       a storage snapshot per VM, then every disk mounted from it and recovered on the host
//   no-snapshot  no storage snapshot: the frozen parents read while the checkpoints exist
// Per flow: storage snapshots taken, wall time (and its ratio to the 2016 flow's: flow/2016, lower is better),
// orchestration time per VM (the run's wall time minus its data phase, over N), the data phase, the longest I/O
// pause (a checkpoint's, or a storage snapshot's write hold), the longest guest-visible freeze (null for disk-only
// VMs: nothing in them to freeze), and the 2012r2 and 2008r2 flows' mean auto-recovery per VM. Goals, reported against: the
// 2016 flow takes exactly 1 storage snapshot at any N, and orchestration ≤ 20 ms per VM at 800 VMs.
//
// Usage: node bench/flows.mjs [--vms 50,200,800] [--flows 2016,per-vm,...]  (default: --vms 20, every flow)
// Environment: BENCH_TMPDIR (default /tmp), BENCH_DISK_MIB (4).
import { spawn } from 'node:child_process';
import { createCipheriv } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { URL } from 'node:url';
import { parseArgs } from 'node:util';

const ROOT = new URL('..', import.meta.url).pathname;
const imp = (p) => import(path.join(ROOT, 'dist', p));
const { HostClient } = await imp('api/client.js');
const { NbdClient } = await imp('nbd/client.js');
const { Repository } = await imp('repository/index.js');
const { runBackupSet } = await imp('backup/backup-set.js');
const { forEachBounded } = await imp('util/bounded.js');

const { values: args } = parseArgs({
  options: { vms: { type: 'string', default: '20' }, flows: { type: 'string' } },
});
const COUNTS = args.vms.split(',').map(Number);
const FLOWS = [
  { name: '2016', flow: '2016' },
  { name: '2016-serial', flow: '2016', vmParallel: 1 },
  { name: 'per-vm', flow: 'per-vm' },
  { name: '2012r2', flow: '2012r2' },
  { name: '2008r2', flow: '2008r2' },
  { name: 'no-snapshot', flow: 'no-snapshot' },
].filter((f) => !args.flows || args.flows.split(',').includes(f.name));
if (COUNTS.some((n) => !(Number.isInteger(n) && n > 0)) || FLOWS.length === 0)
  throw new Error(
    'usage: node bench/flows.mjs [--vms 50,200,800] [--flows 2016,2016-serial,per-vm,2012r2,2008r2,no-snapshot]',
  );
const KiB = 1024;
const MiB = 1024 * KiB;
const DISK = Number(process.env.BENCH_DISK_MIB ?? 4) * MiB;
const work = mkdtempSync(path.join(process.env.BENCH_TMPDIR ?? '/tmp', 'tidemark-bench-flows.'));

/** Seeded bytes (AES-CTR keystream of the seed). */
const seeded = (seed, n) =>
  createCipheriv('aes-128-ctr', Buffer.alloc(16, seed % 256), Buffer.alloc(16)).update(Buffer.alloc(n));

async function startHostProcess(store) {
  const child = spawn(
    process.execPath,
    [path.join(ROOT, 'bin/tidemark.js'), 'host', '--store', store, '--socket', path.join(store, '..', 'nbd.sock')],
    { stdio: 'ignore' },
  );
  for (let i = 0; ; i++) {
    try {
      return { child, api: await HostClient.connect({ store }) };
    } catch (err) {
      if (i > 400 || child.exitCode !== null) throw err;
      await sleep(50);
    }
  }
}

/** `bytes` of seeded data at a seeded place of every VM's disk, through the host (NBD). */
async function writeAll(vms, socket, bytes, seed) {
  await forEachBounded(vms, 8, async (vm) => {
    const nbd = await NbdClient.connect({ socket, exportName: vm.disks[0].export });
    const at = (((seed + vm.n) * 2654435761) % (DISK / bytes)) * bytes;
    await nbd.write(at, seeded(seed + vm.n, bytes));
    await nbd.flush();
    await nbd.close();
  });
}

const max = (xs) => xs.reduce((m, x) => (x === null || x === undefined ? m : Math.max(m ?? 0, x)), null);
const ms = (v) => (v === null || v === undefined ? '—' : `${v.toFixed(v < 10 ? 1 : 0)} ms`);
const rows = [];
try {
  for (const n of COUNTS) {
    const dir = path.join(work, `n${n}`);
    const store = path.join(dir, 'store');
    const { child, api } = await startHostProcess(store);
    try {
      const socket = path.join(dir, 'nbd.sock');
      const setupStart = performance.now();
      const vms = [];
      await forEachBounded(
        Array.from({ length: n }, (_, i) => i),
        4,
        async (i) => {
          const name = `vm${String(i).padStart(4, '0')}`;
          await api.createVm({ name, disks: [{ slot: 'scsi0-0', size: DISK }] });
          vms.push({ ...(await api.startVm(name)), n: i });
        },
      );
      vms.sort((a, b) => a.n - b.n);
      await writeAll(vms, socket, 256 * KiB, 1);
      const repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * KiB });
      const names = vms.map((v) => v.name);
      const full = await runBackupSet({ host: api, repo, vms: names, consistency: 'crash' });
      if (!full.ok) throw new Error(`full backup: ${full.errors.slice(0, 3).join('; ')}`);
      console.log(
        `${n} VMs: set up in ${((performance.now() - setupStart) / 1000).toFixed(1)} s (full backup ${(full.durationMs / 1000).toFixed(1)} s)`,
      );
      let seed = 2;
      for (const f of FLOWS) {
        await writeAll(vms, socket, 64 * KiB, seed++);
        const before = (await api.hostInfo()).snapshotsTaken;
        const s = await runBackupSet({
          host: api,
          repo,
          vms: names,
          flow: f.flow,
          vmParallel: f.vmParallel,
          consistency: 'crash',
        });
        if (!s.ok) throw new Error(`${f.name}: ${s.errors.slice(0, 3).join('; ')}`);
        const taken = (await api.hostInfo()).snapshotsTaken - before;
        const recoveries = s.vms.map((v) => v.autoRecoveryMs).filter((x) => x !== null);
        const row = {
          vms: n,
          flow: f.name,
          snapshots: s.snapshots,
          hostSnapshots: taken,
          wallMs: s.durationMs,
          orchestrationPerVmMs: (s.durationMs - s.phases.dataMs) / n,
          dataMs: s.phases.dataMs,
          longestIoPauseMs: max([...s.vms.map((v) => v.ioPauseMs), s.phases.snapshotHoldMs]),
          longestFreezeMs: max(s.vms.map((v) => v.freezeWindowMs)),
          autoRecoveryPerVmMs: recoveries.length ? recoveries.reduce((a, b) => a + b, 0) / recoveries.length : null,
          phases: s.phases,
        };
        rows.push(row);
        console.log(
          `  ${f.name.padEnd(12)} ${String(row.snapshots).padStart(4)} snapshot(s), ${(row.wallMs / 1000).toFixed(2)} s, orchestration ${ms(row.orchestrationPerVmMs)}/VM, data ${ms(row.dataMs)} (phases: ${Object.entries(
            s.phases,
          )
            .map(([k, v]) => `${k.replace(/Ms$/, '')} ${ms(v)}`)
            .join(', ')})`,
        );
      }
      await repo.close();
    } finally {
      child.kill('SIGTERM');
      await new Promise((r) => (child.exitCode !== null ? r() : child.once('exit', r)));
    }
  }

  console.log(
    '\n| VMs | flow | storage snapshots | wall | vs 2016 | orchestration / VM | data phase | longest I/O pause | longest freeze | auto-recovery / VM |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    const base = rows.find((x) => x.vms === r.vms && x.flow === '2016');
    console.log(
      `| ${r.vms} | ${r.flow} | ${r.snapshots} | ${(r.wallMs / 1000).toFixed(2)} s | ${base ? `${(r.wallMs / base.wallMs).toFixed(2)}×` : '—'} | ${ms(r.orchestrationPerVmMs)} | ${(r.dataMs / 1000).toFixed(2)} s | ${ms(r.longestIoPauseMs)} | ${ms(r.longestFreezeMs)} | ${ms(r.autoRecoveryPerVmMs)} |`,
    );
  }
  console.log('\nGoals (2016 flow):');
  for (const r of rows.filter((x) => x.flow === '2016')) {
    console.log(
      `  ${r.vms} VMs: ${r.snapshots} storage snapshot(s) (goal 1: ${r.snapshots === 1 && r.hostSnapshots === 1 ? 'met' : 'MISSED'}), orchestration ${ms(r.orchestrationPerVmMs)}/VM (goal ≤ 20 ms${r.vms === 800 ? '' : ', set at 800 VMs'}: ${r.orchestrationPerVmMs <= 20 ? 'met' : 'MISSED'})`,
    );
    const serial = rows.find((x) => x.vms === r.vms && x.flow === '2016-serial');
    if (serial)
      console.log(
        `  ${r.vms} VMs: data phase parallel/serial ${(r.dataMs / serial.dataMs).toFixed(2)} (${(r.dataMs / 1000).toFixed(2)} s against ${(serial.dataMs / 1000).toFixed(2)} s)`,
      );
  }
  if (process.env.BENCH_JSON) console.log(JSON.stringify(rows));
} finally {
  rmSync(work, { recursive: true, force: true });
}
