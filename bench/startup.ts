// Whole-command start-up: paired, interleaved wall-time runs of qimg against bare Node and qemu-img.
//
// Why paired and interleaved: on a small shared machine the load drifts by tens of percent
// between seconds, so timing all runs of A and then all of B measures the drift. Each round
// runs every command once (in a rotated order, so no command always runs first after an
// idle gap), and the ratios are taken within a round, then the median over rounds is
// reported. This reports; it never fails on a missed aim.
//
//   node dist/bench/startup.js [--runs N] [--warmup N] [--root DIR] [--json]
//
// --root times another checkout (e.g. a git worktree with a start-up change) the same way.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

/** The aim from the project brief: `snapshot -l` and `info` within this factor of bare Node. */
export const STARTUP_AIM_RATIO = 1.5;
const DEFAULT_RUNS = 30;
const DEFAULT_WARMUP = 3;
/** Peak RSS hardly varies, so a few samples per command are enough. */
const RSS_RUNS = 5;
const GNU_TIME = '/usr/bin/time';
const FIXTURE = 'fixtures/demo.qcow2';

interface Command {
  /** Short label used in the table. */
  name: string;
  file: string;
  args: string[];
  /** 'qimg' commands are the ones the aim is about; 'baseline' is the yardstick; 'info' and 'qemu' are shown for scale. */
  role: 'baseline' | 'info' | 'qimg' | 'qemu';
  /** For qimg commands: the qemu-img command doing the same work, by name. */
  qemuPeer?: string;
}

export interface StartupOptions {
  runs: number;
  warmup: number;
  json: boolean;
  /** Tree to time (holding bin/qimg.js, dist/ and fixtures/); defaults to this repository. */
  root?: string;
}

export interface CommandResult {
  name: string;
  command: string;
  medianMs: number;
  minMs: number;
  p25Ms: number;
  p75Ms: number;
  /** Median over rounds of (this / bare node) in the same round. */
  ratioToNode: number;
  /** Quartiles of the same per-round ratios: how much to trust the median. */
  ratioToNodeP25: number;
  ratioToNodeP75: number;
  /** Median over rounds of (this / its qemu-img peer) in the same round, if there is a peer. */
  ratioToQemu: number | null;
  peakRssKiB: number | null;
}

export interface StartupReport {
  runs: number;
  cpus: number;
  loadavgAtStart: number[];
  node: string;
  results: CommandResult[];
  aimMet: boolean;
}

/** The repository root: dist/bench/startup.js lives two levels below it. */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    if (existsSync(join(dir, 'bin', 'qimg.js')) && existsSync(join(dir, 'package.json'))) return dir;
    dir = dirname(dir);
  }
  throw new Error('cannot find the qimg repository root (bin/qimg.js) above ' + fileURLToPath(import.meta.url));
}

/**
 * qimg runs as an installed qimg does: bin/qimg.js executed through its shebang, which drops
 * NODE_EXTRA_CA_CERTS (see the bin). Two yardsticks: `node -e ""` in this environment (which may
 * set that variable and pay for it), and the strict one the aim is judged against, `node -e ""`
 * without it: Node's own start-up and nothing else.
 */
function commands(haveQemu: boolean): Command[] {
  const node = process.execPath;
  const bin = 'bin/qimg.js';
  const list: Command[] = [
    { name: 'node -e ""', file: node, args: ['-e', ''], role: 'baseline' },
    { name: 'node -e "" (env as is)', file: node, args: ['-e', ''], role: 'info' },
    { name: 'qimg snapshot -l', file: bin, args: ['snapshot', '-l', FIXTURE], role: 'qimg', qemuPeer: 'qemu-img snapshot -l' },
    { name: 'qimg info', file: bin, args: ['info', FIXTURE], role: 'qimg', qemuPeer: 'qemu-img info' },
    { name: 'qimg info --output=json', file: bin, args: ['info', '--output=json', FIXTURE], role: 'qimg', qemuPeer: 'qemu-img info' },
  ];
  if (haveQemu) {
    list.push(
      { name: 'qemu-img snapshot -l', file: 'qemu-img', args: ['snapshot', '-l', FIXTURE], role: 'qemu' },
      { name: 'qemu-img info', file: 'qemu-img', args: ['info', FIXTURE], role: 'qemu' },
    );
  }
  return list;
}

