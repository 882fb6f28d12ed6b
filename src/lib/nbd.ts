/** `tidemark/nbd`: the NBD server (exports any BlockDevice, e.g. a VirtualDisk) and client (docs/library.md). */
export * from '../nbd/index.js';
export { NbdClient, type NbdTarget, type ReadResult, type StatusExtent } from '../nbd/client.js';
