/**
 * The typed client of the host's management API: the CLI and the backup application talk to a host only
 * through it. Every call goes through the route table (routes.ts): `call(route, input)` fills the path and
 * query from the route, and checks the answer against the route's schema, so a host that answers outside the
 * contract is a PROTOCOL_ERROR here, not a wrong value further on. Errors come back as TidemarkErrors with
 * the server's code and details; job routes are started and waited for (`run`).
 */
import http from 'node:http';
import path from 'node:path';
import type { z } from 'zod';
import { TidemarkError, TidemarkErrorBase } from '../errors.js';
import { readSmallFile } from '../util/safe-open.js';
import { answerStatus, fillPath, ROUTES, type Answer, type CallInput, type RouteDef } from './routes.js';
import {
  ErrorBody,
  JobInfo,
  type AcquireLeaseBody,
  type AcquireLeasesBody,
  type ChangesBody,
  type CheckpointBody,
  type CommitImportBody,
  type ConvertBody,
  type CreateRefpointBody,
  type CreateVmBody,
  type ModifyVmBody,
  type ReserveImportBody,
  type HotPlugBody,
  type SnapshotBody,
  type UpgradeVmBody,
  type ConvertDisksBody,
} from './schemas.js';

export interface HostAddress {
  /** `unix:/path/api.sock` or `http://127.0.0.1:PORT`. */
  endpoint: string;
  token: string;
}

/** The host a command talks to: `--store DIR` (reads DIR/host.json), or TIDEMARK_HOST + TIDEMARK_TOKEN. */
export async function resolveHost(opts: { store?: string }): Promise<HostAddress> {
  const store = opts.store ?? process.env.TIDEMARK_STORE;
  if (store) return readHostFile(store);
  const endpoint = process.env.TIDEMARK_HOST;
  if (endpoint) {
    if (endpoint.startsWith('unix:') || endpoint.startsWith('http://')) {
      const token = process.env.TIDEMARK_TOKEN;
      if (!token) throw new TidemarkError('UNAUTHORIZED', 'TIDEMARK_HOST is set but TIDEMARK_TOKEN is not');
      return { endpoint, token };
    }
    return readHostFile(endpoint);
  }
  throw new TidemarkError('INVALID_ARGUMENT', 'which host? give --store DIR or set TIDEMARK_HOST');
}

export async function readHostFile(store: string): Promise<HostAddress> {
  const file = path.join(path.resolve(store), 'host.json');
  let info: { api?: string; token?: string };
  try {
    info = JSON.parse((await readSmallFile(file, { maxBytes: 64 * 1024 })).toString('utf8'));
  } catch (err) {
    // A FIFO or an oversized file in its place is said as such; a missing or unreadable one means no host.
    if (err instanceof TidemarkError && (err.code === 'INVALID_ARGUMENT' || err.code === 'LIMIT_EXCEEDED')) throw err;
    throw new TidemarkError(
      'NOT_FOUND',
      `no host is running for store ${store} (cannot read ${file}); start one: tidemark host --store ${store}`,
    );
  }
  if (!info.api || !info.token) throw new TidemarkError('INVALID_ARGUMENT', `${file} lacks api/token`);
  return { endpoint: info.api, token: info.token };
}

export class HostClient {
  constructor(readonly address: HostAddress) {}

  static async connect(opts: { store?: string }): Promise<HostClient> {
    return new HostClient(await resolveHost(opts));
  }

  // ---------------------------------------------------------------- VMs

