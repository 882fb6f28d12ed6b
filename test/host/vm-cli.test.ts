/**
 * The VM commands as a person runs them (compiled CLI against `tidemark host` in a child process), without
 * booting a guest (test/host/vm-runtime.test.ts boots one): `vm create --image` and its boot source, the JSON
 * shape, bad input refused with the documented exit statuses, a start that cannot work (an IDE slot on a
 * generation 2 VM; a kernel QEMU cannot load) leaving the VM Off with its exports closed, `vm console`.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { missingPeers, tempDir } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const BIN = path.join(REPO_ROOT, 'bin', 'tidemark.js');
const MAIN = path.join(REPO_ROOT, 'dist', 'cli', 'main.js');

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let image: string;
let host: ChildProcess | undefined;
let hostErr = '';

beforeAll(async () => {
  if (!existsSync(MAIN)) throw new Error(`${MAIN} is missing: build the CLI first (\`npm run build\`)`);
  ({ dir, cleanup } = await tempDir('vm-cli'));
  store = path.join(dir, 'store');
  // A stand-in guest image: the manifest and the two files `vm create --image` checks (not bootable).
  image = path.join(dir, 'image');
  await mkdir(image);
  await writeFile(path.join(image, 'vmlinux'), 'not a kernel');
  await writeFile(path.join(image, 'initrd.img'), 'not an initrd');
  await writeFile(
    path.join(image, 'manifest.json'),
    JSON.stringify({
      cmdline: 'console=ttyS0 loglevel=4 tidemark.workload=sqlite',
      workloads: ['sqlite', 'shell', 'none'],
    }),
  );
  host = spawn(process.execPath, [BIN, 'host', '--store', store, '--accel', 'tcg'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  host.stderr!.on('data', (d) => (hostErr += d));
  for (let i = 0; ; i++) {
    try {
      if (JSON.parse(await readFile(path.join(store, 'host.json'), 'utf8')).pid === host.pid) break;
    } catch {
      // not yet
    }
    if (host.exitCode !== null || i > 500) throw new Error(`host did not start: ${hostErr}`);
    await sleep(20);
  }
});
afterAll(async () => {
  if (host && host.exitCode === null) {
    const gone = new Promise((r) => host!.once('exit', r));
    host.kill('SIGTERM');
    await gone;
  }
  await cleanup?.();
});

function tidemark(args: string[]): { status: number | null; stderr: string; text: string } {
  const r = spawnSync(process.execPath, [BIN, ...args, '--store', store], {
    cwd: dir,
    env: { ...process.env, NO_COLOR: '1' },
  });
  if (r.error) throw r.error;
  return { status: r.status, stderr: r.stderr.toString(), text: r.stdout.toString() };
}
function ok(args: string[]) {
  const r = tidemark(args);
  expect(r.status, `tidemark ${args.join(' ')}: ${r.stderr}`).toBe(0);
  return r;
}
function fails(args: string[], status: number, code: string, words: RegExp) {
  const r = tidemark(args);
  expect(r.status, `tidemark ${args.join(' ')}: ${r.stderr}${r.text}`).toBe(status);
  expect(r.stderr).toMatch(new RegExp(`^tidemark: ${code}: `));
  expect(r.stderr).toMatch(words);
  expect(r.stderr.trim().split('\n')).toHaveLength(1);
}

describe('vm create with a boot source', () => {
  it('--image takes the kernel, initrd and command line (with the workload), memory and vCPUs', () => {
    const r = ok([
      'vm',
      'create',
      'g',
      '--image',
      image,
      '--workload',
      'none',
      '--memory',
      '300M',
      '--cpus',
      '2',
      '--new-disk',
      'scsi0-0:64M',
      '--json',
    ]);
    const v = JSON.parse(r.text);
    expect(v).toMatchObject({
      state: 'Off',
      memoryMiB: 300,
      cpus: 2,
      scsiControllers: 1,
      image,
      boot: {
        kind: 'kernel',
        kernel: path.join(image, 'vmlinux'),
        initrd: path.join(image, 'initrd.img'),
        append: 'console=ttyS0 loglevel=4 tidemark.workload=none',
      },
      lastExit: null,
    });
    expect(v.qemu.pid).toBeNull();
    expect(v.qemu.qmp).toBe(path.join(store, 'vms', 'g', 'qmp.sock'));
    expect(v.disks[0].nbdUri).toBeNull();
    const text = ok(['vm', 'show', 'g']).text;
    expect(text).toContain(`300 MiB, 2 vCPU(s), 1 SCSI controller(s), boot kernel ${path.join(image, 'vmlinux')}`);
    expect(text).toMatch(/ {2}scsi0-0: \S+\.vhdx VHDX id [0-9a-f-]{36} tracking enabled/);
    // Enough SCSI controllers for the disks it is made with.
    expect(
      JSON.parse(ok(['vm', 'create', 'wide', '--image', image, '--new-disk', 'scsi2-0:16M', '--json']).text)
        .scsiControllers,
    ).toBe(3);
    // A VM without a boot source says what start does for it.
    expect(ok(['vm', 'create', 'plain']).text).toContain('boot none (vm start exports the disks only)');
  });

  it('refuses bad input with one line and the documented status', () => {
    fails(['vm', 'create', 'x', '--image', path.join(dir, 'nothing')], 3, 'NOT_FOUND', /not a guest image/);
    fails(
      ['vm', 'create', 'x', '--image', image, '--workload', 'bitcoin'],
      2,
      'INVALID_ARGUMENT',
      /not one of the image's: sqlite, shell, none/,
    );
    fails(
      ['vm', 'create', 'x', '--image', image, '--kernel', path.join(image, 'vmlinux')],
      2,
      'INVALID_ARGUMENT',
      /one of --image, --kernel and --firmware/,
    );
    fails(['vm', 'create', 'x', '--image', image, '--memory', '1536K'], 2, 'INVALID_ARGUMENT', /whole MiB/);
    fails(['vm', 'create', 'x', '--image', image, '--cpus', '0'], 2, 'INVALID_ARGUMENT', /cpus/);
    fails(
      ['vm', 'create', 'x', '--image', image, '--scsi-controllers', '5'],
      2,
      'INVALID_ARGUMENT',
      /scsiControllers|SCSI controllers/,
    );
    fails(['vm', 'create', 'x', '--kernel', path.join(dir, 'no-kernel')], 3, 'NOT_FOUND', /does not exist/);
    fails(['vm', 'create', 'x', '--initrd', path.join(image, 'initrd.img')], 2, 'INVALID_ARGUMENT', /go with --kernel/);
    expect(tidemark(['vm', 'show', 'x']).status).toBe(3); // nothing was made
  });

  it('vm console of a VM that never ran prints nothing', () => {
    expect(ok(['vm', 'console', 'g', '--no-follow']).text).toBe('');
  });
});

describe.skipIf(missingPeers('qemu-system-x86_64'))('vm start that cannot work', () => {
  it('an IDE slot on a generation 2 VM is CONFLICT before QEMU runs; the VM stays Off, nothing exported', () => {
    ok(['vm', 'disk', 'attach', 'g', 'ide0-0', '--size', '16M']);
    fails(['vm', 'start', 'g'], 6, 'CONFLICT', /generation 2 VM: it has no IDE controller for ide0-0/);
    const v = JSON.parse(ok(['vm', 'show', 'g', '--json']).text);
    expect(v.state).toBe('Off');
    expect(v.disks.every((d: { export: string | null }) => d.export === null)).toBe(true);
    ok(['vm', 'disk', 'detach', 'g', 'ide0-0']);
  });

  it('a kernel QEMU cannot load is QEMU_FAILED quoting QEMU; the VM is Off and can be started again later', () => {
    fails(['vm', 'start', 'g'], 1, 'QEMU_FAILED', /QEMU ended at start .*(kernel|linux)/i);
    const v = JSON.parse(ok(['vm', 'show', 'g', '--json']).text);
    expect(v.state).toBe('Off');
    expect(v.qemu.pid).toBeNull();
    expect(v.disks[0].export).toBeNull();
    expect(v.definition.state).toBe('Off');
    // The failure left no QEMU files behind but the logs.
    expect(existsSync(path.join(store, 'vms', 'g', 'qemu.pid'))).toBe(false);
    expect(existsSync(path.join(store, 'vms', 'g', 'runtime.json'))).toBe(false);
    // Stopping a VM that is off is no error.
    expect(ok(['vm', 'stop', 'g']).text).toContain('g: Off');
  });
});
