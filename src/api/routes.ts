/**
 * THE route table of the management API: per operation its name, method, path, schemas and summary. The server
 * registers its handlers from it (server.ts), the typed client calls through it (client.ts), the OpenAPI document
 * and the route table of docs/host.md are generated from it. Adding an operation here makes every one of them
 * know it, and the compiler then asks for its handler.
 *
 * `answer` is what the operation returns. A `job` route answers 202 with a JobInfo at once and runs in the
 * background; its `answer` is then the job's result (`GET /v1/jobs/ID/wait` returns it when Completed).
 */
import { TidemarkError } from '../errors.js';
import type { z } from 'zod';
import * as S from './schemas.js';

export type Method = 'GET' | 'POST' | 'PATCH' | 'DELETE';

export interface RouteDef {
  method: Method;
  /** With `:name` parameters, as Fastify writes them. */
  path: string;
  summary: string;
  params?: z.ZodType<Record<string, string>>;
  query?: z.ZodType<Record<string, string | undefined>>;
  body?: z.ZodType;
  answer: z.ZodType;
  job?: true;
}

function route<const R extends RouteDef>(r: R): R {
  return r;
}

export const ROUTES = {
  hostInfo: route({ method: 'GET', path: '/v1/host', summary: 'Host information', answer: S.HostInfo }),

  // ------------------------------------------------------------------ VMs
  listVms: route({ method: 'GET', path: '/v1/vms', summary: 'List VMs', answer: S.VmSummary.array() }),
  createVm: route({
    method: 'POST',
    path: '/v1/vms',
    summary: 'Create a VM (with new disks or existing files)',
    body: S.CreateVmBody,
    answer: S.VmSummary,
  }),
  showVm: route({
    method: 'GET',
    path: '/v1/vms/:vm',
    summary: 'Show a VM with its definition',
    params: S.VmParams,
    answer: S.VmDetail,
  }),
  modifyVm: route({
    method: 'PATCH',
    path: '/v1/vms/:vm',
    summary:
      'Modify a VM: checkpoint policy, configuration version, guest channel, attach/detach disks, SCSI controllers (0–4, the VM off)',
    params: S.VmParams,
    body: S.ModifyVmBody,
    answer: S.VmSummary,
  }),
  deleteVm: route({
    method: 'DELETE',
    path: '/v1/vms/:vm',
    summary: 'Delete a VM (?removeFiles=true also deletes its disks)',
    params: S.VmParams,
    query: S.DeleteVmQuery,
    answer: S.Deleted,
  }),
  upgradeVm: route({
    method: 'POST',
    path: '/v1/vms/:vm/upgrade',
    summary: 'Update-VMVersion: raise the configuration version (VM off), enabling change tracking from 6.2',
    params: S.VmParams,
    body: S.UpgradeVmBody,
    answer: S.VmSummary,
    job: true,
  }),
  convertDisks: route({
    method: 'POST',
    path: '/v1/vms/:vm/convert-disks',
    summary:
      "Convert-VHD + Set-VMHardDiskDrive: the VM's legacy VHD disks become VHDX beside them (VM off, no checkpoints or reference points); tracked from 6.2",
    params: S.VmParams,
    body: S.ConvertDisksBody,
    answer: S.ConvertDisksResult,
    job: true,
  }),
  startVm: route({
    method: 'POST',
    path: '/v1/vms/:vm/start',
    summary: 'Start a VM',
    params: S.VmParams,
    answer: S.VmSummary,
    job: true,
  }),
  stopVm: route({
    method: 'POST',
    path: '/v1/vms/:vm/stop',
    summary:
      'Stop a VM: its guest shuts down (agent, ACPI, quit); ?turnOff=true pulls the plug; ?force=true even with other NBD clients on its disks',
    params: S.VmParams,
    query: S.StopVmQuery,
    answer: S.VmSummary,
    job: true,
  }),
  saveVm: route({
    method: 'POST',
    path: '/v1/vms/:vm/save',
    summary: "Save a running VM's memory and device state and end its QEMU (Saved); start restores it",
    params: S.VmParams,
    answer: S.VmSummary,
    job: true,
  }),
  pauseVm: route({
    method: 'POST',
    path: '/v1/vms/:vm/pause',
    summary: "Pause a running VM's QEMU",
    params: S.VmParams,
    answer: S.VmSummary,
  }),
  resumeVm: route({
    method: 'POST',
    path: '/v1/vms/:vm/resume',
    summary: 'Resume a paused VM',
    params: S.VmParams,
    answer: S.VmSummary,
  }),
  readConsole: route({
    method: 'GET',
    path: '/v1/vms/:vm/console',
    summary: "The VM's serial console log from ?offset= (at most ?max= bytes, default 64 KiB)",
    params: S.VmParams,
    query: S.ConsoleQuery,
    answer: S.ConsoleChunk,
  }),

  // ------------------------------------------------------------------ leases
  acquireLease: route({
    method: 'POST',
    path: '/v1/vms/:vm/lease',
    summary: "Acquire the VM's lease for a backup run (BUSY naming the holder)",
    params: S.VmParams,
    body: S.AcquireLeaseBody,
    answer: S.LeaseInfo,
  }),
  listLeases: route({ method: 'GET', path: '/v1/leases', summary: 'Live leases', answer: S.LeaseInfo.array() }),
  acquireLeases: route({
    method: 'POST',
    path: '/v1/leases',
    summary: "Acquire many VMs' leases for one run, in name order, with one write (per VM: leased or refused)",
    body: S.AcquireLeasesBody,
    answer: S.LeasesAcquired,
  }),
  renewLeases: route({
    method: 'POST',
    path: '/v1/leases/renew',
    summary: "Renew many leases (a run's heartbeat); those no longer live are listed as gone",
    body: S.LeaseIdsBody,
    answer: S.LeasesRenewed,
  }),
  releaseLeases: route({
    method: 'POST',
    path: '/v1/leases/release',
    summary: 'Release many leases with one write',
    body: S.LeaseIdsBody,
    answer: S.LeasesReleased,
  }),
  renewLease: route({
    method: 'POST',
    path: '/v1/leases/:id/renew',
    summary: 'Renew a lease (the heartbeat of its run)',
    params: S.IdParams,
    answer: S.LeaseInfo,
  }),
  releaseLease: route({
    method: 'DELETE',
    path: '/v1/leases/:id',
    summary: 'Release a lease',
    params: S.IdParams,
    answer: S.Released,
  }),

  // ------------------------------------------------------------------ imports (restore --register)
  listImports: route({
    method: 'GET',
    path: '/v1/imports',
    summary: 'Imports in progress (names reserved by restores)',
    answer: S.ImportInfo.array(),
  }),
  reserveImport: route({
    method: 'POST',
    path: '/v1/imports',
    summary: "Reserve a VM name for a restore and make the VM's folder (before anything is written)",
    body: S.ReserveImportBody,
    answer: S.ImportInfo,
  }),
  commitImport: route({
    method: 'POST',
    path: '/v1/imports/:name/commit',
    summary: "Register the restored disks (files in the import's folder) as the new VM",
    params: S.NameParams,
    body: S.CommitImportBody,
    answer: S.VmSummary,
  }),
  cancelImport: route({
    method: 'DELETE',
    path: '/v1/imports/:name',
    summary: 'Cancel an import: its folder and everything written into it are removed',
    params: S.NameParams,
    answer: S.Cancelled,
  }),

  // ------------------------------------------------------------------ checkpoints, reference points
  listCheckpoints: route({
    method: 'GET',
    path: '/v1/vms/:vm/checkpoints',
    summary: 'List the checkpoint tree',
    params: S.VmParams,
    answer: S.CheckpointEntry.array(),
  }),
  createCheckpoint: route({
    method: 'POST',
    path: '/v1/vms/:vm/checkpoints',
    summary: 'Create a checkpoint',
    params: S.VmParams,
    body: S.CheckpointBody,
    answer: S.Checkpoint,
    job: true,
  }),
  deleteCheckpoint: route({
    method: 'DELETE',
    path: '/v1/vms/:vm/checkpoints/:cp',
    summary: 'Delete a checkpoint, merging online (?lease= the run lease)',
    params: S.VmCheckpointParams,
    query: S.LeaseQuery,
    answer: S.Nothing,
    job: true,
  }),
  applyCheckpoint: route({
    method: 'POST',
    path: '/v1/vms/:vm/checkpoints/:cp/apply',
    summary: 'Apply a checkpoint to a VM that is off (?lease= the run lease)',
    params: S.VmCheckpointParams,
    query: S.LeaseQuery,
    answer: S.Nothing,
    job: true,
  }),
  convertToReferencePoint: route({
    method: 'POST',
    path: '/v1/vms/:vm/checkpoints/:cp/convert',
    summary: 'ConvertToReferencePoint: merge a recovery checkpoint back, keep its ids, record its owner',
    params: S.VmCheckpointParams,
    body: S.ConvertBody,
    answer: S.ReferencePoint,
    job: true,
  }),
  listReferencePoints: route({
    method: 'GET',
    path: '/v1/vms/:vm/refpoints',
    summary: 'List reference points',
    params: S.VmParams,
    answer: S.ReferencePoint.array(),
  }),
  createReferencePoint: route({
    method: 'POST',
    path: '/v1/vms/:vm/refpoints',
    summary: 'CreateReferencePoint without a checkpoint, with an owner',
    params: S.VmParams,
    body: S.CreateRefpointBody,
    answer: S.ReferencePoint,
    job: true,
  }),
  destroyReferencePoint: route({
    method: 'DELETE',
    path: '/v1/vms/:vm/refpoints/:id',
    summary: 'DestroyReferencePoint',
    params: S.VmRefpointParams,
    answer: S.Destroyed,
  }),

  // ------------------------------------------------------------------ image management
  changes: route({
    method: 'POST',
    path: '/v1/changes',
    summary: 'GetVirtualDiskChanges: ranges changed since LimitId, paged by offset/length',
    body: S.ChangesBody,
    answer: S.ChangesResult,
  }),
  createDisk: route({
    method: 'POST',
    path: '/v1/disks',
    summary: 'Create a dynamic VHDX in the store (tracking enabled)',
    body: S.CreateDiskBody,
    answer: S.DiskPath,
  }),
  diskInfo: route({
    method: 'GET',
    path: '/v1/disks/info',
    summary: 'Disk information of a file in the store (?path=)',
    query: S.DiskInfoQuery,
    answer: S.DiskInfo,
  }),
  mergeDisk: route({
    method: 'POST',
    path: '/v1/disks/merge',
    summary: 'Merge a differencing disk of the store into its parent',
    body: S.MergeDiskBody,
    answer: S.MergeResult,
    job: true,
  }),

  // ------------------------------------------------------------------ hot-plug (the 2012 R2 flow)
  hotPlug: route({
    method: 'POST',
    path: '/v1/vms/:vm/hot-plug',
    summary:
      "Hot-add an NBD export to the VM's first SCSI controller (`recover`: the guest then recovers its file systems); modelled for a VM with no guest",
    params: S.VmParams,
    body: S.HotPlugBody,
    answer: S.HotPlugInfo,
    job: true,
  }),
  hotUnplug: route({
    method: 'DELETE',
    path: '/v1/vms/:vm/hot-plug/:id',
    summary: "Hot-remove a disk hot-plug added (?lease= the VM's lease, while it is leased)",
    params: S.VmHotPlugParams,
    query: S.HotPlugQuery,
    answer: S.HotPlugInfo,
  }),

  // ------------------------------------------------------------------ storage snapshots
  createSnapshotSet: route({
    method: 'POST',
    path: '/v1/snapshot-sets',
    summary: "Take ONE storage snapshot of a set of VMs (their checkpoints' frozen files) and export it read-only",
    body: S.SnapshotBody,
    answer: S.SnapshotSetInfo,
    job: true,
  }),
  listSnapshotSets: route({
    method: 'GET',
    path: '/v1/snapshot-sets',
    summary: 'Live snapshot sets',
    answer: S.SnapshotSetInfo.array(),
  }),
  releaseSnapshotSet: route({
    method: 'DELETE',
    path: '/v1/snapshot-sets/:id',
    summary:
      'Release a snapshot set (?succeeded=false when the backup failed; ?lease= a lease of the run that made it)',
    params: S.IdParams,
    query: S.ReleaseSnapshotQuery,
    answer: S.Released,
  }),

  // ------------------------------------------------------------------ jobs, the document
  listJobs: route({ method: 'GET', path: '/v1/jobs', summary: 'List jobs', answer: S.JobInfo.array() }),
  jobInfo: route({ method: 'GET', path: '/v1/jobs/:id', summary: 'A job', params: S.IdParams, answer: S.JobInfo }),
  waitJob: route({
    method: 'GET',
    path: '/v1/jobs/:id/wait',
    summary: 'Wait for a job to end (?timeoutMs=, default 60 s, at most 10 minutes); answers its state either way',
    params: S.IdParams,
    query: S.WaitQuery,
    answer: S.JobInfo,
  }),
  openApi: route({
    method: 'GET',
    path: '/v1/openapi.json',
    summary: 'This API, as OpenAPI 3.1',
    answer: S.OpenApiDocument,
  }),
} as const;