/** The environment a command runs in: the strict yardstick runs without NODE_EXTRA_CA_CERTS. */
function envFor(cmd: Command): NodeJS.ProcessEnv {
  if (cmd.role !== 'baseline') return process.env;
  const env = { ...process.env };
  delete env.NODE_EXTRA_CA_CERTS;
  return env;
}

function hasQemuImg(): boolean {
  const r = spawnSync('qemu-img', ['--version'], { stdio: 'ignore' });
  return r.status === 0;
}

function hasGnuTime(): boolean {
  if (!existsSync(GNU_TIME)) return false;
  const r = spawnSync(GNU_TIME, ['-f', '%M', 'true'], { encoding: 'utf8' });
  return r.status === 0 && /^\d+\s*$/m.test(r.stderr);
}

/** One run's wall time in milliseconds; throws if the command fails, so a broken build is not timed. */
function timeOnce(cmd: Command, cwd: string): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd.file, cmd.args, { cwd, env: envFor(cmd), stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 1 << 24 });
  const t1 = process.hrtime.bigint();
  if (r.error) throw r.error;
  if (r.status !== 0) {
    throw new Error(`${cmd.name} exited with ${r.status ?? r.signal}: ${String(r.stderr).split('\n')[0]}`);
  }
  return Number(t1 - t0) / 1e6;
}

