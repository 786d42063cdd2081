// Snapshot table codec on a hand-written two-entry table: fields, extra data, 8-byte padding,
// the bytes encode writes back, and the errors for a table that breaks off or overreaches.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bytes, text } from './literal.js';
import {
  decodeSnapshotTable,
  encodeSnapshotTable,
  snapshotEntryBytes,
  vmStateSize,
  type SnapshotEntry,
} from '../../src/qcow2/format/snapshot-table.js';
import { QimgError } from '../../src/qcow2/errors.js';

const ff8 = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

const TABLE_OFFSET = 0x50000;

const ENTRY0 = bytes(
  [0, 0, 0, 0, 0, 0x05, 0, 0], //              0 l1_table_offset 0x50000
  [0, 0, 0, 0x02], //                          8 l1_size 2
  [0, 0x01], //                               12 id_str_size 1
  [0, 0x05], //                               14 name_size 5
  [0x65, 0, 0, 0], //                         16 date_sec 0x65000000
  [0x07, 0x5b, 0xcd, 0x15], //                20 date_nsec 123456789
  [0, 0, 0, 0x01, 0x2a, 0x05, 0xf2, 0], //    24 vm_clock_nsec 5000000000
  [0, 0, 0, 0], //                            32 vm_state_size 0
  [0, 0, 0, 0x18], //                         36 extra_data_size 24
  [0, 0, 0, 0, 0, 0, 0, 0], //                40 extra: vm_state_size_large 0
  [0, 0, 0, 0, 0x40, 0, 0, 0], //             48 extra: disk_size 1 GiB
  ff8, //                                     56 extra: icount -1 (none)
  text('1'), //                               64 id "1"
  text('first'), //                           65 name "first"
  [0, 0], //                                  70 padding to 72
);

const ENTRY1_HEAD = bytes(
  [0, 0, 0, 0, 0, 0x07, 0, 0], //              0 l1_table_offset 0x70000
  [0, 0, 0, 0x01], //                          8 l1_size 1
  [0, 0x02], //                               12 id_str_size 2
  [0, 0x03], //                               14 name_size 3
  [0x65, 0, 0x01, 0], //                      16 date_sec 0x65000100
  [0, 0, 0, 0], //                            20 date_nsec 0
  [0x80, 0, 0, 0, 0, 0, 0, 0x01], //          24 vm_clock_nsec 0x8000000000000001
  [0, 0, 0, 0], //                            32 vm_state_size 0: the size (8 GiB) does not fit (what qemu-img writes)
);
const ENTRY1 = bytes(
  ENTRY1_HEAD,
  [0, 0, 0, 0x10], //                         36 extra_data_size 16 (no icount)
  [0, 0, 0, 0x02, 0, 0, 0, 0], //             40 extra: vm_state_size_large 8 GiB
  [0, 0, 0, 0, 0, 0x10, 0, 0], //             48 extra: disk_size 1 MiB
  text('10'), //                              56 id "10"
  text('two'), //                             58 name "two"
  [0, 0, 0], //                               61 padding to 64
);
const TABLE = bytes(ENTRY0, ENTRY1); // entry 1 starts at 72

function refusal(fn: () => unknown, message: string | RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  if (caught === undefined) assert.unreachable(`expected ${String(message)}`);
  assert.instance(caught, QimgError);
  assert.is((caught as QimgError).code, 'BAD_IMAGE');
  if (typeof message === 'string') assert.is((caught as Error).message, message);
  else assert.match((caught as Error).message, message);
}

test('literal sizes: entries padded to 8', () => {
  assert.is(ENTRY0.length, 72);
  assert.is(ENTRY1.length, 64);
});

