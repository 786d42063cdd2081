// Header decode/validate/encode on byte literals: every field, every extension, and each open-time
// refusal with qemu-img 7.2's exact text (each message was checked against `qemu-img info` on an
// image poked the same way).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bytes, text, zeros } from './literal.js';
import {
  buildExtensions,
  decodeHeader,
  encodeHeader,
  validateHeader,
  type Header,
} from '../../src/qcow2/format/header.js';
import * as L from '../../src/qcow2/format/layout.js';
import { QimgError, type ErrorCode } from '../../src/qcow2/errors.js';

// ---------- literal helpers (independent of src/qcow2/format/bytes.ts) ----------

/** A feature name table entry: type, bit, 46-byte NUL-padded name. */
const feature = (type: number, bit: number, name: string): number[] => [type, bit, ...text(name), ...zeros(46 - text(name).length)];

function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
function poke32(b: Uint8Array, off: number, v: number): Uint8Array {
  const c = b.slice();
  dv(c).setUint32(off, v);
  return c;
}
function poke64(b: Uint8Array, off: number, v: bigint): Uint8Array {
  const c = b.slice();
  dv(c).setBigUint64(off, v);
  return c;
}

function refusal(fn: () => unknown, message: string, code: ErrorCode): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  if (caught === undefined) assert.unreachable(`expected the refusal "${message}"`);
  assert.instance(caught, QimgError);
  assert.is((caught as QimgError).message, message);
  assert.is((caught as QimgError).code, code);
}

const FILE_SIZE = 0x100000;
function open(buf: Uint8Array): Header {
  const h = decodeHeader(buf);
  validateHeader(h, FILE_SIZE);
  return h;
}

// ---------- literals ----------

/** v2, 64 KiB clusters, 5 GiB, backing file "base.qcow2" with a backing format extension. */
const V2 = bytes(
  [0x51, 0x46, 0x49, 0xfb], //                   0 magic "QFI\xfb"
  [0, 0, 0, 2], //                               4 version 2
  [0, 0, 0, 0, 0, 0, 0, 0x60], //                8 backing_file_offset 96
  [0, 0, 0, 0x0a], //                           16 backing_file_size 10
  [0, 0, 0, 0x10], //                           20 cluster_bits 16
  [0, 0, 0, 0x01, 0x40, 0, 0, 0], //            24 size 0x140000000 (5 GiB, above 2^32)
  [0, 0, 0, 0], //                              32 crypt_method 0
  [0, 0, 0, 0x0a], //                           36 l1_size 10 (512 MiB per L2 table)
  [0, 0, 0, 0, 0, 0x03, 0, 0], //               40 l1_table_offset 0x30000
  [0, 0, 0, 0, 0, 0x01, 0, 0], //               48 refcount_table_offset 0x10000
  [0, 0, 0, 0x01], //                           56 refcount_table_clusters 1
  [0, 0, 0, 0], //                              60 nb_snapshots 0
  [0, 0, 0, 0, 0, 0, 0, 0], //                  64 snapshots_offset 0
  [0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 0x05], //   72 ext: backing format, length 5
  [...text('qcow2'), 0, 0, 0], //               80   "qcow2" + 3 bytes padding
  [0, 0, 0, 0, 0, 0, 0, 0], //                  88 ext: end
  text('base.qcow2'), //                        96 backing file name (10 bytes)
);

