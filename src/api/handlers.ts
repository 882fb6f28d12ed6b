/**
 * The host behind the route table: one handler per operation, typed from the route's schemas. Requests arrive
 * validated (their types are the schemas' outputs, no casts), and what each handler returns must satisfy the
 * route's answer: the compiler checks that the host's data fits the wire shapes of schemas.ts.
 */
import type { Host } from '../host/host.js';
import { parseSize } from '../util/size.js';
import type { Handlers, JobStarted } from './server.js';

const WAIT_DEFAULT_MS = 60_000;
const WAIT_MAX_MS = 600_000;
/** Console bytes an answer carries unless ?max= says (the runtime caps it at 1 MiB). */
const CONSOLE_DEFAULT = 65_536;

export function hostHandlers(host: Host): Handlers {
  /** Starts a long operation as a job; the route's answer type checks `run`'s result. */
  const job = <T>(type: string, target: string, run: () => Promise<T>): JobStarted<T> =>
    host.jobs.start(type, target, run);

  return {
    hostInfo: async () => ({
      store: host.store,
      nbd: host.nbd.address(),
      nbdTls: host.nbd.tls !== undefined,
      version: '1',
      snapshotsTaken: host.snapshots.taken,
      allowedDiskDirs: host.diskPaths.allowedDirs,
      configVersions: host.configVersions(),
    }),

    listVms: () => host.listVms(),
    createVm: ({ body }) => host.createVm(body),
    showVm: ({ params }) => host.showVm(params.vm),
    modifyVm: ({ params, body }) => host.modifyVm(params.vm, body),
    deleteVm: async ({ params, query }) => {
      await host.deleteVm(params.vm, { removeFiles: query.removeFiles === 'true' });
      return { deleted: params.vm };
    },
    upgradeVm: async ({ params, body }) => job('upgrade', params.vm, () => host.upgradeVm(params.vm, body)),
    convertDisks: async ({ params, body }) => job('convert-disks', params.vm, () => host.convertDisks(params.vm, body)),
    startVm: async ({ params }) => job('start', params.vm, () => host.startVm(params.vm)),
    stopVm: async ({ params, query }) =>
      job('stop', params.vm, () =>
        host.stopVm(params.vm, { turnOff: query.turnOff === 'true', force: query.force === 'true' }),
      ),
    saveVm: async ({ params }) => job('save', params.vm, () => host.saveVm(params.vm)),
    pauseVm: ({ params }) => host.pauseVm(params.vm, true),
    resumeVm: ({ params }) => host.pauseVm(params.vm, false),
    readConsole: ({ params, query }) =>
      host.readConsole(params.vm, Number(query.offset ?? 0), Number(query.max ?? CONSOLE_DEFAULT)),

    acquireLease: async ({ params, body }) => {
      host.getVm(params.vm);
      return host.leases.acquire(params.vm, body.owner, body.ttlSeconds);
    },
    listLeases: () => host.leases.list(),
    acquireLeases: ({ body }) =>
      host.leases.acquireMany(body.vms, body.owner, body.ttlSeconds, {
        stopAtBusy: body.stopAtBusy,
        exists: (vm) => void host.getVm(vm),
      }),
    renewLeases: ({ body }) => host.leases.renewMany(body.ids),
    releaseLeases: ({ body }) => host.leases.releaseMany(body.ids),
    renewLease: ({ params }) => host.leases.renew(params.id),
    releaseLease: async ({ params }) => {
      await host.leases.release(params.id);
      return { released: params.id };
    },

    listImports: async () => host.listImports(),
    reserveImport: ({ body }) => host.reserveImport(body.name, body.owner),
    commitImport: ({ params, body }) => host.commitImport(params.name, body),
    cancelImport: async ({ params }) => {
      await host.cancelImport(params.name);
      return { cancelled: params.name };
    },

    listCheckpoints: async ({ params }) => host.listCheckpoints(params.vm),
    createCheckpoint: async ({ params, body }) =>
      job('checkpoint', params.vm, () => host.createCheckpoint(params.vm, body)),
    deleteCheckpoint: async ({ params, query }) =>
      job('delete-checkpoint', params.vm, () => host.deleteCheckpoint(params.vm, params.cp, { lease: query.lease })),
    applyCheckpoint: async ({ params, query }) =>
      job('apply-checkpoint', params.vm, () => host.applyCheckpoint(params.vm, params.cp, { lease: query.lease })),
    convertToReferencePoint: async ({ params, body }) =>
      job('convert-to-reference-point', params.vm, () => host.convertToReferencePoint(params.vm, params.cp, body)),
    listReferencePoints: async ({ params }) => host.listReferencePoints(params.vm),
    createReferencePoint: async ({ params, body }) =>
      job('create-reference-point', params.vm, () => host.createReferencePoint(params.vm, body)),
    destroyReferencePoint: async ({ params }) => {
      await host.destroyReferencePoint(params.vm, params.id);
      return { destroyed: params.id };
    },

    changes: ({ body: b }) => {
      const target = b.path !== undefined ? { path: b.path } : { vm: b.vm ?? '', slot: b.slot ?? '' };
      return host.virtualDiskChanges(target, b.limitId, b.offset ?? 0, b.length, b.maxRanges);
    },
    createDisk: async ({ body }) => {
      const size = typeof body.size === 'number' ? body.size : parseSize(body.size);
      return { path: await host.createDisk(body.path, { size, blockSize: body.blockSize }) };
    },
    diskInfo: ({ query }) => host.diskInfo(query.path),
    mergeDisk: async ({ body }) => job('merge', body.path, () => host.mergeDisk(body.path)),

    hotPlug: async ({ params, body }) => job('hot-plug', params.vm, () => host.hotPlugs.add(params.vm, body)),
    hotUnplug: ({ params, query }) => host.hotPlugs.remove(params.vm, params.id, query.lease),

    createSnapshotSet: async ({ body }) =>
      job('snapshot-set', body.vms.map((v) => v.name).join(','), () => host.snapshots.create(body)),
    listSnapshotSets: async () => host.snapshots.list(),
    releaseSnapshotSet: async ({ params, query }) => {
      await host.snapshots.release(params.id, { succeeded: query.succeeded !== 'false', lease: query.lease });
      return { released: params.id };
    },

    listJobs: async () => host.jobs.list(),
    jobInfo: async ({ params }) => host.jobs.info(params.id),
    waitJob: ({ params, query }) =>
      host.jobs.wait(params.id, Math.min(Number(query.timeoutMs ?? WAIT_DEFAULT_MS), WAIT_MAX_MS)),
  };
}
