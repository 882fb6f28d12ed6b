/**
 * Every allocated BAT entry is checked against every structure of the file and every other entry
 * (src/formats/vhdx/placement.ts): the scan itself on synthetic BATs, then real files whose entries were
 * patched to point into the header section, the log, the BAT, the metadata region, another block, past the
 * end of the file and beyond 128 TiB. For each: reads of the damaged block fail naming the block and what
 * it points into, other reads work, a writable open writes nothing and refuses every write, `check`
 * reports the entry, and `check --repair` repairs it as documented (docs/formats/vhdx.md).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { bitmapBatIndex, computeGeometry, countEntryKinds, encodeBatEntry } from '../../src/formats/vhdx/bat.js';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { MiB, REGION_BAT, REGION_METADATA } from '../../src/formats/vhdx/constants.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { Placement, structureSpans, type Damaged } from '../../src/formats/vhdx/placement.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { guidFromString } from '../../src/util/guid.js';
import { missingPeers, qemuImgCheck, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const SEED = seedFrom('TIDEMARK_PLACEMENT_SEED', 4711);
console.log(`placement seed ${SEED} (set TIDEMARK_PLACEMENT_SEED to replay)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('placement'));
});
afterAll(async () => cleanup?.());

async function rejection(p: Promise<unknown>): Promise<TidemarkError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'expected a rejection').toBeInstanceOf(TidemarkError);
  expect((err as Error).message).not.toMatch(/[\r\n]/);
  return err as TidemarkError;
}

// ------------------------------------------------------------------------------------------------
// The scan on synthetic BATs

describe('Placement.scan', () => {
  const g = computeGeometry(16 * MiB, MiB, 512, false);
  const regions = [
    { guid: REGION_METADATA, fileOffset: 2 * MiB, length: MiB },
    { guid: REGION_BAT, fileOffset: 3 * MiB, length: MiB },
  ];
  const spans = structureSpans({ offset: MiB, length: MiB }, regions);

  async function scan(entries: [number, number, number][], fileSize = 20 * MiB, geometry = g, s = spans) {
    const bat = Buffer.alloc(geometry.batEntries * 8);
    for (const [index, state, offset] of entries) {
      const [lo, hi] = encodeBatEntry(state, offset);
      bat.writeUInt32LE(lo, index * 8);
      bat.writeUInt32LE(hi, index * 8 + 4);
    }
    const seen: Damaged[] = [];
    const p = await Placement.scan(
      { geometry, fileSize, spans: s, readBat: async (dst, first) => void bat.copy(dst, 0, first * 8) },
      { onDamaged: (d) => void seen.push(d) },
    );
    return { p, seen };
  }

  it('a clean BAT: nothing damaged, the end of the furthest block known', async () => {
    const { p } = await scan([
      [0, 6, 4 * MiB],
      [1, 6, 5 * MiB],
      [15, 6, 19 * MiB],
      [2, 2, 0], // ZERO: not allocated
      [3, 0, 2 * MiB], // NOT_PRESENT with a stale offset into the metadata: ignored, as the spec says
    ]);
    expect(p.clean).toBe(true);
    expect(p.damagedCount).toBe(0);
    expect(p.presentEnd).toBe(20 * MiB);
    expect(p.problemAt(4 * MiB, MiB)).toBeUndefined();
    expect(p.problemAt(2 * MiB, MiB)).toBe('points into the metadata region [2097152, 3145728)');
  });

  it('each structure, another block, the end of the file and the limit', async () => {
    const { p, seen } = await scan([
      [0, 6, 4 * MiB],
      [1, 6, 2 * MiB], // metadata
      [2, 6, 0], // header section
      [3, 7, 3 * MiB], // BAT (partially present: also checked)
      [4, 6, MiB], // log
      [5, 6, 4 * MiB], // block 0's space
      [6, 6, 20 * MiB], // wholly past the end
      [7, 6, 2 ** 50], // beyond 128 TiB
      [8, 6, 19 * MiB], // fine
    ]);
    expect(p.clean).toBe(false);
    expect(p.damagedCount).toBe(7);
    expect(seen.map((d) => d.entry.number)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    const by = (n: number) => seen.find((d) => d.entry.number === n)!;
    expect(by(1).problems).toMatchObject([{ kind: 'structure', span: { name: 'the metadata region' } }]);
    expect(by(2).problems).toMatchObject([{ kind: 'structure', span: { name: 'the header section' } }]);
    expect(by(3).problems).toMatchObject([{ kind: 'structure', span: { name: 'the BAT region' } }]);
    expect(by(4).problems).toMatchObject([{ kind: 'structure', span: { name: 'the log' } }]);
    expect(by(5).problems).toMatchObject([{ kind: 'shared', start: 4 * MiB, end: 5 * MiB }]);
    expect(by(6).problems).toEqual([{ kind: 'eof', missing: MiB }]);
    expect(by(7).problems).toEqual([{ kind: 'limit' }]);
    // Lost: nothing of their own. A block sharing space keeps its bytes (they may be its own).
    expect([1, 2, 3, 4, 6, 7].every((n) => by(n).lost)).toBe(true);
    expect(by(5).lost).toBe(false);
    // The listed copy names who holds the shared space first.
    const listed5 = p.listed.find((d) => d.entry.number === 5)!;
    expect(listed5.problems[0]).toMatchObject({ kind: 'shared', with: { number: 0, index: 0 } });
    // Both sides of shared space are refused for I/O.
    expect(p.problemAt(4 * MiB, MiB)).toMatch(/shares file space \[4194304, 5242880\)/);
    expect(p.truncated).toEqual({ entries: 1, end: 21 * MiB });
    expect(p.keptEnd).toBe(20 * MiB); // the block at 19 MiB; the lost ones do not count
  });

  it('partial overlaps keep the bytes outside the structures and inside the file', async () => {
    const g4 = computeGeometry(64 * MiB, 4 * MiB, 512, false);
    const { p, seen } = await scan(
      [
        [0, 6, 2 * MiB], // [2, 6) MiB: the metadata and the BAT, then 2 MiB of its own
        [1, 6, 8 * MiB], // fine
        [2, 6, 18 * MiB], // extends 2 MiB past the 20 MiB end
      ],
      20 * MiB,
      g4,
    );
    expect(seen.map((d) => [d.entry.number, d.lost])).toEqual([
      [0, false],
      [2, false],
    ]);
    expect(seen[0].problems).toMatchObject([
      { kind: 'structure', span: { name: 'the metadata region' } },
      { kind: 'structure', span: { name: 'the BAT region' } },
    ]);
    expect(p.readablePieces(2 * MiB, 4 * MiB)).toEqual([[4 * MiB, 6 * MiB]]);
    expect(p.readablePieces(18 * MiB, 4 * MiB)).toEqual([[18 * MiB, 20 * MiB]]);
    expect(p.readableBytes(MiB, 3 * MiB)).toBe(0);
    expect(seen[1].problems).toEqual([{ kind: 'eof', missing: 2 * MiB }]);
  });

  it('unknown regions count as structures, also when they overlap others', async () => {
    const other = guidFromString('11111111-2222-3333-4444-555555555555');
    const s = structureSpans({ offset: MiB, length: MiB }, [
      ...regions,
      { guid: other, fileOffset: 8 * MiB, length: 2 * MiB },
      { guid: other, fileOffset: 9 * MiB, length: 2 * MiB },
    ]);
    const { seen } = await scan(
      [
        [0, 6, 10 * MiB],
        [1, 6, 11 * MiB],
      ],
      20 * MiB,
      g,
      s,
    );
    expect(seen).toHaveLength(1);
    expect(seen[0].problems[0]).toMatchObject({ kind: 'structure', span: { start: 9 * MiB } });
    expect(seen[0].problems[0].kind === 'structure' && seen[0].problems[0].span.name).toMatch(
      /^region 11111111-2222-3333-4444-555555555555$/i,
    );
  });

  it('sector bitmaps of differencing disks are placed too; elsewhere they are not used, so not placed', async () => {
    const gd = computeGeometry(16 * MiB, MiB, 512, true);
    const sb = bitmapBatIndex(gd, 0);
    const { seen } = await scan([[sb, 6, 3 * MiB]], 20 * MiB, gd);
    expect(seen).toHaveLength(1);
    expect(seen[0].entry).toMatchObject({ bitmap: true, number: 0, extent: MiB });
    // A dynamic disk with 8192 blocks has a sector bitmap entry at 4096: present, it is check's business.
    const gb = computeGeometry(8192 * MiB, MiB, 512, false);
    const { p } = await scan([[bitmapBatIndex(gb, 0), 6, 3 * MiB]], 20 * MiB, gb);
    expect(p.damagedCount).toBe(0);
  });

  it('seeded random BATs: the scan agrees with a pairwise reference', async () => {
    const r = rng(SEED);
    for (let trial = 0; trial < 40; trial++) {
      const entries: [number, number, number][] = [];
      for (let b = 0; b < 16; b++) if (r.next() < 0.6) entries.push([b, r.pick([6, 7]), r.int(24) * MiB]);
      const size = (10 + r.int(14)) * MiB;
      const { p } = await scan(entries, size);
      // Reference: an entry is damaged when it overlaps a span, reaches past the end, or overlaps an
      // earlier entry (in BAT order).
      let expected = 0;
      entries.forEach(([, , off], k) => {
        const inSpan = spans.some((s) => off < s.end && s.start < off + MiB);
        const shared = entries.slice(0, k).some(([, , o]) => o === off);
        if (inSpan || shared || off + MiB > size) expected++;
      });
      expect(p.damagedCount, `trial ${trial} seed ${SEED}`).toBe(expected);
    }
  });
});

describe('countEntryKinds (how passes over the BAT skip all-zero pieces)', () => {
  it('agrees with visiting every entry, for dynamic and differencing geometries and seeded ranges', () => {
    const r = rng(SEED + 5);
    const geometries = [
      computeGeometry(3 * 4096 * MiB + 5 * MiB, MiB, 512, false),
      computeGeometry(3 * 4096 * MiB + 5 * MiB, MiB, 512, true),
      computeGeometry(100 * MiB, 2 * MiB, 4096, true),
      computeGeometry(9000 * 32 * MiB, 32 * MiB, 512, false),
    ];
    for (const g of geometries) {
      for (let t = 0; t < 30; t++) {
        const first = r.int(g.batEntries);
        const n = 1 + r.int(g.batEntries - first);
        let payload = 0;
        let bitmap = 0;
        for (let i = first; i < first + n; i++) {
          const chunk = Math.floor(i / (g.chunkRatio + 1));
          const pos = i - chunk * (g.chunkRatio + 1);
          if (pos === g.chunkRatio) bitmap += chunk < g.bitmapBlocks ? 1 : 0;
          else payload += chunk * g.chunkRatio + pos < g.dataBlocks ? 1 : 0;
        }
        expect(countEntryKinds(g, first, n), `entries [${first}, +${n}) seed ${SEED}`).toEqual({ payload, bitmap });
      }
    }
  });
});

// ------------------------------------------------------------------------------------------------
// Real files

const BS = MiB;

interface Made {
  file: string;
  bat: number;
  md: number;
  log: number;
  data: Buffer;
}

/** A 16 MiB dynamic disk, 1 MiB blocks, blocks 0..5 written with seeded bytes. */
async function makeDisk(name: string, type: 'dynamic' | 'fixed' = 'dynamic'): Promise<Made> {
  const file = path.join(dir, name);
  await createVhdx(file, { size: 16 * MiB, blockSize: BS, type });
  const data = rng(SEED + name.length).bytes(6 * MiB);
  const d = await VhdxFile.open(file, { writable: true });
  await d.write(data, 0);
  const made = { file, bat: d.batRegion.fileOffset, md: d.metadataRegion.fileOffset, log: d.header.logOffset, data };
  await d.close();
  return made;
}