test('two-entry table decoded', () => {
  const { entries, byteLength } = decodeSnapshotTable(TABLE, 2, TABLE_OFFSET);
  assert.is(byteLength, 136);
  assert.is(entries.length, 2);
  const [a, b] = entries as [SnapshotEntry, SnapshotEntry];

  assert.is(a.l1TableOffset, 0x50000);
  assert.is(a.l1Size, 2);
  assert.is(a.id, '1');
  assert.is(a.name, 'first');
  assert.is(a.dateSec, 0x65000000);
  assert.is(a.dateNsec, 123456789);
  assert.is(a.vmClockNsec, 5000000000n);
  assert.is(a.vmStateSize32, 0);
  assert.is(a.vmStateSizeLarge, 0);
  assert.is(a.diskSize, 2 ** 30);
  assert.is(a.icount, null, 'icount -1 means none');
  assert.equal(Array.from(a.extraData), Array.from(ENTRY0.subarray(40, 64)));
  assert.is(vmStateSize(a), 0);

  assert.is(b.l1TableOffset, 0x70000);
  assert.is(b.l1Size, 1);
  assert.is(b.id, '10');
  assert.is(b.name, 'two');
  assert.is(b.dateSec, 0x65000100);
  assert.is(b.dateNsec, 0);
  assert.is(b.vmClockNsec, 0x8000000000000001n);
  assert.is(b.vmStateSize32, 0);
  assert.is(b.vmStateSizeLarge, 2 ** 33);
  assert.is(b.diskSize, 2 ** 20);
  assert.is(b.icount, null, 'no icount in 16 bytes of extra data');
  assert.is(b.extraData.length, 16);
  assert.is(vmStateSize(b), 2 ** 33, 'the 64-bit size wins');
});

test('icount other than -1 is kept', () => {
  const t = ENTRY0.slice();
  t.set([0, 0, 0, 0, 0, 0, 0x30, 0x39], 56); // icount 12345
  assert.is(decodeSnapshotTable(t, 1, 0).entries[0]!.icount, 12345n);
  t.set([0, 0, 0, 0, 0, 0, 0, 0], 56); // what qemu-img snapshot -c writes
  assert.is(decodeSnapshotTable(t, 1, 0).entries[0]!.icount, 0n);
});

test('entries with no extra data: sizes from the 32-bit field, no disk size', () => {
  const e = bytes(
    ENTRY1_HEAD.subarray(0, 32),
    [0, 0, 0x10, 0], //                        32 vm_state_size 4096
    [0, 0, 0, 0], //                           36 extra_data_size 0
    text('10'), //                             40 id
    text('two'), //                            42 name
    [0, 0, 0], //                              45 padding to 48
  );
  const { entries, byteLength } = decodeSnapshotTable(e, 1, 0);
  assert.is(byteLength, 48);
  const s = entries[0]!;
  assert.is(s.vmStateSizeLarge, null);
  assert.is(s.diskSize, null);
  assert.is(s.icount, null);
  assert.is(vmStateSize(s), 4096);
  assert.is(s.name, 'two');
  assert.throws(() => encodeSnapshotTable([s]), (err: unknown) => err instanceof QimgError && err.code === 'USAGE');
});

test('encode writes QEMU form: entry 0 unchanged, entry 1 gains icount -1 and is padded', () => {
  const { entries } = decodeSnapshotTable(TABLE, 2, TABLE_OFFSET);
  const expected = bytes(
    ENTRY0,
    ENTRY1_HEAD,
    [0, 0, 0, 0x18], //                       108 extra_data_size 24
    [0, 0, 0, 0x02, 0, 0, 0, 0], //           112 vm_state_size_large 8 GiB
    [0, 0, 0, 0, 0, 0x10, 0, 0], //           120 disk_size 1 MiB
    ff8, //                                   128 icount -1
    text('10'), //                            136 id
    text('two'), //                           138 name
    [0, 0, 0], //                             141 padding to 144
  );
  assert.is(snapshotEntryBytes(entries[0]!), 72);
  assert.is(snapshotEntryBytes(entries[1]!), 72);
  const out = encodeSnapshotTable(entries);
  assert.equal(Array.from(out), Array.from(expected));
});

test('encode/decode round trip keeps every field', () => {
  const first = decodeSnapshotTable(TABLE, 2, TABLE_OFFSET).entries;
  const again = decodeSnapshotTable(encodeSnapshotTable(first), 2, TABLE_OFFSET);
  assert.is(again.byteLength, 144);
  const strip = (e: SnapshotEntry): Omit<SnapshotEntry, 'extraData'> => {
    const { extraData, ...rest } = e;
    void extraData;
    return rest;
  };
  assert.equal(again.entries.map(strip), first.map(strip));
  // And once in QEMU form, encoding is a fixed point.
  assert.equal(Array.from(encodeSnapshotTable(again.entries)), Array.from(encodeSnapshotTable(first)));
});