export type Routes = typeof ROUTES;
export type RouteName = keyof Routes;

type Empty = Record<never, never>;

/** What a caller gives: path parameters, query and body as the schemas take them (before defaults). */
export type CallInput<R extends RouteDef> = (R extends { params: infer P extends z.ZodType }
  ? { params: z.input<P> }
  : Empty) &
  (R extends { query: infer Q extends z.ZodType } ? { query?: z.input<Q> } : Empty) &
  (R extends { body: infer B extends z.ZodType } ? { body: z.input<B> } : Empty);

/** What a handler gets: the same, validated (defaults applied). */
export interface HandlerInput<R extends RouteDef> {
  params: R extends { params: infer P extends z.ZodType } ? z.output<P> : Empty;
  query: R extends { query: infer Q extends z.ZodType } ? z.output<Q> : Empty;
  body: R extends { body: infer B extends z.ZodType } ? z.output<B> : undefined;
}

/** What the operation returns (a job route: the job's result). */
export type Answer<R extends RouteDef> = z.output<R['answer']>;

/** Whether an HTTP answer is the operation's result (200) or a job started for it (202). */
export function answerStatus(r: RouteDef): 200 | 202 {
  return r.job ? 202 : 200;
}

/** `/v1/vms/:vm` with `{ vm: 'a b' }` → `/v1/vms/a%20b`. */
export function fillPath(path: string, params: Record<string, string> = {}): string {
  return path.replace(/:(\w+)/g, (_m, name: string) => {
    const v = params[name];
    if (v === undefined) throw new TidemarkError('INVALID_ARGUMENT', `route ${path} needs the parameter ${name}`);
    return encodeURIComponent(v);
  });
}

/** The route whose path pattern matches `pathname`, by method: for 405 answers and their `Allow`. */
export function methodsFor(pathname: string): Method[] {
  // Segment by segment as the router matches: `/v1/vms/` (a trailing slash) is no route's path.
  const parts = pathname.split('/');
  const found = new Set<Method>();
  for (const r of Object.values(ROUTES) as RouteDef[]) {
    const want = r.path.split('/');
    const matches = (w: string, i: number) => (w.startsWith(':') ? parts[i] !== '' : w === parts[i]);
    if (want.length === parts.length && want.every(matches)) found.add(r.method);
  }
  return [...found];
}
