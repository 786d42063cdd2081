// qcow2 header v2/v3 and its extensions: decode, validate against QEMU's open-time limits, encode.

import { QimgError } from '../errors.js';
import { align, decodeString, encodeString, setU32, setU64, setU64n, u32, u64, u64n } from './bytes.js';
import * as L from './layout.js';

export interface HeaderExtension {
  type: number;
  /** The extension's data, verbatim (without padding). */
  data: Uint8Array;
}

export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
}

export interface CryptoExtension {
  offset: number;
  length: number;
}

export interface Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes past compression_type up to header_length (future fields), kept verbatim. */
  tailBytes: Uint8Array;
  /** Every extension in file order, known ones included, so a rewrite keeps them. */
  extensions: HeaderExtension[];
  backingFile: string | null;
  backingFormat: string | null;
  dataFile: string | null;
  featureNames: FeatureName[];
  bitmaps: BitmapsExtension | null;
  crypto: CryptoExtension | null;
  /**
   * 64-bit fields stored above Number.MAX_SAFE_INTEGER, as stored (the number field then holds
   * an approximation no one may use). validateHeader refuses them the way QEMU does, or as
   * unsupported when QEMU would open the image; the checker may accept exact table offsets.
   */
  wide?: WideFields;
  /** An extension error, thrown by validateHeader where QEMU meets it. */
  deferred?: QimgError;
  /** A backing file name error: QEMU reads the name after the extensions and the data file. */
  deferredName?: QimgError;
}

export interface WideFields {
  size?: bigint;
  l1TableOffset?: bigint;
  refcountTableOffset?: bigint;
  snapshotsOffset?: bigint;
}

export function hasIncompat(h: Header, bit: number): boolean {
  return ((h.incompatibleFeatures >> BigInt(bit)) & 1n) === 1n;
}
export function hasCompat(h: Header, bit: number): boolean {
  return ((h.compatibleFeatures >> BigInt(bit)) & 1n) === 1n;
}
export function hasAutoclear(h: Header, bit: number): boolean {
  return ((h.autoclearFeatures >> BigInt(bit)) & 1n) === 1n;
}

/** The number of header bytes needed before cluster_bits is known (v3 header with extensions may be longer). */
export const HEADER_PROBE_BYTES = 4096;

/** True if the bytes start with the qcow2 magic. */
export function isQcow2(buf: Uint8Array): boolean {
  return buf.length >= 4 && u32(buf, L.H_MAGIC) === L.QCOW_MAGIC;
}

/**
 * Decodes the header from the bytes of cluster 0 (or the whole file when it is shorter).
 * Throws BAD_IMAGE / UNSUPPORTED with QEMU's wording for what it refuses on open.
 */
