// Differential fuzz of `check`: each mutated image through `qemu-img check` and `qimg check`
// (the real bin, separate processes), stdout / stderr / exit code compared byte for byte.
//
//   node dist/bench/check-diff.js [--seed N] [--count N] [--from N] [--out DIR] [--repair]
//                                 [--lanes N] [--timeout MS] [--show] [--all]
//
// Case i of a seed is makeCase() over makeSeeds()' images, as in the fuzz tests. Both tools see
// the same bytes at the same path (DIR/lane-K/case-I.qcow2, rewritten before every command), so
// filenames in messages and JSON agree; qemu-img's output is normalised with asQimg() as the check
// tests do. With --repair, `check -r leaks` and `check -r all` run on fresh copies too, their
// outputs are compared, and `qemu-img check` must find qimg's repaired image no worse than
// qemu-img's. A mismatch saves DIR/diff-SEED-INDEX.qcow2 (the input) and .txt (what differed);
// known causes (qemu-img crashing or hanging, nondeterministic, or a deliberate difference listed
// in README.md) are counted by class and not saved unless --all is given. --show prints the full
// outputs of every mismatch. Rerun one case: --seed SEED --from INDEX --count 1 [--repair] --show.

import { spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QIMG_BIN } from '../test/helpers.js';
import { asQimg } from '../test/check/cli.js';
import { loadSeeds, makeSeeds } from '../test/fuzz/harness.js';
import { makeCase } from '../test/fuzz/mutate.js';

interface Out {
  status: number;
  stdout: string;
  stderr: string;
  /** Killed by the time limit. */
  timedOut: boolean;
  /** Ended by a signal other than the time limit's (e.g. SIGABRT from an assertion). */
  signal: string | null;
}

interface Mismatch {
  op: string;
  /**
   * For a comparison of repaired files: both repairs printed the same, and qemu-img's was
   * stopped by a corruption event (which drops QEMU's cache of refcount repairs).
   */
  droppedCache?: boolean;
  /** Why it differs, one line. */
  what: string;
  qemu: Out;
  qimg: Out;
}

/** A known cause: counted, not reported as new. */
type Known = string | null;

const ENV = { ...process.env, LC_ALL: 'C', TZ: 'UTC' } as Record<string, string>;
delete ENV.NODE_EXTRA_CA_CERTS;

function opt(argv: string[], name: string): string | undefined {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
}

function exec(cmd: string, args: string[], timeoutMs: number): Promise<Out> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env: ENV, stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs, killSignal: 'SIGKILL' });
    // latin1: one char per byte, so the comparison is byte for byte (names need not be UTF-8).
    // Kept to exactly the first 32 MiB: cutting at a chunk boundary made long equal outputs
    // differ. Large enough for the line that ends a long qemu-img repair (seed 697317295 case
    // 166: 9 MB of messages before its overlap check stops it, which a 4 MiB cap hid from the
    // classifier). Chunks are joined once at the end: re-slicing per chunk was quadratic.
    const CAP = 1 << 25;
    const collect = (stream: NodeJS.ReadableStream) => {
      const parts: string[] = [];
      let n = 0;
      stream.setEncoding('latin1');
      stream.on('data', (d: string) => {
        if (n < CAP) parts.push(d);
        n += d.length;
      });
      return () => parts.join('').slice(0, CAP);
    };
    const stdout = collect(child.stdout);
    const stderr = collect(child.stderr);
    child.on('error', (err) => resolve({ status: -1, stdout: stdout(), stderr: stderr() + String(err), timedOut: false, signal: null }));
    child.on('close', (code, signal) => {
      const timedOut = signal === 'SIGKILL';
      resolve({ status: code ?? -1, stdout: stdout(), stderr: stderr(), timedOut, signal: timedOut ? null : signal });
    });
  });
}

function normalised(o: Out): Out {
  return { ...o, ...asQimg(o) };
}

function sameOut(a: Out, b: Out): boolean {
  return a.status === b.status && a.stdout === b.stdout && a.stderr === b.stderr;
}

function describe(a: Out, b: Out): string {
  const parts: string[] = [];
  if (a.status !== b.status) parts.push(`exit ${a.status} vs ${b.status}`);
  if (a.stdout !== b.stdout) parts.push('stdout');
  if (a.stderr !== b.stderr) parts.push('stderr');
  return parts.join(', ');
}

