/**
 * The pure parts of the VM runtime: the QEMU command line built from a definition (table-tested), the
 * KVM/TCG choice, socket paths that fit in sun_path, and the definition's migration from version 1.
 */
import { describe, expect, it } from 'vitest';
import { chooseAccel, hardwareVirtualization, type AccelProbe } from '../../src/host/accel.js';
import { migrateDefinition, VmDefinition } from '../../src/host/definition.js';
import { blockdevArg, diskDevice, escapeOpt, qemuArgs, type LaunchSpec } from '../../src/host/qemu-command.js';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MAX_SOCKET_PATH, runtimeFiles, VmRuntime } from '../../src/host/vm-runtime.js';

const base: LaunchSpec = {
  name: 'vm1',
  uuid: '8d6f0e2c-1111-4222-8333-944455556666',
  generation: 2,
  memoryMiB: 256,
  cpus: 2,
  scsiControllers: 1,
  boot: { kind: 'kernel', kernel: '/img/vmlinux', initrd: '/img/initrd.img', append: 'console=ttyS0' },
  disks: [{ slot: 'scsi0-0', export: 'vm1/scsi0-0' }],
  nbd: { type: 'unix', path: '/store/nbd.sock' },
  reconnectDelay: 60,
  accel: 'tcg',
  qmpSocket: '/store/vms/vm1/qmp.sock',
  guestSocket: '/store/vms/vm1/qga.sock',
  consoleLog: '/store/vms/vm1/console.log',
  uefi: null,
  incoming: false,
};

/** The value following each occurrence of `opt`. */
function values(args: string[], opt: string): string[] {
  return args.flatMap((a, i) => (a === opt ? [args[i + 1]] : []));
}

