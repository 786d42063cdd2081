// Decodes the LUKS1 header a LUKS-encrypted qcow2 (crypt_method 2) carries, into what `qemu-img info` reports.
//
// Written from the LUKS1 on-disk format (all integers big-endian, 592 bytes):
//   0   magic            6 bytes "LUKS\xba\xbe"
//   6   version          u16 (must be 1)
//   8   cipher-name      char[32], NUL-terminated ("aes", "twofish", ...)
//   40  cipher-mode      char[32], "<mode>-<ivgen>[:<ivgen hash>]" ("xts-plain64", "cbc-essiv:sha256")
//   72  hash-spec        char[32] (PBKDF2 / AF hash)
//   104 payload-offset   u32, in 512-byte sectors
//   108 key-bytes        u32, master key length (both halves for XTS)
//   112 mk-digest        20 bytes
//   132 mk-digest-salt   32 bytes
//   164 mk-digest-iter   u32
//   168 uuid             char[40]
//   208 key slots        8 x 48 bytes:
//         +0 active u32 (0x00ac71f3 enabled, 0x0000dead disabled), +4 iterations u32,
//         +8 salt 32 bytes, +40 key-material-offset u32 (sectors), +44 stripes u32
//
// qemu-img 7.2 refuses to open an image whose header fails the checks below, so they are
// made here in the order it makes them, with the message it prints, so `qimg info` fails
// the same way on the same image.

import type { LuksInfo } from '../engine/types.js';
import { QimgError } from '../errors.js';

export const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe] as const; // "LUKS\xba\xbe"
export const LUKS_VERSION = 1;
export const LUKS_HEADER_BYTES = 592;
export const LUKS_SECTOR_BYTES = 512;
export const LUKS_NUM_SLOTS = 8;
export const LUKS_STRIPES = 4000;
export const LUKS_SLOT_ENABLED = 0x00ac71f3;
export const LUKS_SLOT_DISABLED = 0x0000dead;

const L_MAGIC = 0;
const L_VERSION = 6;
const L_CIPHER_NAME = 8;
const L_CIPHER_MODE = 40;
const L_HASH_SPEC = 72;
const L_PAYLOAD_OFFSET = 104;
const L_KEY_BYTES = 108;
const L_MK_DIGEST_ITER = 164;
const L_UUID = 168;
const L_SLOTS = 208;
const NAME_BYTES = 32;
const UUID_BYTES = 40;

const SLOT_BYTES = 48;
const S_ACTIVE = 0;
const S_ITERATIONS = 4;
const S_KEY_MATERIAL_OFFSET = 40;
const S_STRIPES = 44;

/** Key material is laid out in 4 KiB-aligned areas; the header itself takes the first area. */
const AREA_ALIGN_BYTES = 4096;
const HEADER_SECTORS = AREA_ALIGN_BYTES / LUKS_SECTOR_BYTES;

/** LUKS cipher names qemu-img 7.2 accepts, with the key sizes (bytes, per half for XTS) each allows. */
const CIPHER_KEY_BYTES: Readonly<Record<string, readonly number[]>> = {
  aes: [16, 24, 32],
  cast5: [16],
  serpent: [16, 24, 32],
  twofish: [16, 24, 32],
};
/** Families ESSIV may fall back to at the digest's key size, with the name used in the refusal. */
const ESSIV_FAMILY: Readonly<Record<string, string>> = { aes: 'AES', serpent: 'Serpent', twofish: 'Twofish' };

const CIPHER_MODES = ['ecb', 'cbc', 'xts', 'ctr'] as const;
const IVGEN_ALGS = ['plain', 'plain64', 'essiv'] as const;
/** Hash names qemu-img 7.2 knows, with digest length in bytes (ESSIV keys its IV cipher with it). */
const HASH_DIGEST_BYTES: Readonly<Record<string, number>> = {
  md5: 16,
  sha1: 20,
  sha224: 28,
  sha256: 32,
  sha384: 48,
  sha512: 64,
  ripemd160: 20,
};

function bad(message: string, data: Record<string, unknown> = {}): QimgError {
  return new QimgError('BAD_IMAGE', message, data);
}

function u32(buf: Uint8Array, off: number): number {
  return ((buf[off]! << 24) | (buf[off + 1]! << 16) | (buf[off + 2]! << 8) | buf[off + 3]!) >>> 0;
}

function u16(buf: Uint8Array, off: number): number {
  return (buf[off]! << 8) | buf[off + 1]!;
}

