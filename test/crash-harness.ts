// Crash simulation: run an operation on an in-memory image, stop it before the k-th write for
// every k, and hand each resulting image to a verifier.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as assert from 'uvu/assert';
import { Qcow2Image } from '../src/qcow2/engine/qcow2-image.js';
import { MemoryFile, SimulatedCrash } from '../src/qcow2/io/memory-file.js';
import { qemuImg, tmpDir } from './helpers.js';

export interface CrashResult {
  k: number;
  crashed: boolean;
  bytes: Uint8Array;
}

/**
 * Runs `op` on a fresh copy of `image` once without a crash to count its writes, then once for
 * every k in [0, writes], crashing before write k+1. Returns every outcome.
 */
export async function crashSweep(image: Uint8Array, op: (file: MemoryFile) => Promise<void> | void): Promise<CrashResult[]> {
  const probe = new MemoryFile(image);
  await op(probe);
  const total = probe.writes;
  const out: CrashResult[] = [];
  for (let k = 0; k <= total; k++) {
    const f = new MemoryFile(image);
    f.crashAfter = k;
    let crashed = false;
    try {
      await op(f);
    } catch (err) {
      if (!(err instanceof SimulatedCrash)) throw err;
      crashed = true;
    }
    out.push({ k, crashed, bytes: f.bytes() });
  }
  assert.ok(total > 0, 'the operation wrote nothing');
  return out;
}

/** qemu-img check on the bytes: returns the parsed JSON (corruptions/leaks/check-errors). */
export function oracleCheck(bytes: Uint8Array, name = 'crash.qcow2'): Record<string, number> {
  const path = join(tmpDir(), name);
  writeFileSync(path, bytes);
  const r = qemuImg(['check', '--output=json', path]);
  try {
    return JSON.parse(r.stdout) as Record<string, number>;
  } catch {
    throw new Error(`qemu-img check gave no JSON: ${r.stderr}`);
  }
}

/** Asserts: no corruption and no check errors (leaks are allowed after a crash). */
export function assertConsistent(bytes: Uint8Array, k: number): void {
  const j = oracleCheck(bytes);
  assert.not.ok(j.corruptions, `crash before write ${k + 1}: ${j.corruptions} corruptions`);
  assert.not.ok(j['check-errors'], `crash before write ${k + 1}: check errors`);
}

/** Guest bytes of an in-memory image (optionally of a snapshot by id). */
export function guestBytes(bytes: Uint8Array, snapshotId?: string): Uint8Array {
  let img = Qcow2Image.open(new MemoryFile(bytes, 'mem', false), 'mem');
  if (snapshotId !== undefined) {
    const sn = img.snapshots.find((s) => s.id === snapshotId);
    if (!sn) throw new Error(`no snapshot ${snapshotId}`);
    img = img.snapshotView(sn);
  }
  const out = new Uint8Array(img.virtualSize);
  img.read(out, 0);
  return out;
}

/** Every cluster of `got` equals the same cluster of `before` or of `after`. */
export function assertOldOrNew(got: Uint8Array, before: Uint8Array, after: Uint8Array, clusterSize: number, what: string): void {
  assert.is(got.length, after.length, `${what}: size`);
  for (let off = 0; off < got.length; off += clusterSize) {
    const g = got.subarray(off, off + clusterSize);
    const ok = Buffer.compare(g, after.subarray(off, off + clusterSize)) === 0 || Buffer.compare(g, before.subarray(off, off + clusterSize)) === 0;
    if (!ok) assert.unreachable(`${what}: cluster at 0x${off.toString(16)} is neither old nor new`);
  }
}