/** qemu-img check's verdict on a repaired file: corruptions + check errors, leaks; null when it cannot check. */
interface Verdict {
  bad: number;
  leaks: number;
  status: number;
}
function verdict(o: Out): Verdict | null {
  try {
    const j = JSON.parse(o.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
    return { bad: (j.corruptions ?? 0) + (j['check-errors'] ?? 0), leaks: j.leaks ?? 0, status: o.status };
  } catch {
    return null;
  }
}

/**
 * Known causes of a difference that are not qimg's to fix: qemu-img dying or hanging, or a
 * deliberate difference documented in README.md ("Deliberate differences from qemu-img 7.2").
 */
function classify(m: Mismatch, bytes: Uint8Array): Known {
  if (m.qemu.signal) return `qemu-img killed by ${m.qemu.signal}`;
  if (m.qemu.timedOut && !m.qimg.timedOut) return 'qemu-img timed out';
  if (m.qemu.status > 3 && m.qemu.status !== 63) return `qemu-img exit ${m.qemu.status}`;
  // Names printed as stored: qemu-img writes their bytes, qimg writes strings as UTF-8 (a byte
  // that is not UTF-8 becomes U+FFFD). Equal once both are read as UTF-8: only that differs.
  const utf8 = (s: string) => Buffer.from(s, 'latin1').toString('utf8');
  if (m.qemu.status === m.qimg.status && utf8(m.qemu.stdout) === utf8(m.qimg.stdout) && utf8(m.qemu.stderr) === utf8(m.qimg.stderr)) {
    return 'names that are not UTF-8 (printed as U+FFFD)';
  }
  // README: `check -r all` on a snapshot whose l1_size is too large: qemu-img's overlap check
  // aborts its own repair (Check failed, exit 1); qimg reports the error (exit 2).
  if (m.op === 'check -r all' && m.qemu.status === 1 && m.qimg.status === 2 && /Snapshot L1 table|l1_size/.test(m.qimg.stderr + m.qemu.stderr)) {
    return 'deliberate: -r all with a snapshot l1_size too large';
  }
  // README: a rebuilt refcount structure that qemu-img places on clusters its old refcount table
  // still names (its overlap check then stops the repair) lands elsewhere in qimg, whose repair
  // goes on (the repaired files are still compared). Known only when everything before was equal.
  // (With the image already marked corrupt, the overlap check's event is suppressed and the
  // refused write shows only as qemu-img's EIO writing the refcount block or table.)
  let stop = m.qemu.stderr.indexOf('qcow2: Marking image as corrupt: Preventing invalid write on metadata');
  if (stop < 0 && m.qemu.stderr.includes('further corruption events will be suppressed')) {
    stop = m.qemu.stderr.search(/^qimg: ERROR writing (refblock|reftable): Input\/output error$/m);
  }
  if (m.op.startsWith('check -r') && m.qemu.status === 1 && stop >= 0 && m.qimg.stderr.startsWith(m.qemu.stderr.slice(0, stop)) && !m.qimg.stderr.includes('Preventing invalid write')) {
    return "deliberate: -r goes on where qemu-img's overlap check stops its repair";
  }
  // README: refcount repairs QEMU held in its metadata cache when a corruption event dropped the
  // image are lost in its file (refcounts below the references, leaks); qimg's are on disk. Known
  // when qemu-img's file is left under-counted or leaking and qimg's is neither.
  // The same, seen from the repair: both printed the same, a corruption event stopped
  // qemu-img's, and only the files differ (qimg's holds the repairs it reported).
  if (m.op.startsWith('qemu-img check after -r') && m.droppedCache) return "deliberate: refcount fixes qemu-img's dropped cache loses stay on disk";
  if (m.op.startsWith('qemu-img check after -r')) {
    const under = (e: string) => [...e.matchAll(/^ERROR cluster \d+ refcount=(\d+) reference=(\d+)$/gm)].some((x) => Number(x[1]) < Number(x[2]));
    const leaks = (e: string) => /^Leaked cluster /m.test(e);
    if ((under(m.qemu.stderr) || leaks(m.qemu.stderr)) && !under(m.qimg.stderr) && !leaks(m.qimg.stderr)) {
      return "deliberate: refcount fixes qemu-img's dropped cache loses stay on disk";
    }
  }
  // README: freeing an old snapshot table past 2^53 fails in qemu-img (File too large) and leaves
  // its refcount cache failing every later lookup; qimg's repair finishes. Known when all before
  // that failure was equal.
  const freeFail = m.qemu.stderr.indexOf('qcow2_free_clusters failed: File too large');
  if (m.op.startsWith('check -r') && freeFail >= 0 && m.qimg.stderr.startsWith(m.qemu.stderr.slice(0, freeFail))) {
    return 'qemu-img: failed free of a snapshot table past 2^53 breaks its refcount cache';
  }
  // README: qemu-img creates refcount blocks (growing the file) for an old snapshot table it then
  // fails to free; qimg fails the same way without them. Only the image end offset differs.
  const endless = (o: string) => o.replace(/^Image end offset: \d+$/m, '');
  if (m.op.startsWith('check -r') && m.qemu.stderr.includes('qcow2_free_clusters failed: Resource temporarily unavailable') && m.qemu.stderr === m.qimg.stderr && m.qemu.status === m.qimg.status && endless(m.qemu.stdout) === endless(m.qimg.stdout)) {
    return 'deliberate: a failed free of the old snapshot table does not grow the file';
  }
  // README: the old snapshot table of a -r all rewrite lies where QEMU's refcount-table index
  // (cut to 32 bits) wraps: qemu-img drops the refcount of an unrelated in-use cluster instead,
  // and its double check then reports that cluster (`ERROR cluster N refcount=0 reference=1`);
  // qimg drops nothing. Known only when that is all that differs.
  if (m.op === 'check -r all' && m.qemu.status === 2 && m.qimg.status === 0 && snapshotIndexWraps(bytes)) {
    const dbl = 'Double checking the fixed image now...\n';
    const upTo = (o: string) => o.slice(0, o.indexOf(dbl) + dbl.length);
    if (m.qemu.stdout.includes(dbl) && upTo(m.qemu.stdout) === upTo(m.qimg.stdout) && m.qemu.stderr.replace(/^ERROR cluster \d+ refcount=0 reference=1\n/gm, '') === m.qimg.stderr) {
      return 'deliberate: freeing a snapshot table past a wrapping refcount-table index drops nothing';
    }
  }
  // README: a device node named as the backing file is never opened (qemu-img reads it).
  if (/^\/dev\//.test(backingName(bytes))) return 'deliberate: device nodes named as backing files are never opened';
  // README: protocol and json: backing names are never followed (qemu-img tries to connect).
  if (/Could not open backing file: .*'(json:|[a-z+]+:\/\/)/.test(m.qimg.stderr)) return 'deliberate: protocol / json: backing names are never followed';
  // README: with unknown autoclear bits qemu-img's repair rewrites the header before it reads the
  // snapshot table, which drops every snapshot; qimg keeps them.
  const autoclearUnknown = bytes.length >= 96 && (bytes[88]! | bytes[89]! | bytes[90]! | bytes[91]! | bytes[92]! | bytes[93]! | bytes[94]! | (bytes[95]! & 0xfc)) !== 0;
  const nbSnapshots = bytes.length >= 64 ? (bytes[60]! | bytes[61]! | bytes[62]! | bytes[63]!) : 0;
  if (m.op.includes('-r ') && autoclearUnknown && nbSnapshots && bytes[7] === 3) return 'deliberate: unknown autoclear bits (qemu-img -r drops the snapshots)';
  return null;
}

/** The header's backing file name as Latin-1 (empty when absent or outside the bytes). */
function backingName(bytes: Uint8Array): string {
  if (bytes.length < 20) return '';
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const off = Number(dv.getBigUint64(8));
  const len = dv.getUint32(16);
  if (off === 0 || off + len > bytes.length) return '';
  return Buffer.from(bytes.subarray(off, off + len)).toString('latin1');
}

/** Whether the header's snapshot table lies at a refcount-table index of 2^32 or more. */
function snapshotIndexWraps(bytes: Uint8Array): boolean {
  if (bytes.length < 104) return false;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const clusterBits = BigInt(dv.getUint32(20));
  const refcountOrder = dv.getUint32(4) >= 3 ? BigInt(dv.getUint32(96)) : 4n;
  if (clusterBits > 30n || refcountOrder > 6n) return false;
  // Clusters per refcount block: 2^(cluster_bits + 3 - refcount_order).
  return dv.getBigUint64(64) >> (clusterBits + clusterBits + 3n - refcountOrder) >= 1n << 32n;
}

interface Lane {
  dir: string;
}

interface Opts {
  runSeed: number;
  seedDir: string;
  seeds: string[];
  out: string;
  repair: boolean;
  timeoutMs: number;
  show: boolean;
  all: boolean;
}

interface Tally {
  cases: number;
  mismatches: number;
  known: Map<string, number>;
  lines: string[];
}

async function runCase(o: Opts, lane: Lane, i: number, t: Tally): Promise<void> {
  const name = `case-${i}.qcow2`;
  const c = makeCase(loadSeeds(o.seedDir, o.seeds), o.runSeed, i, name);
  const path = join(lane.dir, name);
  const fresh = () => writeFileSync(path, c.bytes);
  const found: Mismatch[] = [];

  /** Runs one check command on a fresh copy under each tool; a difference is recorded. */
  const pair = async (op: string, args: string[], keep?: { qemu: string; qimg: string }): Promise<[Out, Out]> => {
    const run = async (ms: number): Promise<[Out, Out]> => {
      fresh();
      const q = normalised(await exec('qemu-img', ['check', ...args, path], ms));
      if (keep) renameSync(path, keep.qemu);
      fresh();
      const m = await exec(QIMG_BIN, ['check', ...args, path], ms);
      if (keep) renameSync(path, keep.qimg);
      return [q, m];
    };
    let [q, m] = await run(o.timeoutMs);
    // Both over the limit says nothing about qimg: let both run longer once and compare those.
    if (q.timedOut && m.timedOut) [q, m] = await run(o.timeoutMs * 6);
    if (!sameOut(q, m) || q.timedOut !== m.timedOut || m.timedOut) {
      let what = m.timedOut ? 'qimg timed out' : describe(q, m);
      if (!m.timedOut && !q.timedOut && !keep) {
        // Ask qemu-img once more: an answer that changes between runs is not qimg's to match.
        fresh();
        const again = normalised(await exec('qemu-img', ['check', ...args, path], o.timeoutMs));
        if (!sameOut(again, q)) what = 'nondeterministic qemu-img: ' + what;
      }
      found.push({ op, what, qemu: q, qimg: m });
    }
    return [q, m];
  };

  await pair('check', []);
  await pair('check --output=json', ['--output=json']);
  if (o.repair) {
    for (const mode of ['leaks', 'all']) {
      const keep = { qemu: join(lane.dir, `rq-${i}.qcow2`), qimg: join(lane.dir, `rm-${i}.qcow2`) };
      const [q, m] = await pair(`check -r ${mode}`, ['-r', mode], keep);
      // The repaired files, judged by qemu-img at the case's path (backing names may be relative).
      const judge = async (file: string) => {
        renameSync(file, path);
        const r = await exec('qemu-img', ['check', '--output=json', path], o.timeoutMs);
        rmSync(path, { force: true });
        return r;
      };
      const jq = await judge(keep.qemu);
      const jm = await judge(keep.qimg);
      const vq = verdict(jq);
      const vm = verdict(jm);
      const worse = vm === null ? vq !== null : vq !== null && (vm.bad > vq.bad || (vm.bad === vq.bad && vm.leaks > vq.leaks));
      if (worse && !q.timedOut && !m.timedOut) {
        const fmt = (v: Verdict | null, r: Out) => (v ? `${v.bad} errors, ${v.leaks} leaks (exit ${v.status})` : `cannot check (exit ${r.status}): ${r.stderr.trim().split('\n')[0]}`);
        const droppedCache = sameOut(q, m) && q.stderr.includes('qcow2: Marking image as corrupt');
        found.push({ op: `qemu-img check after -r ${mode}`, what: `qimg's repair ${fmt(vm, jm)}, qemu-img's ${fmt(vq, jq)}`, qemu: normalised(jq), qimg: normalised(jm), droppedCache });
      }
    }
  }
  rmSync(path, { force: true });
  t.cases++;
  if (!found.length) return;

  const fresh2: Mismatch[] = [];
  for (const m of found) {
    const k = classify(m, c.bytes) ?? (m.what.startsWith('nondeterministic') ? 'nondeterministic qemu-img' : null);
    if (k) t.known.set(k, (t.known.get(k) ?? 0) + 1);
    else fresh2.push(m);
  }
  const report = o.all ? found : fresh2;
  if (!report.length) return;
  t.mismatches++;
  const head = `#${i} ${c.seed}: ${c.steps.join('; ')}`;
  const body = report.map((m) => `  ${m.op}: ${m.what}${classify(m, c.bytes) ? ` [known: ${classify(m, c.bytes)}]` : ''}`).join('\n');
  const line = `${head}\n${body}`;
  t.lines.push(line);
  process.stdout.write(line + '\n');
  const detail = report
    .map((m) => [`== ${m.op}: ${m.what}`, `-- qemu-img (exit ${m.qemu.status}${m.qemu.timedOut ? ', timed out' : ''}) stdout:`, m.qemu.stdout, '-- stderr:', m.qemu.stderr, `-- qimg (exit ${m.qimg.status}${m.qimg.timedOut ? ', timed out' : ''}) stdout:`, m.qimg.stdout, '-- stderr:', m.qimg.stderr].join('\n'))
    .join('\n');
  if (o.show) process.stdout.write(Buffer.from(detail + '\n', 'latin1'));
  writeFileSync(join(o.out, `diff-${o.runSeed}-${i}.qcow2`), c.bytes);
  writeFileSync(join(o.out, `diff-${o.runSeed}-${i}.txt`), `${head}\nrerun: node dist/bench/check-diff.js --seed ${o.runSeed} --from ${i} --count 1${o.repair ? ' --repair' : ''} --show\n${detail}\n`, 'latin1');
}

async function main(argv: string[]): Promise<void> {
  const runSeed = Number(opt(argv, '--seed') ?? Math.floor(Math.random() * 0xffffffff));
  const count = Number(opt(argv, '--count') ?? 1000);
  const from = Number(opt(argv, '--from') ?? 0);
  const lanes = Math.max(1, Number(opt(argv, '--lanes') ?? 2));
  const out = opt(argv, '--out') ?? join(process.cwd(), 'check-diff');
  const timeoutMs = Number(opt(argv, '--timeout') ?? 10000);
  mkdirSync(out, { recursive: true });
  const work = mkdtempSync(join(tmpdir(), 'qimg-check-diff-'));
  try {
    const seedDir = join(work, 'seeds');
    mkdirSync(seedDir);
    const seeds = makeSeeds(seedDir);
    // Each lane has its own directory holding the seeds, so a case naming `base.qcow2` as its
    // backing file finds one, and lanes never touch each other's files.
    const laneList: Lane[] = [];
    for (let k = 0; k < lanes; k++) {
      const dir = join(work, `lane-${k}`);
      mkdirSync(dir);
      for (const s of seeds) copyFileSync(join(seedDir, s), join(dir, s));
      laneList.push({ dir });
    }
    const o: Opts = { runSeed, seedDir, seeds, out, repair: argv.includes('--repair'), timeoutMs, show: argv.includes('--show'), all: argv.includes('--all') };
    process.stdout.write(`check-diff: seed ${runSeed}, cases ${from}..${from + count - 1}${o.repair ? ', with repairs' : ''}, ${lanes} lanes, mismatches in ${out}\n`);
    const t: Tally = { cases: 0, mismatches: 0, known: new Map(), lines: [] };
    const t0 = Date.now();
    let next = from;
    await Promise.all(
      laneList.map(async (lane) => {
        for (let i = next++; i < from + count; i = next++) await runCase(o, lane, i, t);
      }),
    );
    const known = [...t.known].map(([k, n]) => `  ${n} x ${k}`).join('\n');
    const summary = `seed ${runSeed}: ${t.cases} cases (${from}..${from + count - 1}) in ${((Date.now() - t0) / 1000).toFixed(0)} s, ${t.mismatches} with new mismatches${known ? `\nknown causes (not saved):\n${known}` : ''}\n`;
    writeFileSync(join(out, `check-diff-${runSeed}.txt`), summary + t.lines.join('\n') + '\n');
    process.stdout.write(summary);
    if (t.mismatches) process.exitCode = 1;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

main(process.argv.slice(2)).catch((err) => {
  console.error(err);
  process.exitCode = 2;
});
