// Findings of the fuzz runs, rebuilt from fresh qemu-img images by the same mutation: each write
// command on the damaged image is refused and leaves the file byte for byte unchanged.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustQemuImg, mustQemuIo, qemuImg, qimg, tmpDir } from '../helpers.js';
import { putU32, putU64 } from './mutate.js';

const dir = tmpDir('qimg-fuzz-reg-');

function u32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}
function u64(b: Uint8Array, o: number): number {
  return u32(b, o) * 0x100000000 + u32(b, o + 4);
}
/** Bits 9-55 of a table entry (flags dropped before the number loses precision). */
function entryOff(b: Uint8Array, o: number): number {
  return (u32(b, o) & 0x00ffffff) * 0x100000000 + ((u32(b, o + 4) & 0xfffffe00) >>> 0);
}

function image(name: string, opts: string, size: string, writes: string[], snapshot?: string, after: string[] = []): string {
  const path = join(dir, name);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, path, size]);
  if (writes.length) mustQemuIo(['-f', 'qcow2', ...writes.flatMap((c) => ['-c', c]), path]);
  if (snapshot) mustQemuImg(['snapshot', '-c', snapshot, path]);
  if (after.length) mustQemuIo(['-f', 'qcow2', ...after.flatMap((c) => ['-c', c]), path]);
  return path;
}

function refusedUnchanged(path: string, args: string[], reason: RegExp): void {
  const before = readFileSync(path);
  const r = qimg([...args, path]);
  assert.is(r.status, 1, r.stderr);
  assert.match(r.stderr, reason);
  assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.ok(Buffer.compare(before, readFileSync(path)) === 0, `${args.join(' ')} changed the file`);
}

test('refcount_order changed under the image (refcounts read as free): snapshot -c never allocates over the header', () => {
  // fuzz seed 1 case 95: extl2 image, refcount_order 4 -> 1. The allocator handed out cluster 0
  // and the new L1 copy overwrote the magic; the snapshot table landed on the refcount table.
  const path = image('order.qcow2', 'extended_l2=on,cluster_size=16384', '2M', ['write -P 0x66 1k 2k', 'write -P 0x68 1M 32k'], 'e1');
  const b = new Uint8Array(readFileSync(path));
  putU32(b, 96, 1);
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-c', 'x'], /refcount is 0|holds qcow2 metadata/);
});

test('a referenced cluster with refcount 0: snapshot -c refuses instead of hiding the corruption', () => {
  const path = image('rc0.qcow2', 'cluster_size=4096', '1M', ['write -P 0x11 0 64k']);
  const b = new Uint8Array(readFileSync(path));
  const rb = u64(b, u64(b, 48)); // first refcount block
  const l1 = u64(b, 40);
  const l2 = entryOff(b, l1);
  const data = entryOff(b, l2) / 4096;
  b[rb + data * 2] = 0;
  b[rb + data * 2 + 1] = 0;
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-c', 'x'], /is referenced but its refcount is 0/);
});

test('an L2 entry with an unaligned offset: snapshot -c refuses (QEMU: EIO, image marked corrupt)', () => {
  // fuzz seed 1 case 57: v2 image, an L2 entry = 0x25e9.
  const path = image('unaligned.qcow2', 'compat=0.10,cluster_size=4096', '1M', ['write -P 0x91 4k 12k'], 'v');
  const b = new Uint8Array(readFileSync(path));
  const l2 = entryOff(b, u64(b, 40));
  putU64(b, l2 + 8, 0x25e9n);
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-c', 'x'], /L2 table at 0x[0-9a-f]+: entry 1 offset 0x2400 is not aligned/);
});

