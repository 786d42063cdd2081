// qimg check -r against qemu-img check -r 7.2 on damage found by bench/check-diff.ts: each case
// pokes a qemu-img-made image and needs the same output, exit code and repaired result.
import { test } from 'uvu';
import { readFileSync, writeFileSync } from 'node:fs';
import { QIMG_BIN, mustQemuImg, mustQemuIo, qemuImg, run } from '../helpers.js';
import { asQimg, qimgCheck } from './cli.js';
import { checkBoth, same, scratch } from './cases.js';
import { putU32, putU64 } from '../fuzz/mutate.js';

const base = scratch('repair-diff-base.qcow2');
mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', base, '64M']);
mustQemuIo(['-c', 'write -P 1 0 128k', base]);
/** The refcount table's offset (header bytes 48..55; below 2^32 here). */
const REFTABLE = readFileSync(base).readUInt32BE(52);

const both = async (name: string, b: Uint8Array, args: string[], bytes = false): Promise<void> => {
  await checkBoth(scratch('repair-diff-case.qcow2'), name, b, args, { bytes });
};

// seed 1 case 18: QEMU grows the file to take in a refcount block past its end; when it cannot,
// it says why and rebuilds instead. qimg threw on the length and left the image unrepaired.
test('refcount block past the end that the file cannot grow to reach', async () => {
  const offsets: Array<[string, bigint]> = [
    ['offset + cluster past INT64_MAX: EINVAL', 1n << 63n],
    ['past QEMU largest image length: EIO', (1n << 63n) - (1n << 30n)],
  ];
  for (const [name, off] of offsets) {
    const b = new Uint8Array(readFileSync(base));
    putU64(b, REFTABLE + 8, off);
    await both(name, b, ['-r', 'all']);
    await both(name, b, ['-r', 'leaks']);
  }
});

// seed 1 case 17 (nb_snapshots = 65536; 300 is enough): nb_snapshots past the entries, with the table last in the file. The entries past the end
// read as zeros (each one "incomplete", repaired); the table's clusters past the end are not
// counted, so the rewritten table is allocated on top of the old one. QEMU's overlap check stops
// there (image marked corrupt, exit 1); qimg wrote it, then freed the old table's clusters, which
// were the new table's: 640 clusters in use with refcount 0.
test('snapshot table rewrite landing on the old table past the end of the file', async () => {
  const f = scratch('repair-diff-snap.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '1M']);
  mustQemuIo(['-c', 'write -P 1 0 8k', f]);
  mustQemuImg(['snapshot', '-c', 's1', f]);
  const b = new Uint8Array(readFileSync(f));
  putU32(b, 60, 300);
  await both('nb_snapshots 300', b, ['-r', 'all']);
  await both('nb_snapshots 300', b, ['-r', 'leaks']);
});

// seed 697317295 cases 2, 15, 46: a file cut short inside its refcount table. The refcount block
// and the L1 table after it are past the end; the block is brought back by growing the file, but
// the L1 table stays uncounted, so the rebuild's first free cluster is the L1 table's. QEMU's
// overlap check refuses that write (image marked corrupt, exit 1); qimg wrote the refcount block
// there, and the block's bytes then read as L1 entries (errors doubled after the repair).
test('refcount rebuild landing on an L1 table past the end of the file', async () => {
  const f = scratch('repair-diff-cut.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '1M']);
  const b = new Uint8Array(readFileSync(f)).subarray(0, 0x1dea); // header, most of the refcount table
  await both('cut inside the refcount table', b, ['-r', 'all']);
  await both('cut inside the refcount table', b, ['-r', 'leaks']);
});

// seed 697317295 case 46 (a v2 image): the same refused write. A v2 header has no feature bits, so
// QEMU marks nothing on disk; qimg set the corrupt bit anyway, in byte 79, which on v2 is already
// past the header (the first header extension's bytes).
test('a refused repair write on a v2 image leaves the header as it was', async () => {
  const f = scratch('repair-diff-cut-v2.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', f, '1M']);
  const b = new Uint8Array(readFileSync(f)).subarray(0, 0x1dea);
  await both('v2, cut inside the refcount table', b, ['-r', 'all'], true);
});

// Found with the case above: after any successful repair qimg cleared the dirty and corrupt bits
// in byte 79 on v2 images too, where it is the low byte of the first extension's length: a
// backing format 'qcow2' (length 5) became 'qcow'.
test('a repair of a v2 image leaves its header extensions alone', async () => {
  const base = scratch('repair-diff-v2-base.qcow2');
  const top = scratch('repair-diff-v2-top.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', base, '1M']);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'repair-diff-v2-base.qcow2', '-F', 'qcow2', top, '1M']);
  const b = new Uint8Array(readFileSync(top).length + 0x10000);
  b.set(readFileSync(top));
  // A leak: refcount 1 on the appended cluster (16-bit refcounts; the refcount block is named
  // by the first refcount table entry).
  const dv = new DataView(b.buffer);
  const rb = dv.getUint32(Number(dv.getBigUint64(48)) + 4);
  dv.setUint16(rb + 2 * (b.length / 0x10000 - 1), 1);
  await both('v2 with a backing format, a leak', b, ['-r', 'leaks'], true);
});

