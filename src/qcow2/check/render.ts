// qemu-img check's report: the human text (stdout), the JSON object, and the stderr lines.

import type { CheckReport } from './index.js';

/** The stdout text `qemu-img check` prints for one image (empty when the check could not run). */
export function renderCheckHuman(r: CheckReport, quiet = false): string {
  if (quiet) return '';
  let out = '';
  if (r.repaired) {
    out +=
      'The following inconsistencies were found and repaired:\n\n' +
      `    ${r.repaired.leaks} leaked clusters\n` +
      `    ${r.repaired.corruptions} corruptions\n\n` +
      'Double checking the fixed image now...\n';
  }
  if (!r.hasReport) return out;
  if (!(r.corruptions || r.leaks || r.checkErrors)) out += 'No errors were found on the image.\n';
  else {
    if (r.corruptions) {
      out += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (r.leaks) out += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) out += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    const pct = (x: number) => cFixed2(x);
    out +=
      `${r.allocatedClusters}/${r.totalClusters} = ${pct((r.allocatedClusters * 100) / r.totalClusters)}% allocated, ` +
      `${pct((r.fragmentedClusters * 100) / r.allocatedClusters)}% fragmented, ` +
      `${pct((r.compressedClusters * 100) / r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) out += `Image end offset: ${r.imageEndOffset}\n`;
  return out;
}

/** JSON keys in qemu-img's (QDict hash) order; counters appear only when non-zero. */
function jsonFields(r: CheckReport): [string, string][] {
  const f: [string, string][] = [];
  const num = (k: string, v: number, always = false) => {
    if (always || v !== 0) f.push([k, String(v)]);
  };
  num('image-end-offset', r.imageEndOffset);
  num('compressed-clusters', r.compressedClusters);
  num('total-clusters', r.totalClusters);
  num('corruptions', r.corruptions);
  num('corruptions-fixed', r.corruptionsFixed);
  num('check-errors', r.checkErrors, true);
  num('leaks', r.leaks);
  num('leaks-fixed', r.leaksFixed);
  num('allocated-clusters', r.allocatedClusters);
  f.push(['filename', JSON.stringify(r.filename)]);
  f.push(['format', JSON.stringify(r.format)]);
  num('fragmented-clusters', r.fragmentedClusters);
  return f;
}

function jsonObject(r: CheckReport, indent: string): string {
  const inner = indent + '    ';
  return `${indent}{\n` + jsonFields(r).map(([k, v]) => `${inner}"${k}": ${v}`).join(',\n') + `\n${indent}}`;
}

/** `qemu-img check --output=json` for one image (empty when the check could not run). */
export function renderCheckJson(r: CheckReport): string {
  return r.hasReport ? jsonObject(r, '') + '\n' : '';
}

/** Several images: a JSON array of the reports that ran, in argument order. */
export function renderCheckJsonArray(rs: CheckReport[]): string {
  const ok = rs.filter((r) => r.hasReport);
  if (ok.length === 0) return '[\n]\n';
  return '[\n' + ok.map((r) => jsonObject(r, '    ')).join(',\n') + '\n]\n';
}

/** The stderr text: findings in order, then the final error line. */
export function renderCheckStderr(r: CheckReport, prog = 'qimg'): string {
  let out = r.messages.map((m) => m + '\n').join('');
  if (r.error) out += `${prog}: ${r.error}\n`;
  return out;
}

/**
 * printf("%0.2f"): rounds the double's exact decimal value, ties to even (toFixed rounds the
 * tie 3.125 up; glibc prints 3.12).
 */
export function cFixed2(x: number): string {
  const exact = x.toFixed(100);
  const dot = exact.indexOf('.');
  const keep = exact.slice(0, dot + 3);
  const rest = exact.slice(dot + 3);
  const first = rest.charCodeAt(0) - 48;
  const tail = /[1-9]/.test(rest.slice(1));
  const last = keep.charCodeAt(keep.length - 1) - 48;
  const up = first > 5 || (first === 5 && (tail || last % 2 === 1));
  if (!up) return keep;
  // Add one unit in the last place.
  const cents = BigInt(keep.replace('.', '')) + 1n;
  const str = cents.toString().padStart(3, '0');
  return str.slice(0, -2) + '.' + str.slice(-2);
}
