#!/usr/bin/env bash
# Runs the headless Neovim test with a real Neovim 0.11.4 and the release binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
tools=${EDITOR_TOOLS:-$root/.cache/editors}
mkdir -p "$tools"
nvim=$(bash "$root/../shared/editor-testing/install-nvim.sh" "$tools/nvim")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PROMPT_SALIENCE_BIN="$root/target/release/prompt-salience" PLUGIN_DIR="$root/editors/nvim" \
  TEST_FILE="$tmp/sky.prompt.md" timeout 600 "$nvim" --headless -u NONE -i NONE -c "luafile $here/run.lua"