test('an active L2 table cut by truncation: snapshot -d refuses before removing the entry', () => {
  // fuzz seed 20240601 case 640: the delete rewrote the table and the refcounts, then failed
  // recomputing OFLAG_COPIED on the active tree, leaving qemu-img check with 3 new errors.
  const path = image('cut.qcow2', 'cluster_size=512', '256k', ['write -P 0x71 0 4k'], 'a', ['write -P 0x72 100k 1k']);
  const b = new Uint8Array(readFileSync(path));
  const l2 = entryOff(b, u64(b, 40) + 3 * 8); // 100k / 32k = L1 entry 3, allocated last
  assert.ok(l2 > 0);
  truncateSync(path, l2 + 256);
  refusedUnchanged(path, ['snapshot', '-d', 'a'], /active L1 table: entry 3 points to L2 table offset 0x[0-9a-f]+ past the end of the file/);
});

// fuzz seed 120083328 (long run, 2026-11-26): writes that followed damaged pointers onto other
// metadata. Each is now refused before the first write.

test('an active L1 entry with flags but no L2 offset: snapshot -c refuses (QEMU asserts; the copy doubled the damage)', () => {
  // case 4: l1[0] = 0x8000000000000000. QEMU's check takes cluster 0 for that entry's L2 table.
  const path = image('l1flags.qcow2', 'cluster_size=4096', '1M', ['write -P 0x21 0 8k'], 'r');
  const b = new Uint8Array(readFileSync(path));
  putU64(b, u64(b, 40), 0x8000000000000000n);
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-c', 'x'], /active L1 table: entry 0 has flags set \(0x8000000000000000\) but no L2 table offset/);
});

test('an active L1 entry naming the refcount table: snapshot -d refuses (it rewrote the refcount table as an L2 table)', () => {
  // case 316: l1[0] = the refcount table's offset; the OFLAG_COPIED pass set bit 63 of its first entry.
  const path = image('l1rt.qcow2', 'compat=0.10,cluster_size=4096', '1M', ['write -P 0x31 0 8k'], 'v');
  const b = new Uint8Array(readFileSync(path));
  const rt = u64(b, 48);
  putU64(b, u64(b, 40), BigInt(rt));
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-d', 'v'], new RegExp(`active L1 table: entry 0 points to 0x${rt.toString(16)}, which holds the refcount table`));
});

test('a refcount table past the end of the file: resize refuses (its first new refcount block landed on the header)', () => {
  // case 911: refcount_table_offset moved past EOF, so every refcount read as 0.
  const path = image('rtpast.qcow2', 'cluster_size=512', '256k', ['write -P 0x41 0 4k'], 'a');
  const b = new Uint8Array(readFileSync(path));
  putU64(b, 48, BigInt(Math.ceil(b.length / 512) * 512 + 4096));
  writeFileSync(path, b);
  const before = readFileSync(path);
  const r = qimg(['resize', '-f', 'qcow2', path, '+1M']);
  assert.is(r.status, 1, r.stderr);
  assert.match(r.stderr, /the refcount table at 0x[0-9a-f]+ lies past the end of the file/);
  assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.ok(Buffer.compare(before, readFileSync(path)) === 0, 'resize changed the file');
});

test('a refcount table entry with bits 56-63 set: writers refuse (its block was taken at the low bits, a data cluster)', () => {
  // Found reading the overlap check of check-diff seed 120702 case 97: a refcount table entry's
  // offset is bits 9-63, but the writer masked it like an L2 entry (bits 9-55), so 2^56 + X was a
  // refcount block at X. With X a data cluster, snapshot -c wrote refcounts into the guest's data;
  // qemu-img fails (I/O error) on the block at 2^56 + X.
  const path = image('rt56.qcow2', 'cluster_size=65536', '1M', ['write -P 0x61 0 64k'], undefined);
  const b = new Uint8Array(readFileSync(path));
  const data = entryOff(b, entryOff(b, u64(b, 40))); // l1[0] -> l2[0] -> the data cluster
  putU64(b, u64(b, 48), (1n << 56n) + BigInt(data));
  writeFileSync(path, b);
  const reason = new RegExp(`refcount table entry 0 \\(refcount block at 0x${((1n << 56n) + BigInt(data)).toString(16)}\\) lies past the end of the file`);
  refusedUnchanged(path, ['snapshot', '-c', 'x'], reason);
  const before = readFileSync(path);
  const rs = qimg(['resize', '-f', 'qcow2', path, '+1M']);
  assert.is(rs.status, 1, rs.stderr);
  assert.match(rs.stderr, reason);
  assert.ok(Buffer.compare(before, readFileSync(path)) === 0, 'resize changed the file');
  const r = qemuImg(['convert', '-O', 'raw', path, join(dir, 'rt56.raw')]);
  assert.is(r.status, 0, r.stderr);
  assert.ok(readFileSync(join(dir, 'rt56.raw')).subarray(0, 65536).every((x) => x === 0x61), 'guest data intact');
});

