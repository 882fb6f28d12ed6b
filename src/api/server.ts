/**
 * The management API: JSON over HTTP on a unix socket in the store (or loopback TCP), a bearer token on
 * every request, bodies validated with zod, errors as `{ error: { code, message } }` with stable codes,
 * long operations answered 202 with a job, and the OpenAPI document at /v1/openapi.json.
 */
import { timingSafeEqual } from 'node:crypto';
import { chmod, unlink } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { z } from 'zod';
import { TidemarkError } from '../errors.js';
import type { Host } from '../host/host.js';
import type { JobInfo } from '../host/jobs.js';
import { parseSize } from '../util/size.js';
import {
  AcquireLeaseBody,
  ChangesBody,
  CheckpointBody,
  CommitImportBody,
  ConvertBody,
  CreateDiskBody,
  CreateRefpointBody,
  CreateVmBody,
  MergeDiskBody,
  ModifyVmBody,
  ReserveImportBody,
  SnapshotBody,
  UpgradeVmBody,
} from './schemas.js';

const MAX_BODY = 1024 * 1024;

export interface RouteContext {
  params: Record<string, string>;
  query: URLSearchParams;
  body: unknown;
}

export interface Route {
  method: 'GET' | 'POST' | 'PATCH' | 'DELETE';
  path: string;
  summary: string;
  body?: z.ZodType;
  /** Returns the response body; a job answer is marked so the status is 202. */
  handler: (ctx: RouteContext) => Promise<unknown>;
}

class Accepted {
  constructor(readonly job: JobInfo) {}
}

/** Extra routes other layers add (the backup exports) without this file knowing them. */
export type RouteProvider = (
  host: Host,
  job: (type: string, target: string, run: () => Promise<unknown>) => Accepted,
) => Route[];

