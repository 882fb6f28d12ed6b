/**
 * The host's VSS writer (Hyper-V's "Microsoft Hyper-V VSS Writer"): every VM is a component (its definition
 * and its disks). A VM whose consistency was already cut by a recovery checkpoint (the 2016 flow) needs
 * nothing at Freeze. A running VM snapshotted directly (the 2012 R2 way) is frozen through its guest agent
 * between Freeze and Thaw; a guest that cannot freeze gives crash consistency, or fails the component when
 * the VM's policy demands application consistency ("production-only").
 */
import { GuestAgentClient } from '../guest/client.js';
import type { Writer, WriterContext } from '../vss/index.js';
import type { WriterMetadata } from '../vss/types.js';
import type { Consistency, VmDefinition } from './definition.js';

export const VM_WRITER_NAME = 'Tidemark VM Writer';

export interface VmInSet {
  def: VmDefinition;
  vmDir: string;
  /** The recovery checkpoint that already holds this VM's consistent point, if any. */
  checkpoint?: { id: string; consistency: Consistency; note: string | null; freezeWindowMs: number | null };
  running: boolean;
}

export interface VmOutcome {
  consistency: Consistency;
  note: string;
  freezeWindowMs: number | null;
}

export class VmWriter implements Writer {
  readonly name = VM_WRITER_NAME;
  readonly outcomes = new Map<string, VmOutcome>();
  private frozen = new Map<string, { client: GuestAgentClient; at: number }>();

  constructor(
    private readonly vms: VmInSet[],
    private readonly opts: { commandTimeoutMs?: number; freezeTimeoutMs?: number } = {},
  ) {}

  async identify(): Promise<WriterMetadata> {
    return {
      components: this.vms.map((v) => ({
        name: v.def.id,
        logicalPath: 'Virtual Machines',
        caption: v.def.name,
        selectable: true,
        fileSets: [{ path: v.vmDir, filespec: '*', recursive: true }],
        data: JSON.stringify({ name: v.def.name, configVersion: v.def.configVersion }),
      })),
    };
  }

  async prepareForBackup(): Promise<boolean> {
    return true;
  }

  async prepareForSnapshot(): Promise<boolean> {
    return true;
  }

  async freeze(ctx: WriterContext): Promise<boolean> {
    const timeoutMs = this.opts.commandTimeoutMs ?? 3_000;
    await Promise.all(
      this.selected(ctx).map(async (v) => {
        if (v.checkpoint) {
          this.outcomes.set(v.def.name, {
            consistency: v.checkpoint.consistency,
            note: `from recovery checkpoint ${v.checkpoint.id}: ${v.checkpoint.note ?? ''}`.trim(),
            freezeWindowMs: v.checkpoint.freezeWindowMs,
          });
          return;
        }
        if (!v.running) {
          this.outcomes.set(v.def.name, { consistency: 'application', note: 'the VM is off', freezeWindowMs: null });
          return;
        }
        let reason: string;
        if (!v.def.guest) reason = 'the VM has no guest channel';
        else {
          try {
            const client = await GuestAgentClient.connect(v.def.guest, { timeoutMs });
            try {
              await client.sync({ timeoutMs });
              const at = performance.now();
              await client.fsfreezeFreeze({ timeoutMs: this.opts.freezeTimeoutMs ?? 30_000 });
              this.frozen.set(v.def.name, { client, at });
              return;
            } catch (err) {
              await client.fsfreezeThaw({ timeoutMs }).catch(() => undefined);
              await client.close().catch(() => undefined);
              reason = `the guest cannot freeze (${(err as Error).message})`;
            }
          } catch (err) {
            reason = `the guest agent does not answer (${(err as Error).message})`;
          }
        }
        if (v.def.checkpointPolicy === 'production-only') {
          ctx.setComponentFailure(
            { logicalPath: 'Virtual Machines', name: v.def.id },
            'NONRETRYABLE',
            `${v.def.name}: application consistency required, but ${reason}`,
          );
        }
        this.outcomes.set(v.def.name, { consistency: 'crash', note: reason, freezeWindowMs: null });
      }),
    );
    return true;
  }

  async thaw(ctx: WriterContext): Promise<boolean> {
    const failed: string[] = [];
    await Promise.all(
      [...this.frozen].map(async ([name, f]) => {
        try {
          await f.client.fsfreezeThaw({ timeoutMs: this.opts.commandTimeoutMs ?? 3_000 });
          this.outcomes.set(name, {
            consistency: 'application',
            note: 'guest frozen during the snapshot',
            freezeWindowMs: performance.now() - f.at,
          });
        } catch (err) {
          failed.push(`${name}: ${(err as Error).message}`);
        } finally {
          await f.client.close().catch(() => undefined);
        }
      }),
    );
    this.frozen.clear();
    if (failed.length > 0) {
      ctx.setFailure('RETRYABLE', `thaw failed: ${failed.join('; ')}`);
      return false;
    }
    return true;
  }

  async postSnapshot(): Promise<boolean> {
    return true;
  }

  async backupComplete(): Promise<boolean> {
    return true;
  }

  async abort(): Promise<boolean> {
    await Promise.all(
      [...this.frozen.values()].map(async (f) => {
        await f.client.fsfreezeThaw({ timeoutMs: 3_000 }).catch(() => undefined);
        await f.client.close().catch(() => undefined);
      }),
    );
    this.frozen.clear();
    return true;
  }

  private selected(ctx: WriterContext): VmInSet[] {
    const ids = new Set(ctx.components.map((c) => c.name));
    return this.vms.filter((v) => ids.has(v.def.id));
  }
}
