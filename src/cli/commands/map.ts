// `qimg map [--output=human|json] [-f FMT] [-U] FILE`

import { mapFile } from '../../qcow2/engine/map.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, oneFile, outputFormat, parseArgs } from '../args.js';
import { writeStderr, writeStdout } from '../output.js';
import { renderMapHuman, renderMapJson } from '../render.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('map', argv, [...COMMON_READ_OPTIONS, { key: 'output', long: ['output'], value: true }]);
  const file = oneFile('map', p);
  const output = outputFormat('map', p);
  const entries = await mapFile(file, { format: imageFormat(p, file), forceShare: flag(p, 'force-share'), backing: backingPolicy(p) });
  if (output === 'json') {
    writeStdout(renderMapJson(entries));
    return 0;
  }
  const { text, error } = renderMapHuman(entries);
  writeStdout(text);
  if (error) {
    writeStderr(`qimg: ${error}\n`);
    return 1;
  }
  return 0;
}
