/**
 * The phases only the 2012 R2 flow has (HYPERV-BACKUP-MODEL.md §1.2):
 *   requireScsi         a check at preflight: the snapshot's disk is hot-added to the guest, which only SCSI
 *                       supports, so a VM without a SCSI controller fails before anything is done to it;
 *   writerMetadata      the writer's metadata names the checkpoint files the snapshot will hold before they exist:
 *                       a GUID name per disk, generated up front, of the disk's format (`.avhdx`; `.avhd` for a
 *                       legacy VHD disk, whose checkpoint makes a VHD differencing child);
 *   lineUpFiles         once the checkpoint made them, each GUID name lined up with the file that appeared, which
 *                       must be of the format named;
 *   guestAutoRecovery   the auto-recovery inside the VM: every disk of the batch hot-added to its guest (an overlay
 *                       over the snapshot), recovered by the guest, hot-removed (guest-recovery.ts, and the host's
 *                       hot-plug routes); the data phase reads what the recovery changed from the overlays.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import { forEachBounded } from '../util/bounded.js';
import { GuestMount } from './guest-recovery.js';
import { bound, isOk, timed, type BatchStep, type PreflightCheck } from './phases.js';
import { describeError } from '../util/describe-error.js';
import type { VmState } from './run-types.js';

/** A VM without a SCSI controller: refused, saying to add one (hot-add needs SCSI, as in Hyper-V). */
export const requireScsi: PreflightCheck = (vm) => {
  if (vm.scsiControllers > 0) return;
  throw new TidemarkError(
    'CONFLICT',
    `${vm.name} has no SCSI controller: the 2012 R2 flow hot-adds the snapshot's disk to the guest, which only ` +
      `SCSI supports: add a SCSI controller to the VM (tidemark vm set ${vm.name} --scsi-controllers 1, with the VM off) or back it up with --flow 2016`,
  );
};

/** The extension of a disk's checkpoint file, by the disk's format: Hyper-V's `.avhdx`, and `.avhd` for a VHD. */
export const checkpointExtension = (format: 'vhdx' | 'vhd'): '.avhdx' | '.avhd' =>
  format === 'vhd' ? '.avhd' : '.avhdx';

/**
 * Per disk of every VM of the batch, the GUID name the writer's metadata gives its checkpoint file before it
 * exists, in the disk's format (`{GUID}.avhdx`, `{GUID}.avhd` for a legacy VHD disk).
 */
export const writerMetadata: BatchStep = async (run, batch) => {
  for (const s of batch.ready) {
    s.summary.guidNames = s.disks.map((d) => ({
      slot: d.slot,
      name: `${randomUUID().toUpperCase()}${checkpointExtension(d.format)}`,
      file: null,
    }));
    run.log(
      `${s.name}: writer metadata names ${s.disks.length} file(s) that do not exist yet: ` +
        s.summary.guidNames.map((g) => `${g.slot} ${g.name}`).join(', '),
    );
  }
};

/**
 * Each GUID name lined up with the checkpoint file the checkpoint made (the disk's head now). The file must be of
 * the format the name said (`.avhdx` or `.avhd`): a name that does not match the file is an error, not lined up.
 * A VM that fails here leaves the batch before its storage snapshot, its recovery checkpoint deleted (merged back).
 */
