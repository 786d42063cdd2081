// `qimg info [--output=human|json] [--backing-chain] [-f FMT] [-U] FILE`

import { info } from '../../qcow2/engine/info.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, oneFile, outputFormat, parseArgs } from '../args.js';
import { writeStdout } from '../output.js';
import { renderInfoChainHuman, renderInfoChainJson, renderInfoHuman, renderInfoJson } from '../render.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('info', argv, [
    ...COMMON_READ_OPTIONS,
    { key: 'output', long: ['output'], value: true },
    { key: 'backing-chain', long: ['backing-chain'] },
  ]);
  const file = oneFile('info', p);
  const output = outputFormat('info', p);
  const chain = flag(p, 'backing-chain');
  const infos = await info(file, { format: imageFormat(p, file), forceShare: flag(p, 'force-share'), backingChain: chain, backing: backingPolicy(p) });
  const text = chain
    ? output === 'json' ? renderInfoChainJson(infos) : renderInfoChainHuman(infos)
    : output === 'json' ? renderInfoJson(infos[0]!) : renderInfoHuman(infos[0]!);
  writeStdout(text);
  return 0;
}