export function decodeHeader(buf: Uint8Array): Header {
  if (buf.length >= 8 && buf.length < L.V3_MIN_HEADER_LENGTH) {
    // A file shorter than the header: QEMU reads zeros past its end.
    const padded = new Uint8Array(L.V3_MIN_HEADER_LENGTH);
    padded.set(buf);
    buf = padded;
  }
  if (buf.length < L.V2_HEADER_LENGTH || u32(buf, L.H_MAGIC) !== L.QCOW_MAGIC) {
    throw new QimgError('BAD_IMAGE', 'Image is not in qcow2 format');
  }
  const version = u32(buf, L.H_VERSION);
  if (version < 2 || version > 3) {
    throw new QimgError('UNSUPPORTED', `Unsupported qcow2 version ${version}`, { field: 'version', value: version });
  }
  const clusterBits = u32(buf, L.H_CLUSTER_BITS);
  if (clusterBits < L.MIN_CLUSTER_BITS || clusterBits > L.MAX_CLUSTER_BITS) {
    throw new QimgError('UNSUPPORTED', `Unsupported cluster size: 2^${clusterBits}`, { field: 'cluster_bits', value: clusterBits });
  }
  const clusterSize = 2 ** clusterBits;

  let headerLength = L.V2_HEADER_LENGTH;
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  if (version === 3) {
    if (buf.length < L.V3_MIN_HEADER_LENGTH) throw new QimgError('BAD_IMAGE', 'qcow2 header too short');
    headerLength = u32(buf, L.H_HEADER_LENGTH);
    if (headerLength < L.V3_MIN_HEADER_LENGTH) {
      throw new QimgError('BAD_IMAGE', 'qcow2 header too short', { field: 'header_length', value: headerLength });
    }
    if (headerLength > clusterSize) {
      throw new QimgError('BAD_IMAGE', 'qcow2 header exceeds cluster size', { field: 'header_length', value: headerLength });
    }
    // The spec asks for a multiple of 8, but QEMU 7.2 opens other lengths, so qimg does too.
    // A header longer than the file: QEMU reads zeros past its end.
    if (buf.length < headerLength) {
      const padded = new Uint8Array(headerLength);
      padded.set(buf);
      buf = padded;
    }
    incompatibleFeatures = u64n(buf, L.H_INCOMPATIBLE_FEATURES);
    compatibleFeatures = u64n(buf, L.H_COMPATIBLE_FEATURES);
    autoclearFeatures = u64n(buf, L.H_AUTOCLEAR_FEATURES);
    refcountOrder = u32(buf, L.H_REFCOUNT_ORDER);
  }
  const compressionType = headerLength > L.H_COMPRESSION_TYPE ? buf[L.H_COMPRESSION_TYPE]! : L.COMPRESSION_ZLIB;
  const tailStart = Math.min(headerLength, L.H_COMPRESSION_TYPE + 1);
  const tailBytes = buf.slice(tailStart, headerLength);

  // Past 2^53 a backing file offset is always beyond cluster 0, which QEMU refuses here.
  if (u32(buf, L.H_BACKING_FILE_OFFSET) > 0x1fffff) throw new QimgError('BAD_IMAGE', 'Invalid backing file offset', { field: 'backing_file_offset' });
  const wide: WideFields = {};
  const w64 = (off: number, key: keyof WideFields): number => {
    const v = u64n(buf, off);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) wide[key] = v;
    return Number(v);
  };
  const h: Header = {
    version,
    backingFileOffset: u64(buf, L.H_BACKING_FILE_OFFSET, 'backing_file_offset'),
    backingFileSize: u32(buf, L.H_BACKING_FILE_SIZE),
    clusterBits,
    size: w64(L.H_SIZE, 'size'),
    cryptMethod: u32(buf, L.H_CRYPT_METHOD),
    l1Size: u32(buf, L.H_L1_SIZE),
    l1TableOffset: w64(L.H_L1_TABLE_OFFSET, 'l1TableOffset'),
    refcountTableOffset: w64(L.H_REFCOUNT_TABLE_OFFSET, 'refcountTableOffset'),
    refcountTableClusters: u32(buf, L.H_REFCOUNT_TABLE_CLUSTERS),
    nbSnapshots: u32(buf, L.H_NB_SNAPSHOTS),
    snapshotsOffset: w64(L.H_SNAPSHOTS_OFFSET, 'snapshotsOffset'),
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    tailBytes,
    extensions: [],
    backingFile: null,
    backingFormat: null,
    dataFile: null,
    featureNames: [],
    bitmaps: null,
    crypto: null,
  };
  if (Object.keys(wide).length) h.wide = wide;

  if (h.backingFileOffset > clusterSize) {
    throw new QimgError('BAD_IMAGE', 'Invalid backing file offset', { field: 'backing_file_offset', value: h.backingFileOffset });
  }
  // Extensions live between the header and the backing file name (or the end of cluster 0).
  // QEMU reads the extensions and the backing file name after validating the tables, so their
  // errors wait for validateHeader.
  const extEnd = Math.min(h.backingFileOffset || clusterSize, buf.length);
  try {
    decodeExtensions(h, buf, headerLength, extEnd);
  } catch (err) {
    if (!(err instanceof QimgError)) throw err;
    h.deferred = err;
    return h;
  }
  try {
    decodeBackingName(h, buf, clusterSize);
  } catch (err) {
    if (!(err instanceof QimgError)) throw err;
    h.deferredName = err;
  }
  return h;
}

function decodeBackingName(h: Header, buf: Uint8Array, clusterSize: number): void {
  if (h.backingFileOffset) {
    if (h.backingFileSize > L.MAX_BACKING_FILE_NAME || h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw new QimgError('BAD_IMAGE', 'Backing file name too long', { field: 'backing_file_size', value: h.backingFileSize });
    }
    if (h.backingFileOffset + h.backingFileSize > buf.length) {
      throw new QimgError('BAD_IMAGE', 'Backing file name lies past the end of the file');
    }
    // QEMU keeps the name as a C string: it ends at the first NUL (an empty one means no backing file).
    const stored = buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
    const nul = stored.indexOf(0);
    h.backingFile = decodeString(nul < 0 ? stored : stored.subarray(0, nul));
  }
}

