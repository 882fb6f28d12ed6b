/**
 * The management API server: Fastify with the zod type provider, every route registered from the route table
 * (routes.ts) with its schemas, so requests are validated and answers serialized by the same schemas the
 * client checks and the OpenAPI document (@fastify/swagger, at /v1/openapi.json) shows.
 *
 * It holds under abuse: a bearer token checked before a body is read (a stranger's connection is closed
 * with the 401), a cap on connections that evicts strangers first (connection-gate.ts), header, request and
 * keep-alive timeouts of seconds, a body limit; errors answer `{ error: { code, message, details } }` with
 * the status of their code (status.ts).
 */
import { timingSafeEqual } from 'node:crypto';
import { chmod, unlink } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import swagger from '@fastify/swagger';
import Fastify, { type FastifyError, type FastifyInstance } from 'fastify';
import {
  createSerializerCompiler,
  hasZodFastifySchemaValidationErrors,
  jsonSchemaTransform,
  validatorCompiler,
} from 'fastify-type-provider-zod';
import { z } from 'zod';
import { TidemarkError } from '../errors.js';
import { ConnectionGate } from './connection-gate.js';
import {
  answerStatus,
  methodsFor,
  ROUTES,
  type Answer,
  type HandlerInput,
  type RouteDef,
  type RouteName,
  type Routes,
} from './routes.js';
import { ErrorBody, JobInfo } from './schemas.js';
import { HTTP_STATUS } from './status.js';

/** The limits of one listener; docs/host.md lists them. */
export interface ApiLimits {
  /** Open connections at once; at the cap a stranger's connection is evicted, or the newcomer closed. */
  maxConnections: number;
  /** From accept to the end of the request's headers. */
  headersTimeoutMs: number;
  /** From accept to the end of the request's body. */
  requestTimeoutMs: number;
  /** An idle keep-alive connection is closed after this. */
  keepAliveTimeoutMs: number;
  /** Request bodies larger than this are refused (LIMIT_EXCEEDED, 413). */
  bodyLimit: number;
}

export const DEFAULT_API_LIMITS: ApiLimits = {
  maxConnections: 256,
  headersTimeoutMs: 5_000,
  requestTimeoutMs: 10_000,
  keepAliveTimeoutMs: 5_000,
  bodyLimit: 1024 * 1024,
};

/** A job started for a route, carrying (as a type only) the result its route promises. */
export type JobStarted<T> = z.output<typeof JobInfo> & { readonly resultType?: T };

/** What a handler returns: the operation's answer, or the job started for it. */
export type Reply<R extends RouteDef> = R extends { job: true } ? JobStarted<Answer<R>> : Answer<R>;

/** One handler per route of the table (the OpenAPI document is the server's own). */
export type Handlers = {
  [K in Exclude<RouteName, 'openApi'>]: (input: HandlerInput<Routes[K]>) => Promise<Reply<Routes[K]>>;
};

export interface ApiServerOptions {
  token: string;
  /** A unix socket path (made 0600), or else loopback TCP on `port` (0: any free port) of `host`. */
  socket?: string;
  port?: number;
  host?: string;
  limits?: Partial<ApiLimits>;
}

const UNAUTHORIZED = 'missing or wrong API token (Authorization: Bearer <token from host.json>)';

export class ApiServer {
  readonly app: FastifyInstance;
  readonly limits: ApiLimits;
  private readonly gate: ConnectionGate;
  private readonly token: Buffer;

