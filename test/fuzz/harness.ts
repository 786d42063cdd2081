// The fuzz harness: seed images made by qemu-img/qemu-io, a watchdog that runs ranges of cases
// in runner child processes (time limit per case, heap cap, RSS check), and a CLI-level sample
// run through real `node bin/qimg.js` processes to check exit codes and the shape of stderr.

import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { QIMG_BIN, REPO, mustQemuImg, mustQemuIo } from '../helpers.js';
import { makeCase, parseLayout } from './mutate.js';
import type { Finding, RunnerConfig } from './runner.js';

export type { Finding } from './runner.js';

export const RUNNER = join(REPO, 'dist', 'test', 'fuzz', 'runner.js');
/** The heap cap every child gets; RSS above MEM_CAP_MIB is a finding. */
export const HEAP_CAP_MIB = 256;
export const MEM_CAP_MIB = 300;
export const CASE_TIMEOUT_MS = 10_000;

/**
 * Seed images covering the structures worth breaking: snapshots, compressed clusters, extended
 * L2, 512-byte clusters (many L2 tables and refcount blocks), 64-bit refcounts with lazy
 * refcounts, a v2 image, and a backing chain (overlay -> base.qcow2, relative name).
 */
export function makeSeeds(dir: string): string[] {
  const p = (n: string) => join(dir, n);
  const io = (f: string, ...cmds: string[]) => mustQemuIo(['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), f]);

  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', p('std.qcow2'), '4M']);
  io(p('std.qcow2'), 'write -P 0x11 0 128k', 'write -P 0x22 1M 64k');
  mustQemuImg(['snapshot', '-c', 's1', p('std.qcow2')]);
  io(p('std.qcow2'), 'write -P 0x33 64k 64k', 'write -z 1M 64k');
  mustQemuImg(['snapshot', '-c', 's2', p('std.qcow2')]);
  io(p('std.qcow2'), 'write -P 0x44 3M 4k');

  const raw = p('comp.raw');
  const data = new Uint8Array(512 * 1024);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
  data.fill(0, 128 * 1024, 192 * 1024);
  writeFileSync(raw, data);
  mustQemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, p('comp.qcow2')]);
  rmSync(raw);
  mustQemuImg(['snapshot', '-c', 'c1', p('comp.qcow2')]);
  io(p('comp.qcow2'), 'write -P 0x55 8k 4k');

  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=16384', p('extl2.qcow2'), '2M']);
  io(p('extl2.qcow2'), 'write -P 0x66 1k 2k', 'write -P 0x67 40k 512', 'write -z 64k 16k', 'write -P 0x68 1M 32k');
  mustQemuImg(['snapshot', '-c', 'e1', p('extl2.qcow2')]);
  io(p('extl2.qcow2'), 'write -P 0x69 1k 512');

  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', p('small.qcow2'), '256k']);
  io(p('small.qcow2'), 'write -P 0x71 0 40k', 'write -P 0x72 100k 20k', 'write -P 0x73 200k 1k');
  mustQemuImg(['snapshot', '-c', 'a', p('small.qcow2')]);
  io(p('small.qcow2'), 'write -P 0x74 8k 8k');
  mustQemuImg(['snapshot', '-c', 'b', p('small.qcow2')]);

  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=64,lazy_refcounts=on,cluster_size=4096', p('rc64.qcow2'), '1M']);
  io(p('rc64.qcow2'), 'write -P 0x81 0 64k');
  mustQemuImg(['snapshot', '-c', 'r', p('rc64.qcow2')]);

  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', p('v2.qcow2'), '1M']);
  io(p('v2.qcow2'), 'write -P 0x91 4k 12k');
  mustQemuImg(['snapshot', '-c', 'v', p('v2.qcow2')]);

  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p('base.qcow2'), '1M']);
  io(p('base.qcow2'), 'write -P 0xa1 0 256k');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.qcow2', '-F', 'qcow2', p('overlay.qcow2'), '1M']);
  io(p('overlay.qcow2'), 'write -P 0xa2 64k 8k');
  mustQemuImg(['snapshot', '-c', 'o', p('overlay.qcow2')]);

  return ['std.qcow2', 'comp.qcow2', 'extl2.qcow2', 'small.qcow2', 'rc64.qcow2', 'v2.qcow2', 'base.qcow2', 'overlay.qcow2'];
}

