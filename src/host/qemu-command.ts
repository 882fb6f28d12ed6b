/**
 * The QEMU command line of a VM, built from what its definition says (pure: same input, same argv).
 *
 * - Generation 1: `pc` (i440fx) with its two IDE channels (`ide0-L`, `ide1-L`) plus virtio-scsi controllers;
 *   generation 2: `q35`, SCSI only (as Hyper-V), UEFI firmware where OVMF is installed or direct kernel boot.
 * - Every disk is `-blockdev driver=nbd` on the host's own NBD server (export `VM/SLOT`) with
 *   `reconnect-delay`, so a host restart only delays the guest's I/O. SCSI location L is target L, LUN 0.
 * - The guest-agent channel (virtio-serial port `org.qemu.guest_agent.0`) and QMP are unix sockets QEMU
 *   listens on; the serial console goes to a log file (appended).
 * - QEMU starts paused (`-S`): the runtime connects to QMP before the guest runs a single instruction, so no
 *   event is missed, then continues it (or loads a saved state first: `-incoming defer`).
 * A `,` inside an option value is written `,,` (QEMU's escaping).
 */
import { TidemarkError } from '../errors.js';
import type { Accel } from './accel.js';

export interface KernelBoot {
  kind: 'kernel';
  kernel: string;
  initrd: string | null;
  append: string | null;
}

export interface FirmwareBoot {
  kind: 'firmware';
}

export type BootSource = KernelBoot | FirmwareBoot;

/** The host's NBD server as QEMU dials it; `tlsDir`: start TLS with QEMU's client credentials in that directory. */
export type NbdAddress = ({ type: 'unix'; path: string } | { type: 'inet'; host: string; port: number }) & {
  tlsDir?: string;
};

/** The id of the `tls-creds-x509` object the disks' `tls-creds` name. */
const NBD_TLS_OBJECT = 'nbd-tls';

export interface LaunchSpec {
  name: string;
  uuid: string;
  generation: 1 | 2;
  memoryMiB: number;
  cpus: number;
  /** virtio-scsi controllers scsi0..scsiN-1 */
  scsiControllers: number;
  boot: BootSource;
  disks: { slot: string; export: string }[];
  nbd: NbdAddress;
  /** seconds QEMU holds I/O while it reconnects to the NBD server */
  reconnectDelay: number;
  accel: Accel;
  qmpSocket: string;
  /** null: no guest-agent channel */
  guestSocket: string | null;
  consoleLog: string;
  /** OVMF code and this VM's own copy of the variable store (generation 2 with firmware boot) */
  uefi: { code: string; vars: string } | null;
  /** load a saved state through QMP `migrate-incoming` before continuing */
  incoming: boolean;
}

export interface SlotAddress {
  kind: 'ide' | 'scsi';
  controller: number;
  location: number;
}

export function parseSlot(slot: string): SlotAddress {
  const m = /^(ide|scsi)(\d+)-(\d+)$/.exec(slot);
  if (!m) throw new TidemarkError('INVALID_ARGUMENT', `slot "${slot}" is not ideC-L or scsiC-L`);
  return { kind: m[1] as 'ide' | 'scsi', controller: Number(m[2]), location: Number(m[3]) };
}

/** QMP/command-line names of a slot's block node and device. */
export function nodeName(slot: string): string {
  return `disk-${slot}`;
}
export function deviceId(slot: string): string {
  return `dev-${slot}`;
}

/** QEMU's option-value escaping: a ',' is written ',,'. */
export function escapeOpt(v: string): string {
  return v.replace(/,/g, ',,');
}

/** The `-blockdev` of one disk (also the shape `blockdev-add` takes over QMP, see `nbdBlockdev`). */
export function blockdevArg(slot: string, exportName: string, nbd: NbdAddress, reconnectDelay: number): string {
  const server =
    nbd.type === 'unix'
      ? `server.type=unix,server.path=${escapeOpt(nbd.path)}`
      : `server.type=inet,server.host=${escapeOpt(nbd.host)},server.port=${nbd.port}`;
  const tlsCreds = nbd.tlsDir !== undefined ? `,tls-creds=${NBD_TLS_OBJECT}` : '';
  return `driver=nbd,node-name=${nodeName(slot)},${server},export=${escapeOpt(exportName)}${tlsCreds},reconnect-delay=${reconnectDelay}`;
}

/** The same disk as a QMP `blockdev-add` argument. */
export function nbdBlockdev(
  slot: string,
  exportName: string,
  nbd: NbdAddress,
  reconnectDelay: number,
): Record<string, unknown> {
  return {
    driver: 'nbd',
    'node-name': nodeName(slot),
    server:
      nbd.type === 'unix' ? { type: 'unix', path: nbd.path } : { type: 'inet', host: nbd.host, port: String(nbd.port) },
    export: exportName,
    ...(nbd.tlsDir !== undefined ? { 'tls-creds': NBD_TLS_OBJECT } : {}),
    'reconnect-delay': reconnectDelay,
  };
}

