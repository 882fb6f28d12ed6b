/** Guest integration: the QEMU guest-agent protocol client, freezeAround, and the reference agent. */
export { GuestAgentClient, DEFAULT_TIMEOUT_MS } from './client.js';
export type { CallOptions, ClientStats, GuestAgentClientOptions, GuestCommandInfo, GuestInfo } from './client.js';
export { freezeAround } from './freeze.js';
export type { Consistency, FreezeAroundOptions, FreezeOutcome } from './freeze.js';
export { GuestAgent } from './agent.js';
export type { GuestAgentOptions } from './agent.js';
export { GuestAgentError, COMMANDS } from './protocol.js';
export type { FreezeStatus } from './protocol.js';