function decodeExtensions(h: Header, buf: Uint8Array, start: number, end: number): void {
  let off = start;
  while (off + L.EXT_HEADER_BYTES <= end) {
    const type = u32(buf, off);
    const len = u32(buf, off + 4);
    off += L.EXT_HEADER_BYTES;
    // QEMU measures the length before looking at the type: an end marker may be too large too.
    if (len > end - off) throw new QimgError('BAD_IMAGE', 'Header extension too large', { type, offset: off - 8, length: len });
    if (type === L.EXT_END) return;
    const data = buf.slice(off, off + len);
    h.extensions.push({ type, data });
    decodeKnownExtension(h, type, data);
    off += align(len, 8);
  }
  // QEMU tolerates a missing end marker when the area is exhausted.
}

function decodeKnownExtension(h: Header, type: number, data: Uint8Array): void {
  switch (type) {
    case L.EXT_BACKING_FORMAT:
      h.backingFormat = decodeString(data);
      break;
    case L.EXT_DATA_FILE:
      h.dataFile = decodeString(data);
      break;
    case L.EXT_FEATURE_TABLE:
      for (let i = 0; i + L.FEATURE_TABLE_ENTRY_BYTES <= data.length; i += L.FEATURE_TABLE_ENTRY_BYTES) {
        const raw = data.subarray(i + 2, i + 2 + L.FEATURE_NAME_BYTES);
        const nul = raw.indexOf(0);
        h.featureNames.push({ type: data[i]!, bit: data[i + 1]!, name: decodeString(nul < 0 ? raw : raw.subarray(0, nul)) });
      }
      break;
    case L.EXT_BITMAPS:
      if (data.length < L.BITMAPS_EXT_BYTES) throw new QimgError('BAD_IMAGE', 'bitmaps_ext: Invalid extension length');
      h.bitmaps = {
        nbBitmaps: u32(data, 0),
        bitmapDirectorySize: u64(data, 8, 'bitmap_directory_size'),
        bitmapDirectoryOffset: u64(data, 16, 'bitmap_directory_offset'),
      };
      break;
    case L.EXT_CRYPTO:
      if (h.cryptMethod !== L.CRYPT_LUKS) throw new QimgError('BAD_IMAGE', 'CRYPTO header extension only expected with LUKS encryption method');
      if (data.length !== L.CRYPTO_EXT_BYTES) {
        throw new QimgError('BAD_IMAGE', `CRYPTO header extension size ${data.length}, but expected size ${L.CRYPTO_EXT_BYTES}`);
      }
      h.crypto = { offset: u64(data, 0, 'crypto header offset'), length: u64(data, 8, 'crypto header length') };
      break;
    default:
      break; // unknown: kept verbatim in h.extensions
  }
}

/**
 * Names the set bits of a feature mask outside `known`: by the image's own feature name table
 * where it names them, the rest together as one hex mask (QEMU's wording).
 */
export function unknownFeatureNames(h: Header, type: number, mask: bigint, known: bigint): string[] {
  const names: string[] = [];
  let left = mask & ~known;
  // Named ones in the order of the image's table, as QEMU lists them.
  for (const f of h.featureNames) {
    const b = 1n << BigInt(f.bit & 63);
    if (f.type === type && (left & b) !== 0n) {
      names.push(f.name);
      left &= ~b;
    }
  }
  if (left) names.push(`Unknown incompatible feature: ${left.toString(16)}`);
  return names;
}

/**
 * QEMU's open-time checks that need only the header and the file size. Each failure names the field.
 * Structures that need reading (tables' contents) are checked by the engine.
 */
export interface ValidateOptions {
  /**
   * Opening for `check`: table offsets past 2^53 that QEMU accepts are taken when the number is
   * exact (the checker reads such tables as zeros past the end of the file, as QEMU does).
   */
  check?: boolean;
  /**
   * Opened for I/O with no secret (as `check` is): an encrypted image is refused where QEMU's
   * crypto layer asks for the key (LUKS: at its header extension; AES: after the extensions and
   * the data file), and a LUKS image without its header extension where QEMU looks for one.
   */
  noSecrets?: boolean;
}

const INT64_MAX = 2n ** 63n - 1n;
const INT_MAX = 0x7fffffff;

/**
 * QEMU's open-time refusals, in the order qcow2_do_open meets them (the order decides which
 * message a header with several faults gets).
 */