/** Peak resident set size in KiB as GNU time reports it (%M), median of a few runs. */
function peakRss(cmd: Command, cwd: string, scratch: string): number | null {
  const out = join(scratch, 'rss');
  const samples: number[] = [];
  for (let i = 0; i < RSS_RUNS; i++) {
    const r = spawnSync(GNU_TIME, ['-f', '%M', '-o', out, cmd.file, ...cmd.args], { cwd, env: envFor(cmd), stdio: 'ignore' });
    if (r.status !== 0) return null;
    const kib = Number.parseInt(readFileSync(out, 'utf8').trim().split('\n').pop() ?? '', 10);
    if (Number.isFinite(kib)) samples.push(kib);
  }
  return samples.length ? median(samples) : null;
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

function median(xs: number[]): number {
  return quantile(xs, 0.5);
}

export function runStartupBench(opts: StartupOptions): StartupReport {
  const cwd = opts.root ?? repoRoot();
  if (!existsSync(join(cwd, 'bin', 'qimg.js'))) throw new Error(`${cwd} has no bin/qimg.js`);
  if (!existsSync(join(cwd, 'dist', 'src', 'cli', 'main.js'))) {
    throw new Error('dist/ is not built: run `npx tsc -p tsconfig.json` first');
  }
  const haveQemu = hasQemuImg();
  const cmds = commands(haveQemu);
  const loadAtStart = loadavg().map((x) => Math.round(x * 100) / 100);

  if (!opts.json) {
    process.stderr.write(
      `startup: ${opts.runs} paired rounds of ${cmds.length} commands (${cpus().length} CPUs, load ${loadAtStart.join(' ')})` +
        (haveQemu ? '' : '; qemu-img not found, skipping it') + '\n',
    );
  }

  // Warm the page cache and Node's compile cache paths before anything is recorded.
  for (let w = 0; w < opts.warmup; w++) for (const c of cmds) timeOnce(c, cwd);

  const times: number[][] = cmds.map(() => []);
  for (let round = 0; round < opts.runs; round++) {
    for (let k = 0; k < cmds.length; k++) {
      const i = (k + round) % cmds.length;
      times[i]!.push(timeOnce(cmds[i]!, cwd));
    }
    if (!opts.json && (round + 1) % 10 === 0) process.stderr.write(`  round ${round + 1}/${opts.runs}\n`);
  }

  let rss: (number | null)[] = cmds.map(() => null);
  if (hasGnuTime()) {
    const scratch = mkdtempSync(join(tmpdir(), 'qimg-bench-'));
    try {
      rss = cmds.map((c) => peakRss(c, cwd, scratch));
    } finally {
      rmSync(scratch, { recursive: true, force: true });
    }
  } else if (!opts.json) {
    process.stderr.write(`startup: ${GNU_TIME} not available, skipping peak RSS\n`);
  }

  const nodeTimes = times[0]!;
  const byName = new Map(cmds.map((c, i) => [c.name, i]));
  const results: CommandResult[] = cmds.map((c, i) => {
    const t = times[i]!;
    const toNode = t.map((x, r) => x / nodeTimes[r]!);
    const peer = c.qemuPeer !== undefined ? byName.get(c.qemuPeer) : undefined;
    return {
      name: c.name,
      command: [c.file === process.execPath ? 'node' : c.file, ...c.args].join(' '),
      medianMs: median(t),
      minMs: Math.min(...t),
      p25Ms: quantile(t, 0.25),
      p75Ms: quantile(t, 0.75),
      ratioToNode: median(toNode),
      ratioToNodeP25: quantile(toNode, 0.25),
      ratioToNodeP75: quantile(toNode, 0.75),
      ratioToQemu: peer === undefined ? null : median(t.map((x, r) => x / times[peer]![r]!)),
      peakRssKiB: rss[i] ?? null,
    };
  });
  const aimMet = results.filter((_, i) => cmds[i]!.role === 'qimg').every((r) => r.ratioToNode <= STARTUP_AIM_RATIO);
  return { runs: opts.runs, cpus: cpus().length, loadavgAtStart: loadAtStart, node: process.version, results, aimMet };
}

function fmt(n: number, digits: number): string {
  return n.toFixed(digits);
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows
    .map((r) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  '))
    .join('\n');
}

export function renderStartupReport(rep: StartupReport): string {
  const nodeRss = rep.results[0]!.peakRssKiB;
  const rows = [['command', 'median ms', 'p25-p75 ms', 'x bare node', '(p25-p75)', 'x qemu-img', 'peak RSS MiB', 'RSS x node']];
  for (const r of rep.results) {
    rows.push([
      r.name,
      fmt(r.medianMs, 1),
      `${fmt(r.p25Ms, 1)}-${fmt(r.p75Ms, 1)}`,
      fmt(r.ratioToNode, 2),
      `${fmt(r.ratioToNodeP25, 2)}-${fmt(r.ratioToNodeP75, 2)}`,
      r.ratioToQemu === null ? '-' : fmt(r.ratioToQemu, 1),
      r.peakRssKiB === null ? '-' : fmt(r.peakRssKiB / 1024, 1),
      r.peakRssKiB === null || nodeRss === null ? '-' : fmt(r.peakRssKiB / nodeRss, 2),
    ]);
  }
  const qimg = rep.results.filter((r) => r.name.startsWith('qimg'));
  const worst = qimg.reduce((a, b) => (b.ratioToNode > a.ratioToNode ? b : a));
  // Within noise when the aim lies inside the worst command's interquartile range of ratios.
  const noisy = worst.ratioToNodeP25 <= STARTUP_AIM_RATIO && STARTUP_AIM_RATIO <= worst.ratioToNodeP75;
  const lines = [
    `Start-up, ${rep.runs} paired rounds, Node ${rep.node}, ${rep.cpus} CPUs, load average at start ${rep.loadavgAtStart.join(' ')}`,
    'Ratios are medians of per-round ratios (same round, interleaved), not ratios of medians.',
    '',
    table(rows),
    '',
    `Aim: qimg snapshot -l and info within ${STARTUP_AIM_RATIO}x of bare Node start-up: ` +
      (rep.aimMet ? 'MET' : 'NOT MET') +
      ` (worst: ${worst.name} at ${fmt(worst.ratioToNode, 3)}x` +
      (noisy ? `; ${STARTUP_AIM_RATIO}x is inside its p25-p75 range, so within noise` : '') +
      ')',
  ];
  return lines.join('\n') + '\n';
}

export function parseStartupArgs(argv: string[]): StartupOptions {
  const opts: StartupOptions = { runs: DEFAULT_RUNS, warmup: DEFAULT_WARMUP, json: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const [key, inline] = a.startsWith('--') && a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = (): number => {
      const v = inline ?? argv[++i];
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new Error(`${key} needs a non-negative integer, got ${v}`);
      return n;
    };
    if (key === '--runs') opts.runs = Math.max(1, value());
    else if (key === '--warmup') opts.warmup = value();
    else if (key === '--json') opts.json = true;
    else if (key === '--root') {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new Error('--root needs a directory');
      opts.root = v;
    } else throw new Error(`startup: unknown option ${a} (use --runs N, --warmup N, --root DIR, --json)`);
  }
  return opts;
}

export function startupMain(argv: string[]): void {
  const opts = parseStartupArgs(argv);
  const rep = runStartupBench(opts);
  process.stdout.write(opts.json ? JSON.stringify(rep, null, 2) + '\n' : renderStartupReport(rep));
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  startupMain(process.argv.slice(2));
}
