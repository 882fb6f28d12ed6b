/**
 * VM configuration versions, as Hyper-V lists them (Get-VMHostSupportedVersion; Microsoft's "Upgrade virtual
 * machine version" page): a VM is created at one of them, upgraded only upwards (Update-VMVersion) and only
 * while it is off. Resilient change tracking needs 6.2 or later.
 */
import { TidemarkError } from '../errors.js';

/** Every version a Hyper-V host has shipped, oldest first (Windows Server 2012 R2's 5.0 to Server 2025's 12.0). */
export const CONFIG_VERSIONS = [
  '5.0',
  '6.2',
  '7.0',
  '7.1',
  '8.0',
  '8.1',
  '8.2',
  '8.3',
  '9.0',
  '9.1',
  '9.2',
  '9.3',
  '10.0',
  '11.0',
  '12.0',
] as const;

/** What a new VM gets, and what `vm upgrade` moves to without `--version`. */
export const DEFAULT_CONFIG_VERSION = '9.0';

/** The first version with resilient change tracking. */
export const RCT_CONFIG_VERSION = '6.2';

function parts(v: string): [number, number] {
  const m = /^(\d+)\.(\d+)$/.exec(v);
  return m ? [Number(m[1]), Number(m[2])] : [NaN, NaN];
}

/** Negative when a < b, 0 when equal, positive when a > b (numerically: 10.0 > 9.3). */
export function compareConfigVersions(a: string, b: string): number {
  const [am, an] = parts(a);
  const [bm, bn] = parts(b);
  return am !== bm ? am - bm : an - bn;
}

export function isKnownConfigVersion(v: string): boolean {
  return (CONFIG_VERSIONS as readonly string[]).includes(v);
}

/** Refuses a version this host does not know (INVALID_ARGUMENT, listing the ones it does). */
export function checkConfigVersion(v: string): string {
  if (!isKnownConfigVersion(v)) {
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `configuration version "${v}" is not one this host supports (${CONFIG_VERSIONS.join(', ')})`,
    );
  }
  return v;
}

/** RCT needs configuration version 6.2 or later (as in Hyper-V). */
export function supportsRct(configVersion: string): boolean {
  return compareConfigVersions(configVersion, RCT_CONFIG_VERSION) >= 0;
}
