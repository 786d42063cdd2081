// `qimg chain [--output=human|json] [-f FMT] [-U] FILE` and
// `qimg chain revert FILE --to LAYER [--delete] [-q]`

import { describeChain, revertChain } from '../../qcow2/engine/chain.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, last, oneFile, outputFormat, parseArgs, usage } from '../args.js';
import { writeStdout } from '../output.js';
import { renderChainHuman, renderChainJson } from '../render.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('chain', argv, [
    ...COMMON_READ_OPTIONS,
    { key: 'output', long: ['output'], value: true },
    { key: 'to', long: ['to'], value: true },
    { key: 'delete', long: ['delete'] },
    { key: 'quiet', short: 'q' },
  ]);
  if (p.positionals[0] === 'revert') {
    p.positionals.shift();
    const file = oneFile('chain', p);
    const to = last(p, 'to');
    if (to === undefined) throw usage('chain', 'revert needs --to LAYER');
    const r = await revertChain(file, { to, delete: flag(p, 'delete'), format: imageFormat(p, file), backing: backingPolicy(p) });
    if (!flag(p, 'quiet')) {
      let msg = `Reverted '${file}' to '${r.layer}': a new empty overlay.\n`;
      if (r.keptAs) msg += `The previous image is kept as '${r.keptAs}'.\n`;
      for (const d of r.deleted) msg += `Deleted '${d}'.\n`;
      writeStdout(msg);
    }
    return 0;
  }
  const file = oneFile('chain', p);
  const output = outputFormat('chain', p);
  const layers = await describeChain(file, { format: imageFormat(p, file), forceShare: flag(p, 'force-share'), backing: backingPolicy(p) });
  writeStdout(output === 'json' ? renderChainJson(layers) : renderChainHuman(layers));
  return 0;
}
