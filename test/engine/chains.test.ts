// Crash simulation for commit and safe rebase: each operation writes two files in phases; the
// crash is simulated on the file being written in each phase, stopping before every write in
// turn. Every outcome must be consistent (qimg's checker on every one, qemu-img on a sample)
// and hold old-or-new guest data; what the guest sees through the whole chain never changes.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { checkFile } from '../../src/qcow2/check/index.js';
import { commitOpened, copyAboveBase, makeEmpty } from '../../src/qcow2/engine/commit.js';
import type { Layer } from '../../src/qcow2/engine/layer.js';
import { chainStatus, layerStatus, BS_ALLOCATED } from '../../src/qcow2/engine/map.js';
import { Qcow2Image } from '../../src/qcow2/engine/qcow2-image.js';
import { copyDifferences, rewriteBacking } from '../../src/qcow2/engine/rebase.js';
import { ImageWriter } from '../../src/qcow2/engine/writer.js';
import { MemoryFile } from '../../src/qcow2/io/memory-file.js';
import { assertOldOrNew, crashSweep } from '../crash-harness.js';
import { mustQemuImg, mustQemuIo, qemuImg, tmpDir } from '../helpers.js';

/** base (64k clusters, one internal snapshot) <- mid (16k) <- top (4k), 2 MiB. */
function build(): { base: Uint8Array; mid: Uint8Array; top: Uint8Array } {
  const dir = tmpDir();
  const p = (n: string) => join(dir, n);
  mustQemuImg(['create', '-q', '-f', 'qcow2', p('base.qcow2'), '2M']);
  mustQemuIo(['-c', 'write -P 1 0 1M', '-c', 'write -c -P 9 1536k 64k', p('base.qcow2')]);
  mustQemuImg(['snapshot', '-c', 'old', p('base.qcow2')]);
  mustQemuIo(['-c', 'write -P 2 64k 64k', p('base.qcow2')]);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16k', '-b', 'base.qcow2', '-F', 'qcow2', p('mid.qcow2')]);
  mustQemuIo(['-c', 'write -P 3 512k 100k', '-c', 'write -z 1536k 32k', p('mid.qcow2')]);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'mid.qcow2', '-F', 'qcow2', p('top.qcow2')]);
  mustQemuIo(['-c', 'write -P 4 4k 8k', '-c', 'write -P 5 600k 20k', '-c', 'write -z 256k 12k', '-c', 'write -P 6 1900k 4k', p('top.qcow2')]);
  mustQemuImg(['snapshot', '-c', 'topsnap', p('top.qcow2')]);
  mustQemuIo(['-c', 'write -P 7 8k 4k', p('top.qcow2')]);
  return { base: readFileSync(p('base.qcow2')), mid: readFileSync(p('mid.qcow2')), top: readFileSync(p('top.qcow2')) };
}

const ro = (bytes: Uint8Array, name: string) => Qcow2Image.open(new MemoryFile(bytes, name, false), name);

/** Guest bytes of a chain given top first (each layer's bytes). */
function guest(layers: Uint8Array[]): Uint8Array {
  const imgs = layers.map((b, i) => ro(b, `l${i}`));
  for (let i = 0; i + 1 < imgs.length; i++) imgs[i]!.backing = imgs[i + 1]!;
  const out = new Uint8Array(imgs[0]!.virtualSize);
  imgs[0]!.read(out, 0);
  return out;
}

function qimgCheck(bytes: Uint8Array, what: string): void {
  const r = checkFile(new MemoryFile(bytes, 'mem', false), 'mem');
  assert.is(r.corruptions, 0, `${what}: corruptions`);
  assert.is(r.checkErrors, 0, `${what}: check errors`);
}

/** qemu-img check, with the backing files the header names beside it. */
function qemuCheck(files: Record<string, Uint8Array>, name: string, what: string): void {
  const dir = tmpDir();
  for (const [n, b] of Object.entries(files)) writeFileSync(join(dir, n), b);
  const r = qemuImg(['check', '--output=json', join(dir, name)]);
  const j = JSON.parse(r.stdout) as Record<string, number>;
  assert.not.ok(j.corruptions, `${what}: qemu-img corruptions`);
  assert.not.ok(j['check-errors'], `${what}: qemu-img check errors`);
}

/** Every k is checked in-process; about a dozen with qemu-img too. */
function sample(k: number, total: number): boolean {
  return k === 0 || k === total || k % Math.max(1, Math.floor(total / 12)) === 0;
}

test('commit phase 1 (data into the base): every crash point consistent, base old-or-new, chain unchanged', async () => {
  const { base, mid, top } = build();
  const before = guest([top, mid, base]);
  const baseBefore = guest([base]);
  // Commit top+mid into base (commit -b base): the crash hits the base file.
  const op = (f: MemoryFile) => {
    const b = Qcow2Image.open(f, 'base');
    const w = new ImageWriter(b);
    const t = ro(top, 'top');
    const m = ro(mid, 'mid');
    t.backing = m;
    m.backing = b;
    commitOpened(t, [t, m], { kind: 'qcow2', writer: w }, null);
  };
  const results = await crashSweep(base, op);
  const after = results[results.length - 1]!;
  assert.not.ok(after.crashed);
  const baseAfter = guest([after.bytes]);
  // Committed base alone reads as the whole chain did.
  assert.ok(Buffer.from(baseAfter).equals(Buffer.from(before)), 'base holds the chain after commit');
  for (const r of results) {
    qimgCheck(r.bytes, `crash before write ${r.k + 1}`);
    if (sample(r.k, results.length - 1)) qemuCheck({ 'base.qcow2': r.bytes }, 'base.qcow2', `crash before write ${r.k + 1}`);
    assertOldOrNew(guest([r.bytes]), baseBefore, baseAfter, 4096, `crash before write ${r.k + 1}`);
    assert.ok(Buffer.from(guest([top, mid, r.bytes])).equals(Buffer.from(before)), `chain changed (k=${r.k})`);
    // The base's internal snapshot is untouched.
    const sn = ro(r.bytes, 'b');
    const view = sn.snapshotView(sn.snapshots[0]!);
    const snap = new Uint8Array(view.virtualSize);
    view.read(snap, 0);
    assert.is(snap[0], 1);
    assert.is(snap[64 * 1024], 1);
  }
});

