/**
 * The layers of shared DESIGN.md as a checked rule (`npm run lint`, and test/layers.test.ts in the suite).
 *
 * "formats know nothing above them; tracking and disk build on formats; nbd and snapshot build on disk; guest is a
 * protocol client of its own; host builds on those and vss; backup talks to the host only through its API client,
 * reads data through NBD, and writes the repository; cli and api sit on top. An arrow never points down-to-up."
 *
 * Each folder of src/ is a layer and may import only the layers listed for it below, its own files, util/ and
 * errors.ts. A folder missing from the table may import nothing but util/ and errors.ts, and only cli may import it:
 * a new folder has to be placed here. Type-only imports count (a type cycle is a cycle).
 */

/** Layer → the layers it may import (besides itself, util/ and errors.ts). */
export const LAYERS = {
  formats: [],
  tracking: ['formats'],
  disk: ['formats', 'tracking'],
  nbd: ['formats', 'tracking', 'disk'],
  snapshot: ['formats', 'tracking', 'disk'],
  // VSS providers are storage-snapshot providers.
  vss: ['formats', 'tracking', 'disk', 'snapshot'],
  // The host side of the guest channel and the reference agent: a protocol of its own.
  guest: [],
  host: ['formats', 'tracking', 'disk', 'nbd', 'snapshot', 'vss', 'guest'],
  // The API's server side adapts the Host (api/handlers.ts); its contract (schemas, routes, client) is wire only,
  // see api-contract-is-wire below.
  api: ['formats', 'tracking', 'disk', 'nbd', 'snapshot', 'vss', 'guest', 'host'],
  // The store of restore points knows nothing of VMs or disks: backup and cli write and read it.
  repository: [],
  // The host only through the API client (backup-reaches-host-through-api), data through NBD, restored disks as
  // VHDX files.
  backup: ['api', 'nbd', 'repository', 'formats'],
  // The composition root of `tidemark host`: the Host and the API server, wired together.
  daemon: ['formats', 'tracking', 'disk', 'nbd', 'snapshot', 'vss', 'guest', 'host', 'api'],
  // Tools the CLI runs, used by nothing else: the guest image builder and the guest workload generator.
  'guest-image': [],
  workload: [],
  // The package's entry points (package.json `exports`), should they live in src/lib/: re-exports of the engines
  // and the API client; nothing in src/ imports them, and they never reach the CLI or the daemon.
  lib: ['formats', 'tracking', 'disk', 'nbd', 'snapshot', 'vss', 'guest', 'host', 'api', 'repository', 'backup'],
};

const ALL = Object.keys(LAYERS);
const oneOf = (names) => `(${names.join('|')})`;
/** Modules every layer may import. */
const SHARED = ['^src/util/', '^src/errors\\.ts$'];

const layerRules = Object.entries(LAYERS).map(([layer, allowed]) => ({
  name: `layer-${layer}`,
  comment: `${layer}/ may import only ${[...allowed, 'util', 'errors'].join(', ')} (DESIGN.md's layers)`,
  severity: 'error',
  from: { path: `^src/${layer}/` },
  to: { path: '^src/', pathNot: [`^src/${oneOf([layer, ...allowed])}/`, ...SHARED] },
}));

/** The API's server side; the rest of api/ is its contract (schemas, routes, client, status map, OpenAPI document). */
const API_SERVER_SIDE = '^src/api/(server|handlers|connection-gate)\\.ts$';

export default {
  forbidden: [
    {
      name: 'no-circular',
      comment: 'no cycles, type-only imports included',
      severity: 'error',
      from: {},
      to: { circular: true },
    },
    {
      name: 'not-to-unresolvable',
      comment: 'an import that does not resolve would escape every other rule',
      severity: 'error',
      from: { path: '^src/' },
      to: { couldNotResolve: true },
    },
    ...layerRules,
    {
      name: 'layer-cli-on-top',
      comment: 'cli sits on top: no layer imports it',
      severity: 'error',
      from: { path: '^src/', pathNot: '^src/cli/' },
      to: { path: '^src/cli/' },
    },
    {
      name: 'layer-unplaced',
      comment: `a folder of src/ that is not in the table (${ALL.join(', ')}, cli, util) imports only util and errors`,
      severity: 'error',
      from: { path: '^src/', pathNot: [`^src/${oneOf([...ALL, 'cli', 'util'])}/`, '^src/errors\\.ts$'] },
      to: { path: '^src/', pathNot: SHARED },
    },
    {
      name: 'util-imports-nothing-above',
      comment: 'util/ is importable by all, so it imports nothing but util/ and errors.ts',
      severity: 'error',
      from: { path: '^src/util/' },
      to: { path: '^src/', pathNot: SHARED },
    },
    {
      name: 'errors-imports-nothing',
      comment: 'errors.ts is importable by all, so it imports nothing of src/',
      severity: 'error',
      from: { path: '^src/errors\\.ts$' },
      to: { path: '^src/' },
    },
    {
      name: 'api-contract-is-wire',
      comment:
        'wire types live in api/: the contract (schemas, routes, client, status) imports nothing of the host or the server side',
      severity: 'error',
      from: { path: '^src/api/', pathNot: API_SERVER_SIDE },
      to: { path: '^src/', pathNot: ['^src/api/(?!(server|handlers|connection-gate)\\.ts$)', ...SHARED] },
    },
    {
      name: 'backup-reaches-host-through-api',
      comment: "backup talks to the host only through the API's client and contract, never its server side",
      severity: 'error',
      from: { path: '^src/backup/' },
      to: { path: API_SERVER_SIDE },
    },
    {
      name: 'daemon-only-from-cli',
      comment: 'the daemon is the composition root: only the cli starts it',
      severity: 'error',
      from: { path: '^src/', pathNot: ['^src/cli/', '^src/daemon/'] },
      to: { path: '^src/daemon/' },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    tsConfig: { fileName: 'tsconfig.json' },
    // Type-only imports are dependencies too: a type cycle or an upward type import is a violation.
    tsPreCompilationDeps: true,
    enhancedResolveOptions: { exportsFields: ['exports'], conditionNames: ['import', 'require', 'node', 'default'] },
  },
};
