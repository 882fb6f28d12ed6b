/**
 * `tidemark host` (the daemon) and its clients: `vm`, `checkpoint`, `refpoint`, `disk`. The clients reach
 * a running host through `--store DIR` (its host.json) or TIDEMARK_HOST (+ TIDEMARK_TOKEN).
 */
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { HostClient } from '../api/client.js';
import { TidemarkError } from '../errors.js';
import { CONFIG_VERSIONS, DEFAULT_CONFIG_VERSION } from '../host/config-version.js';
import { describeOwner, OWNER_NAME, type ReferencePointOwner } from '../host/definition.js';
import type { NewDisk } from '../host/host.js';
import { HostLog } from '../host/log.js';
import { isLoopback } from '../nbd/index.js';
import { formatSize } from '../util/size.js';
import { printJson, println } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

const storeOption = ['--store <dir>', "the host's store directory (or set TIDEMARK_HOST)"] as const;

function client(o: { store?: string }): Promise<HostClient> {
  return HostClient.connect({ store: o.store });
}

function parseDisk(spec: string, kind: 'path' | 'size'): NewDisk {
  const i = spec.indexOf(':');
  if (i <= 0)
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `disk "${spec}" must be SLOT:${kind === 'path' ? 'PATH' : 'SIZE'}, e.g. scsi0-0:${kind === 'path' ? 'disk.vhdx' : '8G'}`,
    );
  const slot = spec.slice(0, i);
  const value = spec.slice(i + 1);
  // A path is the caller's: relative to where the command runs, not to the host.
  return kind === 'path' ? { slot, path: path.resolve(value) } : { slot, size: value };
}

/** `--owner NAME`, or the name of the user running the command. */
function userOwner(name: string | undefined): ReferencePointOwner {
  const n = name ?? os.userInfo().username;
  if (!OWNER_NAME.test(n)) {
    throw new TidemarkError('INVALID_ARGUMENT', `--owner must be 1–100 printable characters, not "${n}"`);
  }
  return { kind: 'user', name: n };
}

const collect = (v: string, prev: string[] = []) => [...prev, v];

export function hostCommand(run: Run): Command {
  return new Command('host')
    .description('run the host: VM store, NBD exports of running VMs, checkpoints, management API')
    .requiredOption('--store <dir>', 'the store directory (created if missing)')
    .option('--socket <path>', 'NBD unix socket, created mode 0600 (default STORE/nbd.sock)')
    .option('--nbd-port <n>', 'serve NBD on loopback TCP instead')
    .option('--nbd-bind <addr>', 'address for --nbd-port (anything but loopback serves the disks without TLS: warned)')
    .option('--api-port <n>', 'serve the API on loopback TCP instead of STORE/api.sock')
    .option(
      '--allow-disk-dir <dir>',
      'a directory VM disks may be attached from, besides the store (repeatable; give them at every start)',
      collect,
    )
    .action((o) =>
      run(async () => {
        // Loaded here: the other commands of this module are API clients and need none of the host's stack.
        const { startHost } = await import('../host/daemon.js');
        const running = await startHost({
          store: o.store,
          nbd: nbdListen(o),
          apiPort: o.apiPort !== undefined ? Number(o.apiPort) : undefined,
          allowDiskDirs: ((o.allowDiskDir as string[] | undefined) ?? []).map((d) => path.resolve(d)),
          log: new HostLog(),
        });
        running.host.log.info(`host ready: api ${running.endpoint}, nbd ${JSON.stringify(running.host.nbd.address())}`);
        await new Promise<void>((resolve) => {
          const stop = () => resolve();
          process.once('SIGINT', stop);
          process.once('SIGTERM', stop);
        });
        running.host.log.info('shutting down: flushing and closing disks');
        await running.close();
      }),
    );
}

