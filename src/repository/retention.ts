/**
 * Retention: which restore points a policy keeps. Per group of points (the same set of VMs), newest first:
 * `keepLast N` keeps the N newest; `keepDaily N` keeps the newest point of each of the N most recent days that have
 * a point (likewise hourly, weekly — ISO weeks —, monthly, yearly). Periods are in UTC. A point any rule keeps is
 * kept, with every reason that keeps it; the others are removed.
 */
export interface RetentionPolicy {
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
}

export interface RetentionCandidate {
  id: string;
  time: Date;
  group: string;
}

export interface RetentionDecision {
  id: string;
  time: string;
  group: string;
  keep: boolean;
  /** why it is kept (`daily 2026-11-24`, `last 3`), or why it goes */
  reasons: string[];
}

export const RULES = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const;
export type Rule = (typeof RULES)[number];

const POLICY_FIELD: Record<Rule, keyof RetentionPolicy> = {
  last: 'keepLast',
  hourly: 'keepHourly',
  daily: 'keepDaily',
  weekly: 'keepWeekly',
  monthly: 'keepMonthly',
  yearly: 'keepYearly',
};

export function policyField(rule: Rule): keyof RetentionPolicy {
  return POLICY_FIELD[rule];
}

/** ISO 8601 week of a UTC time: `2026-W48` (the week belongs to the year of its Thursday). */
export function isoWeek(t: Date): string {
  const day = Date.UTC(t.getUTCFullYear(), t.getUTCMonth(), t.getUTCDate());
  const weekday = (new Date(day).getUTCDay() + 6) % 7; // Monday 0
  const thursday = new Date(day + (3 - weekday) * 86_400_000);
  const year = thursday.getUTCFullYear();
  const week = 1 + Math.floor((thursday.getTime() - Date.UTC(year, 0, 1)) / (7 * 86_400_000));
  return `${year}-W${String(week).padStart(2, '0')}`;
}

export function bucketOf(rule: Exclude<Rule, 'last'>, t: Date): string {
  const iso = t.toISOString();
  switch (rule) {
    case 'hourly':
      return iso.slice(0, 13);
    case 'daily':
      return iso.slice(0, 10);
    case 'weekly':
      return isoWeek(t);
    case 'monthly':
      return iso.slice(0, 7);
    case 'yearly':
      return iso.slice(0, 4);
  }
}

export function checkPolicy(policy: RetentionPolicy): string | null {
  let any = false;
  for (const rule of RULES) {
    const n = policy[POLICY_FIELD[rule]];
    if (n === undefined) continue;
    if (!Number.isSafeInteger(n) || n < 0) return `keep-${rule} ${n} is not a count`;
    if (n > 0) any = true;
  }
  return any ? null : 'a policy that keeps nothing would remove every restore point: give at least one keep count';
}

export function applyRetention(points: RetentionCandidate[], policy: RetentionPolicy): RetentionDecision[] {
  const decisions = new Map<string, RetentionDecision>();
  const groups = new Map<string, RetentionCandidate[]>();
  for (const p of points) {
    decisions.set(p.id, { id: p.id, time: p.time.toISOString(), group: p.group, keep: false, reasons: [] });
    const g = groups.get(p.group) ?? [];
    g.push(p);
    groups.set(p.group, g);
  }
  for (const members of groups.values()) {
    // Newest first; equal times by id, so the outcome does not depend on input order.
    members.sort((a, b) => b.time.getTime() - a.time.getTime() || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
    for (const rule of RULES) {
      const n = policy[POLICY_FIELD[rule]] ?? 0;
      if (n <= 0) continue;
      let kept = 0;
      let last: string | undefined;
      for (const p of members) {
        if (kept >= n) break;
        const bucket = rule === 'last' ? p.id : bucketOf(rule, p.time);
        if (bucket === last) continue;
        last = bucket;
        kept++;
        const d = decisions.get(p.id)!;
        d.keep = true;
        d.reasons.push(rule === 'last' ? `last ${kept}` : `${rule} ${bucket}`);
      }
    }
  }
  for (const d of decisions.values()) if (!d.keep) d.reasons.push('no rule keeps it');
  return [...decisions.values()].sort((a, b) => (a.time < b.time ? 1 : a.time > b.time ? -1 : a.id < b.id ? 1 : -1));
}
