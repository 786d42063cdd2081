// `qimg compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] A B` — exit 0 identical, 1 different, 2 error.

import { compare } from '../../qcow2/engine/compare.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, parseArgs, usage } from '../args.js';
import { reportError } from '../main.js';
import { writeStdout } from '../output.js';
import { progressBar } from '../progress.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('compare', argv, [
    ...COMMON_READ_OPTIONS,
    { key: 'format2', short: 'F', value: true },
    { key: 'strict', short: 's' },
    { key: 'progress', short: 'p' },
    { key: 'quiet', short: 'q' },
  ]);
  if (p.positionals.length !== 2) throw usage('compare', 'Expecting two image file names');
  const [a, b] = p.positionals as [string, string];
  const quiet = flag(p, 'quiet');
  const showProgress = flag(p, 'progress') && !quiet;
  try {
    const f2 = imageFormat(p, b, 'format2');
    if (showProgress) writeStdout(progressBar(0, 1));
    const r = await compare(a, b, {
      format1: imageFormat(p, a),
      format2: f2,
      strict: flag(p, 'strict'),
      forceShare: flag(p, 'force-share'),
      backing: backingPolicy(p),
    });
    if (showProgress) writeStdout(progressBar(1, 1));
    if (!quiet) writeStdout(r.lines.map((l) => `${l}\n`).join(''));
    return r.identical ? 0 : 1;
  } catch (err) {
    reportError(err);
    return 2;
  }
}