export function validateHeader(h: Header, fileSize: number, opts: ValidateOptions = {}): void {
  const clusterSize = 2 ** h.clusterBits;
  const wide = h.wide ?? {};
  // Compression type first: QEMU validates it while reading the version 3 fields.
  if (h.compressionType > L.COMPRESSION_ZSTD) {
    throw new QimgError('UNSUPPORTED', `qcow2: unknown compression type: ${h.compressionType}`, { field: 'compression_type' });
  }
  if (hasIncompat(h, L.INCOMPAT_COMPRESSION)) {
    if (h.compressionType === L.COMPRESSION_ZLIB) {
      throw new QimgError('BAD_IMAGE', 'qcow2: Compression type incompatible feature bit must not be set', { field: 'compression_type' });
    }
  } else if (h.compressionType !== L.COMPRESSION_ZLIB) {
    throw new QimgError('BAD_IMAGE', 'qcow2: Compression type incompatible feature bit must be set', { field: 'compression_type' });
  }
  const unknown = unknownFeatureNames(h, L.FEATURE_INCOMPATIBLE, h.incompatibleFeatures, L.KNOWN_INCOMPATIBLE_MASK);
  if (unknown.length) {
    throw new QimgError('UNSUPPORTED', `Unsupported qcow2 feature(s): ${unknown.join(', ')}`, { field: 'incompatible_features' });
  }
  if (h.refcountOrder > L.MAX_REFCOUNT_ORDER) {
    throw new QimgError('UNSUPPORTED', 'Reference count entry width too large; may not exceed 64 bits', { field: 'refcount_order' });
  }
  if (hasIncompat(h, L.INCOMPAT_EXTL2) && h.clusterBits < L.MIN_EXTL2_CLUSTER_BITS) {
    // QEMU's open words it by the subcluster (1/32 of a cluster, at least 512 bytes); the
    // "cluster sizes of at least 16384 bytes" wording is create's.
    throw new QimgError('BAD_IMAGE', `Unsupported subcluster size: ${clusterSize / 32}`, { field: 'cluster_bits' });
  }

  const reftableBytes = h.refcountTableClusters * clusterSize;
  if (reftableBytes > L.MAX_REFTABLE_BYTES) {
    throw new QimgError('BAD_IMAGE', 'Reference count table too large', { field: 'refcount_table_clusters' });
  }
  if (h.refcountTableClusters === 0) {
    throw new QimgError('BAD_IMAGE', 'Image does not contain a reference count table', { field: 'refcount_table_clusters' });
  }
  checkTableOffset(wide.refcountTableOffset ?? h.refcountTableOffset, reftableBytes, clusterSize, 'Reference count table offset invalid', 'refcount_table_offset');

  if (h.nbSnapshots > L.MAX_SNAPSHOTS) {
    throw new QimgError('BAD_IMAGE', 'Snapshot table too large', { field: 'nb_snapshots' });
  }
  // The snapshot table's length is only known by reading it; QEMU checks offset alignment and a minimal size.
  checkTableOffset(wide.snapshotsOffset ?? h.snapshotsOffset, h.nbSnapshots * L.SN_HEADER_BYTES, clusterSize, 'Snapshot table offset invalid', 'snapshots_offset');

  if (h.l1Size > L.MAX_L1_ENTRIES) {
    throw new QimgError('BAD_IMAGE', 'Active L1 table too large', { field: 'l1_size' });
  }
  checkTableOffset(wide.l1TableOffset ?? h.l1TableOffset, h.l1Size * 8, clusterSize, 'Active L1 table offset invalid', 'l1_table_offset');
  // QEMU rounds the size up to whole L1 entries in 64-bit unsigned arithmetic (it may wrap).
  const shift = BigInt(h.clusterBits + Math.log2(l2Entries(h.clusterBits, hasIncompat(h, L.INCOMPAT_EXTL2))));
  const size = wide.size ?? BigInt(h.size);
  const needed = ((size + (1n << shift) - 1n) & (2n ** 64n - 1n)) >> shift;
  if (needed > BigInt(INT_MAX)) throw new QimgError('BAD_IMAGE', 'Image is too big', { field: 'size' });
  if (BigInt(h.l1Size) < needed) {
    throw new QimgError('BAD_IMAGE', 'L1 table is too small', { field: 'l1_size' });
  }
  if (h.cryptMethod > L.CRYPT_LUKS) {
    // QEMU prints the field as a signed int.
    throw new QimgError('UNSUPPORTED', `Unsupported encryption method ${h.cryptMethod | 0}`, { field: 'crypt_method' });
  }
  const needKey = () => new QimgError('UNSUPPORTED', "Parameter 'encrypt.key-secret' is required for cipher", { field: 'crypt_method' });
  const luksOpened = opts.noSecrets && h.cryptMethod === L.CRYPT_LUKS && h.crypto !== null;
  // Extensions in file order: a LUKS header extension before a faulty one has asked for its key.
  if (h.deferred) throw luksOpened ? needKey() : h.deferred;
  if (luksOpened) throw needKey();
  // Then the data file: raw external data needs one.
  if (hasAutoclear(h, L.AUTOCLEAR_DATA_FILE_RAW) && !hasIncompat(h, L.INCOMPAT_DATA_FILE)) {
    throw new QimgError('BAD_IMAGE', 'data-file-raw requires a data file', { field: 'autoclear_features' });
  }
  if (opts.noSecrets && h.cryptMethod === L.CRYPT_AES) throw needKey();
  if (opts.noSecrets && h.cryptMethod === L.CRYPT_LUKS) {
    throw new QimgError('BAD_IMAGE', `Missing CRYPTO header for crypt method ${L.CRYPT_LUKS}`, { field: 'crypt_method' });
  }
  if (h.deferredName) throw h.deferredName;
  // Opened by QEMU, but past what qimg represents exactly.
  if (size > INT64_MAX) throw new QimgError('BAD_IMAGE', 'Could not refresh total sector count: File too large', { field: 'size' });
  const unsupported: Array<[keyof WideFields, string, boolean]> = [
    ['size', 'Image size', false],
    ['l1TableOffset', 'l1_table_offset', true],
    ['refcountTableOffset', 'refcount_table_offset', true],
    ['snapshotsOffset', 'snapshots_offset', true],
  ];
  for (const [key, name, table] of unsupported) {
    const v = wide[key];
    if (v === undefined) continue;
    if (table && opts.check && BigInt(Number(v)) === v) continue;
    throw new QimgError('BAD_IMAGE', `${name} is too large (0x${v.toString(16).padStart(16, '0')})`, { field: name });
  }
  void fileSize; // tables past EOF are found when read, as QEMU does
}