test('a snapshot L1 table reaching past the end of the file: snapshot -c refuses (new tables landed inside it)', () => {
  // cases 33, 149: a snapshot entry's l1_size = 0x10000.
  const path = image('snl1big.qcow2', 'cluster_size=4096', '1M', ['write -P 0x51 0 8k'], 's1');
  const b = new Uint8Array(readFileSync(path));
  putU32(b, u64(b, 64) + 8, 0x10000);
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-c', 'x'], /snapshot 1: its L1 table at 0x[0-9a-f]+ \(65536 entries\) reaches past the end of the file/);
});

test('a snapshot L1 table on top of the active L1 table: snapshot -d refuses', () => {
  // case 383: the snapshot entry's L1 offset = the active L1's.
  const path = image('snl1act.qcow2', 'cluster_size=4096', '1M', ['write -P 0x61 0 8k'], 'c1');
  const b = new Uint8Array(readFileSync(path));
  putU64(b, u64(b, 64), BigInt(u64(b, 40)));
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-d', 'c1'], /snapshot 1: its L1 table at 0x[0-9a-f]+ \(1 entries\) overlaps the active L1 table/);
});

test('a snapshot L2 entry naming the active L1 table as data: snapshot -d refuses (it freed the L1 table)', () => {
  // case 506: the -1 on that "data cluster" dropped the active L1 table's refcount to 0, so the
  // next allocation would have overwritten it (qemu-img 7.2 frees it too).
  const path = image('l2l1.qcow2', 'cluster_size=4096', '1M', ['write -P 0x71 0 8k'], 'a', ['write -P 0x72 0 4k']);
  const b = new Uint8Array(readFileSync(path));
  const l1 = u64(b, 40);
  const snL1 = u64(b, u64(b, 64));
  const snL2 = entryOff(b, snL1);
  assert.ok(snL2 !== entryOff(b, l1), 'the write should have given the active tree its own L2 table');
  putU64(b, snL2 + 8, BigInt(l1));
  writeFileSync(path, b);
  refusedUnchanged(path, ['snapshot', '-d', 'a'], new RegExp(`cluster 0x${l1.toString(16)} holds the active L1 table but its refcount would drop to 0`));
});

// fuzz seed 120083328 cases 96, 680, 793: a damaged snapshot L2 entry naming a cluster that other
// tables use, without its refcount counting it. Deleting the snapshot lowers that cluster once for
// the damaged entry too, to 1 while a shared active L2 table still names it; qemu-img 7.2 then
// sets OFLAG_COPIED on it (a guest write would change snapshot b's data in place), and qimg left
// its flag clear, one qemu-img check error more. Now the delete is refused.

/** 512-byte clusters: snapshot a, then 4k rewritten (the active tree copies L2 table 0), snapshot b. */
function twoSnapshots(name: string, withB = true): { path: string; b: Uint8Array; aL2: number; activeL2: number; l2At200k: number } {
  const path = image(name, 'cluster_size=512', '256k', ['write -P 0x71 0 8k', 'write -P 0x73 200k 1k'], 'a', ['write -P 0x74 4k 1k']);
  if (withB) mustQemuImg(['snapshot', '-c', 'b', path]);
  const b = new Uint8Array(readFileSync(path));
  const l1 = u64(b, 40);
  const aL2 = entryOff(b, u64(b, u64(b, 64))); // snapshot a is the table's first entry
  const activeL2 = entryOff(b, l1);
  assert.ok(aL2 !== activeL2, 'the write should have given the active tree its own L2 table 0');
  return { path, b, aL2, activeL2, l2At200k: entryOff(b, l1 + 6 * 8) };
}

