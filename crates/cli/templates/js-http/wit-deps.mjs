// Puts the WASI WIT packages that wit/app.wit uses into wit/deps, from the
// copy jco (a dependency of componentize-js, pinned in package.json) ships.
//
// jco ships WASI 0.2.12, but componentize-js 0.23.0's engine exports
// wasi:http/incoming-handler at 0.2.10, and the world must name that exact
// version. WASI 0.2 patch releases keep every interface's shape, so the
// 0.2.12 text is written out as 0.2.10; componentize-js checks the engine's
// imports and exports against it, so a real difference fails the build.
import { cpSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';

const SHIPPED = '0.2.12';
const WANTED = '0.2.10';
const from = `node_modules/@bytecodealliance/jco/lib/wit/builtin/${SHIPPED}`;

if (!existsSync(from)) {
  console.error(`wit-deps.mjs: ${from} is missing: run \`npm install\` first`);
  process.exit(1);
}
for (const dir of readdirSync(from)) {
  const file = `wit/deps/${dir}/package.wit`;
  cpSync(`${from}/${dir}`, `wit/deps/${dir}`, { recursive: true });
  writeFileSync(file, readFileSync(file, 'utf8').replaceAll(`@${SHIPPED}`, `@${WANTED}`));
}
