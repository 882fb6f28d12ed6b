/**
 * The typed client of the host's management API: the CLI and the backup application talk to a host only
 * through it. Errors come back as TidemarkErrors with the server's code; jobs can be waited on.
 */
import http from 'node:http';
import path from 'node:path';
import { TidemarkError, type ErrorCode } from '../errors.js';
import type { Checkpoint, ReferencePoint, VmDefinition } from '../host/definition.js';
import type { VmSummary } from '../host/host.js';
import type { ImportInfo } from '../host/imports.js';
import type { JobInfo } from '../host/jobs.js';
import type { LeaseInfo } from '../host/leases.js';
import type { ChangesResult } from '../tracking/tracker.js';
import type { SnapshotSetInfo } from '../host/snapshot-sets.js';
import { readSmallFile } from '../util/safe-open.js';
import type {
  AcquireLeaseBody,
  ChangesBody,
  CheckpointBody,
  CommitImportBody,
  ConvertBody,
  CreateRefpointBody,
  CreateVmBody,
  ModifyVmBody,
  ReserveImportBody,
  SnapshotBody,
  UpgradeVmBody,
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

  listVms(): Promise<VmSummary[]> {
    return this.call('GET', '/v1/vms');
  }
  showVm(name: string): Promise<VmSummary & { definition: VmDefinition }> {
    return this.call('GET', `/v1/vms/${enc(name)}`);
  }
  createVm(body: CreateVmBody): Promise<VmSummary> {
    return this.call('POST', '/v1/vms', body);
  }
  modifyVm(name: string, body: ModifyVmBody): Promise<VmSummary> {
    return this.call('PATCH', `/v1/vms/${enc(name)}`, body);
  }
  deleteVm(name: string, removeFiles = false): Promise<unknown> {
    return this.call('DELETE', `/v1/vms/${enc(name)}${removeFiles ? '?removeFiles=true' : ''}`);
  }
  startVm(name: string): Promise<VmSummary> {
    return this.job('POST', `/v1/vms/${enc(name)}/start`);
  }
  stopVm(name: string, turnOff = false): Promise<VmSummary> {
    return this.job('POST', `/v1/vms/${enc(name)}/stop${turnOff ? '?turnOff=true' : ''}`);
  }
  saveVm(name: string): Promise<VmSummary> {
    return this.job('POST', `/v1/vms/${enc(name)}/save`);
  }
  pauseVm(name: string): Promise<VmSummary> {
    return this.call('POST', `/v1/vms/${enc(name)}/pause`);
  }
  resumeVm(name: string): Promise<VmSummary> {
    return this.call('POST', `/v1/vms/${enc(name)}/resume`);
  }
  readConsole(name: string, offset = 0, max = 65536): Promise<{ data: string; offset: number; size: number }> {
    return this.call('GET', `/v1/vms/${enc(name)}/console?offset=${offset}&max=${max}`);
  }
  /** Update-VMVersion (the VM off): to `version`, or the host's default. */
  upgradeVm(name: string, body: UpgradeVmBody = {}): Promise<VmSummary> {
    return this.job('POST', `/v1/vms/${enc(name)}/upgrade`, body);
  }

  // ---------------------------------------------------------------- leases

  acquireLease(vm: string, body: AcquireLeaseBody): Promise<LeaseInfo> {
    return this.call('POST', `/v1/vms/${enc(vm)}/lease`, body);
  }
  renewLease(id: string): Promise<LeaseInfo> {
    return this.call('POST', `/v1/leases/${enc(id)}/renew`);
  }
  releaseLease(id: string): Promise<unknown> {
    return this.call('DELETE', `/v1/leases/${enc(id)}`);
  }
  listLeases(): Promise<LeaseInfo[]> {
    return this.call('GET', '/v1/leases');
  }

  // ---------------------------------------------------------------- imports (restore --register)

  reserveImport(body: ReserveImportBody): Promise<ImportInfo> {
    return this.call('POST', '/v1/imports', body);
  }
  commitImport(name: string, body: CommitImportBody): Promise<VmSummary> {
    return this.call('POST', `/v1/imports/${enc(name)}/commit`, body);
  }
  cancelImport(name: string): Promise<unknown> {
    return this.call('DELETE', `/v1/imports/${enc(name)}`);
  }
  listImports(): Promise<ImportInfo[]> {
    return this.call('GET', '/v1/imports');
  }

  // ---------------------------------------------------------------- checkpoints, reference points

  listCheckpoints(vm: string): Promise<(Checkpoint & { current: boolean })[]> {
    return this.call('GET', `/v1/vms/${enc(vm)}/checkpoints`);
  }
  createCheckpoint(vm: string, body: CheckpointBody = {}): Promise<Checkpoint> {
    return this.job('POST', `/v1/vms/${enc(vm)}/checkpoints`, body);
  }
  deleteCheckpoint(vm: string, cp: string, opts: { lease?: string } = {}): Promise<void> {
    return this.job('DELETE', `/v1/vms/${enc(vm)}/checkpoints/${enc(cp)}${leaseQuery(opts.lease, '?')}`);
  }
  applyCheckpoint(vm: string, cp: string, opts: { lease?: string } = {}): Promise<void> {
    return this.job('POST', `/v1/vms/${enc(vm)}/checkpoints/${enc(cp)}/apply${leaseQuery(opts.lease, '?')}`);
  }
  convertToReferencePoint(vm: string, cp: string, body: ConvertBody = {}): Promise<ReferencePoint> {
    return this.job('POST', `/v1/vms/${enc(vm)}/checkpoints/${enc(cp)}/convert`, body);
  }
  listReferencePoints(vm: string): Promise<ReferencePoint[]> {
    return this.call('GET', `/v1/vms/${enc(vm)}/refpoints`);
  }
  createReferencePoint(vm: string, body: CreateRefpointBody = {}): Promise<ReferencePoint> {
    return this.job('POST', `/v1/vms/${enc(vm)}/refpoints`, body);
  }
  destroyReferencePoint(vm: string, id: string): Promise<unknown> {
    return this.call('DELETE', `/v1/vms/${enc(vm)}/refpoints/${enc(id)}`);
  }

  // ---------------------------------------------------------------- image management

  /** One page of GetVirtualDiskChanges. */
  changes(body: ChangesBody): Promise<ChangesResult & { virtualDiskId: string }> {
    return this.call('POST', '/v1/changes', body);
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

  diskInfo(p: string): Promise<unknown> {
    return this.call('GET', `/v1/disks/info?path=${enc(p)}`);
  }
  createDisk(p: string, size: number | string, blockSize?: number): Promise<{ path: string }> {
    return this.call('POST', '/v1/disks', { path: p, size, blockSize });
  }
  mergeDisk(p: string): Promise<{ parentPath: string; bytesCopied: number }> {
    return this.job('POST', '/v1/disks/merge', { path: p });
  }

  // ---------------------------------------------------------------- storage snapshots

  createSnapshotSet(body: SnapshotBody): Promise<SnapshotSetInfo> {
    return this.job('POST', '/v1/snapshot-sets', body);
  }
  listSnapshotSets(): Promise<SnapshotSetInfo[]> {
    return this.call('GET', '/v1/snapshot-sets');
  }
  /** `lease`: one of the leases of the run that made the set (needed while that run lives). */
  releaseSnapshotSet(id: string, succeeded = true, lease?: string): Promise<unknown> {
    const q = `${succeeded ? '' : '?succeeded=false'}`;
    return this.call('DELETE', `/v1/snapshot-sets/${enc(id)}${q}${leaseQuery(lease, q ? '&' : '?')}`);
  }
  hostInfo(): Promise<{
    store: string;
    nbd: { socket?: string; host?: string; port?: number };
    snapshotsTaken: number;
    allowedDiskDirs: string[];
    configVersions: { supported: string[]; default: string };
  }> {
    return this.call('GET', '/v1/host');
  }

  // ---------------------------------------------------------------- jobs

  jobInfo(id: string): Promise<JobInfo> {
    return this.call('GET', `/v1/jobs/${enc(id)}`);
  }
  listJobs(): Promise<JobInfo[]> {
    return this.call('GET', '/v1/jobs');
  }

  /** Waits for a job and returns its result, or throws its error (with the job's code). */
  async waitJob<T>(id: string): Promise<T> {
    for (;;) {
      const info = await this.call<JobInfo>('GET', `/v1/jobs/${enc(id)}/wait?timeoutMs=60000`);
      if (info.state === 'Completed') return info.result as T;
      if (info.state === 'Failed') {
        throw new TidemarkError((info.error?.code ?? 'IO_ERROR') as ErrorCode, info.error?.message ?? 'job failed', {
          job: id,
        });
      }
    }
  }

  /** Starts a job and waits for it. */
  async job<T>(method: string, url: string, body?: unknown): Promise<T> {
    const info = await this.call<JobInfo>(method, url, body);
    return this.waitJob<T>(info.id);
  }

  openApi(): Promise<unknown> {
    return this.call('GET', '/v1/openapi.json');
  }

  // ---------------------------------------------------------------- transport

  call<T>(method: string, url: string, body?: unknown, retried = false): Promise<T> {
    const ep = this.address.endpoint;
    const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const target = ep.startsWith('unix:') ? { socketPath: ep.slice(5), path: url } : { ...splitHttp(ep), path: url };
    return new Promise<T>((resolve, reject) => {
      const req = http.request(
        {
          ...target,
          method,
          headers: {
            authorization: `Bearer ${this.address.token}`,
            ...(data ? { 'content-type': 'application/json', 'content-length': data.length } : {}),
          },
        },
        (res) => {
          const parts: Buffer[] = [];
          res.on('data', (c: Buffer) => parts.push(c));
          res.on('error', reject);
          res.on('end', () => {
            let json: unknown;
            try {
              json = JSON.parse(Buffer.concat(parts).toString('utf8') || 'null');
            } catch {
              reject(
                new TidemarkError('PROTOCOL_ERROR', `host answered ${res.statusCode} with a body that is not JSON`),
              );
              return;
            }
            if ((res.statusCode ?? 500) >= 400) {
              const e = (json as { error?: { code?: string; message?: string } })?.error;
              reject(
                new TidemarkError(
                  (e?.code ?? 'IO_ERROR') as ErrorCode,
                  e?.message ?? `host answered ${res.statusCode}`,
                ),
              );
            } else resolve(json as T);
          });
        },
      );
      req.on('error', (err: NodeJS.ErrnoException) => {
        // A kept-alive connection the host closed (idle) just as this request reused it: the host never read the
        // request, so it goes once more on a new connection (as Node's documentation advises for reusedSocket).
        if (!retried && req.reusedSocket && (err.code === 'ECONNRESET' || err.code === 'EPIPE')) {
          this.call<T>(method, url, body, true).then(resolve, reject);
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

function enc(s: string): string {
  return encodeURIComponent(s);
}

function leaseQuery(lease: string | undefined, sep: '?' | '&'): string {
  return lease === undefined ? '' : `${sep}lease=${enc(lease)}`;
}

function splitHttp(ep: string): { host: string; port: number } {
  const u = new URL(ep);
  return { host: u.hostname, port: Number(u.port) };
}
