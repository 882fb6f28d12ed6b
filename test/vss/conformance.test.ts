/** Runs the VSS conformance suite on the test writers, the scripted provider and the storage-snapshot adapter. */
import { mkdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { CowProvider } from '../../src/snapshot/cow.js';
import { ReflinkProvider } from '../../src/snapshot/reflink.js';
import { tempDir } from '../helpers/peers.js';
import { adapterSetup, providerConformance, writerConformance } from './conformance.js';
import { AppWriter, CopySnapshotProvider, ScriptedProvider, ScriptedWriter } from './fixtures.js';

writerConformance('scripted writer (all phases succeed)', () => new ScriptedWriter({ name: 'scripted' }));

let app: AppWriter | undefined;
let appDir: { dir: string; cleanup: () => Promise<void> } | undefined;
writerConformance(
  'application writer (real file I/O, freeze at a record boundary)',
  async () => {
    appDir = await tempDir('vss-app');
    app = new AppWriter(appDir.dir);
    await app.start();
    return app;
  },
  {
    files: () => [app!.db, app!.log],
    teardown: async () => {
      await app?.stop();
      await appDir?.cleanup();
    },
  },
);

providerConformance('scripted provider', async (dir) => {
  const provider = new ScriptedProvider('scripted');
  return { provider, files: [path.join(dir, 'x'), path.join(dir, 'y')], held: async () => provider.held() };
});

providerConformance(
  'snapshot adapter over an in-test copying SnapshotProvider',
  adapterSetup(() => new CopySnapshotProvider()),
);

providerConformance(
  'snapshot adapter over the cow provider (src/snapshot/cow.ts)',
  adapterSetup(() => new CowProvider()),
);

// Reflink needs XFS or btrfs under the temporary directory: run where it can, say so loudly where it cannot.
const probe = await tempDir('vss-reflink-probe');
await mkdir(path.join(probe.dir, 'areas'));
await writeFile(path.join(probe.dir, 'f'), 'x');
const reflinkReason = await new ReflinkProvider().supports([path.join(probe.dir, 'f')], {
  diffAreaRoot: path.join(probe.dir, 'areas'),
});
await rm(probe.dir, { recursive: true, force: true });
if (reflinkReason) console.warn(`SKIPPED: provider conformance of the adapter over reflink: ${reflinkReason}`);
else
  providerConformance(
    'snapshot adapter over the reflink provider (src/snapshot/reflink.ts)',
    adapterSetup(() => new ReflinkProvider()),
  );