// seed 697317295 cases 230 and 395: a snapshot's extra_data_size of ~2 MB makes the table run
// past the end of the file, so the refcount pass does not count it, and clusters after it in the
// file are in use. The repair writes the table into a cluster freed as a leak and frees the old
// one: QEMU's update_refcount meets the old table's first cluster already at 0 and frees nothing
// ('qcow2_free_clusters failed: Invalid argument'); qimg dropped every cluster of the old range
// with a refcount, so the active L2 table and data after it ended at refcount 0 while in use.
test('freeing an old snapshot table that was never counted', async () => {
  const f = scratch('repair-diff-snapx.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', f, '64M']);
  mustQemuIo(['-c', 'write -P 1 0 128k', '-c', 'write -P 3 16M 64k', f]);
  mustQemuImg(['snapshot', '-c', 's1', f]);
  mustQemuIo(['-c', 'write -P 2 0 64k', f]); // the active L2 table and this data land after the table
  const b = new Uint8Array(readFileSync(f));
  const dv = new DataView(b.buffer);
  const q = (at: number) => Number(dv.getBigUint64(at) & 0x00fffffffffffe00n);
  const sn = q(64);
  // The 16M cluster, unmapped in both L2 tables (the snapshot's and the active one): a leak
  // before the snapshot table, where the repair puts the new table.
  for (const l1 of [q(sn), q(40)]) dv.setBigUint64(q(l1) + 8 * ((16 << 20) / 65536), 0n);
  dv.setUint32(sn + 36, 0x1f0000); // extra_data_size of entry 0
  await both('extra data past the end of the file', b, ['-r', 'all'], true);
});

// seed 697317295 case 378: the table moved to 4 GiB, far past the end, where no refcount block
// exists: QEMU's free fails at its first cluster with EAGAIN, after creating blocks there (which
// qimg does not do: README's deliberate differences). Everything else is the same.
test('freeing an old snapshot table where no refcount block exists', async () => {
  const f = scratch('repair-diff-snap4g.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', f, '1M']);
  mustQemuImg(['snapshot', '-c', 's1', f]);
  const b = new Uint8Array(readFileSync(f));
  putU64(b, 64, 1n << 32n);
  writeFileSync(f, b);
  const want = asQimg(qemuImg(['check', '-r', 'all', f]));
  writeFileSync(f, b);
  const got = await qimgCheck(['-r', 'all', f]);
  const endless = (o: string) => o.replace(/^Image end offset: \d+$/m, '');
  same({ ...got, stdout: endless(got.stdout) }, { ...want, stdout: endless(want.stdout) }, 'snapshot table at 4 GiB (-r all)');
});

// seed 697317295 case 327: nb_snapshots = 0x7fffffff. -r all cuts it to 65536 entries and writes
// a ~4 MiB table: 1024 clusters of 4 KiB, past the end of the file where no refcount block exists
// yet, while one block (64-bit refcounts) covers 512. The allocator made each missing block
// describe itself at its range's first cluster, which cut every candidate run: it never found
// one, creating blocks until memory ran out. (QEMU then refuses the write: the new table would
// lie on the old one, which runs past the end of the file.)
test('a snapshot table rewrite needing more clusters than one refcount block covers', async () => {
  const f = scratch('repair-diff-rc64.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=64', f, '1M']);
  mustQemuImg(['snapshot', '-c', 's1', f]);
  const b = new Uint8Array(readFileSync(f));
  putU32(b, 60, 0x7fffffff);
  writeFileSync(f, b);
  const want = asQimg(qemuImg(['check', '-r', 'all', f]));
  writeFileSync(f, b);
  same(run('timeout', ['20', QIMG_BIN, 'check', '-r', 'all', f]), want, 'nb_snapshots 0x7fffffff (-r all)');
});

test.run();