  constructor(
    handlers: Handlers,
    private readonly opts: ApiServerOptions,
  ) {
    this.token = Buffer.from(opts.token);
    const limits = (this.limits = { ...DEFAULT_API_LIMITS, ...opts.limits });
    this.app = Fastify({
      logger: false,
      bodyLimit: limits.bodyLimit,
      exposeHeadRoutes: false,
      forceCloseConnections: true,
      // Fastify leaves the timeouts of a server it did not make alone: they are all set here.
      serverFactory: (handler) =>
        http.createServer(
          {
            headersTimeout: limits.headersTimeoutMs,
            requestTimeout: limits.requestTimeoutMs,
            keepAliveTimeout: limits.keepAliveTimeoutMs,
            // How often Node looks for requests past their timeouts (default 30 s: far too late here).
            connectionsCheckingInterval: Math.min(1_000, limits.headersTimeoutMs),
            maxHeaderSize: 16 * 1024,
          },
          handler,
        ),
    });
    this.gate = new ConnectionGate(this.app.server, limits.maxConnections);
    this.app.setValidatorCompiler(validatorCompiler);
    this.app.setSerializerCompiler(
      createSerializerCompiler({ replacer: (_k, v) => (typeof v === 'bigint' ? v.toString() : v) }),
    );
    this.app.setErrorHandler((err, _req, reply) => {
      const e = asTidemarkError(err);
      void reply.code(HTTP_STATUS[e.code]).send(errorBody(e));
    });
    this.app.setNotFoundHandler((req, reply) => {
      const pathname = req.url.split('?')[0];
      const allowed = methodsFor(pathname);
      if (allowed.length > 0) {
        void reply
          .code(405)
          .header('allow', allowed.join(', '))
          .send(
            errorBody(
              new TidemarkError(
                'NOT_SUPPORTED',
                `method not allowed: ${req.method} ${pathname} (allowed: ${allowed.join(', ')})`,
              ),
            ),
          );
      } else {
        void reply
          .code(404)
          .send(errorBody(new TidemarkError('NOT_FOUND', `no such endpoint: ${req.method} ${pathname}`)));
      }
    });
    // The token, before anything else is read: a stranger's body is never parsed, and its connection ends
    // with the answer.
    this.app.addHook('onRequest', async (req, reply) => {
      if (this.authorized(req.headers.authorization)) {
        this.gate.trust(req.raw.socket);
        return;
      }
      void reply.header('connection', 'close');
      throw new TidemarkError('UNAUTHORIZED', UNAUTHORIZED);
    });
    // JSON with Fastify's own parser (it refuses __proto__ and constructor keys); an empty body is no body.
    const json = this.app.getDefaultJsonParser('error', 'error');
    this.app.removeContentTypeParser('application/json');
    this.app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
      if (body === '') done(null, undefined);
      else json(req, body.toString(), done);
    });
    // A route whose body has only optional fields may be called without one.
    this.app.addHook('preValidation', async (req) => {
      if (req.body === undefined && req.routeOptions.schema?.body) req.body = {};
    });
    void this.app.register(swagger, {
      openapi: {
        openapi: '3.1.0',
        info: {
          title: 'Tidemark host management API',
          version: '1',
          description: 'docs/host.md, "Management API". Every request carries Authorization: Bearer TOKEN (host.json).',
        },
        components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
        security: [{ bearer: [] }],
      },
      transform: jsonSchemaTransform,
      transformObject: (d) => completeDocument(('openapiObject' in d ? d.openapiObject : {}) as Doc) as object,
    });
    void this.app.register(async (api) => {
      for (const [name, r] of Object.entries(ROUTES) as [RouteName, RouteDef][]) {
        const status = answerStatus(r);
        const handler =
          name === 'openApi'
            ? async () => this.app.swagger()
            : (handlers[name] as (input: { params: unknown; query: unknown; body: unknown }) => Promise<unknown>);
        api.route({
          method: r.method,
          url: r.path,
          schema: {
            operationId: name,
            summary: r.summary,
            ...(r.job
              ? { description: 'A job: answers 202 at once; GET /v1/jobs/{id}/wait returns its result when it ends.' }
              : {}),
            ...(r.params ? { params: r.params } : {}),
            ...(r.query ? { querystring: r.query } : {}),
            ...(r.body ? { body: r.body } : {}),
            response: { [status]: r.job ? JobInfo : r.answer, '4xx': ErrorBody, '5xx': ErrorBody },
          },
          handler: async (req, reply) => {
            const out = await handler({ params: req.params, query: req.query ?? {}, body: req.body });
            void reply.code(status);
            return out;
          },
        });
      }
    });
  }

  async listen(): Promise<string> {
    if (this.opts.socket) {
      await unlink(this.opts.socket).catch(() => undefined);
      await this.app.listen({ path: this.opts.socket });
      // The store is 0700 already; the socket itself is the owner's alone too, whatever the umask.
      await chmod(this.opts.socket, 0o600);
      return `unix:${this.opts.socket}`;
    }
    await this.app.listen({ port: this.opts.port ?? 0, host: this.opts.host ?? '127.0.0.1' });
    const a = this.app.server.address() as AddressInfo;
    return `http://${a.address}:${a.port}`;
  }

  async close(): Promise<void> {
    const closing = this.app.close();
    this.gate.destroyAll();
    await closing;
    if (this.opts.socket) await unlink(this.opts.socket).catch(() => undefined);
  }

  private authorized(header: string | undefined): boolean {
    const m = /^Bearer (.+)$/.exec(header ?? '');
    if (!m) return false;
    const given = Buffer.from(m[1]);
    return given.length === this.token.length && timingSafeEqual(given, this.token);
  }
}

