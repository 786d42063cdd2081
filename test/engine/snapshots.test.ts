// Snapshot create/apply/delete against qemu-img doing the same sequence, plus crash simulation.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Qcow2Image } from '../../src/qcow2/engine/qcow2-image.js';
import { applySnapshotOn, createSnapshotOn, deleteSnapshotOn, snapshotFreedBytes } from '../../src/qcow2/engine/snapshots.js';
import { ImageWriter } from '../../src/qcow2/engine/writer.js';
import { Refcounts } from '../../src/qcow2/engine/refcounts.js';
import { MemoryFile } from '../../src/qcow2/io/memory-file.js';
import { crashSweep, guestBytes, oracleCheck } from '../crash-harness.js';
import { FIXTURES, mustQemuImg, mustQemuIo, qemuImg, qimg, tmpDir } from '../helpers.js';

function clean(path: string): void {
  const r = qemuImg(['check', '--output=json', path]);
  assert.is(r.status, 0, `qemu-img check: ${r.stdout}${r.stderr}`);
}

function snapshotIds(path: string): string[] {
  const j = JSON.parse(mustQemuImg(['info', '--output=json', '-U', path])) as { snapshots?: Array<{ id: string }> };
  return (j.snapshots ?? []).map((s) => s.id);
}

function raw(path: string, snap?: string): Buffer {
  const out = join(tmpDir(), 'o.raw');
  mustQemuImg(['convert', '-U', ...(snap ? ['-l', `snapshot.id=${snap}`] : []), '-O', 'raw', path, out]);
  return readFileSync(out);
}

/** Same steps on two copies: one through qimg, one through qemu-img; guest I/O by qemu-io on both. */
function twin(opts: string, steps: Array<string[]>): void {
  const dir = tmpDir();
  const a = join(dir, 'qimg.qcow2');
  const b = join(dir, 'qemu.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, a, '8M']);
  mustQemuIo(['-c', 'write -P 0x11 0 2M', '-c', 'write -c -P 0x12 3M 256k', '-c', 'write -z 4M 64k', a]);
  copyFileSync(a, b);
  for (const step of steps) {
    if (step[0] === 'io') {
      mustQemuIo([...step.slice(1).flatMap((c) => ['-c', c]), a]);
      mustQemuIo([...step.slice(1).flatMap((c) => ['-c', c]), b]);
      continue;
    }
    const r = qimg(['snapshot', ...step, a]);
    assert.is(r.status, 0, `qimg snapshot ${step.join(' ')}: ${r.stderr}`);
    mustQemuImg(['snapshot', ...step, b]);
    clean(a);
  }
  assert.equal(snapshotIds(a), snapshotIds(b), 'snapshot ids differ');
  const la = qimg(['snapshot', '-l', a]).stdout.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE');
  const lb = qemuImg(['snapshot', '-l', b]).stdout.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE');
  assert.is(la, lb);
  assert.ok(raw(a).equals(raw(b)), 'active layers differ');
  for (const id of snapshotIds(a)) assert.ok(raw(a, id).equals(raw(b, id)), `snapshot ${id} differs`);
}

for (const opts of ['cluster_size=65536', 'cluster_size=4096,refcount_bits=32', 'compat=0.10', 'extended_l2=on', 'cluster_size=512,refcount_bits=64']) {
  test(`create/apply/delete sequence matches qemu-img (${opts})`, () => {
    twin(opts, [
      ['-c', 'first'],
      ['io', 'write -P 0x21 512k 1M', 'write -z 1M 64k', 'discard 3M 64k'],
      ['-c', 'second'],
      ['io', 'write -P 0x31 0 4k'],
      ['-c', 'first'], // duplicate names are allowed
      ['-a', 'first'], // ID first, then name: applies ID... no ID 'first' -> name 'first' (the first match)
      ['-d', 'second'],
      ['-a', '3'],
      ['io', 'write -P 0x41 6M 100k'],
      ['-c', 'x'.repeat(300)],
      ['-d', 'first'],
    ]);
  });
}

/** Every entry of the active tree, L1 then each L2 table in L1 order, as hex (flags included). */
function activeEntries(path: string): string[] {
  const img = Qcow2Image.open(new MemoryFile(new Uint8Array(readFileSync(path)), 'm', false), 'm');
  const out: string[] = [];
  const hex8 = (b: Uint8Array, at: number) => Buffer.from(b.subarray(at, at + 8)).toString('hex');
  for (let i = 0; i < img.l1.length; i += 8) {
    out.push(`L1 ${i / 8} ${hex8(img.l1, i)}`);
    const off = Number(Buffer.from(img.l1.subarray(i, i + 8)).readBigUInt64BE() & 0x00fffffffffffe00n);
    if (off === 0) continue;
    const t = img.readTable(off, img.clusterSize, 'L2');
    for (let e = 0; e < t.length; e += 8) if (t.subarray(e, e + 8).some((x) => x !== 0)) out.push(`L2 ${i / 8}.${e / 8} ${hex8(t, e)}`);
  }
  return out;
}

// The snapshot fast paths: apply between trees that share tables walks nothing (+1 -1 netted),
// and deleting a snapshot that shares every table sets OFLAG_COPIED without refcount lookups.
// Data clusters never move in these operations, so the active tree must match qemu-img's entry
// for entry, OFLAG_COPIED included.
for (const opts of ['cluster_size=65536', 'cluster_size=4096', 'extended_l2=on', 'refcount_bits=8']) {
  test(`shared-table apply and delete leave the same active entries as qemu-img (${opts})`, () => {
    const dir = tmpDir();
    const a = join(dir, 'qimg.qcow2');
    const b = join(dir, 'qemu.qcow2');
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, a, '16M']);
    mustQemuIo(['-c', 'write -P 0x11 0 3M', '-c', 'write -c -P 0x12 5M 256k', '-c', 'write -z 6M 64k', '-c', 'write -P 0x13 9M 2M', a]);
    copyFileSync(a, b);
    for (const step of [['-c', 's1'], ['-a', 's1'], ['-c', 's2'], ['-c', 's3'], ['-d', 's2'], ['-a', 's3'], ['-d', 's3'], ['-d', 's1']]) {
      const r = qimg(['snapshot', ...step, a]);
      assert.is(r.status, 0, `qimg snapshot ${step.join(' ')}: ${r.stderr}`);
      mustQemuImg(['snapshot', ...step, b]);
      clean(a);
      assert.equal(activeEntries(a), activeEntries(b), `active tree after ${step.join(' ')}`);
    }
    assert.ok(raw(a).equals(raw(b)), 'active layers differ');
  });
}

