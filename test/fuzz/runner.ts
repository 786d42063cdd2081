// The fuzz runner: a child process that runs a range of cases in-process through the library
// (what each CLI command calls) and reports one JSON line per case on stdout.
//
// The parent (harness.ts) spawns it with a heap cap and a per-case watchdog: a `start` line
// without its `done` line within the time limit means the case hung, and the parent restarts
// the runner after it. Each case's peak RSS is checked here, after the case, against the cap.

import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QimgError } from '../../src/qcow2/errors.js';
import { info, listSnapshots } from '../../src/qcow2/engine/info.js';
import { convert } from '../../src/qcow2/engine/convert.js';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../src/qcow2/engine/snapshots.js';
import { resize } from '../../src/qcow2/engine/resize.js';
import { rebase } from '../../src/qcow2/engine/rebase.js';
import { renderInfoHuman, renderInfoJson, renderSnapshotTable, renderSnapshotsJson } from '../../src/cli/render.js';
import { makeCase, parseLayout, type Layout } from './mutate.js';

export interface RunnerConfig {
  seedDir: string;
  seeds: string[];
  runSeed: number;
  from: number;
  to: number;
  /** Run the write commands on copies (and judge them with qemu-img check). */
  writes: boolean;
  /** Run the write commands on every Nth case only (1: all). */
  writeEvery?: number;
  /** RSS cap in MiB: a case that pushes the process peak above it is a finding. */
  memCapMiB: number;
  /** A single command taking longer than this is a finding (the parent kills real hangs). */
  opLimitMs: number;
  /** Write each finding's image here (long runs). */
  saveDir?: string;
}

export interface Finding {
  index: number;
  seed: string;
  steps: string[];
  op: string;
  kind: 'crash' | 'message' | 'exit-code' | 'slow' | 'memory' | 'timeout' | 'died' | 'write-damage' | 'convert-output' | 'cli-stderr' | 'seed-changed';
  detail: string;
}

type CheckFn = (path: string) => Promise<{ exitCode: number; messages: string[]; error: string | null }>;
type CheckRender = (r: never) => string;

async function loadCheck(): Promise<{ check: CheckFn; render: CheckRender[] } | null> {
  try {
    const m = (await import('../../src/qcow2/check/index.js')) as unknown as Record<string, unknown>;
    if (typeof m.check !== 'function') return null;
    const render = ['renderCheckHuman', 'renderCheckJson', 'renderCheckStderr'].map((k) => m[k]).filter((f): f is CheckRender => typeof f === 'function');
    return { check: m.check as CheckFn, render };
  } catch {
    return null;
  }
}