/** v3, 64 KiB clusters, 64 MiB, header_length 112, every extension qimg knows plus two unknown ones. */
const V3 = bytes(
  [0x51, 0x46, 0x49, 0xfb], //                   0 magic
  [0, 0, 0, 3], //                               4 version 3
  [0, 0, 0, 0, 0, 0, 0x01, 0x80], //             8 backing_file_offset 0x180
  [0, 0, 0, 0x08], //                           16 backing_file_size 8
  [0, 0, 0, 0x10], //                           20 cluster_bits 16
  [0, 0, 0, 0, 0x04, 0, 0, 0], //               24 size 0x4000000 (64 MiB)
  [0, 0, 0, 0x02], //                           32 crypt_method 2 (LUKS)
  [0, 0, 0, 0x01], //                           36 l1_size 1
  [0, 0, 0, 0, 0, 0x03, 0, 0], //               40 l1_table_offset 0x30000
  [0, 0, 0, 0, 0, 0x01, 0, 0], //               48 refcount_table_offset 0x10000
  [0, 0, 0, 0x01], //                           56 refcount_table_clusters 1
  [0, 0, 0, 0x02], //                           60 nb_snapshots 2
  [0, 0, 0, 0, 0, 0x05, 0, 0], //               64 snapshots_offset 0x50000
  [0, 0, 0, 0, 0, 0, 0, 0x05], //               72 incompatible_features: dirty (0) | data file (2)
  [0, 0, 0, 0, 0, 0, 0, 0x01], //               80 compatible_features: lazy refcounts (0)
  [0, 0, 0, 0, 0, 0, 0, 0x01], //               88 autoclear_features: bitmaps (0)
  [0, 0, 0, 0x04], //                           96 refcount_order 4
  [0, 0, 0, 0x70], //                          100 header_length 112
  [0x00], //                                   104 compression_type 0 (zlib)
  zeros(7), //                                 105 padding to header_length
  [0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 0x03], //  112 ext: backing format, length 3
  [...text('raw'), 0, 0, 0, 0, 0], //          120   "raw" + 5 bytes padding
  [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0x05], //  128 ext: unknown 0x12345678, length 5
  [0xde, 0xad, 0xbe, 0xef, 0x01, 0, 0, 0], //  136   data + 3 bytes padding
  [0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 0x90], //  144 ext: feature name table, length 144
  feature(0, 0, 'dirty bit'), //               152   incompatible bit 0
  feature(1, 0, 'lazy refcounts'), //          200   compatible bit 0
  feature(2, 0, 'bitmaps'), //                 248   autoclear bit 0
  [0x23, 0x85, 0x28, 0x75, 0, 0, 0, 0x18], //  296 ext: bitmaps, length 24
  [0, 0, 0, 0x02], //                          304   nb_bitmaps 2
  [0, 0, 0, 0], //                             308   reserved
  [0, 0, 0, 0, 0, 0, 0, 0x48], //              312   bitmap_directory_size 72
  [0, 0, 0, 0, 0, 0x06, 0, 0], //              320   bitmap_directory_offset 0x60000
  [0x05, 0x37, 0xbe, 0x77, 0, 0, 0, 0x10], //  328 ext: full disk encryption header pointer, length 16
  [0, 0, 0, 0, 0, 0x02, 0, 0], //              336   offset 0x20000
  [0, 0, 0, 0, 0, 0, 0x20, 0], //              344   length 0x2000
  [0x44, 0x41, 0x54, 0x41, 0, 0, 0, 0x08], //  352 ext: external data file, length 8
  text('data.raw'), //                         360   "data.raw"
  [0x0b, 0xad, 0xf0, 0x0d, 0, 0, 0, 0], //     368 ext: unknown 0x0badf00d, length 0
  [0, 0, 0, 0, 0, 0, 0, 0], //                 376 ext: end
  text('base.img'), //                         384 backing file name (8 bytes)
);

/** The smallest valid v3 image header: 64 KiB clusters, 64 MiB, no extensions. Poked below. */
const V3_PLAIN = bytes(
  [0x51, 0x46, 0x49, 0xfb], //                   0 magic
  [0, 0, 0, 3], //                               4 version 3
  zeros(8), //                                   8 backing_file_offset 0
  zeros(4), //                                  16 backing_file_size 0
  [0, 0, 0, 0x10], //                           20 cluster_bits 16
  [0, 0, 0, 0, 0x04, 0, 0, 0], //               24 size 64 MiB
  zeros(4), //                                  32 crypt_method 0
  [0, 0, 0, 0x01], //                           36 l1_size 1
  [0, 0, 0, 0, 0, 0x03, 0, 0], //               40 l1_table_offset 0x30000
  [0, 0, 0, 0, 0, 0x01, 0, 0], //               48 refcount_table_offset 0x10000
  [0, 0, 0, 0x01], //                           56 refcount_table_clusters 1
  zeros(4), //                                  60 nb_snapshots 0
  zeros(8), //                                  64 snapshots_offset 0
  zeros(8), //                                  72 incompatible_features 0
  zeros(8), //                                  80 compatible_features 0
  zeros(8), //                                  88 autoclear_features 0
  [0, 0, 0, 0x04], //                           96 refcount_order 4
  [0, 0, 0, 0x70], //                          100 header_length 112
  zeros(8), //                                 104 compression_type 0 + padding
  zeros(8), //                                 112 ext: end
);

