/**
 * The backup reader's zero detection: the chunks it skips are exactly those the export's base:allocation
 * calls zero all through, however the chunks asked for are split into runs and however many runs are asked
 * at once. Seed: TIDEMARK_READER_SEED (printed).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { zeroChunks } from '../../src/backup/disk-reader.js';
import { NbdClient } from '../../src/nbd/client.js';
import { CONTEXT_BASE_ALLOCATION } from '../../src/nbd/protocol.js';
import { rng, seedFrom } from '../helpers/random.js';
import { startServer, type RunningServer } from '../nbd/fixture.js';
import { CLUSTER, MemoryDevice } from '../nbd/memory-device.js';

const SEED = seedFrom('TIDEMARK_READER_SEED', 20261125);
console.log(`disk reader seed ${SEED} (set TIDEMARK_READER_SEED to replay)`);

const CHUNK = 4 * CLUSTER;
const SIZE = 256 * CHUNK - 3 * CLUSTER; // the last chunk is short

describe(`backup reader: zero chunks from block status (seed ${SEED})`, () => {
  let device: MemoryDevice;
  let srv: RunningServer;
  beforeAll(async () => {
    device = new MemoryDevice({ size: SIZE });
    const r = rng(SEED);
    for (let c = 0; c < SIZE / CLUSTER; c++) if (r.int(5) === 0) await device.write(c * CLUSTER, r.bytes(CLUSTER));
    srv = await startServer([{ name: 'disk', device }]);
  });
  afterAll(async () => srv.stop());

  it('skips exactly the chunks that are zero all through, asked one run or many at a time', async () => {
    const nbd = await NbdClient.connect({
      socket: srv.socket,
      exportName: 'disk',
      contexts: [CONTEXT_BASE_ALLOCATION],
    });
    const plain = await NbdClient.connect({ socket: srv.socket, exportName: 'disk' });
    try {
      const r = rng(SEED + 1);
      const count = Math.ceil(SIZE / CHUNK);
      const isZero = (c: number) => {
        for (let at = c * CHUNK; at < Math.min(SIZE, (c + 1) * CHUNK); at += CLUSTER) {
          if (device.allocated[at / CLUSTER]) return false;
        }
        return true;
      };
      for (let round = 0; round < 20; round++) {
        // Every chunk (a full read), or a seeded subset in runs of various lengths (an incremental).
        const chunks =
          round === 0
            ? Array.from({ length: count }, (_, c) => c)
            : Array.from({ length: count }, (_, c) => c).filter(() => r.int(3) === 0);
        const expected = chunks.filter(isZero);
        for (const parallel of [1, 8]) {
          const got = await zeroChunks(nbd, chunks, CHUNK, SIZE, parallel);
          expect(
            [...got].sort((a, b) => a - b),
            `round ${round}, parallel ${parallel}`,
          ).toEqual(expected);
        }
      }
      // Without the context nothing is skipped (every chunk is read).
      expect((await zeroChunks(plain, [0, 1, 2], CHUNK, SIZE)).size).toBe(0);
    } finally {
      await nbd.close();
      await plain.close();
    }
  });
});
