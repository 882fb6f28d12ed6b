/** Storage-snapshot providers: the interface, the two providers, and a way to pick one by name. */
import { TidemarkError } from '../errors.js';
import { CowProvider, type CowProviderOptions } from './cow.js';
import type { SnapshotProvider } from './provider.js';
import { ReflinkProvider } from './reflink.js';

export type * from './provider.js';
export { CowProvider, type CowProviderOptions } from './cow.js';
export { ReflinkProvider } from './reflink.js';

export const PROVIDER_NAMES = ['cow', 'reflink'] as const;
export type ProviderName = (typeof PROVIDER_NAMES)[number];

export function createProvider(name: string, cow: CowProviderOptions = {}): SnapshotProvider {
  if (name === 'cow') return new CowProvider(cow);
  if (name === 'reflink') return new ReflinkProvider();
  throw new TidemarkError(
    'INVALID_ARGUMENT',
    `unknown snapshot provider ${name} (known: ${PROVIDER_NAMES.join(', ')})`,
  );
}
