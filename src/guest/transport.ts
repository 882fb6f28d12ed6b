/**
 * The byte channel to a guest agent: a unix socket (QEMU's `-chardev socket,...` or `qemu-ga -m unix-listen`), or a
 * character device (QEMU's `-chardev pty` on the host, a virtio-serial port inside a guest). The client above it
 * does the framing; this layer only moves bytes and reports the end of the channel.
 */
import fs from 'node:fs';
import net from 'node:net';
import { promisify } from 'node:util';
import { TidemarkError, fromSystemError } from '../errors.js';

export interface Channel {
  /** what to name in messages: the socket or device path */
  readonly description: string;
  /** set by the consumer right after opening, before any I/O turn */
  onData: (chunk: Buffer) => void;
  /** called once, when the channel ends for any reason (not after close()) */
  onClose: (reason: string) => void;
  /** queues bytes; throws CLOSED once the channel has ended */
  write(data: Buffer): void;
  close(): Promise<void>;
}

/** `unix:/path`, or a path to a unix socket or a character device. */
export async function openChannel(address: string, timeoutMs: number): Promise<Channel> {
  const unix = address.startsWith('unix:');
  const path = unix ? address.slice('unix:'.length) : address;
  if (path === '') throw new TidemarkError('INVALID_ARGUMENT', `no path in guest channel address "${address}"`);
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(path);
  } catch (err) {
    throw fromSystemError(err, 'open the guest channel', path);
  }
  if (st.isSocket()) return SocketChannel.connect(path, timeoutMs);
  if (st.isCharacterDevice() && !unix) return DeviceChannel.open(path);
  throw new TidemarkError(
    'INVALID_ARGUMENT',
    `${path} is neither a unix socket nor a character device: give the guest agent's socket or serial device`,
    { path },
  );
}

class SocketChannel implements Channel {
  onData: (chunk: Buffer) => void = () => {};
  onClose: (reason: string) => void = () => {};
  private ended = false;
  private closing = false;
  private lastError: string | undefined;

  private constructor(
    private readonly sock: net.Socket,
    readonly description: string,
  ) {
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.on('error', (err) => {
      this.lastError = err.message;
    });
    sock.on('close', () => {
      this.ended = true;
      if (!this.closing) this.onClose(this.lastError ?? 'the guest agent closed the channel');
    });
  }

  static connect(path: string, timeoutMs: number): Promise<Channel> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path });
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new TidemarkError('TIMEOUT', `could not connect to ${path} within ${timeoutMs} ms`, { path }));
      }, timeoutMs);
      sock.once('error', (err) => {
        clearTimeout(timer);
        sock.destroy();
        const e = err as NodeJS.ErrnoException;
        if (e.code === 'ECONNREFUSED') {
          reject(new TidemarkError('CLOSED', `nothing listens on ${path} (connection refused)`, { path }));
        } else {
          reject(fromSystemError(err, 'connect to', path));
        }
      });
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        resolve(new SocketChannel(sock, path));
      });
    });
  }

  write(data: Buffer): void {
    if (this.ended || this.closing)
      throw new TidemarkError('CLOSED', `the guest channel ${this.description} is closed`);
    this.sock.write(data);
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    if (this.ended) return;
    await new Promise<void>((resolve) => {
      this.sock.once('close', () => resolve());
      this.sock.destroy();
    });
  }
}

const readP = promisify(fs.read);
const writeP = promisify(fs.write);
const closeP = promisify(fs.close);
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
/** Longest pause between two polls of an idle device: bounds the latency an answer can wait for. */
const MAX_POLL_MS = 20;

/**
 * A character device opened non-blocking and polled. Node has no readiness notification for arbitrary devices,
 * and a blocking read would hold a libuv pool thread until data came (for ever, if the agent is gone). The device
 * must be in raw mode; QEMU's pty chardev and virtio-serial ports are.
 */
class DeviceChannel implements Channel {
  onData: (chunk: Buffer) => void = () => {};
  onClose: (reason: string) => void = () => {};
  private closing = false;
  private ended = false;
  private readLoop: Promise<void>;
  private writes: Promise<void> = Promise.resolve();

  private constructor(
    private readonly fd: number,
    readonly description: string,
  ) {
    this.readLoop = this.pollReads();
  }

  static async open(path: string): Promise<Channel> {
    const { O_RDWR, O_NOCTTY, O_NONBLOCK } = fs.constants;
    try {
      const fd = await promisify(fs.open)(path, O_RDWR | O_NOCTTY | O_NONBLOCK);
      return new DeviceChannel(fd, path);
    } catch (err) {
      throw fromSystemError(err, 'open the guest channel', path);
    }
  }

  private async pollReads(): Promise<void> {
    const buf = Buffer.alloc(64 * 1024);
    let idle = 1;
    while (!this.closing && !this.ended) {
      let n = 0;
      try {
        n = (await readP(this.fd, buf, 0, buf.length, null)).bytesRead;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'EAGAIN' && code !== 'EWOULDBLOCK') {
          this.end(`reading ${this.description} failed: ${(err as Error).message}`);
          return;
        }
      }
      if (n > 0 && !this.closing) {
        this.onData(Buffer.from(buf.subarray(0, n)));
        idle = 1;
        continue;
      }
      // 0 bytes is "nothing now" on a device (a virtio port whose host side is away), not an end of file.
      await sleep(idle);
      idle = Math.min(idle * 2, MAX_POLL_MS);
    }
  }

  private end(reason: string): void {
    if (this.ended) return;
    this.ended = true;
    if (!this.closing) this.onClose(reason);
  }

  write(data: Buffer): void {
    if (this.ended || this.closing)
      throw new TidemarkError('CLOSED', `the guest channel ${this.description} is closed`);
    this.writes = this.writes.then(() => this.writeAll(data));
  }

  private async writeAll(data: Buffer): Promise<void> {
    let off = 0;
    let idle = 1;
    while (off < data.length && !this.ended && !this.closing) {
      try {
        off += (await writeP(this.fd, data, off, data.length - off)).bytesWritten;
        idle = 1;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'EAGAIN' && code !== 'EWOULDBLOCK') {
          this.end(`writing ${this.description} failed: ${(err as Error).message}`);
          return;
        }
        await sleep(idle);
        idle = Math.min(idle * 2, MAX_POLL_MS);
      }
    }
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    // Both loops see `closing` within one poll interval; the fd is closed only when no read or write uses it.
    await this.readLoop;
    await this.writes;
    await closeP(this.fd).catch(() => {});
  }
}
