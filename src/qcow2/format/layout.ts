// Every qcow2 on-disk offset, mask, feature bit and size cap, named once (spec: docs/interop/qcow2.rst).

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"

// Header field offsets (big-endian).
export const H_MAGIC = 0;
export const H_VERSION = 4;
export const H_BACKING_FILE_OFFSET = 8;
export const H_BACKING_FILE_SIZE = 16;
export const H_CLUSTER_BITS = 20;
export const H_SIZE = 24;
export const H_CRYPT_METHOD = 32;
export const H_L1_SIZE = 36;
export const H_L1_TABLE_OFFSET = 40;
export const H_REFCOUNT_TABLE_OFFSET = 48;
export const H_REFCOUNT_TABLE_CLUSTERS = 56;
export const H_NB_SNAPSHOTS = 60;
export const H_SNAPSHOTS_OFFSET = 64;
export const H_INCOMPATIBLE_FEATURES = 72;
export const H_COMPATIBLE_FEATURES = 80;
export const H_AUTOCLEAR_FEATURES = 88;
export const H_REFCOUNT_ORDER = 96;
export const H_HEADER_LENGTH = 100;
export const H_COMPRESSION_TYPE = 104;

export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** What QEMU writes for v3: through compression_type plus 7 bytes of padding. */
export const V3_HEADER_LENGTH = 112;

// Incompatible feature bits.
export const INCOMPAT_DIRTY = 0;
export const INCOMPAT_CORRUPT = 1;
export const INCOMPAT_DATA_FILE = 2;
export const INCOMPAT_COMPRESSION = 3;
export const INCOMPAT_EXTL2 = 4;
// Compatible feature bits.
export const COMPAT_LAZY_REFCOUNTS = 0;
// Autoclear feature bits.
export const AUTOCLEAR_BITMAPS = 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1;

export const FEATURE_INCOMPATIBLE = 0;
export const FEATURE_COMPATIBLE = 1;
export const FEATURE_AUTOCLEAR = 2;

/** The names QEMU writes into the feature name table, by (type, bit). */
export const KNOWN_FEATURES: ReadonlyArray<{ type: number; bit: number; name: string }> = [
  { type: FEATURE_INCOMPATIBLE, bit: INCOMPAT_DIRTY, name: 'dirty bit' },
  { type: FEATURE_INCOMPATIBLE, bit: INCOMPAT_CORRUPT, name: 'corrupt bit' },
  { type: FEATURE_INCOMPATIBLE, bit: INCOMPAT_DATA_FILE, name: 'external data file' },
  { type: FEATURE_INCOMPATIBLE, bit: INCOMPAT_COMPRESSION, name: 'compression type' },
  { type: FEATURE_INCOMPATIBLE, bit: INCOMPAT_EXTL2, name: 'extended L2 entries' },
  { type: FEATURE_COMPATIBLE, bit: COMPAT_LAZY_REFCOUNTS, name: 'lazy refcounts' },
  { type: FEATURE_AUTOCLEAR, bit: AUTOCLEAR_BITMAPS, name: 'bitmaps' },
  { type: FEATURE_AUTOCLEAR, bit: AUTOCLEAR_DATA_FILE_RAW, name: 'raw external data' },
];
export const KNOWN_INCOMPATIBLE_MASK = 0x1fn;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

// Header extensions.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;
export const EXT_HEADER_BYTES = 8; // type + length
export const FEATURE_TABLE_ENTRY_BYTES = 48;
export const FEATURE_NAME_BYTES = 46;
export const BITMAPS_EXT_BYTES = 24;
export const CRYPTO_EXT_BYTES = 16;

// Limits QEMU enforces when opening.
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MIN_EXTL2_CLUSTER_BITS = 14;
export const MAX_BACKING_FILE_NAME = 1023;
export const MAX_REFCOUNT_ORDER = 6;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_L1_ENTRIES = MAX_L1_BYTES / 8;
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_SNAPSHOT_NAME_BYTES = 255; // what `snapshot -c` keeps of a longer name
export const MAX_BITMAPS = 65535;
/** Offsets in L1/L2/refcount tables are 56-bit; JS numbers are exact only below 2^53. */
export const MAX_SAFE_OFFSET = Number.MAX_SAFE_INTEGER;

// Table entries: 64-bit big-endian words, read as (hi, lo) uint32 halves.
// L1 entry: bits 9-55 L2 offset, 63 COPIED.  L2 entry: bits 0-61 descriptor, 62 COMPRESSED, 63 COPIED.
export const OFLAG_COPIED_HI = 0x80000000; // bit 63 in the high word
export const OFLAG_COMPRESSED_HI = 0x40000000; // bit 62 in the high word
export const OFLAG_ZERO_LO = 0x1; // bit 0 (standard descriptor, v3 without extended L2)
/** Bits 9-55: the offset field of L1, L2 (standard) and refcount table entries. */
export const OFFSET_MASK_HI = 0x00ffffff;
export const OFFSET_MASK_LO = 0xfffffe00;
/** L1 entry reserved bits: 0-8 and 56-62. */
export const L1E_RESERVED_HI = 0x7f000000;
export const L1E_RESERVED_LO = 0x000001ff;
/** Standard L2 descriptor reserved bits: 1-8 and 56-61. */
export const L2E_RESERVED_HI = 0x3f000000;
export const L2E_RESERVED_LO = 0x000001fe;
/** Refcount table entry reserved bits: 0-8. */
export const REFT_RESERVED_LO = 0x000001ff;

export const COMPRESSED_SECTOR_SIZE = 512;
export const SUBCLUSTERS_PER_CLUSTER = 32;

// Snapshot table entry.
export const SN_L1_TABLE_OFFSET = 0;
export const SN_L1_SIZE = 8;
export const SN_ID_STR_SIZE = 12;
export const SN_NAME_SIZE = 14;
export const SN_DATE_SEC = 16;
export const SN_DATE_NSEC = 20;
export const SN_VM_CLOCK_NSEC = 24;
export const SN_VM_STATE_SIZE = 32;
export const SN_EXTRA_DATA_SIZE = 36;
export const SN_HEADER_BYTES = 40;
// Extra data fields, relative to the start of the extra data.
export const SN_EXTRA_VM_STATE_SIZE_LARGE = 0;
export const SN_EXTRA_DISK_SIZE = 8;
export const SN_EXTRA_ICOUNT = 16;
/** What QEMU writes: vm_state_size_large, disk_size, icount. */
export const SN_EXTRA_BYTES_WRITTEN = 24;
/** v3 images must carry extra data at least through disk_size. */
export const SN_EXTRA_V3_MIN_BYTES = 16;