  listVms() {
    return this.call(ROUTES.listVms);
  }
  showVm(vm: string) {
    return this.call(ROUTES.showVm, { params: { vm } });
  }
  createVm(body: CreateVmBody) {
    return this.call(ROUTES.createVm, { body });
  }
  modifyVm(vm: string, body: ModifyVmBody) {
    return this.call(ROUTES.modifyVm, { params: { vm }, body });
  }
  deleteVm(vm: string, removeFiles = false) {
    return this.call(ROUTES.deleteVm, { params: { vm }, query: removeFiles ? { removeFiles: 'true' } : {} });
  }
  startVm(vm: string) {
    return this.run(ROUTES.startVm, { params: { vm } });
  }
  /** `force`: stop even while NBD clients other than the VM's QEMU have its disks open. */
  stopVm(vm: string, turnOff = false, force = false) {
    const query = { ...(turnOff ? { turnOff: 'true' as const } : {}), ...(force ? { force: 'true' as const } : {}) };
    return this.run(ROUTES.stopVm, { params: { vm }, query });
  }
  saveVm(vm: string) {
    return this.run(ROUTES.saveVm, { params: { vm } });
  }
  pauseVm(vm: string) {
    return this.call(ROUTES.pauseVm, { params: { vm } });
  }
  resumeVm(vm: string) {
    return this.call(ROUTES.resumeVm, { params: { vm } });
  }
  readConsole(vm: string, offset = 0, max = 65536) {
    return this.call(ROUTES.readConsole, { params: { vm }, query: { offset: String(offset), max: String(max) } });
  }
  /** Update-VMVersion (the VM off): to `version`, or the host's default. */
  upgradeVm(vm: string, body: UpgradeVmBody = {}) {
    return this.run(ROUTES.upgradeVm, { params: { vm }, body });
  }

  /** Convert-VHD of each VHD disk (the VM off), Set-VMHardDiskDrive onto the VHDX beside it. */
  convertDisks(vm: string, body: ConvertDisksBody) {
    return this.run(ROUTES.convertDisks, { params: { vm }, body });
  }

  // ---------------------------------------------------------------- leases

  acquireLease(vm: string, body: AcquireLeaseBody) {
    return this.call(ROUTES.acquireLease, { params: { vm }, body });
  }
  renewLease(id: string) {
    return this.call(ROUTES.renewLease, { params: { id } });
  }
  releaseLease(id: string) {
    return this.call(ROUTES.releaseLease, { params: { id } });
  }
  listLeases() {
    return this.call(ROUTES.listLeases);
  }
  /** Many VMs' leases for one run, in name order, with one write on the host. */
  acquireLeases(body: AcquireLeasesBody) {
    return this.call(ROUTES.acquireLeases, { body });
  }
  renewLeases(ids: string[]) {
    return this.call(ROUTES.renewLeases, { body: { ids } });
  }
  releaseLeases(ids: string[]) {
    return this.call(ROUTES.releaseLeases, { body: { ids } });
  }

  // ---------------------------------------------------------------- imports (restore --register)

  reserveImport(body: ReserveImportBody) {
    return this.call(ROUTES.reserveImport, { body });
  }
  commitImport(name: string, body: CommitImportBody) {
    return this.call(ROUTES.commitImport, { params: { name }, body });
  }
  cancelImport(name: string) {
    return this.call(ROUTES.cancelImport, { params: { name } });
  }
  listImports() {
    return this.call(ROUTES.listImports);
  }

  // ---------------------------------------------------------------- checkpoints, reference points

  listCheckpoints(vm: string) {
    return this.call(ROUTES.listCheckpoints, { params: { vm } });
  }
  createCheckpoint(vm: string, body: CheckpointBody = {}) {
    return this.run(ROUTES.createCheckpoint, { params: { vm }, body });
  }
  deleteCheckpoint(vm: string, cp: string, opts: { lease?: string } = {}) {
    return this.run(ROUTES.deleteCheckpoint, { params: { vm, cp }, query: { lease: opts.lease } });
  }
  applyCheckpoint(vm: string, cp: string, opts: { lease?: string } = {}) {
    return this.run(ROUTES.applyCheckpoint, { params: { vm, cp }, query: { lease: opts.lease } });
  }
  convertToReferencePoint(vm: string, cp: string, body: ConvertBody = {}) {
    return this.run(ROUTES.convertToReferencePoint, { params: { vm, cp }, body });
  }
  listReferencePoints(vm: string) {
    return this.call(ROUTES.listReferencePoints, { params: { vm } });
  }
  createReferencePoint(vm: string, body: CreateRefpointBody = {}) {
    return this.run(ROUTES.createReferencePoint, { params: { vm }, body });
  }
  destroyReferencePoint(vm: string, id: string) {
    return this.call(ROUTES.destroyReferencePoint, { params: { vm, id } });
  }