export function hostRoutes(host: Host, extra: RouteProvider[] = []): Route[] {
  const job = (type: string, target: string, run: () => Promise<unknown>) =>
    new Accepted(host.jobs.start(type, target, run));
  const routes: Route[] = [
    {
      method: 'GET',
      path: '/v1/host',
      summary: 'Host information',
      handler: async () => ({
        store: host.store,
        nbd: host.nbd.address(),
        version: '1',
        snapshotsTaken: host.snapshots.taken,
        allowedDiskDirs: host.diskPaths.allowedDirs,
        configVersions: host.configVersions(),
      }),
    },
    { method: 'GET', path: '/v1/vms', summary: 'List VMs', handler: async () => host.listVms() },
    {
      method: 'POST',
      path: '/v1/vms',
      summary: 'Create a VM (with new disks or existing files)',
      body: CreateVmBody,
      handler: async ({ body }) => host.createVm(body as CreateVmBody),
    },
    { method: 'GET', path: '/v1/vms/:vm', summary: 'Show a VM', handler: async ({ params }) => host.showVm(params.vm) },
    {
      method: 'PATCH',
      path: '/v1/vms/:vm',
      summary: 'Modify a VM: checkpoint policy, configuration version, guest channel, attach/detach disks',
      body: ModifyVmBody,
      handler: async ({ params, body }) => host.modifyVm(params.vm, body as ModifyVmBody),
    },
    {
      method: 'DELETE',
      path: '/v1/vms/:vm',
      summary: 'Delete a VM (?removeFiles=true also deletes its disks)',
      handler: async ({ params, query }) => {
        await host.deleteVm(params.vm, { removeFiles: query.get('removeFiles') === 'true' });
        return { deleted: params.vm };
      },
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/upgrade',
      summary: 'Update-VMVersion: raise the configuration version (VM off), enabling change tracking from 6.2 (job)',
      body: UpgradeVmBody,
      handler: async ({ params, body }) =>
        job('upgrade', params.vm, () => host.upgradeVm(params.vm, body as UpgradeVmBody)),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/lease',
      summary: "Acquire the VM's lease for a backup run (BUSY naming the holder)",
      body: AcquireLeaseBody,
      handler: async ({ params, body }) => {
        const b = body as AcquireLeaseBody;
        host.getVm(params.vm);
        return host.leases.acquire(params.vm, b.owner, b.ttlSeconds);
      },
    },
    { method: 'GET', path: '/v1/leases', summary: 'Live leases', handler: async () => host.leases.list() },
    {
      method: 'POST',
      path: '/v1/leases/:id/renew',
      summary: 'Renew a lease (the heartbeat of its run)',
      handler: async ({ params }) => host.leases.renew(params.id),
    },
    {
      method: 'DELETE',
      path: '/v1/leases/:id',
      summary: 'Release a lease',
      handler: async ({ params }) => {
        await host.leases.release(params.id);
        return { released: params.id };
      },
    },
    {
      method: 'GET',
      path: '/v1/imports',
      summary: 'Imports in progress (names reserved by restores)',
      handler: async () => host.listImports(),
    },
    {
      method: 'POST',
      path: '/v1/imports',
      summary: "Reserve a VM name for a restore and make the VM's folder (before anything is written)",
      body: ReserveImportBody,
      handler: async ({ body }) => {
        const b = body as ReserveImportBody;
        return host.reserveImport(b.name, b.owner);
      },
    },
    {
      method: 'POST',
      path: '/v1/imports/:name/commit',
      summary: "Register the restored disks (files in the import's folder) as the new VM",
      body: CommitImportBody,
      handler: async ({ params, body }) => host.commitImport(params.name, body as CommitImportBody),
    },
    {
      method: 'DELETE',
      path: '/v1/imports/:name',
      summary: 'Cancel an import: its folder and everything written into it are removed',
      handler: async ({ params }) => {
        await host.cancelImport(params.name);
        return { cancelled: params.name };
      },
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/start',
      summary: 'Start a VM (job)',
      handler: async ({ params }) => job('start', params.vm, () => host.startVm(params.vm)),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/stop',
      summary: 'Stop a VM: its guest shuts down (agent, ACPI, quit); ?turnOff=true pulls the plug (job)',
      handler: async ({ params, query }) =>
        job('stop', params.vm, () => host.stopVm(params.vm, { turnOff: query.get('turnOff') === 'true' })),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/save',
      summary: "Save a running VM's memory and device state and end its QEMU (Saved); start restores it (job)",
      handler: async ({ params }) => job('save', params.vm, () => host.saveVm(params.vm)),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/pause',
      summary: "Pause a running VM's QEMU",
      handler: async ({ params }) => host.pauseVm(params.vm, true),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/resume',
      summary: 'Resume a paused VM',
      handler: async ({ params }) => host.pauseVm(params.vm, false),
    },
    {
      method: 'GET',
      path: '/v1/vms/:vm/console',
      summary: "The VM's serial console log from ?offset= (at most ?max= bytes): { data, offset, size }",
      handler: async ({ params, query }) =>
        host.readConsole(params.vm, Number(query.get('offset') ?? 0) || 0, Number(query.get('max') ?? 65536) || 65536),
    },
    {
      method: 'GET',
      path: '/v1/vms/:vm/checkpoints',
      summary: 'List the checkpoint tree',
      handler: async ({ params }) => host.listCheckpoints(params.vm),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/checkpoints',
      summary: 'Create a checkpoint (job)',
      body: CheckpointBody,
      handler: async ({ params, body }) =>
        job('checkpoint', params.vm, () => host.createCheckpoint(params.vm, body as CheckpointBody)),
    },
    {
      method: 'DELETE',
      path: '/v1/vms/:vm/checkpoints/:cp',
      summary: 'Delete a checkpoint, merging online (?lease= the run lease) (job)',
      handler: async ({ params, query }) =>
        job('delete-checkpoint', params.vm, () =>
          host.deleteCheckpoint(params.vm, params.cp, { lease: query.get('lease') ?? undefined }),
        ),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/checkpoints/:cp/apply',
      summary: 'Apply a checkpoint to a VM that is off (?lease= the run lease) (job)',
      handler: async ({ params, query }) =>
        job('apply-checkpoint', params.vm, () =>
          host.applyCheckpoint(params.vm, params.cp, { lease: query.get('lease') ?? undefined }),
        ),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/checkpoints/:cp/convert',
      summary: 'ConvertToReferencePoint: merge a recovery checkpoint back, keep its ids, record its owner (job)',
      body: ConvertBody,
      handler: async ({ params, body }) =>
        job('convert-to-reference-point', params.vm, () =>
          host.convertToReferencePoint(params.vm, params.cp, body as ConvertBody),
        ),
    },
    {
      method: 'GET',
      path: '/v1/vms/:vm/refpoints',
      summary: 'List reference points',
      handler: async ({ params }) => host.listReferencePoints(params.vm),
    },
    {
      method: 'POST',
      path: '/v1/vms/:vm/refpoints',
      summary: 'CreateReferencePoint without a checkpoint, with an owner (job)',
      body: CreateRefpointBody,
      handler: async ({ params, body }) =>
        job('create-reference-point', params.vm, () =>
          host.createReferencePoint(params.vm, body as CreateRefpointBody),
        ),
    },
    {
      method: 'DELETE',
      path: '/v1/vms/:vm/refpoints/:id',
      summary: 'DestroyReferencePoint',
      handler: async ({ params }) => {
        await host.destroyReferencePoint(params.vm, params.id);
        return { destroyed: params.id };
      },
    },
    {
      method: 'POST',
      path: '/v1/changes',
      summary: 'GetVirtualDiskChanges: ranges changed since LimitId, paged by offset/length',
      body: ChangesBody,
      handler: async ({ body }) => {
        const b = body as ChangesBody;
        const target = b.path !== undefined ? { path: b.path } : { vm: b.vm!, slot: b.slot! };
        return host.virtualDiskChanges(target, b.limitId, b.offset ?? 0, b.length, b.maxRanges);
      },
    },
    {
      method: 'POST',
      path: '/v1/disks',
      summary: 'Create a dynamic VHDX in the store (tracking enabled)',
      body: CreateDiskBody,
      handler: async ({ body }) => {
        const b = body as z.infer<typeof CreateDiskBody>;
        const size = typeof b.size === 'number' ? b.size : parseSize(b.size);
        return { path: await host.createDisk(b.path, { size, blockSize: b.blockSize }) };
      },
    },
    {
      method: 'GET',
      path: '/v1/disks/info',
      summary: 'Disk information (?path=)',
      handler: async ({ query }) => {
        const p = query.get('path');
        if (!p) throw new TidemarkError('INVALID_ARGUMENT', 'give ?path=');
        return host.diskInfo(p);
      },
    },
    {
      method: 'POST',
      path: '/v1/disks/merge',
      summary: 'Merge a differencing disk of the store into its parent (job)',
      body: MergeDiskBody,
      handler: async ({ body }) =>
        job('merge', (body as { path: string }).path, () => host.mergeDisk((body as { path: string }).path)),
    },
    {
      method: 'POST',
      path: '/v1/snapshot-sets',
      summary:
        "Take ONE storage snapshot of a set of VMs (their checkpoints' frozen files) and export it read-only (job)",
      body: SnapshotBody,
      handler: async ({ body }) => {
        const b = body as SnapshotBody;
        return job('snapshot-set', b.vms.map((v) => v.name).join(','), () => host.snapshots.create(b));
      },
    },
    {
      method: 'GET',
      path: '/v1/snapshot-sets',
      summary: 'Live snapshot sets',
      handler: async () => host.snapshots.list(),
    },
    {
      method: 'DELETE',
      path: '/v1/snapshot-sets/:id',
      summary:
        'Release a snapshot set (?succeeded=false when the backup failed; ?lease= a lease of the run that made it)',
      handler: async ({ params, query }) => {
        await host.snapshots.release(params.id, {
          succeeded: query.get('succeeded') !== 'false',
          lease: query.get('lease') ?? undefined,
        });
        return { released: params.id };
      },
    },
    { method: 'GET', path: '/v1/jobs', summary: 'List jobs', handler: async () => host.jobs.list() },
    { method: 'GET', path: '/v1/jobs/:id', summary: 'A job', handler: async ({ params }) => host.jobs.info(params.id) },
    {
      method: 'GET',
      path: '/v1/jobs/:id/wait',
      summary: 'Wait for a job to end (?timeoutMs=, at most 10 minutes)',
      handler: async ({ params, query }) =>
        host.jobs.wait(params.id, Math.min(Number(query.get('timeoutMs') ?? 60_000) || 60_000, 600_000)),
    },
  ];
  for (const p of extra) routes.push(...p(host, job));
  routes.push({
    method: 'GET',
    path: '/v1/openapi.json',
    summary: 'This API, as OpenAPI 3.1',
    handler: async () => openApi(routes),
  });
  return routes;
}

