/**
 * The data phase of one VM: per disk, the changes since the previous point's tracking id (or everything the
 * snapshot holds, and why) read from the snapshot's read-only NBD export, chunked, hashed and stored, with the
 * tracking audit of every incremental alongside.
 */
import { NbdClient } from '../nbd/client.js';
import { CONTEXT_BASE_ALLOCATION } from '../nbd/protocol.js';
import type { DiskEntry, VmEntry } from '../repository/index.js';
import { TidemarkError } from '../errors.js';
import { AUDIT_TIME_FLOOR_MS, AUDIT_TIME_SHARE, auditDisk, countDifferences, type AuditResult } from './audit.js';
import { chunksTouched, copyChunks, type Range } from './disk-reader.js';
import type { BackupSession, BackupSetOptions, DataPhase, NbdDial, VmState } from './run-types.js';
import type { SnapshotSetInfo } from '../api/schemas.js';

/** Reads every disk of one VM into the session; returns its manifest entry. */
export async function backupVm(
  opts: BackupSetOptions,
  data: DataPhase,
  s: VmState,
  set: SnapshotSetInfo,
  /** Where a disk's export is read. */
  nbdTarget: (slot: string) => NbdDial,
  session: BackupSession,
): Promise<VmEntry> {
  const disks: DiskEntry[] = [];
  for (const d of s.disks) {
    const exp = set.exports.find((e) => e.vm === s.name && e.slot === d.slot);
    if (!exp) throw new TidemarkError('NOT_FOUND', `the snapshot set has no export for ${s.name} ${d.slot}`);
    const cpDisk = s.checkpoint!.disks.find((x) => x.slot === d.slot)!;
    const prevDisk = s.previous?.vms.find((v) => v.name === s.name)?.disks.find((x) => x.diskId === d.virtualDiskId);
    // What to read: the changes since the previous point's id, or, when that cannot be proven, everything.
    let ranges: Range[];
    let fullReason: string | null = null;
    let base: DiskEntry['index'] | null = null;
    // The disk's own lack of tracking comes first: it is the reason every backup of it is full.
    if (!cpDisk.rctId)
      fullReason = d.trackingReason
        ? d.trackingReason
        : d.tracking === 'none'
          ? `the disk has no change tracking (configuration version ${s.configVersion}; tracking needs 6.2 or later)`
          : `the disk has no change tracking (its tracking files are missing; configuration version ${s.configVersion})`;
    else if (s.recovered?.has(d.slot)) fullReason = s.recovered.get(d.slot)!;
    else if (!prevDisk) fullReason = s.previous ? 'the disk is new since the previous restore point' : 'first backup';
    else if (!prevDisk.rctId) fullReason = 'the previous restore point has no change-tracking id for this disk';
    else if (prevDisk.virtualSize !== d.virtualSize) fullReason = 'the disk was resized';
    if (!fullReason) {
      try {
        ranges = (
          await opts.host.allChanges({ vm: s.name, slot: d.slot, limitId: prevDisk!.rctId!, length: d.virtualSize })
        ).ranges;
        base = prevDisk!.index;
      } catch (err) {
        if (!(err instanceof TidemarkError) || err.code !== 'MISSING_CHANGE_TRACKING_INFORMATION') throw err;
        fullReason = `change tracking refused the previous id: ${err.message}`;
      }
    }
    if (fullReason) {
      opts.events?.log?.(`${s.name} ${d.slot}: full read (${fullReason})`);
      // Everything, as the snapshot holds it: its own block status (below) skips what it does not hold. The live
      // disk's allocation is not the snapshot's: a block the guest trimmed after the checkpoint still holds the
      // checkpoint's data there, and must be read.
      ranges = [{ offset: 0, length: d.virtualSize }];
    }
    let writer = await session.openIndex({ virtualSize: d.virtualSize, base });
    const chunks = chunksTouched(ranges!, writer.chunkSize, d.virtualSize);
    // base:allocation: chunks the snapshot holds no data in are not read (pull mode, as libvirt's tools do).
    const nbd = await NbdClient.connect({
      ...nbdTarget(d.slot),
      exportName: exp.export,
      contexts: [CONTEXT_BASE_ALLOCATION],
    });
    const sizeOf = (list: number[]) =>
      list.reduce((n, c) => n + Math.min(writer.chunkSize, d.virtualSize - c * writer.chunkSize), 0);
    const copy = async (list: number[]) => {
      let done = 0;
      const total = sizeOf(list);
      await copyChunks(nbd, writer, list, {
        size: d.virtualSize,
        parallel: opts.readParallel,
        onProgress: (n) => opts.events?.progress?.(s.name, d.slot, (done += n), total),
      });
    };
    let audit: AuditResult | null = null;
    const passes = { bytesRead: 0, bytesNew: 0, bytesStored: 0 };
    try {
      // The audit runs alongside the reading of the changed chunks (it reads other slots of the same export);
      // once those are read, a sampled audit gets at most its time budget more.
      const copyStarted = performance.now();
      let copyEnded: number | null = null;
      let budget = 0;
      let abandon = false;
      const deadline = () => (abandon ? 0 : copyEnded === null ? Infinity : copyEnded + budget);
      const auditing =
        fullReason || data.audit.kind === 'off'
          ? null
          : auditDisk(nbd, writer.index, {
              mode: data.audit,
              seed: data.auditSeed,
              diskId: d.virtualDiskId,
              size: d.virtualSize,
              changed: chunks,
              hashId: (b) => opts.repo.hashId(b),
              parallel: opts.readParallel,
              deadline,
            }).then(
              (result) => ({ result }),
              (error: unknown) => ({ error }),
            );
      try {
        await copy(chunks);
      } catch (err) {
        abandon = true;
        await auditing;
        throw err;
      }
      copyEnded = performance.now();
      budget = opts.auditTimeMs ?? Math.max(AUDIT_TIME_FLOOR_MS, AUDIT_TIME_SHARE * (copyEnded - copyStarted));
      const settled = await auditing;
      if (settled && 'error' in settled) throw settled.error;
      if (settled) {
        audit = settled.result;
        if (audit.mode === 'sample') audit.timeBudgetMs = budget;
        opts.events?.log?.(`${s.name} ${d.slot}: ${describeAudit(audit)}`);
        if (audit.mismatches > 0) {
          // Tracking is distrusted for this disk in this run: every chunk read again from the same snapshot
          // into a fresh index (chunks stored by the first pass are not stored twice).
          fullReason = `tracking audit found a change at offset ${audit.firstMismatchOffset} that tracking missed`;
          opts.events?.log?.(`${s.name} ${d.slot}: TRACKING DISTRUSTED: ${fullReason}; reading the disk in full`);
          const first = writer.stats();
          passes.bytesRead += first.bytesRead;
          passes.bytesNew += first.bytesNew;
          passes.bytesStored += first.bytesStored;
          const previous = writer.index;
          writer = await session.openIndex({ virtualSize: d.virtualSize, base: null });
          await copy(Array.from({ length: writer.index.slotCount }, (_, i) => i));
          audit.missedChunks = countDifferences(writer.index, previous, chunks);
          data.warn(
            `${s.name} ${d.slot}: change tracking missed a change at offset ${audit.firstMismatchOffset}: ` +
              `${audit.missedChunks} of the ${audit.unchanged} chunks it called unchanged differ from restore point ${s.previous!.id}. ` +
              'This restore point read the disk in full and is exact; find what wrote the disk past the host ' +
              '(another program, a file put back or copied, a storage fault) before trusting its incrementals',
          );
        }
      }
    } finally {
      await nbd.close();
    }
    const index = await session.writeIndex(writer);
    const last = writer.stats();
    const stats = {
      bytesRead: passes.bytesRead + last.bytesRead,
      bytesNew: passes.bytesNew + last.bytesNew,
      bytesStored: passes.bytesStored + last.bytesStored,
    };
    // A disk the host's auto-recovery changed is recorded without an id (no later incremental builds on it).
    const rctId = s.recovered?.has(d.slot) ? null : cpDisk.rctId;
    const m = /^(ide|scsi)(\d)-(\d+)$/.exec(d.slot)!;
    disks.push({
      diskId: d.virtualDiskId,
      name: d.slot,
      controller: { bus: m[1] as 'ide' | 'scsi', controller: Number(m[2]), location: Number(m[3]) },
      virtualSize: d.virtualSize,
      logicalSectorSize: 512,
      blockSize: writer.chunkSize,
      // The source disk's format (a legacy VHD says so); a restore writes the format it is asked for.
      format: d.format,
      rctId,
      read: fullReason ? 'full' : 'incremental',
      fullReason,
      index,
      stats,
      audit,
    });
    s.summary.disks.push({
      slot: d.slot,
      diskId: d.virtualDiskId,
      read: fullReason ? 'full' : 'incremental',
      fullReason,
      rctId,
      bytesRead: stats.bytesRead,
      bytesNew: stats.bytesNew,
      bytesStored: stats.bytesStored,
      audit,
    });
    s.summary.bytesRead += stats.bytesRead;
    s.summary.bytesNew += stats.bytesNew;
    s.summary.bytesStored += stats.bytesStored;
  }
  return {
    name: s.name,
    id: s.id,
    definition: s.definition as VmEntry['definition'],
    consistency: s.checkpoint!.consistency,
    freezeWindowMs: s.checkpoint!.freezeWindowMs,
    ioPauseMs: s.checkpoint!.ioPauseMs,
    disks,
    referencePointId: s.referencePointId,
    consistencyNote: s.checkpoint!.consistencyNote,
  } as VmEntry;
}

/** One line about a disk's audit, for the run's log. */
export function describeAudit(a: AuditResult): string {
  const what = a.mode === 'full' ? 'every chunk' : `a sample of ${a.sampled}`;
  const outcome =
    a.mismatches > 0
      ? `MISMATCH at offset ${a.firstMismatchOffset}`
      : a.stoppedEarly
        ? `no mismatch; stopped at the time bound (${((a.timeBudgetMs ?? 0) / 1000).toFixed(1)} s) after ${a.checked} of ${a.sampled}`
        : 'no mismatch';
  return `tracking audit of ${what} of ${a.unchanged} unchanged chunks (seed ${a.seed}): ${a.checked} checked, ${outcome}, ${a.bytesRead} bytes read in ${a.timeMs.toFixed(0)} ms`;
}
