// Shared helpers for the whole-command benches against qemu-img on big images (convert.ts, snapshot-1t.ts):
// option parsing, timed runs with peak RSS, paired-ratio statistics, tables and --cpu-prof summaries.
//
// These benches report; they never fail on a missed aim. A qimg run that exits non-zero or
// writes an image qemu-img rejects is a correctness failure, printed loudly and never timed.

import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const GNU_TIME = '/usr/bin/time';
/** Generated images live here between runs (never in the repository). */
export const CACHE_DIR = join(tmpdir(), 'qimg-bench-cache');

export interface BigBenchOptions {
  runs: number;
  /** Tree to time (holding bin/qimg.js and dist/); defaults to this repository. */
  root?: string;
  json: boolean;
  /** After the timed rounds, run one qimg command per case under `node --cpu-prof` and summarize it. */
  cpuProf: boolean;
  /** Only the named cases (comma-separated labels or their short keys). */
  only?: string[];
}

export function parseBigBenchArgs(name: string, argv: string[], defaultRuns: number): BigBenchOptions {
  const opts: BigBenchOptions = { runs: defaultRuns, json: false, cpuProf: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const eq = a.startsWith('--') ? a.indexOf('=') : -1;
    const key = eq > 0 ? a.slice(0, eq) : a;
    const inline = eq > 0 ? a.slice(eq + 1) : undefined;
    const value = (): string => {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new Error(`${name}: ${key} needs a value`);
      return v;
    };
    if (key === '--runs') {
      const v = value();
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) throw new Error(`${name}: --runs needs a positive integer, got ${v}`);
      opts.runs = n;
    } else if (key === '--root') opts.root = value();
    else if (key === '--only') opts.only = value().split(',').filter(Boolean);
    else if (key === '--json') opts.json = true;
    else if (key === '--cpu-prof') opts.cpuProf = true;
    else throw new Error(`${name}: unknown option ${a} (use --runs N, --root DIR, --only CASES, --cpu-prof, --json)`);
  }
  return opts;
}

/** The repository root: dist/bench/common.js lives two levels below it. */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    if (existsSync(join(dir, 'bin', 'qimg.js')) && existsSync(join(dir, 'package.json'))) return dir;
    dir = dirname(dir);
  }
  throw new Error('cannot find the qimg repository root (bin/qimg.js) above ' + fileURLToPath(import.meta.url));
}

/** The tree whose qimg is timed, checked to be built. */
export function qimgRoot(opts: BigBenchOptions): string {
  const root = opts.root ?? repoRoot();
  if (!existsSync(join(root, 'bin', 'qimg.js'))) throw new Error(`${root} has no bin/qimg.js`);
  if (!existsSync(join(root, 'dist', 'src', 'cli', 'main.js'))) {
    throw new Error(`${root}/dist is not built: run \`npx tsc -p tsconfig.json\` there first`);
  }
  return root;
}

export function hasQemuImg(): boolean {
  return spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status === 0;
}

export function hasGnuTime(): boolean {
  if (!existsSync(GNU_TIME)) return false;
  const r = spawnSync(GNU_TIME, ['-f', '%M', 'true'], { encoding: 'utf8' });
  return r.status === 0 && /^\d+\s*$/m.test(r.stderr);
}

export function machineNote(): string {
  const l = loadavg().map((x) => x.toFixed(2)).join(' ');
  return `Node ${process.version}, ${cpus().length} CPUs, load average ${l}`;
}

export interface Run {
  ms: number;
  /** Peak RSS in KiB from GNU time, or null when it is not available. */
  rssKiB: number | null;
  status: number | null;
  stderr: string;
}

/**
 * One whole-process run. With GNU time the command runs under `/usr/bin/time -f %M -o FILE`
 * (about 1 ms of overhead, the same for both tools), so wall time and peak RSS come from the
 * same run.
 */