/** The `-device` of one disk: IDE (generation 1 only) or SCSI target on a virtio-scsi controller. */
export function diskDevice(
  spec: Pick<LaunchSpec, 'generation' | 'scsiControllers' | 'name'>,
  slot: string,
): Record<string, string | number> {
  const a = parseSlot(slot);
  if (a.kind === 'ide') {
    if (spec.generation !== 1) {
      throw new TidemarkError(
        'CONFLICT',
        `${spec.name} is a generation 2 VM: it has no IDE controller for ${slot} (use a SCSI slot)`,
      );
    }
    if (a.controller > 1 || a.location > 1)
      throw new TidemarkError('INVALID_ARGUMENT', `IDE slot ${slot} does not exist (ide0-0..ide1-1)`);
    return {
      driver: 'ide-hd',
      drive: nodeName(slot),
      bus: `ide.${a.controller}`,
      unit: a.location,
      id: deviceId(slot),
    };
  }
  if (a.controller >= spec.scsiControllers) {
    throw new TidemarkError(
      'CONFLICT',
      `${spec.name} has ${spec.scsiControllers} SCSI controller(s): ${slot} needs controller ${a.controller}`,
    );
  }
  return {
    driver: 'scsi-hd',
    drive: nodeName(slot),
    bus: `scsi${a.controller}.0`,
    'scsi-id': a.location,
    lun: 0,
    id: deviceId(slot),
  };
}

function deviceArg(d: Record<string, string | number>): string {
  const { driver, ...rest } = d;
  return [
    String(driver),
    ...Object.entries(rest).map(([k, v]) => `${k}=${typeof v === 'string' ? escapeOpt(v) : v}`),
  ].join(',');
}

export function qemuArgs(spec: LaunchSpec): string[] {
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 16) {
    throw new TidemarkError('INVALID_ARGUMENT', `memory must be at least 16 MiB, not ${spec.memoryMiB} MiB`);
  }
  if (!Number.isInteger(spec.cpus) || spec.cpus < 1 || spec.cpus > 64) {
    throw new TidemarkError('INVALID_ARGUMENT', `vCPUs must be 1–64, not ${spec.cpus}`);
  }
  if (!Number.isInteger(spec.scsiControllers) || spec.scsiControllers < 0 || spec.scsiControllers > 4) {
    throw new TidemarkError('INVALID_ARGUMENT', `SCSI controllers must be 0–4, not ${spec.scsiControllers}`);
  }
  const args: string[] = [
    '-name',
    `guest=${escapeOpt(spec.name)},debug-threads=on`,
    '-uuid',
    spec.uuid,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-machine',
    spec.generation === 1 ? 'pc' : 'q35',
    ...(spec.accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg,tb-size=64', '-cpu', 'max']),
    '-m',
    `${spec.memoryMiB}M`,
    '-smp',
    String(spec.cpus),
    // A panicking guest reports GUEST_PANICKED (pvpanic) and then shuts down: the runtime records the crash.
    '-action',
    'panic=shutdown',
    '-device',
    'pvpanic',
    '-S',
    '-chardev',
    `socket,id=qmp0,path=${escapeOpt(spec.qmpSocket)},server=on,wait=off`,
    '-mon',
    'chardev=qmp0,mode=control',
    '-chardev',
    `file,id=console0,path=${escapeOpt(spec.consoleLog)},append=on`,
    '-serial',
    'chardev:console0',
  ];
  if (spec.boot.kind === 'kernel') {
    args.push('-kernel', spec.boot.kernel);
    if (spec.boot.initrd) args.push('-initrd', spec.boot.initrd);
    if (spec.boot.append) args.push('-append', spec.boot.append);
  } else if (spec.generation === 2) {
    if (!spec.uefi) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `${spec.name}: generation 2 firmware boot needs UEFI (OVMF): install ovmf, or give a kernel`,
      );
    }
    args.push(
      '-drive',
      `if=pflash,format=raw,unit=0,readonly=on,file=${escapeOpt(spec.uefi.code)}`,
      '-drive',
      `if=pflash,format=raw,unit=1,file=${escapeOpt(spec.uefi.vars)}`,
    );
  }
  for (let c = 0; c < spec.scsiControllers; c++) args.push('-device', `virtio-scsi-pci,id=scsi${c}`);
  if (spec.guestSocket) {
    args.push(
      '-chardev',
      `socket,id=qga0,path=${escapeOpt(spec.guestSocket)},server=on,wait=off`,
      '-device',
      'virtio-serial-pci,id=vser0',
      '-device',
      'virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0',
    );
  }
  if (spec.nbd.tlsDir !== undefined) {
    args.push('-object', `tls-creds-x509,id=${NBD_TLS_OBJECT},dir=${escapeOpt(spec.nbd.tlsDir)},endpoint=client`);
  }
  for (const d of spec.disks) {
    args.push('-blockdev', blockdevArg(d.slot, d.export, spec.nbd, spec.reconnectDelay));
    args.push('-device', deviceArg(diskDevice(spec, d.slot)));
  }
  if (spec.incoming) args.push('-incoming', 'defer');
  return args;
}
