// Runs every *.test.js under dist/test with uvu and ends with the line CI reads: `N passed, M failed`.
//
//   node dist/test/run.js                 all files, in child processes (see below)
//   node dist/test/run.js check cli/info  files whose path contains any argument, one process
//   node dist/test/run.js --child F...    exactly these files, one process (what the children run)
//
// Without a filter the files run in child processes, one file each (the SHARES_FIXTURES files
// together), at most N at a time (N = env QIMG_TEST_JOBS, else os.availableParallelism(), at most
// MAX_JOBS; QIMG_TEST_JOBS=1 runs everything in this process), the costliest first.
// Each child's output is buffered and printed whole when it finishes, so suites never interleave;
// the children's own final lines are summed into the one printed last. Tests that run at the same
// time in different processes must not share files: each takes its own directory from tmpDir().
import { spawn } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join, relative, dirname, isAbsolute } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(fileURLToPath(import.meta.url));

// Every Node process the tests start (suites, qimg runs, fuzz workers) would otherwise read and
// parse this certificate bundle at start-up, 60-100 ms each, for TLS nothing here uses. bin/qimg.js
// drops it the same way for users.
delete process.env.NODE_EXTRA_CA_CERTS;
const self = fileURLToPath(import.meta.url);

/** More children than this only add contention (the slow suites already run qemu-img/qimg in pools). */
const MAX_JOBS = 3;

/**
 * Seconds each slow file took in a full run (`npm test`, 2 vCPUs, otherwise quiet, 2026-12-07),
 * used to start the costliest first. Unlisted files are estimated from size.
 */
const COST: Record<string, number> = {
  'check/snapshot-repair.test.js': 101, // builds a 67 MB table and sweeps crashes under qemu-img check
  'check/diff-leftovers.test.js': 90,
  'fuzz/fuzz.test.js': 59, // on 2 worker processes of its own
  'check/check.test.js': 43,
  'check/check-more.test.js': 37,
  'engine/snapshots.test.js': 31,
  'fuzz/ops.test.js': 20, // qimg and qemu-img, step by step, on twin images
  'fuzz/bounds.test.js': 29,
  'check/open-order.test.js': 26,
  'cli/chains.test.js': 26,
  'cli/create.test.js': 23,
  'check/check-repair.test.js': 23,
  'format/luks.test.js': 18,
  'engine/create.test.js': 17,
  'engine/crash.test.js': 15,
  'cli/errors.test.js': 13,
  // The SHARES_FIXTURES files: 73 s together.
  'cli/info.test.js': 40,
  'cli/convert.test.js': 15,
  'cli/write.test.js': 10,
  'engine/read.test.js': 8,
  'engine/convert.test.js': 9,
  'check/repair-diff.test.js': 9,
  'cli/render.test.js': 7,
  'fuzz/regressions.test.js': 7,
  'check/stream.test.js': 5,
};
/** Seconds per byte of compiled test file, for files without a measured cost. */
const COST_PER_BYTE = 1 / 4000;

/**
 * Files that open images in fixtures/ with qimg (which takes a whole-file lock that makes every
 * qemu-img open without -U fail) or with qemu-img without -U: they must not run at the same time
 * as each other, so they all go to one child, where they run one after another.
 */
const SHARES_FIXTURES = ['cli/info.test.js', 'cli/convert.test.js', 'cli/write.test.js', 'engine/read.test.js'];

function findTests(dir: string, out: string[]): string[] {
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) findTests(p, out);
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

const FINAL = /^(\d+) passed, (\d+) failed$/;