export interface FuzzOptions {
  seedDir: string;
  seeds: string[];
  runSeed: number;
  /** Cases [start, count). */
  count: number;
  start?: number;
  /** Runner processes in parallel. */
  workers?: number;
  writes?: boolean;
  writeEvery?: number;
  saveDir?: string;
  caseTimeoutMs?: number;
  /** Called for every finding as it arrives. */
  onFinding?: (f: Finding) => void;
}

export interface FuzzResult {
  cases: number;
  findings: Finding[];
  ms: number;
  /** Largest per-case peak RSS seen (KiB). */
  maxRSSKiB: number;
  restarts: number;
}

/** Runs cases [0, count) in runner children; a hang or a dead child costs one case, not the run. */
export async function runFuzz(o: FuzzOptions): Promise<FuzzResult> {
  const t0 = Date.now();
  const workers = Math.max(1, o.workers ?? 1);
  const res: FuzzResult = { cases: 0, findings: [], ms: 0, maxRSSKiB: 0, restarts: 0 };
  const seedHashes = o.seeds.map((s) => hashFile(join(o.seedDir, s)));
  const add = (f: Finding) => {
    res.findings.push(f);
    o.onFinding?.(f);
  };
  const start = o.start ?? 0;
  const per = Math.ceil((o.count - start) / workers);
  const ranges: Array<[number, number]> = [];
  for (let w = 0; w < workers; w++) ranges.push([start + w * per, Math.min(o.count, start + (w + 1) * per)]);
  await Promise.all(ranges.filter(([a, b]) => a < b).map(([a, b]) => runRange(o, a, b, res, add)));
  o.seeds.forEach((s, i) => {
    if (hashFile(join(o.seedDir, s)) !== seedHashes[i]) add({ index: -1, seed: s, steps: [], op: 'all', kind: 'seed-changed', detail: `seed ${s} was modified by a case` });
  });
  res.ms = Date.now() - t0;
  return res;
}

function hashFile(p: string): string {
  return createHash('sha256').update(readFileSync(p)).digest('hex');
}

