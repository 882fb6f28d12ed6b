/**
 * The host's VM writer runs the same writer conformance suite as every VSS writer: with a VM whose consistency
 * comes from a recovery checkpoint, one that is off, and one whose guest agent is missing (crash consistency).
 */
import { randomUUID } from 'node:crypto';
import type { VmDefinition } from '../../src/host/definition.js';
import { VmWriter } from '../../src/host/vm-writer.js';
import { writerConformance } from '../vss/conformance.js';

function def(name: string, guest: string | null): VmDefinition {
  return {
    schemaVersion: 2,
    id: randomUUID(),
    name,
    generation: 2,
    configVersion: '9.0',
    checkpointPolicy: 'production-fallback',
    guest,
    state: 'Running',
    createdAt: new Date().toISOString(),
    disks: [],
    checkpoints: [],
    currentCheckpointId: null,
    referencePoints: [],
    pending: null,
    memoryMiB: 512,
    cpus: 1,
    scsiControllers: 1,
    boot: null,
    image: null,
    accel: 'auto',
  };
}

writerConformance('Tidemark VM Writer', () => {
  return new VmWriter(
    [
      {
        def: def('from-checkpoint', null),
        vmDir: '/nonexistent/vms/from-checkpoint',
        running: true,
        checkpoint: { id: 'cp', consistency: 'application', note: 'guest froze', freezeWindowMs: 12 },
      },
      { def: def('off', null), vmDir: '/nonexistent/vms/off', running: false },
      { def: def('no-agent', 'unix:/nonexistent/qga.sock'), vmDir: '/nonexistent/vms/no-agent', running: true },
    ],
    { commandTimeoutMs: 200 },
  );
});
