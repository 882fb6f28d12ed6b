/** Tidemark's NBD server: exports BlockDevices to NBD clients (QEMU, qemu-io, nbdcopy, nbdinfo, the kernel). */
export {
  NbdServer,
  nbdUri,
  type ConnectionInfo,
  type ExportInfo,
  type ExportOptions,
  type NbdAddress,
  type NbdListenOptions,
  type NbdServerOptions,
  type NbdStats,
} from './server.js';
export type { NbdEvent } from './connection.js';
export { DEFAULT_LIMITS, type NbdLimits } from './limits.js';
export { isLoopback } from './listen.js';
export { loadClientTls, TlsCredentials, TLS_CLIENT_FILES, TLS_FILES, type ClientTls } from './tls.js';
export { NbdProtocolError, nbdErrorFor } from './errors.js';
/** The wire format (constants and encode/decode pairs), for clients and tests. */
export * as protocol from './protocol.js';
export { ByteQueue } from './parser.js';