test('unknown extra data past the 24 known bytes is kept', () => {
  const e = bytes(
    ENTRY0.subarray(0, 36),
    [0, 0, 0, 0x20], //                        36 extra_data_size 32
    ENTRY0.subarray(40, 64), //                40 known extra fields
    [1, 2, 3, 4, 5, 6, 7, 8], //               64 a future field
    text('1'), //                              72 id
    text('first'), //                          73 name
    [0, 0], //                                 78 padding to 80
  );
  const { entries } = decodeSnapshotTable(e, 1, 0);
  assert.is(entries[0]!.extraData.length, 32);
  assert.is(entries[0]!.name, 'first');
  assert.equal(Array.from(encodeSnapshotTable(entries)), Array.from(e));
});

test('truncated table: the error names the entry and its offset', () => {
  // Entry 1's fixed part breaks off.
  refusal(() => decodeSnapshotTable(TABLE.subarray(0, 100), 2, TABLE_OFFSET), 'Snapshot table is truncated (snapshot table entry 1 at 0x50048)');
  // Entry 1's name breaks off.
  refusal(() => decodeSnapshotTable(TABLE.subarray(0, 132), 2, TABLE_OFFSET), 'Snapshot table is truncated (snapshot table entry 1 at 0x50048)');
  // Entry 0's fixed part breaks off.
  refusal(() => decodeSnapshotTable(TABLE.subarray(0, 20), 2, TABLE_OFFSET), 'Snapshot table is truncated (snapshot table entry 0 at 0x50000)');
  // One entry more than the table holds.
  refusal(() => decodeSnapshotTable(TABLE, 3, TABLE_OFFSET), 'Snapshot table is truncated (snapshot table entry 2 at 0x50088)');
});

test('extra_data_size 2000: refused naming the entry (1024 accepted)', () => {
  const t = TABLE.slice();
  new DataView(t.buffer).setUint32(72 + 36, 2000);
  // qemu-img 7.2 says "Too much extra metadata in snapshot table entry 1".
  refusal(() => decodeSnapshotTable(t, 2, TABLE_OFFSET), /^Too much extra metadata in snapshot table entry 1\b/);

  const big = new Uint8Array(40 + 1025);
  new DataView(big.buffer).setUint32(36, 1024);
  const { entries } = decodeSnapshotTable(big, 1, 0);
  assert.is(entries[0]!.extraData.length, 1024);
  new DataView(big.buffer).setUint32(36, 1025);
  refusal(() => decodeSnapshotTable(big, 1, 0), /^Too much extra metadata in snapshot table entry 0\b/);
});

test('fields past 2^53 decode (QEMU lists such entries) and encode back byte for byte', () => {
  const e = bytes(
    [0x40, 0, 0, 0, 0, 0, 0x10, 0], //          0 l1_table_offset 2^62 + 0x1000
    ENTRY0.subarray(8, 32),
    [0, 0, 0, 0], //                            32 vm_state_size 0 (the large one does not fit)
    [0, 0, 0, 0x18], //                         36 extra_data_size 24
    [0x40, 0, 0, 0, 0, 0, 0x30, 0x39], //       40 extra: vm_state_size_large 2^62 + 12345
    [0x10, 0, 0, 0, 0, 0, 0, 0x07], //          48 extra: disk_size 2^60 + 7
    ff8, //                                     56 extra: icount -1
    text('1'),
    text('first'),
    [0, 0],
  );
  const [s] = decodeSnapshotTable(e, 1, 0).entries as [SnapshotEntry];
  assert.equal(s.wide, { l1TableOffset: 2n ** 62n + 0x1000n, vmStateSizeLarge: 2n ** 62n + 12345n, diskSize: 2n ** 60n + 7n });
  assert.is(s.l1TableOffset, Number(2n ** 62n + 0x1000n));
  assert.is(vmStateSize(s), Number(2n ** 62n + 12345n), 'the number is only close');
  assert.is.not(BigInt(vmStateSize(s)), 2n ** 62n + 12345n);
  assert.equal(Array.from(encodeSnapshotTable([s])), Array.from(e));
  // A field changed since: its new value is written, not the old exact one.
  s.diskSize = 2 ** 20;
  assert.equal(Array.from(encodeSnapshotTable([s]).subarray(48, 56)), [0, 0, 0, 0, 0, 0x10, 0, 0]);
});

test.run();
