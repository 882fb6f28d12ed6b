/**
 * The boot source of a new VM, checked before anything is made: a guest image folder becomes its kernel, initrd
 * and command line (with the workload chosen); boot files must exist; memory, vCPUs and controllers are in range.
 */
import { access, readFile } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import type { BootDefinition } from './definition.js';

/** The fields of a VM request that say how it boots (vm-lifecycle.ts's CreateVmRequest extends it). */
export interface BootRequest {
  memoryMiB?: number;
  cpus?: number;
  scsiControllers?: number;
  boot?: BootDefinition | null;
  image?: string;
  workload?: string;
}

/** A VM has 0–4 SCSI controllers (Hyper-V's four; `vm create` and `vm set --scsi-controllers`). */
export function checkScsiControllers(n: number): number {
  if (!Number.isInteger(n) || n < 0 || n > 4) {
    throw new TidemarkError('INVALID_ARGUMENT', `SCSI controllers must be 0–4, not ${n}`);
  }
  return n;
}

/**
 * A VM made from a guest image boots its kernel and initrd with the image's command line (the
 * workload chosen); boot files must exist; memory, vCPUs and controllers are checked here, before anything is made.
 */
export async function resolveBoot<R extends BootRequest>(req: R): Promise<R> {
  const out: BootRequest = { ...req };
  if (
    out.memoryMiB !== undefined &&
    (!Number.isInteger(out.memoryMiB) || out.memoryMiB < 16 || out.memoryMiB > 1024 * 1024)
  ) {
    throw new TidemarkError('INVALID_ARGUMENT', `memory must be 16 MiB to 1 TiB, not ${out.memoryMiB} MiB`);
  }
  if (out.cpus !== undefined && (!Number.isInteger(out.cpus) || out.cpus < 1 || out.cpus > 64)) {
    throw new TidemarkError('INVALID_ARGUMENT', `vCPUs must be 1–64, not ${out.cpus}`);
  }
  if (out.scsiControllers !== undefined) checkScsiControllers(out.scsiControllers);
  if (out.image !== undefined) {
    if (out.boot) throw new TidemarkError('INVALID_ARGUMENT', 'give an image or a boot source, not both');
    const dir = path.resolve(out.image);
    let manifest: { cmdline?: string; workloads?: string[] };
    try {
      manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
    } catch {
      throw new TidemarkError(
        'NOT_FOUND',
        `${dir} is not a guest image (no readable manifest.json): run tidemark guest-image build ${dir}`,
      );
    }
    const workloads = manifest.workloads ?? [];
    if (out.workload !== undefined && !workloads.includes(out.workload)) {
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        `workload "${out.workload}" is not one of the image's: ${workloads.join(', ')}`,
      );
    }
    let append = manifest.cmdline ?? 'console=ttyS0';
    if (out.workload !== undefined)
      append = append.replace(/tidemark\.workload=\S+/, `tidemark.workload=${out.workload}`);
    out.image = dir;
    out.boot = { kind: 'kernel', kernel: path.join(dir, 'vmlinux'), initrd: path.join(dir, 'initrd.img'), append };
  } else if (out.workload !== undefined) {
    throw new TidemarkError('INVALID_ARGUMENT', '--workload needs --image');
  }
  if (out.boot?.kind === 'kernel') {
    for (const f of [out.boot.kernel, out.boot.initrd].filter((x): x is string => !!x)) {
      if (!path.isAbsolute(f)) throw new TidemarkError('INVALID_ARGUMENT', `boot file ${f} must be an absolute path`);
      if (!(await exists(f))) throw new TidemarkError('NOT_FOUND', `boot file ${f} does not exist`);
    }
  }
  return { ...req, ...out }; // out already holds all of req: the spread only gives it back as the caller's type
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}