test('apply restores the disk size recorded with the snapshot', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', a, '4M']);
  mustQemuIo(['-c', 'write -P 0x51 0 4M', a]);
  assert.is(qimg(['snapshot', '-c', 'small', a]).status, 0);
  mustQemuImg(['resize', a, '16M']);
  mustQemuIo(['-c', 'write -P 0x52 10M 1M', a]);
  assert.is(qimg(['snapshot', '-a', 'small', a]).status, 0);
  clean(a);
  const info = JSON.parse(mustQemuImg(['info', '--output=json', a])) as { 'virtual-size': number };
  assert.is(info['virtual-size'], 4 * 1024 * 1024);
  assert.ok(raw(a).every((x) => x === 0x51));
});

test('messages and exit codes for missing snapshots and raw images match qemu-img', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.qcow2');
  const r = join(dir, 'r.img');
  mustQemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
  mustQemuImg(['create', '-q', '-f', 'raw', r, '1M']);
  const cases: Array<[string[], string]> = [
    [['-a', 'nope', a], `qimg: Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory\n`],
    [['-d', 'nope', a], `qimg: Could not delete snapshot 'nope': snapshot not found\n`],
    [['-c', 'x', r], `qimg: Could not create snapshot 'x': -95 (Operation not supported)\n`],
    [['-a', 'x', r], `qimg: Could not apply snapshot 'x': Block driver does not support snapshots\n`],
    [['-d', 'x', r], `qimg: Could not delete snapshot 'x': snapshot not found\n`],
  ];
  const before = readFileSync(a);
  for (const [args, msg] of cases) {
    const res = qimg(['snapshot', ...args]);
    assert.is(res.status, 1, args.join(' '));
    assert.is(res.stderr, msg);
    const q = qemuImg(['snapshot', ...args]);
    assert.is(q.status, 1);
    assert.ok(q.stderr.endsWith(msg.replace(/^qimg: /, '')), `qemu-img says: ${q.stderr}`);
  }
  assert.ok(readFileSync(a).equals(before), 'a failed operation changed the image');
  // 7.2 deletes by name only; qimg adds --delete --id.
  assert.is(qimg(['snapshot', '-c', 'one', a]).status, 0);
  assert.is(qimg(['snapshot', '-d', '1', a]).status, 1);
  assert.is(qimg(['snapshot', '--delete', '--id', '1', a]).status, 0);
  assert.equal(snapshotIds(a), []);
  clean(a);
});