  // ---------------------------------------------------------------- image management

  /** One page of GetVirtualDiskChanges. */
  changes(body: ChangesBody) {
    return this.call(ROUTES.changes, { body });
  }

  /** Every changed range of a window, paging until the processed length covers it. */
  async allChanges(body: Omit<ChangesBody, 'offset' | 'length'> & { offset?: number; length: number }) {
    const ranges: { offset: number; length: number }[] = [];
    let offset = body.offset ?? 0;
    const end = offset + body.length;
    let virtualDiskId = '';
    while (offset < end) {
      const page = await this.changes({ ...body, offset, length: end - offset });
      virtualDiskId = page.virtualDiskId;
      ranges.push(...page.ranges);
      if (page.processedLength === 0) throw new TidemarkError('PROTOCOL_ERROR', 'change query made no progress');
      offset += page.processedLength;
    }
    return { ranges, virtualDiskId };
  }

  diskInfo(p: string) {
    return this.call(ROUTES.diskInfo, { query: { path: p } });
  }
  createDisk(p: string, size: number | string, blockSize?: number) {
    return this.call(ROUTES.createDisk, { body: { path: p, size, blockSize } });
  }
  mergeDisk(p: string) {
    return this.run(ROUTES.mergeDisk, { body: { path: p } });
  }

  // ---------------------------------------------------------------- hot-plug (the 2012 R2 flow)

  hotPlug(vm: string, body: HotPlugBody) {
    return this.run(ROUTES.hotPlug, { params: { vm }, body });
  }
  hotUnplug(vm: string, id: string, lease?: string) {
    return this.call(ROUTES.hotUnplug, { params: { vm, id }, query: { lease } });
  }

  // ---------------------------------------------------------------- storage snapshots

  createSnapshotSet(body: SnapshotBody) {
    return this.run(ROUTES.createSnapshotSet, { body });
  }
  listSnapshotSets() {
    return this.call(ROUTES.listSnapshotSets);
  }
  /** `lease`: one of the leases of the run that made the set (needed while that run lives). */
  releaseSnapshotSet(id: string, succeeded = true, lease?: string) {
    return this.call(ROUTES.releaseSnapshotSet, {
      params: { id },
      query: { succeeded: succeeded ? undefined : 'false', lease },
    });
  }
  hostInfo() {
    return this.call(ROUTES.hostInfo);
  }

  // ---------------------------------------------------------------- jobs, the document

  jobInfo(id: string) {
    return this.call(ROUTES.jobInfo, { params: { id } });
  }
  listJobs() {
    return this.call(ROUTES.listJobs);
  }
  openApi() {
    return this.call(ROUTES.openApi);
  }

  /** Waits for a job and returns its result, or throws its error (with the job's code). */
  async waitJob(id: string): Promise<unknown> {
    for (;;) {
      const info = await this.call(ROUTES.waitJob, { params: { id }, query: { timeoutMs: '60000' } });
      if (info.state === 'Completed') return info.result;
      if (info.state === 'Failed') {
        throw new TidemarkError(info.error?.code ?? 'INTERNAL', info.error?.message ?? 'job failed', { job: id });
      }
    }
  }

  // ---------------------------------------------------------------- through the route table

  /** Starts a job route, waits for the job, and checks its result against the route's answer. */
  async run<R extends RouteDef & { job: true }>(route: R, ...input: Optional<CallInput<R>>): Promise<Answer<R>> {
    const info = await this.call(route, ...input);
    return checked(
      route.answer as R['answer'],
      await this.waitJob(info.id),
      `the result of job ${info.id} (${describe(route)})`,
    );
  }