/** The host's NBD listener from its options: a unix socket, or TCP on loopback unless --nbd-bind says otherwise. */
function nbdListen(o: { socket?: string; nbdPort?: string; nbdBind?: string }): {
  socket?: string;
  port?: number;
  host?: string;
} {
  if (o.nbdPort === undefined) {
    if (o.nbdBind !== undefined) throw new TidemarkError('INVALID_ARGUMENT', '--nbd-bind needs --nbd-port');
    return { socket: o.socket };
  }
  if (o.socket !== undefined)
    throw new TidemarkError('INVALID_ARGUMENT', '--socket cannot be combined with --nbd-port');
  const port = Number(o.nbdPort);
  if (!/^\d+$/.test(o.nbdPort) || port > 65535) {
    throw new TidemarkError('INVALID_ARGUMENT', `--nbd-port ${o.nbdPort} is not a TCP port`);
  }
  const host = o.nbdBind ?? '127.0.0.1';
  if (!isLoopback(host)) {
    process.stderr.write(
      `tidemark: warning: serving NBD without TLS on ${host}: anyone who can reach it can read and write the VMs' disks (the host's NBD has no TLS: keep it on loopback or the unix socket)\n`,
    );
  }
  return { port, host };
}

export function vmCommand(run: Run): Command {
  const vm = new Command('vm').description('virtual machines of a running host');
  vm.command('create')
    .argument('<name>')
    .option('--disk <slot:path>', 'attach an existing VHDX (repeatable)', collect)
    .option('--new-disk <slot:size>', 'create a new dynamic VHDX (repeatable)', collect)
    .option(
      '--config-version <v>',
      `configuration version: ${CONFIG_VERSIONS.join(', ')} (default ${DEFAULT_CONFIG_VERSION}; RCT needs 6.2 or later)`,
    )
    .option('--generation <n>', '1 or 2', '2')
    .option('--checkpoint-policy <p>', 'production-fallback | production-only | standard-only | disabled')
    .option('--guest <address>', 'the guest-agent channel, unix:PATH')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, o) =>
      run(async () => {
        const disks = [
          ...((o.disk as string[] | undefined) ?? []).map((s) => parseDisk(s, 'path')),
          ...((o.newDisk as string[] | undefined) ?? []).map((s) => parseDisk(s, 'size')),
        ];
        const c = await client(o);
        const r = await c.createVm({
          name,
          disks,
          configVersion: o.configVersion,
          generation: Number(o.generation) as 1 | 2,
          checkpointPolicy: o.checkpointPolicy,
          guest: o.guest,
        });
        if (o.json) printJson(r);
        else println(`created ${r.name} (${r.id}) with ${r.disks.length} disk(s)`);
      }),
    );
  vm.command('list')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((o) =>
      run(async () => {
        const vms = await (await client(o)).listVms();
        if (o.json) return printJson(vms);
        if (vms.length === 0) return println('no VMs');
        for (const v of vms) {
          println(
            `${v.name.padEnd(20)} ${v.state.padEnd(8)} gen ${v.generation}  v${v.configVersion}  ${v.disks.length} disk(s)  ${v.checkpoints} checkpoint(s)`,
          );
        }
      }),
    );
  vm.command('show')
    .argument('<name>')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, o) =>
      run(async () => {
        const v = await (await client(o)).showVm(name);
        if (o.json) return printJson(v);
        println(`${v.name} (${v.id}): ${v.state}, generation ${v.generation}, configuration ${v.configVersion}`);
        println(`checkpoint policy ${v.checkpointPolicy}; guest ${v.guest ?? 'none'}`);
        if (v.lease) {
          println(
            `leased by run ${v.lease.owner.runId} ("${v.lease.owner.command}", pid ${v.lease.owner.pid} on ${v.lease.owner.hostname}) since ${v.lease.acquiredAt}${v.lease.expiresAt ? `, expires ${v.lease.expiresAt} unless renewed` : ''}`,
          );
        }
        for (const d of v.disks) {
          println(
            `  ${d.slot}: ${d.head}${d.head !== d.base ? ` (base ${d.base})` : ''} id ${d.virtualDiskId} tracking ${d.tracking}${d.export ? ` export ${d.export}` : ''}`,
          );
        }
        println(`${v.checkpoints} checkpoint(s), ${v.referencePoints} reference point(s)`);
      }),
    );
  for (const verb of ['start', 'stop'] as const) {
    vm.command(verb)
      .argument('<name>')
      .option(...storeOption)
      .option('--json', 'print JSON')
      .action((name: string, o) =>
        run(async () => {
          const c = await client(o);
          const v = verb === 'start' ? await c.startVm(name) : await c.stopVm(name);
          if (o.json) return printJson(v);
          println(`${v.name}: ${v.state}`);
          for (const d of v.disks) if (d.export) println(`  ${d.slot}: nbd export ${d.export}`);
        }),
      );
  }
  vm.command('set')
    .argument('<name>')
    .option('--checkpoint-policy <p>', 'production-fallback | production-only | standard-only | disabled')
    .option('--config-version <v>', 'raise the configuration version (the VM off; never lowered)')
    .option('--guest <address>', 'the guest-agent channel, unix:PATH ("none" removes it)')
    .option('--attach <slot:path>', 'attach an existing VHDX (repeatable)', collect)
    .option('--attach-new <slot:size>', 'attach a new VHDX (repeatable)', collect)
    .option('--detach <slot>', 'detach a disk (repeatable)', collect)
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, o) =>
      run(async () => {
        const v = await (
          await client(o)
        ).modifyVm(name, {
          checkpointPolicy: o.checkpointPolicy,
          configVersion: o.configVersion,
          guest: o.guest === undefined ? undefined : o.guest === 'none' ? null : o.guest,
          attach: [
            ...((o.attach as string[] | undefined) ?? []).map((s) => parseDisk(s, 'path')),
            ...((o.attachNew as string[] | undefined) ?? []).map((s) => parseDisk(s, 'size')),
          ],
          detach: o.detach,
        });
        if (o.json) return printJson(v);
        println(`${v.name} updated`);
      }),
    );
  vm.command('upgrade')
    .description('Update-VMVersion: raise the configuration version (the VM off); from 6.2 on, tracking starts')
    .argument('<name>')
    .option('--version <v>', `the version to move to (default: the host's default, ${DEFAULT_CONFIG_VERSION})`)
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, o) =>
      run(async () => {
        const v = await (await client(o)).upgradeVm(name, { version: o.version });
        if (o.json) return printJson(v);
        println(`${v.name}: configuration version ${v.configVersion}`);
        for (const d of v.disks) println(`  ${d.slot}: tracking ${d.tracking}`);
      }),
    );
  vm.command('delete')
    .argument('<name>')
    .option('--remove-files', 'also delete its disks and checkpoints')
    .option(...storeOption)
    .action((name: string, o) =>
      run(async () => {
        await (await client(o)).deleteVm(name, !!o.removeFiles);
        println(`deleted ${name}`);
      }),
    );
  return vm;
}