describe('qemuArgs', () => {
  it('generation 2 with a kernel: q35, TCG, memory, vCPUs, paused start, QMP, console, agent, NBD disk', () => {
    const a = qemuArgs(base);
    expect(values(a, '-machine')).toEqual(['q35']);
    expect(values(a, '-accel')).toEqual(['tcg,tb-size=64']);
    expect(values(a, '-cpu')).toEqual(['max']);
    expect(values(a, '-m')).toEqual(['256M']);
    expect(values(a, '-smp')).toEqual(['2']);
    expect(a).toContain('-S');
    expect(a).toContain('-nodefaults');
    expect(values(a, '-kernel')).toEqual(['/img/vmlinux']);
    expect(values(a, '-initrd')).toEqual(['/img/initrd.img']);
    expect(values(a, '-append')).toEqual(['console=ttyS0']);
    expect(values(a, '-chardev')).toEqual([
      'socket,id=qmp0,path=/store/vms/vm1/qmp.sock,server=on,wait=off',
      'file,id=console0,path=/store/vms/vm1/console.log,append=on',
      'socket,id=qga0,path=/store/vms/vm1/qga.sock,server=on,wait=off',
    ]);
    expect(values(a, '-mon')).toEqual(['chardev=qmp0,mode=control']);
    expect(values(a, '-serial')).toEqual(['chardev:console0']);
    expect(values(a, '-blockdev')).toEqual([
      'driver=nbd,node-name=disk-scsi0-0,server.type=unix,server.path=/store/nbd.sock,export=vm1/scsi0-0,reconnect-delay=60',
    ]);
    expect(values(a, '-device')).toEqual([
      'pvpanic',
      'virtio-scsi-pci,id=scsi0',
      'virtio-serial-pci,id=vser0',
      'virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0',
      'scsi-hd,drive=disk-scsi0-0,bus=scsi0.0,scsi-id=0,lun=0,id=dev-scsi0-0',
    ]);
    expect(a).not.toContain('-incoming');
  });

  it('generation 1: i440fx, IDE on its built-in channels, KVM with the host CPU, no agent channel when none', () => {
    const a = qemuArgs({
      ...base,
      generation: 1,
      accel: 'kvm',
      scsiControllers: 0,
      guestSocket: null,
      disks: [
        { slot: 'ide0-0', export: 'vm1/ide0-0' },
        { slot: 'ide1-1', export: 'vm1/ide1-1' },
      ],
    });
    expect(values(a, '-machine')).toEqual(['pc']);
    expect(values(a, '-accel')).toEqual(['kvm']);
    expect(values(a, '-cpu')).toEqual(['host']);
    expect(values(a, '-device')).toEqual([
      'pvpanic',
      'ide-hd,drive=disk-ide0-0,bus=ide.0,unit=0,id=dev-ide0-0',
      'ide-hd,drive=disk-ide1-1,bus=ide.1,unit=1,id=dev-ide1-1',
    ]);
    expect(a.join(' ')).not.toContain('guest_agent');
  });

  it('firmware boot: UEFI pflash for generation 2 (refused without OVMF), BIOS for generation 1', () => {
    const uefi = qemuArgs({
      ...base,
      boot: { kind: 'firmware' },
      uefi: { code: '/usr/share/OVMF/OVMF_CODE_4M.fd', vars: '/store/vms/vm1/uefi-vars.fd' },
    });
    expect(values(uefi, '-drive')).toEqual([
      'if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd',
      'if=pflash,format=raw,unit=1,file=/store/vms/vm1/uefi-vars.fd',
    ]);
    expect(uefi).not.toContain('-kernel');
    expect(() => qemuArgs({ ...base, boot: { kind: 'firmware' } })).toThrow(/OVMF/);
    const bios = qemuArgs({ ...base, generation: 1, boot: { kind: 'firmware' } });
    expect(bios).not.toContain('-drive');
    expect(bios).not.toContain('-kernel');
  });

  it('restoring a saved state waits for migrate-incoming; TCP NBD servers; commas escaped', () => {
    expect(values(qemuArgs({ ...base, incoming: true }), '-incoming')).toEqual(['defer']);
    expect(blockdevArg('scsi1-5', 'a,b/scsi1-5', { type: 'inet', host: '127.0.0.1', port: 10809 }, 5)).toBe(
      'driver=nbd,node-name=disk-scsi1-5,server.type=inet,server.host=127.0.0.1,server.port=10809,export=a,,b/scsi1-5,reconnect-delay=5',
    );
    expect(escapeOpt('/a,b,,c')).toBe('/a,,b,,,,c');
    const a = qemuArgs({ ...base, name: 'x,y', qmpSocket: '/s,1/qmp.sock' });
    expect(values(a, '-name')).toEqual(['guest=x,,y,debug-threads=on']);
    expect(values(a, '-chardev')[0]).toBe('socket,id=qmp0,path=/s,,1/qmp.sock,server=on,wait=off');
  });

  it('refuses what the VM cannot have', () => {
    const cases: [Partial<LaunchSpec>, RegExp][] = [
      [{ disks: [{ slot: 'ide0-0', export: 'x' }] }, /generation 2 VM: it has no IDE controller/],
      [{ disks: [{ slot: 'scsi1-0', export: 'x' }] }, /1 SCSI controller\(s\): scsi1-0 needs controller 1/],
      [{ memoryMiB: 8 }, /memory must be at least 16 MiB/],
      [{ cpus: 0 }, /vCPUs must be 1–64/],
      [{ scsiControllers: 5 }, /SCSI controllers must be 0–4/],
    ];
    for (const [patch, re] of cases) expect(() => qemuArgs({ ...base, ...patch })).toThrow(re);
    expect(diskDevice({ generation: 2, scsiControllers: 4, name: 'v' }, 'scsi3-63')).toMatchObject({
      bus: 'scsi3.0',
      'scsi-id': 63,
    });
  });
});

describe('chooseAccel', () => {
  const probe = (opens: boolean, flags: string): AccelProbe => ({
    kvmOpens: () => opens,
    cpuinfo: () => `processor\t: 0\nflags\t\t: fpu vme ${flags} sse2\n`,
  });
  const table: [string, boolean, string, string, string | RegExp][] = [
    ['auto', true, 'vmx', 'kvm', /vmx/],
    ['auto', true, 'svm', 'kvm', /svm/],
    ['auto', true, '', 'tcg', /neither vmx nor svm/], // /dev/kvm opens on a CPU without virtualisation: ~100× slower
    ['auto', false, 'vmx', 'tcg', /cannot be opened/],
    ['tcg', true, 'vmx', 'tcg', /requested/],
    ['kvm', true, 'vmx', 'kvm', /vmx/],
  ];
  it.each(table)('%s with /dev/kvm opening=%s and flags "%s" → %s', (req, opens, flags, accel, reason) => {
    const c = chooseAccel(req as 'auto', probe(opens, flags));
    expect(c.accel).toBe(accel);
    expect(c.reason).toMatch(reason);
  });
  it('kvm requested where it is unusable is NOT_SUPPORTED; an unknown request is INVALID_ARGUMENT', () => {
    expect(() => chooseAccel('kvm', probe(true, ''))).toThrow(expect.objectContaining({ code: 'NOT_SUPPORTED' }));
    expect(() => chooseAccel('xen' as 'kvm', probe(true, 'vmx'))).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    );
    expect(hardwareVirtualization('flags : vmxx svmm\n')).toBeNull();
  });
});