async function runRange(o: FuzzOptions, from: number, to: number, res: FuzzResult, add: (f: Finding) => void): Promise<void> {
  let next = from;
  const limit = o.caseTimeoutMs ?? CASE_TIMEOUT_MS;
  while (next < to) {
    const cfg: RunnerConfig = {
      seedDir: o.seedDir,
      seeds: o.seeds,
      runSeed: o.runSeed,
      from: next,
      to,
      writes: o.writes ?? true,
      writeEvery: o.writeEvery,
      memCapMiB: MEM_CAP_MIB,
      opLimitMs: limit,
      saveDir: o.saveDir,
    };
    const outcome = await new Promise<{ current: number | null; code: number | null; signal: string | null; timedOut: boolean; stderr: string; ended: boolean }>((resolve) => {
      const child = spawn(process.execPath, [`--max-old-space-size=${HEAP_CAP_MIB}`, RUNNER, JSON.stringify(cfg)], { stdio: ['ignore', 'pipe', 'pipe'] });
      let current: number | null = null;
      let timedOut = false;
      let ended = false;
      let stderr = '';
      let buf = '';
      let timer: NodeJS.Timeout | null = null;
      const arm = () => {
        if (timer) clearTimeout(timer);
        // A case runs several commands; the whole case gets a few times the per-command limit.
        timer = setTimeout(() => {
          timedOut = true;
          child.kill('SIGKILL');
        }, limit * 3);
      };
      child.stdout.setEncoding('utf8');
      child.stdout.on('data', (d: string) => {
        buf += d;
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          let m: { start?: number; done?: number; findings?: Finding[]; rssKiB?: number; end?: boolean; fatal?: string };
          try {
            m = JSON.parse(line);
          } catch {
            continue;
          }
          if (m.start !== undefined) {
            current = m.start;
            arm();
          } else if (m.done !== undefined) {
            current = null;
            next = m.done + 1;
            res.cases++;
            res.maxRSSKiB = Math.max(res.maxRSSKiB, m.rssKiB ?? 0);
            for (const f of m.findings ?? []) add(f);
          } else if (m.end) ended = true;
          else if (m.fatal) stderr += m.fatal;
        }
      });
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (d: string) => {
        if (stderr.length < 20000) stderr += d;
      });
      child.on('close', (code, signal) => {
        if (timer) clearTimeout(timer);
        resolve({ current, code, signal, timedOut, stderr, ended });
      });
    });
    if (outcome.ended) return;
    if (outcome.current !== null) {
      // The case in flight hung or killed the process: record it and go on after it.
      const i = outcome.current;
      const c = makeCaseFor(o, i);
      add({
        index: i,
        seed: c.seed,
        steps: c.steps,
        op: 'all',
        kind: outcome.timedOut ? 'timeout' : 'died',
        detail: outcome.timedOut ? `no answer within ${limit * 3} ms` : `exit ${outcome.code} ${outcome.signal ?? ''}: ${outcome.stderr.split('\n').slice(0, 8).join('\n')}`,
      });
      if (o.saveDir) writeFileSync(join(o.saveDir, `finding-${o.runSeed}-${i}.qcow2`), c.bytes);
      rmSync(join(o.seedDir, `case-${i}.qcow2`), { force: true });
      rmSync(join(o.seedDir, `case-${i}.out`), { force: true });
      res.cases++;
      next = i + 1;
    } else if (outcome.code !== 0) {
      throw new Error(`fuzz runner failed outside a case (exit ${outcome.code}): ${outcome.stderr}`);
    }
    res.restarts++;
  }
}

const seedCache = new Map<string, { name: string; bytes: Uint8Array; layout: ReturnType<typeof parseLayout> }[]>();
export function loadSeeds(seedDir: string, seeds: string[]) {
  const key = seedDir + '|' + seeds.join(',');
  let s = seedCache.get(key);
  if (!s) {
    s = seeds.map((name) => {
      const bytes = new Uint8Array(readFileSync(join(seedDir, name)));
      return { name, bytes, layout: parseLayout(bytes) };
    });
    seedCache.set(key, s);
  }
  return s;
}

export function makeCaseFor(o: { seedDir: string; seeds: string[]; runSeed: number }, i: number) {
  return makeCase(loadSeeds(o.seedDir, o.seeds), o.runSeed, i, `case-${i}.qcow2`);
}

// ---------------------------------------------------------------- the CLI-level sample

export interface CliRun {
  args: string[];
  status: number | null;
  stderr: string;
  maxRSSKiB: number;
  ms: number;
  timedOut: boolean;
}

/** Runs `node bin/qimg.js ARGS` under /usr/bin/time with the heap cap and a time limit. */
export function runQimgBounded(args: string[], timeoutMs = CASE_TIMEOUT_MS, env: Record<string, string> = {}): CliRun {
  const t0 = Date.now();
  const r = spawnSync('/usr/bin/time', ['-f', '%M', process.execPath, `--max-old-space-size=${HEAP_CAP_MIB}`, QIMG_BIN, ...args], {
    encoding: 'utf8',
    timeout: timeoutMs,
    killSignal: 'SIGKILL',
    env: { ...process.env, LC_ALL: 'C', TZ: 'UTC', ...env },
    maxBuffer: 1 << 26,
  });
  const lines = (r.stderr ?? '').split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  // /usr/bin/time's last line: max RSS in KiB (preceded by "Command exited..." on failure).
  const rss = Number(lines.pop() ?? 'NaN');
  const cleaned = lines.filter((l) => !/^Command (exited with non-zero status|terminated by signal)/.test(l));
  return {
    args,
    status: r.status,
    stderr: cleaned.length ? cleaned.join('\n') + '\n' : '',
    maxRSSKiB: Number.isFinite(rss) ? rss : 0,
    ms: Date.now() - t0,
    timedOut: r.error !== undefined && (r.error as NodeJS.ErrnoException).code === 'ETIMEDOUT',
  };
}