export function timedRun(file: string, args: string[], opts: { cwd?: string; gnuTime: boolean; scratch: string }): Run {
  const rssFile = join(opts.scratch, 'rss.txt');
  const [f, a] = opts.gnuTime ? [GNU_TIME, ['-f', '%M', '-o', rssFile, file, ...args]] : [file, args];
  rmSync(rssFile, { force: true });
  const t0 = process.hrtime.bigint();
  const r = spawnSync(f, a, { cwd: opts.cwd, stdio: ['ignore', 'ignore', 'pipe'], maxBuffer: 1 << 24, encoding: 'utf8' });
  const t1 = process.hrtime.bigint();
  if (r.error) throw r.error;
  let rssKiB: number | null = null;
  if (opts.gnuTime && existsSync(rssFile)) {
    // On failure GNU time writes "Command exited with non-zero status N" before the number.
    const n = Number.parseInt(readFileSync(rssFile, 'utf8').trim().split('\n').pop() ?? '', 10);
    if (Number.isFinite(n)) rssKiB = n;
  }
  return { ms: Number(t1 - t0) / 1e6, rssKiB, status: r.status, stderr: r.stderr };
}

/** Runs a helper command (image generation, verification); throws with its stderr when it fails. */
export function mustRun(file: string, args: string[], what: string): string {
  const r = spawnSync(file, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${what} failed (${file} ${args.join(' ')}): ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

export function run(file: string, args: string[]): SpawnSyncReturns<string> {
  return spawnSync(file, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
}

/** Flushes one file's dirty pages (untimed), so the next timed command does not pay for them. */
export function syncFile(path: string): void {
  spawnSync('sync', [path], { stdio: 'ignore' });
}

/**
 * Everything written or freed so far reaches the disk (untimed) before the next timed command.
 * A deleted 600 MiB output's blocks are given back (and, on a file system mounted with
 * `discard`, discarded) at the next journal commit: without this, that lands in whichever command
 * runs next, 0.2-0.7 s in one run out of four or five, on either tool.
 */
export function syncAll(): void {
  spawnSync('sync', [], { stdio: 'ignore' });
}

/** A VM's free page reporting (virtio-balloon): how much freed memory it has handed to the host. */
const REPORTED = '/sys/module/page_reporting/parameters/reported_kib';

/**
 * Waits (untimed, up to `maxMs`) until the guest has stopped reporting freed memory to its host,
 * where it does (a virtio-balloon with free page reporting: this project's Firecracker VMs). The
 * kernel reports ~2 s after memory is freed, so "stopped" is: no change for `quietMs`.
 *
 * Why: deleting a 600 MiB output frees that much page cache; the guest hands it to the host in
 * the next seconds, and a command that allocates memory meanwhile (the next convert's own output)
 * waits on the host taking pages back and giving them again: 1.2-2.4 s of "system" time that
 * perf, inside the guest, cannot see. It hit whichever tool ran right after its own previous
 * output was deleted (qimg, in the bench's order: 4 runs in 4) and made medians meaningless.
 * Returns at once where there is no such file.
 */
export function settleFreedMemory(maxMs = 8000, quietMs = 2500): void {
  const read = (): string | null => {
    try {
      return readFileSync(REPORTED, 'utf8');
    } catch {
      return null;
    }
  };
  let last = read();
  if (last === null) return;
  const start = Date.now();
  let quietSince = start;
  while (Date.now() - start < maxMs && Date.now() - quietSince < quietMs) {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
    const now = read();
    if (now !== last) {
      last = now;
      quietSince = Date.now();
    }
  }
}

export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

export function median(xs: number[]): number {
  return quantile(xs, 0.5);
}

export interface RatioStats {
  median: number;
  p25: number;
  p75: number;
  n: number;
}

/** Median and quartiles of per-round ratios a[i] / b[i] (rounds where either is missing are dropped). */
export function pairedRatio(a: (number | null)[], b: (number | null)[]): RatioStats {
  const r: number[] = [];
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    const x = a[i];
    const y = b[i];
    if (x !== null && x !== undefined && y !== null && y !== undefined && y > 0) r.push(x / y);
  }
  return { median: median(r), p25: quantile(r, 0.25), p75: quantile(r, 0.75), n: r.length };
}

export function fmt(n: number | null, digits: number): string {
  return n === null || !Number.isFinite(n) ? '-' : n.toFixed(digits);
}

export function fmtRatio(s: RatioStats, digits = 2): string {
  if (s.n === 0) return '-';
  return `${fmt(s.median, digits)} (${fmt(s.p25, digits)}-${fmt(s.p75, digits)})`;
}

export function mib(kib: number | null): string {
  return kib === null ? '-' : (kib / 1024).toFixed(0);
}

export function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows
    .map((r) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  '))
    .join('\n');
}

/** mulberry32: a small seeded PRNG, so the generated images are the same on every machine. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function ensureDir(dir: string): string {
  mkdirSync(dir, { recursive: true });
  return dir;
}

export interface ProfileLine {
  selfMs: number;
  selfPct: number;
  fn: string;
}

/**
 * Runs `node --cpu-prof` on one qimg command and returns the top functions by self time
 * (summed over every node of the profile with the same name and location).
 */
export function cpuProfile(root: string, args: string[], scratch: string, top = 12): { lines: ProfileLine[]; totalMs: number; wallMs: number } {
  const dir = join(scratch, 'cpuprof');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, ['--cpu-prof', '--cpu-prof-dir', dir, join(root, 'bin', 'qimg.js'), ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    encoding: 'utf8',
  });
  const wallMs = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== 0) throw new Error(`qimg ${args.join(' ')} under --cpu-prof failed: ${r.stderr.trim()}`);
  const file = readdirSync(dir).find((f) => f.endsWith('.cpuprofile'));
  if (file === undefined) throw new Error('node --cpu-prof wrote no profile');
  const prof = JSON.parse(readFileSync(join(dir, file), 'utf8')) as {
    nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number } }[];
    samples: number[];
    timeDeltas: number[];
  };
  const nameOf = new Map<number, string>();
  for (const n of prof.nodes) {
    const cf = n.callFrame;
    const where = cf.url ? `${cf.url.replace(/^file:\/\//, '').replace(root + '/', '')}:${cf.lineNumber + 1}` : '';
    nameOf.set(n.id, `${cf.functionName || '(anonymous)'}${where ? ' ' + where : ''}`);
  }
  const selfUs = new Map<string, number>();
  let total = 0;
  // timeDeltas[i] is the time since the previous sample: charge it to sample i.
  for (let i = 0; i < prof.samples.length; i++) {
    const dt = prof.timeDeltas[i] ?? 0;
    const name = nameOf.get(prof.samples[i]!) ?? '?';
    selfUs.set(name, (selfUs.get(name) ?? 0) + dt);
    total += dt;
  }
  const lines = [...selfUs.entries()]
    .sort((x, y) => y[1] - x[1])
    .slice(0, top)
    .map(([fn, us]) => ({ fn, selfMs: us / 1000, selfPct: (100 * us) / total }));
  return { lines, totalMs: total / 1000, wallMs };
}

export function renderProfile(title: string, p: { lines: ProfileLine[]; totalMs: number; wallMs: number }): string {
  const rows = [['self ms', 'self %', 'function']];
  for (const l of p.lines) rows.push([l.selfMs.toFixed(0), l.selfPct.toFixed(1), l.fn]);
  const widths = [7, 6];
  const body = rows.map((r) => `${r[0]!.padStart(widths[0]!)}  ${r[1]!.padStart(widths[1]!)}  ${r[2]}`).join('\n');
  return `${title} (profiled wall ${p.wallMs.toFixed(0)} ms, ${p.totalMs.toFixed(0)} ms sampled)\n${body}\n`;
}