// ---------- decode ----------

test('v2 header: every field', () => {
  const h = decodeHeader(V2);
  assert.is(h.version, 2);
  assert.is(h.backingFileOffset, 96);
  assert.is(h.backingFileSize, 10);
  assert.is(h.clusterBits, 16);
  assert.is(h.size, 5 * 2 ** 30);
  assert.is(h.cryptMethod, 0);
  assert.is(h.l1Size, 10);
  assert.is(h.l1TableOffset, 0x30000);
  assert.is(h.refcountTableOffset, 0x10000);
  assert.is(h.refcountTableClusters, 1);
  assert.is(h.nbSnapshots, 0);
  assert.is(h.snapshotsOffset, 0);
  // v2 has none of the v3 fields: QEMU's implied values.
  assert.is(h.incompatibleFeatures, 0n);
  assert.is(h.compatibleFeatures, 0n);
  assert.is(h.autoclearFeatures, 0n);
  assert.is(h.refcountOrder, 4);
  assert.is(h.headerLength, 72);
  assert.is(h.compressionType, 0);
  assert.is(h.tailBytes.length, 0);
  assert.is(h.backingFile, 'base.qcow2');
  assert.is(h.backingFormat, 'qcow2');
  assert.is(h.dataFile, null);
  assert.equal(h.featureNames, []);
  assert.is(h.bitmaps, null);
  assert.is(h.crypto, null);
  assert.is(h.extensions.length, 1);
  assert.is(h.extensions[0]!.type, L.EXT_BACKING_FORMAT);
  assert.equal(Array.from(h.extensions[0]!.data), text('qcow2'));
  validateHeader(h, FILE_SIZE);
});

test('v3 header: every field', () => {
  const h = decodeHeader(V3);
  assert.is(h.version, 3);
  assert.is(h.backingFileOffset, 0x180);
  assert.is(h.backingFileSize, 8);
  assert.is(h.clusterBits, 16);
  assert.is(h.size, 64 * 2 ** 20);
  assert.is(h.cryptMethod, 2);
  assert.is(h.l1Size, 1);
  assert.is(h.l1TableOffset, 0x30000);
  assert.is(h.refcountTableOffset, 0x10000);
  assert.is(h.refcountTableClusters, 1);
  assert.is(h.nbSnapshots, 2);
  assert.is(h.snapshotsOffset, 0x50000);
  assert.is(h.incompatibleFeatures, 5n);
  assert.is(h.compatibleFeatures, 1n);
  assert.is(h.autoclearFeatures, 1n);
  assert.is(h.refcountOrder, 4);
  assert.is(h.headerLength, 112);
  assert.is(h.compressionType, 0);
  assert.equal(Array.from(h.tailBytes), zeros(7));
  validateHeader(h, FILE_SIZE);
});

test('v3 header: extensions decoded and all kept in file order', () => {
  const h = decodeHeader(V3);
  assert.is(h.backingFormat, 'raw');
  assert.is(h.dataFile, 'data.raw');
  assert.equal(h.featureNames, [
    { type: 0, bit: 0, name: 'dirty bit' },
    { type: 1, bit: 0, name: 'lazy refcounts' },
    { type: 2, bit: 0, name: 'bitmaps' },
  ]);
  assert.equal(h.bitmaps, { nbBitmaps: 2, bitmapDirectorySize: 72, bitmapDirectoryOffset: 0x60000 });
  assert.equal(h.crypto, { offset: 0x20000, length: 0x2000 });
  assert.equal(
    h.extensions.map((e) => [e.type, e.data.length]),
    [
      [L.EXT_BACKING_FORMAT, 3],
      [0x12345678, 5],
      [L.EXT_FEATURE_TABLE, 144],
      [L.EXT_BITMAPS, 24],
      [L.EXT_CRYPTO, 16],
      [L.EXT_DATA_FILE, 8],
      [0x0badf00d, 0],
    ],
  );
  // The unknown extension's data verbatim, without its padding.
  assert.equal(Array.from(h.extensions[1]!.data), [0xde, 0xad, 0xbe, 0xef, 0x01]);
});

