/**
 * Which connection gives way when a new client arrives at the connection limit, or when idle
 * connections are closed under pressure. The rules, in order:
 *
 * 1. Only connections that serve nobody can be chosen: stalled ones (they owe progress and made none
 *    for a second), ones still negotiating, idle ones, the last two once they have been so for a
 *    moment (SETTLED_MS: not a client between its handshake and its first request). A connection
 *    with requests running never is.
 * 2. The peer holding the most connections gives way first: a flood from one address cannot push out
 *    the others. (TCP peers are told apart by address; every unix-socket client is one peer, since
 *    Node does not expose SO_PEERCRED, and the socket is 0600, so they all run as the server's user.)
 * 3. Within that peer: stalled before negotiating before idle.
 * 4. Then the youngest connection first. A VM's disk is attached when it starts and stays for hours,
 *    often idle: the oldest connections are the ones to keep. A flood is younger than what it floods.
 */

export type VictimKind = 'stalled' | 'negotiating' | 'idle';

export interface Candidate<T> {
  item: T;
  peer: string;
  kind: VictimKind;
  /** Connection number: higher is younger. */
  id: number;
}

const RANK: Record<VictimKind, number> = { stalled: 0, negotiating: 1, idle: 2 };

/**
 * The candidate to drop, or undefined when there is none. `peerSizes` counts every live connection of
 * each peer (candidates or not).
 */
export function chooseVictim<T>(candidates: Candidate<T>[], peerSizes: Map<string, number>): T | undefined {
  let best: Candidate<T> | undefined;
  const size = (c: Candidate<T>) => peerSizes.get(c.peer) ?? 0;
  for (const c of candidates) {
    if (
      !best ||
      size(c) > size(best) ||
      (size(c) === size(best) &&
        (RANK[c.kind] < RANK[best.kind] || (RANK[c.kind] === RANK[best.kind] && c.id > best.id)))
    ) {
      best = c;
    }
  }
  return best?.item;
}
