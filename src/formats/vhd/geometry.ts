/**
 * CHS geometry (the specification's appendix "CHS Calculation") and the size rules that go with it.
 * The footer holds both a current size and a geometry; Hyper-V, libvhdi and 7-Zip size a disk by the
 * current size, Virtual PC by the geometry, and QEMU by the geometry unless the creator application is
 * one it knows to use the current size (or the geometry is the maximum).
 */
import { MAX_CHS_SECTORS, SECTOR } from './constants.js';

export interface Chs {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/** The geometry the specification computes for `totalSectors` (it rounds down; capped at 65535×16×255). */
export function chsGeometry(totalSectors: number): Chs {
  const total = Math.min(Math.max(0, Math.floor(totalSectors)), MAX_CHS_SECTORS);
  let sectorsPerTrack: number;
  let heads: number;
  let cylinderTimesHeads: number;
  if (total >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylinderTimesHeads = Math.floor(total / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylinderTimesHeads = Math.floor(total / sectorsPerTrack);
    heads = Math.floor((cylinderTimesHeads + 1023) / 1024);
    if (heads < 4) heads = 4;
    if (cylinderTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylinderTimesHeads = Math.floor(total / sectorsPerTrack);
    }
    if (cylinderTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylinderTimesHeads = Math.floor(total / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylinderTimesHeads / heads), heads, sectorsPerTrack };
}

export function chsSectors(g: Chs): number {
  return g.cylinders * g.heads * g.sectorsPerTrack;
}

export function chsEquals(a: Chs, b: Chs): boolean {
  return a.cylinders === b.cylinders && a.heads === b.heads && a.sectorsPerTrack === b.sectorsPerTrack;
}

/**
 * The smallest size ≥ `size` that a geometry describes exactly, with that geometry (what
 * `qemu-img create -f vpc` does without force_size), so readers that size a disk by its geometry see all
 * of it. The geometry is the one computed for the first sector count that reaches `size` (recomputing it
 * from the rounded size can give a smaller one: the bands are not monotonic). Sizes past the largest
 * geometry keep their size, with the largest geometry (every reader uses the current size there).
 */
export function chsRounded(size: number): { size: number; geometry: Chs } {
  const sectors = Math.ceil(size / SECTOR);
  if (sectors < MAX_CHS_SECTORS) {
    // The specification's rounding loses less than one track per head: a few thousand steps at most.
    for (let s = sectors; s < MAX_CHS_SECTORS; s++) {
      const geometry = chsGeometry(s);
      const got = chsSectors(geometry);
      if (got >= sectors) return { size: got * SECTOR, geometry };
    }
  }
  return { size: sectors * SECTOR, geometry: chsGeometry(MAX_CHS_SECTORS) };
}

/** Creator applications QEMU sizes by the current size (block/vpc.c); all others by CHS. */
const QEMU_CURRENT_SIZE_CREATORS = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

/** The virtual size `qemu-img -f vpc` reports for a footer (without a force_size_calc option). */
export function qemuVisibleSize(footer: { creatorApp: string; currentSize: number; geometry: Chs }): number {
  const chs = chsSectors(footer.geometry);
  if (!QEMU_CURRENT_SIZE_CREATORS.includes(footer.creatorApp) && chs !== MAX_CHS_SECTORS) return chs * SECTOR;
  return Math.floor(footer.currentSize / SECTOR) * SECTOR;
}
