/**
 * `tidemark/client`: the typed client of a Tidemark host's API (docs/library.md, docs/host.md). Every method is
 * one route of the API; answers are checked against the API's schemas; errors come back as TidemarkErrors.
 */
export { HostClient, readHostFile, resolveHost, type HostAddress } from '../api/client.js';
export { ROUTES, type Answer, type CallInput, type RouteDef } from '../api/routes.js';
export type * from '../api/schemas.js';
