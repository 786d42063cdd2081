// Guest writes through ImageWriter, checked by the oracle: qemu-img check clean, data as expected.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openWriter } from '../../src/qcow2/engine/writer.js';
import { mustQemuImg, mustQemuIo, qemuImg, tmpDir } from '../helpers.js';

const pat = (v: number, n: number) => new Uint8Array(n).fill(v);

function checkClean(path: string): void {
  const r = qemuImg(['check', '--output=json', path]);
  const j = JSON.parse(r.stdout) as Record<string, number>;
  assert.is(r.status, 0, `qemu-img check ${path}: ${r.stdout}${r.stderr}`);
  assert.not.ok(j.corruptions || j.leaks, `not clean: ${r.stdout}`);
}

function rawOf(path: string, extra: string[] = []): Buffer {
  const out = path + '.raw';
  mustQemuImg(['convert', ...extra, '-O', 'raw', path, out]);
  return readFileSync(out);
}

/** A mixed sequence of operations, mirrored into `exp`. */
async function exercise(path: string, exp: Uint8Array): Promise<void> {
  const w = await openWriter(path);
  const cs = w.clusterSize;
  const W = (d: Uint8Array, o: number) => {
    w.write(d, o);
    exp.set(d, o);
  };
  W(pat(0x11, 65536), 0);
  W(pat(0x22, 1000), 70000); // partial cluster
  W(pat(0x33, 200000), 1000000); // spans clusters
  w.writeZeroes(2 * 65536, 65536);
  exp.fill(0, 2 * 65536, 3 * 65536);
  W(pat(0x44, 65536), 3 * 65536);
  if (cs <= 65536) {
    w.discard(3 * 65536, 65536);
    exp.fill(0, 3 * 65536, 4 * 65536);
  }
  const c = pat(0x55, cs);
  for (let i = 0; i < c.length; i += 7) c[i] = i & 0xff;
  const g = Math.floor((4 * 1024 * 1024) / cs);
  w.writeCompressed(g, c);
  exp.set(c, g * cs);
  w.writeCompressed(g + 1, c);
  exp.set(c, (g + 1) * cs);
  W(pat(0x66, 10), (g + 1) * cs + 5); // rewrite inside a compressed cluster
  W(pat(0x77, 3000), 5 * 1024 * 1024 + 100);
  w.writeZeroes(5 * 1024 * 1024 + 1000, 500); // partial zero write
  exp.fill(0, 5 * 1024 * 1024 + 1000, 5 * 1024 * 1024 + 1500);
  await w.close();
}

const KINDS = [
  'cluster_size=65536',
  'cluster_size=512,refcount_bits=1',
  'compat=0.10',
  'cluster_size=4096,refcount_bits=64',
  'cluster_size=4096,refcount_bits=4',
  'extended_l2=on',
  'cluster_size=16384,extended_l2=on,refcount_bits=8',
  'cluster_size=2M',
  'lazy_refcounts=on',
];

for (const opts of KINDS) {
  test(`writes on a fresh image (${opts}) read back and check clean`, async () => {
    const dir = tmpDir();
    const img = join(dir, 'a.qcow2');
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, img, '8M']);
    const exp = new Uint8Array(8 * 1024 * 1024);
    await exercise(img, exp);
    checkClean(img);
    assert.ok(Buffer.compare(rawOf(img), exp) === 0, 'guest data differs');
  });
}

for (const opts of ['cluster_size=65536', 'compat=0.10', 'extended_l2=on', 'cluster_size=4096,refcount_bits=8']) {
  test(`copy-on-write from a snapshot keeps the snapshot intact (${opts})`, async () => {
    const dir = tmpDir();
    const img = join(dir, 'a.qcow2');
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, img, '8M']);
    mustQemuIo(['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x12 2M 512k', '-c', 'write -c -P 0x13 3M 64k', img]);
    mustQemuImg(['snapshot', '-c', 's1', img]);
    const before = rawOf(img);
    const exp = new Uint8Array(before);
    await exercise(img, exp);
    checkClean(img);
    assert.ok(Buffer.compare(rawOf(img), exp) === 0, 'active layer differs');
    assert.ok(Buffer.compare(rawOf(img, ['-l', 's1']), before) === 0, 'snapshot changed');
  });
}

test('copy-on-write from a backing file: partial writes keep the backing data around them', async () => {
  const dir = tmpDir();
  const base = join(dir, 'b.qcow2');
  const top = join(dir, 'o.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', base, '8M']);
  mustQemuIo(['-c', 'write -P 0x21 0 8M', base]);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', top]);
  const exp = new Uint8Array(rawOf(top));
  await exercise(top, exp);
  checkClean(top);
  checkClean(base);
  assert.ok(Buffer.compare(rawOf(top), exp) === 0, 'overlay data differs');
  assert.ok(rawOf(base).every((b) => b === 0x21), 'backing file was modified');
});

test('resize grows the L1 table and shrinks freeing clusters', async () => {
  const dir = tmpDir();
  const img = join(dir, 'r.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '1M']);
  mustQemuIo(['-c', 'write -P 0x31 0 1M', img]);
  let w = await openWriter(img);
  w.resize(64 * 1024 * 1024); // 512-byte clusters: L1 must grow from 1 to 2 clusters and beyond
  w.write(pat(0x32, 4096), 60 * 1024 * 1024);
  await w.close();
  checkClean(img);
  const info = JSON.parse(mustQemuImg(['info', '--output=json', img])) as { 'virtual-size': number };
  assert.is(info['virtual-size'], 64 * 1024 * 1024);
  const raw = rawOf(img);
  assert.ok(raw.subarray(0, 1024 * 1024).every((b) => b === 0x31));
  assert.ok(raw.subarray(60 * 1024 * 1024, 60 * 1024 * 1024 + 4096).every((b) => b === 0x32));
  w = await openWriter(img);
  w.resize(512 * 1024);
  await w.close();
  checkClean(img);
  const small = rawOf(img);
  assert.is(small.length, 512 * 1024);
  assert.ok(small.every((b) => b === 0x31));
});

test('small clusters with 64-bit refcounts force the refcount table to move', async () => {
  const dir = tmpDir();
  const img = join(dir, 'g.qcow2');
  // 512-byte clusters, 64-bit refcounts: one block covers 64 clusters, one table cluster 64 blocks.
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', img, '16M']);
  const w = await openWriter(img);
  const exp = new Uint8Array(16 * 1024 * 1024);
  for (let i = 0; i < 16; i++) {
    const d = pat(i + 1, 512 * 1024);
    w.write(d, i * 1024 * 1024);
    exp.set(d, i * 1024 * 1024);
  }
  const before = w.header.refcountTableOffset;
  await w.close();
  checkClean(img);
  const info = JSON.parse(mustQemuImg(['info', '--output=json', img])) as Record<string, unknown>;
  assert.ok(info);
  const hdr = readFileSync(img).subarray(48, 56);
  assert.is.not(Number(hdr.readBigUInt64BE(0)), before, 'refcount table did not move');
  assert.ok(Buffer.compare(rawOf(img), exp) === 0);
});

test.run();
