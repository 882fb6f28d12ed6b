/**
 * Image locks between a running host and QEMU's tools, both ways (issue 13): while the host runs a VM,
 * qemu-io cannot write its disk (QEMU's own "Failed to get "write" lock", the file unchanged), qemu-img
 * info needs -U, qemu-nbd refuses to export it writable, and an offline `tidemark vhdx write` or `rct
 * status` is refused naming the host. While qemu-nbd exports a disk, `tidemark vhdx write`, `rct seal` and
 * starting the VM that uses it are refused with LOCKED naming qemu-nbd; once it exits they all work.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { TidemarkError } from '../../src/errors.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { requirePeers, run, sha256File, tempDir } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const BIN = path.join(REPO_ROOT, 'bin', 'tidemark.js');
const peers = requirePeers('qemu-io', 'qemu-img', 'qemu-nbd');

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let running: RunningHost;
let api: HostClient;
let input: string;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('host-locks'));
  store = path.join(dir, 'store');
  running = await startHost({ store, log: HostLog.silent() });
  api = await HostClient.connect({ store });
  input = path.join(dir, 'input.bin');
  writeFileSync(input, Buffer.alloc(64 * 1024, 0x5a));
});
afterAll(async () => {
  await running?.close();
  await cleanup?.();
});

/** `tidemark ARGS` as a person runs it (the built CLI), without blocking the host this process runs. */
async function tm(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const status = await new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  return { status, stdout, stderr };
}

function lockedBytes(file: string): number {
  const ino = statSync(file).ino;
  return readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .filter((l) => new RegExp(`:${ino} `).test(l)).length;
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await gone;
}

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe.skipIf(peers.skip)('image locks between a host and QEMU', () => {
  it("a running VM's disk: QEMU's tools refuse to write it, info needs -U, offline tidemark names the host", async () => {
    const vm = await api.createVm({ name: 'held', disks: [{ slot: 'scsi0-0', size: 16 * MiB }] });
    await api.startVm('held');
    const file = vm.disks[0].head;
    const before = await sha256File(file);

    const io = await run('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0xcd 0 64k', file], { allowFail: true });
    expect(io.code).not.toBe(0);
    expect(io.stderr).toMatch(/Failed to get "write" lock/);
    expect(io.stderr).toMatch(/Is another process using the image/);

    const info = await run('qemu-img', ['info', '-f', 'vhdx', file], { allowFail: true });
    expect(info.code).not.toBe(0);
    expect(info.stderr).toMatch(/Failed to get shared "write" lock/);
    const shared = await run('qemu-img', ['info', '-U', '-f', 'vhdx', file]);
    expect(shared.stdout).toMatch(/virtual size: 16 MiB/);

    const nbd = await run('qemu-nbd', ['-f', 'vhdx', '-k', path.join(dir, 'refused.sock'), file], {
      allowFail: true,
      timeoutMs: 30_000,
    });
    expect(nbd.code).not.toBe(0);
    expect(nbd.stderr).toMatch(/Failed to get "write" lock/);

    const host = `held by tidemark host (pid ${process.pid}, store ${store}): stop the VM or use the host's API`;
    const w = await tm(['vhdx', 'write', file, '--offset', '0', '--input', input]);
    expect(w.status).toBe(6);
    expect(w.stderr).toBe(`tidemark: LOCKED: cannot open ${file} for writing: failed to get "write" lock: ${host}\n`);
    const s = await tm(['rct', 'status', file]);
    expect(s.status).toBe(6);
    expect(s.stderr).toBe(
      `tidemark: LOCKED: cannot open ${file} for reading: failed to get shared "write" lock: ${host}\n`,
    );
    expect(await sha256File(file)).toBe(before);

    // Stopped, the disk is free again.
    await api.stopVm('held');
    expect(lockedBytes(file)).toBe(0);
    const ok = await run('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0xcd 0 64k', file]);
    expect(ok.stdout).toMatch(/wrote 65536\/65536/);
  });

  it('a disk qemu-nbd exports: vhdx write, rct seal and vm start are refused naming qemu-nbd, then work', async () => {
    const vm = await api.createVm({ name: 'exported', disks: [{ slot: 'scsi0-0', size: 16 * MiB }] });
    const file = vm.disks[0].head;
    const before = await sha256File(file);
    const rctBefore = await sha256File(`${file}.rct`);
    const q = spawn('qemu-nbd', ['-f', 'vhdx', '-k', path.join(dir, 'nbd.sock'), file], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 500 && lockedBytes(file) === 0; i++) await sleep(20);
      expect(lockedBytes(file)).toBeGreaterThan(0);
      const holder = `held by qemu-nbd (pid ${q.pid})`;

      const w = await tm(['vhdx', 'write', file, '--offset', '0', '--input', input]);
      expect(w.status).toBe(6);
      expect(w.stderr).toBe(
        `tidemark: LOCKED: cannot open ${file} for writing: failed to get "write" lock: ${holder}\n`,
      );
      const seal = await tm(['rct', 'seal', file]);
      expect(seal.status).toBe(6);
      expect(seal.stderr).toMatch(new RegExp(`^tidemark: LOCKED: .*${esc(holder)}\\n$`));

      const refused = await api.startVm('exported').then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(refused).toBeInstanceOf(TidemarkError);
      expect((refused as TidemarkError).code).toBe('LOCKED');
      expect((refused as TidemarkError).message).toBe(
        `cannot open ${file} for reading: failed to get shared "write" lock: ${holder}`,
      );
      const cli = await tm(['vm', 'start', 'exported', '--store', store]);
      expect(cli.status).toBe(6);
      expect(cli.stderr).toMatch(new RegExp(`^tidemark: LOCKED: .*${esc(holder)}\\n$`));
      expect((await api.showVm('exported')).state).toBe('Off');
      expect(await sha256File(file)).toBe(before);
      expect(await sha256File(`${file}.rct`)).toBe(rctBefore);
    } finally {
      await stop(q);
    }

    const w = await tm(['vhdx', 'write', file, '--offset', '0', '--input', input]);
    expect(w.status, w.stderr).toBe(0);
    const seal = await tm(['rct', 'seal', file]);
    expect(seal.status, seal.stderr).toBe(0);
    expect((await api.startVm('exported')).state).toBe('Running');
    await api.stopVm('exported');
  });
});