/** The damage is what qemu-img check sees as a refcount one below the references. */
function assertUncounted(path: string): void {
  assert.match(qemuImg(['check', path]).stderr, /ERROR cluster \d+ refcount=(\d+) reference=\d+/);
}

test('a snapshot L2 entry naming data of a table all trees share: snapshot -d refuses (case 96)', () => {
  // l2 entry 9 of a's own table 0 -> the cluster at 200k, with the zero flag (an allocated zero cluster).
  const { path, b, aL2, l2At200k } = twoSnapshots('uncounted-shared.qcow2');
  const data = entryOff(b, l2At200k + 16 * 8);
  putU64(b, aL2 + 9 * 8, BigInt(data) | 1n);
  writeFileSync(path, b);
  assertUncounted(path);
  refusedUnchanged(path, ['snapshot', '-d', 'a'], new RegExp(`cluster 0x${data.toString(16)} is data of the active L2 table at 0x${l2At200k.toString(16)}, which 2 L1 tables share, but its refcount would be 1`));
});

test('a snapshot L2 entry naming data of its own table again: snapshot -d refuses (case 680)', () => {
  // a's table 0 names the cluster of guest 1.5k twice (entries 3 and 8); the active copy of
  // table 0, which the delete does not walk, still names it.
  const { path, b, aL2, activeL2 } = twoSnapshots('uncounted-twice.qcow2');
  const data = entryOff(b, aL2 + 3 * 8);
  assert.is(entryOff(b, activeL2 + 3 * 8), data);
  putU64(b, aL2 + 8 * 8, 0x8000000000000000n | BigInt(data));
  writeFileSync(path, b);
  assertUncounted(path);
  refusedUnchanged(path, ['snapshot', '-d', 'a'], new RegExp(`cluster 0x${data.toString(16)} is data of the active L2 table at 0x${activeL2.toString(16)}, which 2 L1 tables share, but its refcount would be 1`));
});

test('an entry with reserved bits in an L2 table all trees share: snapshot -d refuses (case 793)', () => {
  // entry 13 of the table for 192k..224k = guest 1.5k's cluster | 0x15b (bits 1-8 are reserved;
  // with 512-byte clusters there are no offset bits below the cluster size to find it unaligned).
  const { path, b, aL2, l2At200k } = twoSnapshots('uncounted-reserved.qcow2');
  const data = entryOff(b, aL2 + 3 * 8);
  putU64(b, l2At200k + 13 * 8, BigInt(data) | 0x15bn);
  writeFileSync(path, b);
  assertUncounted(path);
  refusedUnchanged(path, ['snapshot', '-d', 'a'], new RegExp(`cluster 0x${data.toString(16)} is data of the active L2 table at 0x[0-9a-f]+, which 2 L1 tables share, but its refcount would be 1`));
});

test('a snapshot L2 entry naming data only the active tree still uses: snapshot -d refuses to free it', () => {
  // As case 96 without snapshot b: the delete would take the cluster at 200k to refcount 0 while
  // the active tree uses it (qemu-img 7.2 frees it; the next allocation would overwrite it).
  const { path, b, aL2, l2At200k } = twoSnapshots('uncounted-freed.qcow2', false);
  const data = entryOff(b, l2At200k + 16 * 8);
  putU64(b, aL2 + 9 * 8, BigInt(data));
  writeFileSync(path, b);
  assertUncounted(path);
  refusedUnchanged(path, ['snapshot', '-d', 'a'], new RegExp(`cluster 0x${data.toString(16)} is data of the active L2 table at 0x${l2At200k.toString(16)} but its refcount would be 0`));
});

/** A one-snapshot image whose snapshot's l1_size is 0x7fffffff (a 16 GiB table far past the file's end). */
function oversizedSnapshotL1(name: string): string {
  const path = image(name, 'cluster_size=4096', '1M', ['write -P 0x5a 0 64k'], 'r', ['write -P 0x5b 128k 4k']);
  const b = new Uint8Array(readFileSync(path));
  putU32(b, u64(b, 64) + 8, 0x7fffffff); // first snapshot table entry: l1_size
  writeFileSync(path, b);
  return path;
}