/** QEMU's rule for a table: cluster-aligned, and its end must not pass INT64_MAX. */
function checkTableOffset(offset: number | bigint, bytes: number, clusterSize: number, message: string, field: string): void {
  const o = BigInt(offset);
  if (o % BigInt(clusterSize) !== 0n || o + BigInt(bytes) > INT64_MAX) {
    throw new QimgError('BAD_IMAGE', message, { field, value: Number(o) });
  }
}

/** L2 entries per table: 8-byte entries, or 16-byte ones with extended L2. */
export function l2Entries(clusterBits: number, extendedL2: boolean): number {
  return 2 ** clusterBits / (extendedL2 ? 16 : 8);
}

/** L1 entries needed to map `size` bytes. */
export function l1EntriesFor(size: number, clusterBits: number, extendedL2: boolean): number {
  const bytesPerL2 = l2Entries(clusterBits, extendedL2) * 2 ** clusterBits;
  return Math.ceil(size / bytesPerL2);
}

/**
 * Encodes header fields + extensions + backing file name into a fresh buffer of `clusterSize`
 * bytes (cluster 0). Extensions are written in the order given; the end marker is added.
 */
export function encodeHeader(h: Header): Uint8Array {
  const clusterSize = 2 ** h.clusterBits;
  const buf = new Uint8Array(clusterSize);
  setU32(buf, L.H_MAGIC, L.QCOW_MAGIC);
  setU32(buf, L.H_VERSION, h.version);
  setU32(buf, L.H_CLUSTER_BITS, h.clusterBits);
  setU64(buf, L.H_SIZE, h.size);
  setU32(buf, L.H_CRYPT_METHOD, h.cryptMethod);
  setU32(buf, L.H_L1_SIZE, h.l1Size);
  setU64(buf, L.H_L1_TABLE_OFFSET, h.l1TableOffset);
  setU64(buf, L.H_REFCOUNT_TABLE_OFFSET, h.refcountTableOffset);
  setU32(buf, L.H_REFCOUNT_TABLE_CLUSTERS, h.refcountTableClusters);
  setU32(buf, L.H_NB_SNAPSHOTS, h.nbSnapshots);
  setU64(buf, L.H_SNAPSHOTS_OFFSET, h.snapshotsOffset);
  let off = L.V2_HEADER_LENGTH;
  if (h.version >= 3) {
    setU64n(buf, L.H_INCOMPATIBLE_FEATURES, h.incompatibleFeatures);
    setU64n(buf, L.H_COMPATIBLE_FEATURES, h.compatibleFeatures);
    setU64n(buf, L.H_AUTOCLEAR_FEATURES, h.autoclearFeatures);
    setU32(buf, L.H_REFCOUNT_ORDER, h.refcountOrder);
    setU32(buf, L.H_HEADER_LENGTH, h.headerLength);
    if (h.headerLength > L.H_COMPRESSION_TYPE) buf[L.H_COMPRESSION_TYPE] = h.compressionType;
    buf.set(h.tailBytes, Math.min(h.headerLength, L.H_COMPRESSION_TYPE + 1));
    off = h.headerLength;
  }
  for (const ext of h.extensions) {
    const need = L.EXT_HEADER_BYTES + align(ext.data.length, 8);
    if (off + need + L.EXT_HEADER_BYTES > clusterSize) throw new QimgError('USAGE', 'header extensions do not fit in cluster 0');
    setU32(buf, off, ext.type);
    setU32(buf, off + 4, ext.data.length);
    buf.set(ext.data, off + L.EXT_HEADER_BYTES);
    off += need;
  }
  setU32(buf, off, L.EXT_END);
  setU32(buf, off + 4, 0);
  off += L.EXT_HEADER_BYTES;
  if (h.backingFile !== null) {
    const name = encodeString(h.backingFile);
    if (name.length > L.MAX_BACKING_FILE_NAME || off + name.length > clusterSize) {
      throw new QimgError('USAGE', 'Backing file name too long');
    }
    buf.set(name, off);
    setU64(buf, L.H_BACKING_FILE_OFFSET, off);
    setU32(buf, L.H_BACKING_FILE_SIZE, name.length);
    off += name.length;
  }
  return buf.subarray(0, off);
}

