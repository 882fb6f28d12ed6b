/**
 * The OpenAPI document the server serves at /v1/openapi.json validates (@apidevtools/swagger-parser, OpenAPI
 * 3.1) and lists every route of the table, with its operation id, parameters, body, answer and the bearer
 * scheme; the tables of docs/host.md equal what the route table and the status map generate; docs/errors.md
 * lists every error code.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import SwaggerParser from '@apidevtools/swagger-parser';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import {
  between,
  normalizeTable,
  ROUTES_BEGIN,
  ROUTES_END,
  routeTable,
  STATUS_BEGIN,
  STATUS_END,
  statusTable,
} from '../../src/api/route-doc.js';
import { ROUTES, type RouteDef } from '../../src/api/routes.js';
import { ApiServer, type Handlers } from '../../src/api/server.js';
import { HTTP_STATUS } from '../../src/api/status.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { tempDir } from '../helpers/peers.js';

let cleanup: () => Promise<void>;
let server: ApiServer;
let doc: Awaited<ReturnType<HostClient['openApi']>>;

beforeAll(async () => {
  let dir: string;
  ({ dir, cleanup } = await tempDir('api-openapi'));
  // The document is the server's own: no host behind it is needed to serve it.
  const nothing = new Proxy({} as Handlers, {
    get: () => async () => {
      throw new Error('not called');
    },
  });
  const sock = path.join(dir, 'api.sock');
  server = new ApiServer(nothing, { token: 't', socket: sock });
  await server.listen();
  doc = await new HostClient({ endpoint: `unix:${sock}`, token: 't' }).openApi();
});
afterAll(async () => {
  await server?.close();
  await cleanup?.();
});

type Operation = {
  operationId?: string;
  'x-job-result'?: { properties?: Record<string, unknown> };
  parameters?: { name: string; in: string; required?: boolean }[];
  requestBody?: { required?: boolean; content: Record<string, { schema: unknown }> };
  responses: Record<string, { content?: Record<string, { schema: Record<string, unknown> }> }>;
};

describe('the OpenAPI document', () => {
  it('is valid OpenAPI 3.1', async () => {
    expect(doc.openapi).toBe('3.1.0');
    // validate() dereferences in place: give it a copy.
    await expect(SwaggerParser.validate(structuredClone(doc) as never)).resolves.toBeTruthy();
  });

  it('lists every route of the table, with its parameters, body, answers and the bearer scheme', () => {
    const paths = doc.paths as Record<string, Record<string, Operation>>;
    const listed = Object.entries(paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`));
    const table = (Object.values(ROUTES) as RouteDef[]).map((r) => `${r.method} ${r.path.replace(/:(\w+)/g, '{$1}')}`);
    expect(listed.sort()).toEqual(table.sort());
    for (const [name, r] of Object.entries(ROUTES) as [string, RouteDef][]) {
      const op = paths[r.path.replace(/:(\w+)/g, '{$1}')][r.method.toLowerCase()];
      expect(op.operationId).toBe(name);
      const pathParams = [...r.path.matchAll(/:(\w+)/g)].map((m) => m[1]);
      expect(
        (op.parameters ?? []).filter((p) => p.in === 'path').map((p) => p.name),
        name,
      ).toEqual(pathParams);
      expect(op.requestBody !== undefined, `${name} body`).toBe(r.body !== undefined);
      if (op.requestBody) expect(op.requestBody.required, name).toBe(!r.body!.safeParse({}).success);
      expect(op['x-job-result'] !== undefined, `${name} job result`).toBe(r.job === true);
      const ok = r.job ? '202' : '200';
      expect(Object.keys(op.responses).sort(), name).toEqual([ok, '4XX', '5XX'].sort());
      expect(op.responses[ok].content?.['application/json']?.schema, name).toBeTruthy();
    }
    expect(doc.components).toMatchObject({ securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } });
    expect(doc.security).toEqual([{ bearer: [] }]);
  });

  it("gives a job route's result schema", () => {
    const paths = doc.paths as Record<string, Record<string, Operation>>;
    const start = paths['/v1/vms/{vm}/start'].post['x-job-result'];
    expect(Object.keys(start?.properties ?? {})).toEqual(expect.arrayContaining(['name', 'state', 'disks']));
  });

  it('describes the error body with every code', () => {
    const paths = doc.paths as Record<string, Record<string, Operation>>;
    const err = paths['/v1/vms'].post.responses['4XX'].content!['application/json'].schema as {
      properties: { error: { properties: { code: { enum: string[] } } } };
    };
    expect(err.properties.error.properties.code.enum.sort()).toEqual(Object.keys(HTTP_STATUS).sort());
  });
});

describe('the docs follow the code', () => {
  it("docs/host.md's route and status tables are the generated ones (node scripts/api-doc.mjs rewrites them)", async () => {
    const host = await readFile(path.join(REPO_ROOT, 'docs', 'host.md'), 'utf8');
    const routes = between(host, ROUTES_BEGIN, ROUTES_END);
    const statuses = between(host, STATUS_BEGIN, STATUS_END);
    expect(routes, 'route table markers in docs/host.md').toBeDefined();
    expect(statuses, 'status table markers in docs/host.md').toBeDefined();
    expect(normalizeTable(routes!)).toBe(normalizeTable(routeTable()));
    expect(normalizeTable(statuses!)).toBe(normalizeTable(statusTable()));
  });

  it('docs/errors.md lists every error code (docs/cli.md points there)', async () => {
    const cli = await readFile(path.join(REPO_ROOT, 'docs', 'errors.md'), 'utf8');
    for (const code of Object.keys(HTTP_STATUS)) expect(cli, code).toContain(`| \`${code}\``);
  });
});
