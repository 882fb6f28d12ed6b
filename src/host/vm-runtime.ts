/**
 * One VM's QEMU process (Hyper-V's VM worker process), launched and driven over QMP, as Proxmox VE's
 * qemu-server does it: no libvirt in between.
 *
 * - Launch: QEMU runs detached from the host (its own session, stdio to `qemu.log`, serial console to
 *   `console.log`), with its pid in `qemu.pid` and what was launched in `runtime.json`, so it outlives a host
 *   restart; it starts paused and is continued once QMP is connected (no event is ever missed).
 * - States as Hyper-V: Off, Starting, Running, Paused, Saved, Stopping, driven by QMP events (STOP, RESUME,
 *   SHUTDOWN, POWERDOWN, RESET, GUEST_PANICKED) and by the end of the process: a guest power-off makes the
 *   VM Off; QEMU ending without a SHUTDOWN, or a panic, is a crash, logged and kept in `lastExit`.
 * - Stop: the guest agent's `guest-shutdown`, then ACPI `system_powerdown`, then `quit`; turn off: `quit`.
 * - Save: paused, its memory and device state migrated to `saved.state`, QEMU ended (Saved); start again
 *   loads it (`-incoming defer` + `migrate-incoming`) and continues where it stopped.
 * - Hot-plug of SCSI disks: `blockdev-add` (nbd) + `device_add scsi-hd`; `device_del` + DEVICE_DELETED +
 *   `blockdev-del`.
 * - Adoption: a new host finds the QEMU by its pid file, checks the process is that QEMU (its command line
 *   names our QMP socket), and connects to the QMP socket again.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { closeSync, constants as fsConstants, openSync, readFileSync } from 'node:fs';
import { chmod, copyFile, mkdir, open, readFile, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import { GuestAgentClient } from '../guest/client.js';
import { writeFileAtomic } from '../util/atomic.js';
import { Mutex } from '../util/mutex.js';
import { pidAlive } from '../util/process.js';
import { chooseAccel, type Accel, type AccelRequest } from './accel.js';
import {
  deviceId,
  diskDevice,
  nbdBlockdev,
  nodeName,
  parseSlot,
  qemuArgs,
  type BootSource,
  type LaunchSpec,
  type NbdAddress,
} from './qemu-command.js';
import { QmpClient, QmpError, type QmpEvent } from './qmp.js';

export type VmState = 'Off' | 'Starting' | 'Running' | 'Paused' | 'Saved' | 'Stopping';
export const VM_STATES: readonly VmState[] = ['Off', 'Starting', 'Running', 'Paused', 'Saved', 'Stopping'];

/** Longest unix socket path (sun_path is 108 bytes with its NUL). */
export const MAX_SOCKET_PATH = 107;
export const DEFAULT_RECONNECT_DELAY = 60;

export interface RuntimeLog {
  info(msg: string): void;
  warn(msg: string): void;
}

export interface RuntimeFiles {
  qmp: string;
  guest: string;
  console: string;
  qemuLog: string;
  pid: string;
  runtime: string;
  savedState: string;
  savedInfo: string;
  uefiVars: string;
}

/** How the last run ended. */
export interface ExitInfo {
  at: string;
  /** poweroff (the guest), quit (the host), saved, crash (QEMU ended without a shutdown), panic (the guest kernel) */
  reason: 'poweroff' | 'quit' | 'saved' | 'crash' | 'panic';
  detail: string;
}

export interface RuntimeOptions {
  /** the VM's folder: pid file, runtime.json, logs, sockets (unless too long), saved state */
  dir: string;
  /** short-path fallback for sockets (`STORE/run`) */
  runDir: string;
  name: string;
  /** the VM's id (GUID): QEMU's -uuid, and the short socket names */
  id: string;
  log: RuntimeLog;
  qemuBinary?: string;
  /** an explicit guest-agent socket (the definition's `guest`, unix:PATH), else one in the VM's folder */
  guestSocket?: string | null;
}

export interface LaunchRequest {
  generation: 1 | 2;
  memoryMiB: number;
  cpus: number;
  scsiControllers: number;
  boot: BootSource;
  disks: { slot: string; export: string }[];
  nbd: NbdAddress;
  reconnectDelay?: number;
  accel?: AccelRequest;
  /** bound on QEMU opening its QMP socket (default 30 s) */
  startTimeoutMs?: number;
}

export interface StopOptions {
  /** wait for the guest to power off after the agent's guest-shutdown (default 60 s) */
  agentTimeoutMs?: number;
  /** then after ACPI power-down (default 10 s) */
  acpiTimeoutMs?: number;
}

export interface StopOutcome {
  /** what ended it */
  by: 'guest-agent' | 'acpi' | 'quit' | 'already-off';
  ms: number;
}