test('commit phase 2 (emptying the top): every crash point consistent, chain unchanged, snapshot kept', async () => {
  const { base, mid, top } = build();
  const before = guest([top, mid, base]);
  // Phase 1 done first (into mid, as plain `commit` does), no crash.
  const midFile = new MemoryFile(mid, 'mid');
  {
    const m = Qcow2Image.open(midFile, 'mid');
    m.backing = ro(base, 'base');
    const w = new ImageWriter(m);
    const t = ro(top, 'top');
    t.backing = m;
    copyAboveBase(t, [t], { kind: 'qcow2', writer: w });
    w.commit();
  }
  const newMid = midFile.bytes();
  assert.ok(Buffer.from(guest([newMid, base])).equals(Buffer.from(before)));
  const results = await crashSweep(top, (f) => {
    const t = Qcow2Image.open(f, 'top');
    makeEmpty(new ImageWriter(t));
  });
  const last = results[results.length - 1]!;
  const emptied = ro(last.bytes, 't');
  for (let off = 0; off < emptied.virtualSize; off += 4096) {
    assert.not.ok(layerStatus(emptied, off, 4096).flags & BS_ALLOCATED, `top still allocates ${off}`);
  }
  for (const r of results) {
    qimgCheck(r.bytes, `crash before write ${r.k + 1}`);
    if (sample(r.k, results.length - 1)) qemuCheck({ 'top.qcow2': r.bytes, 'mid.qcow2': newMid, 'base.qcow2': base }, 'top.qcow2', `k=${r.k}`);
    assert.ok(Buffer.from(guest([r.bytes, newMid, base])).equals(Buffer.from(before)), `guest changed (k=${r.k})`);
    const t = ro(r.bytes, 't');
    assert.is(t.snapshots.length, 1);
    const view = t.snapshotView(t.snapshots[0]!);
    const s = new Uint8Array(4096);
    view.read(s, 4096);
    assert.is(s[0], 4, 'top snapshot data kept');
  }
});

test('safe rebase (top onto base, skipping mid): every crash point consistent and reads the same', async () => {
  const { base, mid, top } = build();
  const before = guest([top, mid, base]);
  const results = await crashSweep(top, (f) => {
    const t = Qcow2Image.open(f, 'top');
    const m = ro(mid, 'mid');
    m.backing = ro(base, 'base');
    t.backing = m;
    const w = new ImageWriter(t);
    copyDifferences(w, m, ro(base, 'newbase'), [m]);
    rewriteBacking(w, 'base.qcow2', 'qcow2');
  });
  const last = results[results.length - 1]!;
  assert.not.ok(last.crashed);
  assert.is(ro(last.bytes, 't').header.backingFile, 'base.qcow2');
  let switched = 0;
  for (const r of results) {
    qimgCheck(r.bytes, `crash before write ${r.k + 1}`);
    const t = ro(r.bytes, 't');
    const name = t.header.backingFile;
    assert.ok(name === 'mid.qcow2' || name === 'base.qcow2', `backing name ${name}`);
    assert.is(t.header.backingFormat, 'qcow2');
    const chain = name === 'mid.qcow2' ? [r.bytes, mid, base] : [r.bytes, base];
    if (name === 'base.qcow2') switched++;
    assert.ok(Buffer.from(guest(chain)).equals(Buffer.from(before)), `guest changed (k=${r.k}, backing ${name})`);
    if (sample(r.k, results.length - 1)) qemuCheck({ 'top.qcow2': r.bytes, 'mid.qcow2': mid, 'base.qcow2': base }, 'top.qcow2', `k=${r.k}`);
  }
  assert.is(switched, 1, 'the header switches in the very last write');
});

test('flatten (-b ""): the top alone reads as the chain did; header loses its backing', async () => {
  const { base, mid, top } = build();
  const before = guest([top, mid, base]);
  const f = new MemoryFile(top, 'top');
  const t = Qcow2Image.open(f, 'top');
  const m = ro(mid, 'mid');
  m.backing = ro(base, 'base');
  t.backing = m;
  const w = new ImageWriter(t);
  copyDifferences(w, m, null, null);
  rewriteBacking(w, null, null);
  const out = f.bytes();
  const img = ro(out, 'flat');
  assert.is(img.header.backingFile, null);
  assert.is(img.header.backingFormat, null);
  assert.ok(Buffer.from(guest([out])).equals(Buffer.from(before)));
  qimgCheck(out, 'flattened');
  qemuCheck({ 'top.qcow2': out }, 'top.qcow2', 'flattened');
});

test('chainStatus: first allocated layer decides; EOF only at the top end', () => {
  const { base, mid, top } = build();
  const layers: Layer[] = [ro(top, 't'), ro(mid, 'm'), ro(base, 'b')];
  (layers[0] as Qcow2Image).backing = layers[1]!;
  (layers[1] as Qcow2Image).backing = layers[2]!;
  const s = chainStatus(layers[0]!, 512 * 1024, 4096);
  assert.is(s.depth, 1);
  assert.ok(s.flags & BS_ALLOCATED);
  const e = chainStatus(layers[0]!, 2 * 1024 * 1024 - 4096, 4096);
  assert.ok(e.flags & 0x20);
});

test.run();