/** The OpenAPI document, generated from the route table and its zod schemas. */
export function openApi(routes: Route[]): unknown {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of routes) {
    const p = r.path.replace(/:(\w+)/g, '{$1}');
    const params = [...r.path.matchAll(/:(\w+)/g)].map((m) => ({
      name: m[1],
      in: 'path',
      required: true,
      schema: { type: 'string' },
    }));
    (paths[p] ??= {})[r.method.toLowerCase()] = {
      summary: r.summary,
      parameters: params,
      ...(r.body
        ? {
            requestBody: {
              required: true,
              content: { 'application/json': { schema: z.toJSONSchema(r.body, { unrepresentable: 'any' }) } },
            },
          }
        : {}),
      responses: {
        '200': { description: 'OK' },
        '202': { description: 'Accepted: a job (poll /v1/jobs/{id})' },
        '400': { description: 'Invalid request: { error: { code, message } }' },
        '401': { description: 'Missing or wrong token' },
        '404': { description: 'Not found' },
        '409': { description: 'Conflict / busy / locked (image locks)' },
      },
      security: [{ bearer: [] }],
    };
  }
  return {
    openapi: '3.1.0',
    info: { title: 'Tidemark host management API', version: '1' },
    components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    paths,
  };
}

const STATUS: Record<string, number> = {
  INVALID_ARGUMENT: 400,
  UNAUTHORIZED: 401,
  NOT_FOUND: 404,
  PARENT_NOT_FOUND: 404,
  ALREADY_EXISTS: 409,
  CONFLICT: 409,
  BUSY: 409,
  LOCKED: 409,
  READ_ONLY: 409,
  PATH_NOT_ALLOWED: 403,
  MISSING_CHANGE_TRACKING_INFORMATION: 422,
  NOT_SUPPORTED: 422,
  LIMIT_EXCEEDED: 413,
  VHD_CORRUPT: 422,
  VHD_TRUNCATED: 422,
  VHD_UNSUPPORTED: 422,
  QMP_ERROR: 502,
  QEMU_FAILED: 502,
};