/** Points BAT entry `index` at `offset` with `state`, in place. */
function patchBat(m: Made, index: number, state: number, offset: number): void {
  const buf = readFileSync(m.file);
  const [lo, hi] = encodeBatEntry(state, offset);
  buf.writeUInt32LE(lo, m.bat + index * 8);
  buf.writeUInt32LE(hi, m.bat + index * 8 + 4);
  writeFileSync(m.file, buf);
}

async function blockOffset(file: string, block: number): Promise<number> {
  const d = await VhdxFile.open(file);
  try {
    return (await d.payloadEntry(block)).offset;
  } finally {
    await d.close();
  }
}

const TARGETS: { name: string; where: (m: Made, b0: number) => number; message: RegExp; lost: boolean }[] = [
  { name: 'header section', where: () => 0, message: /points into the header section \[0, 1048576\)/, lost: true },
  { name: 'log', where: (m) => m.log, message: /points into the log \[1048576, 2097152\)/, lost: true },
  { name: 'metadata', where: (m) => m.md, message: /points into the metadata region/, lost: true },
  { name: 'BAT', where: (m) => m.bat, message: /points into the BAT region/, lost: true },
  { name: 'another block', where: (_m, b0) => b0, message: /shares file space/, lost: false },
  { name: 'past the end', where: () => 40 * MiB, message: /past the end of the file/, lost: true },
  { name: 'beyond 128 TiB', where: () => 2 ** 48, message: /lies beyond 140737488355328 bytes/, lost: true },
];

