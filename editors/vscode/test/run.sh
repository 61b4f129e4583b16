#!/usr/bin/env bash
# VS Code end to end: packages the extension, installs code-server + Chromium, drives it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
tools=${EDITOR_TOOLS:-$root/.cache/editors}
mkdir -p "$tools"
code_server=$(bash "$root/editors/test-tools/install-code-server.sh" "$tools/vscode")
bash "$root/editors/vscode/scripts/package.sh" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
CODE_SERVER="$code_server" PLAYWRIGHT_CORE="$tools/vscode/e2e/node_modules/playwright-core/index.mjs" \
  VSIX="$root/editors/vscode/prompt-salience.vsix" WORKDIR="$work" \
  SCREENSHOT="${SCREENSHOT:-$root/docs/vscode.png}" timeout 900 node "$here/e2e.mjs"