/** The extension list QEMU writes for the known fields, in QEMU's order, then unknown ones verbatim. */
/** Cluster sizes up to this get no feature name table (qemu-img 7.2, on create and header rewrites). */
const SMALL_CLUSTER_NO_FEATURE_TABLE = 4096;

export function buildExtensions(h: Header): HeaderExtension[] {
  const out: HeaderExtension[] = [];
  if (h.backingFormat !== null) out.push({ type: L.EXT_BACKING_FORMAT, data: encodeString(h.backingFormat) });
  if (h.dataFile !== null) out.push({ type: L.EXT_DATA_FILE, data: encodeString(h.dataFile) });
  if (h.crypto) {
    const d = new Uint8Array(L.CRYPTO_EXT_BYTES);
    setU64(d, 0, h.crypto.offset);
    setU64(d, 8, h.crypto.length);
    out.push({ type: L.EXT_CRYPTO, data: d });
  }
  // QEMU (7.2, observed) writes no feature name table into images with clusters of 4 KiB or less.
  if (h.version >= 3 && 2 ** h.clusterBits > SMALL_CLUSTER_NO_FEATURE_TABLE) {
    const names = L.KNOWN_FEATURES;
    const d = new Uint8Array(names.length * L.FEATURE_TABLE_ENTRY_BYTES);
    names.forEach((f, i) => {
      d[i * L.FEATURE_TABLE_ENTRY_BYTES] = f.type;
      d[i * L.FEATURE_TABLE_ENTRY_BYTES + 1] = f.bit;
      d.set(encodeString(f.name), i * L.FEATURE_TABLE_ENTRY_BYTES + 2);
    });
    out.push({ type: L.EXT_FEATURE_TABLE, data: d });
  }
  if (h.bitmaps) {
    const d = new Uint8Array(L.BITMAPS_EXT_BYTES);
    setU32(d, 0, h.bitmaps.nbBitmaps);
    setU64(d, 8, h.bitmaps.bitmapDirectorySize);
    setU64(d, 16, h.bitmaps.bitmapDirectoryOffset);
    out.push({ type: L.EXT_BITMAPS, data: d });
  }
  const known = new Set([L.EXT_BACKING_FORMAT, L.EXT_DATA_FILE, L.EXT_CRYPTO, L.EXT_FEATURE_TABLE, L.EXT_BITMAPS]);
  for (const e of h.extensions) if (!known.has(e.type)) out.push(e);
  return out;
}