/** Runs `files` with uvu in this process and prints the final line. */
async function runHere(files: string[]): Promise<void> {
  // Count what uvu reports instead of re-implementing its runner.
  let total = 0;
  let passed = 0;
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    const s = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    const plain = s.replace(/\x1b\[[0-9;]*m/g, '');
    const t = /Total:\s+(\d+)/.exec(plain);
    if (t) total = Number(t[1]);
    const p = /Passed:\s+(\d+)/.exec(plain);
    if (p) passed = Number(p[1]);
    return (write as (...a: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stdout.write;

  (globalThis as Record<string, unknown>).UVU_DEFER = 1;
  const uvu = await import('uvu');
  const queue = (globalThis as unknown as { UVU_QUEUE: unknown[][] }).UVU_QUEUE;
  let idx = 0;
  let importFailures = 0;
  for (const f of files) {
    (globalThis as Record<string, unknown>).UVU_INDEX = idx++;
    queue.push([relative(root, f)]);
    try {
      await import(f);
    } catch (err) {
      importFailures++;
      console.error(`could not load ${relative(root, f)}:`, err);
    }
  }
  await uvu.exec(false);
  process.stdout.write = write;
  const failed = total - passed + importFailures;
  if (failed > 0) process.exitCode = 1;
  console.log(`${passed} passed, ${failed} failed`);
}

function cost(file: string): number {
  const c = COST[relative(root, file)];
  return c !== undefined && c > 0 ? c : statSync(file).size * COST_PER_BYTE;
}

/**
 * The units of work, most costly first: each file alone, except the SHARES_FIXTURES files, which
 * travel together as one unit (they run one after another in one child).
 */
function units(files: string[]): string[][] {
  const shared = files.filter((f) => SHARES_FIXTURES.includes(relative(root, f)));
  const all = [...(shared.length ? [shared] : []), ...files.filter((f) => !shared.includes(f)).map((f) => [f])];
  return all.map((u) => ({ u, c: u.reduce((s, f) => s + cost(f), 0) })).sort((a, b) => b.c - a.c).map((x) => x.u);
}

interface ChildResult {
  passed: number;
  failed: number;
}

/** Runs one group in a child; prints its output whole when it ends; a crash counts as a failure. */
function runChild(files: string[], label: string): Promise<ChildResult> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    const env = { ...process.env };
    if (process.stdout.isTTY && env.FORCE_COLOR === undefined) env.FORCE_COLOR = '1';
    const child = spawn(process.execPath, [self, '--child', ...files.map((f) => relative(root, f))], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    const finish = (code: number | null, signal: NodeJS.Signals | null, spawnError?: Error) => {
      const stdout = Buffer.concat(out).toString();
      const stderr = Buffer.concat(err).toString();
      const lines = stdout.replace(/\n$/, '').split('\n');
      const m = FINAL.exec(lines[lines.length - 1] ?? '');
      const secs = ((Date.now() - t0) / 1000).toFixed(1);
      let res: ChildResult;
      let note: string;
      if (m && code === 0 && Number(m[2]) === 0) {
        lines.pop();
        res = { passed: Number(m[1]), failed: 0 };
        note = `passed ${res.passed}, failed 0`;
      } else if (m && (Number(m[2]) > 0 || code === 0)) {
        lines.pop();
        res = { passed: Number(m[1]), failed: Number(m[2]) || 1 };
        note = `passed ${res.passed}, failed ${res.failed}${Number(m[2]) === 0 ? ` (exit ${code})` : ''}`;
      } else {
        // No final line, or a clean-looking one with a failing exit: the child itself failed.
        if (m) lines.pop();
        res = { passed: m ? Number(m[1]) : 0, failed: (m ? Number(m[2]) : 0) + 1 };
        const how = spawnError ? spawnError.message : signal ? `killed by ${signal}` : `exit ${code}`;
        note = `CRASHED (${how}${m ? '' : ', no final line'}): counted as 1 failure`;
      }
      process.stdout.write(`\n=== ${label} (${files.length} files, ${secs} s)\n`);
      if (lines.length && lines.join('') !== '') process.stdout.write(lines.join('\n') + '\n');
      if (stderr) process.stdout.write(`--- ${label} stderr\n${stderr}${stderr.endsWith('\n') ? '' : '\n'}`);
      process.stdout.write(`=== ${label}: ${note}\n`);
      resolve(res);
    };
    let done = false;
    child.on('error', (e) => {
      if (!done) {
        done = true;
        finish(null, null, e);
      }
    });
    child.on('close', (code, signal) => {
      if (!done) {
        done = true;
        finish(code, signal);
      }
    });
  });
}

function jobCount(): number {
  const env = process.env.QIMG_TEST_JOBS;
  const n = env !== undefined && env !== '' ? Math.floor(Number(env)) : availableParallelism();
  return Number.isFinite(n) && n >= 1 ? Math.min(n, MAX_JOBS) : 1;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const all = findTests(root, []);
  if (args[0] === '--child') {
    return runHere(args.slice(1).map((f) => (isAbsolute(f) ? f : join(root, f))));
  }
  if (args.length) return runHere(all.filter((f) => args.some((x) => f.includes(x))));
  const jobs = Math.min(jobCount(), all.length);
  if (jobs <= 1) return runHere(all);
  // A pool of `jobs` children, each taking the next unit as it finishes one: the longest units
  // start first and the short ones fill in, so a stale COST entry costs little balance.
  const queue = units(all);
  const results: ChildResult[] = [];
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < queue.length) {
      const i = next++;
      const u = queue[i]!;
      const name = u.length === 1 ? relative(root, u[0]!) : `${u.length} files sharing fixtures/`;
      results.push(await runChild(u, `unit ${i + 1}/${queue.length} ${name}`));
    }
  };
  await Promise.all(Array.from({ length: jobs }, worker));
  const passed = results.reduce((s, r) => s + r.passed, 0);
  const failed = results.reduce((s, r) => s + r.failed, 0);
  if (failed > 0) process.exitCode = 1;
  console.log(`${passed} passed, ${failed} failed`);
}

main().catch((err) => {
  console.error(err);
  console.log('0 passed, 1 failed');
  process.exitCode = 1;
});