const utf8 = new TextDecoder('utf-8');

/** The NUL-terminated string in a fixed field, or null when no NUL is inside the field. */
function cString(buf: Uint8Array, off: number, len: number): string | null {
  const field = buf.subarray(off, off + len);
  const nul = field.indexOf(0);
  return nul < 0 ? null : utf8.decode(field.subarray(0, nul));
}

function hashAlg(name: string): string {
  if (!Object.hasOwn(HASH_DIGEST_BYTES, name)) throw bad(`Hash algorithm '${name}' not supported`, { hash: name });
  return name;
}

interface Slot {
  state: number;
  active: boolean;
  iterations: number;
  keyMaterialOffset: number;
  stripes: number;
}

/**
 * Checks the header's own layout as qemu-img 7.2 does before it looks at any names; per
 * slot in its order: stripes, state, iterations, header, payload, then later slots.
 * Slot extents are computed with its 32-bit arithmetic (the split key length and a
 * slot's end sector wrap at 2^32), which matched qemu-img 7.2 on every absurd value probed.
 */
function checkLayout(payloadOffset: number, mkIters: number, keyBytes: number, slots: Slot[]): void {
  if (payloadOffset < HEADER_SECTORS) throw bad('LUKS payload is overlapping with the header', { payloadOffset });
  if (mkIters === 0) throw bad('LUKS key iteration count is zero');
  const extent = slots.map((s) => {
    const splitBytes = (keyBytes * s.stripes) % 2 ** 32;
    const sectors = (Math.ceil(splitBytes / AREA_ALIGN_BYTES) * AREA_ALIGN_BYTES) / LUKS_SECTOR_BYTES;
    return { start: s.keyMaterialOffset, end: (s.keyMaterialOffset + sectors) % 2 ** 32 };
  });
  slots.forEach((s, i) => {
    if (s.stripes !== LUKS_STRIPES) {
      throw bad(`Keyslot ${i} is corrupted (stripes ${s.stripes} != ${LUKS_STRIPES})`, { slot: i });
    }
    if (s.state !== LUKS_SLOT_ENABLED && s.state !== LUKS_SLOT_DISABLED) {
      throw bad(`Keyslot ${i} state (active/disable) is corrupted`, { slot: i, state: s.state });
    }
    if (s.active && s.iterations === 0) throw bad(`Keyslot ${i} iteration count is zero`, { slot: i });
    const a = extent[i]!;
    if (a.start < HEADER_SECTORS) throw bad(`Keyslot ${i} is overlapping with the LUKS header`, { slot: i });
    if (a.end > payloadOffset) throw bad(`Keyslot ${i} is overlapping with the encrypted payload`, { slot: i });
    for (let j = i + 1; j < slots.length; j++) {
      const b = extent[j]!;
      if (a.start < b.end && b.start < a.end) {
        throw bad(`Keyslots ${i} and ${j} are overlapping in the header`, { slot: i, otherSlot: j });
      }
    }
  });
}

/**
 * Decodes a LUKS1 header (bytes start at the header) into what qemu-img info reports.
 * Throws QimgError('BAD_IMAGE', ...) naming the problem, with qemu-img 7.2's wording, on a
 * header it would refuse: bad magic, version != 1, unterminated strings, corrupt key slots,
 * unknown cipher / mode / IV generator / hash names or impossible key sizes.
 */
