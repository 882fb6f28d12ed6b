/**
 * KVM or TCG. `/dev/kvm` may open (and KVM_CREATE_VM succeed) on a CPU without hardware virtualisation, with
 * guests ~100× slower than TCG: KVM is chosen only when /dev/kvm opens read-write AND /proc/cpuinfo shows
 * vmx (Intel) or svm (AMD).
 */
import { closeSync, openSync, readFileSync } from 'node:fs';
import { TidemarkError } from '../errors.js';

export type AccelRequest = 'auto' | 'kvm' | 'tcg';
export type Accel = 'kvm' | 'tcg';
export const ACCEL_REQUESTS: readonly AccelRequest[] = ['auto', 'kvm', 'tcg'];

export interface AccelProbe {
  /** whether /dev/kvm opens read-write */
  kvmOpens(): boolean;
  /** the text of /proc/cpuinfo */
  cpuinfo(): string;
}

export const hostProbe: AccelProbe = {
  kvmOpens() {
    try {
      closeSync(openSync('/dev/kvm', 'r+'));
      return true;
    } catch {
      return false;
    }
  },
  cpuinfo() {
    try {
      return readFileSync('/proc/cpuinfo', 'utf8');
    } catch {
      return '';
    }
  },
};

export interface AccelChoice {
  accel: Accel;
  /** why: shown in logs and `vm show` */
  reason: string;
}

export function hardwareVirtualization(cpuinfo: string): 'vmx' | 'svm' | null {
  for (const line of cpuinfo.split('\n')) {
    if (!/^flags\s*:/.test(line)) continue;
    const flags = new Set(
      line
        .slice(line.indexOf(':') + 1)
        .trim()
        .split(/\s+/),
    );
    if (flags.has('vmx')) return 'vmx';
    if (flags.has('svm')) return 'svm';
  }
  return null;
}

/** The accelerator for `requested`; `kvm` when KVM is not usable is NOT_SUPPORTED, with the reason. */
export function chooseAccel(requested: AccelRequest, probe: AccelProbe = hostProbe): AccelChoice {
  if (!ACCEL_REQUESTS.includes(requested)) {
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `accelerator "${requested}" is not one of ${ACCEL_REQUESTS.join(', ')}`,
    );
  }
  if (requested === 'tcg') return { accel: 'tcg', reason: 'TCG requested' };
  const opens = probe.kvmOpens();
  const hw = opens ? hardwareVirtualization(probe.cpuinfo()) : null;
  if (opens && hw) return { accel: 'kvm', reason: `/dev/kvm opens and the CPU has ${hw}` };
  const why = !opens ? '/dev/kvm cannot be opened' : 'the CPU shows neither vmx nor svm in /proc/cpuinfo';
  if (requested === 'kvm')
    throw new TidemarkError('NOT_SUPPORTED', `KVM was requested but ${why}; use --accel tcg or auto`);
  return { accel: 'tcg', reason: `${why}: software emulation (TCG)` };
}
