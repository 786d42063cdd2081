// Size arguments as qemu-img 7.2 reads them (`1G`, `1.5G`, `100k`, `0x1000`), shared by create and resize.
//
// The rules, observed on qemu-img 7.2:
//   - optional leading spaces and `+`; decimal digits, or `0x` hex digits (hex takes no fraction);
//   - an optional fraction after a decimal number, but only together with a unit suffix;
//   - one optional suffix, either case: b (bytes), k, M, G, T, P, E (powers of 1024);
//   - the fraction contributes floor(fraction * unit) bytes;
//   - anything after the suffix (trailing spaces included) is an error;
//   - values above INT64_MAX get their own message.
// The value is exact (BigInt arithmetic); callers refuse what does not fit a JS number.

import { QimgError } from '../qcow2/errors.js';

const UNITS: Record<string, bigint> = {
  b: 1n,
  k: 1n << 10n,
  m: 1n << 20n,
  g: 1n << 30n,
  t: 1n << 40n,
  p: 1n << 50n,
  e: 1n << 60n,
};

export const INT64_MAX = (1n << 63n) - 1n;

/** qemu-img's message for a size it cannot parse (one line here; qemu-img splits it in two). */
export const INVALID_SIZE_MESSAGE =
  'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';
export const SIZE_RANGE_MESSAGE = 'Invalid image size specified. Must be between 0 and 9223372036854775807.';

/** Parses a size; returns null when the text is not a size at all. Values may exceed 2^63. */
export function parseSizeBig(text: string): bigint | null {
  const m = /^[ \t\n\v\f\r]*\+?(?:(0[xX][0-9a-fA-F]+)|([0-9]+)(?:\.([0-9]*))?)([bBkKmMgGtTpPeE]?)$/.exec(text);
  if (!m) return null;
  const [, hexDigits, intDigits, fracDigits, suffix] = m;
  const unit = suffix ? UNITS[suffix.toLowerCase()]! : 1n;
  if (hexDigits !== undefined) return BigInt(hexDigits) * unit;
  const whole = BigInt(intDigits!) * unit;
  if (fracDigits === undefined) return whole;
  // A fraction needs a unit, and bytes cannot be split.
  if (!suffix || unit === 1n) return null;
  if (fracDigits === '') return whole;
  // floor(0.fff * unit), exactly.
  const scale = 10n ** BigInt(fracDigits.length);
  return whole + (BigInt(fracDigits) * unit) / scale;
}

/** The image size argument of create/resize: qemu-img's two errors, and a cap at what a JS number holds exactly. */
export function parseImageSize(text: string): number {
  const v = parseSizeBig(text);
  if (v === null) throw new QimgError('USAGE', INVALID_SIZE_MESSAGE);
  if (v > INT64_MAX) throw new QimgError('USAGE', SIZE_RANGE_MESSAGE);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new QimgError('UNSUPPORTED', `Image size ${v} is too large for qimg (at most ${Number.MAX_SAFE_INTEGER} bytes)`);
  }
  return Number(v);
}

/**
 * A size-typed `-o` option (cluster_size=64k, size=1G): same syntax, QEMU's option-parser wording.
 * Returns a BigInt so an out-of-range cluster size still reaches the driver's own check.
 */
export function parseSizeOption(name: string, text: string): bigint {
  const v = parseSizeBig(text);
  if (v === null || v >= 1n << 64n) {
    throw new QimgError(
      'USAGE',
      `Parameter '${name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`,
    );
  }
  return v;
}
