// Builds dist/{{name}}.wasm from handler.js with componentize-js. Run through ./build.sh.
// `http` and `fetch-event` are left out: they would import wasi:http, which the host does
// not link.
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { componentize } from '@bytecodealliance/componentize-js';

const here = dirname(fileURLToPath(import.meta.url));
const output = join(here, 'dist', '{{name}}.wasm');
const { component } = await componentize({
  sourcePath: join(here, 'handler.js'),
  witPath: join(here, 'wit'),
  worldName: 'event-handler',
  disableFeatures: ['http', 'fetch-event'],
});
await mkdir(dirname(output), { recursive: true });
await writeFile(output, component);
console.log(`wrote dist/{{name}}.wasm (${component.byteLength} bytes)`);
