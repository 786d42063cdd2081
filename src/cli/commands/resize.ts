// `qimg resize [--shrink] [-f FMT] [-q] FILE [+|-]SIZE`

import { QimgError } from '../../qcow2/errors.js';
import { resize } from '../../qcow2/engine/resize.js';
import { flag, imageFormat, parseArgs, usage } from '../args.js';
import { writeStderr, writeStdout } from '../output.js';
import { parseSizeOption } from '../size.js';

export async function run(argv: string[]): Promise<number> {
  // A leading '-' on the size is a sign, not an option, once the file name is known.
  const p = parseArgs('resize', argv.map((a, i) => (i === argv.length - 1 && /^-\d/.test(a) ? `--size-minus=${a.slice(1)}` : a)), [
    { key: 'format', short: 'f', value: true },
    { key: 'shrink', long: ['shrink'] },
    { key: 'quiet', short: 'q' },
    { key: 'size-minus', long: ['size-minus'], value: true },
  ]);
  const minus = p.opts.get('size-minus')?.[0];
  const pos = minus !== undefined ? [...p.positionals, `-${minus}`] : p.positionals;
  if (pos.length < 2) throw usage('resize', 'Not enough arguments');
  if (pos.length > 2) throw usage('resize', 'Expecting image file name and size');
  const [file, sizeText] = pos as [string, string];
  const sign = sizeText.startsWith('+') ? 1 : sizeText.startsWith('-') ? -1 : 0;
  const n = parseSizeOption('size', sign === 0 ? sizeText : sizeText.slice(1));
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new QimgError('UNSUPPORTED', `Image size ${n} is too large for qimg`);
  await resize(file, Number(n), sign as 0 | 1 | -1, { format: imageFormat(p, file), shrink: flag(p, 'shrink'), onRepair: (m) => writeStderr(m.map((x) => x + '\n').join('')) });
  if (!flag(p, 'quiet')) writeStdout('Image resized.\n');
  return 0;
}