test('the bytes a delete would free are exactly what a delete frees', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', a, '8M']);
  mustQemuIo(['-c', 'write -P 0x11 0 1M', a]);
  mustQemuImg(['snapshot', '-c', 's1', a]);
  mustQemuIo(['-c', 'write -P 0x12 0 512k', '-c', 'write -c -P 0x13 2M 64k', a]);
  mustQemuImg(['snapshot', '-c', 's2', a]);
  mustQemuIo(['-c', 'write -P 0x14 2M 32k', a]);
  const j = JSON.parse(qimg(['snapshot', '-l', '--output=json', a]).stdout) as Array<{ id: string; 'freed-bytes': number }>;
  for (const sn of j) {
    const copy = join(dir, `c${sn.id}.qcow2`);
    copyFileSync(a, copy);
    const before = usedClusters(copy);
    const name = sn.id === '1' ? 's1' : 's2';
    mustQemuImg(['snapshot', '-d', name, copy]);
    clean(copy);
    // The snapshot table is rewritten into as many clusters as before, so the difference is what the delete freed.
    assert.is((before - usedClusters(copy)) * 4096, sn['freed-bytes'], `snapshot ${sn.id}`);
    assert.ok(sn['freed-bytes'] > 0);
  }
  const human = qimg(['snapshot', '-l', '--size', a]).stdout;
  assert.match(human, /FREED/);
});

/** Host clusters with a non-zero refcount. */
function usedClusters(path: string): number {
  const img = Qcow2Image.open(new MemoryFile(new Uint8Array(readFileSync(path)), 'm', false), 'm');
  const h = img.header;
  const refs = new Refcounts(img.file, h.clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters);
  let n = 0;
  for (let c = 0; c < refs.endCluster; c++) if (refs.get(c) > 0) n++;
  return n;
}

test('a refcount overflow refuses the operation and leaves the image as it was', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.qcow2');
  // 8-bit refcounts and 64 compressed clusters packed per host cluster: the 4th tree overflows.
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=8', a, '8M']);
  mustQemuIo(['-c', 'write -c -P 0x12 3M 256k', a]);
  assert.is(qimg(['snapshot', '-c', 's1', a]).status, 0);
  assert.is(qimg(['snapshot', '-c', 's2', a]).status, 0);
  const before = readFileSync(a);
  const r = qimg(['snapshot', '-c', 's3', a]);
  assert.is(r.status, 1);
  // qemu-img's words (QEMU fails the refcount update with EINVAL), where it also leaks clusters.
  assert.is(r.stderr, "qimg: Could not create snapshot 's3': -22 (Invalid argument)\n");
  assert.ok(readFileSync(a).equals(before), 'the image changed');
  clean(a);
  const b = join(dir, 'b.qcow2');
  copyFileSync(a, b);
  const q = qemuImg(['snapshot', '-c', 's3', b]);
  assert.is(q.status, 1);
  assert.is(q.stderr.replace('qemu-img', 'qimg'), r.stderr);
});

