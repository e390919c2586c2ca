'use strict';
// Bundles a TypeScript piece written with the Activepieces framework, and this host, into
// one JavaScript file that speaks piece protocol 1.2 when run with `node`:
//
//   node build.js PIECE_DIR OUT_DIR      writes OUT_DIR/piece.js
//   node OUT_DIR/piece.js --metadata     prints the piece's metadata (piecework's schema)
//   node OUT_DIR/piece.js                serves the protocol on stdin and stdout
//
// The piece's own dependencies (the framework, pieces-common, its HTTP client) come from its
// node_modules: `piecework piece build` runs `npm ci` there first.

const fs = require('node:fs');
const path = require('node:path');
const esbuild = require('esbuild');

async function main() {
  const [pieceDir, outDir] = process.argv.slice(2).map((p) => path.resolve(p));
  if (!pieceDir || !outDir) throw new Error('usage: node build.js PIECE_DIR OUT_DIR');
  const pkg = JSON.parse(fs.readFileSync(path.join(pieceDir, 'package.json'), 'utf8'));
  const entry = ['src/index.ts', 'src/index.js', pkg.main]
    .filter(Boolean)
    .map((p) => path.join(pieceDir, p))
    .find((p) => fs.existsSync(p));
  if (!entry) throw new Error(`${pieceDir} has no src/index.ts (nor src/index.js, nor a "main")`);
  const about = { name: pkg.name, version: pkg.version, description: pkg.description ?? '' };
  if (!about.name || !about.version) throw new Error(`${pieceDir}/package.json needs a "name" and a "version"`);
  const src = path.join(__dirname, 'src');
  const contents = `
const { findPiece, describe } = require(${JSON.stringify(path.join(src, 'metadata.js'))});
const { serve } = require(${JSON.stringify(path.join(src, 'host.js'))});
const piece = findPiece(require(${JSON.stringify(entry)}));
const about = ${JSON.stringify(about)};
if (process.argv[2] === '--metadata') {
  const described = describe(piece, about);
  for (const why of described.skipped) console.error(\`left out: \${why}\`);
  process.stdout.write(JSON.stringify(described.metadata) + '\\n');
} else {
  serve(piece, about);
}
`;
  fs.mkdirSync(outDir, { recursive: true });
  await esbuild.build({
    stdin: { contents, resolveDir: pieceDir, sourcefile: 'piecework-entry.js', loader: 'js' },
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    outfile: path.join(outDir, 'piece.js'),
    // Optional native add-ons some HTTP clients probe for are left out, as the framework does.
    external: ['bufferutil', 'utf-8-validate'],
    logLevel: 'warning',
    legalComments: 'none',
  });
}

main().catch((err) => {
  console.error(`piece build: ${err.message}`);
  process.exit(1);
});
