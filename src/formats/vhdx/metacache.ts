/**
 * A cache of 4 KiB metadata sectors (BAT, sector bitmaps, metadata region) keyed by file offset.
 * Changes stay here, marked dirty, until a flush commits them through the log. Clean sectors are
 * evicted oldest first beyond a budget, so huge BATs stream instead of sitting in memory.
 */
import type { RandomAccessFile } from '../../util/file.js';
import { LOG_SECTOR } from './constants.js';

const DEFAULT_BUDGET_SECTORS = 32768; // 128 MiB
/**
 * A miss reads this much around the sector (within the caller's window): enough to stream a BAT in few reads,
 * small enough that a miss does not copy hundreds of sectors nobody asked for (a 1 MiB read-ahead made every
 * metadata update and bitmap lookup copy 256 sectors: most of a checkpoint's CPU at hundreds of VMs).
 */
const READ_AHEAD = 64 * 1024;

export class MetaCache {
  private sectors = new Map<number, Buffer>();
  private dirty = new Set<number>();

  constructor(
    private readonly file: RandomAccessFile,
    private readonly budget = DEFAULT_BUDGET_SECTORS,
  ) {}

  peek(offset: number): Buffer | undefined {
    return this.sectors.get(offset);
  }

  /**
   * Returns the sector at `offset` (4 KiB aligned), reading up to READ_AHEAD from the aligned piece that holds it,
   * within [windowStart, windowEnd), on a miss.
   */
  async load(offset: number, windowStart: number, windowEnd: number): Promise<Buffer> {
    const hit = this.sectors.get(offset);
    if (hit) return hit;
    const start = Math.max(windowStart, offset - (offset % READ_AHEAD));
    const end = Math.max(offset + LOG_SECTOR, Math.min(windowEnd, start + READ_AHEAD));
    const buf = Buffer.alloc(end - start);
    await this.file.read(buf, start);
    this.evict();
    for (let o = start; o < end; o += LOG_SECTOR) {
      if (!this.sectors.has(o)) this.sectors.set(o, Buffer.from(buf.subarray(o - start, o - start + LOG_SECTOR)));
    }
    return this.sectors.get(offset)!;
  }

  markDirty(offset: number): void {
    this.dirty.add(offset);
  }

  get dirtyCount(): number {
    return this.dirty.size;
  }

  /** The dirty sectors in file order; they stay dirty until `clean()` is called for them. */
  dirtyOffsets(): number[] {
    return [...this.dirty].sort((a, b) => a - b);
  }

  clean(offsets: number[]): void {
    for (const o of offsets) this.dirty.delete(o);
  }

  /** Forgets everything (after the file changed underneath, e.g. a repair). */
  reset(): void {
    this.sectors.clear();
    this.dirty.clear();
  }

  private evict(): void {
    if (this.sectors.size < this.budget) return;
    const target = Math.floor(this.budget * 0.75);
    for (const key of this.sectors.keys()) {
      if (this.sectors.size <= target) break;
      if (!this.dirty.has(key)) this.sectors.delete(key);
    }
  }
}
