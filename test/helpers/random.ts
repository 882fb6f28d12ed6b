/**
 * Seeded randomness for the tests, so random tests are reproducible: every test prints its seed. The
 * generator lives in prng.mjs, which the plain-ESM worker scripts import too.
 */
export { mulberry32, mulberry32Words, rng, type Rng } from './prng.mjs';

export function seedFrom(envName: string, fallback: number): number {
  const v = process.env[envName];
  return v ? Number(v) : fallback;
}