test('a snapshot whose l1_size is too large: snapshot -c refuses (QEMU: overlap with the inactive L1 table) (seed 90210 case 952)', () => {
  // qimg created the snapshot: the oversized table was left out of the allocator's protection,
  // where QEMU's overlap check takes its declared size and refuses every allocation inside it.
  const path = oversizedSnapshotL1('l1big-create.qcow2');
  const copy = join(dir, 'l1big-create-qemu.qcow2');
  writeFileSync(copy, readFileSync(path));
  const q = qemuImg(['snapshot', '-c', 'x', copy]);
  assert.is.not(q.status, 0, 'qemu-img refuses too');
  assert.match(q.stderr, /overlaps with inactive L1 table/);
  refusedUnchanged(path, ['snapshot', '-c', 'x'], /^qimg: Could not create snapshot 'x': '.*l1big-create\.qcow2': preventing invalid write on metadata at 0x[0-9a-f]+ \(overlaps with the L1 table of snapshot 1, whose l1_size 0x7fffffff is too large\)/);
});

test('a snapshot whose l1_size is too large: a resize that must grow the L1 table refuses, one that need not succeeds', () => {
  const path = oversizedSnapshotL1('l1big-resize.qcow2');
  const before = readFileSync(path);
  const grow = qimg(['resize', path, '+10G']);
  assert.is(grow.status, 1, grow.stderr);
  assert.match(grow.stderr, /^qimg: '.*l1big-resize\.qcow2': preventing invalid write on metadata at 0x[0-9a-f]+ \(overlaps with the L1 table of snapshot 1/);
  assert.is(grow.stderr.trim().split('\n').length, 1, grow.stderr);
  assert.ok(Buffer.compare(before, readFileSync(path)) === 0, 'the refused resize changed the file');
  // qemu-img agrees on both: the same growth fails there, a small one (the L1 table has room) works.
  const copy = join(dir, 'l1big-resize-qemu.qcow2');
  writeFileSync(copy, before);
  assert.is.not(qemuImg(['resize', copy, '+10G']).status, 0);
  const small = qimg(['resize', path, '+1M']);
  assert.is(small.status, 0, small.stderr);
  assert.is(qemuImg(['info', '--output=json', path]).stdout.includes('"virtual-size": 2097152'), true);
});

test('deleting a snapshot whose l1_size is too large: refused with qemu-img\'s words', () => {
  const path = oversizedSnapshotL1('l1big-delete.qcow2');
  const copy = join(dir, 'l1big-delete-qemu.qcow2');
  writeFileSync(copy, readFileSync(path));
  const q = qemuImg(['snapshot', '-d', 'r', copy]);
  assert.is(q.stderr.trim(), "qemu-img: Could not delete snapshot 'r': Snapshot L1 table too large");
  refusedUnchanged(path, ['snapshot', '-d', 'r'], /^qimg: Could not delete snapshot 'r': Snapshot L1 table too large$/m);
});

/** A one-snapshot image (512 KiB, 4 KiB clusters) whose snapshot's disk_size is `size`. */
function snapshotDiskSize(name: string, size: bigint): string {
  const path = image(name, 'cluster_size=4096', '512K', ['write -P 0x31 0 8k'], 's');
  const b = new Uint8Array(readFileSync(path));
  putU64(b, u64(b, 64) + 40 + 8, size); // first entry: extra data at 40, disk_size its second field
  writeFileSync(path, b);
  return path;
}

test('snapshot -a to a disk_size past what the L1 table covers grows the L1 table as QEMU\'s resize does (seed 5150 case 764)', () => {
  // qimg set the 2 GiB size and kept the snapshot's one-entry L1 table: "L1 table is too small"
  // on every later open.
  const path = snapshotDiskSize('disksize-grow.qcow2', 1n << 31n);
  const copy = join(dir, 'disksize-grow-qemu.qcow2');
  writeFileSync(copy, readFileSync(path));
  mustQemuImg(['snapshot', '-a', 's', copy]);
  const r = qimg(['snapshot', '-a', 's', path]);
  assert.is(r.status, 0, r.stderr);
  const c = qemuImg(['check', path]);
  assert.is(c.status, 0, c.stdout + c.stderr);
  assert.match(qemuImg(['info', path]).stdout, /virtual size: 2 GiB \(2147483648 bytes\)/);
  const cmp = qemuImg(['compare', copy, path]);
  assert.is(cmp.status, 0, cmp.stdout + cmp.stderr);
});

test('snapshot -a to a disk_size QEMU cannot resize to: refused with its reasons, file unchanged', () => {
  const odd = snapshotDiskSize('disksize-odd.qcow2', (1n << 21n) + 100n);
  refusedUnchanged(odd, ['snapshot', '-a', 's'], /^qimg: Could not apply snapshot 's': Failed to load snapshot: The new size must be a multiple of 512$/m);
  const big = snapshotDiskSize('disksize-big.qcow2', 1n << 50n);
  refusedUnchanged(big, ['snapshot', '-a', 's'], /^qimg: Could not apply snapshot 's': Failed to load snapshot: Failed to grow the L1 table: File too large$/m);
  // qemu-img refuses both too.
  for (const p of [odd, big]) assert.is(qemuImg(['snapshot', '-a', 's', p]).status, 1);
});

test('snapshot -a clears OFLAG_COPIED set by damage in an L2 table the trees share, as QEMU does (seed 5150 case 1096)', () => {
  // qimg took every shared table's flags to be clear and did not read them: the flag stayed set
  // on a cluster with refcount 2, and the next guest write would overwrite it in place.
  const path = image('copied-shared.qcow2', 'cluster_size=4096', '1M', ['write -P 0x41 0 16k'], 's');
  const b = new Uint8Array(readFileSync(path));
  const l2 = entryOff(b, u64(b, 40));
  b[l2 + 8] = b[l2 + 8]! | 0x80; // entry 1: OFLAG_COPIED
  writeFileSync(path, b);
  assert.match(qemuImg(['check', path]).stderr, /ERROR OFLAG_COPIED data cluster: l2_entry=80000000000[0-9a-f]+ refcount=2/);
  const copy = join(dir, 'copied-shared-qemu.qcow2');
  writeFileSync(copy, readFileSync(path));
  mustQemuImg(['snapshot', '-a', 's', copy]);
  assert.is(qemuImg(['check', copy]).status, 0, 'qemu-img\'s apply leaves a clean image');
  const r = qimg(['snapshot', '-a', 's', path]);
  assert.is(r.status, 0, r.stderr);
  const c = qemuImg(['check', path]);
  assert.is(c.status, 0, c.stdout + c.stderr);
  assert.is(new Uint8Array(readFileSync(path))[l2 + 8]! & 0x80, 0);
});

test('a vm_state_size past 2^53: snapshot -l and info print what qemu-img prints, snapshot -c keeps the entry as qemu-img does', () => {
  // qimg refused to open such an image ("vm_state_size is too large") where qemu-img lists it.
  const path = image('vmstate-wide.qcow2', 'cluster_size=4096', '512K', ['write -P 0x31 0 8k'], 's');
  const b = new Uint8Array(readFileSync(path));
  const entry = u64(b, 64);
  putU64(b, entry + 40, 2n ** 62n + 12345n); // extra data: vm_state_size_large
  writeFileSync(path, b);
  for (const args of [['snapshot', '-l'], ['info'], ['info', '--output=json']]) {
    const q = mustQemuImg([...args, path]);
    const m = qimg([...args, path]);
    assert.is(m.status, 0, m.stderr);
    assert.is(m.stdout, q, args.join(' '));
  }
  const copy = join(dir, 'vmstate-wide-qemu.qcow2');
  writeFileSync(copy, b);
  mustQemuImg(['snapshot', '-c', 't', copy]);
  const r = qimg(['snapshot', '-c', 't', path]);
  assert.is(r.status, 0, r.stderr);
  const firstEntry = (f: string) => {
    const d = new Uint8Array(readFileSync(f));
    return Array.from(d.subarray(u64(d, 64), u64(d, 64) + 72));
  };
  assert.equal(firstEntry(path), firstEntry(copy));
  assert.is(qemuImg(['check', path]).status, 0);
});

test('rebase -b "" on an image without a backing file changes nothing, as qemu-img (seed 5150 case 1456)', () => {
  // qimg rewrote the header anyway (adding a feature name table the damaged header lacked); with
  // a snapshot table naming cluster 0 as an L2 table, that rewrite added 35 corruptions.
  const path = image('flatten-unbacked.qcow2', 'cluster_size=4096', '1M', ['write -P 0x21 0 8k'], 's');
  const b = new Uint8Array(readFileSync(path));
  b.fill(0, 112, 4096); // no header extensions after the 112-byte v3 header (no feature name table)
  writeFileSync(path, b);
  for (const unsafe of [false, true]) {
    const args = unsafe ? ['rebase', '-u', '-b', ''] : ['rebase', '-b', ''];
    const copy = join(dir, 'flatten-unbacked-qemu.qcow2');
    writeFileSync(copy, b);
    mustQemuImg([...args, copy]);
    assert.ok(Buffer.compare(readFileSync(copy), Buffer.from(b)) === 0, 'qemu-img leaves it unchanged');
    const r = qimg([...args, path]);
    assert.is(r.status, 0, r.stderr);
    assert.ok(Buffer.compare(readFileSync(path), Buffer.from(b)) === 0, `qimg ${args.join(' ')} changed the file`);
  }
});

test('a snapshot L1 table on the active L1 table: rebase refuses before its first write (seed 5150 case 460)', () => {
  // qemu-img's overlap check refuses the first write (and marks the image corrupt); qimg copied
  // the backing data in and rewrote the active L1 the snapshot shares: 63 new corruptions.
  const base = join(dir, 'l1share-base.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '1M']);
  mustQemuIo(['-f', 'qcow2', '-c', 'write -P 0xa1 0 256k', base]);
  const path = join(dir, 'l1share.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'l1share-base.qcow2', '-F', 'qcow2', path, '1M']);
  mustQemuImg(['snapshot', '-c', 'o', path]);
  const b = new Uint8Array(readFileSync(path));
  putU64(b, u64(b, 64), BigInt(u64(b, 40))); // snapshot 1's l1_table_offset = the active L1's
  writeFileSync(path, b);
  const copy = join(dir, 'l1share-qemu.qcow2');
  writeFileSync(copy, b);
  assert.is.not(qemuImg(['rebase', '-b', '', copy]).status, 0, 'qemu-img refuses too');
  refusedUnchanged(path, ['rebase', '-b', ''], /snapshot 1: its L1 table at 0x[0-9a-f]+ \(\d+ entries\) overlaps the active L1 table/);
});

test('a header rewrite at 4 KiB clusters adds no feature name table, as qemu-img (seed 31337 case 1272)', () => {
  // qemu-img 7.2 writes none into images with clusters of 4 KiB or less; qimg's rebase added one,
  // and on an image whose damaged snapshot L1 names cluster 0 as an L2 table that is 35 new errors.
  const base = join(dir, 'ft-base.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '1M']);
  for (const [name, args] of [
    ['unsafe', ['rebase', '-u', '-b', '']],
    ['flatten', ['rebase', '-b', '']],
  ] as Array<[string, string[]]>) {
    const path = join(dir, `ft-${name}.qcow2`);
    const copy = join(dir, `ft-${name}-qemu.qcow2`);
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'ft-base.qcow2', '-F', 'qcow2', path, '1M']);
    writeFileSync(copy, readFileSync(path));
    mustQemuImg([...args, copy]);
    const r = qimg([...args, path]);
    assert.is(r.status, 0, r.stderr);
    assert.equal(Array.from(readFileSync(path).subarray(0, 4096)), Array.from(readFileSync(copy).subarray(0, 4096)), `${name}: header cluster`);
  }
});

test.run();