test('backing file name is read from the cluster at backing_file_offset', () => {
  const h = decodeHeader(V3);
  assert.is(h.backingFile, 'base.img');
  // Only backing_file_size bytes are the name.
  const shorter = decodeHeader(poke32(V3, L.H_BACKING_FILE_SIZE, 4));
  assert.is(shorter.backingFile, 'base');
  assert.is(decodeHeader(V3_PLAIN).backingFile, null);
});

test('a feature name of the full 46 bytes has no NUL and is kept whole', () => {
  const long = 'x'.repeat(46);
  const buf = bytes(V3_PLAIN.subarray(0, 112), [0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 0x30], feature(0, 7, long), zeros(8));
  assert.equal(decodeHeader(buf).featureNames, [{ type: 0, bit: 7, name: long }]);
});

test('header_length 105 is accepted (as QEMU 7.2 does); 104 has no compression_type byte', () => {
  const h105 = open(poke32(V3_PLAIN, L.H_HEADER_LENGTH, 105));
  assert.is(h105.headerLength, 105);
  assert.is(h105.compressionType, 0);
  assert.is(h105.tailBytes.length, 0);
  const h104 = open(poke32(V3_PLAIN, L.H_HEADER_LENGTH, 104));
  assert.is(h104.headerLength, 104);
  assert.is(h104.compressionType, 0);
});