export interface ApiServerOptions {
  token: string;
  socket?: string;
  port?: number;
  host?: string;
}

export class ApiServer {
  private server: http.Server;
  private token: Buffer;

  constructor(
    private readonly routes: Route[],
    private readonly opts: ApiServerOptions,
  ) {
    this.token = Buffer.from(opts.token);
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.requestTimeout = 15 * 60_000;
  }

  async listen(): Promise<string> {
    if (this.opts.socket) {
      await unlink(this.opts.socket).catch(() => undefined);
      await new Promise<void>((resolve, reject) => {
        this.server.once('error', reject);
        this.server.listen(this.opts.socket, () => resolve());
      });
      await chmod(this.opts.socket, 0o600);
      return `unix:${this.opts.socket}`;
    }
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.opts.port ?? 0, this.opts.host ?? '127.0.0.1', () => resolve());
    });
    const a = this.server.address() as AddressInfo;
    return `http://${a.address}:${a.port}`;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
    if (this.opts.socket) await unlink(this.opts.socket).catch(() => undefined);
  }

  private authorized(req: http.IncomingMessage): boolean {
    const h = req.headers.authorization ?? '';
    const m = /^Bearer (.+)$/.exec(h);
    if (!m) return false;
    const given = Buffer.from(m[1]);
    return given.length === this.token.length && timingSafeEqual(given, this.token);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const send = (status: number, body: unknown) => {
      const text = JSON.stringify(body, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
      res.end(text);
    };
    try {
      if (!this.authorized(req)) {
        req.resume();
        throw new TidemarkError(
          'UNAUTHORIZED',
          'missing or wrong API token (Authorization: Bearer <token from host.json>)',
        );
      }
      const url = new URL(req.url ?? '/', 'http://host');
      const match = this.match(req.method ?? 'GET', url.pathname);
      const raw = await readBody(req);
      let body: unknown;
      if (match.route.body) {
        let json: unknown;
        try {
          json = raw.length ? JSON.parse(raw.toString('utf8')) : {};
        } catch (err) {
          throw new TidemarkError('INVALID_ARGUMENT', `request body is not JSON: ${(err as Error).message}`);
        }
        const parsed = match.route.body.safeParse(json);
        if (!parsed.success) {
          const issue = parsed.error.issues[0];
          throw new TidemarkError(
            'INVALID_ARGUMENT',
            `invalid request body at ${issue.path.join('.') || '(root)'}: ${issue.message}`,
          );
        }
        body = parsed.data;
      }
      const result = await match.route.handler({ params: match.params, query: url.searchParams, body });
      if (result instanceof Accepted) send(202, result.job);
      else send(200, result ?? {});
    } catch (err) {
      const e =
        err instanceof TidemarkError
          ? err
          : new TidemarkError('IO_ERROR', `internal error: ${(err as Error)?.message ?? String(err)}`);
      send(STATUS[e.code] ?? 500, { error: { code: e.code, message: e.message } });
    }
  }

  private match(method: string, pathname: string): { route: Route; params: Record<string, string> } {
    const parts = pathname.split('/').filter(Boolean);
    let pathMatched = false;
    for (const route of this.routes) {
      const want = route.path.split('/').filter(Boolean);
      if (want.length !== parts.length) continue;
      const params: Record<string, string> = {};
      let ok = true;
      for (let i = 0; i < want.length && ok; i++) {
        if (want[i].startsWith(':')) {
          try {
            params[want[i].slice(1)] = decodeURIComponent(parts[i]);
          } catch {
            ok = false;
          }
        } else ok = want[i] === parts[i];
      }
      if (!ok) continue;
      pathMatched = true;
      if (route.method === method) return { route, params };
    }
    throw new TidemarkError(
      pathMatched ? 'NOT_SUPPORTED' : 'NOT_FOUND',
      `${pathMatched ? 'method not allowed' : 'no such endpoint'}: ${method} ${pathname}`,
    );
  }
}

async function readBody(req: http.IncomingMessage): Promise<Buffer> {
  const parts: Buffer[] = [];
  let n = 0;
  for await (const chunk of req) {
    n += (chunk as Buffer).length;
    if (n > MAX_BODY) throw new TidemarkError('LIMIT_EXCEEDED', `request body over ${MAX_BODY} bytes`);
    parts.push(chunk as Buffer);
  }
  return Buffer.concat(parts);
}