interface RuntimeRecord {
  pid: number;
  qmp: string;
  guest: string | null;
  console: string;
  accel: Accel;
  accelReason: string;
  startedAt: string;
  args: string[];
  nbd: NbdAddress;
  reconnectDelay: number;
  generation: 1 | 2;
  scsiControllers: number;
}

/** Emits `state` (state: VmState, detail: string) on every change, and `exit` (ExitInfo) when QEMU has ended. */
export class VmRuntime extends EventEmitter {
  readonly files: RuntimeFiles;
  private _state: VmState = 'Off';
  private qmp: QmpClient | null = null;
  private child: ChildProcess | null = null;
  private record: RuntimeRecord | null = null;
  private readonly ops = new Mutex();
  private shutdownSeen: { reason: string; guest: boolean } | null = null;
  private panicked: string | null = null;
  private expectingExit: ExitInfo['reason'] | null = null;
  private detached = false;
  /** the end of the current QEMU is being handled (the process exit and the QMP close both report it) */
  private exitHandled = false;
  private exitWaiters: (() => void)[] = [];
  lastExit: ExitInfo | null = null;

  constructor(readonly opts: RuntimeOptions) {
    super();
    this.files = runtimeFiles(opts.dir, opts.runDir, opts.id, opts.guestSocket ?? null);
  }

  get state(): VmState {
    return this._state;
  }

  get pid(): number | null {
    return this._state === 'Off' || this._state === 'Saved' ? null : (this.record?.pid ?? null);
  }

  get accel(): { accel: Accel; reason: string } | null {
    return this.record ? { accel: this.record.accel, reason: this.record.accelReason } : null;
  }

  get guestSocket(): string {
    return this.files.guest;
  }

  /**
   * Finds what a previous host left: a live QEMU (connected again: Running, Paused, ...), a saved state
   * (Saved), or nothing (Off; leftovers of a QEMU that ended while no host watched are removed and reported).
   */
  async adopt(): Promise<VmState> {
    return this.ops.run(async () => {
      const rec = await readRecord(this.files.runtime);
      if (rec && isOurQemu(rec.pid, rec.qmp)) {
        this.record = rec;
        let qmp: QmpClient | null = null;
        // The previous client may still be going away: QEMU serves one at a time.
        for (let i = 0; i < 20 && !qmp; i++) {
          qmp = await QmpClient.connect(rec.qmp, { timeoutMs: 5000 }).catch(() => null);
          if (!qmp) await sleep(250);
        }
        if (!qmp) {
          throw new TidemarkError(
            'QEMU_FAILED',
            `${this.opts.name}: QEMU (pid ${rec.pid}) runs but its QMP socket ${rec.qmp} does not answer`,
          );
        }
        this.exitHandled = false;
        this.attachQmp(qmp);
        const status = await qmp.execute<{ status: string }>('query-status');
        if (status.status === 'prelaunch') await qmp.execute('cont'); // a host that died while starting it
        this.setState(stateOfStatus(status.status), `adopted QEMU pid ${rec.pid} (${status.status})`);
        this.opts.log.info(`${this.opts.name}: adopted QEMU pid ${rec.pid} through ${rec.qmp} (${status.status})`);
        return this._state;
      }
      if (rec) {
        this.lastExit = {
          at: new Date().toISOString(),
          reason: 'crash',
          detail: `QEMU (pid ${rec.pid}) ended while no host was watching`,
        };
        this.opts.log.warn(`${this.opts.name}: ${this.lastExit.detail}`);
        await this.cleanFiles();
      }
      this.setState((await this.hasSavedState()) ? 'Saved' : 'Off', 'no QEMU running');
      return this._state;
    });
  }