test('header bytes past compression_type are kept and rewritten', () => {
  // header_length 120: bytes 105..119 are future fields.
  const buf = bytes(V3_PLAIN.subarray(0, 104), [0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], zeros(8));
  dv(buf).setUint32(L.H_HEADER_LENGTH, 120);
  const h = decodeHeader(buf);
  assert.is(h.headerLength, 120);
  assert.equal(Array.from(h.tailBytes), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
  assert.equal(Array.from(encodeHeader(h)), Array.from(buf));
});

// ---------- encode ----------

test('encodeHeader(decodeHeader(v2)) gives back the same bytes', () => {
  assert.equal(Array.from(encodeHeader(decodeHeader(V2))), Array.from(V2));
});

test('encodeHeader(decodeHeader(v3)) gives back the same bytes', () => {
  assert.equal(Array.from(encodeHeader(decodeHeader(V3))), Array.from(V3));
  assert.equal(Array.from(encodeHeader(decodeHeader(V3_PLAIN))), Array.from(V3_PLAIN));
});

function fields(h: Header): Record<string, unknown> {
  const { extensions, tailBytes, featureNames, ...rest } = h;
  void extensions;
  void featureNames;
  return { ...rest, tailBytes: Array.from(tailBytes) };
}

test('buildExtensions: known ones in QEMU order, unknown ones kept verbatim and in order', () => {
  const h = decodeHeader(V3);
  const exts = buildExtensions(h);
  assert.equal(
    exts.map((e) => e.type),
    [L.EXT_BACKING_FORMAT, L.EXT_DATA_FILE, L.EXT_CRYPTO, L.EXT_FEATURE_TABLE, L.EXT_BITMAPS, 0x12345678, 0x0badf00d],
  );
  assert.equal(Array.from(exts[0]!.data), text('raw'));
  assert.equal(Array.from(exts[1]!.data), text('data.raw'));
  // Crypto and bitmaps rebuilt from the decoded fields give the file's own bytes back.
  assert.equal(Array.from(exts[2]!.data), Array.from(V3.subarray(336, 352)));
  assert.equal(Array.from(exts[4]!.data), Array.from(V3.subarray(304, 328)));
  assert.equal(Array.from(exts[5]!.data), [0xde, 0xad, 0xbe, 0xef, 0x01]);
  assert.is(exts[6]!.data.length, 0);

  const encoded = encodeHeader({ ...h, extensions: exts });
  const again = decodeHeader(encoded);
  // The name moves behind the longer extension area; everything else is unchanged.
  assert.is(again.backingFileOffset, encoded.length - 8);
  assert.equal({ ...fields(again), backingFileOffset: 0 }, { ...fields(h), backingFileOffset: 0 });
  assert.is(again.backingFile, 'base.img');
  assert.equal(again.featureNames, L.KNOWN_FEATURES.map((f) => ({ ...f })));
  assert.equal(
    again.extensions.map((e) => [e.type, Array.from(e.data)]),
    exts.map((e) => [e.type, Array.from(e.data)]),
  );
});

test('buildExtensions on v2 writes no feature name table', () => {
  const h = decodeHeader(V2);
  const exts = buildExtensions(h);
  assert.equal(exts.map((e) => e.type), [L.EXT_BACKING_FORMAT]);
  const again = decodeHeader(encodeHeader({ ...h, extensions: exts }));
  assert.equal(fields(again), fields(h));
});

// ---------- refusals while decoding ----------

test('refused: bad magic', () => {
  refusal(() => decodeHeader(poke32(V3_PLAIN, 0, 0x514649fa)), 'Image is not in qcow2 format', 'BAD_IMAGE');
});

test('a header cut short reads as zeros past the end (as QEMU reads the file)', () => {
  refusal(() => decodeHeader(V3_PLAIN.subarray(0, 40)), 'qcow2 header too short', 'BAD_IMAGE');
});

test('a header_length past the end of the bytes reads zeros there (as QEMU reads the file)', () => {
  // header_length 4096 over 120 bytes: the fields past 104 and the extensions are zeros.
  const h = decodeHeader(poke32(V3_PLAIN, L.H_HEADER_LENGTH, 4096));
  assert.is(h.headerLength, 4096);
  assert.is(h.compressionType, 0);
  assert.is(h.extensions.length, 0);
  assert.is(h.tailBytes.length, 4096 - 105);
  assert.ok(h.tailBytes.every((x) => x === 0));
  // Still refused past the cluster size.
  refusal(() => decodeHeader(poke32(V3_PLAIN, L.H_HEADER_LENGTH, 0x10008)), 'qcow2 header exceeds cluster size', 'BAD_IMAGE');
});

test('refused: version 4 (and 1)', () => {
  refusal(() => decodeHeader(poke32(V3_PLAIN, L.H_VERSION, 4)), 'Unsupported qcow2 version 4', 'UNSUPPORTED');
  refusal(() => decodeHeader(poke32(V3_PLAIN, L.H_VERSION, 1)), 'Unsupported qcow2 version 1', 'UNSUPPORTED');
});

test('refused: cluster_bits 8 and 22; 9 and 21 accepted', () => {
  refusal(() => decodeHeader(poke32(V3_PLAIN, L.H_CLUSTER_BITS, 8)), 'Unsupported cluster size: 2^8', 'UNSUPPORTED');
  refusal(() => decodeHeader(poke32(V3_PLAIN, L.H_CLUSTER_BITS, 22)), 'Unsupported cluster size: 2^22', 'UNSUPPORTED');
  assert.is(decodeHeader(poke32(V3_PLAIN, L.H_CLUSTER_BITS, 9)).clusterBits, 9);
  assert.is(decodeHeader(poke32(V3_PLAIN, L.H_CLUSTER_BITS, 21)).clusterBits, 21);
});

test('refused: v3 header_length 100', () => {
  refusal(() => decodeHeader(poke32(V3_PLAIN, L.H_HEADER_LENGTH, 100)), 'qcow2 header too short', 'BAD_IMAGE');
});

test('refused: header_length larger than the cluster', () => {
  refusal(() => decodeHeader(poke32(V3_PLAIN, L.H_HEADER_LENGTH, 65544)), 'qcow2 header exceeds cluster size', 'BAD_IMAGE');
  const small = poke32(poke32(V3_PLAIN, L.H_CLUSTER_BITS, 9), L.H_HEADER_LENGTH, 520);
  refusal(() => decodeHeader(small), 'qcow2 header exceeds cluster size', 'BAD_IMAGE');
});

test('refused: backing file name too long (offset 512 + size 2000, or past the cluster)', () => {
  const b = poke32(poke64(V3_PLAIN, L.H_BACKING_FILE_OFFSET, 512n), L.H_BACKING_FILE_SIZE, 2000);
  refusal(() => open(b), 'Backing file name too long', 'BAD_IMAGE');
  // 512-byte clusters: name at 0x100 of 0x101 bytes ends one byte past cluster 0 (virtual size
  // 0, or the L1 table would be too small first: QEMU reads the name after the L1 checks).
  const c = poke64(poke32(poke32(poke64(V3_PLAIN, L.H_BACKING_FILE_OFFSET, 0x100n), L.H_BACKING_FILE_SIZE, 0x101), L.H_CLUSTER_BITS, 9), L.H_SIZE, 0n);
  refusal(() => open(c), 'Backing file name too long', 'BAD_IMAGE');
});

test('refused: backing_file_offset past cluster 0', () => {
  const b = poke32(poke64(V3_PLAIN, L.H_BACKING_FILE_OFFSET, 0x20000n), L.H_BACKING_FILE_SIZE, 4);
  refusal(() => open(b), 'Invalid backing file offset', 'BAD_IMAGE');
});

// ---------- refusals by validateHeader ----------

function validated(buf: Uint8Array, message: string, code: ErrorCode): void {
  const h = decodeHeader(buf); // decodes fine: the refusal is validateHeader's
  refusal(() => validateHeader(h, FILE_SIZE), message, code);
}

test('the unpoked literal passes validateHeader', () => {
  open(V3_PLAIN);
});

test('refused: refcount_order 7; 6 accepted', () => {
  validated(poke32(V3_PLAIN, L.H_REFCOUNT_ORDER, 7), 'Reference count entry width too large; may not exceed 64 bits', 'UNSUPPORTED');
  assert.is(open(poke32(V3_PLAIN, L.H_REFCOUNT_ORDER, 6)).refcountOrder, 6);
});

test('refused: unknown incompatible bits, as one hex mask', () => {
  const inc = (v: bigint): Uint8Array => poke64(V3_PLAIN, L.H_INCOMPATIBLE_FEATURES, v);
  validated(inc(1n << 20n), 'Unsupported qcow2 feature(s): Unknown incompatible feature: 100000', 'UNSUPPORTED');
  validated(inc((1n << 20n) | (1n << 21n)), 'Unsupported qcow2 feature(s): Unknown incompatible feature: 300000', 'UNSUPPORTED');
  // Known bits alongside are not named.
  validated(inc((1n << 20n) | 1n), 'Unsupported qcow2 feature(s): Unknown incompatible feature: 100000', 'UNSUPPORTED');
  validated(inc(1n << 63n), 'Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000', 'UNSUPPORTED');
});

test('unknown compatible and autoclear bits are not refused', () => {
  const b = poke64(poke64(V3_PLAIN, L.H_COMPATIBLE_FEATURES, 0xffffffffffffffffn), L.H_AUTOCLEAR_FEATURES, 0xfffffffffffffff0n);
  const h = open(b);
  assert.is(h.compatibleFeatures, 0xffffffffffffffffn);
  assert.is(h.autoclearFeatures, 0xfffffffffffffff0n);
});

/** V3_PLAIN with a feature name table extension holding `entries`. */
function withFeatureTable(incompatible: bigint, ...entries: number[][]): Uint8Array {
  const table = entries.flat();
  const ext = [0x68, 0x03, 0xf8, 0x57, 0, 0, (table.length >>> 8) & 0xff, table.length & 0xff];
  const buf = bytes(V3_PLAIN.subarray(0, 112), ext, table, zeros(8));
  dv(buf).setBigUint64(L.H_INCOMPATIBLE_FEATURES, incompatible);
  return buf;
}

test("refused: an unknown bit named by the image's own feature name table", () => {
  const b = withFeatureTable(1n << 20n, feature(0, 0, 'dirty bit'), feature(0, 20, 'my new feature'));
  validated(b, 'Unsupported qcow2 feature(s): my new feature', 'UNSUPPORTED');
  // Named and unnamed together: names first, then the rest as a mask (qemu-img 7.2 output).
  const c = withFeatureTable((1n << 20n) | (1n << 21n), feature(0, 20, 'my new feature'));
  validated(c, 'Unsupported qcow2 feature(s): my new feature, Unknown incompatible feature: 200000', 'UNSUPPORTED');
  // A compatible-type entry for the same bit number does not name an incompatible bit.
  const d = withFeatureTable(1n << 20n, feature(1, 20, 'compat one'));
  validated(d, 'Unsupported qcow2 feature(s): Unknown incompatible feature: 100000', 'UNSUPPORTED');
});

test('named unknown features are listed in the order of the feature name table (as qemu-img 7.2 does)', () => {
  // qemu-img 7.2 on this image: "Unsupported qcow2 feature(s): feat twenty-one, feat twenty"
  const b = withFeatureTable((1n << 20n) | (1n << 21n), feature(0, 21, 'feat twenty-one'), feature(0, 20, 'feat twenty'));
  validated(b, 'Unsupported qcow2 feature(s): feat twenty-one, feat twenty', 'UNSUPPORTED');
});

test('refused: l1_size 4194305 (4194304 accepted)', () => {
  validated(poke32(V3_PLAIN, L.H_L1_SIZE, 4194305), 'Active L1 table too large', 'BAD_IMAGE');
  open(poke32(V3_PLAIN, L.H_L1_SIZE, 4194304));
});

test('refused: l1_size too small for the virtual size', () => {
  validated(poke32(V3_PLAIN, L.H_L1_SIZE, 0), 'L1 table is too small', 'BAD_IMAGE');
  // One L2 table of 64 KiB clusters maps 512 MiB: exactly that fits, one byte more does not.
  open(poke64(V3_PLAIN, L.H_SIZE, 0x20000000n));
  validated(poke64(V3_PLAIN, L.H_SIZE, 0x20000001n), 'L1 table is too small', 'BAD_IMAGE');
});

test('refused: unaligned l1_table_offset', () => {
  validated(poke64(V3_PLAIN, L.H_L1_TABLE_OFFSET, 0x30200n), 'Active L1 table offset invalid', 'BAD_IMAGE');
});

test('refused: unaligned refcount_table_offset', () => {
  validated(poke64(V3_PLAIN, L.H_REFCOUNT_TABLE_OFFSET, 0x10200n), 'Reference count table offset invalid', 'BAD_IMAGE');
});

test('refused: refcount_table_clusters 0x100000 and 129 (128 x 64 KiB = 8 MiB accepted)', () => {
  validated(poke32(V3_PLAIN, L.H_REFCOUNT_TABLE_CLUSTERS, 0x100000), 'Reference count table too large', 'BAD_IMAGE');
  validated(poke32(V3_PLAIN, L.H_REFCOUNT_TABLE_CLUSTERS, 129), 'Reference count table too large', 'BAD_IMAGE');
  open(poke32(V3_PLAIN, L.H_REFCOUNT_TABLE_CLUSTERS, 128));
});

test('refused: refcount_table_clusters 0', () => {
  validated(poke32(V3_PLAIN, L.H_REFCOUNT_TABLE_CLUSTERS, 0), 'Image does not contain a reference count table', 'BAD_IMAGE');
});

test('refused: nb_snapshots 70000 (65536 accepted)', () => {
  const withOffset = poke64(V3_PLAIN, L.H_SNAPSHOTS_OFFSET, 0x50000n);
  validated(poke32(withOffset, L.H_NB_SNAPSHOTS, 70000), 'Snapshot table too large', 'BAD_IMAGE');
  validated(poke32(withOffset, L.H_NB_SNAPSHOTS, 65537), 'Snapshot table too large', 'BAD_IMAGE');
  assert.is(open(poke32(withOffset, L.H_NB_SNAPSHOTS, 65536)).nbSnapshots, 65536);
});

test('refused: unaligned snapshots_offset', () => {
  const b = poke32(poke64(V3_PLAIN, L.H_SNAPSHOTS_OFFSET, 0x50200n), L.H_NB_SNAPSHOTS, 1);
  validated(b, 'Snapshot table offset invalid', 'BAD_IMAGE');
});

test('refused: crypt_method 3 (2 accepted)', () => {
  validated(poke32(V3_PLAIN, L.H_CRYPT_METHOD, 3), 'Unsupported encryption method 3', 'UNSUPPORTED');
  assert.is(open(poke32(V3_PLAIN, L.H_CRYPT_METHOD, 2)).cryptMethod, 2);
});

test.run();
