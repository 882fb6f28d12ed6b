// Types for prng.mjs (plain ESM so the worker scripts can run it without a TypeScript loader).
export interface Rng {
  /** A number in [0, 1). */
  next(): number;
  /** An integer in [0, n). */
  int(n: number): number;
  /** true with probability p. */
  chance(p: number): boolean;
  pick<T>(xs: readonly T[]): T;
  u32(): number;
  /** n bytes: whole words little-endian, then one draw per tail byte. */
  bytes(n: number): Buffer;
  /** n bytes, one draw per byte. */
  bytesEach(n: number): Buffer;
}
export declare function mulberry32Words(seed: number): () => number;
export declare function mulberry32(seed: number): () => number;
export declare function rng(seed: number): Rng;
