#!/usr/bin/env bash
# Builds the extension and packages it, with the release server binary bundled, as
# editors/vscode/prompt-salience.vsix. Run `cargo build --release` first.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(cd ../.. && pwd)
[ -d node_modules ] || npm ci --no-audit --no-fund
npx tsc -p .
node --test out/test/unit/
mkdir -p bin
cp "$root/target/release/prompt-salience" bin/prompt-salience
strip bin/prompt-salience 2>/dev/null || true  # line tables are for profiling, not for users
npx vsce package --allow-missing-repository --skip-license -o prompt-salience.vsix