  /** One request of a route: its answer (a job route: the job started), checked against the route's schema. */
  async call<R extends RouteDef>(route: R, ...[input]: Optional<CallInput<R>>): Promise<Sent<R>> {
    const { params, query, body } = (input ?? {}) as {
      params?: Record<string, string>;
      query?: Record<string, string | undefined>;
      body?: unknown;
    };
    const search = new URLSearchParams();
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) search.set(k, v);
    const url = fillPath(route.path, params) + (search.size > 0 ? `?${search}` : '');
    const { status, json } = await this.request(route.method, url, body);
    if (status >= 400) {
      const e = ErrorBody.safeParse(json);
      if (!e.success)
        throw new TidemarkError(
          'PROTOCOL_ERROR',
          `host answered ${status} to ${describe(route)} without an error body`,
        );
      throw new TidemarkError(e.data.error.code, e.data.error.message, e.data.error.details ?? {});
    }
    if (status !== answerStatus(route)) {
      throw new TidemarkError(
        'PROTOCOL_ERROR',
        `host answered ${status} to ${describe(route)}, not ${answerStatus(route)}`,
      );
    }
    return checked(route.job ? JobInfo : route.answer, json, `the answer to ${describe(route)}`) as Sent<R>;
  }

  // ---------------------------------------------------------------- transport

  private async request(method: string, url: string, body?: unknown): Promise<{ status: number; json: unknown }> {
    try {
      return await this.once(method, url, body);
    } catch (err) {
      // A kept-alive connection the host closed while this process was busy (a blocked event loop sees the
      // close late): nothing reached the host, so the request is sent once more on a new connection.
      if (err instanceof StaleConnection) return this.once(method, url, body);
      throw err;
    }
  }

  private once(method: string, url: string, body?: unknown): Promise<{ status: number; json: unknown }> {
    const ep = this.address.endpoint;
    const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const target = ep.startsWith('unix:') ? { socketPath: ep.slice(5), path: url } : { ...splitHttp(ep), path: url };
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          ...target,
          method,
          headers: {
            authorization: `Bearer ${this.address.token}`,
            // No chunked encoding: the length is known, also when there is no body.
            ...(data ? { 'content-type': 'application/json', 'content-length': data.length } : {}),
            ...(!data && method !== 'GET' ? { 'content-length': 0 } : {}),
          },
        },
        (res) => {
          const parts: Buffer[] = [];
          res.on('data', (c: Buffer) => parts.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const status = res.statusCode ?? 500;
            try {
              resolve({ status, json: JSON.parse(Buffer.concat(parts).toString('utf8') || 'null') });
            } catch {
              reject(new TidemarkError('PROTOCOL_ERROR', `host answered ${status} with a body that is not JSON`));
            }
          });
        },
      );
      req.on('error', (err: NodeJS.ErrnoException) => {
        if (req.reusedSocket && (err.code === 'EPIPE' || err.code === 'ECONNRESET')) {
          reject(new StaleConnection(`cannot reach the host at ${ep}: ${err.message}`));
          return;
        }
        reject(
          new TidemarkError(
            err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? 'NOT_FOUND' : 'IO_ERROR',
            `cannot reach the host at ${ep}: ${err.message}`,
          ),
        );
      });
      if (data) req.write(data);
      req.end();
    });
  }
}

/**
 * A request that failed on a reused keep-alive connection before the host answered anything: sent once more;
 * when that fails the same way, the caller gets it as the IO_ERROR it is.
 */
class StaleConnection extends TidemarkErrorBase<'IO_ERROR'> {
  constructor(message: string) {
    super('IO_ERROR', message);
  }
}

/** A job route's immediate answer is the job; any other route's, its answer. */
type Sent<R extends RouteDef> = R extends { job: true } ? z.output<typeof JobInfo> : Answer<R>;

/** The input may be left out when it has nothing required. */
type Optional<I> = Record<never, never> extends I ? [input?: I] : [input: I];

function describe(r: RouteDef): string {
  return `${r.method} ${r.path}`;
}

function checked<S extends z.ZodType>(schema: S, value: unknown, what: string): z.output<S> {
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  throw new TidemarkError(
    'PROTOCOL_ERROR',
    `${what} does not match the API at ${issue.path.map(String).join('.') || '(root)'}: ${issue.message}`,
  );
}

function splitHttp(ep: string): { host: string; port: number } {
  const u = new URL(ep);
  return { host: u.hostname, port: Number(u.port) };
}