/** sha256 of a file, read 1 MiB at a time: a write may grow a small image past 2 GiB (sparse). */
function sha(path: string): string {
  if (!existsSync(path)) return 'missing';
  const h = createHash('sha256');
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(1 << 20);
    for (let pos = 0, n = 0; (n = readSync(fd, buf, 0, buf.length, pos)) > 0; pos += n) h.update(buf.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}

/** qemu-img check's corruption count, or null when qemu-img cannot check the image at all. Without -U:
 * qemu-img -U follows a backing file naming the image itself until it times out; with locks it refuses. */
export function qemuCorruptions(path: string, retry = false): number | null {
  return qemuCheck(path, retry)?.corruptions ?? null;
}

/**
 * qemu-img check's count, and how many of its errors are OFLAG_COPIED clear on a cluster whose
 * refcount reads 1. Clear is the safe side of that flag (a write copies the cluster first instead
 * of writing in place): where a damaged entry makes the refcount read 1 for a cluster two entries
 * name, qimg leaves the flag clear in a table the trees share, and QEMU sets it there.
 */
function qemuCheck(path: string, retry = false): { corruptions: number; copiedClear: number } | null {
  let r = spawnSync('qemu-img', ['check', '--output=json', path], { encoding: 'utf8', timeout: 3000, killSignal: 'SIGKILL' });
  // The other worker's qimg may hold its read lock on a seed both share (an overlay's base.qcow2):
  // qemu-img then cannot open the backing file for a moment. That is the other case's lock, not
  // an answer about this image, so wait for it to go.
  for (let tries = 0; tries < 20 && /Failed to get .*lock|Failed to lock byte/.test(r.stderr ?? ''); tries++) {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
    r = spawnSync('qemu-img', ['check', '--output=json', path], { encoding: 'utf8', timeout: 3000, killSignal: 'SIGKILL' });
  }
  // On a loaded CI machine a sound check can outlast 3 s: a kill is not an answer, so when the
  // input was checkable (`retry`) ask once more with room to spare. Not otherwise: an image whose
  // backing file is itself keeps qemu-img busy until it is killed, and would cost 30 s a case.
  if (retry && r.signal === 'SIGKILL') r = spawnSync('qemu-img', ['check', '--output=json', path], { encoding: 'utf8', timeout: 30000, killSignal: 'SIGKILL' });
  try {
    const j = JSON.parse(r.stdout) as { corruptions?: number; 'check-errors'?: number };
    const copiedClear = [...(r.stderr ?? '').matchAll(/^ERROR OFLAG_COPIED data cluster: l2_entry=([0-9a-f]+) refcount=1$/gm)].filter((m) => (BigInt('0x' + m[1]!) & (1n << 63n)) === 0n).length;
    return { corruptions: (j.corruptions ?? 0) + (j['check-errors'] ?? 0), copiedClear };
  } catch {
    return null;
  }
}

/** qemu-img's corruption count after it runs the same write command on the same input. */
function qemuSameOp(bytes: Uint8Array, path: string, args: string[]): number | null {
  const copy = path + '.qemu.qcow2';
  writeFileSync(copy, bytes);
  try {
    const a = args.includes(path) ? args.map((x) => (x === path ? copy : x)) : [...args, copy];
    let r = spawnSync('qemu-img', a, { encoding: 'utf8', timeout: 15000, killSignal: 'SIGKILL' });
    // As in qemuCheck: the other worker's lock on a shared backing file is not qemu-img's answer.
    for (let tries = 0; tries < 20 && /Failed to get .*lock|Failed to lock byte/.test(r.stderr ?? ''); tries++) {
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
      writeFileSync(copy, bytes);
      r = spawnSync('qemu-img', a, { encoding: 'utf8', timeout: 15000, killSignal: 'SIGKILL' });
    }
    return qemuCorruptions(copy, true); // the input was checkable (callers skip it otherwise)
  } finally {
    rmSync(copy, { force: true });
  }
}

const BAD_MESSAGE = /undefined|NaN|\[object |Infinity/;

function emit(o: unknown): void {
  process.stdout.write(JSON.stringify(o) + '\n');
}

async function main(): Promise<void> {
  const cfg = JSON.parse(process.argv[2]!) as RunnerConfig;
  const seeds = cfg.seeds.map((name) => {
    const bytes = new Uint8Array(readFileSync(join(cfg.seedDir, name)));
    return { name, bytes, layout: parseLayout(bytes) as Layout };
  });
  const checkMod = await loadCheck();
  const capKiB = cfg.memCapMiB * 1024;

  for (let i = cfg.from; i < cfg.to; i++) {
    emit({ start: i });
    const t0 = Date.now();
    const selfName = `case-${i}.qcow2`;
    const path = join(cfg.seedDir, selfName);
    const c = makeCase(seeds, cfg.runSeed, i, selfName);
    const findings: Finding[] = [];
    const note = (op: string, kind: Finding['kind'], detail: string) => findings.push({ index: i, seed: c.seed, steps: c.steps, op, kind, detail });
    const isQcow2 = c.bytes.length >= 4 && c.bytes[0] === 0x51 && c.bytes[1] === 0x46 && c.bytes[2] === 0x49 && c.bytes[3] === 0xfb;

    /** Runs one command: QimgError is an answer, anything else a finding. */
    const guarded = async (op: string, fn: () => Promise<unknown>): Promise<'ok' | 'refused' | 'crashed'> => {
      const s = Date.now();
      try {
        await fn();
        return 'ok';
      } catch (err) {
        if (err instanceof QimgError) {
          if (BAD_MESSAGE.test(err.message)) note(op, 'message', err.message);
          return 'refused';
        }
        const e = err as Error;
        note(op, 'crash', `${e?.name}: ${e?.message}\n${(e?.stack ?? '').split('\n').slice(1, 6).join('\n')}`);
        return 'crashed';
      } finally {
        const ms = Date.now() - s;
        if (ms > cfg.opLimitMs) note(op, 'slow', `${ms} ms`);
      }
    };

    writeFileSync(path, c.bytes);
    const out = join(cfg.seedDir, `case-${i}.out`);
    try {
      await guarded('info', async () => {
        const infos = await info(path);
        renderInfoHuman(infos[0]!);
        renderInfoJson(infos[0]!);
      });
      await guarded('snapshot -l', async () => {
        const { snaps, freed } = await listSnapshots(path, { freedBytes: true });
        renderSnapshotTable(snaps, freed ? { freed } : {});
        renderSnapshotsJson(snaps, freed ?? undefined);
      });
      if (checkMod) {
        await guarded('check', async () => {
          const r = await checkMod.check(path);
          for (const f of checkMod.render) f(r as never);
          // qemu-img probes the qcow2 magic with version 0 as raw and version 1 as the old qcow format:
          // neither supports checks (63), as for any other non-qcow2 file.
          const version = c.bytes.length >= 8 ? ((c.bytes[4]! << 24) | (c.bytes[5]! << 16) | (c.bytes[6]! << 8) | c.bytes[7]!) >>> 0 : 0;
          const allowed = isQcow2 && version >= 2 ? [0, 1, 2, 3] : [0, 1, 2, 3, 63];
          if (!allowed.includes(r.exitCode)) note('check', 'exit-code', `exit ${r.exitCode}: ${r.error}`);
          if (r.error && BAD_MESSAGE.test(r.error)) note('check', 'message', r.error);
        });
      }
      await guarded('convert -O raw', () => convert(path, out, { outputFormat: 'raw' }));
      rmSync(out, { force: true });

      if (cfg.writes && i % (cfg.writeEvery ?? 1) === 0) {
        let before: number | null | undefined;
        const corruptionsBefore = () => {
          if (before === undefined) {
            writeFileSync(path, c.bytes);
            before = qemuCorruptions(path);
          }
          return before;
        };
        const original = createHash('sha256').update(c.bytes).digest('hex');
        const writeOps: Array<[string, () => Promise<unknown>, string[]]> = [
          ['snapshot -c', () => createSnapshot(path, { name: 'fuzz' }), ['snapshot', '-c', 'fuzz']],
          ['resize +1M', () => resize(path, 1024 * 1024, 1), ['resize', '-f', 'qcow2', path, '+1M']],
        ];
        const names = snapshotNames(c.bytes);
        // Flatten (safe rebase onto nothing): reads the whole guest through the chain and writes
        // what the backing file held into the image. Only small guests: a damaged size of
        // petabytes would keep both tools busy far past the case's time limit.
        if (c.bytes.length >= 32 && new DataView(c.bytes.buffer, c.bytes.byteOffset).getBigUint64(24) <= 64n << 20n) {
          writeOps.push(['rebase -b ""', () => rebase(path, { backingFile: '' }), ['rebase', '-b', '', path]]);
        }
        if (names.length) {
          writeOps.push(['snapshot -a', () => applySnapshot(path, { name: names[0]! }), ['snapshot', '-a', names[0]!]]);
          writeOps.push(['snapshot -d', () => deleteSnapshot(path, { name: names[0]! }), ['snapshot', '-d', names[0]!]]);
        }
        for (const [op, fn, qemuArgs] of writeOps) {
          writeFileSync(path, c.bytes);
          const res = await guarded(op, fn);
          if (res === 'crashed') continue;
          if (sha(path) === original) continue; // refused (or a no-op) with the file unchanged
          // Changed: it must be no worse than before by qemu-img's count.
          // The result is moved aside, not read: it may be a sparse file of gigabytes.
          renameSync(path, `${path}.result`);
          const b = corruptionsBefore(); // (checks the input in place: the result is put back below)
          renameSync(`${path}.result`, path);
          if (b === null) continue; // qemu-img cannot check the input: nothing to compare with
          const checked = qemuCheck(path, true);
          const after = checked?.corruptions ?? null;
          if (after !== null && after <= b) continue;
          // Worse by the count: still fine if qemu-img doing the same leaves it as bad (a snapshot
          // of a tree with a bad L2 entry repeats that entry's error once per L1 reaching it), not
          // counting flags qimg left on their safe side (see qemuCheck).
          const q = qemuSameOp(c.bytes, path, qemuArgs);
          if (q === null ? after === null : after !== null && after - checked!.copiedClear <= q) continue;
          note(op, 'write-damage', `${res}; qemu-img check corruptions before ${b}, after ${after ?? 'cannot check'} (after qemu-img ${op}: ${q ?? 'cannot check'})`);
        }
        writeFileSync(path, c.bytes);
        const res = await guarded('convert -O qcow2', () => convert(path, out, { outputFormat: 'qcow2' }));
        if (res === 'ok') {
          const n = qemuCorruptions(out);
          if (n !== 0) note('convert -O qcow2', 'convert-output', `qemu-img check of the output: ${n ?? 'cannot check'}`);
        }
        rmSync(out, { force: true });
      }
    } finally {
      rmSync(out, { force: true });
    }
    const rssKiB = process.resourceUsage().maxRSS;
    if (rssKiB > capKiB) note('all', 'memory', `peak RSS ${Math.round(rssKiB / 1024)} MiB > ${cfg.memCapMiB} MiB`);
    if (findings.length && cfg.saveDir) writeFileSync(join(cfg.saveDir, `finding-${cfg.runSeed}-${i}.qcow2`), c.bytes);
    rmSync(path, { force: true });
    emit({ done: i, ms: Date.now() - t0, rssKiB, findings });
    // The peak only grows: after a memory finding, a fresh process judges the next cases.
    if (rssKiB > capKiB) process.exit(0);
  }
  emit({ end: true, maxRSSKiB: process.resourceUsage().maxRSS });
}

/** Names in the (unmutated-enough) snapshot table, read leniently; [] when unreadable. */
function snapshotNames(b: Uint8Array): string[] {
  try {
    const u32 = (o: number) => ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
    const nb = u32(60);
    const off = u32(64) * 0x100000000 + u32(68);
    if (nb === 0 || nb > 64 || off + 40 > b.length) return [];
    const idSize = (b[off + 12]! << 8) | b[off + 13]!;
    const nameSize = (b[off + 14]! << 8) | b[off + 15]!;
    const extra = u32(off + 36);
    const start = off + 40 + extra + idSize;
    if (extra > 1024 || start + nameSize > b.length) return [];
    const name = new TextDecoder().decode(b.subarray(start, start + nameSize));
    // A damaged table's name can hold NUL bytes: no command line can carry one (spawn refuses
    // it, and the runner died on that: seed 4144028796 case 10869), so neither tool is asked.
    return name.includes('\0') ? [] : [name];
  } catch {
    return [];
  }
}

main().catch((err) => {
  emit({ fatal: String((err as Error)?.stack ?? err) });
  process.exit(70);
});