describe('a damaged entry in a real file', () => {
  for (const t of TARGETS) {
    it(`block 4 pointing into ${t.name}: reads of it fail, others work; writes refused; nothing written; check and --repair`, async () => {
      const m = await makeDisk(`t-${t.name.replace(/\W+/g, '-')}.vhdx`);
      const b0 = await blockOffset(m.file, 0);
      patchBat(m, 4, 6, t.where(m, b0));
      const before = readFileSync(m.file);

      // Read-only: block 4 fails naming itself and the structure; blocks 0-3 and 5 read their data.
      let d = await VhdxFile.open(m.file);
      try {
        expect(d.placement.clean).toBe(false);
        expect(d.warnings.join('\n')).toMatch(/damaged: 1 BAT entry is damaged: block 4 \(BAT entry 4\)/);
        const err = await rejection(d.readAt(4 * MiB + 512, 4096));
        expect(err.code).toBe(t.name === 'past the end' ? 'VHDX_TRUNCATED' : 'VHDX_CORRUPT');
        expect(err.message).toMatch(/block 4 at file offset/);
        expect(err.message).toMatch(t.message);
        for (const b of [1, 3, 5])
          expect((await d.readAt(b * MiB, MiB)).equals(m.data.subarray(b * MiB, (b + 1) * MiB))).toBe(true);
        if (t.name === 'another block') {
          // The block holding the shared space first is refused too: either may be the other's data.
          expect((await rejection(d.readAt(0, 512))).message).toMatch(/block 0 .* shares file space/);
        } else expect((await d.readAt(0, MiB)).equals(m.data.subarray(0, MiB))).toBe(true);
      } finally {
        await d.close();
      }

      // Writable: opens, is not writable, refuses every write (there and elsewhere) with the repair hint.
      d = await VhdxFile.open(m.file, { writable: true });
      try {
        expect(d.writable).toBe(false);
        for (const [op, at] of [
          ['write', 4 * MiB],
          ['write', 9 * MiB],
          ['zero', 5 * MiB],
          ['trim', 10 * MiB],
        ] as const) {
          const p =
            op === 'write'
              ? d.write(Buffer.alloc(4096, 0xee), at)
              : op === 'zero'
                ? d.writeZeroes(at, MiB)
                : d.trim(at, MiB);
          const err = await rejection(p);
          expect(['VHDX_CORRUPT', 'VHDX_TRUNCATED']).toContain(err.code);
          expect(err.message).toMatch(/is open read-only: .*tidemark vhdx check --repair/);
        }
        await d.flush();
      } finally {
        await d.close();
      }
      expect(readFileSync(m.file).equals(before), 'the damaged file changed').toBe(true);

      // check names the entry; --repair fixes it as documented.
      const report = await checkVhdx(m.file);
      expect(report.ok).toBe(false);
      expect(report.errors.map((e) => e.message).join('\n')).toMatch(t.message);
      const repaired = await checkVhdx(m.file, { repair: true });
      expect(repaired.ok, JSON.stringify(repaired)).toBe(true);
      expect(repaired.repaired.join('\n')).toMatch(/block 4 \(BAT entry 4\)/);
      d = await VhdxFile.open(m.file, { writable: true });
      try {
        expect(d.writable).toBe(true);
        const now = await d.readAt(4 * MiB, MiB);
        if (t.lost) expect(now.equals(Buffer.alloc(MiB)), 'a lost block reads zeros').toBe(true);
        else expect(now.equals(m.data.subarray(0, MiB)), 'a block that shared space reads as before').toBe(true);
        const e4 = await d.payloadEntry(4);
        if (t.lost)
          expect(e4).toMatchObject({ state: 2, offset: 0 }); // ZERO
        else expect(e4.state === 6 && e4.offset !== b0).toBe(true); // moved to a copy
        for (const b of [0, 1, 2, 3, 5])
          expect((await d.readAt(b * MiB, MiB)).equals(m.data.subarray(b * MiB, (b + 1) * MiB))).toBe(true);
        // Writable again: a write lands in block 4 and nowhere it should not.
        await d.write(Buffer.alloc(MiB, 0x44), 4 * MiB);
        await d.flush();
        expect((await d.readAt(0, MiB)).equals(m.data.subarray(0, MiB))).toBe(true);
        expect((await d.readAt(4 * MiB, MiB)).equals(Buffer.alloc(MiB, 0x44))).toBe(true);
      } finally {
        await d.close();
      }
      expect((await checkVhdx(m.file)).ok).toBe(true);
      if (!missingPeers('qemu-img')) {
        const q = await qemuImgCheck(m.file);
        expect(q.ok, q.output).toBe(true);
      }
    });
  }

  it('a fixed disk never reuses a stale location another block holds', async () => {
    // Block 7 ZERO with a stale offset on block 3's data: a write into block 7 must go elsewhere.
    const m = await makeDisk('stale-fixed.vhdx', 'fixed');
    const b3 = await blockOffset(m.file, 3);
    patchBat(m, 7, 2, b3);
    const d = await VhdxFile.open(m.file, { writable: true });
    try {
      expect(d.writable).toBe(true); // ZERO's offset is not an allocation: nothing is damaged
      await d.write(Buffer.alloc(4096, 0x77), 7 * MiB + 8192);
      await d.flush();
      expect((await d.readAt(3 * MiB, MiB)).equals(m.data.subarray(3 * MiB, 4 * MiB))).toBe(true);
      expect((await d.payloadEntry(7)).offset).not.toBe(b3);
      const back = await d.readAt(7 * MiB, 3 * 4096);
      expect(back.subarray(8192).equals(Buffer.alloc(4096, 0x77))).toBe(true);
      expect(back.subarray(0, 8192).equals(Buffer.alloc(8192))).toBe(true);
    } finally {
      await d.close();
    }
    expect((await checkVhdx(m.file)).ok).toBe(true);
  });

  it('a differencing disk: a sector bitmap in the metadata is refused; --repair lets the blocks read the parent; the chain stays linked', async () => {
    const parent = path.join(dir, 'diff-parent.vhdx');
    await createVhdx(parent, { size: 16 * MiB, blockSize: BS });
    const pdata = rng(SEED + 99).bytes(16 * MiB);
    let d = await VhdxFile.open(parent, { writable: true });
    await d.write(pdata, 0);
    await d.close();
    const child = path.join(dir, 'diff-child.avhdx');
    await createVhdx(child, { parent, blockSize: BS });
    d = await VhdxFile.open(child, { writable: true });
    await d.write(Buffer.alloc(4096, 0xc1), 2 * MiB + 4096); // partially present block 2
    await d.write(Buffer.alloc(MiB, 0xc2), 5 * MiB); // fully present block 5
    const dwg = Buffer.from(d.header.dataWriteGuid);
    const m = { file: child, bat: d.batRegion.fileOffset, md: d.metadataRegion.fileOffset, log: 0, data: pdata };
    const g = d.geometry;
    await d.close();
    patchBat(m, bitmapBatIndex(g, 0), 6, m.md);
    const before = readFileSync(child);
    d = await VhdxFile.open(child);
    try {
      const err = await rejection(d.readAt(2 * MiB, 8192));
      expect(err.message).toMatch(/the sector bitmap of chunk 0 at file offset \d+ points into the metadata region/);
      expect((await d.readAt(5 * MiB, MiB)).equals(Buffer.alloc(MiB, 0xc2))).toBe(true);
      expect((await d.readAt(9 * MiB, MiB)).equals(pdata.subarray(9 * MiB, 10 * MiB))).toBe(true);
    } finally {
      await d.close();
    }
    const w = await VhdxFile.open(child, { writable: true });
    await rejection(w.write(Buffer.alloc(512), 0));
    await w.close();
    expect(readFileSync(child).equals(before)).toBe(true);
    const rep = await checkVhdx(child, { repair: true });
    expect(rep.ok, JSON.stringify(rep)).toBe(true);
    expect(rep.repaired.join('\n')).toMatch(/the sector bitmap of chunk 0 .* set to NOT_PRESENT/);
    d = await VhdxFile.open(child);
    try {
      expect(d.header.dataWriteGuid.equals(dwg)).toBe(true);
      // Block 2 lost its bitmap: it reads the parent; block 5 keeps its own data.
      expect((await d.readAt(2 * MiB, MiB)).equals(pdata.subarray(2 * MiB, 3 * MiB))).toBe(true);
      expect((await d.payloadEntry(2)).state).toBe(0);
      expect((await d.readAt(5 * MiB, MiB)).equals(Buffer.alloc(MiB, 0xc2))).toBe(true);
    } finally {
      await d.close();
    }
  });

  it('a sector bitmap entry present in a dynamic disk is never read: the disk stays writable, --repair clears it', async () => {
    const file = path.join(dir, 'dyn-sb.vhdx');
    await createVhdx(file, { size: 4097 * MiB, blockSize: MiB }); // 4097 blocks: chunk 0's bitmap entry exists
    let d = await VhdxFile.open(file);
    const m = { file, bat: d.batRegion.fileOffset, md: d.metadataRegion.fileOffset, log: 0, data: Buffer.alloc(0) };
    const sb = bitmapBatIndex(d.geometry, 0);
    await d.close();
    patchBat(m, sb, 6, m.md);
    d = await VhdxFile.open(file, { writable: true });
    try {
      expect(d.writable).toBe(true);
      await d.write(Buffer.alloc(4096, 0x12), 4096 * MiB);
    } finally {
      await d.close();
    }
    const report = await checkVhdx(file);
    expect(report.errors.map((e) => e.code)).toEqual(['SB_PRESENT_WITHOUT_PARENT']);
    const rep = await checkVhdx(file, { repair: true });
    expect(rep.ok, JSON.stringify(rep)).toBe(true);
    expect(rep.repaired.join('\n')).toMatch(/1 sector bitmap entries set to NOT_PRESENT/);
    d = await VhdxFile.open(file);
    try {
      expect((await d.readAt(4096 * MiB, 4096)).equals(Buffer.alloc(4096, 0x12))).toBe(true);
    } finally {
      await d.close();
    }
  });

  it('a repaired parent keeps its DataWriteGuid: its child still opens over it', async () => {
    const m = await makeDisk('linked-parent.vhdx');
    const child = path.join(dir, 'linked-child.avhdx');
    await createVhdx(child, { parent: m.file, blockSize: BS });
    const b0 = await blockOffset(m.file, 0);
    patchBat(m, 4, 6, b0); // shares block 0's space
    const rep = await checkVhdx(m.file, { repair: true });
    expect(rep.ok).toBe(true);
    const c = await VhdxFile.open(child);
    try {
      expect(c.parent).toBeDefined();
      expect((await c.readAt(4 * MiB, MiB)).equals(m.data.subarray(0, MiB))).toBe(true);
    } finally {
      await c.close();
    }
  });
});