describe('runtime files', () => {
  it('keeps sockets in the VM folder, or under the store run folder when the path would not fit in sun_path', () => {
    const f = runtimeFiles('/s/vms/a', '/s/run', '8d6f0e2c-1111-4222-8333-944455556666', null);
    expect(f.qmp).toBe('/s/vms/a/qmp.sock');
    expect(f.guest).toBe('/s/vms/a/qga.sock');
    const long = '/' + 'x'.repeat(100) + '/vms/a';
    const g = runtimeFiles(long, '/s/run', '8d6f0e2c-1111-4222-8333-944455556666', null);
    expect(g.qmp).toBe('/s/run/8d6f0e2c1111.qmp');
    expect(g.guest).toBe('/s/run/8d6f0e2c1111.qga');
    expect(g.console).toBe(`${long}/console.log`);
    expect(runtimeFiles('/s/vms/a', '/s/run', 'id', 'unix:/tmp/agent.sock').guest).toBe('/tmp/agent.sock');
    expect(() => runtimeFiles(long, '/' + 'y'.repeat(MAX_SOCKET_PATH), 'id', null)).toThrow(/longer than 107 bytes/);
  });
});

describe('definition version 1 → 2', () => {
  it('reads an older definition with the defaults: no boot source, SCSI controllers for its slots', () => {
    const v1 = {
      schemaVersion: 1,
      id: 'x',
      name: 'old',
      generation: 1,
      configVersion: '9.0',
      checkpointPolicy: 'production-fallback',
      guest: null,
      state: 'Running',
      createdAt: '2024-01-01T00:00:00.000Z',
      disks: [
        { slot: 'ide0-0', base: 'disks/a.vhdx', head: 'disks/a.vhdx', virtualDiskId: 'a', virtualSize: 1 << 20 },
        { slot: 'scsi2-1', base: 'disks/b.vhdx', head: 'disks/b.vhdx', virtualDiskId: 'b', virtualSize: 1 << 20 },
      ],
      checkpoints: [],
      currentCheckpointId: null,
      referencePoints: [],
      pending: null,
    };
    const d = VmDefinition.parse(migrateDefinition(v1));
    expect(d).toMatchObject({
      schemaVersion: 2,
      memoryMiB: 512,
      cpus: 1,
      scsiControllers: 3,
      boot: null,
      image: null,
      accel: 'auto',
      state: 'Running',
    });
    expect(VmDefinition.parse(migrateDefinition({ ...v1, generation: 2, disks: [] })).scsiControllers).toBe(1);
    expect(VmDefinition.safeParse({ ...d, scsiControllers: 5 }).success).toBe(false);
  });
});

describe('adoption without a QEMU', () => {
  it('a pid file of a process that ended is a crash nobody watched: reported, files removed, the VM Off', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'tm-adopt-'));
    try {
      const warnings: string[] = [];
      const rt = new VmRuntime({
        dir,
        runDir: path.join(dir, 'run'),
        name: 'gone',
        id: '11111111-2222-3333-4444-555555555555',
        log: { info: () => undefined, warn: (m) => warnings.push(m) },
      });
      // A pid that cannot be alive (beyond pid_max) and the files a host left.
      writeFileSync(rt.files.runtime, JSON.stringify({ pid: 2 ** 30, qmp: rt.files.qmp }));
      writeFileSync(rt.files.pid, `${2 ** 30}\n`);
      expect(await rt.adopt()).toBe('Off');
      expect(rt.lastExit).toMatchObject({
        reason: 'crash',
        detail: expect.stringMatching(/ended while no host was watching/),
      });
      expect(warnings.some((w) => w.includes('gone: QEMU'))).toBe(true);
      expect(existsSync(rt.files.runtime)).toBe(false);
      expect(existsSync(rt.files.pid)).toBe(false);
      // A saved state makes it Saved instead; nothing at all is Off without a report.
      writeFileSync(rt.files.savedState, 'state');
      writeFileSync(rt.files.savedInfo, '{}');
      const saved = new VmRuntime({ ...rt.opts });
      expect(await saved.adopt()).toBe('Saved');
      expect(saved.lastExit).toBeNull();
      await saved.dropSavedState();
      expect(saved.state).toBe('Off');
      expect(existsSync(rt.files.savedState)).toBe(false);
      // Operations that need a QEMU say so.
      await expect(saved.pause()).rejects.toMatchObject({ code: 'CONFLICT' });
      await expect(saved.save()).rejects.toMatchObject({ code: 'CONFLICT' });
      expect(await saved.stop()).toEqual({ by: 'already-off', ms: 0 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