export function checkpointCommand(run: Run): Command {
  const cp = new Command('checkpoint').description('live checkpoints on differencing disks');
  cp.command('create')
    .argument('<vm>')
    .option('--type <t>', "recovery | production | standard (default: by the VM's policy)")
    .option('--name <n>', 'a name')
    .option('--consistency <c>', 'for recovery checkpoints: application | crash', 'application')
    .option('--require-consistency', 'fail instead of falling back to crash consistency')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((vmName: string, o) =>
      run(async () => {
        const c = await (
          await client(o)
        ).createCheckpoint(vmName, {
          type: o.type,
          name: o.name,
          consistency: o.consistency,
          requireConsistency: !!o.requireConsistency,
        });
        if (o.json) return printJson(c);
        println(
          `checkpoint "${c.name}" (${c.id}): ${c.type}, ${c.consistency}-consistent (${c.consistencyNote}); I/O pause ${ms(c.ioPauseMs)}, freeze window ${ms(c.freezeWindowMs)}`,
        );
        for (const d of c.disks) println(`  ${d.slot}: ${d.rctId ?? 'no change tracking id'}`);
      }),
    );
  cp.command('list')
    .argument('<vm>')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((vmName: string, o) =>
      run(async () => {
        const list = await (await client(o)).listCheckpoints(vmName);
        if (o.json) return printJson(list);
        if (list.length === 0) return println('no checkpoints');
        const depth = (id: string | null): number => {
          const c = list.find((x) => x.id === id);
          return c ? 1 + depth(c.parentId) : 0;
        };
        for (const c of list) {
          println(
            `${'  '.repeat(depth(c.parentId))}${c.current ? '* ' : '  '}${c.name} (${c.id.slice(0, 8)}) ${c.type} ${c.consistency} ${c.createdAt} pause ${ms(c.ioPauseMs)} freeze ${ms(c.freezeWindowMs)}${c.run ? ` run ${c.run.runId}` : ''}`,
          );
        }
      }),
    );
  for (const verb of ['apply', 'delete'] as const) {
    cp.command(verb)
      .argument('<vm>')
      .argument('<checkpoint>', 'name or id')
      .option(...storeOption)
      .action((vmName: string, name: string, o) =>
        run(async () => {
          const c = await client(o);
          if (verb === 'apply') await c.applyCheckpoint(vmName, name);
          else await c.deleteCheckpoint(vmName, name);
          println(`${verb === 'apply' ? 'applied' : 'deleted'} checkpoint ${name} of ${vmName}`);
        }),
      );
  }
  return cp;
}