/** Problems with one CLI run's exit code, stderr shape, time and memory ([] when fine). */
export function judgeCli(run: CliRun, command: string): string[] {
  const out: string[] = [];
  const allowed = command === 'check' ? [0, 1, 2, 3, 63] : [0, 1];
  if (run.timedOut) out.push(`timed out after ${run.ms} ms`);
  else if (run.status === null || !allowed.includes(run.status)) out.push(`exit code ${run.status}`);
  if (run.stderr.includes('    at ')) out.push('stack trace on stderr');
  if (/internal error/i.test(run.stderr)) out.push('internal error on stderr');
  const lines = run.stderr.split('\n').filter((l) => l !== '');
  const shaped = lines.filter((l) => {
    if (/Is another process using the image|Failed to get .*lock/.test(l)) return false; // qemu-img's two-line lock refusal
    if (command === 'check') return /^qimg: /.test(l) && !/^qimg: (ERROR|Check failed|Leaked)/.test(l); // per-cluster lines are check's normal output
    return true;
  });
  if (shaped.length > 1) out.push(`${shaped.length} stderr lines: ${lines.slice(0, 3).join(' | ')}`);
  if (run.maxRSSKiB > MEM_CAP_MIB * 1024) out.push(`peak RSS ${Math.round(run.maxRSSKiB / 1024)} MiB`);
  return out;
}

/** True once another engineer's `qimg check` command exists. */
export function cliHasCheck(): boolean {
  return spawnSync(process.execPath, [QIMG_BIN, 'check', '--help'], { encoding: 'utf8' }).status === 0;
}

/** Runs `count` cases of a run through the real CLI; returns findings. */
export function runCliSample(o: { seedDir: string; seeds: string[]; runSeed: number }, indices: number[]): { runs: number; findings: Finding[] } {
  const withCheck = cliHasCheck();
  const findings: Finding[] = [];
  let runs = 0;
  for (const i of indices) {
    const c = makeCaseFor(o, i);
    const path = join(o.seedDir, `case-${i}.qcow2`);
    const out = join(o.seedDir, `case-${i}.out`);
    writeFileSync(path, c.bytes);
    const cmds: Array<[string, string[]]> = [
      ['info', ['info', path]],
      ['info', ['info', '--output=json', path]],
      ['snapshot', ['snapshot', '-l', path]],
      ['convert', ['convert', '-O', 'raw', path, out]],
    ];
    if (withCheck) cmds.push(['check', ['check', path]]);
    for (const [cmd, args] of cmds) {
      const r = runQimgBounded(args);
      runs++;
      for (const problem of judgeCli(r, cmd)) {
        findings.push({ index: i, seed: c.seed, steps: c.steps, op: args.slice(0, -1).join(' '), kind: 'cli-stderr', detail: `${problem}\n${r.stderr.slice(0, 500)}` });
      }
    }
    rmSync(path, { force: true });
    rmSync(out, { force: true });
  }
  return { runs, findings };
}

/** One line per finding, for test output and the long run's log. */
export function formatFinding(f: Finding): string {
  return `#${f.index} [${f.kind}] ${f.op} on ${f.seed} after: ${f.steps.join('; ')}\n    ${f.detail.split('\n').join('\n    ')}`;
}