  /** Starts QEMU (or restores the saved state) and continues the guest: Off/Saved → Starting → Running. */
  async start(req: LaunchRequest): Promise<void> {
    return this.ops.run(async () => {
      if (this._state !== 'Off' && this._state !== 'Saved') {
        throw new TidemarkError('CONFLICT', `${this.opts.name} is ${this._state}: it can start only from Off or Saved`);
      }
      const restoring = this._state === 'Saved' && (await this.hasSavedState());
      const choice = chooseAccel(req.accel ?? 'auto');
      await mkdir(this.opts.dir, { recursive: true, mode: 0o700 });
      await mkdir(this.opts.runDir, { recursive: true, mode: 0o700 });
      for (const s of [this.files.qmp, this.files.guest]) await unlink(s).catch(() => undefined);
      let uefi: LaunchSpec['uefi'] = null;
      if (req.boot.kind === 'firmware' && req.generation === 2) uefi = await this.uefiFiles();
      const spec: LaunchSpec = {
        name: this.opts.name,
        uuid: this.opts.id,
        generation: req.generation,
        memoryMiB: req.memoryMiB,
        cpus: req.cpus,
        scsiControllers: req.scsiControllers,
        boot: req.boot,
        disks: req.disks,
        nbd: req.nbd,
        reconnectDelay: req.reconnectDelay ?? DEFAULT_RECONNECT_DELAY,
        accel: choice.accel,
        qmpSocket: this.files.qmp,
        guestSocket: this.files.guest,
        consoleLog: this.files.console,
        uefi,
        incoming: restoring,
      };
      const args = qemuArgs(spec);
      if (req.boot.kind === 'kernel') {
        for (const f of [req.boot.kernel, req.boot.initrd].filter((x): x is string => !!x)) {
          await stat(f).catch(() => {
            throw new TidemarkError('NOT_FOUND', `${this.opts.name}: boot file ${f} does not exist`);
          });
        }
      }
      this.setState('Starting', restoring ? 'restoring the saved state' : `launching QEMU (${choice.reason})`);
      this.shutdownSeen = null;
      this.panicked = null;
      this.expectingExit = null;
      this.detached = false;
      this.exitHandled = false;
      try {
        await this.launch(args, spec, choice.reason, req.startTimeoutMs ?? 30_000);
        if (restoring) await this.loadSavedState();
        await this.qmp!.execute('cont');
        this.setState('Running', restoring ? 'restored from the saved state' : 'started');
        if (restoring) await this.dropSavedState();
      } catch (err) {
        await this.killNow();
        this.setState(restoring ? 'Saved' : 'Off', `start failed: ${(err as Error).message}`);
        throw err;
      }
    });
  }

  /**
   * Shuts the guest down: guest agent first, then ACPI, then `quit` (each after its time limit). Resolves when
   * QEMU has ended.
   */
  async stop(opts: StopOptions = {}): Promise<StopOutcome> {
    return this.ops.run(async () => {
      const t0 = performance.now();
      if (this._state === 'Off' || this._state === 'Saved') return { by: 'already-off' as const, ms: 0 };
      this.mustHaveQmp();
      const wasPaused = this._state === 'Paused';
      this.setState('Stopping', 'shutting the guest down');
      if (wasPaused) await this.qmp!.execute('cont').catch(() => undefined); // a paused guest cannot shut down
      if (await this.agentShutdown()) {
        if (await this.waitExit(opts.agentTimeoutMs ?? 60_000))
          return { by: 'guest-agent' as const, ms: performance.now() - t0 };
        this.opts.log.warn(`${this.opts.name}: the guest did not power off after guest-shutdown; trying ACPI`);
      }
      if (!this.qmp!.closed) {
        await this.qmp!.execute('system_powerdown').catch(() => undefined);
        if (await this.waitExit(opts.acpiTimeoutMs ?? 10_000))
          return { by: 'acpi' as const, ms: performance.now() - t0 };
        this.opts.log.warn(`${this.opts.name}: the guest ignored the ACPI power button; quitting QEMU`);
      }
      await this.quitNow('quit');
      return { by: 'quit' as const, ms: performance.now() - t0 };
    });
  }

  /** Turn off (pulling the plug): `quit` at once. */
  async turnOff(): Promise<void> {
    return this.ops.run(async () => {
      if (this._state === 'Off' || this._state === 'Saved') return;
      this.mustHaveQmp();
      this.setState('Stopping', 'turning off');
      await this.quitNow('quit');
    });
  }

  async pause(): Promise<void> {
    return this.ops.run(async () => {
      if (this._state === 'Paused') return;
      this.mustBe('Running', 'pause');
      await this.qmp!.execute('stop');
      this.setState('Paused', 'paused');
    });
  }

  async resume(): Promise<void> {
    return this.ops.run(async () => {
      if (this._state === 'Running') return;
      this.mustBe('Paused', 'resume');
      await this.qmp!.execute('cont');
      this.setState('Running', 'resumed');
    });
  }

  /** Saves the memory and device state to `saved.state` and ends QEMU: Running/Paused → Saved. */
  async save(opts: { timeoutMs?: number } = {}): Promise<{ bytes: number; ms: number }> {
    return this.ops.run(async () => {
      if (this._state !== 'Running' && this._state !== 'Paused') {
        throw new TidemarkError(
          'CONFLICT',
          `${this.opts.name} is ${this._state}: only a running or paused VM can be saved`,
        );
      }
      const t0 = performance.now();
      const qmp = this.mustHaveQmp();
      if (this._state === 'Running') {
        await qmp.execute('stop');
        this.setState('Paused', 'paused to save');
      }
      let bytes: number;
      try {
        bytes = await this.migrateToFile(this.files.savedState, opts.timeoutMs ?? 300_000);
      } catch (err) {
        if (err instanceof TidemarkError && err.code === 'QEMU_FAILED') {
          await qmp.execute('cont').catch(() => undefined);
          this.setState('Running', 'save failed; resumed');
        }
        throw err;
      }
      await writeFileAtomic(
        this.files.savedInfo,
        JSON.stringify({ savedAt: new Date().toISOString(), bytes, record: this.record }, null, 2) + '\n',
        0o600,
      );
      await this.quitNow('saved');
      return { bytes, ms: performance.now() - t0 };
    });
  }