type Doc = { paths?: Record<string, Record<string, Record<string, unknown> | undefined> | undefined> };

/**
 * What the generator cannot know from a Fastify schema: a job route's result (`x-job-result`, the JSON schema of
 * what GET /v1/jobs/{id}/wait returns in `result`), and bodies a route takes or leaves out (`required: false`
 * when every field is optional).
 */
function completeDocument<D extends Doc>(doc: D): D {
  for (const r of Object.values(ROUTES) as RouteDef[]) {
    const op = doc.paths?.[r.path.replace(/:(\w+)/g, '{$1}')]?.[r.method.toLowerCase()];
    if (!op) continue;
    if (r.job) op['x-job-result'] = z.toJSONSchema(r.answer, { io: 'output', unrepresentable: 'any' });
    const body = op.requestBody as { required?: boolean } | undefined;
    if (body && r.body?.safeParse({}).success) body.required = false;
  }
  return doc;
}

function errorBody(e: TidemarkError): z.input<typeof ErrorBody> {
  return { error: { code: e.code, message: e.message, details: e.details } };
}

/** Every failure as a TidemarkError: the host's own, Fastify's (schema, JSON, size), or an unexpected one. */
export function asTidemarkError(err: unknown): TidemarkError {
  if (err instanceof TidemarkError) return err;
  if (hasZodFastifySchemaValidationErrors(err)) {
    const where = err.validationContext === 'querystring' ? 'query' : (err.validationContext ?? 'request');
    const issues = err.validation.map((v) => ({
      field: v.instancePath.replace(/^\//, '').replace(/\//g, '.') || '(root)',
      message: v.message ?? 'invalid',
    }));
    return new TidemarkError(
      'INVALID_ARGUMENT',
      `invalid request ${where} at ${issues[0].field}: ${issues[0].message}`,
      {
        in: where,
        issues,
      },
    );
  }
  const f = err as Partial<FastifyError> & { cause?: { issues?: { path: PropertyKey[]; message: string }[] } };
  if (f.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    return new TidemarkError('LIMIT_EXCEEDED', `request body over the limit: ${f.message}`);
  }
  if (f.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || f instanceof SyntaxError) {
    const why = f instanceof SyntaxError ? f.message : ((f.cause as Error | undefined)?.message ?? f.message);
    return new TidemarkError('INVALID_ARGUMENT', `request body is not JSON: ${why}`);
  }
  if (f.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
    return new TidemarkError('INVALID_ARGUMENT', `request body is not JSON (send content-type: application/json)`);
  }
  if (f.code === 'FST_ERR_RESPONSE_SERIALIZATION') {
    // The host's answer breaks the contract: a bug of the host, said with the first place it breaks.
    const issue = f.cause?.issues?.[0];
    const at = issue ? ` at ${issue.path.map(String).join('.') || '(root)'}: ${issue.message}` : '';
    return new TidemarkError('INTERNAL', `the host's answer does not match the API schema${at}`);
  }
  if (typeof f.statusCode === 'number' && f.statusCode >= 400 && f.statusCode < 500) {
    return new TidemarkError('INVALID_ARGUMENT', `invalid request: ${f.message ?? 'unreadable'}`);
  }
  return new TidemarkError('INTERNAL', `internal error: ${(err as Error)?.message ?? String(err)}`);
}
