/**
 * The event sequences of the adversarial lineage suite (adversary.test.ts): generated from a seed alone, so a
 * sequence replays from (suite seed, index) without running the ones before it. Each event says what it needs
 * (the VM running or stopped, no checkpoint, a saved file-level copy) and the generator puts the ordinary events
 * that bring the VM there before it.
 */
import { rng } from '../helpers/random.js';

/** The adversarial kinds: the suite asserts it exercised every one. */
export const ADVERSARIAL = [
  'copy-elsewhere', // disk + .rct/.mrt copied to a second host's store, attached there, backed up into the same repository
  'older-copy', // an older copy of disk + sidecars put back (in place, or as new files)
  'older-disk-only', // an older copy of the disk alone put back beside the current sidecars
  'snapshot-revert', // the whole VM disk directory put back from a file-level copy (cp -a: times kept)
  'qemu-io-running', // qemu-io with the locks bypassed writes an allocated block while the host runs the VM
  'qemu-stopped', // qemu-io or qemu-img writes the disk while the VM is stopped
  'dd-running', // dd into a data block's payload (found via the BAT) while the host runs the VM
  'dd-stopped', // the same while the VM is stopped
  'rct-delete',
  'rct-truncate',
  'rct-swap', // the .rct (and .mrt) swapped with another disk's
  'mrt-delete',
  'host-kill', // SIGKILL of a child-process host with writes in flight
  'clock-back', // file times moved back (utimes), alone or after a dd while stopped
  'replace-disk', // another disk file put at the same path
  'second-repo', // a backup into a second repository (the two then alternate)
] as const;
export type AdversarialKind = (typeof ADVERSARIAL)[number];

export type Event =
  | { kind: 'write'; n: number }
  | { kind: 'backup'; repo: 0 | 1 }
  | { kind: 'start' }
  | { kind: 'stop' }
  | { kind: 'checkpoint' }
  | { kind: 'merge' }
  | { kind: 'save' }
  | { kind: AdversarialKind; variant: number };

/** What an adversarial event needs before it runs. */
const NEEDS: Record<AdversarialKind, { state?: 'running' | 'stopped'; plain?: boolean; saved?: boolean }> = {
  'copy-elsewhere': { plain: true },
  'older-copy': { state: 'stopped', plain: true, saved: true },
  'older-disk-only': { state: 'stopped', plain: true, saved: true },
  'snapshot-revert': { state: 'stopped', plain: true, saved: true },
  'qemu-io-running': { state: 'running', plain: true },
  'qemu-stopped': { state: 'stopped', plain: true },
  'dd-running': { state: 'running', plain: true },
  'dd-stopped': { state: 'stopped', plain: true },
  'rct-delete': { plain: true },
  'rct-truncate': { state: 'stopped', plain: true },
  'rct-swap': { state: 'stopped', plain: true },
  'mrt-delete': { plain: true },
  'host-kill': { state: 'running' },
  'clock-back': {},
  'replace-disk': { state: 'stopped', plain: true },
  'second-repo': {},
};

/** Variants per kind (the executor reads `variant` modulo its own count). */
export const VARIANTS = 4;

export interface Sequence {
  index: number;
  seed: number;
  /** Runs against the child-process host (the only one that can be SIGKILLed). */
  child: boolean;
  events: Event[];
}

/** The seed of sequence `index` of a suite seeded `seed` (independent of the other sequences). */
export function sequenceSeed(seed: number, index: number): number {
  return (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) + Math.imul(index + 1, 0xc2b2ae35)) >>> 0;
}

/**
 * Sequence `index`: a first backup, then `steps` rounds of writes, one adversarial event (kinds dealt round-robin
 * from the index, so every kind comes up in any run of 16 sequences, the rest random), more writes, and a
 * backup. Every `childEvery`-th sequence runs on the child-process host and starts with a SIGKILL (the deal
 * skips those, so every kind gets its share).
 */
export function makeSequence(seed: number, index: number, steps: number, childEvery: number): Sequence {
  const s = sequenceSeed(seed, index);
  const r = rng(s);
  const child = childEvery > 0 && index % childEvery === childEvery - 1;
  const events: Event[] = [];
  let running = true; // a sequence's VM starts running
  let checkpoint = false;
  let saved = false;
  let alternate = false; // after a second-repo backup, the repositories alternate
  let nextRepo: 0 | 1 = 0;
  const write = () => events.push({ kind: 'write', n: 1 + r.int(4) });
  const backup = () => {
    events.push({ kind: 'backup', repo: nextRepo });
    if (alternate) nextRepo = nextRepo === 0 ? 1 : 0;
  };
  const reach = (state: 'running' | 'stopped' | undefined) => {
    if (state === 'running' && !running) events.push({ kind: 'start' });
    if (state === 'stopped' && running) events.push({ kind: 'stop' });
    if (state) running = state === 'running';
  };
  write();
  backup();
  const pool = ADVERSARIAL.filter((k) => k !== 'host-kill');
  for (let step = 0; step < steps; step++) {
    let kind: AdversarialKind;
    if (child && step === 0) kind = 'host-kill';
    else if (step === 0) kind = pool[(index - Math.floor((index + 1) / Math.max(childEvery, 1))) % pool.length];
    else kind = r.pick(pool);
    const needs = NEEDS[kind];
    // Ordinary life first: a checkpoint now and then, writes, a restart.
    if (!checkpoint && r.next() < 0.2) {
      events.push({ kind: 'checkpoint' });
      checkpoint = true;
    }
    if (needs.saved && !saved) {
      if (r.next() < 0.5) reach('stopped');
      if (checkpoint) {
        events.push({ kind: 'merge' });
        checkpoint = false;
      }
      events.push({ kind: 'save' });
      saved = true;
      reach('running');
      write();
      if (r.next() < 0.5) backup();
    }
    if (running) write();
    if (needs.plain && checkpoint) {
      events.push({ kind: 'merge' });
      checkpoint = false;
    }
    reach(needs.state ?? (r.next() < 0.3 ? (running ? 'stopped' : 'running') : undefined));
    if (kind === 'second-repo') {
      if (running) write();
      alternate = true;
      nextRepo = 1;
      events.push({ kind, variant: r.int(VARIANTS) });
    } else {
      events.push({ kind, variant: r.int(VARIANTS) });
    }
    if (r.next() < 0.5 || !running) reach('running');
    if (running) write();
    backup();
  }
  return { index, seed: s, child, events };
}

export function describeEvent(e: Event): string {
  switch (e.kind) {
    case 'write':
      return `write×${e.n}`;
    case 'backup':
      return `backup→repo${e.repo + 1}`;
    case 'start':
    case 'stop':
    case 'checkpoint':
    case 'merge':
    case 'save':
      return e.kind;
    default:
      return `${e.kind}/${e.variant}`;
  }
}

export function describeSequence(q: Sequence): string {
  return q.events.map(describeEvent).join(' ');
}

/** A full-read reason with the particulars (ids, GUIDs, paths, numbers, pids) taken out, for the histogram. */
export function reasonKey(reason: string): string {
  return reason
    .replace(/rct[12]:[0-9a-f:]+/gi, '<id>')
    .replace(/\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b/gi, '<guid>')
    .replace(/\d{4}-\d\d-\d\dT[\d:.]+Z/g, '<time>')
    .replace(/(\/[\w.@+-]+)+/g, '<path>')
    .replace(/\b[0-9a-f]{16}\b/gi, '<hex>')
    .replace(/\d+/g, 'N');
}
