// `qimg resize [--shrink] [-f FMT] [-q] FILE [+|-]SIZE`

import { QimgError } from '../../qcow2/errors.js';
import { resize } from '../../qcow2/engine/resize.js';
import { backingPolicy, flag, imageFormat, parseArgs, usage } from '../args.js';
import { writeStderr, writeStdout } from '../output.js';
import { parseSizeOption } from '../size.js';

export async function run(argv: string[]): Promise<number> {
  // The size is always the last argument, taken before the options are parsed (as qemu-img
  // does), so a negative size is never read as an option, with or without `--`.
  if (argv.length < 2) throw usage('resize', 'Not enough arguments');
  const sizeText = argv[argv.length - 1]!;
  const p = parseArgs('resize', argv.slice(0, -1), [
    { key: 'format', short: 'f', value: true },
    { key: 'backing-root', long: ['backing-root'], value: true, repeat: true },
    { key: 'allow-any-backing', long: ['allow-any-backing'] },
    { key: 'no-backing', long: ['no-backing'] },
    { key: 'shrink', long: ['shrink'] },
    { key: 'quiet', short: 'q' },
  ]);
  if (p.positionals.length !== 1) throw usage('resize', 'Expecting image file name and size');
  const file = p.positionals[0]!;
  const sign = sizeText.startsWith('+') ? 1 : sizeText.startsWith('-') ? -1 : 0;
  const n = parseSizeOption('size', sign === 0 ? sizeText : sizeText.slice(1));
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new QimgError('UNSUPPORTED', `Image size ${n} is too large for qimg`);
  await resize(file, Number(n), sign as 0 | 1 | -1, { format: imageFormat(p, file), shrink: flag(p, 'shrink'), backing: backingPolicy(p), onRepair: (m) => writeStderr(m.map((x) => x + '\n').join('')) });
  if (!flag(p, 'quiet')) writeStdout('Image resized.\n');
  return 0;
}
