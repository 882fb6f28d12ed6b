/** The guest image: a small Linux guest from Debian packages (kernel, busybox, qemu-ga, sqlite3, e2fsprogs). */
export { buildGuestImage, defaultCacheDir, defaultImageDir, readManifest, BUILDER_VERSION } from './builder.js';
export type { BuildOptions, BuildResult, GuestImageManifest, ManifestPackage } from './builder.js';
export { defaultCmdline, WORKLOADS } from './scripts.js';
export type { Workload } from './scripts.js';
