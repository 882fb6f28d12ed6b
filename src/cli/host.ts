/**
 * `tidemark host` (the daemon) and its clients: `vm`, `checkpoint`, `refpoint`, `disk`. The clients reach
 * a running host through `--store DIR` (its host.json) or TIDEMARK_HOST (+ TIDEMARK_TOKEN).
 */
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { HostClient } from '../api/client.js';
import { CONVERT_DISK_TARGETS } from '../api/schemas.js';
import { TidemarkError } from '../errors.js';
import { CONFIG_VERSIONS, DEFAULT_CONFIG_VERSION } from '../host/config-version.js';
import { describeOwner, OWNER_NAME, type ReferencePointOwner } from '../host/definition.js';
import type { NewDisk } from '../host/host.js';
import { HostLog } from '../host/log.js';
import { isLoopback } from '../nbd/index.js';
import { formatSize, parseSize } from '../util/size.js';
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
    .option('--nbd-bind <addr>', 'address for --nbd-port (anything but loopback without --nbd-tls-dir is warned)')
    .option(
      '--nbd-tls-dir <dir>',
      "require TLS with client certificates on the host's NBD: ca-cert.pem, server-cert.pem, server-key.pem, and client-cert.pem, client-key.pem for the VMs' QEMU",
    )
    .option('--api-port <n>', 'serve the API on loopback TCP instead of STORE/api.sock')
    .option(
      '--allow-disk-dir <dir>',
      'a directory VM disks may be attached from, besides the store (repeatable; give them at every start)',
      collect,
    )
    .option(
      '--accel <a>',
      'how VMs run: auto (KVM when /dev/kvm opens and the CPU has vmx/svm, else TCG) | kvm | tcg',
      'auto',
    )
    .option('--qemu <path>', 'the QEMU binary (default qemu-system-x86_64)')
    .option(
      '--reconnect-delay <s>',
      "seconds a guest's disk I/O waits for the host to come back (NBD reconnect-delay)",
      '60',
    )
    .action((o) =>
      run(async () => {
        if (!['auto', 'kvm', 'tcg'].includes(o.accel)) {
          throw new TidemarkError('INVALID_ARGUMENT', `--accel must be auto, kvm or tcg, not "${o.accel}"`);
        }
        const reconnectDelay = Number(o.reconnectDelay);
        if (!Number.isInteger(reconnectDelay) || reconnectDelay < 0 || reconnectDelay > 3600) {
          throw new TidemarkError(
            'INVALID_ARGUMENT',
            `--reconnect-delay must be 0–3600 seconds, not "${o.reconnectDelay}"`,
          );
        }
        // Loaded here: the other commands of this module are API clients and need none of the host's stack.
        const { startHost } = await import('../daemon/daemon.js');
        const running = await startHost({
          qemu: { accel: o.accel, binary: o.qemu, reconnectDelay },
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
function nbdListen(o: { socket?: string; nbdPort?: string; nbdBind?: string; nbdTlsDir?: string }): {
  socket?: string;
  port?: number;
  host?: string;
  tlsDir?: string;
} {
  const tlsDir = o.nbdTlsDir !== undefined ? path.resolve(o.nbdTlsDir) : undefined;
  if (o.nbdPort === undefined) {
    if (o.nbdBind !== undefined) throw new TidemarkError('INVALID_ARGUMENT', '--nbd-bind needs --nbd-port');
    return { socket: o.socket, tlsDir };
  }
  if (o.socket !== undefined)
    throw new TidemarkError('INVALID_ARGUMENT', '--socket cannot be combined with --nbd-port');
  const port = Number(o.nbdPort);
  if (!/^\d+$/.test(o.nbdPort) || port > 65535) {
    throw new TidemarkError('INVALID_ARGUMENT', `--nbd-port ${o.nbdPort} is not a TCP port`);
  }
  const host = o.nbdBind ?? '127.0.0.1';
  if (!isLoopback(host) && tlsDir === undefined) {
    process.stderr.write(
      `tidemark: warning: serving NBD without TLS on ${host}: anyone who can reach it can read and write the VMs' disks (give --nbd-tls-dir, or keep it on loopback or the unix socket)\n`,
    );
  }
  return { port, host, tlsDir };
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
    .option('--guest <address>', 'the guest-agent channel, unix:PATH (default: wired automatically when QEMU runs it)')
    .option(
      '--image <dir>',
      'boot the guest image in DIR (tidemark guest-image build): its vmlinux, initrd.img, command line',
    )
    .option('--workload <w>', 'with --image: sqlite | shell | none (default sqlite)')
    .option('--kernel <file>', 'boot this kernel directly (instead of --image)')
    .option('--initrd <file>', 'with --kernel: its initrd')
    .option('--append <cmdline>', 'with --kernel: its command line')
    .option('--firmware', 'boot from the disks through the firmware (BIOS; UEFI for generation 2)')
    .option('--memory <size>', 'memory, e.g. 512M or 2G (default 512M)')
    .option('--cpus <n>', 'virtual CPUs (default 1)')
    .option('--scsi-controllers <n>', 'SCSI controllers, 0–4 (default 1 for generation 2, 0 for generation 1)')
    .option('--accel <a>', "auto | kvm | tcg (default: the host's --accel)")
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, o) =>
      run(async () => {
        const bootSources = [o.image, o.kernel, o.firmware].filter((x) => x !== undefined && x !== false).length;
        if (bootSources > 1)
          throw new TidemarkError('INVALID_ARGUMENT', 'give one of --image, --kernel and --firmware');
        if ((o.initrd !== undefined || o.append !== undefined) && o.kernel === undefined) {
          throw new TidemarkError('INVALID_ARGUMENT', '--initrd and --append go with --kernel');
        }
        const boot =
          o.kernel !== undefined
            ? {
                kind: 'kernel' as const,
                kernel: path.resolve(o.kernel),
                initrd: o.initrd ? path.resolve(o.initrd) : null,
                append: o.append ?? null,
              }
            : o.firmware
              ? { kind: 'firmware' as const }
              : undefined;
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
          image: o.image === undefined ? undefined : path.resolve(o.image),
          workload: o.workload,
          boot,
          memoryMiB: o.memory === undefined ? undefined : mebibytes(o.memory),
          cpus: o.cpus === undefined ? undefined : intOption('--cpus', o.cpus),
          scsiControllers:
            o.scsiControllers === undefined ? undefined : intOption('--scsi-controllers', o.scsiControllers),
          accel: o.accel,
        });
        if (o.json) printJson(r);
        else {
          println(`created ${r.name} (${r.id}) with ${r.disks.length} disk(s)`);
          println(
            `  ${r.memoryMiB} MiB, ${r.cpus} vCPU(s), ${r.scsiControllers} SCSI controller(s), boot ${describeBoot(r.boot)}`,
          );
        }
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
        println(
          `${v.memoryMiB} MiB, ${v.cpus} vCPU(s), ${v.scsiControllers} SCSI controller(s), boot ${describeBoot(v.boot)}`,
        );
        if (v.qemu?.pid)
          println(
            `QEMU pid ${v.qemu.pid} (${v.qemu.accel}: ${v.qemu.accelReason}); QMP ${v.qemu.qmp}; console ${v.qemu.console}`,
          );
        if (v.lastExit) println(`last exit ${v.lastExit.at}: ${v.lastExit.reason} (${v.lastExit.detail})`);
        if (v.lease) {
          println(
            `leased by run ${v.lease.owner.runId} ("${v.lease.owner.command}", pid ${v.lease.owner.pid} on ${v.lease.owner.hostname}) since ${v.lease.acquiredAt}${v.lease.expiresAt ? `, expires ${v.lease.expiresAt} unless renewed` : ''}`,
          );
        }
        for (const d of v.disks) {
          println(
            `  ${d.slot}: ${d.head}${d.head !== d.base ? ` (base ${d.base})` : ''} ${d.format.toUpperCase()} id ${d.virtualDiskId} tracking ${d.tracking}${d.trackingReason ? ` (${d.trackingReason})` : ''}${d.nbdUri ? ` ${d.nbdUri}` : ''}`,
          );
        }
        println(`${v.checkpoints} checkpoint(s), ${v.referencePoints} reference point(s)`);
      }),
    );
  const verbs = {
    start: 'start: launch QEMU when the VM has a boot source (restoring a saved state), else export its disks over NBD',
    stop: "stop: the guest shuts down (guest agent, then ACPI, then quit); the disks' exports close",
    save: "save: the VM's memory and device state to its folder, QEMU ends (Saved); start restores it",
    pause: 'pause the running guest',
    resume: 'resume a paused guest',
  } as const;
  for (const verb of Object.keys(verbs) as (keyof typeof verbs)[]) {
    const cmd = vm.command(verb).description(verbs[verb]).argument('<name>');
    if (verb === 'stop') {
      cmd.option('--turn-off', 'pull the plug: QEMU quits at once, the guest does not shut down');
      cmd.option('--force', 'stop even while NBD clients other than the VM itself have its disks open');
    }
    cmd
      .option(...storeOption)
      .option('--json', 'print JSON')
      .action((name: string, o) =>
        run(async () => {
          const c = await client(o);
          const v =
            verb === 'start'
              ? await c.startVm(name)
              : verb === 'stop'
                ? await c.stopVm(name, !!o.turnOff, !!o.force)
                : verb === 'save'
                  ? await c.saveVm(name)
                  : verb === 'pause'
                    ? await c.pauseVm(name)
                    : await c.resumeVm(name);
          if (o.json) return printJson(v);
          println(`${v.name}: ${v.state}`);
          if (v.qemu?.pid)
            println(`  QEMU pid ${v.qemu.pid} (${v.qemu.accel}); console: tidemark vm console ${v.name}`);
          for (const d of v.disks) if (d.nbdUri) println(`  ${d.slot}: ${d.nbdUri}`);
        }),
      );
  }
  vm.command('console')
    .description("the VM's serial console log (follows it until Ctrl-C unless --no-follow)")
    .argument('<name>')
    .option('--no-follow', 'print what is there and exit')
    .option('--tail <bytes>', 'start this many bytes before the end')
    .option(...storeOption)
    .action((name: string, o) =>
      run(async () => {
        const c = await client(o);
        let offset = 0;
        if (o.tail !== undefined)
          offset = Math.max(0, (await c.readConsole(name, 0, 0)).size - intOption('--tail', o.tail));
        let stop = false;
        process.once('SIGINT', () => (stop = true));
        for (;;) {
          const r = await c.readConsole(name, offset, 1 << 20);
          if (r.data) process.stdout.write(r.data);
          offset = r.offset;
          if (r.offset < r.size) continue;
          if (!o.follow || stop) return;
          await new Promise((res) => setTimeout(res, 250));
          if (stop) return;
        }
      }),
    );
  const disk = vm.command('disk').description("a VM's disks: SCSI disks hot-plug while it runs; IDE needs it off");
  disk
    .command('attach')
    .argument('<name>')
    .argument('<slot>', 'e.g. scsi0-1')
    .argument('[path]', 'an existing VHDX')
    .option('--size <size>', 'a new dynamic VHDX of this size instead')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, slot: string, file: string | undefined, o) =>
      run(async () => {
        if ((file === undefined) === (o.size === undefined))
          throw new TidemarkError('INVALID_ARGUMENT', 'give a PATH or --size');
        const d: NewDisk = file !== undefined ? { slot, path: path.resolve(file) } : { slot, size: o.size };
        const v = await (await client(o)).modifyVm(name, { attach: [d] });
        if (o.json) return printJson(v);
        const a = v.disks.find((x) => x.slot === slot);
        println(`${name}: attached ${slot}${v.qemu?.pid ? ' (hot-plugged)' : ''}${a?.nbdUri ? ` ${a.nbdUri}` : ''}`);
      }),
    );
  disk
    .command('detach')
    .argument('<name>')
    .argument('<slot>')
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, slot: string, o) =>
      run(async () => {
        const v = await (await client(o)).modifyVm(name, { detach: [slot] });
        if (o.json) return printJson(v);
        println(`${name}: detached ${slot}${v.qemu?.pid ? ' (hot-unplugged)' : ''}`);
      }),
    );
  vm.command('set')
    .argument('<name>')
    .option('--checkpoint-policy <p>', 'production-fallback | production-only | standard-only | disabled')
    .option('--config-version <v>', 'raise the configuration version (the VM off; never lowered)')
    .option('--guest <address>', 'the guest-agent channel, unix:PATH ("none" removes it)')
    .option('--attach <slot:path>', 'attach an existing VHDX (repeatable)', collect)
    .option('--attach-new <slot:size>', 'attach a new VHDX (repeatable)', collect)
    .option('--detach <slot>', 'detach a disk (repeatable)', collect)
    .option(
      '--scsi-controllers <n>',
      'SCSI controllers, 0–4 (the VM off; Add-VMScsiController / Remove-VMScsiController)',
    )
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
          scsiControllers:
            o.scsiControllers === undefined ? undefined : intOption('--scsi-controllers', o.scsiControllers),
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
        for (const d of v.disks)
          println(`  ${d.slot}: tracking ${d.tracking}${d.trackingReason ? ` (${d.trackingReason})` : ''}`);
      }),
    );
  vm.command('convert-disks')
    .description(
      "Convert-VHD: the VM's legacy VHD disks become VHDX beside them (the VM off, no checkpoints); with a configuration version from 6.2 they are tracked",
    )
    .argument('<name>')
    .requiredOption('--to <format>', `the format to convert to (${CONVERT_DISK_TARGETS.join(', ')})`)
    .option(...storeOption)
    .option('--json', 'print JSON')
    .action((name: string, o) =>
      run(async () => {
        if (!(CONVERT_DISK_TARGETS as readonly string[]).includes(o.to)) {
          throw new TidemarkError(
            'INVALID_ARGUMENT',
            `--to ${o.to}: disks convert to ${CONVERT_DISK_TARGETS.join(', ')} only (a VM moves off legacy VHD, never back)`,
          );
        }
        const r = await (await client(o)).convertDisks(name, { to: o.to });
        if (o.json) return printJson(r);
        for (const c of r.converted)
          println(
            `${name} ${c.slot}: ${c.from} → ${c.to} (${formatSize(c.virtualSize)} virtual, ${formatSize(c.bytesWritten)} written)`,
          );
        for (const s of r.skipped) println(`${name} ${s.slot}: ${s.file} skipped (${s.reason})`);
        if (r.converted.length === 0) {
          println(`${name}: no VHD disk to convert`);
          return;
        }
        if (r.tracking) println(`${name}: change tracking on (configuration version ${r.vm.configVersion})`);
        else
          println(
            `${name}: configuration version ${r.vm.configVersion} has no change tracking: tidemark vm upgrade ${name} turns it on`,
          );
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
            `${'  '.repeat(depth(c.parentId))}${c.current ? '* ' : '  '}${c.name} (${c.id.slice(0, 8)}) ${c.type} ${c.consistency} ${c.createdAt} pause ${ms(c.ioPauseMs)} freeze ${ms(c.freezeWindowMs)}${c.memoryState ? ' +memory' : ''}${c.run ? ` run ${c.run.runId}` : ''}`,
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
          // A standard checkpoint with memory leaves the VM Saved: say what the next start does.
          if (verb === 'apply' && (await c.showVm(vmName)).state === 'Saved')
            println(`${vmName} is Saved with the checkpoint's memory: vm start ${vmName} resumes it`);
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

function describeBoot(b: { kind: 'kernel'; kernel: string } | { kind: 'firmware' } | null): string {
  if (!b) return 'none (vm start exports the disks only)';
  return b.kind === 'kernel' ? `kernel ${b.kernel}` : 'firmware';
}

function mebibytes(v: string): number {
  const bytes = /^\d+$/.test(v) ? Number(v) * 2 ** 20 : parseSize(v);
  if (bytes % 2 ** 20 !== 0) throw new TidemarkError('INVALID_ARGUMENT', `--memory must be whole MiB, not ${v}`);
  return bytes / 2 ** 20;
}

function intOption(name: string, v: string): number {
  if (!/^\d+$/.test(v)) throw new TidemarkError('INVALID_ARGUMENT', `${name} must be a whole number, not "${v}"`);
  return Number(v);
}

function ms(v: number | null): string {
  return v === null ? 'n/a' : `${v.toFixed(1)} ms`;
}