export function refpointCommand(run: Run): Command {
  const rp = new Command('refpoint').description('reference points: sealed change-tracking ids kept for incrementals');
  rp.command('convert')
    .argument('<vm>')
    .argument('<checkpoint>', 'a recovery checkpoint (name or id)')
    .option('--owner <name>', 'who the reference point belongs to (default: your user name)')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((vmName: string, cp: string, o) =>
      run(async () => {
        const owner = userOwner(o.owner);
        const r = await (await client(o)).convertToReferencePoint(vmName, cp, { owner });
        if (o.json) return printJson(r);
        println(`reference point ${r.id} (owner ${describeOwner(r.owner)})`);
      }),
    );
  rp.command('create')
    .argument('<vm>')
    .option('--owner <name>', 'who the reference point belongs to (default: your user name)')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((vmName: string, o) =>
      run(async () => {
        const owner = userOwner(o.owner);
        const r = await (await client(o)).createReferencePoint(vmName, { owner });
        if (o.json) return printJson(r);
        println(`reference point ${r.id} (owner ${describeOwner(r.owner)})`);
      }),
    );
  rp.command('list')
    .argument('<vm>')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((vmName: string, o) =>
      run(async () => {
        const list = await (await client(o)).listReferencePoints(vmName);
        if (o.json) return printJson(list);
        if (list.length === 0) return println('no reference points');
        for (const r of list) {
          println(
            `${r.id} ${r.createdAt} owner ${describeOwner(r.owner ?? null)}${r.consistency ? ` ${r.consistency}` : ''}`,
          );
          r.virtualDiskIdentifiers.forEach((d, i) =>
            println(`  ${d}: ${r.resilientChangeTrackingIdentifiers[i] ?? 'none'}`),
          );
        }
      }),
    );
  rp.command('destroy')
    .argument('<vm>')
    .argument('<refpoint>')
    .option(...storeOption)
    .action((vmName: string, id: string, o) =>
      run(async () => {
        await (await client(o)).destroyReferencePoint(vmName, id);
        println(`destroyed reference point ${id}`);
      }),
    );
  return rp;
}

export function diskCommand(run: Run): Command {
  const disk = new Command('disk').description('image management of a running host');
  disk
    .command('changes')
    .description('GetVirtualDiskChanges: what changed since a sealed id')
    .argument('<vm>')
    .argument('<slot>', 'e.g. scsi0-0')
    .requiredOption('--since <id>', "a sealed change-tracking id (a reference point's)")
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((vmName: string, slot: string, o) =>
      run(async () => {
        const c = await client(o);
        const info = await c.showVm(vmName);
        const d = info.disks.find((x) => x.slot === slot);
        if (!d) throw new TidemarkError('NOT_FOUND', `${vmName} has no disk at ${slot}`);
        const { ranges, virtualDiskId } = await c.allChanges({
          vm: vmName,
          slot,
          limitId: o.since,
          length: d.virtualSize,
        });
        const total = ranges.reduce((s, r) => s + r.length, 0);
        if (o.json) return printJson({ virtualDiskId, since: o.since, ranges, totalBytes: total });
        for (const r of ranges) println(`${r.offset}\t${r.length}`);
        println(`${ranges.length} range(s), ${formatSize(total)} changed since ${o.since}`);
      }),
    );
  return disk;
}

function ms(v: number | null): string {
  return v === null ? 'n/a' : `${v.toFixed(1)} ms`;
}
