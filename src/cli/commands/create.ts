// `qimg create [-f qcow2|raw] [-o OPTIONS] [-b BACKING -F FMT] [-u] [-q] FILE [SIZE]`: parse, one library call, print.

import { QimgError } from '../../qcow2/errors.js';
import { CREATE_OPTION_HELP, prepareCreate } from '../../qcow2/engine/create.js';
import { all, flag, last, parseArgs, usage } from '../args.js';
import { parseImageSize } from '../size.js';
import { checkOptionList, parseCreateOptions, splitOptions } from '../create-options.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('create', argv, [
    { key: 'format', short: 'f', value: true },
    { key: 'options', short: 'o', value: true, repeat: true },
    { key: 'backing', short: 'b', value: true },
    { key: 'backing-format', short: 'F', value: true },
    { key: 'unsafe', short: 'u' },
    { key: 'quiet', short: 'q' },
  ]);
  const format = last(p, 'format') ?? 'raw';
  const optionText = all(p, 'options');
  const list = optionText.length ? optionText.join(',') : null;
  if (list !== null) {
    checkOptionList(list);
    const items = splitOptions(list);
    if (items.some((i) => i === 'help' || i === '?')) {
      process.stdout.write(optionHelp(format, p.positionals[0]));
      return 0;
    }
  }
  if (p.positionals.length === 0) throw usage('create', 'Expecting image file name');
  if (p.positionals.length > 2) throw usage('create', `Unexpected argument: ${p.positionals[2]}`);
  const [file, sizeText] = p.positionals as [string, string | undefined];
  const size = sizeText === undefined ? undefined : parseImageSize(sizeText);

  if (format !== 'qcow2' && format !== 'raw') throw new QimgError('UNSUPPORTED', `${file}: Unknown file format '${format}'`);
  const opts = parseCreateOptions(file, format, list === null ? [] : splitOptions(list));
  if (size !== undefined) {
    if (opts.size !== undefined) throw new QimgError('USAGE', `${file}: The image size must be specified only once`);
    opts.size = size;
  }
  const b = last(p, 'backing');
  if (b !== undefined) opts.backingFile = b;
  const bf = last(p, 'backing-format');
  if (bf !== undefined) opts.backingFormat = bf;
  if (flag(p, 'unsafe')) opts.unsafe = true;

  const prepared = await prepareCreate(file, opts);
  if (!flag(p, 'quiet')) process.stdout.write(prepared.formatting + '\n');
  await prepared.execute();
  return 0;
}

/** `-o help`: qemu-img's listing, limited to the options qimg implements. */
function optionHelp(format: string, file: string | undefined): string {
  if (format !== 'qcow2' && format !== 'raw') throw new QimgError('UNSUPPORTED', `Unknown file format '${format}'`);
  const lines = CREATE_OPTION_HELP[format].map(([name, type, desc]) => `  ${`${name}=<${type}>`.padEnd(22)} - ${desc}`);
  if (file !== undefined) return `Supported options:\n${lines.join('\n')}\n`;
  return `Supported ${format} options:\n${lines.join('\n')}\n\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n`;
}
