#!/usr/bin/env bash
# A screenshot of the extension in real VS Code (code-server + headless Chromium), without the e2e checks.
# usage: screenshot.sh OUT.png PROMPT_FILE      (env of screenshot.mjs: COMMAND, HOVER_TEXT, HOVER_OFFSET,
# HOVER_WAIT, WAIT_S, VIEWPORT, SERVER_PATH). Uses editors/vscode/prompt-salience.vsix if it is there,
# else packages it (scripts/package.sh); the server is target/release/prompt-salience unless SERVER_PATH says.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=${1:?usage: screenshot.sh OUT.png PROMPT_FILE}
prompt=${2:?usage: screenshot.sh OUT.png PROMPT_FILE}
case $out in /*) ;; *) out=$PWD/$out ;; esac
case $prompt in /*) ;; *) prompt=$PWD/$prompt ;; esac
tools=${EDITOR_TOOLS:-$root/.cache/editors}
mkdir -p "$tools"
code_server=$(bash "$root/editors/test-tools/install-code-server.sh" "$tools/vscode")
vsix=${VSIX:-$root/editors/vscode/prompt-salience.vsix}
[ -f "$vsix" ] || bash "$root/editors/vscode/scripts/package.sh" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
CODE_SERVER="$code_server" PLAYWRIGHT_CORE="$tools/vscode/e2e/node_modules/playwright-core/index.mjs" \
  VSIX="$vsix" WORKDIR="$work" PROMPT="$prompt" SCREENSHOT="$out" \
  SERVER_PATH="${SERVER_PATH:-$root/target/release/prompt-salience}" timeout 900 node "$here/screenshot.mjs"
echo "$out"