export function decodeLuksHeader(buf: Uint8Array): LuksInfo {
  if (buf.length < LUKS_HEADER_BYTES) {
    throw bad(`LUKS header is truncated: ${buf.length} bytes, need ${LUKS_HEADER_BYTES}`, { length: buf.length });
  }
  if (!LUKS_MAGIC.every((b, i) => buf[L_MAGIC + i] === b)) throw bad('Volume is not in LUKS format');
  const version = u16(buf, L_VERSION);
  if (version !== LUKS_VERSION) throw bad(`LUKS version ${version} is not supported`, { version });

  const cipherName = cString(buf, L_CIPHER_NAME, NAME_BYTES);
  if (cipherName === null) throw bad('LUKS header cipher name is not NUL terminated');
  const cipherModeSpec = cString(buf, L_CIPHER_MODE, NAME_BYTES);
  if (cipherModeSpec === null) throw bad('LUKS header cipher mode is not NUL terminated');
  const hashSpec = cString(buf, L_HASH_SPEC, NAME_BYTES);
  if (hashSpec === null) throw bad('LUKS header hash spec is not NUL terminated');

  const payloadOffset = u32(buf, L_PAYLOAD_OFFSET);
  const keyBytes = u32(buf, L_KEY_BYTES);
  const mkIters = u32(buf, L_MK_DIGEST_ITER);
  const slots: Slot[] = [];
  for (let i = 0; i < LUKS_NUM_SLOTS; i++) {
    const at = L_SLOTS + i * SLOT_BYTES;
    const state = u32(buf, at + S_ACTIVE);
    slots.push({
      state,
      active: state === LUKS_SLOT_ENABLED,
      iterations: u32(buf, at + S_ITERATIONS),
      keyMaterialOffset: u32(buf, at + S_KEY_MATERIAL_OFFSET),
      stripes: u32(buf, at + S_STRIPES),
    });
  }
  checkLayout(payloadOffset, mkIters, keyBytes, slots);

  // "<mode>-<ivgen>[:<hash>]": split at the first '-', then the first ':'.
  const dash = cipherModeSpec.indexOf('-');
  if (dash < 0) throw bad(`Unexpected cipher mode string format '${cipherModeSpec}'`);
  const modeName = cipherModeSpec.slice(0, dash);
  const ivgenSpec = cipherModeSpec.slice(dash + 1);
  const colon = ivgenSpec.indexOf(':');
  const ivgenName = colon < 0 ? ivgenSpec : ivgenSpec.slice(0, colon);
  const ivgenHash = colon < 0 ? undefined : hashAlg(ivgenSpec.slice(colon + 1));

  const cipherMode = CIPHER_MODES.find((m) => m === modeName);
  if (cipherMode === undefined) throw bad(`Cipher mode '${modeName}' not supported`);

  // An XTS key is two keys of the cipher's size.
  const cipherKeyBytes = cipherMode === 'xts' ? Math.floor(keyBytes / 2) : keyBytes;
  const sizes = Object.hasOwn(CIPHER_KEY_BYTES, cipherName) ? CIPHER_KEY_BYTES[cipherName]! : [];
  if (!sizes.includes(cipherKeyBytes)) {
    throw bad(`Algorithm '${cipherName}' with key size ${cipherKeyBytes} bytes not supported`, {
      cipher: cipherName,
      keyBytes,
    });
  }
  const cipherAlg = `${cipherName}-${cipherKeyBytes * 8}`;
  const hash = hashAlg(hashSpec);

  const ivgenAlg = IVGEN_ALGS.find((g) => g === ivgenName);
  if (ivgenAlg === undefined) throw bad(`IV generator '${ivgenName}' not supported`);
  if (ivgenAlg === 'essiv') {
    if (ivgenHash === undefined) throw bad('Missing IV generator hash specification');
    checkEssivCipher(cipherName, cipherKeyBytes, cipherAlg, HASH_DIGEST_BYTES[ivgenHash]!);
  }

  const uuid = cString(buf, L_UUID, UUID_BYTES) ?? utf8.decode(buf.subarray(L_UUID, L_UUID + UUID_BYTES));

  return {
    format: 'luks',
    ivgenAlg,
    // qemu-img names the IV hash only for ESSIV; for plain/plain64 it is parsed but not shown.
    ...(ivgenAlg === 'essiv' ? { ivgenHashAlg: ivgenHash! } : {}),
    hashAlg: hash,
    cipherAlg,
    uuid,
    cipherMode,
    slots: slots.map((s) => ({
      active: s.active,
      ...(s.active ? { iters: s.iterations, stripes: s.stripes } : {}),
      keyOffset: s.keyMaterialOffset * LUKS_SECTOR_BYTES,
    })),
    payloadOffset: payloadOffset * LUKS_SECTOR_BYTES,
    masterKeyIters: mkIters,
  };
}

/** ESSIV keys a second cipher with the IV hash's digest: the same cipher if sizes match, else one of its family. */
function checkEssivCipher(cipherName: string, cipherKeyBytes: number, cipherAlg: string, digestBytes: number): void {
  if (digestBytes === cipherKeyBytes) return;
  const family = Object.hasOwn(ESSIV_FAMILY, cipherName) ? ESSIV_FAMILY[cipherName]! : undefined;
  if (family === undefined) throw bad(`Cipher ${cipherAlg} not supported with essiv`);
  if (!CIPHER_KEY_BYTES[cipherName]!.includes(digestBytes)) {
    throw bad(`No ${family} cipher with key size ${digestBytes} available`);
  }
}