// Found by the ops differential fuzz (bench/ops-diff.ts, seed 3 case 6): with 2-bit refcounts a
// revert that would take a cluster past 3 printed qimg's own reason, not qemu-img's.
test('an apply that would overflow a refcount fails with qemu-img words, the file unchanged', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=2', a, '1M']);
  mustQemuIo(['-c', 'write -P 1 0 64k', a]);
  mustQemuImg(['snapshot', '-c', 's1', a]); // the data at 2, in one L2 table the trees share
  mustQemuIo(['-c', 'write -P 2 512k 4k', a]); // the active tree takes its own copy of the table
  mustQemuImg(['snapshot', '-c', 's2', a]); // the data at 3 (the maximum): s1's table, and the one s2 shares
  // The revert adds s1's table before the active tree lets go of its own: 4, past the maximum.
  const b = join(dir, 'b.qcow2');
  copyFileSync(a, b);
  const before = readFileSync(a);
  const r = qimg(['snapshot', '-a', 's1', a]);
  const q = qemuImg(['snapshot', '-a', 's1', b]);
  assert.is(r.status, 1, r.stderr);
  assert.is(q.status, 1, q.stderr);
  assert.is(r.stderr, "qimg: Could not apply snapshot 's1': Failed to load snapshot: Invalid argument\n");
  assert.is(q.stderr.replace('qemu-img', 'qimg'), r.stderr);
  assert.ok(readFileSync(a).equals(before), 'the image changed');
});

/** Sets the 16-bit refcount of the host cluster holding guest cluster `gc` (64 KiB clusters, one refcount block). */
function pokeDataRefcount(path: string, gc: number, value: number): void {
  const b = readFileSync(path);
  const img = Qcow2Image.open(new MemoryFile(new Uint8Array(b), 'm', false), 'm');
  const l2 = Number(b.readBigUInt64BE(img.header.l1TableOffset) & 0x00fffffffffffe00n);
  const host = Number(b.readBigUInt64BE(l2 + gc * 8) & 0x00fffffffffffe00n);
  const block = Number(b.readBigUInt64BE(img.header.refcountTableOffset) & 0x00fffffffffffe00n);
  b.writeUInt16BE(value, block + (host / 65536) * 2);
  writeFileSync(path, b);
}

// The 16-bit fast loop only learns that some change was invalid at the end of a table; it then
// undoes and walks again checking each change. These pin the messages and the untouched file.
test('16-bit refcounts: an overflow, a drop below zero and a reference to a free cluster refuse with the file unchanged', () => {
  const dir = tmpDir();
  const base = join(dir, 'base.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', base, '8M']);
  mustQemuIo(['-c', 'write -P 0x11 0 1M', base]);
  const cases: Array<[string, number, string[], RegExp]> = [
    ['overflow', 65535, ['-c', 's'], /^qimg: Could not create snapshot 's': -22 \(Invalid argument\)\n$/],
    ['free', 0, ['-c', 's'], /^qimg: Could not create snapshot 's': cluster 0x[0-9a-f]+ is referenced but its refcount is 0 /],
  ];
  for (const [name, value, args, message] of cases) {
    const a = join(dir, `${name}.qcow2`);
    copyFileSync(base, a);
    pokeDataRefcount(a, 7, value);
    const before = readFileSync(a);
    const r = qimg(['snapshot', ...args, a]);
    assert.is(r.status, 1, `${name}: ${r.stderr}`);
    assert.match(r.stderr, message, name);
    assert.ok(readFileSync(a).equals(before), `${name}: the image changed`);
  }
  // A snapshot shares every cluster (refcount 2); one poked to 0, deleting the snapshot would go below zero.
  const d = join(dir, 'below.qcow2');
  copyFileSync(base, d);
  assert.is(qimg(['snapshot', '-c', 's', d]).status, 0);
  pokeDataRefcount(d, 9, 0); // the delete's -1 would take it to -1
  const before = readFileSync(d);
  const r = qimg(['snapshot', '-d', 's', d]);
  assert.is(r.status, 1, r.stderr);
  assert.match(r.stderr, /^qimg: Could not delete snapshot 's': refcount of cluster 0x[0-9a-f]+ would drop below zero\n$/);
  assert.ok(readFileSync(d).equals(before), 'delete: the image changed');
});

test('a dirty image is repaired on a read-write open, with the same log and result as qemu-img', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.qcow2');
  const b = join(dir, 'b.qcow2');
  copyFileSync(join(FIXTURES, 'dirty.qcow2'), a);
  copyFileSync(join(FIXTURES, 'dirty.qcow2'), b);
  assert.is(qemuImg(['check', a]).status, 2, 'the fixture is not dirty');
  const m = qimg(['snapshot', '-c', 'after-crash', a]);
  const q = qemuImg(['snapshot', '-c', 'after-crash', b]);
  assert.is(m.status, 0, m.stderr);
  assert.is(m.stderr, q.stderr);
  assert.match(m.stderr, /Rebuilding refcount structure/);
  clean(a);
  const hdr = readFileSync(a);
  assert.is(hdr[79]! & 1, 0, 'dirty bit still set');
  assert.ok(raw(a).equals(raw(b)));
  assert.ok(raw(a, '1').equals(raw(b, '1')));
});