export const lineUpFiles: BatchStep = async (run, batch) => {
  await forEachBounded(batch.ready, bound(run), async (s) => {
    try {
      const vm = await run.opts.host.showVm(s.name);
      for (const g of s.summary.guidNames ?? []) {
        const head = vm.disks.find((d) => d.slot === g.slot)?.head;
        if (!head || !/\.avhdx?$/i.test(head))
          throw new TidemarkError('CONFLICT', `${s.name} ${g.slot}: no checkpoint file appeared for ${g.name}`);
        const named = path.extname(g.name).toLowerCase();
        const made = path.extname(head).toLowerCase();
        if (made !== named)
          throw new TidemarkError(
            'CONFLICT',
            `${s.name} ${g.slot}: the writer's metadata named ${g.name} (a ${named} file), but the checkpoint made ` +
              `${path.basename(head)} (a ${made} file): the disk's format is not the one the name was given for`,
          );
        g.file = head;
      }
      run.log(`${s.name}: ${(s.summary.guidNames ?? []).map((g) => `${g.name} is ${g.file}`).join(', ')}`);
    } catch (err) {
      run.fail(s, err);
      await run.opts.host
        .deleteCheckpoint(s.name, s.checkpoint!.id, { lease: run.leases.lease(s.name) })
        .catch((e) => run.log(`${s.name}: cleanup: ${describeError(e)}`));
    }
  });
  batch.ready = batch.ready.filter(isOk);
  return batch.ready.length > 0;
};

/**
 * The auto-recovery inside the VM: every disk of the batch hot-added to its guest over an overlay of the snapshot,
 * recovered there, hot-removed; a disk the recovery changed is read from its overlay in full (no tracking id
 * describes it), the others from the snapshot.
 */
export const guestAutoRecovery: BatchStep = async (run, batch) => {
  const live = batch.ready.filter(isOk);
  if (live.length === 0 || !batch.set) return;
  const set = batch.set;
  const names = new Set(live.map((s) => s.name));
  const { opts, leases, log } = run;
  await timed(run, 'autoRecoveryMs', async () => {
    const started = performance.now();
    let mount: GuestMount;
    try {
      mount = await GuestMount.prepare(
        set.exports.filter((e) => names.has(e.vm)),
        { nbd: run.nbdTarget, tlsDir: opts.nbdTlsDir, parallel: bound(run), log },
      );
    } catch (err) {
      for (const s of live) run.fail(s, err);
      return;
    }
    batch.cleanups.push(() =>
      mount.close().catch((e) => {
        run.errors.push(`auto-recovery clean-up: ${describeError(e)}`);
      }),
    );
    const notes = new Map<VmState, string[]>();
    await forEachBounded(live, bound(run), async (s) => {
      const note: string[] = [];
      notes.set(s, note);
      const lease = leases.lease(s.name);
      try {
        for (const d of s.disks) {
          const plug = await opts.host.hotPlug(s.name, { source: mount.source(s.name, d.slot), recover: true, lease });
          try {
            note.push(`${d.slot}: ${plug.note}`);
          } finally {
            await opts.host.hotUnplug(s.name, plug.id, lease);
          }
          if (plug.attached) note.push(`${d.slot}: hot-removed`);
        }
      } catch (err) {
        run.fail(s, err);
      }
    });
    try {
      await mount.serve();
    } catch (err) {
      for (const s of live) run.fail(s, err);
      return;
    }
    const ms = performance.now() - started;
    for (const s of live) {
      const note = notes.get(s) ?? [];
      for (const d of s.disks) {
        const bytes = mount.changedBytes(s.name, d.slot);
        if (bytes === 0) continue;
        note.push(`${d.slot}: the recovery changed ${bytes} bytes of the disk`);
        s.recovered ??= new Map();
        s.recovered.set(
          d.slot,
          `auto-recovery inside the VM changed ${bytes} bytes of the disk: its content is the recovered file system, which no change-tracking id describes`,
        );
      }
      s.summary.autoRecoveryMs = ms;
      s.summary.autoRecovery = note.join('; ');
      log(`${s.name}: auto-recovery inside the VM in ${ms.toFixed(0)} ms: ${s.summary.autoRecovery}`);
    }
    // Disks the recovery changed are read from their overlays; the others from the snapshot, as it holds them.
    const target = { socket: mount.socket };
    const exports = set.exports.map((e) => ({ ...e, export: mount.exportOf(e.vm, e.slot) ?? e.export }));
    const snapshotTarget = run.nbdTarget;
    batch.read = {
      set: { ...set, exports },
      target: snapshotTarget,
      targetOf: (vm, slot) => (mount.exportOf(vm, slot) ? target : snapshotTarget),
    };
  });
};
