/**
 * A cap on the connections of one listener that slow or idle strangers cannot use to lock out the host's
 * clients. Connections count from accept; at the cap, a new connection evicts the oldest one that has not
 * yet made an authenticated request (a slow-header sender, an idle stranger), and is closed at once only
 * when every open connection is an authenticated client's. So a flood of slow connections holds at most
 * `max` descriptors, and a well-behaved client that sends its request at once still gets in.
 */
import type net from 'node:net';

interface Entry {
  /** A request on this connection passed the token check. */
  trusted: boolean;
}

export class ConnectionGate {
  /** Insertion order is acceptance order: the first untrusted entry is the oldest. */
  private readonly open = new Map<net.Socket, Entry>();

  constructor(
    server: net.Server,
    private readonly max: number,
  ) {
    server.on('connection', (socket: net.Socket) => this.admit(socket));
  }

  /** Marks the connection of an authenticated request: it is not evicted for newcomers. */
  trust(socket: net.Socket): void {
    const e = this.open.get(socket);
    if (e) e.trusted = true;
  }

  /** Ends every connection (host shutdown): slow strangers do not hold the close up. */
  destroyAll(): void {
    for (const s of this.open.keys()) s.destroy();
    this.open.clear();
  }

  private admit(socket: net.Socket): void {
    if (this.open.size >= this.max) {
      const victim = [...this.open].find(([, e]) => !e.trusted)?.[0];
      if (!victim) {
        socket.destroy();
        return;
      }
      this.open.delete(victim);
      victim.destroy();
    }
    this.open.set(socket, { trusted: false });
    socket.once('close', () => this.open.delete(socket));
  }
}