// ---------------------------------------------------------------- crash simulation

/** Only leaks, and OFLAG_COPIED left clear on a cluster whose refcount is 1 (costs a copy, never data). */
function assertSafe(bytes: Uint8Array, k: number): void {
  const path = join(tmpDir(), 'crash.qcow2');
  writeFileSync(path, bytes);
  const r = qemuImg(['check', path]);
  for (const line of r.stderr.split('\n')) {
    if (line === '' || line.startsWith('Leaked cluster')) continue;
    const m = /^ERROR OFLAG_COPIED (?:data cluster: l2_entry|L2 cluster: l1_index=\d+ l1_entry)=([0-9a-f]+) refcount=(\d+)/.exec(line);
    if (m && BigInt('0x' + m[1]) >> 63n === 0n && m[2] === '1') continue;
    assert.unreachable(`crash before write ${k + 1}: ${line}`);
  }
}


function baseImage(): Uint8Array {
  const path = join(tmpDir(), 'base.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=16', path, '2M']);
  mustQemuIo(['-c', 'write -P 0x11 0 256k', '-c', 'write -c -P 0x12 512k 64k', path]);
  mustQemuImg(['snapshot', '-c', 'old', path]);
  mustQemuIo(['-c', 'write -P 0x13 64k 64k', path]);
  return new Uint8Array(readFileSync(path));
}

function tableIds(bytes: Uint8Array): string[] {
  return Qcow2Image.open(new MemoryFile(bytes, 'm', false), 'm').snapshots.map((s) => `${s.id}:${s.name}`);
}

const OPS: Array<[string, (w: ImageWriter) => void]> = [
  ['create', (w) => void createSnapshotOn(w, { name: 'new', dateMicros: 1e15 })],
  ['apply', (w) => void applySnapshotOn(w, { idOrName: 'old' })],
  ['delete', (w) => void deleteSnapshotOn(w, { name: 'old' })],
];

for (const [name, op] of OPS) {
  test(`crash at every write during snapshot ${name}: leaks only, old or new table, data intact`, async () => {
    const image = baseImage();
    const activeBefore = guestBytes(image);
    const snapBefore = guestBytes(image, '1');
    const tableBefore = tableIds(image);
    const results = await crashSweep(image, (f) => {
      const w = new ImageWriter(Qcow2Image.open(f, 'mem'));
      op(w);
    });
    const final = results[results.length - 1]!.bytes;
    const tableAfter = tableIds(final);
    const activeAfter = guestBytes(final);
    for (const r of results) {
      assertSafe(r.bytes, r.k);
      const t = tableIds(r.bytes);
      assert.ok(JSON.stringify(t) === JSON.stringify(tableBefore) || JSON.stringify(t) === JSON.stringify(tableAfter), `k=${r.k}: table ${t}`);
      const active = guestBytes(r.bytes);
      assert.ok(Buffer.compare(active, activeBefore) === 0 || Buffer.compare(active, activeAfter) === 0, `k=${r.k}: active layer is neither old nor new`);
      if (t.includes('1:old')) assert.ok(Buffer.compare(guestBytes(r.bytes, '1'), snapBefore) === 0, `k=${r.k}: snapshot data changed`);
    }
    assert.is(oracleCheck(final).leaks ?? 0, 0, 'the completed operation leaked');
  });
}

test('snapshotFreedBytes counts nothing for a snapshot that shares everything', () => {
  const image = baseImage();
  const img = Qcow2Image.open(new MemoryFile(image, 'm', false), 'm');
  const freed = snapshotFreedBytes(img);
  // 'old' owns its L1 copy (1 cluster) and the data the active layer rewrote (64k) plus the L2 table copied on write.
  assert.ok(freed.get('1')! >= 4096 + 65536, `freed ${freed.get('1')}`);
});

test.run();