  /**
   * QEMU's migration stream of the paused guest (memory and device state) into `file`, through a temporary
   * file renamed when complete; its size. The guest stays paused (QEMU's postmigrate) for the caller.
   */
  private async migrateToFile(file: string, timeoutMs: number): Promise<number> {
    const qmp = this.mustHaveQmp();
    const tmp = `${file}.tmp`;
    await unlink(tmp).catch(() => undefined);
    await qmp.execute('migrate', { uri: `exec:cat > ${shellQuote(tmp)}` });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
      if (m.status === 'completed') break;
      if (m.status === 'failed' || m.status === 'cancelled') {
        await unlink(tmp).catch(() => undefined);
        throw new TidemarkError(
          'QEMU_FAILED',
          `${this.opts.name}: saving the state failed: ${m['error-desc'] ?? m.status}`,
        );
      }
      if (Date.now() > deadline) {
        await qmp.execute('migrate_cancel').catch(() => undefined);
        await unlink(tmp).catch(() => undefined);
        throw new TidemarkError('TIMEOUT', `${this.opts.name}: saving the state did not finish in time`);
      }
      await sleep(100);
    }
    const bytes = (await stat(tmp)).size;
    await chmod(tmp, 0o600);
    await rename(tmp, file);
    return bytes;
  }

  /**
   * A standard checkpoint's memory: pauses the guest, writes its memory and device state to `file`, runs
   * `whilePaused` (the disks' cut) and continues the guest. Memory and disks are of one instant: the guest
   * cannot run between the state and the cut.
   */
  async captureState<T>(
    file: string,
    whilePaused: () => Promise<T>,
    opts: { timeoutMs?: number } = {},
  ): Promise<{ result: T; bytes: number; ms: number }> {
    return this.ops.run(async () => {
      if (this._state !== 'Running' && this._state !== 'Paused') {
        throw new TidemarkError('CONFLICT', `${this.opts.name} is ${this._state}: its memory cannot be captured`);
      }
      const t0 = performance.now();
      const qmp = this.mustHaveQmp();
      const wasRunning = this._state === 'Running';
      if (wasRunning) {
        await qmp.execute('stop');
        this.setState('Paused', 'paused for a standard checkpoint');
      }
      try {
        const bytes = await this.migrateToFile(file, opts.timeoutMs ?? 300_000);
        const result = await whilePaused();
        return { result, bytes, ms: performance.now() - t0 };
      } finally {
        if (wasRunning) {
          await qmp.execute('cont');
          this.setState('Running', 'continued after the standard checkpoint');
        }
      }
    });
  }

  /**
   * Makes `memoryFile` (a standard checkpoint's state) this VM's saved state: Off → Saved; the next start
   * loads it and the guest resumes where the checkpoint caught it. The checkpoint keeps its own file.
   */
  async installSavedState(memoryFile: string, why: string): Promise<void> {
    return this.ops.run(async () => {
      if (this._state !== 'Off' && this._state !== 'Saved') {
        throw new TidemarkError('CONFLICT', `${this.opts.name} is ${this._state}: a saved state needs it off`);
      }
      await mkdir(this.opts.dir, { recursive: true, mode: 0o700 });
      const tmp = `${this.files.savedState}.tmp`;
      // A reflink where the file system can (the state is as large as the guest's memory).
      await copyFile(memoryFile, tmp, fsConstants.COPYFILE_FICLONE);
      await chmod(tmp, 0o600);
      await rename(tmp, this.files.savedState);
      const bytes = (await stat(this.files.savedState)).size;
      await writeFileAtomic(
        this.files.savedInfo,
        JSON.stringify({ savedAt: new Date().toISOString(), bytes, record: null, from: why }, null, 2) + '\n',
        0o600,
      );
      this.setState('Saved', why);
    });
  }

  /** Hot-plugs a SCSI disk (an NBD export of the host) into the running VM. IDE needs the VM off. */
  async attachDisk(slot: string, exportName: string): Promise<void> {
    return this.ops.run(async () => {
      const qmp = this.mustHaveQmp();
      const rec = this.record!;
      if (parseSlot(slot).kind !== 'scsi') {
        throw new TidemarkError(
          'CONFLICT',
          `${this.opts.name} is running: IDE disks change only with the VM off (as in Hyper-V)`,
        );
      }
      const device = diskDevice(
        { generation: rec.generation, scsiControllers: rec.scsiControllers, name: this.opts.name },
        slot,
      );
      await qmp.execute('blockdev-add', nbdBlockdev(slot, exportName, rec.nbd, rec.reconnectDelay));
      try {
        await qmp.execute('device_add', device);
      } catch (err) {
        await qmp.execute('blockdev-del', { 'node-name': nodeName(slot) }).catch(() => undefined);
        throw err;
      }
      this.opts.log.info(`${this.opts.name}: hot-added ${slot} (${exportName})`);
    });
  }

  /** Hot-unplugs a SCSI disk: device_del, DEVICE_DELETED, then its block node. */
  async detachDisk(slot: string, opts: { timeoutMs?: number } = {}): Promise<void> {
    return this.ops.run(async () => {
      const qmp = this.mustHaveQmp();
      if (parseSlot(slot).kind !== 'scsi') {
        throw new TidemarkError(
          'CONFLICT',
          `${this.opts.name} is running: IDE disks change only with the VM off (as in Hyper-V)`,
        );
      }
      const id = deviceId(slot);
      const deleted = qmp.waitEvent('DEVICE_DELETED', {
        timeoutMs: opts.timeoutMs ?? 30_000,
        match: (d) => d.device === id,
      });
      try {
        await qmp.execute('device_del', { id });
      } catch (err) {
        deleted.catch(() => undefined);
        throw err;
      }
      await deleted;
      await qmp.execute('blockdev-del', { 'node-name': nodeName(slot) });
      this.opts.log.info(`${this.opts.name}: hot-removed ${slot}`);
    });
  }

  /** A client of the VM's guest agent (the caller closes it). */
  guestAgent(timeoutMs = 5000): Promise<GuestAgentClient> {
    return GuestAgentClient.connect(`unix:${this.files.guest}`, { timeoutMs });
  }

  /** Any QMP command (for tests and diagnostics). */
  async qmpCommand<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    return this.mustHaveQmp().execute<T>(command, args);
  }

  /** Resolves when the state is one of `states` (TIMEOUT otherwise). */
  waitForState(states: VmState[], timeoutMs: number): Promise<VmState> {
    if (states.includes(this._state)) return Promise.resolve(this._state);
    return new Promise((resolve, reject) => {
      const onState = (s: VmState) => {
        if (!states.includes(s)) return;
        clearTimeout(timer);
        this.off('state', onState);
        resolve(s);
      };
      const timer = setTimeout(() => {
        this.off('state', onState);
        reject(
          new TidemarkError(
            'TIMEOUT',
            `${this.opts.name} did not become ${states.join(' or ')} within ${timeoutMs} ms (it is ${this._state})`,
          ),
        );
      }, timeoutMs);
      this.on('state', onState);
    });
  }

  /** Lets go of QEMU without stopping it (the host is shutting down): the next host adopts it. */
  async detach(): Promise<void> {
    this.detached = true;
    this.child?.removeAllListeners('exit');
    this.child?.unref();
    this.child = null;
    await this.qmp?.close();
    this.qmp = null;
  }

  // ---------------------------------------------------------------------------------------------------------

  private async launch(args: string[], spec: LaunchSpec, accelReason: string, startTimeoutMs: number): Promise<void> {
    const bin = this.opts.qemuBinary ?? 'qemu-system-x86_64';
    // QEMU appends to the console log; made here so it is private (0600) whatever QEMU's umask.
    closeSync(openSync(this.files.console, 'a', 0o600));
    const logFd = openSync(this.files.qemuLog, 'a', 0o600);
    let child: ChildProcess;
    try {
      child = spawn(bin, args, { detached: true, stdio: ['ignore', logFd, logFd] });
    } finally {
      closeSync(logFd);
    }
    const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
    const exited = new Promise<string>((resolve) =>
      child.once('exit', (code, signal) => resolve(signal ? `signal ${signal}` : `exit status ${code}`)),
    );
    child.unref();
    this.child = child;
    const pid = await Promise.race([
      new Promise<number>((resolve) => child.once('spawn', () => resolve(child.pid!))),
      spawnError.then((e) => {
        throw new TidemarkError('NOT_FOUND', `cannot run ${bin}: ${e.message} (install qemu-system-x86)`);
      }),
    ]);
    this.record = {
      pid,
      qmp: spec.qmpSocket,
      guest: spec.guestSocket,
      console: spec.consoleLog,
      accel: spec.accel,
      accelReason,
      startedAt: new Date().toISOString(),
      args,
      nbd: spec.nbd,
      reconnectDelay: spec.reconnectDelay,
      generation: spec.generation,
      scsiControllers: spec.scsiControllers,
    };
    await writeFileAtomic(this.files.pid, `${pid}\n`, 0o600);
    await writeFileAtomic(this.files.runtime, JSON.stringify(this.record, null, 2) + '\n', 0o600);
    const deadline = Date.now() + startTimeoutMs;
    let ended: string | null = null;
    void exited.then((how) => (ended = how));
    let qmp: QmpClient | null = null;
    while (!qmp) {
      if (ended !== null) {
        throw new TidemarkError(
          'QEMU_FAILED',
          `${this.opts.name}: QEMU ended at start (${ended}): ${await logTail(this.files.qemuLog)}`,
        );
      }
      if (Date.now() > deadline)
        throw new TidemarkError(
          'TIMEOUT',
          `${this.opts.name}: QEMU did not open ${spec.qmpSocket} within ${startTimeoutMs} ms`,
        );
      qmp = await QmpClient.connect(spec.qmpSocket, { timeoutMs: 5000 }).catch(() => null);
      if (!qmp) await sleep(50);
    }
    child.once('exit', (code, signal) => {
      if (!this.detached) void this.onExit(signal ? `killed by ${signal}` : `exit status ${code}`);
    });
    this.attachQmp(qmp);
    this.opts.log.info(`${this.opts.name}: QEMU pid ${pid} (${spec.accel}: ${accelReason})`);
  }

  private attachQmp(qmp: QmpClient): void {
    this.qmp = qmp;
    qmp.on('event', (ev: QmpEvent) => this.onEvent(ev));
    qmp.on('close', () => {
      if (this.detached || this.qmp !== qmp) return;
      // Our own child's 'exit' says how it ended (status or signal): that handler reports it.
      if (this.child && this.child.pid === this.record?.pid) return;
      // QEMU closes QMP when it ends; for an adopted QEMU (not our child) this is how we learn it.
      void this.waitPidGone(this.record?.pid ?? 0, 10_000).then(() => this.onExit('QMP closed and the process ended'));
    });
  }

  private onEvent(ev: QmpEvent): void {
    const name = this.opts.name;
    switch (ev.event) {
      case 'STOP':
        if (this._state === 'Running') this.setState('Paused', 'QEMU stopped the guest');
        break;
      case 'RESUME':
        if (this._state === 'Paused') this.setState('Running', 'resumed');
        break;
      case 'SHUTDOWN': {
        const guest = ev.data.guest === true;
        const reason = String(ev.data.reason ?? 'unknown');
        this.shutdownSeen = { reason, guest };
        this.opts.log.info(`${name}: shutdown (${reason}${guest ? ', from the guest' : ''})`);
        if (this._state !== 'Stopping') this.setState('Stopping', `shutdown: ${reason}`);
        break;
      }
      case 'POWERDOWN':
        this.opts.log.info(`${name}: ACPI power button pressed`);
        break;
      case 'RESET':
        this.opts.log.info(`${name}: reset (${String(ev.data.reason ?? 'unknown')})`);
        break;
      case 'GUEST_PANICKED': {
        const info = ev.data.info ? ` ${JSON.stringify(ev.data.info)}` : '';
        this.panicked = `guest kernel panic (${String(ev.data.action ?? '')})${info}`;
        this.opts.log.warn(`${name}: ${this.panicked}`);
        break;
      }
      default:
        break;
    }
  }

  private async onExit(how: string): Promise<void> {
    if (this.exitHandled || this._state === 'Off' || this._state === 'Saved') return;
    this.exitHandled = true;
    this.qmp = null;
    let info: ExitInfo;
    const at = new Date().toISOString();
    if (this.expectingExit === 'saved') info = { at, reason: 'saved', detail: 'state saved' };
    else if (this.panicked) info = { at, reason: 'panic', detail: this.panicked };
    else if (this.shutdownSeen?.guest)
      info = { at, reason: 'poweroff', detail: `the guest powered off (${this.shutdownSeen.reason})` };
    else if (this.shutdownSeen) info = { at, reason: 'quit', detail: `QEMU shut down (${this.shutdownSeen.reason})` };
    else if (this.expectingExit) info = { at, reason: this.expectingExit, detail: how };
    else
      info = { at, reason: 'crash', detail: `QEMU ended unexpectedly (${how}): ${await logTail(this.files.qemuLog)}` };
    this.lastExit = info;
    if (info.reason === 'crash' || info.reason === 'panic') this.opts.log.warn(`${this.opts.name}: ${info.detail}`);
    await this.cleanFiles();
    this.setState(info.reason === 'saved' ? 'Saved' : 'Off', info.detail);
    this.emit('exit', info);
    for (const w of this.exitWaiters.splice(0)) w();
  }

  private async agentShutdown(): Promise<boolean> {
    let c: GuestAgentClient;
    try {
      c = await GuestAgentClient.connect(`unix:${this.files.guest}`, { timeoutMs: 3000 });
    } catch (err) {
      this.opts.log.info(`${this.opts.name}: no guest agent (${(err as Error).message}); trying ACPI`);
      return false;
    }
    try {
      await c.ping();
      // guest-shutdown has no answer when it works: the channel closes or stays silent.
      await c.execute('guest-shutdown', { mode: 'powerdown' }, { timeoutMs: 3000 });
      return true;
    } catch (err) {
      const code = (err as TidemarkError).code;
      if (code === 'TIMEOUT' || code === 'CLOSED') return true;
      this.opts.log.info(
        `${this.opts.name}: the guest agent refused guest-shutdown (${(err as Error).message}); trying ACPI`,
      );
      return false;
    } finally {
      await c.close().catch(() => undefined);
    }
  }

  /** `quit`, then wait for the process; SIGKILL if it does not end. */
  private async quitNow(reason: ExitInfo['reason']): Promise<void> {
    this.expectingExit = reason;
    await this.qmp?.execute('quit').catch(() => undefined);
    if (!(await this.waitExit(15_000))) {
      this.opts.log.warn(`${this.opts.name}: QEMU did not end after quit; killing it`);
      if (this.record) killGroup(this.record.pid, 'SIGKILL');
      await this.waitExit(5_000);
    }
  }

  private async killNow(): Promise<void> {
    this.expectingExit = 'quit';
    if (this.record && pidAlive(this.record.pid)) killGroup(this.record.pid, 'SIGKILL');
    await this.qmp?.close().catch(() => undefined);
    this.qmp = null;
    if (this.record) await this.waitPidGone(this.record.pid, 5000);
    await this.cleanFiles();
  }

  private waitExit(ms: number): Promise<boolean> {
    if (this._state === 'Off' || this._state === 'Saved') return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.exitWaiters = this.exitWaiters.filter((w) => w !== done);
        resolve(false);
      }, ms);
      const done = () => {
        clearTimeout(timer);
        resolve(true);
      };
      this.exitWaiters.push(done);
    });
  }

  private async waitPidGone(pid: number, ms: number): Promise<void> {
    const end = Date.now() + ms;
    while (pid > 0 && pidAlive(pid) && !isZombie(pid) && Date.now() < end) await sleep(50);
  }

  private async cleanFiles(): Promise<void> {
    for (const f of [this.files.pid, this.files.runtime, this.files.qmp]) await unlink(f).catch(() => undefined);
    if (!this.opts.guestSocket) await unlink(this.files.guest).catch(() => undefined);
  }

  private async hasSavedState(): Promise<boolean> {
    try {
      await stat(this.files.savedInfo);
      return (await stat(this.files.savedState)).size > 0;
    } catch {
      return false;
    }
  }

  private async loadSavedState(): Promise<void> {
    const qmp = this.qmp!;
    await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(this.files.savedState)}` });
    const deadline = Date.now() + 300_000;
    for (;;) {
      const s = await qmp.execute<{ status: string }>('query-status');
      const m = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
      if (m.status === 'failed')
        throw new TidemarkError(
          'QEMU_FAILED',
          `${this.opts.name}: loading the saved state failed: ${m['error-desc'] ?? 'failed'}`,
        );
      if (s.status !== 'inmigrate' && (m.status === 'completed' || m.status === undefined)) return;
      if (Date.now() > deadline)
        throw new TidemarkError('TIMEOUT', `${this.opts.name}: loading the saved state did not finish in time`);
      await sleep(100);
    }
  }

  /**
   * The serial console log from `offset` (at most `max` bytes, up to 1 MiB): `{ data, offset: next, size }`.
   * QEMU appends to it across runs; it is only read here.
   */
  async readConsole(offset = 0, max = 65536): Promise<{ data: string; offset: number; size: number }> {
    let fh;
    try {
      fh = await open(this.files.console, 'r');
    } catch {
      return { data: '', offset: 0, size: 0 };
    }
    try {
      const { size } = await fh.stat();
      const from = Math.min(Math.max(0, offset), size);
      const n = Math.min(size - from, Math.max(0, Math.min(max, 1 << 20)));
      const buf = Buffer.alloc(n);
      if (n > 0) await fh.read(buf, 0, n, from);
      return { data: buf.toString('utf8'), offset: from + n, size };
    } finally {
      await fh.close();
    }
  }

  /** Discards the saved state (after a restore, or when a person deletes it). */
  async dropSavedState(): Promise<void> {
    await unlink(this.files.savedInfo).catch(() => undefined);
    await unlink(this.files.savedState).catch(() => undefined);
    if (this._state === 'Saved') this.setState('Off', 'saved state discarded');
  }

  private async uefiFiles(): Promise<{ code: string; vars: string }> {
    const pairs = [
      ['/usr/share/OVMF/OVMF_CODE_4M.fd', '/usr/share/OVMF/OVMF_VARS_4M.fd'],
      ['/usr/share/OVMF/OVMF_CODE.fd', '/usr/share/OVMF/OVMF_VARS.fd'],
    ];
    for (const [code, vars] of pairs) {
      if (
        await stat(code).then(
          () => true,
          () => false,
        )
      ) {
        if (
          !(await stat(this.files.uefiVars).then(
            () => true,
            () => false,
          ))
        )
          await copyFile(vars, this.files.uefiVars);
        await chmod(this.files.uefiVars, 0o600); // the VM's own NVRAM, private like its disks
        return { code, vars: this.files.uefiVars };
      }
    }
    throw new TidemarkError(
      'NOT_SUPPORTED',
      `${this.opts.name}: generation 2 firmware boot needs OVMF (apt-get install ovmf), or boot a kernel`,
    );
  }

  private mustHaveQmp(): QmpClient {
    if (!this.qmp || this.qmp.closed)
      throw new TidemarkError('CONFLICT', `${this.opts.name} is ${this._state}: no QEMU to talk to`);
    return this.qmp;
  }

  private mustBe(state: VmState, what: string): void {
    if (this._state !== state)
      throw new TidemarkError('CONFLICT', `${this.opts.name} is ${this._state}: cannot ${what} it`);
    this.mustHaveQmp();
  }

  private setState(s: VmState, detail: string): void {
    if (s === this._state) return;
    this._state = s;
    this.emit('state', s, detail);
  }
}

/** Where a VM's runtime files live; sockets fall back to `runDir/<id>.qmp|.qga` when the folder's path is too long. */
export function runtimeFiles(dir: string, runDir: string, id: string, guest: string | null): RuntimeFiles {
  const short = id.replace(/[^A-Za-z0-9]/g, '').slice(0, 12);
  const sock = (name: string, ext: string) => {
    const p = path.join(dir, name);
    return Buffer.byteLength(p) <= MAX_SOCKET_PATH ? p : path.join(runDir, `${short}.${ext}`);
  };
  const guestPath = guest?.startsWith('unix:') ? guest.slice(5) : guest;
  const files: RuntimeFiles = {
    qmp: sock('qmp.sock', 'qmp'),
    guest: guestPath || sock('qga.sock', 'qga'),
    console: path.join(dir, 'console.log'),
    qemuLog: path.join(dir, 'qemu.log'),
    pid: path.join(dir, 'qemu.pid'),
    runtime: path.join(dir, 'runtime.json'),
    savedState: path.join(dir, 'saved.state'),
    savedInfo: path.join(dir, 'saved.json'),
    uefiVars: path.join(dir, 'uefi-vars.fd'),
  };
  for (const s of [files.qmp, files.guest]) {
    if (Buffer.byteLength(s) > MAX_SOCKET_PATH) {
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        `socket path ${s} is longer than ${MAX_SOCKET_PATH} bytes: use a shorter store path`,
      );
    }
  }
  return files;
}

function stateOfStatus(status: string): VmState {
  switch (status) {
    case 'running':
      return 'Running';
    case 'inmigrate':
    case 'prelaunch':
      return 'Starting';
    case 'shutdown':
      return 'Stopping';
    default:
      return 'Paused'; // paused, suspended, internal-error, io-error, guest-panicked, postmigrate, ...
  }
}

async function readRecord(file: string): Promise<RuntimeRecord | null> {
  try {
    const r = JSON.parse(await readFile(file, 'utf8')) as RuntimeRecord;
    return Number.isSafeInteger(r.pid) && typeof r.qmp === 'string' ? r : null;
  } catch {
    return null;
  }
}

/** The process lives and is the QEMU we launched: its command line names our QMP socket. */
function isOurQemu(pid: number, qmpSocket: string): boolean {
  if (!pidAlive(pid) || isZombie(pid)) return false;
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes(qmpSocket.replace(/,/g, ',,'));
  } catch {
    return false;
  }
}

function isZombie(pid: number): boolean {
  try {
    return /^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal); // QEMU leads its own process group (detached spawn)
  } catch {
    try {
      process.kill(pid, signal);
    } catch {
      // already gone
    }
  }
}

async function logTail(file: string): Promise<string> {
  try {
    const fh = await open(file, 'r');
    try {
      const { size } = await fh.stat();
      const n = Math.min(size, 2048);
      const buf = Buffer.alloc(n);
      await fh.read(buf, 0, n, size - n);
      const lines = buf.toString('utf8').trim().split('\n').slice(-5).join(' / ');
      return lines || '(qemu.log is empty)';
    } finally {
      await fh.close();
    }
  } catch {
    return '(no qemu.log)';
  }
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export { QmpError };
